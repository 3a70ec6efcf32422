"""supervisord: one per router, its config rendered by vr, driven over its XML-RPC socket.

Programs are declared by the other services (Service.programs). They do not autostart:
each service starts its own daemon in its apply step, so that a daemon is only started
once its files are in place; supervisord restarts them if they die.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from vr.document import RouterDocument
from vr.runtime import Runtime
from vr.services.base import Change, Service
from vr.settings import Settings

CONFIG_FILE = "supervisord.conf"
RUNNING = "RUNNING"
_UNSAFE_IN_INI = re.compile(r"[\x00-\x1f\x7f]")


class SupervisorService(Service):
    name = "supervisor"

    def read(self, doc: RouterDocument) -> Any:
        return None  # depends only on other services' programs: always generated, compared by content

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        from vr.services import SERVICES

        settings = runtime.settings
        programs = [p for service in SERVICES for p in service.programs(doc, runtime)]
        return {
            CONFIG_FILE: runtime.render(
                "supervisor/supervisord.conf.j2",
                socket=_ini(settings.supervisor_socket),
                pidfile=_ini(settings.run_dir / "supervisord.pid"),
                logfile=_ini(settings.log_dir / "supervisord.log"),
                logdir=_ini(settings.log_dir),
                programs=[
                    {
                        "name": p.name,
                        "command": _ini(shlex.join(p.command)),
                        "environment": ",".join(f'{k}="{_ini(v)}"' for k, v in sorted(p.environment.items())),
                        "stop_signal": p.stop_signal,
                        "log": _ini(settings.log_dir / f"{p.name}.log"),
                    }
                    for p in programs
                ],
            )
        }

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        client = runtime.supervisor
        if CONFIG_FILE in change.removed:
            client.shutdown()
        elif not client.is_running():
            client.start_daemon()
        elif change.touches(CONFIG_FILE):
            client.update()

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        return None if runtime.supervisor.is_running() else "supervisord does not answer on its socket"


def _ini(value: object) -> str:
    """supervisord's ini: no control characters; '%' is its interpolation sign."""
    text = str(value)
    if _UNSAFE_IN_INI.search(text):
        raise ValueError(f"control character in a supervisord value: {text!r}")
    return text.replace("%", "%%")


class SupervisorClient:
    """XML-RPC over supervisord's unix socket (the `supervisor` package's transport)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._proxy = None

    @property
    def rpc(self):
        if self._proxy is None:
            from supervisor.xmlrpc import SupervisorTransport

            transport = SupervisorTransport(None, None, f"unix://{self.settings.supervisor_socket}")
            self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
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
        # supervisord forks itself into the background; it inherits this process's netns.
        subprocess.run(
            [str(supervisord), "-c", str(config)],
            check=True,
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

    def start(self, name: str) -> None:
        self.rpc.startProcess(name, True)

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
