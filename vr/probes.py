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
    """haproxy's workers answer on the stats socket and serve every rule's backend."""
    try:
        text = stats_command(stats_socket, "show stat", timeout)
    except OSError as error:
        return f"haproxy's stats socket does not answer: {error or 'timeout'}"
    served = {line.split(",", 1)[0].removeprefix("be_") for line in text.splitlines() if line.startswith("be_")}
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


CHECKS = {
    "dns": dns,
    "haproxy": haproxy,
    "vici": vici,
    "router_advertisement": router_advertisement,
    "nft_table": nft_table,
}
