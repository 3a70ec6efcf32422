"""`python -m vr.control.keeper`: keeps this router's supervisord alive, as the init system does on
the appliance (a unit with Restart=on-failure runs this same keeper there: `vr stop` ends it with 0).

supervisord runs in the foreground as the keeper's child. If it dies (kill -9, a crash),
its daemons are orphaned and keep serving, but nothing would restart them when they die:
the keeper starts supervisord again at once and then runs `vr start`, which stops the
orphans and starts every daemon from last-known-good under the new supervisord. An
intentional stop (`vr stop`: SupervisorClient.shutdown writes the stop marker first) ends
the keeper too. Stdlib only: it is small and never loads the document model.

Two more jobs for `vr daemon`, the one process every request goes through:
- A store of its listening sockets (systemd's file-descriptor store), on `<run_dir>/keeper.sock`
  (0600). The daemon sends the keeper every listening socket it serves whenever that set
  changes, and a starting daemon takes them back before it binds anything. While no daemon
  runs (killed, hung, restarted by a patch), the kernel keeps queueing connections in the
  backlog of the sockets the keeper holds: a client waits for the next daemon instead of
  being refused. Sockets nobody takes back within ORPHAN_S are let go (a daemon that cannot
  start any more: the CLI then hears "refused" and applies in-process).
- A watchdog: a daemon that hangs (SIGSTOP, a deadlock) still holds its sockets and answers
  nothing, and supervisord sees it RUNNING. The keeper asks the daemon's `GET /healthz` on its
  unix socket every PROBE_INTERVAL_S; after PROBE_FAILURES failures in a row it SIGKILLs it
  (through a pidfd: never another process that got its PID) and supervisord restarts it.
  The daemon it watches is the one that last took or sent the sockets (its peer credentials);
  one starting has STARTUP_GRACE_S, one stopping says so and is left to supervisord.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vr.foundation.events import EventLog, event
from vr.foundation.settings import SUPERVISOR_CONFIG, Settings

MAX_RESTARTS, WINDOW_S = 5, 60.0  # then the keeper gives up: something is wrong beyond a crash
START_TIMEOUT_S = 120.0
RESOURCE = "service:supervisor"
DAEMON_RESOURCE = "service:daemon"
STORE = "keeper.sock"
MAX_FDS = 250  # listening sockets handed over at most (the local socket, the agent and guest data per address); the kernel takes 253 a message
MAX_MESSAGE = 1 << 16
STORE_TIMEOUT_S = 2.0
PROBE_INTERVAL_S = 2.0
PROBE_RETRY_S = 1.0  # after a failed probe, the next one sooner
PROBE_TIMEOUT_S = 2.0
PROBE_FAILURES = 3
STARTUP_GRACE_S = 30.0  # a daemon that took the sockets but has not sent them back yet is starting
ORPHAN_S = 30.0  # sockets no daemon took back for this long are let go


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
    store = SocketStore(settings, events)
    store.start()
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


# ---------------------------------------------------------------- the socket store and the watchdog
@dataclass
class Watched:
    """The daemon the keeper probes: known by a pidfd, so a PID reused meanwhile is never hit."""

    pid: int
    pidfd: int
    since: float
    ready: bool = False
    failures: int = 0

    def exited(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0])


class SocketStore:
    """The daemon's listening sockets, held across its restarts, and the watchdog of its health."""

    def __init__(self, settings: Settings, events: EventLog) -> None:
        self.settings, self.events = settings, events
        self.lock = threading.Lock()
        self.held: list[tuple[dict, int]] = []
        self.watched: Watched | None = None
        self.closing: list[int] = []  # pidfds let go of: closed by the store's thread, which selects on them
        self.orphaned_since: float | None = None  # when the last daemon went without a successor

    def start(self) -> None:
        try:
            listener = _listen_store(store_path(self.settings))
        except OSError as error:  # the keeper still keeps supervisord; the daemon binds its own sockets
            print(f"vr keeper: no socket store at {store_path(self.settings)}: {error.strerror}", file=sys.stderr)
            return
        threading.Thread(target=self._serve, args=(listener,), name="keeper-store", daemon=True).start()
        threading.Thread(target=self._watchdog, name="keeper-watchdog", daemon=True).start()

    # ------------------------------------------------------------ the store
    def _serve(self, listener: socket.socket) -> None:
        while True:
            with self.lock:
                for fd in self.closing:
                    os.close(fd)
                self.closing.clear()
                watched = self.watched
            try:
                ready = select.select([listener, *([watched.pidfd] if watched else [])], [], [], 0.5)[0]
            except (OSError, ValueError):
                ready = []
            if watched is not None and watched.pidfd in ready:
                self._gone(watched)
            if listener not in ready:
                self._let_go_if_unwanted()
                continue
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(STORE_TIMEOUT_S)
                try:
                    self._answer(connection)
                except (OSError, ValueError):
                    pass  # that daemon hears nothing and binds its own; the store is unchanged
                except Exception as error:  # noqa: BLE001 - the store outlives any one request
                    print(f"vr keeper: socket store: {type(error).__name__}: {error}", file=sys.stderr)

    def _answer(self, connection: socket.socket) -> None:
        message, fds, flags, _ = socket.recv_fds(connection, MAX_MESSAGE, MAX_FDS)
        try:
            request = json.loads(message)
            request = request if isinstance(request, dict) else {}  # refused below: no op
            names = request.get("names", [])
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or not isinstance(names, list) or len(names) != len(fds) \
                    or not all(isinstance(n, dict) and isinstance(n.get("name"), str) for n in names):  # fmt: skip
                raise ValueError("a malformed request")
            pid = _peer_pid(connection)
            op = request.get("op")
            if self.settings.stop_marker_path.exists() and op != "leave":
                raise ValueError("vr stop is under way")
            if op == "get":
                with self.lock:
                    held = list(self.held)
                    self._watch(pid, ready=False)
                socket.send_fds(
                    connection, [json.dumps({"names": [m for m, _ in held]}).encode()], [f for _, f in held]
                )
                return
            if op == "put":
                with self.lock:
                    old, self.held = self.held, list(zip(names, fds, strict=True))
                    fds = []
                    self._watch(pid, ready=True)
                for _, fd in old:
                    os.close(fd)
            elif op == "leave":
                with self.lock:
                    if self.watched is not None and self.watched.pid == pid:
                        self._unwatch()
            else:
                raise ValueError(f"unknown op {op!r}")
            connection.send(b'{"ok": true}')
        finally:
            for fd in fds:
                os.close(fd)

    def _watch(self, pid: int, ready: bool) -> None:
        """Under the lock: from now on `pid` is the daemon (a new one resets the count)."""
        if self.watched is not None and self.watched.pid == pid:
            self.watched.ready = self.watched.ready or ready
            return
        self._unwatch()
        self.orphaned_since = None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        self.watched = Watched(pid, pidfd, time.monotonic(), ready)

    def _unwatch(self) -> None:
        if self.watched is not None:
            self.closing.append(self.watched.pidfd)
            self.watched = None
            self.orphaned_since = time.monotonic()

    def _gone(self, watched: Watched) -> None:
        """The daemon exited (killed, crashed, stopped): supervisord restarts it at its next
        loop, up to a second away; a connection on its socket wakes it now (twice: the first
        may come before it has reaped the child)."""
        with self.lock:
            if self.watched is watched:
                self._unwatch()
        for pause in (0.01, 0.1):
            time.sleep(pause)
            if self.settings.stop_marker_path.exists():
                return
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke, contextlib.suppress(OSError):
                poke.settimeout(0.5)
                poke.connect(str(self.settings.supervisor_socket))

    def _let_go_if_unwanted(self) -> None:
        """`vr stop` under way, or no daemon took the sockets back for ORPHAN_S: close them, so
        a client is refused (and the CLI applies in-process) rather than kept waiting."""
        with self.lock:
            if self.watched is not None and self.watched.exited():
                self._unwatch()
            stopping = self.settings.stop_marker_path.exists()
            if stopping:
                self._unwatch()
            orphaned = self.orphaned_since is not None and time.monotonic() - self.orphaned_since > ORPHAN_S
            if not self.held or not (stopping or orphaned):
                return
            old, self.held = self.held, []
        for _, fd in old:
            os.close(fd)

    # ------------------------------------------------------------ the watchdog
    def _watchdog(self) -> None:
        while True:
            try:
                self._watch_daemon()
            except Exception as error:  # noqa: BLE001 - the watchdog outlives any one probe
                print(f"vr keeper: watchdog: {type(error).__name__}: {error}", file=sys.stderr)
                time.sleep(PROBE_INTERVAL_S)

    def _watch_daemon(self) -> None:
        pause = PROBE_INTERVAL_S
        while True:
            time.sleep(pause)
            pause = PROBE_INTERVAL_S
            with self.lock:
                watched = self.watched
            if watched is None or self.settings.stop_marker_path.exists():
                continue
            if not watched.ready and time.monotonic() - watched.since < STARTUP_GRACE_S:
                continue
            reason = probe_health(self.settings.daemon_socket, PROBE_TIMEOUT_S)
            with self.lock:
                if self.watched is not watched or watched.exited():
                    continue  # it left or died meanwhile: supervisord's turn
                watched.failures = 0 if reason is None else watched.failures + 1
                if watched.failures < PROBE_FAILURES:
                    pause = PROBE_INTERVAL_S if reason is None else PROBE_RETRY_S
                    continue
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(watched.pidfd, signal.SIGKILL)
            with contextlib.suppress(OSError, ValueError):
                select.select([watched.pidfd], [], [], 1.0)  # dead (the store's thread may see it first)
            self._gone(watched)
            self.events.write([event("keeper", DAEMON_RESOURCE, "killed", f"vr daemon pid {watched.pid} did not "
                                     f"answer /healthz {PROBE_FAILURES} times in a row ({reason}): killed, "
                                     "supervisord starts it again")])  # fmt: skip


