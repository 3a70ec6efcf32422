"""supervisord's XML-RPC API over its unix socket: what the pipeline and the monitor drive.

Stdlib only (the `supervisor` package's own transport would cost the monitor 14 MB).
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
import xmlrpc.client
from pathlib import Path

from vr.settings import Settings

CONFIG_FILE = "supervisord.conf"
RUNNING = "RUNNING"


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


class SupervisorClient:
    """XML-RPC over supervisord's unix socket (the `supervisor` package's transport)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._proxy = None

    @property
    def rpc(self):
        if self._proxy is None:
            transport = _UnixTransport(str(self.settings.supervisor_socket))
            self._proxy = xmlrpc.client.ServerProxy("http://localhost", transport=transport)
        return self._proxy.supervisor

    def is_running(self) -> bool:
        if not self.settings.supervisor_socket.exists():
            return False
        try:
            return self.rpc.getState()["statename"] == RUNNING
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
            self._proxy = None
            return False

    def start_daemon(self, timeout: float = 10.0) -> None:
        config = self.settings.service_dir("supervisor") / CONFIG_FILE
        supervisord = self.settings.bin_dir / "supervisord"
        # supervisord forks itself into the background; it inherits this process's netns. Not
        # the code pinning of the vr that starts it: its programs run the current release.
        pinned = ("PYTHONPATH", "VR_NO_DISPATCH", "VR_LOCK_FD")
        subprocess.run(
            [str(supervisord), "-c", str(config)],
            check=True,
            env={k: v for k, v in os.environ.items() if k not in pinned},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not come up on {self.settings.supervisor_socket}")
            time.sleep(0.02)

    def update(self) -> None:
        """Like `supervisorctl update`, but a changed program that was running is started again."""
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

    def state(self, name: str) -> str | None:
        info = self.info(name)
        return info["statename"] if info else None

    def not_running(self, name: str) -> str | None:
        """None when the program runs; otherwise the probe's reason."""
        state = self.state(name)
        return None if state == RUNNING else f"{name} is {state or 'not configured in supervisord'}"

    def pid(self, name: str) -> int | None:
        info = self.info(name)
        return info["pid"] or None if info else None

    def start(self, name: str, wait: bool = True) -> None:
        self.rpc.startProcess(name, wait)

    def stop(self, name: str) -> None:
        if self.state(name) == RUNNING:
            self.rpc.stopProcess(name, True)

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def signal(self, name: str, signal_name: str) -> None:
        self.rpc.signalProcess(name, signal_name)

    def all_processes(self) -> list[dict]:
        return self.rpc.getAllProcessInfo()

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop every daemon and supervisord itself, then wait for its PID to be gone."""
        pid_path = self.settings.run_dir / "supervisord.pid"
        pid = int(pid_path.read_text()) if pid_path.exists() else None
        if self.is_running():
            self.rpc.shutdown()
        deadline = time.monotonic() + timeout
        while pid and _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                break
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
