"""The monitor end to end: real daemons killed, hung and broken in the lab router; alerts
received by a small HTTP server standing in for the manager, on the router's loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_payload
from tests.test_e2e_haproxy import apply_lb, fetch, lb_rule

MANAGER_PORT = 18080
FAST = {"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "max_restarts": 3, "window_s": 60, "failed_interval_s": 2}


def status(lab) -> dict:
    return json.loads(lab.vr("status", "--json", check=False).stdout)  # exit 1 while unhealthy


def service(lab, name: str) -> dict:
    return next(s for s in status(lab)["services"] if s["name"] == name)


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05):
    """Bounded wait; the predicate's last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def answers(lab, name: str = "web1.cloud.internal") -> list[str]:
    try:
        return lab.resolve(lab.ns("g1"), name, "10.1.1.1", timeout=0.3)
    except TimeoutError:
        return []


def alive(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:3]
    except FileNotFoundError:
        return False


def monitor_events(lab, name: str) -> list[dict]:
    return [e for e in map(json.loads, lab.vr("events", "--resource", f"service:{name}").stdout.splitlines())
            if e["type"] in ("monitor", "alert")]  # fmt: skip


def apply_monitor(lab, tmp_path, generation: int, **monitor) -> None:
    lab.vr("apply", write_payload(tmp_path, {"generation": generation, "monitor": monitor}, f"m{generation}.json"))


def test_killed_dnsmasq_serves_again_and_is_recorded(lab):
    before = service(lab, "dnsmasq")["pid"]
    assert wait_for(lambda: service(lab, "dnsmasq").get("monitor", {}).get("state") == "ok")
    os.kill(before, signal.SIGKILL)
    assert wait_for(lambda: answers(lab), 5) == ["10.1.1.10"]
    # The daemon caches `vr status` for a second: the restart shows within that.
    after = wait_for(lambda: (row := service(lab, "dnsmasq"))["pid"] != before and row, 3)
    assert after and after["monitor"]["restarts"] == 1
    outcomes = [e["outcome"] for e in monitor_events(lab, "dnsmasq")]
    assert outcomes[:2] == ["exited", "restarted"]


MANAGER = """
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(sys.argv[2], "a") as out:
            out.write(json.dumps(json.loads(body)) + "\\n")
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("ready", flush=True)
server.serve_forever()
"""


class Manager:
    """The manager's alert endpoint, on the router namespace's loopback (where the monitor runs)."""

    def __init__(self, lab, received: Path):
        self.lab, self.received, self.process = lab, received, None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns("r"), sys.executable, "-c", MANAGER, str(MANAGER_PORT),
             str(self.received)], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def alerts(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.received.read_text().splitlines()]
        except FileNotFoundError:
            return []


@pytest.fixture
def manager(lab, tmp_path):
    endpoint = Manager(lab, tmp_path / "alerts.jsonl")
    try:
        yield endpoint
    finally:
        endpoint.stop()


def break_dnsmasq(lab) -> bytes:
    """A config on disk that dnsmasq refuses, then a kill: every start fails."""
    config = lab.settings.service_dir("dnsmasq") / "dnsmasq.conf"
    original = config.read_bytes()
    config.write_bytes(original + b"no-such-option\n")
    os.kill(service(lab, "dnsmasq")["pid"], signal.SIGKILL)
    return original