def probe_health(path: Path, timeout: float) -> str | None:
    """None when the daemon's GET /healthz answers 200 within `timeout`; else why not. Raw
    HTTP/1.1 on the unix socket: http.client would cost the keeper megabytes."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(path))
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: vr\r\nConnection: close\r\n\r\n")
            while b"\r\n" not in data and len(data) < 4096:
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = connection.recv(4096)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as error:
        return f"{path}: {error.strerror or error}"
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = line.split()
    return None if len(parts) >= 2 and parts[1] == "200" else f"answered {line[:80]!r}"


def _listen_store(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    previous = os.umask(0o177)  # 0600 from the start: the sockets it hands out are root's
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous)
    listener.listen(8)
    listener.settimeout(0.5)
    return listener


def _peer_pid(connection: socket.socket) -> int:
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[0]


# ---------------------------------------------------------------- the daemon's side
Listener = tuple[dict, socket.socket]  # what the keeper knows of it ({"name": ..., ...}), the socket


def store_path(settings: Settings) -> Path:
    return settings.run_dir / STORE


def _ask(settings: Settings, request: dict, listeners: list[Listener] = ()) -> tuple[dict, list[int]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.settimeout(STORE_TIMEOUT_S)
        connection.connect(str(store_path(settings)))
        message = json.dumps({**request, "names": [meta for meta, _ in listeners]}).encode()
        socket.send_fds(connection, [message], [sock.fileno() for _, sock in listeners])
        data, fds, flags, _ = socket.recv_fds(connection, MAX_MESSAGE, MAX_FDS)
    try:
        answer = json.loads(data)
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or not isinstance(answer, dict):
            raise ValueError("a malformed answer")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return answer, fds


def take_listeners(settings: Settings) -> dict[str, Listener]:
    """The listening sockets the keeper holds for this router, by name; {} when there is no
    keeper (a daemon run by hand, a test): the daemon then binds its own."""
    try:
        answer, fds = _ask(settings, {"op": "get"})
    except (OSError, ValueError):
        return {}
    names = answer.get("names", [])
    found: dict[str, Listener] = {}
    for index, fd in enumerate(fds):
        sock = socket.socket(fileno=fd)
        meta = names[index] if index < len(names) and isinstance(names[index], dict) else {}
        name = meta.get("name")
        if not isinstance(name, str) or name in found:
            sock.close()
            continue
        found[name] = (meta, sock)
    return found


def hand_over(settings: Settings, listeners: list[Listener]) -> bool:
    """Give the keeper the complete set of listening sockets (it lets go of any it held but
    no longer gets). False when no keeper runs."""
    try:
        _ask(settings, {"op": "put"}, listeners[:MAX_FDS])
    except (OSError, ValueError):
        return False
    return True


def leaving(settings: Settings) -> None:
    """A daemon that stops (SIGTERM, a patch) is no hang: the keeper stops probing it."""
    with contextlib.suppress(OSError, ValueError):
        _ask(settings, {"op": "leave"})


def unix_name(path: Path) -> str:
    return f"unix:{path}"


def tcp_name(address: str, port: int) -> str:
    return f"tcp:{address}:{port}"


def bind_unix(path: Path, backlog: int = 512) -> Listener:
    """A fresh unix listening socket at `path`, 0600 from the start."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        previous = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return {"name": unix_name(path), "inode": path.stat().st_ino}, sock


def still_bound(meta: dict, path: Path) -> bool:
    """The held socket is still the one at `path` (nobody bound a new one there meanwhile)."""
    try:
        return path.stat().st_ino == meta.get("inode")
    except OSError:
        return False


def bind_tcp(address: str, port: int, backlog: int = 512) -> Listener:
    """A fresh TCP listening socket. SO_REUSEPORT for a daemon that runs without a keeper
    beside an old one still draining (with a keeper, the old socket is taken over instead)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return {"name": tcp_name(address, port)}, sock


if __name__ == "__main__":
    sys.exit(main(Settings.from_env()))
