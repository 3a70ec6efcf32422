"""The monitor's place in the pipeline: its settings (the document's `monitor` section and
every service's probe, as data) rendered into monitor.json, and `vr daemon` (the resident
process the monitor is a thread of) run by supervisord as its event listener, program
`monitor`. The monitor re-reads monitor.json when it changes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from vr.foundation.document import MONITORED, RouterDocument
from vr.services.base import Change, Program, Service
from vr.services.runtime import Runtime

PROGRAM = "monitor"
CONFIG = "monitor.json"


class MonitorService(Service):
    name = "monitor"

    def read(self, doc: RouterDocument) -> Any:
        return None  # the probes follow most of the document: always generated, compared by content

    def configured(self, doc: RouterDocument) -> bool:
        return True

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        from vr.services import by_name

        services = []
        for name in MONITORED:
            service = by_name(name)
            spec = service.probe_spec(doc, runtime)
            if spec is None:
                continue  # this router does not run it
            settings = doc.monitor.settings_for(name)
            services.append({"name": name, "program": spec["program"], "spec": spec, "enabled": settings.enabled,
                             "interval_s": settings.interval_s, "timeout_s": settings.timeout_s,
                             "failures": settings.failures})  # fmt: skip
        restart = doc.monitor.restart
        config = {
            "router": doc.router.name,
            "alert_url": doc.monitor.alert_url,
            "restart": restart.model_dump(exclude={"failed_interval_s"}),
            "failed_interval_s": restart.failed_interval_s,
            "services": services,
        }
        return {CONFIG: (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()}

    def programs(self, doc: RouterDocument, runtime: Runtime) -> list[Program]:
        command = [sys.executable, "-m", "vr", "daemon"]
        return [Program(PROGRAM, command, environment=runtime.settings.environment(), events=("PROCESS_STATE",))]

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        if doc is None:
            return  # supervisord removed the program with its config
        if runtime.supervisor.state(PROGRAM) != "RUNNING":
            runtime.supervisor.start(PROGRAM, wait=False)

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        return runtime.supervisor.not_running(PROGRAM)
