"""The apply transaction end to end: refusals change nothing, failures roll back,
a kill -9 at any step is recovered, and the spool, lock, boot and network paths work."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import EXAMPLES, live_files, write_payload
from vr.transaction.pipeline import Pipeline

NEW_VM = {"tier": "tier1", "mac": "02:00:00:00:01:55", "ip": "10.1.1.55", "hostname": "newvm"}


def status(lab) -> dict:
    return json.loads(lab.vr("status", "--json", check=False).stdout)


def dnsmasq_pid(lab) -> int:
    return next(s for s in status(lab)["services"] if s["name"] == "dnsmasq")["pid"]


def leases(lab) -> str:
    return (lab.settings.state_dir / "dnsmasq.leases").read_text()


def snapshot(lab) -> tuple:
    return live_files(lab), dnsmasq_pid(lab), leases(lab)


def test_invalid_payload_changes_nothing(lab, tmp_path):
    before = snapshot(lab)
    bad = {"generation": 2, "dhcp_entries": {"upsert": [{**NEW_VM, "ip": "10.1.2.55"}]}}
    result = lab.vr("apply", write_payload(tmp_path, bad), check=False)
    assert result.returncode == 2
    # Named as the manager sent it, not by its place in the merged document.
    assert "dhcp_entries.upsert[0].ip: 10.1.2.55 is outside tier tier1 subnet 10.1.1.0/24" in result.stderr
    assert snapshot(lab) == before
    last = status(lab)["last_apply"]
    assert last["outcome"] == "rejected" and status(lab)["generation"] == 1


def test_payload_refused_by_dnsmasq_checker_rolls_back(lab, tmp_path):
    before = snapshot(lab)
    tiers = json.loads((EXAMPLES / "router.json").read_text())["dhcp"]["tiers"]
    tiers[0]["options"] = [{"name": "no-such-option", "values": ["1"]}]  # valid to the schema, not to dnsmasq
    payload = {"generation": 2, "dhcp": {"tiers": tiers, "entries": []}}
    result = lab.vr("apply", write_payload(tmp_path, payload), check=False)
    assert result.returncode == 4
    assert "check failed for dnsmasq" in result.stderr and "bad dhcp-option" in result.stderr
    assert snapshot(lab) == before
    assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
    events = [json.loads(line) for line in lab.vr("events", "--resource", "router").stdout.splitlines()]
    assert events[-1]["outcome"] == "failed" and events[-1]["generation"] == 2


@pytest.mark.parametrize("step", ["staged", "checked", "journaled", "switching", "switched", "applied"])
def test_kill_at_any_step_is_rolled_back_at_next_start(lab, tmp_path, step):
    files, pid, lease_text = snapshot(lab)
    dhcp = json.loads((EXAMPLES / "router.json").read_text())["dhcp"]
    dhcp["tiers"][0]["lease_time"] = 7200  # main config changes too: dnsmasq restarts in this apply
    payload = {"generation": 2, "dhcp": dhcp, "dhcp_entries": {"upsert": [NEW_VM]}}
    killed = lab.vr("apply", write_payload(tmp_path, payload), env={"VR_FAULT_AT": step}, check=False)
    assert killed.returncode == -9
    journaled = step not in ("staged", "checked")  # before the journal, nothing live had changed
    expected = "recovered an interrupted apply" if journaled else "nothing to recover"
    assert lab.vr("recover").stdout.strip() == expected
    assert live_files(lab) == files  # every file back, no staging or backup left behind
    report = status(lab)
    assert report["generation"] == 1 and report["healthy"] and not report["journal_pending"]
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == []
    assert leases(lab) == lease_text
    if step in ("staged", "checked"):
        assert dnsmasq_pid(lab) == pid  # nothing live had changed: nothing restarted
    # The same payload applies cleanly afterwards.
    lab.vr("apply", write_payload(tmp_path, payload))
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == ["10.1.1.55"]


def test_kill_after_commit_keeps_the_new_generation(lab, tmp_path):
    payload = {"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}}
    killed = lab.vr("apply", write_payload(tmp_path, payload), env={"VR_FAULT_AT": "committed"}, check=False)
    assert killed.returncode == -9
    lab.vr("recover")
    assert status(lab)["generation"] == 2 and status(lab)["healthy"]
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == ["10.1.1.55"]


def test_an_interrupted_apply_is_also_recovered_by_the_next_apply(lab, tmp_path):
    payload = {"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}}
    lab.vr("apply", write_payload(tmp_path, payload), env={"VR_FAULT_AT": "switched"}, check=False)
    lab.vr("apply", write_payload(tmp_path, {**payload, "generation": 3}))
    assert status(lab)["generation"] == 3
    recovered = [json.loads(e) for e in lab.vr("events", "--resource", "router").stdout.splitlines()]
    assert any(e["type"] == "recover" and e["outcome"] == "rolled-back" for e in recovered)


def test_a_second_apply_waits_its_turn_in_the_daemon_and_is_refused_in_process(lab, tmp_path):
    """Another process holds the router's lock (an apply, a patch): in-process, `vr apply` is
    refused at once (75); through the daemon the push is queued and applied once it is free."""
    payload = write_payload(tmp_path, {"generation": 2, "dns": {"domain": "x.internal"}})
    with Pipeline(lab.settings).lock():
        result = lab.vr("apply", payload, env={"VR_NO_DAEMON": "1"}, check=False)
        assert result.returncode == 75 and "another apply or patch is running" in result.stderr
        queued = subprocess.Popen([*lab_vr_command(lab), "apply", payload], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(1.5)
        assert queued.poll() is None  # waiting, not refused
    out, err = queued.communicate(timeout=60)
    assert queued.returncode == 0 and out.startswith("applied generation 2"), err
    assert status(lab)["generation"] == 2


def wait_spool_empty(lab, timeout: float = 30) -> None:
    incoming = lab.settings.spool_dir / "incoming"
    deadline = time.monotonic() + timeout
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)


def drop_three(spool) -> None:
    (spool / "incoming").mkdir(parents=True, exist_ok=True)
    (spool / "incoming" / "001-add.json").write_text(
        json.dumps({"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}})
    )
    (spool / "incoming" / "002-bad.json").write_text(json.dumps({"generation": 3, "dns": {"domain": "bad domain"}}))
    (spool / "incoming" / "003-broken.json").write_text("{not json")


def assert_three_processed(lab, spool) -> None:
    assert sorted(p.name for p in (spool / "done").iterdir()) == ["001-add.json"]
    assert "dns.domain: not a valid domain name" in (spool / "failed" / "002-bad.json.error").read_text()
    assert "not valid JSON" in (spool / "failed" / "003-broken.json.error").read_text()
    assert list((spool / "incoming").iterdir()) == []
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == ["10.1.1.55"]


def test_the_daemon_applies_each_spooled_file_once_in_order(lab):
    """Files written in place are taken when their writer closes them, never half written."""
    spool = lab.settings.spool_dir
    drop_three(spool)
    wait_spool_empty(lab)
    assert_three_processed(lab, spool)
    assert lab.vr("watch", "--once", check=False).returncode == 2  # the daemon watches: no second watcher


def test_the_daemon_picks_up_a_file_renamed_into_the_spool(lab):
    incoming = lab.settings.spool_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    temp = incoming / ".drop.tmp"
    temp.write_text(json.dumps({"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}}))
    assert not (lab.settings.spool_dir / "done" / ".drop.tmp").exists()
    temp.rename(incoming / "drop.json")  # how a manager should drop a file: write, then rename
    wait_spool_empty(lab)
    assert (lab.settings.spool_dir / "done" / "drop.json").exists()
    assert status(lab)["generation"] == 2


def test_vr_watch_applies_the_spool_when_no_daemon_runs(lab):
    supervisorctl(lab, "stop", "monitor")  # the daemon (supervisord's event listener `monitor`)
    spool = lab.settings.spool_dir
    drop_three(spool)
    assert lab.vr("watch", "--once").stdout.strip() == "processed 3 file(s)"
    assert_three_processed(lab, spool)


def supervisorctl(lab, *args: str) -> str:
    config = lab.settings.service_dir("supervisor") / "supervisord.conf"
    return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60, check=False).stdout  # fmt: skip


def lab_vr_command(lab) -> list[str]:
    import sys

    return [sys.executable, "-m", "vr", "--root", str(lab.settings.state_dir.parent), "--netns", lab.router_ns]


def router_ip(lab, *args: str) -> str:
    return subprocess.run(["ip", "-n", lab.router_ns, *args], check=True, capture_output=True, text=True).stdout


def test_network_follows_the_document_and_reapply_changes_nothing(lab, tmp_path):
    original = json.loads((EXAMPLES / "router.json").read_text())
    interfaces = json.loads(json.dumps(original["interfaces"]))
    interfaces[1]["addresses"].append("192.0.2.12/24")  # an extra address
    routes = [*original["routes"], {"destination": "198.51.100.0/24", "gateway": "192.0.2.1"}]
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "interfaces": interfaces, "routes": routes}))
    assert "192.0.2.12/24" in router_ip(lab, "-o", "addr", "show", "eth1")
    assert "198.51.100.0/24 via 192.0.2.1" in router_ip(lab, "route")
    same = lab.vr("apply", write_payload(tmp_path, {"generation": 3, "interfaces": interfaces, "routes": routes}))
    assert same.stdout.strip().endswith("changed: nothing")
    back = {"generation": 4, "interfaces": original["interfaces"], "routes": original["routes"]}
    lab.vr("apply", write_payload(tmp_path, back))
    assert "192.0.2.12" not in router_ip(lab, "-o", "addr")
    assert "198.51.100.0" not in router_ip(lab, "route")
    assert "default via 192.0.2.1" in router_ip(lab, "route")


def test_stop_then_start_brings_the_router_back_with_its_leases(lab):
    lease_text = leases(lab)
    lab.vr("stop")
    assert status(lab)["healthy"] is False
    lab.vr("start")
    report = status(lab)
    assert report["healthy"] and report["generation"] == 1
    assert leases(lab) == lease_text
    assert lab.resolve(lab.ns("g2"), "web1.cloud.internal", "10.1.2.1") == ["10.1.1.10"]
    assert "default via 192.0.2.1" in router_ip(lab, "route")  # a forced start keeps vr's routes


def test_start_after_a_power_loss_renders_every_live_file_again(lab):
    """Only the stored document is fsynced on an apply. A power loss may leave live files
    empty or gone and a journal naming backups that never reached the disk: `vr start`
    (at boot) brings back the stored generation, every file as rendered, the names answering."""
    rendered = live_files(lab)
    lab.vr("stop")
    dnsmasq, nftables = lab.settings.service_dir("dnsmasq"), lab.settings.service_dir("nftables")
    (dnsmasq / "dhcp-hosts").write_bytes(b"")  # the rename reached the disk, its data did not
    for shard in (dnsmasq / "names").iterdir():
        shard.unlink()
    (nftables / "vr.nft").write_bytes(b"")
    lab.settings.journal_path.write_text(json.dumps(  # an apply of generation 2 cut off mid-switch
        {"txid": "lost0backups", "generation": 2, "changes": {"dnsmasq": ["dhcp-hosts"], "nftables": ["vr.nft"]}}
    ))  # fmt: skip
    lab.vr("start")
    report = status(lab)
    assert report["healthy"] and report["generation"] == 1
    assert live_files(lab) == rendered
    assert lab.resolve(lab.ns("g2"), "web1.cloud.internal", "10.1.2.1") == ["10.1.1.10"]


def test_diff_and_render_show_without_applying(lab, tmp_path):
    path = write_payload(tmp_path, {"generation": 2, "dhcp_entries": {"upsert": [NEW_VM]}})
    diff = lab.vr("diff", path).stdout
    assert "+02:00:00:00:01:55,10.1.1.55,newvm,3600" in diff and "+10.1.1.55 newvm" in diff
    out = tmp_path / "rendered"
    lab.vr("render", path, "--out", str(out))
    assert any("newvm" in shard.read_text() for shard in (out / "dnsmasq" / "names").iterdir())
    assert status(lab)["generation"] == 1


def test_removing_an_interface_removes_all_its_addresses(lab, tmp_path):
    original = json.loads((EXAMPLES / "router.json").read_text())
    assert "192.0.2.11/24" in router_ip(lab, "-o", "addr", "show", "eth1")  # a secondary (public IP)
    without_public = [i for i in original["interfaces"] if i["role"] != "public"]
    payload = {"generation": 2, "interfaces": without_public, "routes": [], "nat": {}, "firewall": {}}
    lab.vr("apply", write_payload(tmp_path, payload))
    assert "inet " not in router_ip(lab, "-o", "addr", "show", "eth1")  # primary and secondaries gone


BURST_SCRIPT = """
import json, sys
from vr.foundation.settings import Settings
from vr.services.base import CheckFailed
from vr.services.dnsmasq import DnsmasqService
from vr.transaction.pipeline import Pipeline, Push, Result

