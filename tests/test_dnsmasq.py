"""dnsmasq: how a dhcp-hosts change reaches a running dnsmasq (a drop-in, or a full re-read),
what its host lines say, which leases a change releases."""

from __future__ import annotations

import json
from ipaddress import IPv6Address

from tests.conftest import EXAMPLES
from vr.foundation import document as docmod
from vr.foundation.settings import Settings
from vr.services import dnsmasq
from vr.services.base import Change
from vr.services.dnsmasq import HOSTS, MAIN, MAX_SHADOWED, DnsmasqService, Lease6, _drop_in, _release6_packet
from vr.services.runtime import Runtime

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


# A line that carries an IPv6 address has no lease time (each family takes its tier's).
DB6 = b"02:00:00:00:02:10,10.1.2.10,[2001:db8:1:2::10],db1"
DB6_DUID = b"id:00:01:00:01:aa:bb,[2001:db8:1:2::10],db1"


def test_an_ipv6_address_still_held_takes_a_full_reread_in_lines_without_lease_time():
    reused_v6 = b"02:00:00:00:02:97,10.1.2.12,[2001:db8:1:2::10],db3"
    assert _drop_in(change([WEB], [WEB, reused_v6]), shadowed=[DB6]) is None
    assert _drop_in(change([WEB], [WEB, reused_v6]), shadowed=[DB6_DUID]) is None
    other = b"02:00:00:00:02:96,10.1.2.13,[2001:db8:1:2::13],db1"  # its name is not something dnsmasq holds
    assert _drop_in(change([WEB], [WEB, other]), shadowed=[DB6]) == other + b"\n"


def ipv6_router() -> dict:
    """The example router with the lab's IPv6 tiers (configs/lab/ipv6.json: tier2 DHCPv6)."""
    payload = json.loads((EXAMPLES / "router.json").read_text())
    lab_ipv6 = json.loads((EXAMPLES.parent / "lab" / "ipv6.json").read_text())
    return {**payload, "interfaces": lab_ipv6["interfaces"], "ipv6": {"tiers": lab_ipv6["ipv6"]["tiers"]}}


def test_lease_times_each_familys_own(tmp_path):
    payload = ipv6_router()
    payload["ipv6"]["tiers"][1]["lease_time"] = 7200
    payload["dhcp"]["entries"][1]["ipv6"] = "2001:db8:1:2::10"
    files = DnsmasqService().generate(docmod.build_document(payload), Runtime(Settings.under_root(tmp_path)))
    assert files[HOSTS].splitlines() == [WEB, DB6]  # IPv4 alone: the line may carry dhcp.tiers' time
    conf = files[MAIN].decode()
    assert "dhcp-range=set:tier_tier2,10.1.2.0,static,255.255.255.0,3600\n" in conf
    assert "dhcp-range=set:tier6_tier2,2001:db8:1:2::,static,64,7200\n" in conf
    assert "dhcp-option-force=tag:tier_tier1,option:mtu,1450\n" in conf  # to clients that never ask
    assert conf.count("option:mtu") == conf.count("dhcp-option-force=") == 2  # one per tier, forced


def test_a_hostname_dnsmasq_would_read_as_a_lease_time_or_keyword_is_refused():
    payload = json.loads((EXAMPLES / "router.json").read_text())
    for n, name in enumerate(["123", "5h", "ignore", "Infinite"]):  # a 123 s lease, no lease at all, ...
        payload["dhcp"]["entries"].append({"tier": "tier1", "mac": f"02:00:00:00:01:{n + 32:02x}",
                                           "ip": f"10.1.1.{n + 32}", "hostname": name})  # fmt: skip
    payload["dhcp"]["entries"].append({"tier": "tier1", "mac": "02:00:00:00:01:40", "ip": "10.1.1.40",
                                       "hostname": "web5h"})  # fmt: skip
    problems = DnsmasqService().verify(docmod.build_document(payload))
    assert [p.path for p in problems] == [f"dhcp.entries[{n}].hostname" for n in range(2, 6)]
    assert "dnsmasq" in problems[0].reason and "'123'" in problems[0].reason


def test_which_dhcpv6_leases_are_released(monkeypatch):
    """A removed or renamed VM's IPv6 lease is released (one Relay-Forward per lease, no
    signal); a VM whose IPv6 address and name stay keeps it, whatever else changed."""
    doc = docmod.build_document(ipv6_router())
    lease = Lease6("1", "2001:db8:1:2::10", "00:01:00:01:aa:bb:cc:dd:02:00:00:00:02:10")
    leases = dnsmasq.Leases({"02:00:00:00:02:10"}, [lease], "00:01:00:01:11:22")
    sent: list[tuple] = []
    monkeypatch.setattr(dnsmasq, "_release6", lambda *args: sent.append(args))
    monkeypatch.setattr(dnsmasq.subprocess, "run", lambda *args, **kw: None)  # dhcp_release (IPv4)

    def released(after: list[bytes]) -> list[tuple]:
        sent.clear()
        dnsmasq._release_dropped_leases(change([WEB, DB6], after), doc, leases)
        return sent

    expected = [("eth3", [lease], "00:01:00:01:11:22", IPv6Address("2001:db8:1:2::1"))]
    assert released([WEB]) == expected  # deleted
    assert released([WEB, DB6.replace(b"db1", b"db7")]) == expected  # renamed
    assert released([WEB, DB6.replace(b"10.1.2.10", b"10.1.2.11")]) == []  # its IPv4 address moved
    assert released([WEB, DB6]) == []


def test_a_dhcpv6_release_is_what_dnsmasq_reads():
    lease = Lease6("1", "2001:db8:1:2::10", "00:01:00:01:aa:bb")
    packet = _release6_packet(b"xyz", lease, "00:03:00:01:02:00:00:00:00:01")
    assert packet == bytes.fromhex(
        "08" "78797a"  # Release, transaction id
        "0001" "0006" "00010001aabb"  # client id
        "0002" "000a" "00030001020000000001"  # server id
        "0003" "0028" "00000001" "00000000" "00000000"  # IA_NA: IAID 1, T1, T2
        "0005" "0018" "20010db8000100020000000000000010" "00000000" "00000000"  # IAADDR, lifetimes 0
    )  # fmt: skip
