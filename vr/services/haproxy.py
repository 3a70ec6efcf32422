"""haproxy: load-balancer rules (public IP:port -> guest members), with TLS termination.

haproxy runs in master-worker mode under supervisord. A config change is one SIGUSR2 to
the master: it re-executes itself, takes the listening sockets over from the old worker
through the stats socket (`expose-fd listeners`), and the old worker finishes its
connections (bounded by hard-stop-after). No listener is ever closed, so no client is
refused. Member states (up/down from health checks) are saved to the server-state file
just before a reload and loaded by the new worker, so a reload does not send traffic to
a member known to be down.

Certificates and keys go to files of their own (cert-<rule>-<n>.pem, mode 0600), named
by relative path: haproxy runs with -C <its config dir>, and the checker with -C <the
staged dir>, so `haproxy -c` loads exactly the certificates that will be switched in.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from pathlib import Path
from typing import Any

from vr.foundation.certificates import pem_problems, under
from vr.foundation.document import LbCertificate, LbMember, LbRule, RouterDocument
from vr.foundation.errors import Problem
from vr.foundation.memo import Memo
from vr.services.base import Change, Program, Service, repeats, run_checker
from vr.services.probes import ProbeSpec, stats_command
from vr.services.runtime import Runtime

PROGRAM = "haproxy"
CONFIG = "haproxy.cfg"
STATS = "stats.secrets"  # the statistics page, with its password: a second config file, never shown in a diff
HARD_STOP_AFTER_S = 30  # an old worker's connections get this long after a reload
GLOBAL_MAXCONN = 8000  # haproxy needs ~2 fds per connection; this machine class allows 20k fds


class HaproxyService(Service):
    name = "haproxy"

    def __init__(self) -> None:
        self._memo = Memo()  # certificate checks, per rule object

    def read(self, doc: RouterDocument) -> Any:
        return (doc.router.name, doc.interfaces, doc.nat, doc.load_balancer)

    def configured(self, doc: RouterDocument) -> bool:
        return bool(doc.load_balancer.rules) or doc.load_balancer.stats is not None

    def verify(self, doc: RouterDocument) -> list[Problem]:
        problems: list[Problem] = []
        rules = doc.load_balancer.rules
        assigned = {p.ip for p in doc.nat.public_ips if not p.reserved}
        static = {s.public_ip for s in doc.nat.static_nat}
        tiers = [a.network for i in doc.guest_interfaces() for a in i.ipv4s()]
        if doc.load_balancer.stats is not None:
            problems += _stats_problems(doc)
        if not rules:
            return problems  # nothing of ours; not even a pass over the port forwards
        forwards: dict = {}  # public IP -> its tcp port forwards' ranges: a rule looks at its own IP's only
        for f in doc.nat.port_forwarding:
            if f.protocol == "tcp":
                forwards.setdefault(f.public_ip, []).append((f.public_ports.start, f.public_ports.end))
        members = self._memo.map("members", rules, _member_problems, tuple(tiers))  # per rule: one changed, one checked
        for n, rule in enumerate(rules):
            path = f"load_balancer.rules[{n}]"
            if rule.public_ip not in assigned:
                problems.append(Problem(f"{path}.public_ip", f"{rule.public_ip} is not an assigned public IP"))
            elif rule.public_ip in static:
                problems.append(Problem(f"{path}.public_ip", f"{rule.public_ip} is taken whole by a static NAT"))
            for low, high in forwards.get(rule.public_ip, ()):
                if low <= rule.public_port <= high:
                    problems.append(Problem(f"{path}.public_port",
                                            f"tcp {rule.public_ip}:{rule.public_port} is already a port forward"))  # fmt: skip
            problems += under(path, members[n])
        for n, first in repeats(rule.id for rule in rules):
            problems.append(Problem(f"load_balancer.rules[{n}].id", f"{rules[n].id!r} is already rules[{first}]"))
        for n, first in repeats((rule.public_ip, rule.public_port) for rule in rules):
            rule = rules[n]
            problems.append(
                Problem(
                    f"load_balancer.rules[{n}].public_port",
                    f"{rule.public_ip}:{rule.public_port} is already load_balancer.rules[{first}]",
                )
            )
        for n, found in enumerate(self._memo.map("tls", rules, _certificate_problems)):
            problems += under(f"load_balancer.rules[{n}].tls", found)
        return problems

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        rules = doc.load_balancer.rules
        if not self.configured(doc):
            return {}
        settings = runtime.settings
        files: dict[str, bytes] = {}
        for rule in rules:
            if rule.tls:
                files.update(zip(_certificate_names(rule), map(_pem_bundle, rule.tls.certificates)))
        sections = runtime.render_each("haproxy/rule.j2", rules, lambda rule, _: {"rule": _rule_values(rule)})
        files[CONFIG] = runtime.render(
            "haproxy/haproxy.cfg.j2",
            router=doc.router.name,
            stats_socket=stats_socket(runtime),
            state_file=settings.state_dir / "haproxy.state",
            hard_stop_after_s=HARD_STOP_AFTER_S,
            global_maxconn=GLOBAL_MAXCONN,
            rules=sections.decode(),
        )
        files[STATS] = runtime.render("haproxy/stats.j2", stats=doc.load_balancer.stats)
        return files

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        if not (staged_dir / CONFIG).exists() or _weight_commands(change) is not None:
            # A change of members' weights only: validated integers, set through the runtime
            # API (apply); `haproxy -c` of 200 rules costs more than the whole change.
            return
        command = ["haproxy", "-c", "-q", "-C", str(staged_dir), "-f", str(staged_dir / CONFIG),
                   "-f", str(staged_dir / STATS)]  # fmt: skip
        run_checker("haproxy -c", command, staged_dir)

    def programs(self, doc: RouterDocument, runtime: Runtime) -> list[Program]:
        if not self.configured(doc):
            return []
        settings = runtime.settings
        here = settings.service_dir(self.name)
        # -W: master-worker; -db: stay in the foreground for supervisord.
        command = ["haproxy", "-W", "-db", "-C", str(here), "-f", str(here / CONFIG), "-f", str(here / STATS),
                   "-p", str(settings.run_dir / "haproxy.pid")]  # fmt: skip
        return [Program(PROGRAM, command, stop_signal="USR1")]  # USR1: finish connections, then exit

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        client = runtime.supervisor
        if doc is None or not self.configured(doc):
            return  # supervisor removed the program with its config
        if client.state(PROGRAM) != "RUNNING":
            state_file = runtime.settings.state_dir / "haproxy.state"
            if not state_file.exists():
                state_file.write_text("")  # nothing to restore yet; saves haproxy a warning
            client.start(PROGRAM)
        elif change.paths:
            commands = _weight_commands(change)
            if commands is not None and _set_at_runtime(runtime, commands):
                return  # hitless and at once: the running workers take the weights, the file has them for later
            _save_server_state(runtime)
            client.signal(PROGRAM, "USR2")

    def probe_spec(self, doc: RouterDocument, runtime: Runtime) -> ProbeSpec | None:
        """The workers answer on the stats socket and serve every rule."""
        if not doc.load_balancer.rules:
            return None
        args = {"stats_socket": str(stats_socket(runtime)), "backends": [r.id for r in doc.load_balancer.rules]}
        return {"program": PROGRAM, "check": "haproxy", "args": args}


_SERVER_LINE = re.compile(r"  server (\S+) (\S+) weight (\d+)(.*)")


def _weight_commands(change: Change) -> tuple[str, ...] | None:
    """The runtime API's `set server` commands when the new config differs from the live one
    only in members' weights (line for line); None when anything else differs."""
    old, new = change.previous.get(CONFIG), change.written.get(CONFIG)
    if change.restore or not old or not new or change.touches(*(p for p in change.paths if p != CONFIG)):
        return None
    return _weights_between(old, new)