checked = DnsmasqService.check

def refusing_check(self, staged_dir, change, runtime):
    if any(b"refuseme" in content for content in change.written.values()):
        raise CheckFailed("dnsmasq: this name is refused")
    return checked(self, staged_dir, change, runtime)

DnsmasqService.check = refusing_check  # a checker that refuses one of the three
pushes = [Push(raw, next_generation=True) for raw in json.loads(sys.argv[2])]
outcomes = Pipeline(Settings.under_root(sys.argv[1])).apply_batch(pushes)
print(json.dumps([{"generation": o.generation, "batched": o.batched} if isinstance(o, Result)
                  else {"error": type(o).__name__, "step": o.step, "message": str(o)} for o in outcomes]))
"""


def test_a_burst_whose_joint_transaction_fails_is_applied_one_by_one(lab):
    """Three valid payloads, one of which dnsmasq's checker refuses (standing in for any step
    that fails after validation): together they fail, so each is tried alone and only that one
    is refused; the other two apply, each in its own transaction."""
    vms = [{**NEW_VM, "mac": f"02:00:00:00:01:6{n}", "ip": f"10.1.1.6{n}", "hostname": name}
           for n, name in enumerate(("first", "refuseme", "third"))]  # fmt: skip
    payloads = json.dumps([{"dhcp_entries": {"upsert": [vm]}} for vm in vms])
    run = subprocess.run(["ip", "netns", "exec", lab.router_ns, sys.executable, "-c", BURST_SCRIPT,
                          str(lab.settings.state_dir.parent), payloads],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    first, refused, third = json.loads(run.stdout)
    assert refused["error"] == "ApplyFailed" and refused["step"] == "check", refused
    assert "this name is refused" in refused["message"]
    assert (first, third) == ({"generation": 2, "batched": 1}, {"generation": 3, "batched": 1})
    assert lab.resolve(lab.ns("g1"), "first.cloud.internal", "10.1.1.1") == ["10.1.1.60"]
    assert lab.resolve(lab.ns("g1"), "third.cloud.internal", "10.1.1.1") == ["10.1.1.62"]
    assert lab.resolve(lab.ns("g1"), "refuseme.cloud.internal", "10.1.1.1") == []  # NXDOMAIN
    assert status(lab)["generation"] == 3
