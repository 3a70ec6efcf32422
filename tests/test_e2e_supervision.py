"""Supervision end to end: a killed apply recovered by whatever runs next (a command or the
monitor), an intentional stop that raises nothing, supervisord itself killed and brought
back without duplicate daemons, and a start that rolls back without tearing the network down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import EXAMPLES, example_lab, live_files, write_payload
from tests.test_e2e_haproxy import LB_IP, apply_lb, lb_rule
from tests.test_e2e_monitor import alive, answers, service, status, wait_for
from vr.foundation.lock import router_lock

NEW_VM = {"tier": "tier1", "mac": "02:00:00:00:01:55", "ip": "10.1.1.55", "hostname": "newvm"}


def killed_apply(lab, tmp_path, step: str = "switched") -> None:
    dhcp = json.loads((EXAMPLES / "router.json").read_text())["dhcp"]
    dhcp["tiers"][0]["lease_time"] = 7200  # the main config changes too: dnsmasq restarts
    payload = {"generation": 2, "dhcp": dhcp, "dhcp_entries": {"upsert": [NEW_VM]}}
    killed = lab.vr("apply", write_payload(tmp_path, payload), env={"VR_FAULT_AT": step}, check=False)
    assert killed.returncode == -9 and lab.settings.journal_path.exists()


def events_since(lab, count: int) -> list[dict]:
    return [json.loads(line) for line in lab.settings.events_path.read_text().splitlines()[count:]]


def event_count(lab) -> int:
    return len(lab.settings.events_path.read_text().splitlines())


def supervisord_pid(lab) -> int | None:
    return live_pid_in(lab.settings.run_dir / "supervisord.pid")


def live_pid_in(path: Path) -> int | None:
    """The PID a PID file names, if that process lives."""
    try:
        pid = int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def router_daemons(lab) -> dict[str, list[int]]:
    """Every process whose command line names this router's config dir, by executable."""
    found: dict[str, list[int]] = {}
    marker = f"{lab.settings.config_dir}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(marker in arg for arg in argv) and alive(int(entry.name)):
            name = Path(argv[1] if Path(argv[0]).name.startswith("python") else argv[0]).name
            found.setdefault(name, []).append(int(entry.name))
    return found


def keeper_pid(lab) -> int | None:
    return live_pid_in(lab.settings.run_dir / "keeper.pid")


def monitor_ok(lab, name: str = "dnsmasq") -> bool:
    return service(lab, name).get("monitor", {}).get("state") == "ok"


# ---------------------------------------------------------------- 1. every command recovers
def test_status_after_a_killed_apply_rolls_it_back_first(lab, tmp_path):
    files = live_files(lab)
    killed_apply(lab, tmp_path)
    report = status(lab)
    assert not report["journal_pending"] and report["generation"] == 1
    assert report["healthy"], report
    assert live_files(lab) == files
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == []
    assert "rolled-back" in [e["outcome"] for e in events_since(lab, 0) if e["type"] == "recover"]


def test_a_pending_journal_is_never_healthy_and_the_monitor_recovers_it(lab, tmp_path):
    files = live_files(lab)
    killed_apply(lab, tmp_path, "applied")
    with router_lock(lab.settings):  # as if the apply still ran
        result = lab.vr("status", "--json", check=False)
        report = json.loads(result.stdout)
        assert result.returncode == 1 and not report["healthy"] and report["journal_pending"]
        assert "apply" in report["apply_in_progress"]
        time.sleep(2)
        assert lab.settings.journal_path.exists()  # the monitor leaves a running apply alone
    # Its owner gone, the monitor rolls it back by itself: no command needed.
    assert wait_for(lambda: not lab.settings.journal_path.exists(), 20)
    assert wait_for(lambda: live_files(lab) == files, 5)
    report = status(lab)
    assert report["generation"] == 1 and report["healthy"], report
    assert lab.resolve(lab.ns("g1"), "newvm.cloud.internal", "10.1.1.1") == []