@functools.lru_cache(maxsize=2)  # check and apply ask for the same pair
def _weights_between(old: bytes, new: bytes) -> tuple[str, ...] | None:
    old_lines, new_lines = old.decode().split("\n"), new.decode().split("\n")
    if len(old_lines) != len(new_lines):
        return None
    commands, backend = [], None
    for before, after in zip(old_lines, new_lines, strict=True):
        if after.startswith("backend "):
            backend = after.split()[1]
        if before == after:
            continue
        was, now = _SERVER_LINE.fullmatch(before), _SERVER_LINE.fullmatch(after)
        if not (was and now and backend) or was.group(1, 2, 4) != now.group(1, 2, 4):
            return None
        commands.append(f"set server {backend}/{now.group(1)} weight {now.group(3)}")
    return tuple(commands) or None  # cached: not a list a caller could change


def _set_at_runtime(runtime: Runtime, commands: tuple[str, ...]) -> bool:
    """Each command on the stats socket; False at the first one haproxy does not take
    silently (the caller reloads instead, which applies the file whatever happened here)."""
    try:
        return all(not ask(runtime, command).strip() for command in commands)
    except OSError:
        return False


def stats_socket(runtime: Runtime) -> Path:
    return runtime.settings.run_dir / "haproxy.sock"


def ask(runtime: Runtime, command: str, timeout: float = 1.0) -> str:
    """One command on haproxy's stats socket (the runtime API)."""
    return stats_command(str(stats_socket(runtime)), command, timeout)


def server_states(runtime: Runtime) -> dict[str, dict[str, str]]:
    """rule id -> {member "ip:port": status (UP, DOWN, MAINT, no check...)}, from `show stat`."""
    text = ask(runtime, "show stat").lstrip("# ")
    result: dict[str, dict[str, str]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        proxy = row.get("pxname", "")
        if not proxy.startswith("be_"):
            continue
        members = result.setdefault(proxy.removeprefix("be_"), {})
        if row["svname"] not in ("BACKEND", "FRONTEND"):
            members[_address_of(row["svname"])] = row["status"]
    return result


def member_address(rule: LbRule, member: LbMember) -> str:
    """ "ip:port" of a member: its own port, or the rule's private port."""
    return f"{member.ip}:{member.port or rule.private_port}"


def _server_name(address: str) -> str:
    # Stable across changes (the server-state file matches servers by name); ':' is not
    # allowed in a server name.
    return address.replace(":", "_")


def _address_of(server_name: str) -> str:
    return server_name.replace("_", ":")


def _save_server_state(runtime: Runtime) -> None:
    """Member states survive the reload only through this file (`load-server-state-from-file`)."""
    try:
        state = ask(runtime, "show servers state")
    except OSError:
        return  # nothing to keep: the new worker starts from its checks
    path = runtime.settings.state_dir / "haproxy.state"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state)
    tmp.replace(path)


