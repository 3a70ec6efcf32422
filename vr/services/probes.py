"""Functional health checks, shared by the pipeline's health gate and the monitor.

A check is described by data (a ProbeSpec dict a service builds from the document), so the
monitor runs it without loading the document model: it must stay small (< 30 MB) and idle.
Each check returns None when the service does its job, otherwise why not.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

ProbeSpec = dict[str, Any]  # {"check": name, "args": {...}}


def run(spec: ProbeSpec, timeout: float = 0.5) -> str | None:
    return CHECKS[spec["check"]](timeout=timeout, **spec["args"])


def dns(server: str, name: str, expect: str, dhcp: bool = False, timeout: float = 0.5) -> str | None:
    """dnsmasq answers a query for a name it serves (as a guest would ask), and, for a
    router with DHCP, holds the DHCP port."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    query = dns.message.make_query(name, dns.rdatatype.A)
    try:
        response = dns.query.udp(query, server, timeout=timeout)
    except (dns.exception.Timeout, OSError) as error:
        return f"no DNS answer from {server}: {error or 'timeout'}"
    answers = [str(r) for rrset in response.answer for r in rrset if rrset.rdtype == dns.rdatatype.A]
    if expect not in answers:
        return f"DNS answer for {name} from {server} was {answers or 'empty'}"
    if dhcp and not udp_port_bound(67):
        return "nothing holds the DHCP port (udp 67)"
    return None


def udp_port_bound(port: int) -> bool:
    """Whether a UDP socket of this network namespace is bound to the port."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        if any(line.split()[1].endswith(wanted) for line in lines if len(line.split()) > 1):
            return True
    return False


def haproxy(stats_socket: str, backends: list[str], timeout: float = 0.5) -> str | None:
    """haproxy's workers answer on the stats socket and serve every rule's backend (`show
    backend`: the names alone; `show stat` of 200 rules is 600 rows of 80 fields)."""
    try:
        text = stats_command(stats_socket, "show backend", timeout)
    except OSError as error:
        return f"haproxy's stats socket does not answer: {error or 'timeout'}"
    served = {line.strip().removeprefix("be_") for line in text.splitlines() if line.startswith("be_")}
    missing = [b for b in backends if b not in served]
    return f"haproxy does not serve rules {', '.join(missing)} yet" if missing else None


def stats_command(path: str, command: str, timeout: float = 1.0) -> str:
    """One command on haproxy's stats socket (the runtime API)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        connection.connect(path)
        connection.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def vici(vici_socket: str, connections: list[str], timeout: float = 0.5) -> str | None:
    """charon answers `stats` over VICI and has every connection loaded."""
    import vici as vici_module
    from vici.exception import CommandException, SessionException

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(vici_socket)
            session = vici_module.Session(connection)
            session.stats()
            loaded = {name.decode() for name in session.get_conns()["conns"]}
    except (OSError, CommandException, SessionException) as error:
        return f"charon's VICI socket does not answer: {error or 'timeout'}"
    missing = sorted(set(connections) - loaded)
    return f"charon has not loaded {', '.join(missing)}" if missing else None


# vr's own initiations of an active tunnel that is down: after TUNNEL_RETRY_S[0], doubling up
# to TUNNEL_RETRY_S[1]. charon retries a peer that does not answer by itself (keyingtries = 0)
# but gives up on one that answered with an error (NO_PROPOSAL_CHOSEN, AUTHENTICATION_FAILED).
TUNNEL_RETRY_S = (2.0, 30.0)
_IKE_UP, _CHILD_UP = {"ESTABLISHED", "REKEYING", "REKEYED"}, {"INSTALLED", "REKEYING", "REKEYED"}


def vpn(vici_socket: str, connections: list[str], tunnels: list[str] | None = None, state_file: str = "",
        timeout: float = 0.5) -> str | None:  # fmt: skip
    """charon does its job (the vici check); then each active tunnel is kept up: one found down
    is initiated again, with back-off, and why it is down is kept in state_file for `vr status
    --vpn`. A tunnel down is its peer's doing or the path's, not charon failing: it is never a
    failure here, so neither the apply's health gate nor the monitor acts on it."""
    reason = vici(vici_socket, connections, timeout)
    if reason is None and tunnels:
        keep_tunnels_up(vici_socket, tunnels, Path(state_file), budget_s=timeout / 2)
    return reason


