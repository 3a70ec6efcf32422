"""`python -m vr.keeper`: keeps this router's supervisord alive, as the init system does on
the appliance (a unit with Restart=always runs this same keeper there).

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
import subprocess
import sys
import time

from vr.events import EventLog, event
from vr.settings import Settings

MAX_RESTARTS, WINDOW_S = 5, 60.0  # then the keeper gives up: something is wrong beyond a crash
START_TIMEOUT_S = 120.0
RESOURCE = "service:supervisor"


def main(settings: Settings) -> int:
    from vr.supervisor_rpc import CONFIG_FILE, SupervisorClient, keeper_pid_path, stop_requested

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(keeper_pid_path(settings), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper keeps this router
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    events = EventLog(settings.events_path)
    client = SupervisorClient(settings)
    config = settings.service_dir("supervisor") / CONFIG_FILE
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VR_NO_DISPATCH", "VR_LOCK_FD")}
    recent: collections.deque = collections.deque()
    restarted = False
    while config.exists() and not stop_requested(settings):
        child = subprocess.Popen([str(settings.bin_dir / "supervisord"), "-n", "-c", str(config)], env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if restarted:
            _start_daemons(settings, client, child, events)
        code = child.wait()
        if stop_requested(settings) or not config.exists():
            break
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


def _start_daemons(settings: Settings, client, child: subprocess.Popen, events: EventLog) -> None:
    """Once the new supervisord answers, `vr start`: orphans stopped, daemons started again.
    An apply holding the lock (exit 75) is waited for, a bounded number of times."""
    deadline = time.monotonic() + 10
    while not client.is_running():
        if child.poll() is not None or time.monotonic() > deadline:
            return
        time.sleep(0.05)
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