def _certificate_names(rule: LbRule) -> list[str]:
    return [f"cert-{rule.id}-{n}.pem" for n in range(len(rule.tls.certificates if rule.tls else []))]


def _rule_values(rule: LbRule) -> dict:
    mode = "tcp" if rule.protocol == "tcp" else "http"
    backend = []
    check = rule.health_check
    options = ""
    if check is not None:
        options = f" check inter {check.interval_ms}ms rise {check.rise} fall {check.fall}"
        if check.type == "http":
            backend += [f"option httpchk GET {check.path}", f"http-check expect status {check.expect_status}"]
    sticky = rule.stickiness
    table = f"size {sticky.table_size or 200_000} expire {sticky.expire_s or 1800}s"
    if sticky.type == "source":
        backend += [f"stick-table type ip {table}", "stick on src"]
    elif sticky.type == "cookie":
        flags = [sticky.mode]
        if sticky.mode == "insert":
            flags += ["indirect"] * sticky.indirect + ["nocache"] * sticky.nocache
            flags += [f"maxlife {sticky.expire_s}s"] if sticky.expire_s else []
        backend.append(f"cookie {sticky.cookie or 'SERVERID'} {' '.join(flags)}")
    elif sticky.type == "app_cookie":
        backend += [
            f"stick-table type string len {sticky.length or 64} {table}",
            f"stick on req.cook({sticky.cookie})",
            f"stick store-response res.cook({sticky.cookie})",
        ]
    proxy = {"none": "", "v1": " send-proxy", "v2": " send-proxy-v2"}[rule.proxy_protocol]
    if proxy and check is not None:
        proxy += " check-send-proxy"  # the member expects the header on every connection, checks too
    servers = []
    for member in rule.members:
        address = member_address(rule, member)
        name = _server_name(address)
        cookie = f" cookie {name}" if sticky.type == "cookie" else ""
        servers.append({"name": name, "address": address, "weight": member.weight,
                        "options": options + proxy + cookie})  # fmt: skip
    forwarded = rule.forwarded_headers is not False and mode == "http"
    return {
        "id": rule.id,
        "mode": mode,
        "bind": f"{rule.public_ip}:{rule.public_port}",
        "certificates": _certificate_names(rule),
        "algorithm": rule.algorithm,
        "max_connections": rule.max_connections,
        "timeouts": rule.timeouts,
        "backend_lines": backend,
        "servers": servers,
        "http2": rule.http2,
        "forwarded_proto": ("https" if rule.protocol == "https" else "http") if forwarded else None,
    }


def _stats_problems(doc: RouterDocument) -> list[Problem]:
    """The statistics page: on one of the router's own interface addresses, at a port that
    nothing else of the router's takes there."""
    from vr.services.nftables import LOCAL_PORTS  # the ports each role answers already

    stats = doc.load_balancer.stats
    owner = doc.interface_holding(stats.address)
    if owner is None:
        return [Problem("load_balancer.stats.address", f"{stats.address} is not one of the router's interface addresses")]
    taken = set(LOCAL_PORTS.get(owner.role, {}).get("tcp", ()))
    if owner.role == "control" and doc.agent.served():
        taken.add(doc.agent.port)
    taken |= {r.public_port for r in doc.load_balancer.rules if r.public_ip == stats.address}
    if stats.port in taken:
        return [Problem("load_balancer.stats.port", f"tcp {stats.address}:{stats.port} is already a service of the router")]
    return []


def _pem_bundle(cert: LbCertificate) -> bytes:
    """haproxy's crt file: the certificate, its chain, then the key."""
    parts = [cert.certificate, cert.chain or "", cert.key]
    return "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts).encode()


def _member_problems(rule: LbRule, tiers: tuple) -> list[Problem]:
    """A rule's members: each inside a guest tier, none listed twice (paths under the rule)."""
    problems = []
    for m, member in enumerate(rule.members):
        if not any(member.ip in subnet for subnet in tiers):
            problems.append(Problem(f"members[{m}].ip", f"{member.ip} is not inside any guest tier"))
    for m, first in repeats(member_address(rule, member) for member in rule.members):
        problems.append(Problem(f"members[{m}]", f"the same member as members[{first}]"))
    return problems


def _certificate_problems(rule: LbRule, _: None) -> list[Problem]:
    if rule.tls is None:
        return []
    problems = []
    for n, item in enumerate(rule.tls.certificates):
        problems += under(f"certificates[{n}]", pem_problems(item.certificate, item.key, item.chain))
    return problems
