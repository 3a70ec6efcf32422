"""dnsmasq end to end: real daemon under supervisord, real dhclient guests in namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import write_payload


def dnsmasq_pid(lab) -> int:
    services = json.loads(lab.vr("status", "--json", check=False).stdout)["services"]
    return next(s for s in services if s["name"] == "dnsmasq").get("pid")


def lease_lines(lab) -> dict[str, str]:
    """dnsmasq's own lease file: MAC -> 'expiry ip hostname'."""
    text = (lab.settings.state_dir / "dnsmasq.leases").read_text()
    return {fields[1]: line for line in text.splitlines() if len(fields := line.split()) >= 4}


def test_guests_get_their_static_lease_and_options(lab):
    g1, g2 = lab.guest_lease("g1"), lab.guest_lease("g2")
    assert g1["address"] == "10.1.1.10" and g1["configured"] == ["10.1.1.10/24"]
    assert g1["routers"] == "10.1.1.1" and g1["dns"] == "10.1.1.1" and g1["domain"] == "cloud.internal"
    assert g1["link_mtu"] == 1450  # the tier's MTU reached the guest
    assert g2["address"] == "10.1.2.10" and g2["link_mtu"] == 1500


def test_guest_names_resolve_through_the_router(lab):
    assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
    assert lab.resolve(lab.ns("g2"), "web1.cloud.internal", "10.1.2.1") == ["10.1.1.10"]
    assert lab.resolve(lab.ns("g1"), "nosuchvm.cloud.internal", "10.1.1.1") == []


def test_no_dns_on_the_public_interface(lab):
    assert lab.resolve(lab.ns("g1"), "web1.cloud.internal", "10.1.1.1") == ["10.1.1.10"]
    with pytest.raises(TimeoutError):
        lab.resolve(lab.ns("pub"), "web1.cloud.internal", "192.0.2.10", timeout=1.0)


def test_vm_added_by_partial_payload_while_leases_and_pid_survive(lab, tmp_path):
    pid = dnsmasq_pid(lab)
    before = lease_lines(lab)["02:00:00:00:01:10"]
    generation = 1
    for batch in range(10):  # 100 VMs, ten partial payloads
        generation += 1
        upsert = [
            {"tier": "tier1", "mac": f"02:00:00:00:1{batch}:{n:02x}", "ip": f"10.1.1.{20 + batch * 10 + n}",
             "hostname": f"vm{batch}-{n}"}
            for n in range(10)
        ]  # fmt: skip
        lab.vr("apply", write_payload(tmp_path, {"generation": generation, "dhcp_entries": {"upsert": upsert}}))
    assert dnsmasq_pid(lab) == pid  # SIGHUP, never a restart
    assert lease_lines(lab)["02:00:00:00:01:10"] == before
    assert lab.resolve(lab.ns("g1"), "vm9-9.cloud.internal", "10.1.1.1") == ["10.1.1.119"]

    # A new VM on tier2: guest g2 becomes that VM (new MAC) and gets the new address.
    new_vm = {"tier": "tier2", "mac": "02:00:00:00:02:99", "ip": "10.1.2.99", "hostname": "app9"}
    lab.vr("apply", write_payload(tmp_path, {"generation": 20, "dhcp_entries": {"upsert": [new_vm]}}))
    lab.stop_dhclient("g2")
    (lab.dir / "g2.leases").unlink()
    lab.set_guest_mac("g2", "02:00:00:00:02:99")
    assert lab.dhcp("g2")["address"] == "10.1.2.99"

    # The existing guest renews (INIT-REBOOT with its lease) and keeps its address.
    lab.stop_dhclient("g1")
    assert lab.dhcp("g1")["address"] == "10.1.1.10"
    assert dnsmasq_pid(lab) == pid


def test_removed_vm_lease_is_released_and_name_gone(lab, tmp_path):
    assert "02:00:00:00:02:10" in lease_lines(lab)
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"delete": ["02:00:00:00:02:10"]}}))
    assert "02:00:00:00:02:10" not in lease_lines(lab)  # dhcp_release, not a deleted lease file
    assert "02:00:00:00:01:10" in lease_lines(lab)  # another VM's lease is untouched
    assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == []


