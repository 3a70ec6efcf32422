"""How a dhcp-hosts change reaches a running dnsmasq: a drop-in, or a full re-read."""

from __future__ import annotations

from vr.services.base import Change
from vr.services.dnsmasq import HOSTS, MAX_SHADOWED, _drop_in

WEB = b"02:00:00:00:01:10,10.1.1.10,web1,3600"
DB = b"02:00:00:00:02:10,10.1.2.10,[2001:db8:1:2::10],db1,3600"
DB_DUID = b"id:00:01:00:01:aa:bb,[2001:db8:1:2::10],db1,3600"


def change(before: list[bytes], after: list[bytes]) -> Change:
    written = b"".join(line + b"\n" for line in after)
    return Change("dnsmasq", written={HOSTS: written}, previous={HOSTS: b"".join(line + b"\n" for line in before)})


def test_an_added_vm_is_dropped_in_alone():
    assert _drop_in(change([WEB], [WEB, DB]), shadowed=[]) == DB + b"\n"


def test_a_removed_vm_is_ignored_from_now_on_and_recorded():
    drop_in = _drop_in(change([WEB, DB, DB_DUID], [WEB]), shadowed=[]).splitlines()
    assert sorted(drop_in) == sorted([
        b"# shadowed: " + DB, b"# shadowed: " + DB_DUID,
        b"02:00:00:00:02:10,ignore", b"id:00:01:00:01:aa:bb,ignore",
    ])  # fmt: skip


def test_reusing_what_dnsmasq_still_holds_takes_a_full_reread():
    reused_ip = b"02:00:00:00:02:98,10.1.2.10,db2,3600"
    assert _drop_in(change([WEB], [WEB, reused_ip]), shadowed=[DB]) is None
    assert _drop_in(change([WEB, DB], [WEB, reused_ip]), shadowed=[]) is None  # in the same apply
    moved = b"02:00:00:00:02:10,10.1.2.11,db1,3600"  # same MAC, new address
    assert _drop_in(change([WEB, DB], [WEB, moved]), shadowed=[]) is None
    reused_v6 = b"02:00:00:00:02:97,10.1.2.12,[2001:db8:1:2::10],db3,3600"
    assert _drop_in(change([WEB], [WEB, reused_v6]), shadowed=[DB]) is None


def test_too_many_shadowed_vms_take_a_full_reread():
    shadowed = [
        b"02:00:00:00:%02x:%02x,10.9.%d.%d,vm,3600" % (n // 256, n % 256, n // 256, n % 256)
        for n in range(MAX_SHADOWED)
    ]
    assert _drop_in(change([WEB, DB], [WEB]), shadowed=shadowed) is None
    assert _drop_in(change([WEB, DB], [WEB]), shadowed=shadowed[1:]) is not None


def test_a_first_file_or_a_removed_one_takes_a_full_reread():
    assert _drop_in(Change("dnsmasq", written={HOSTS: WEB + b"\n"}, previous={HOSTS: None}), shadowed=[]) is None
