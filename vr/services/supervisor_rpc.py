"""supervisord's XML-RPC API over its unix socket: what the pipeline and the monitor drive.

Stdlib only (the `supervisor` package's own transport would cost the monitor 14 MB).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

from vr.foundation.lock import flock_holder
from vr.foundation.settings import Settings

__all__ = ["ObservedStates", "SupervisorClient", "router_processes", "stop_processes", "stop_requested"]

RUNNING = "RUNNING"
FIRST_STOPPED = ("monitor",)  # stopped before the daemons it watches: a stop is no failure


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float = 30.0):
        super().__init__()
        self.path, self.timeout = path, timeout

    def make_connection(self, host):
        return _UnixConnection(self.path, self.timeout)


class ObservedStates:
    """Process states as supervisord's PROCESS_STATE events tell its event listener (the
    daemon's monitor), shared by the daemon's clients: asking supervisord costs 2-4 ms a call,
    and an apply asked it four times. live: the listener reads the events (since a full list
    from supervisord). A program a client acts on is asked for again until an event about it
    arrives after the action began (its answer and the event come in either order); one
    never seen is asked for too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, tuple[str, int, int]] = {}  # name -> (state, pid, event number)
        self._acted: dict[str, int] = {}  # name -> the event number when a client acted on it
        self._seen = 0
        self.live = False

    def reset(self, infos: list[dict]) -> None:
        with self._lock:
            self._seen += 1
            self._states = {i["name"]: (i["statename"], i.get("pid") or 0, self._seen) for i in infos}
            self._acted.clear()
            self.live = True

    def saw(self, name: str, state: str, pid: object) -> None:
        with self._lock:
            self._seen += 1
            self._states[name] = (state, int(pid) if str(pid or "").isdigit() else 0, self._seen)

    def mark(self) -> int:
        return self._seen

    def acted(self, name: str, mark: int) -> None:
        with self._lock:
            self._acted[name] = mark

    def stop(self) -> None:
        self.live = False

    def get(self, name: str) -> tuple[str, int] | None:
        """(state, pid), or None when the events have not told it (since the last action)."""
        known = self._states.get(name) if self.live else None
        if known is None or known[2] <= self._acted.get(name, -1):
            return None
        return known[0], known[1]


