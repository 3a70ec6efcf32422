"""dnsmasq end to end: real daemon under supervisord, real dhclient guests in namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import stored_document, write_payload


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
    # Asked by db2 (g2): g1 is web1, a VM no longer, whose packets anti-spoofing drops.
    assert lab.resolve(lab.ns("g2"), "extra.cloud.internal", "10.1.2.1") == ["10.1.1.77"]
    assert lab.resolve(lab.ns("g2"), "web1.cloud.internal", "10.1.2.1") == []
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while dnsmasq_pid(lab) in (pid, 0, None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dnsmasq_pid(lab) not in (pid, 0, None)
    assert list(drop_ins.iterdir()) == []
    assert lab.resolve(lab.ns("g2"), "extra.cloud.internal", "10.1.2.1") == ["10.1.1.77"]
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


RESOLVE_ALL = """
import json, sys, dns.message, dns.query, dns.rdatatype
answers = {}
for name in json.loads(sys.argv[2]):
    reply = dns.query.udp(dns.message.make_query(name, dns.rdatatype.A), sys.argv[1], timeout=2)
    answers[name] = sorted(str(x) for s in reply.answer for x in s if s.rdtype == dns.rdatatype.A)
print(json.dumps(answers))
"""


def resolve_all(lab, names: list[str]) -> dict[str, list[str]]:
    """Many names asked from guest g1 in one process (lab.resolve starts one per name)."""
    result = subprocess.run(["ip", "netns", "exec", lab.ns("g1"), sys.executable, "-c", RESOLVE_ALL, "10.1.1.1",
                             json.dumps(names)], capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(result.stdout)


def test_names_follow_adds_removals_renames_a_restart_and_a_rollback(lab, tmp_path):
    """dnsmasq's hostsdir is edited change by change (an added VM's names in a file of their
    own, a removed one's file rewritten without them); after any sequence, a dnsmasq restart
    in the middle and a rolled-back apply, it answers exactly the document's names."""
    import random

    chooser = random.Random(18)
    generation = json.loads(lab.vr("status", "--json").stdout)["generation"]
    vms = {vm["mac"]: vm for vm in json.loads(stored_document(lab.settings))["dhcp"]["entries"]}
    asked: set[str] = {f"{vm['hostname']}.cloud.internal" for vm in vms.values()}
    serial = 0

    def push(upsert: list[dict], delete: list[str], env: dict | None = None) -> int:
        nonlocal generation
        generation += 1
        payload = {"generation": generation, "dhcp_entries": {"upsert": upsert, "delete": delete}}
        return lab.vr("apply", write_payload(tmp_path, payload), env=env, check=env is None).returncode

    def expect_document_names() -> None:
        answers = resolve_all(lab, sorted(asked))
        wanted = {f"{vm['hostname']}.cloud.internal": [vm["ip"]] for vm in vms.values()}
        assert {name: answers[name] for name in asked} == {name: wanted.get(name, []) for name in asked}

    for step in range(14):
        ours = [mac for mac in vms if mac.startswith("02:00:00:00:7")]
        upsert, delete = [], []
        for _ in range(chooser.randint(1, 3)):  # new VMs
            serial += 1
            upsert.append({"tier": "tier1", "mac": f"02:00:00:00:7{serial // 256:x}:{serial % 256:02x}",
                           "ip": f"10.1.1.{100 + serial}", "hostname": f"n{serial}"})  # fmt: skip
        if ours:
            picked = chooser.sample(ours, min(len(ours), chooser.randint(1, 2)))
            delete.append(picked[0])  # removed
            for mac in picked[1:]:  # renamed
                upsert.append({**vms[mac], "hostname": f"{vms[mac]['hostname']}r"})
        push(upsert, delete)
        for mac in delete:
            del vms[mac]
        for vm in upsert:
            vms[vm["mac"]] = vm
            asked.add(f"{vm['hostname']}.cloud.internal")
        if step == 6:  # killed: supervisord starts it again, its start copies the names anew
            old = dnsmasq_pid(lab)
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while (dnsmasq_pid(lab) in (None, old)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert dnsmasq_pid(lab) not in (None, old)
            time.sleep(0.5)
        if step in (3, 6, 9, 13):
            expect_document_names()

    # An apply that fails after every service took its change is rolled back whole.
    serial += 1
    doomed = {"tier": "tier1", "mac": "02:00:00:00:7f:01", "ip": f"10.1.1.{100 + serial}", "hostname": "doomed"}
    gone = next(mac for mac in vms if mac.startswith("02:00:00:00:7"))
    asked.add("doomed.cloud.internal")
    assert push([doomed], [gone], env={"VR_FAULT_ENOSPC": "commit"}) == 4
    generation -= 1
    expect_document_names()
    del vms[gone]
    push([doomed], [gone])  # and the next change starts from what dnsmasq really holds
    vms[doomed["mac"]] = doomed
    expect_document_names()