def test_broken_daemon_backs_off_then_one_alert_and_recovery_is_reported(lab, tmp_path, manager):
    manager.start()
    apply_monitor(lab, tmp_path, 2, alert_url=f"http://127.0.0.1:{MANAGER_PORT}/alerts", restart=FAST)
    original = break_dnsmasq(lab)
    critical = wait_for(lambda: [a for a in manager.alerts() if a["severity"] == "critical"], 15)
    assert len(critical) == 1 and critical[0]["service"] == "dnsmasq" and critical[0]["router"] == "r-101-vm"
    assert "failed after 3 restarts" in critical[0]["message"] and critical[0]["count"] == 3
    assert service(lab, "dnsmasq")["monitor"]["state"] == "failed"
    time.sleep(3)  # slow retries go on (failed_interval_s 2): still one alert, not a storm
    assert len([a for a in manager.alerts() if a["severity"] == "critical"]) == 1
    outcomes = [e["outcome"] for e in monitor_events(lab, "dnsmasq")]
    assert outcomes.count("restarted") == 3 and "failed" in outcomes

    (lab.settings.service_dir("dnsmasq") / "dnsmasq.conf").write_bytes(original)
    assert wait_for(lambda: [a for a in manager.alerts() if a["severity"] == "info"], 10)
    assert answers(lab) == ["10.1.1.10"] and service(lab, "dnsmasq")["monitor"]["state"] == "ok"


def test_alerts_wait_on_disk_while_the_manager_is_down(lab, tmp_path, manager):
    apply_monitor(lab, tmp_path, 2, alert_url=f"http://127.0.0.1:{MANAGER_PORT}/alerts", restart=FAST)
    break_dnsmasq(lab)
    queue = lab.settings.state_dir / "alerts.jsonl"
    assert wait_for(lambda: queue.exists() and "critical" in queue.read_text(), 15)
    assert manager.alerts() == []
    manager.start()
    assert wait_for(lambda: manager.alerts(), 15)
    assert [a["severity"] for a in manager.alerts()] == ["critical"]
    assert wait_for(lambda: queue.read_text() == "", 5)


def test_deleted_nftables_table_is_restored_and_reported(lab):
    nft = ["ip", "netns", "exec", lab.ns("r"), "nft"]
    assert wait_for(lambda: service(lab, "nftables").get("monitor", {}).get("state") == "ok")
    subprocess.run([*nft, "delete", "table", "inet", "vr"], check=True)
    listed = wait_for(lambda: subprocess.run([*nft, "list", "set", "inet", "vr", "public_ips"],
                                             check=False, capture_output=True).returncode == 0, 5)  # fmt: skip
    assert listed
    assert "repaired" in [e["outcome"] for e in monitor_events(lab, "nftables")]
    lab.serve(lab.ns("pub"), "public host", 7000)
    assert lab.ask(lab.ns("g1"), "192.0.2.1", 7000) == "public host sees 192.0.2.10"  # source NAT again


def test_service_with_monitoring_off_is_not_restarted(lab, tmp_path):
    apply_monitor(lab, tmp_path, 2, services={"dnsmasq": {"enabled": False}})
    assert wait_for(lambda: service(lab, "dnsmasq").get("monitor", {}).get("state") == "disabled")
    os.kill(service(lab, "dnsmasq")["pid"], signal.SIGKILL)
    time.sleep(2)
    assert service(lab, "dnsmasq")["state"] != "RUNNING" and answers(lab) == []
    apply_monitor(lab, tmp_path, 3, services={"dnsmasq": {"enabled": True}})  # the apply starts it again
    assert service(lab, "dnsmasq")["state"] == "RUNNING" and answers(lab) == ["10.1.1.10"]


