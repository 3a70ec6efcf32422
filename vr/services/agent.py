"""The manager's HTTPS agent: its part of the document (`agent`, and the control interface's
addresses it binds to) rendered into agent.json and its TLS files. The daemon serves it
(vr/control/agent.py); this module only lays out what to serve and tells the daemon to
re-read it (SIGHUP), so that a port, token or certificate change needs no restart.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from vr.foundation.certificates import pem_problems, under
from vr.foundation.document import RouterDocument
from vr.foundation.errors import Problem
from vr.services.base import Change, Service
from vr.services.runtime import DAEMON_PROGRAM, Runtime

CONFIG = "agent.json"
CERTIFICATE = "tls.pem"  # certificate then key: secret (0600, never shown)
CLIENT_CA = "client-ca.pem"
RESERVED_PORTS = (3922,)  # the control interface's SSH


def listen_addresses(doc: RouterDocument) -> list[str]:
    control = next((i for i in doc.interfaces if i.role == "control"), None)
    return [str(a.ip) for a in control.addresses] if control else []


class AgentService(Service):
    name = "agent"

    def read(self, doc: RouterDocument) -> Any:
        return (doc.agent, tuple(listen_addresses(doc)))

    def configured(self, doc: RouterDocument) -> bool:
        return doc.agent.served()

    def verify(self, doc: RouterDocument) -> list[Problem]:
        agent, problems = doc.agent, []
        if not agent.served():
            return []
        if not listen_addresses(doc):
            problems.append(Problem("agent", "the agent is served on the control interface: the document has none "
                                             "with an address"))  # fmt: skip
        if agent.port in RESERVED_PORTS:
            problems.append(Problem("agent.port", f"{agent.port} is the control interface's SSH port"))
        if agent.tls is not None:
            problems += under("agent.tls", pem_problems(agent.tls.certificate, agent.tls.key))
        if agent.client_ca is not None:
            from cryptography import x509

            try:
                x509.load_pem_x509_certificates(agent.client_ca.encode())
            except ValueError as error:
                problems.append(Problem("agent.client_ca", f"not PEM certificates ({error})"))
        return problems

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        agent = doc.agent
        if not agent.served():
            return {}
        config = {"listen": listen_addresses(doc), "port": agent.port, "tokens": list(agent.tokens),
                  "tls": CERTIFICATE if agent.tls else None, "client_ca": CLIENT_CA if agent.client_ca else None}  # fmt: skip
        files = {CONFIG: (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()}
        if agent.tls is not None:
            files[CERTIFICATE] = (agent.tls.certificate + agent.tls.key).encode()
        if agent.client_ca is not None:
            files[CLIENT_CA] = agent.client_ca.encode()
        return files

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        """The daemon serves what agent.json says once told: SIGHUP, to itself when the
        apply runs inside it. A daemon not running yet reads the file when it starts."""
        runtime.signal_daemon()

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        """Served: its port accepts connections on the first control address (the daemon
        binds them all at once)."""
        if doc is None or not doc.agent.served():
            return None
        if not runtime.supervisor.is_running():
            return "supervisord is down: no daemon serves the agent"
        if reason := runtime.supervisor.not_running(DAEMON_PROGRAM):
            return f"no daemon serves the agent: {reason}"
        address = listen_addresses(doc)[0]
        try:
            with socket.create_connection((address, doc.agent.port), timeout=0.5):
                return None
        except OSError as error:
            return f"the agent does not accept connections on {address} port {doc.agent.port}: {error.strerror}"
