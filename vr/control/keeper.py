"""`python -m vr.control.keeper`: keeps this router's supervisord alive, as the init system does on
the appliance (a unit with Restart=on-failure runs this same keeper there: `vr stop` ends it with 0).

supervisord runs in the foreground as the keeper's child. If it dies (kill -9, a crash),
its daemons are orphaned and keep serving, but nothing would restart them when they die:
the keeper starts supervisord again at once and then runs `vr start`, which stops the
orphans and starts every daemon from last-known-good under the new supervisord. An
intentional stop (`vr stop`: SupervisorClient.shutdown writes the stop marker first) ends
the keeper too. Stdlib only: it is small and never loads the document model.
"""

from __future__ import annotations

import collections
import fcntl
import os
import socket
import subprocess
import sys
import time

from vr.foundation.events import EventLog, event
from vr.foundation.settings import SUPERVISOR_CONFIG, Settings

MAX_RESTARTS, WINDOW_S = 5, 60.0  # then the keeper gives up: something is wrong beyond a crash
START_TIMEOUT_S = 120.0
RESOURCE = "service:supervisor"


def main(settings: Settings) -> int:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.keeper_pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper keeps this router
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    events = EventLog(settings.events_path)
    config = settings.service_dir("supervisor") / SUPERVISOR_CONFIG
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VR_NO_DISPATCH", "VR_LOCK_FD")}
    recent: collections.deque = collections.deque()
    restarted = False
    while config.exists() and not settings.stop_marker_path.exists():
        # Its output goes where the keeper's does (keeper.log): a config it refuses shows there.
        child = subprocess.Popen([str(settings.bin_dir / "supervisord"), "-n", "-c", str(config)], env=env,
                                 stdin=subprocess.DEVNULL)  # fmt: skip
        answered = _wait_answering(settings, child)
        if answered and restarted:
            _start_daemons(settings, child, events)
        code = child.wait()
        if settings.stop_marker_path.exists() or not config.exists():
            break
        if not answered:
            events.write([event("keeper", RESOURCE, "failed", f"supervisord exited with {code} before it answered "
                                f"on its socket; see {settings.log_dir / 'keeper.log'}")])  # fmt: skip
            return 1
        now = time.monotonic()
        while recent and recent[0] < now - WINDOW_S:
            recent.popleft()
        if len(recent) >= MAX_RESTARTS:
            events.write([event("keeper", RESOURCE, "failed", f"supervisord died {len(recent) + 1} times in "
                                f"{WINDOW_S:g} s (last exit {code}); not restarting it again")])  # fmt: skip
            return 1
        recent.append(now)
        events.write([event("keeper", RESOURCE, "restarting", f"supervisord (pid {child.pid}) exited with {code}")])
        restarted = True
        time.sleep(0.1)
    return 0


def _wait_answering(settings: Settings, child: subprocess.Popen, timeout: float = 10.0) -> bool:
    """supervisord accepts on its socket (a connect, not XML-RPC: xmlrpc.client would cost
    the keeper 7 MB)."""
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(settings.supervisor_socket))
                return True
            except OSError:
                pass
        time.sleep(0.02)
    return False


def _start_daemons(settings: Settings, child: subprocess.Popen, events: EventLog) -> None:
    """The new supervisord answers: `vr start`, so orphans are stopped and the daemons start
    again. An apply holding the lock (exit 75) is waited for, a bounded number of times."""
    env = {**os.environ, **settings.environment()}
    for _ in range(30):
        try:
            result = subprocess.run([sys.executable, "-m", "vr", "start"], env=env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            events.write([event("keeper", RESOURCE, "start failed", "vr start did not finish")])
            return
        if result.returncode != 75:
            break
        time.sleep(1)
    outcome = "restarted" if result.returncode == 0 else "start failed"
    message = result.stdout.strip() if result.returncode == 0 else result.stderr.strip()[-500:]
    events.write([event("keeper", RESOURCE, outcome, f"supervisord pid {child.pid}: {message}")])


if __name__ == "__main__":
    sys.exit(main(Settings.from_env()))