def test_hung_haproxy_worker_is_detected_and_restarted(lab, tmp_path):
    pids = {"web1": lab.serve(lab.ns("g1"), "web1", 8000, http=True)}
    apply_lb(lab, tmp_path, 2, lb_rule(members=[{"ip": "10.1.1.10"}]))
    assert lab.wait_lb_up(), lab.lb_states()
    master = service(lab, "haproxy")["pid"]
    workers = [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    assert workers and pids
    for worker in workers:
        os.kill(worker, signal.SIGSTOP)
    started = time.monotonic()
    assert wait_for(lambda: service(lab, "haproxy")["pid"] != master, 10)
    assert time.monotonic() - started < 5
    assert lab.wait_lb_up(), lab.lb_states()
    assert fetch(lab, "--count", "3")["failed"] == 0
    assert "restarted" in [e["outcome"] for e in monitor_events(lab, "haproxy")]
    assert not [w for w in workers if alive(w)]  # the stopped workers were killed too
    time.sleep(2)  # the monitor's own kill is no new failure: one restart, not a loop
    assert service(lab, "haproxy")["monitor"]["restarts"] == 1 and fetch(lab, "--count", "2")["failed"] == 0


# ---------------------------------------------------------------- the restart policy, without daemons
class FakeSupervisor:
    """supervisord as the monitor sees it: one program, always RUNNING; starts are counted."""

    def __init__(self):
        self.starts: list[float] = []

    def state(self, name):
        return "RUNNING"

    def info(self, name):
        return {"statename": "RUNNING", "pid": 0}

    def start(self, name, wait=True):
        self.starts.append(time.monotonic())

    def stop(self, name):
        pass

    def all_processes(self):
        return [{"name": "charon", "statename": "RUNNING", "pid": 0}]


def policy_monitor(tmp_path, monkeypatch, answers_after, restart: dict, failures: int = 1):
    """A Monitor on one service whose probe fails until answers_after(starts) says otherwise."""
    from vr.control.monitor import Monitor
    from vr.foundation.settings import Settings
    from vr.services import probes

    settings = Settings.under_root(tmp_path)
    settings.ensure_dirs()
    config = {"router": "r1", "alert_url": None, "restart": restart, "failed_interval_s": 30,
              "services": [{"name": "strongswan", "program": "charon", "spec": {"check": "fake", "args": {}},
                            "enabled": True, "interval_s": 0.2, "timeout_s": 0.1, "failures": failures}]}  # fmt: skip
    (settings.service_dir("monitor")).mkdir(parents=True)
    (settings.service_dir("monitor") / "monitor.json").write_text(json.dumps(config))
    read_fd, write_fd = os.pipe()
    monitor = Monitor(settings, stdin_fd=read_fd, stdout_fd=write_fd)
    monitor.supervisor = monitor.probe_supervisor = FakeSupervisor()
    monitor._kill = lambda watch: None
    monkeypatch.setitem(probes.CHECKS, "fake", lambda timeout: answers_after(monitor.supervisor.starts))
    monitor._load_config()
    return monitor


def test_a_restarted_daemon_gets_its_start_up_time_before_it_is_judged(tmp_path, monkeypatch):
    # Killed, then restarted: like charon, it answers only a second after it starts.
    def check(starts):
        return None if starts and time.monotonic() > starts[0] + 1.0 else "no VICI answer"

    monitor = policy_monitor(tmp_path, monkeypatch, check, {"backoff_initial_s": 0.05, "backoff_max_s": 1,
                                                            "max_restarts": 5, "window_s": 60})  # fmt: skip
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        monitor._tick()
        time.sleep(0.02)
    watch = monitor.watches["strongswan"]
    assert len(monitor.supervisor.starts) == 1 and watch.restarts == 1 and watch.state == "ok"


def test_a_hang_kill_is_not_backed_off_like_an_exit(tmp_path, monkeypatch):
    restart = {"backoff_initial_s": 0.5, "backoff_max_s": 30, "max_restarts": 10, "window_s": 300}
    monitor = policy_monitor(tmp_path, monkeypatch, lambda starts: "no DNS answer", restart)
    watch = monitor.watches["strongswan"]
    watch.recent.extend([time.time()] * 4)  # four hangs in a row, each killed and restarted
    watch.state, watch.next_probe = "ok", 0.0
    monitor._tick()  # the probe finds it running but not answering: a hang
    assert watch.state == "restarting" and watch.restart_at - time.monotonic() <= 0.5
    exited = monitor.watches["strongswan"]
    exited.state, exited.restart_at = "ok", None
    monitor._on_event({"eventname": "PROCESS_STATE_EXITED"}, {"processname": "charon", "pid": "1"})
    assert exited.restart_at - time.monotonic() > 3.5  # an exit that keeps recurring still backs off
