"""`vr monitor`: keeps the router's services alive, as supervisord's event listener.

- supervisord tells it when a daemon exits (PROCESS_STATE events on stdin), so a killed
  daemon is started again without waiting for a probe (daemons have autorestart off: the
  monitor owns the restart policy, and a service whose monitoring is off stays down).
- Faster still: it holds a pidfd for each running monitored daemon and waits on them beside
  stdin. supervisord notices a dead child only at its next loop (its poll() sleeps up to 1 s
  and SIGCHLD does not wake it); the monitor sees the exit at once, wakes supervisord with an
  XML-RPC call and starts the daemon as soon as supervisord has reaped it. The EXITED event
  that follows for that PID is no news. The probes run in a worker thread of their own, so a
  slow or hung service's probe (up to its timeout) never holds that up.
- Each monitored service has a functional probe (vr.services.probes) with its interval, timeout and
  failure threshold; a daemon alive but not answering (hung) is killed and started again.
- Restarts back off exponentially; after max_restarts in window_s the service is marked
  failed, one alert is raised, and it is retried only every failed_interval_s.
- The nftables ruleset is compared with what vr last applied whenever the kernel's ruleset
  generation moves; drift is repaired by loading vr's ruleset file again, and reported.
- Its view is written to health.json in the run dir (what `vr status` and the manager read),
  on change and every HEARTBEAT_S: `checked_at` and `stale_after_s` let a reader tell a
  view nobody checks any more (a dead or hung monitor) from a live one.
- An apply's journal whose owner is gone (killed) is rolled back (`vr recover`), not left.
- Restart counts, restart times and failed states are kept on disk (state dir), so a killed
  monitor does not reset back-off or max_restarts; a restarted daemon gets STARTUP_S to
  answer before it is judged, and the back-off after a hang kill is capped (HANG_DELAY_MAX_S).
- While `vr stop` runs (its stop marker), daemons that stop are no failure.

It reads monitor.json (rendered from the document by the monitor service) and never loads
the document model itself: an idle monitor stays small (see bench/recovery.py).

It runs as `vr monitor` (main(): SIGTERM stops it) or as a thread of the resident daemon,
which calls Monitor.stop() and reads Monitor.heartbeat; it never exits the process itself.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field

from vr.control.alerts import AlertQueue, AlertSender, make_alert
from vr.foundation.events import EventLog, event
from vr.foundation.files import read_bytes_or_none, read_json, stat_key, write_json_atomic
from vr.foundation.lock import holder
from vr.foundation.settings import Settings
from vr.foundation.version import running_version
from vr.services import probes
from vr.services.supervisor_rpc import ObservedStates, SupervisorClient, stop_requested

CONFIG = "monitor.json"
HEALTH = "health.json"
ALERT_QUEUE = "alerts.jsonl"
RESTARTS = "monitor-restarts.json"  # restart counters and failed states: a new monitor keeps them
TICK_S = 1.0  # the longest the loop sleeps: config and apply changes are noticed this fast
SETTLE_S = 0.3  # after a restart, the first probe
STARTUP_S = 5.0  # a restarted daemon's start-up time: failing probes meanwhile do not count
RETRY_S = 0.2  # how often a daemon in its start-up time is probed again
HANG_DELAY_MAX_S = 0.5  # back-off after a hang kill: a hung service is serving again within 5 s
HEARTBEAT_S = 3.0  # health.json is rewritten at least this often: its checked_at says who still checks
ORPHAN_GRACE_S = 3.0  # a journal without owner this long is recovered (a command run meanwhile does it)
STALE_MARGIN_S = 10.0  # stale_after_s: this beyond the longest probe timeout without a check
NOTICE_S = 1.0  # a pidfd said a daemon exited: supervisord reaps it within this (its own tick)
NOTICE_POLL_S = 0.002  # meanwhile it is asked this often (each call wakes it)
SUPERVISOR_ERRORS = (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError)
EXIT_EVENTS = ("PROCESS_STATE_EXITED", "PROCESS_STATE_FATAL")
GONE_EVENTS = (*EXIT_EVENTS, "PROCESS_STATE_STOPPED", "PROCESS_STATE_BACKOFF")  # no process of that PID any more


@dataclass
class Watch:
    """One monitored service: its settings from monitor.json and what the monitor saw."""

    name: str
    program: str | None
    spec: dict | None
    interval_s: float
    timeout_s: float
    failures: int
    enabled: bool
    state: str = "starting"  # ok, failing, restarting, failed, disabled
    reason: str | None = None
    consecutive: int = 0
    restarts: int = 0
    recent: collections.deque = field(default_factory=collections.deque)  # restart times
    next_probe: float = 0.0
    restart_at: float | None = None
    last_probe_ms: float | None = None
    last_probe_at: float | None = None
    starting_until: float = 0.0  # after a restart: its start-up time (monotonic)
    hung: bool = False  # the last failure was the daemon running but not answering
    probing: bool = False  # a probe of it runs in the probe worker
    epoch: int = 0  # bumped by each restart: a probe started before it answers for the old daemon

    def report(self) -> dict:
        return {
            "state": self.state,
            "healthy": self.state == "ok" or self.state == "disabled",
            "reason": self.reason,
            "restarts": self.restarts,
            "monitored": self.enabled,
            "last_probe_ms": self.last_probe_ms,
            "last_probe_at": self.last_probe_at,
        }


class Monitor:
    def __init__(self, settings: Settings, stdin_fd: int = 0, stdout_fd: int = 1,
                 observed: ObservedStates | None = None,
                 repairs: dict[str, Callable[[], str | None]] | None = None):  # fmt: skip
        self.settings = settings
        # Services with no program of their own (served by the daemon this monitor is a thread
        # of): how the daemon sets one right again, instead of a restart. None: repaired.
        self.repairs = repairs or {}
        self.stdin_fd, self.stdout_fd = stdin_fd, stdout_fd
        # The states supervisord's events tell, kept for the other threads' clients (the probe
        # worker's, the daemon's pipeline). Not for this thread's own: it waits on states that
        # only its own reading of the events would change.
        self.observed = observed or ObservedStates()
        self.supervisor = SupervisorClient(settings)
        self.probe_supervisor = SupervisorClient(settings, self.observed)  # a connection is not shared
        self.prober: ProbeWorker | None = None  # while run() runs; without it (tests) probes run inline
        self.events = EventLog(settings.events_path)
        self.alerts = AlertQueue(settings.state_dir / ALERT_QUEUE)
        self.sender: AlertSender | None = None
        self.config: dict = {}
        self.config_stamp: tuple | None = None
        self.watches: dict[str, Watch] = {}
        self.by_program: dict[str, Watch] = {}
        self.buffer = b""
        self.drift = RulesetDrift(settings)
        self.health_written = ""
        self.health_written_at = 0.0
        self.killed: set[str] = set()  # PIDs the monitor killed itself: their exit is no news
        self.recovery: subprocess.Popen | None = None  # `vr recover` for a journal whose owner died
        self.orphaned_since: float | None = None  # when the journal was first seen without owner
        self.saved = read_json(settings.state_dir / RESTARTS) or {}
        self.pids: dict[str, tuple[int, int]] = {}  # program -> (PID, its pidfd), for running daemons
        self.pidfds: dict[int, tuple[str, int]] = {}  # pidfd -> (program, PID)
        self.exits_seen: set[str] = set()  # PIDs whose exit a pidfd told: their EXITED event is no news
        self.heartbeat = 0.0  # monotonic time of the last completed loop iteration (set as it starts; 0: not run)
        self._stopping = threading.Event()
        # Wakes the loop's select() on stop(). Kept open for the monitor's life: stop() may come
        # from a signal handler or another thread at any time, never onto a closed (reused) fd.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------ the loop
    def run(self) -> None:
        """Until stop() (or SIGTERM when it runs in the main thread, as `vr monitor`) or until
        supervisord goes away; then health.json says nobody checks any more."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: self.stop())  # supervisord stops it
        self.prober = ProbeWorker(self.probe_supervisor, self._wake_w)
        try:
            self._loop()
        finally:
            self.observed.stop()
            self.prober.stop()
            self.prober = None
            for program in list(self.pids):
                self._forget_pid(program)
            self._write_stopped()

    def stop(self) -> None:
        """run() returns after the step under way (a probe is bounded by its timeout). Safe from
        another thread and from a signal handler."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is woken already

    def _loop(self) -> None:
        self._send(b"READY\n")
        with contextlib.suppress(*SUPERVISOR_ERRORS):  # the events that follow keep it up to date
            self.observed.reset(self.supervisor.all_processes())
        self.heartbeat = time.monotonic()  # the loop runs: a reader does not take it for stuck meanwhile
        while not self._stopping.is_set():
            now = time.monotonic()
            self._load_config()
            due = [w.restart_at for w in self.watches.values() if w.restart_at is not None]
            due += [w.next_probe for w in self.watches.values() if w.enabled and not w.probing]
            wait = max(0.0, min([now + TICK_S, *due]) - now)
            readable, _, _ = select.select([self.stdin_fd, self._wake_r, *self.pidfds], [], [], wait)
            for fd in readable:
                if fd in self.pidfds:  # first: an EXITED event read meanwhile is then known news
                    self._on_pid_exit(fd)
            if self._wake_r in readable:
                while _read_some(self._wake_r):
                    pass
            for result in self.prober.finished() if self.prober else []:
                self._probe_finished(*result)
            if self.stdin_fd in readable:
                data = os.read(self.stdin_fd, 65536)
                if not data:
                    return  # supervisord went away
                self.buffer += data
                for headers, payload in self._events():
                    self._on_event(headers, payload)
            if self._stopping.is_set():
                return
            self._tick()
            self.heartbeat = time.monotonic()

    def _events(self):
        """Complete events in the buffer, each acknowledged at once (supervisord sends the
        next one only after RESULT/READY)."""
        while b"\n" in self.buffer:
            line, rest = self.buffer.split(b"\n", 1)
            headers = dict(item.split(":", 1) for item in line.decode().split())
            length = int(headers.get("len", 0))
            if len(rest) < length:
                return
            payload, self.buffer = rest[:length].decode(), rest[length:]
            self._send(b"RESULT 2\nOKREADY\n")
            yield headers, dict(item.split(":", 1) for item in payload.split("\n", 1)[0].split() if ":" in item)

    def _send(self, data: bytes) -> None:
        os.write(self.stdout_fd, data)

    def _on_event(self, headers: dict, payload: dict) -> None:
        name = headers.get("eventname", "")
        program = payload.get("processname", "")
        if name.startswith("PROCESS_STATE_"):
            self.observed.saw(program, name.removeprefix("PROCESS_STATE_"), payload.get("pid"))
        watch = self.by_program.get(program)
        if watch is None:
            return
        if name == "PROCESS_STATE_RUNNING":
            self._watch_pid(program, payload.get("pid"))
            return
        if name in GONE_EVENTS:
            self._forget_pid(program, payload.get("pid"))
        if not watch.enabled or name not in EXIT_EVENTS:
            return
        if payload.get("pid") in self.killed:
            self.killed.discard(payload["pid"])
            return
        if payload.get("pid") in self.exits_seen:
            self.exits_seen.discard(payload["pid"])
            return  # its pidfd told first: handled already
        if stop_requested(self.settings):
            return  # `vr stop`: daemons stop on purpose
        reason = f"{watch.program} exited (was {payload.get('from_state', '?')}, pid {payload.get('pid', '?')})"
        watch.hung = False  # an exit, backed off as such
        self._record(watch, "exited", reason)
        self._need_restart(watch, reason)

    # ------------------------------------------------------------ pidfds
    def _watch_pid(self, program: str, pid: object) -> None:
        """A pidfd for this running daemon (a RUNNING event, or supervisord's list)."""
        watch = self.by_program.get(program)
        if watch is None or not watch.enabled or not str(pid or "").isdigit() or int(pid) <= 0:
            return
        pid = int(pid)
        if self.pids.get(program, (None,))[0] == pid:
            return
        self._forget_pid(program)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # exited already (its EXITED event follows) or no pidfds here: the events tell
        self.pids[program] = (pid, fd)
        self.pidfds[fd] = (program, pid)

    def _forget_pid(self, program: str, pid: object = None) -> None:
        """Closes the program's pidfd (only if it is that PID's, when one is given)."""
        known = self.pids.get(program)
        if known is None or (pid is not None and str(pid) != str(known[0])):
            return
        del self.pids[program]
        del self.pidfds[known[1]]
        os.close(known[1])

    def _sync_pids(self) -> None:
        """pidfds for exactly the monitored daemons supervisord runs now (the config changed,
        or this monitor just started)."""
        try:
            running = {info["name"]: info["pid"] for info in self.supervisor.all_processes()
                       if info["statename"] == "RUNNING" and info["pid"]}  # fmt: skip
        except SUPERVISOR_ERRORS:
            return  # supervisord not up: RUNNING events will tell
        for program in list(self.pids):
            watch = self.by_program.get(program)
            if watch is None or not watch.enabled or running.get(program) != self.pids[program][0]:
                self._forget_pid(program)
        for program in self.by_program:
            if program in running:
                self._watch_pid(program, running[program])

    def _on_pid_exit(self, fd: int) -> None:
        """A pidfd became readable: that daemon exited. Handled as its EXITED event would be,
        without waiting for supervisord's next tick to notice."""
        program, pid = self.pidfds[fd]
        self._forget_pid(program)
        watch = self.by_program.get(program)
        if watch is None or not watch.enabled or str(pid) in self.killed or stop_requested(self.settings):
            return  # not watched, killed by this monitor (a hang), or `vr stop`
        info = self._info(program)  # also wakes supervisord: it reaps the child in this loop
        if info is None or info["statename"] in ("STOPPING", "STOPPED") or info["pid"] not in (0, pid):
            return  # stopped on purpose (an apply restarts it, monitoring turned off), or started again
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # what lives on of its group: haproxy's workers hold the ports
        self._wait_reaped(program, pid)
        if len(self.exits_seen) > 100:
            self.exits_seen.clear()  # EXITED events that never came (supervisord restarted)
        self.exits_seen.add(str(pid))
        reason = f"{program} exited (was RUNNING, pid {pid})"
        watch.hung = False  # an exit, backed off as such
        self._record(watch, "exited", reason)
        self._need_restart(watch, reason)

    def _info(self, program: str) -> dict | None:
        try:
            return self.supervisor.info(program)
        except SUPERVISOR_ERRORS:
            return None

    def _wait_reaped(self, program: str, pid: int) -> None:
        """Until supervisord no longer says this dead PID runs (it refuses to start a RUNNING
        program); every call wakes it, bounded by its own tick."""
        deadline = time.monotonic() + NOTICE_S
        while time.monotonic() < deadline:
            info = self._info(program)
            if info is None or info["statename"] != "RUNNING" or info["pid"] != pid:
                return
            time.sleep(NOTICE_POLL_S)

    def _tick(self) -> None:
        now = time.monotonic()
        applying = self.settings.journal_path.exists()  # an apply is switching files and daemons
        if applying:
            self._recover_orphaned_journal()
        else:
            self.orphaned_since = None
        applying = applying or stop_requested(self.settings)  # or `vr stop` stops them on purpose
        for watch in self.watches.values():
            if not watch.enabled:
                continue
            if watch.restart_at is not None and now >= watch.restart_at and not applying:
                self._restart(watch)
            elif now >= watch.next_probe and not applying and not watch.probing:
                self._probe(watch)
        self._write_health()

    # ------------------------------------------------------------ probes and restarts
    def _probe(self, watch: Watch) -> None:
        """In the probe worker (the nftables check inline: it is the monitor's own state and a
        netlink round trip); without a worker, inline."""
        if self.prober is not None and watch.name != "nftables":
            watch.probing = True
            self.prober.submit(watch)
            return
        started = time.monotonic()
        if watch.name == "nftables":
            reason, watch.hung = self.drift.check(), False
        else:
            reason, watch.hung = probe_daemon(self.supervisor, watch.program, watch.spec, watch.timeout_s)
        self._judge(watch, started, time.monotonic(), reason)

    def _probe_finished(self, name: str, epoch: int, started: float, ended: float, reason: str | None,
                        hung: bool) -> None:  # fmt: skip
        watch = self.watches.get(name)
        if watch is None:
            return  # no longer monitored
        watch.probing = False
        if epoch != watch.epoch or not watch.enabled:
            return  # restarted (or turned off) meanwhile: the answer is the old daemon's
        watch.hung = hung
        self._judge(watch, started, ended, reason)

    def _judge(self, watch: Watch, started: float, ended: float, reason: str | None) -> None:
        """A probe's outcome: the state, the next probe, and a restart after `failures` in a row."""
        watch.last_probe_ms = round((ended - started) * 1000, 1)
        watch.last_probe_at = time.time()
        if reason is None:
            if watch.state in ("restarting", "failed", "failing"):
                was_failed = watch.state == "failed"
                if was_failed:
                    self._alert(watch, "info", f"{watch.name} recovered")
                self._record(watch, "recovered", f"{watch.name} answers again")
                watch.state = "ok"
                if was_failed:
                    self._save_restarts()
            watch.state, watch.reason, watch.consecutive = "ok", None, 0
            watch.next_probe = started + watch.interval_s
            return
        watch.reason = reason
        if watch.state == "restarting" and started < watch.starting_until:
            watch.next_probe = started + RETRY_S  # still starting: not judged yet
            return
        watch.consecutive += 1
        if watch.state == "failed":
            watch.next_probe = started + self._failed_interval()
            if watch.program and self.supervisor.state(watch.program) != "RUNNING":
                self._start(watch)  # one slow try: recovery is noticed, nothing hammered
            return
        watch.next_probe = started + watch.interval_s
        if watch.state == "ok":
            watch.state = "failing"
        if watch.consecutive >= watch.failures and watch.restart_at is None:
            self._record(watch, "probe failed", f"{reason} ({watch.consecutive} times)")
            self._need_restart(watch, reason)

    def _need_restart(self, watch: Watch, reason: str) -> None:
        if watch.state == "failed" or watch.restart_at is not None:
            return
        policy = self.config.get("restart", {})
        now = time.time()  # wall clock: restart times outlive this process (RESTARTS)
        window = policy.get("window_s", 300)
        while watch.recent and watch.recent[0] < now - window:
            watch.recent.popleft()
        if len(watch.recent) >= policy.get("max_restarts", 5):
            watch.state, watch.reason = "failed", reason
            self._stop(watch)
            self._record(watch, "failed", f"{len(watch.recent)} restarts in {window:g} s did not help: {reason}")
            self._alert(watch, "critical", f"{watch.name} failed after {len(watch.recent)} restarts: {reason}")
            watch.next_probe = time.monotonic() + self._failed_interval()
            self._save_restarts()
            return
        delay = 0.0
        if watch.recent:
            delay = min(policy.get("backoff_initial_s", 0.5) * 2 ** (len(watch.recent) - 1),
                        policy.get("backoff_max_s", 30.0))  # fmt: skip
        if watch.hung:  # detecting a hang took its probes' time already: it must not grow with back-off
            delay = min(delay, HANG_DELAY_MAX_S)
        watch.state, watch.reason = "restarting", reason
        watch.restart_at = time.monotonic() + delay

    def _restart(self, watch: Watch) -> None:
        watch.restart_at = None
        watch.epoch += 1
        watch.recent.append(time.time())
        watch.restarts += 1
        if watch.name == "nftables":
            error = self.drift.repair()
            self._record(watch, "repaired" if error is None else "repair failed", error or "ruleset loaded again")
        elif watch.name in self.repairs:
            error = self.repairs[watch.name]()
            self._record(watch, "repaired" if error is None else "repair failed", error or "served again")
        else:
            self._kill(watch)
            self._start(watch)
            self._record(watch, "restarted", watch.reason or "")
        self._save_restarts()  # after the start: its fsync is not on the way of a daemon coming back
        watch.consecutive = 0
        watch.next_probe = time.monotonic() + SETTLE_S
        watch.starting_until = time.monotonic() + STARTUP_S

    def _save_restarts(self) -> None:
        """Restart counts, recent restart times and failed states, so that a monitor that is
        killed and started again keeps the back-off and max_restarts where they were."""
        self.saved = {name: {"restarts": w.restarts, "recent": list(w.recent), "failed": w.state == "failed"}
                      for name, w in self.watches.items()}  # fmt: skip
        write_json_atomic(self.settings.state_dir / RESTARTS, self.saved)

    def _recover_orphaned_journal(self) -> None:
        """A journal nobody holds the lock for: its apply was killed. Rolled back now (by
        `vr recover`, in its own session so that it outlives this monitor if need be), not
        left until some command happens to run."""
        if self.recovery is not None:
            if self.recovery.poll() is None:
                return
            self.recovery = None
        if holder(self.settings) is not None:
            self.orphaned_since = None
            return  # the apply still runs
        now = time.monotonic()
        if self.orphaned_since is None:
            self.orphaned_since = now
        if now - self.orphaned_since < ORPHAN_GRACE_S:
            return
        self.orphaned_since = None
        self.events.write([event("monitor", "router:" + str(self.config.get("router")), "recovering",
                                 "an interrupted apply's journal has no owner any more: rolling it back")])  # fmt: skip
        self.recovery = subprocess.Popen([sys.executable, "-m", "vr", "recover"],
                                         env={**os.environ, **self.settings.environment()}, start_new_session=True,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)  # fmt: skip

    def _kill(self, watch: Watch) -> None:
        """A hung daemon does not honour SIGTERM (a stopped one cannot): SIGKILL its whole
        process group (haproxy's workers hold the listening sockets)."""
        info = self.supervisor.info(watch.program)
        if not info or info["statename"] not in ("RUNNING", "STARTING", "STOPPING") or not info["pid"]:
            return
        try:
            os.killpg(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed.add(str(info["pid"]))
        deadline = time.monotonic() + 5
        while self.supervisor.state(watch.program) in ("RUNNING", "STARTING", "STOPPING"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)

    def _start(self, watch: Watch) -> None:
        try:
            self.supervisor.start(watch.program, wait=False)
        except SUPERVISOR_ERRORS as error:  # ALREADY_STARTED, SPAWN_ERROR: the next probe tells
            watch.reason = f"start: {error}"

    def _stop(self, watch: Watch) -> None:
        if watch.program:
            try:
                self.supervisor.stop(watch.program)
            except SUPERVISOR_ERRORS as error:
                watch.reason = f"stop: {error}"

    def _failed_interval(self) -> float:
        return self.config.get("failed_interval_s", 30.0)

    # ------------------------------------------------------------ events, alerts, health
    def _record(self, watch: Watch, outcome: str, message: str) -> None:
        self.events.write([event("monitor", f"service:{watch.name}", outcome, message)])

    def _alert(self, watch: Watch, severity: str, message: str) -> None:
        alert = make_alert(self.config.get("router", ""), watch.name, severity, message, count=watch.restarts)
        self.events.write([event("alert", f"service:{watch.name}", severity, json.dumps(alert, sort_keys=True))])
        self.alerts.put(alert)
        if self.sender:
            self.sender.notify()

    def _write_health(self) -> None:
        report = {
            "router": self.config.get("router"),
            "monitor_pid": os.getpid(),
            "version": running_version(),  # a patch waits for its release's monitor to report
            "services": {name: w.report() for name, w in self.watches.items()},
            "alerts_queued": len(self.alerts.pending()) if self.sender and self.sender.last_error else 0,
            "alert_error": self.sender.last_error if self.sender else None,
            "stale_after_s": STALE_MARGIN_S + max([w.timeout_s for w in self.watches.values()] or [0]),
        }
        text = json.dumps(report, sort_keys=True)
        now = time.monotonic()
        # On change, and every HEARTBEAT_S: checked_at tells the manager this monitor still checks.
        if text != self.health_written or now - self.health_written_at >= HEARTBEAT_S:
            stamp = time.time()
            write_json_atomic(self.settings.run_dir / HEALTH, {**report, "written_at": stamp, "checked_at": stamp},
                              sync=False)  # fmt: skip
            self.health_written, self.health_written_at = text, now

    def _write_stopped(self) -> None:
        """Leaving: nobody checks these services any more, and health.json says so."""
        report = {"router": self.config.get("router"), "monitor_pid": None, "version": running_version(),
                  "stopped_at": time.time(), "checked_at": None,
                  "services": {name: {**w.report(), "state": "unknown", "healthy": None,
                                      "reason": "the monitor is not running"} for name, w in self.watches.items()}}  # fmt: skip
        write_json_atomic(self.settings.run_dir / HEALTH, report, sync=False)

    # ------------------------------------------------------------ configuration
    def _load_config(self) -> None:
        path = self.settings.service_dir("monitor") / CONFIG
        stamp = stat_key(path)
        if stamp is None or stamp == self.config_stamp:
            return
        self.config_stamp = stamp
        self.config = read_json(path) or {}
        watches = {}
        for item in self.config.get("services", []):
            old = self.watches.get(item["name"])
            watch = Watch(item["name"], item.get("program"), item.get("spec"), item["interval_s"], item["timeout_s"],
                          item["failures"], item["enabled"])  # fmt: skip
            if old is not None:  # keep what was seen; settings are the new ones
                watch.state, watch.reason, watch.restarts, watch.recent = (
                    old.state,
                    old.reason,
                    old.restarts,
                    old.recent,
                )
                watch.restart_at, watch.consecutive = old.restart_at, old.consecutive
                watch.starting_until, watch.probing, watch.epoch = old.starting_until, old.probing, old.epoch
            elif item["name"] in self.saved:  # what the monitor before this one counted
                saved = self.saved[item["name"]]
                watch.restarts, watch.recent = saved.get("restarts", 0), collections.deque(saved.get("recent", []))
                if saved.get("failed"):
                    watch.state, watch.reason = "failed", "failed before the monitor restarted"
            if not watch.enabled:
                watch.state, watch.restart_at = "disabled", None
            elif watch.state == "disabled":
                watch.state = "starting"
            watches[watch.name] = watch
        self.watches = watches
        self.by_program = {w.program: w for w in watches.values() if w.program}
        self._sync_pids()
        url = self.config.get("alert_url")
        if self.sender is None:
            self.sender = AlertSender(self.alerts, url)
            self.sender.start()
        self.sender.url = url
        self.sender.notify()


def probe_daemon(supervisor: SupervisorClient, program: str | None, spec: dict | None,
                 timeout: float) -> tuple[str | None, bool]:  # fmt: skip
    """(why the service fails, or None; whether it is hung: running, yet not answering)."""
    try:
        if program:
            state = supervisor.state(program)
            if state != "RUNNING":
                return f"{program} is {state or 'not configured in supervisord'}", False
        if spec is None:
            return None, False
        reason = probes.run(spec, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - a probe that breaks is a failing probe, not a dead monitor
        return f"probe error: {type(error).__name__}: {error}", False
    return reason, reason is not None and program is not None


class ProbeWorker:
    """Runs the services' probes one after another in a thread of its own: a probe may take its
    whole timeout (a hung daemon), and meanwhile the monitor's loop still handles exits and
    events at once. Each result wakes the loop (wake_fd)."""

    def __init__(self, supervisor: SupervisorClient, wake_fd: int):
        self.supervisor, self.wake_fd = supervisor, wake_fd
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="vr-monitor-probes", daemon=True)
        self.thread.start()

    def submit(self, watch: Watch) -> None:
        self.jobs.put((watch.name, watch.epoch, watch.program, watch.spec, watch.timeout_s))

    def finished(self) -> list[tuple]:
        """(name, epoch, started, ended, reason, hung) of each probe done since the last call."""
        done = []
        while True:
            try:
                done.append(self.results.get_nowait())
            except queue.Empty:
                return done

    def stop(self) -> None:
        """The worker ends after the probe under way (bounded by its timeout; not waited for long)."""
        self.jobs.put(None)
        self.thread.join(1.0)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            name, epoch, program, spec, timeout = job
            started = time.monotonic()
            reason, hung = probe_daemon(self.supervisor, program, spec, timeout)
            self.results.put((name, epoch, started, time.monotonic(), reason, hung))
            try:
                os.write(self.wake_fd, b"p")
            except BlockingIOError:
                pass  # the pipe is full: the loop is woken already


class RulesetDrift:
    """vr's nftables table against what vr last loaded. The kernel's ruleset generation is
    read every probe (a netlink round trip, ~0.1 ms); only when it moved is the table listed
    (tens of ms with 10k rules) and compared with the listing taken after vr's last load."""

    def __init__(self, settings: Settings):
        self.ruleset_path = settings.service_dir("nftables") / "vr.nft"
        self.vms_path = settings.service_dir("nftables") / "vms.nft"  # the per-VM sets' elements
        self.generation: int | None = None
        self.file_digest: str | None = None
        self.listing_digest: str | None = None

    def check(self) -> str | None:
        generation = ruleset_generation()
        if generation is not None and generation == self.generation:
            return None
        content = read_bytes_or_none(self.ruleset_path)
        if content is None:
            return None  # no firewall configured
        file_digest = hashlib.sha256(content + (read_bytes_or_none(self.vms_path) or b"")).hexdigest()
        listing = _list_table()
        if self.file_digest != file_digest:  # vr loaded a new ruleset: the new reference
            if listing is None:
                return "table inet vr is missing"
            self.generation, self.file_digest = generation, file_digest
            self.listing_digest = hashlib.sha256(listing.encode()).hexdigest()
            return None
        if listing is None:
            return "table inet vr is missing"
        if hashlib.sha256(listing.encode()).hexdigest() != self.listing_digest:
            return "table inet vr differs from what vr loaded (changed by hand?)"
        self.generation = generation  # another table changed, not ours
        return None

    def repair(self) -> str | None:
        from vr.services.nftables import loadable

        content = read_bytes_or_none(self.ruleset_path)
        if content is None:
            return "vr.nft is missing"
        batch = loadable(content, read_bytes_or_none(self.vms_path))
        result = subprocess.run(["nft", "-f", "-"], input=batch, capture_output=True, text=True, timeout=30,
                                check=False)  # fmt: skip
        if result.returncode != 0:
            return f"nft -f failed: {result.stderr.strip()}"
        listing = _list_table()
        self.generation = ruleset_generation()
        self.listing_digest = hashlib.sha256((listing or "").encode()).hexdigest()
        return None


def ruleset_generation() -> int | None:
    """NFT_MSG_GETGEN over netfilter netlink: the ruleset's generation id, bumped by every
    ruleset change. By hand (a few bytes) because pyroute2 would cost the monitor 20 MB."""
    netlink_netfilter, request, nft_getgen, nft_newgen, gen_id = 12, 1, (10 << 8) | 16, (10 << 8) | 15, 1
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_netfilter) as nl:
            nl.settimeout(1.0)
            nl.send(struct.pack("=IHHII", 20, nft_getgen, request, 1, 0) + struct.pack("=BBH", 0, 0, 0))
            data = nl.recv(65536)
    except OSError:
        return None
    length, kind = struct.unpack_from("=IH", data)
    if kind != nft_newgen:
        return None
    offset = 20
    while offset + 4 <= length:
        size, attribute = struct.unpack_from("=HH", data, offset)
        if attribute & 0x3FFF == gen_id and size >= 8:
            return struct.unpack_from(">I", data, offset + 4)[0]
        offset += (size + 3) & ~3
    return None


def _list_table() -> str | None:
    import nftables

    nft = nftables.Nftables()
    nft.set_stateless_output(True)
    rc, output, _ = nft.cmd("list table inet vr")
    return output if rc == 0 else None


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def main(settings: Settings) -> int:
    if os.isatty(0):
        print("vr monitor runs under supervisord (as its event listener), not by hand", file=sys.stderr)
        return 2
    Monitor(settings).run()
    return 0