def test_removed_vm_is_refused_and_its_address_reused_without_restart(lab, tmp_path):
    pid = dnsmasq_pid(lab)
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"delete": ["02:00:00:00:02:10"]}}))
    lab.stop_dhclient("g2")
    (lab.dir / "g2.leases").unlink()
    with pytest.raises(subprocess.TimeoutExpired):
        lab.dhcp("g2", timeout=3)  # the removed VM's MAC gets no lease any more

    # A new VM takes the removed one's address (an address dnsmasq still held: a full re-read).
    db2 = {"tier": "tier2", "mac": "02:00:00:00:02:98", "ip": "10.1.2.10", "hostname": "db2"}
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "dhcp_entries": {"upsert": [db2]}}))
    lab.set_guest_mac("g2", "02:00:00:00:02:98")
    assert lab.dhcp("g2")["address"] == "10.1.2.10"
    assert lab.resolve(lab.ns("g1"), "db2.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
    assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == []
    assert dnsmasq_pid(lab) == pid

    # More VMs come and go as drop-ins; a dnsmasq restarted after a crash reads the full set.
    extra = {"tier": "tier1", "mac": "02:00:00:00:01:77", "ip": "10.1.1.77", "hostname": "extra"}
    lab.vr("apply", write_payload(tmp_path, {"generation": 4, "dhcp_entries": {"upsert": [extra]}}))
    lab.vr("apply", write_payload(tmp_path, {"generation": 5, "dhcp_entries": {"delete": ["02:00:00:00:01:10"]}}))
    drop_ins = lab.settings.run_dir / "dnsmasq-hosts.d"
    assert len(list(drop_ins.iterdir())) == 2
    assert lab.resolve(lab.ns("g1"), "extra.cloud.internal", "10.1.1.1") == ["10.1.1.77"]
    assert lab.resolve(lab.ns("g1"), "web1.cloud.internal", "10.1.1.1") == []
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while dnsmasq_pid(lab) in (pid, 0, None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dnsmasq_pid(lab) not in (pid, 0, None)
    assert list(drop_ins.iterdir()) == []
    assert lab.resolve(lab.ns("g1"), "extra.cloud.internal", "10.1.1.1") == ["10.1.1.77"]
    lab.stop_dhclient("g2")
    assert lab.dhcp("g2")["address"] == "10.1.2.10"


def test_main_config_change_restarts_dnsmasq_and_keeps_leases(lab, tmp_path):
    pid = dnsmasq_pid(lab)
    leases = lease_lines(lab)
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "dns": {"domain": "other.internal"}}))
    assert dnsmasq_pid(lab) != pid
    assert lease_lines(lab).keys() == leases.keys()
    assert lab.resolve(lab.ns("g1"), "web1.other.internal", "10.1.1.1") == ["10.1.1.10"]
    lab.stop_dhclient("g1")
    assert lab.dhcp("g1")["address"] == "10.1.1.10"


def test_second_nic_without_default_gateway_survives_reloads(lab, tmp_path):
    db1 = {"tier": "tier2", "mac": "02:00:00:00:02:10", "ip": "10.1.2.10", "hostname": "db1", "default_gateway": False}
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"upsert": [db1]}}))
    lab.stop_dhclient("g2")
    lease = lab.dhcp("g2")
    assert lease["address"] == "10.1.2.10" and lease["routers"] is None  # no second default route
    assert lab.guest_lease("g1")["routers"] == "10.1.1.1"  # other VMs keep theirs
    pid = dnsmasq_pid(lab)
    extra = {"tier": "tier1", "mac": "02:00:00:00:01:77", "ip": "10.1.1.77", "hostname": "extra"}
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "dhcp_entries": {"upsert": [extra]}}))
    assert dnsmasq_pid(lab) == pid  # a SIGHUP with a tagged VM holding a lease: no crash
    assert lab.resolve(lab.ns("g1"), "extra.cloud.internal", "10.1.1.1") == ["10.1.1.77"]