class SupervisorClient:
    """XML-RPC over supervisord's unix socket (the `supervisor` package's transport).
    observed: where the daemon's event listener keeps the states supervisord reported."""

    def __init__(self, settings: Settings, observed: ObservedStates | None = None):
        self.settings = settings
        self._proxy = None
        self.observed = observed

    @property
    def rpc(self):
        if self._proxy is None:
            transport = _UnixTransport(str(self.settings.supervisor_socket))
            self._proxy = xmlrpc.client.ServerProxy("http://localhost", transport=transport)
        return self._proxy.supervisor

    def is_running(self) -> bool:
        if self.observed is not None and self.observed.live:
            return True  # its events arrive: the listener's stdin closes when supervisord goes
        if not self.settings.supervisor_socket.exists():
            return False
        try:
            return self.rpc.getState()["statename"] == RUNNING
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
            self._proxy = None
            return False

    def start_daemon(self, timeout: float = 10.0) -> None:
        """supervisord in the foreground under vr's keeper (vr.control.keeper), which starts it again
        if it dies. The keeper inherits this process's netns, not the code pinning of the vr
        that starts it: supervisord's programs run the current release."""
        self.settings.stop_marker_path.unlink(missing_ok=True)
        if keeper_pid(self.settings) is None:
            pinned = ("PYTHONPATH", "VR_NO_DISPATCH", "VR_LOCK_FD")
            env = {k: v for k, v in os.environ.items() if k not in pinned}
            log = open(self.settings.log_dir / "keeper.log", "ab")  # noqa: SIM115 - the child holds it
            try:
                subprocess.Popen([sys.executable, "-m", "vr.control.keeper"], env={**env, **self.settings.environment()},
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)  # fmt: skip
            finally:
                log.close()
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not come up on {self.settings.supervisor_socket} "
                                   f"(see {self.settings.log_dir / 'keeper.log'})")  # fmt: skip
            time.sleep(0.02)

    def update(self) -> None:
        """Like `supervisorctl update`, but a changed program that was running is started again."""
        try:
            self._update()
        finally:  # programs came and went: the list again, which the events then keep up to date
            if self.observed is not None and self.observed.live:
                self.observed.reset(self.all_processes())

    def _update(self) -> None:
        added, changed, removed = self.rpc.reloadConfig()[0]
        for name in removed:
            self._stop_quietly(name)
            self.rpc.removeProcessGroup(name)
        for name in changed:
            was_running = self.state(name) == RUNNING
            self._stop_quietly(name)
            self.rpc.removeProcessGroup(name)
            self.rpc.addProcessGroup(name)
            if was_running:
                self.start(name)
        for name in added:
            self.rpc.addProcessGroup(name)

    def _stop_quietly(self, name: str) -> None:
        try:
            self.rpc.stopProcessGroup(name)
        except xmlrpc.client.Fault:
            pass

    def info(self, name: str) -> dict | None:
        try:
            return self.rpc.getProcessInfo(name)
        except xmlrpc.client.Fault:
            return None

    def _state_and_pid(self, name: str) -> tuple[str | None, int]:
        seen = self.observed.get(name) if self.observed is not None else None
        if seen is not None:
            return seen
        info = self.info(name)
        return (info["statename"], info.get("pid") or 0) if info else (None, 0)

    def state(self, name: str) -> str | None:
        return self._state_and_pid(name)[0]

    def states(self, names: list[str]) -> dict[str, str]:
        """The state of each of these programs that supervisord has."""
        seen = {name: self.observed.get(name) for name in names} if self.observed is not None else {}
        if seen and all(seen.values()):
            return {name: state for name, (state, _) in seen.items()}
        return {p["name"]: p["statename"] for p in self.all_processes() if p["name"] in names}

    def not_running(self, name: str) -> str | None:
        """None when the program runs; otherwise the probe's reason. The program the caller
        itself is runs, even while supervisord stops it (the daemon answering its last pushes)."""
        state, pid = self._state_and_pid(name)
        if state == RUNNING or (state and pid == os.getpid()):
            return None
        return f"{name} is {state or 'not configured in supervisord'}"

    @contextlib.contextmanager
    def _acting(self, name: str):
        mark = self.observed.mark() if self.observed is not None else 0
        try:
            yield
        finally:
            if self.observed is not None:
                self.observed.acted(name, mark)

    def pid(self, name: str) -> int | None:
        info = self.info(name)
        return info["pid"] or None if info else None

    def start(self, name: str, wait: bool = True) -> None:
        with self._acting(name):
            self.rpc.startProcess(name, wait)

    def stop(self, name: str) -> None:
        if self.state(name) == RUNNING:
            with self._acting(name):
                self.rpc.stopProcess(name, True)

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def signal(self, name: str, signal_name: str) -> None:
        self.rpc.signalProcess(name, signal_name)  # a signal leaves its state as it is

    def all_processes(self) -> list[dict]:
        return self.rpc.getAllProcessInfo()

    def shutdown(self, timeout: float = 15.0) -> None:
        """An intentional stop: the stop marker first (the keeper does not bring supervisord
        back, the monitor sees no failure), the monitor before the daemons it watches, then
        every daemon and supervisord itself; returns when supervisord and the keeper are gone."""
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        self.settings.stop_marker_path.write_text(f"{os.getpid()}\n")
        pid_path = self.settings.run_dir / "supervisord.pid"
        pid = int(pid_path.read_text()) if pid_path.exists() else None
        if self.is_running():
            for name in FIRST_STOPPED:
                try:
                    self.stop(name)
                except xmlrpc.client.Fault:
                    pass  # not configured on this router
            self.rpc.shutdown()
        deadline = time.monotonic() + timeout
        while pid and _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                break
            time.sleep(0.05)
        keeper, deadline = keeper_pid(self.settings), time.monotonic() + 5
        while keeper and _alive(keeper):
            if time.monotonic() > deadline:
                os.kill(keeper, 9)
                break
            time.sleep(0.05)


def stop_requested(settings: Settings) -> bool:
    """`vr stop` is under way (or done): daemons stopping now are no failure."""
    return settings.stop_marker_path.exists()


def keeper_pid(settings: Settings) -> int | None:
    """The running keeper's PID: it holds a lock on its PID file for as long as it lives."""
    pid = flock_holder(settings.keeper_pid_path)
    return pid if pid is not None and pid > 0 else None


def router_processes(settings: Settings, keep: set[int] = frozenset()) -> list[int]:
    """Every process of this router's daemons, whoever started them (an orphan of a dead
    supervisord included): in the router's network namespace with a command line naming the
    router's config dir, or (charon's checker, alone in its own namespace) an environment
    naming it. Not this process or its ancestors, not the processes under the pids in `keep`
    (a live supervisord's tree) or under the keeper (the supervisord it is starting)."""
    marker = f"{settings.config_dir}/".encode()
    own_netns = os.stat("/proc/self/ns/net").st_ino
    mine = set(_ancestors(os.getpid()))
    keeper = keeper_pid(settings)
    keep = set(keep) | ({keeper} if keeper else set())
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in mine or int(entry.name) == keeper:
            continue
        pid = int(entry.name)
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                if os.stat(f"/proc/{pid}/ns/net").st_ino != own_netns:
                    continue
            elif marker not in Path(f"/proc/{pid}/environ").read_bytes():
                continue
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if not keep.intersection(_ancestors(pid)) and _alive(pid):
            found.append(pid)
    return found


def stop_processes(pids: list[int], timeout: float = 5.0) -> None:
    """TERM, then KILL what lingers."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _ancestors(pid: int) -> list[int]:
    """pid and its parents up to init."""
    chain = []
    while pid > 1 and len(chain) < 64:
        chain.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return chain


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
