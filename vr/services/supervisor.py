"""supervisord: one per router, its config rendered by vr, driven over its XML-RPC socket.

Programs are declared by the other services (Service.programs). They do not autostart:
each service starts its own daemon in its apply step, so that a daemon is only started
once its files are in place; the monitor restarts them if they die. supervisord itself runs
in the foreground under vr's keeper (vr.control.keeper), which brings it back if it dies.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from vr.foundation.document import RouterDocument
from vr.foundation.settings import SUPERVISOR_CONFIG
from vr.services.base import Change, Service
from vr.services.runtime import Runtime
from vr.services.supervisor_rpc import SupervisorClient

__all__ = ["SupervisorClient", "SupervisorService"]

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
            SUPERVISOR_CONFIG: runtime.render(
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
                        "events": ",".join(p.events),
                        "autorestart": "true" if p.autorestart else "false",
                        "log": _ini(settings.log_dir / f"{p.name}.log"),
                    }
                    for p in programs
                ],
            )
        }

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        client = runtime.supervisor
        if SUPERVISOR_CONFIG in change.removed:
            client.shutdown()
        elif not client.is_running():
            client.start_daemon()
        elif change.touches(SUPERVISOR_CONFIG):
            client.update()

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        return None if runtime.supervisor.is_running() else "supervisord does not answer on its socket"


def _ini(value: object) -> str:
    """supervisord's ini: no control characters; '%' is its interpolation sign."""
    text = str(value)
    if _UNSAFE_IN_INI.search(text):
        raise ValueError(f"control character in a supervisord value: {text!r}")
    return text.replace("%", "%%")