# ---------------------------------------------------------------- 2. an intentional stop
def hold_a_connection(lab) -> subprocess.Popen:
    """A client in the middle of a request through haproxy: haproxy takes a while to stop."""
    code = (f"import socket, time\ns = socket.create_connection(('{LB_IP}', 80))\n"
            "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n')\nprint('ready', flush=True)\ntime.sleep(20)\n")
    client = subprocess.Popen(["ip", "netns", "exec", lab.ns("pub"), sys.executable, "-c", code],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert client.stdout.readline().strip() == "ready"
    return client


def test_stop_raises_no_failure_restart_or_alert(lab, tmp_path):
    lab.serve(lab.ns("g1"), "web1", 8000, http=True)
    apply_lb(lab, tmp_path, 2, lb_rule(members=[{"ip": "10.1.1.10"}]))
    assert wait_for(lambda: monitor_ok(lab) and monitor_ok(lab, "haproxy"), 10)
    client = hold_a_connection(lab)
    try:
        before = event_count(lab)
        assert lab.vr("stop").stdout.strip() == "stopped"
        time.sleep(1.5)
    finally:
        client.kill()
        client.wait(timeout=5)
    noise = [e for e in events_since(lab, before) if e["type"] in ("monitor", "alert")]
    assert noise == []
    assert router_daemons(lab) == {}
    lab.vr("start")
    assert answers(lab) == ["10.1.1.10"]


# ---------------------------------------------------------------- 3. supervisord killed
def test_killed_supervisord_is_brought_back_with_its_daemons_once(lab):
    assert wait_for(lambda: monitor_ok(lab), 10)
    old_supervisord, old_dnsmasq = supervisord_pid(lab), service(lab, "dnsmasq")["pid"]
    os.kill(old_supervisord, signal.SIGKILL)
    assert wait_for(lambda: (supervisord_pid(lab) or old_supervisord) != old_supervisord, 15)
    assert wait_for(lambda: service(lab, "dnsmasq").get("state") == "RUNNING" and monitor_ok(lab), 20)
    assert not alive(old_dnsmasq)  # the orphan was stopped, not left beside a second one
    daemons = router_daemons(lab)
    assert len(daemons["dnsmasq"]) == 1 and len(daemons["supervisord"]) == 1, daemons
    assert answers(lab) == ["10.1.1.10"]
    # The monitor is back too: a daemon that dies now is started again.
    os.kill(service(lab, "dnsmasq")["pid"], signal.SIGKILL)
    assert wait_for(lambda: answers(lab), 10) == ["10.1.1.10"]


def test_health_nobody_checks_is_not_reported(lab):
    """A monitor that stopped checking (its daemon hung) vouches for nothing: read in-process
    (the hung daemon answers no one), its services are unknown once its report is stale. The
    keeper, whose watchdog would kill the hung daemon first, is paused meanwhile."""
    assert wait_for(lambda: monitor_ok(lab), 10)
    health = json.loads((lab.settings.run_dir / "health.json").read_text())
    assert health["monitor_pid"] and health["checked_at"]
    in_process = {"VR_NO_DAEMON": "1"}

    def report() -> dict:
        return json.loads(lab.vr("status", "--json", env=in_process, check=False).stdout)

    keeper = keeper_pid(lab)
    os.kill(keeper, signal.SIGSTOP)
    os.kill(health["monitor_pid"], signal.SIGSTOP)
    try:
        dnsmasq = lambda: next(s for s in report()["services"] if s["name"] == "dnsmasq")
        assert wait_for(lambda: dnsmasq().get("monitor", {}).get("state") == "unknown", 30, step=0.5)
        assert report()["monitor"]["stale"]
    finally:
        os.kill(health["monitor_pid"], signal.SIGCONT)
        os.kill(keeper, signal.SIGCONT)
    assert wait_for(lambda: monitor_ok(lab), 10)


# ---------------------------------------------------------------- 4. orphans
def orphan_the_daemons(lab) -> dict[str, list[int]]:
    """supervisord and whatever would bring it back killed: its daemons run on, orphaned."""
    keeper = keeper_pid(lab)
    if keeper:
        os.kill(keeper, signal.SIGKILL)
    os.kill(supervisord_pid(lab), signal.SIGKILL)
    assert wait_for(lambda: supervisord_pid(lab) is None, 5)
    orphans = router_daemons(lab)
    assert orphans.get("dnsmasq")
    return orphans


def test_start_after_supervisord_died_stops_the_orphans_first(lab):
    orphans = orphan_the_daemons(lab)
    result = lab.vr("start", check=False)
    assert result.returncode == 0, result.stderr
    assert not [pid for pids in orphans.values() for pid in pids if alive(pid)]
    daemons = router_daemons(lab)
    assert len(daemons["dnsmasq"]) == 1 and len(daemons["supervisord"]) == 1, daemons
    report = status(lab)
    assert report["healthy"], report
    assert answers(lab) == ["10.1.1.10"]


def test_stop_after_supervisord_died_stops_the_orphans(lab):
    orphans = orphan_the_daemons(lab)
    lab.vr("stop")
    assert not [pid for pids in orphans.values() for pid in pids if alive(pid)]
    assert router_daemons(lab) == {}


# ---------------------------------------------------------------- 5. a start that rolls back
def router_state(lab) -> tuple[str, str, int]:
    ns = ["ip", "-n", lab.ns("r")]
    routes = subprocess.run([*ns, "route", "show", "default"], capture_output=True, text=True, check=True).stdout
    addresses = subprocess.run([*ns, "-br", "addr"], capture_output=True, text=True, check=True).stdout
    table = subprocess.run(["ip", "netns", "exec", lab.ns("r"), "nft", "list", "set", "inet", "vr", "public_ips"],
                           capture_output=True, text=True, check=False).returncode  # fmt: skip
    return routes, addresses, table


def test_a_start_that_rolls_back_keeps_the_network(lab):
    before = router_state(lab)
    assert before[0] and before[2] == 0
    lab.vr("stop")
    # Something that is not vr's holds dnsmasq's DNS port: the start fails its health gate.
    blocker = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("r"), sys.executable, "-c",
         ("import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
          "s.bind(('10.1.1.1', 53))\nprint('ready', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert blocker.stdout.readline().strip() == "ready"
        result = lab.vr("start", check=False)
        assert result.returncode == 4, result.stderr
        assert router_state(lab) == before  # the previous state had them: a rollback keeps them
        report = status(lab)
        network = next(s for s in report["services"] if s["name"] == "network")
        assert network["healthy"] and not report["healthy"]
    finally:
        blocker.kill()
        blocker.wait(timeout=5)
    lab.vr("start")
    assert answers(lab) == ["10.1.1.10"]


def test_status_reports_a_missing_route_as_a_network_failure(lab):
    subprocess.run(["ip", "-n", lab.ns("r"), "route", "del", "default"], check=True)
    network = next(s for s in status(lab)["services"] if s["name"] == "network")
    assert not network["healthy"] and "route" in network["reason"]


# ---------------------------------------------------------------- 6. counters survive the monitor
def test_restart_counters_survive_a_killed_monitor(lab):
    assert wait_for(lambda: monitor_ok(lab), 10)
    os.kill(service(lab, "dnsmasq")["pid"], signal.SIGKILL)
    assert wait_for(lambda: service(lab, "dnsmasq").get("monitor", {}).get("restarts") == 1 and monitor_ok(lab), 10)
    monitor = json.loads((lab.settings.run_dir / "health.json").read_text())["monitor_pid"]
    os.kill(monitor, signal.SIGKILL)
    assert wait_for(lambda: (status(lab).get("monitor") or {}).get("monitor_pid") not in (None, monitor), 15)
    assert wait_for(lambda: monitor_ok(lab), 10)
    assert service(lab, "dnsmasq")["monitor"]["restarts"] == 1



def charons(lab) -> list[int]:
    """Every charon of this router, the checker alone in its own namespace included (named by
    the STRONGSWAN_CONF in its environment)."""
    marker = f"STRONGSWAN_CONF={lab.settings.config_dir}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "exe").resolve().name == "charon-systemd" and \
                    marker in (entry / "environ").read_bytes() and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_orphaned_charons_are_stopped_by_start_and_by_stop():
    with example_lab(guests=(), vpn=True) as lab:
        lab.apply_vpn()
        assert len(charons(lab)) == 2  # the live one and the checker
        orphans = charons(lab)
        orphan_the_daemons(lab)
        lab.vr("start")
        assert not [pid for pid in orphans if alive(pid)]
        assert len(charons(lab)) == 2
        assert status(lab)["healthy"]
        orphans = charons(lab)
        orphan_the_daemons(lab)
        lab.vr("stop")
        assert not [pid for pid in orphans if alive(pid)] and charons(lab) == []