def keep_tunnels_up(vici_socket: str, tunnels: list[str], state_file: Path, budget_s: float) -> None:
    """Initiate each tunnel that is down and due, spending at most about budget_s waiting for
    charon's answers; state_file keeps, per tunnel down: since, attempts, next try, reason."""
    import time

    import vici as vici_module
    from vici.exception import CommandException, SessionException

    from vr.foundation.files import read_json, write_json_atomic

    known = read_json(state_file)
    state = {name: dict(entry) for name, entry in (known or {}).items() if name in tunnels}
    now, started = time.time(), time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(budget_s + 2)
            connection.connect(vici_socket)
            session = vici_module.Session(connection)
            sas: dict[str, list[tuple[str, set[str]]]] = {}
            for item in session.list_sas({"noblock": "yes"}):
                for name, sa in item.items():
                    children = {c["state"].decode() for c in sa.get("child-sas", {}).values()}
                    sas.setdefault(name, []).append((sa["state"].decode(), children))
            for name in tunnels:
                found = sas.get(name, [])
                if any(ike in _IKE_UP and children & _CHILD_UP for ike, children in found):
                    state.pop(name, None)
                    continue
                # First seen down: charon's own start action (a load, a DPD restart) may be at
                # it this very moment, so vr's first try waits: two initiations would race.
                entry = state.setdefault(name, {"since": now, "attempts": 0, "next_s": now + TUNNEL_RETRY_S[0],
                                                "reason": None})  # fmt: skip
                if any(ike not in _IKE_UP for ike, _ in found):  # charon is at it (connecting, deleting)
                    entry["reason"] = entry["reason"] or "connecting: no answer from the peer yet"
                    continue
                if now < entry["next_s"] or time.monotonic() - started > budget_s:
                    continue
                why = _initiate(session, name, budget_s, CommandException)
                entry["attempts"] += 1
                entry["next_s"] = now + min(TUNNEL_RETRY_S[1], TUNNEL_RETRY_S[0] * 2 ** (entry["attempts"] - 1))
                if why is None:
                    state.pop(name)
                else:
                    entry["reason"] = why
    except (OSError, CommandException, SessionException):
        pass  # the vici check has just answered: a session that breaks now is tried again next time
    if state != known and (state or known):
        write_json_atomic(state_file, state, sync=False)


def _initiate(session: Any, name: str, budget_s: float, failed: type[Exception]) -> str | None:
    """None when the tunnel came up; otherwise why not, in charon's words."""
    lines = []
    try:
        for log in session.initiate({"ike": name, "child": name, "timeout": str(max(1, int(budget_s * 1000))),
                                     "loglevel": "1"}):  # fmt: skip
            lines.append(log.get("msg", b"").decode(errors="replace"))
    except failed as error:
        # The peer's own word first (e.g. "received NO_PROPOSAL_CHOSEN notify error"), then charon's.
        refused = [line for line in lines if " notify" in line and "received" in line]
        refused += [line for line in lines if "failed" in line or "giving up" in line]
        return (refused or [f"no answer from the peer within {budget_s * 1000:.0f} ms ({error})"])[0]
    return None


def router_advertisement(interface: str, prefix: str, timeout: float = 0.5) -> str | None:
    """A router solicitation on the tier, answered with its prefix: radvd is not just alive
    but advertising (rdisc6 from the router itself: the kernel loops the multicast
    solicitation back to radvd)."""
    wait_ms = str(max(100, int(timeout * 1000)))
    try:
        result = subprocess.run(["rdisc6", "-1", "-q", "-r", "1", "-w", wait_ms, interface], capture_output=True,
                                text=True, timeout=timeout + 5, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"rdisc6 on {interface} did not finish"
    if prefix not in result.stdout.split():
        return f"no router advertisement of {prefix} on {interface}"
    return None


def nft_table(table: str, timeout: float = 0.5) -> str | None:
    """vr's table is loaded (one small set that every vr table defines: listing the table
    would make libnftables fetch every element, tens of ms with 10k rules)."""
    rc, _, _ = _nftables_context(os.stat("/proc/self/ns/net").st_ino).cmd(f"list set {table} public_ips")
    return None if rc == 0 else f"table {table} is missing"


@functools.cache
def _nftables_context(_namespace: int) -> Any:
    """One libnftables context per network namespace (its netlink socket stays in the one it
    was opened in): the apply path asks on every element-only change."""
    import nftables

    return nftables.Nftables()


def http_answers(addresses: list[str], ports: list[int], timeout: float = 0.5) -> str | None:
    """Each port answers an HTTP request on the first address (the router's own address is no
    VM's: a 404 is an answer), as the monitor's "web server" check of CloudStack's router, and
    accepts connections on every other (one server serves them all: 16 round trips would cost
    an apply 20 ms)."""
    for n, address in enumerate(addresses):
        for port in ports:
            try:
                with socket.create_connection((address, port), timeout=timeout) as sock:
                    if n > 0:
                        continue
                    sock.settimeout(timeout)
                    sock.sendall(b"GET /latest/meta-data/ HTTP/1.0\r\nHost: data-server\r\n\r\n")
                    head = sock.recv(16)
            except OSError as error:
                return f"guest data does not answer on {address} port {port}: {error.strerror or error}"
            if not head.startswith(b"HTTP/1."):
                return f"guest data on {address} port {port} answered something other than HTTP"
    return None


CHECKS = {
    "dns": dns,
    "haproxy": haproxy,
    "vici": vici,
    "vpn": vpn,
    "router_advertisement": router_advertisement,
    "nft_table": nft_table,
    "http_answers": http_answers,
}
