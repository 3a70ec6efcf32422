"""A killed daemon brought back at once: the monitor holds a pidfd for each running monitored
daemon, sees the exit before supervisord does, and starts it again as soon as supervisord has
reaped it. What a client and an operator see: the daemon answers again, one exit and one restart
counted per kill (supervisord's later EXITED event is no second one), a daemon stopped on
purpose (an apply restarting it, `vr stop`) is not restarted, and max_restarts still holds.
And the monitor as a thread of another process (the resident daemon): stop() ends it cleanly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from tests.conftest import EXAMPLES, write_payload
from tests.test_e2e_haproxy import apply_lb, fetch, lb_rule
from tests.test_e2e_monitor import (
    FAST,
    alive,
    answers,
    apply_monitor,
    monitor_events,
    policy_monitor,
    service,
    wait_for,
)
from tests.test_e2e_supervision import event_count, events_since, router_daemons

SUPERVISORD_TICK_S = 1.0  # supervisord notices a dead child within this: its EXITED event has come by then


def ok(lab, name: str = "dnsmasq") -> bool:
    return service(lab, name).get("monitor", {}).get("state") == "ok"


def kill_and_wait(lab, name: str, serving) -> int:
    """SIGKILL the daemon supervisord runs; waits (bounded) until it serves again under a new PID
    and the monitor reports it ok. The old PID."""
    assert wait_for(lambda: ok(lab, name), 10)
    before = service(lab, name)["pid"]
    os.kill(before, signal.SIGKILL)
    assert wait_for(serving, 10)
    assert wait_for(lambda: service(lab, name)["pid"] not in (None, before) and ok(lab, name), 10)
    return before


def test_killed_dnsmasq_answers_again_and_is_counted_once(lab):
    old = kill_and_wait(lab, "dnsmasq", lambda: answers(lab) == ["10.1.1.10"])
    time.sleep(SUPERVISORD_TICK_S + 0.5)  # supervisord's own EXITED event for the old PID has come meanwhile
    row = service(lab, "dnsmasq")
    assert row["state"] == "RUNNING" and row["pid"] != old and row["monitor"]["restarts"] == 1
    outcomes = [e["outcome"] for e in monitor_events(lab, "dnsmasq")]
    assert outcomes.count("exited") == 1 and outcomes.count("restarted") == 1
    exited = next(e for e in monitor_events(lab, "dnsmasq") if e["outcome"] == "exited")
    assert f"pid {old}" in exited["message"]
    assert router_daemons(lab)["dnsmasq"] == [row["pid"]]  # one dnsmasq: no second start
    assert answers(lab) == ["10.1.1.10"]


def test_killed_haproxy_master_takes_its_workers_and_serves_again(lab, tmp_path):
    lab.serve(lab.ns("g1"), "web1", 8000, http=True)
    apply_lb(lab, tmp_path, 2, lb_rule(members=[{"ip": "10.1.1.10"}]))
    assert lab.wait_lb_up(), lab.lb_states()
    for kill in (1, 2):  # each kill one restart: the EXITED event that follows adds none
        assert wait_for(lambda: ok(lab, "haproxy"), 10)
        master = service(lab, "haproxy")["pid"]
        workers = [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
        kill_and_wait(lab, "haproxy", lambda: fetch(lab, "--count", "1")["failed"] == 0)
        assert not [w for w in workers if alive(w)]  # the old workers went with their master
        assert lab.wait_lb_up(), lab.lb_states()
        time.sleep(SUPERVISORD_TICK_S + 0.5)
        assert service(lab, "haproxy")["monitor"]["restarts"] == kill
    outcomes = [e["outcome"] for e in monitor_events(lab, "haproxy")]
    assert outcomes.count("exited") == 2 and outcomes.count("restarted") == 2
    assert fetch(lab, "--count", "3")["failed"] == 0


def test_an_apply_restarting_dnsmasq_is_no_failure(lab, tmp_path):
    assert wait_for(lambda: ok(lab), 10)
    before, events_before = service(lab, "dnsmasq")["pid"], event_count(lab)
    dhcp = json.loads((EXAMPLES / "router.json").read_text())["dhcp"]
    dhcp["tiers"][0]["lease_time"] = 7200  # dnsmasq's main config changes: supervisord stops and starts it
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "dhcp": dhcp}))
    assert service(lab, "dnsmasq")["pid"] != before
    time.sleep(SUPERVISORD_TICK_S + 0.5)
    noise = [e for e in events_since(lab, events_before) if e["type"] in ("monitor", "alert")]
    assert noise == []  # the stop was on purpose: no exit, no restart
    assert service(lab, "dnsmasq")["monitor"]["restarts"] == 0 and answers(lab) == ["10.1.1.10"]
    kill_and_wait(lab, "dnsmasq", lambda: answers(lab) == ["10.1.1.10"])  # the new dnsmasq is watched too
    assert service(lab, "dnsmasq")["monitor"]["restarts"] == 1


def test_daemons_stopped_by_vr_stop_stay_down_and_come_back_with_start(lab):
    kill_and_wait(lab, "dnsmasq", lambda: answers(lab) == ["10.1.1.10"])
    events_before = event_count(lab)
    assert lab.vr("stop").stdout.strip() == "stopped"
    time.sleep(SUPERVISORD_TICK_S + 0.5)
    assert router_daemons(lab) == {} and answers(lab) == []
    assert [e for e in events_since(lab, events_before) if e["type"] in ("monitor", "alert")] == []
    lab.vr("start")
    assert answers(lab) == ["10.1.1.10"]
    kill_and_wait(lab, "dnsmasq", lambda: answers(lab) == ["10.1.1.10"])  # a new monitor watches it again
    assert service(lab, "dnsmasq")["monitor"]["restarts"] == 2  # the counter outlived the stop


def test_max_restarts_still_marks_a_killed_daemon_failed(lab, tmp_path):
    apply_monitor(lab, tmp_path, 2, restart=FAST)  # 3 restarts in 60 s, then failed, retried every 2 s
    for _ in range(FAST["max_restarts"]):
        kill_and_wait(lab, "dnsmasq", lambda: answers(lab) == ["10.1.1.10"])
    assert service(lab, "dnsmasq")["monitor"]["restarts"] == FAST["max_restarts"]
    os.kill(service(lab, "dnsmasq")["pid"], signal.SIGKILL)  # one more: the policy gives up
    assert wait_for(lambda: service(lab, "dnsmasq")["monitor"]["state"] == "failed", 5)
    row = service(lab, "dnsmasq")
    assert row["monitor"]["restarts"] == FAST["max_restarts"]
    outcomes = [e["outcome"] for e in monitor_events(lab, "dnsmasq")]
    assert outcomes.count("exited") == FAST["max_restarts"] + 1 and outcomes.count("failed") == 1
    assert outcomes.count("restarted") == FAST["max_restarts"]
    # The slow retry (failed_interval_s) starts it again, and the monitor says it recovered.
    assert wait_for(lambda: ok(lab) and answers(lab) == ["10.1.1.10"], 15)
    assert "recovered" in [e["outcome"] for e in monitor_events(lab, "dnsmasq")]
    assert service(lab, "dnsmasq")["monitor"]["restarts"] == FAST["max_restarts"]


# ---------------------------------------------------------------- the monitor as a thread
def test_the_monitor_runs_as_a_thread_and_stops_cleanly(tmp_path, monkeypatch):
    sigterm = signal.getsignal(signal.SIGTERM)
    monitor = policy_monitor(tmp_path, monkeypatch, lambda starts: None, {"max_restarts": 5, "window_s": 60})
    (events_in, supervisord_side), (supervisord_reads, listener_out) = os.pipe(), os.pipe()  # supervisord's pipes
    monitor.stdin_fd, monitor.stdout_fd = events_in, listener_out
    errors: list[BaseException] = []

    def run() -> None:
        try:
            monitor.run()
        except BaseException as error:  # noqa: BLE001 - the test reports it
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert wait_for(lambda: monitor.heartbeat > 0, 5)
    first = monitor.heartbeat
    assert wait_for(lambda: monitor.heartbeat > first, 5)  # it keeps ticking
    health = json.loads((monitor.settings.run_dir / "health.json").read_text())
    assert health["services"]["strongswan"]["state"] == "ok" and health["monitor_pid"] == os.getpid()
    assert signal.getsignal(signal.SIGTERM) is sigterm  # the process's signals are not the thread's
    monitor.stop()
    thread.join(5)
    assert not thread.is_alive() and errors == []
    stopped = json.loads((monitor.settings.run_dir / "health.json").read_text())
    assert stopped["monitor_pid"] is None and stopped["stopped_at"]
    assert stopped["services"]["strongswan"]["state"] == "unknown"
    assert os.read(supervisord_reads, 100) == b"READY\n"  # it spoke the event-listener protocol
    for fd in (events_in, supervisord_side, listener_out, supervisord_reads):
        os.close(fd)
