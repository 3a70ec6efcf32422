"""dnsmasq: DHCPv4/v6 (static leases per VM, optional dynamic range) and DNS for guest names.

How a VM change reaches the running dnsmasq without a full re-read (a SIGHUP re-reads every
VM, 30+ ms for 4,000 with DNS waiting meanwhile):
- Names are rendered into shard files under `names/` (VMs hashed by MAC into NAME_SHARDS).
  dnsmasq's `--hostsdir` is a mirror of them in the run dir (copied at dnsmasq's start),
  which a change edits as little as it can (see _NameMirror): dnsmasq re-reads a new or
  replaced file through inotify, and each line it reads costs it about a quarter of a
  millisecond with 4,000 VMs loaded (re-reading one 16-VM shard: 10 ms). An added VM's
  names go in a new file of their own; a removed VM's file is rewritten without them.
- DHCP hosts live in `dhcp-hosts` (the full set, read at start and on SIGHUP). A one-VM
  change is also dropped into a `--dhcp-hostsdir` in the run dir, read through inotify:
  added VMs' lines, and `<mac>,ignore` for removed ones (dnsmasq prefers the newest
  dhcp-host for a MAC, so the removed VM is refused from then on). Whatever dnsmasq still
  holds for a removed VM is recorded in the drop-in as a `# shadowed:` comment; an addition
  that reuses its MAC, DUID or address, too many shadowed VMs, or a rollback takes the full
  path: empty the drop-ins, SIGHUP. dnsmasq's start command empties them too.
The main config needs a restart. The lease file is state: it lives in the state dir and
survives restarts, patches and rebuilds. A removed VM's leases are released explicitly
(dhcp_release; for DHCPv6 a relayed Release with the IAID and client id the lease file
holds, see _release6), never by deleting the lease file; so is a renamed VM's DHCPv6
lease, whose name a re-read would not change (it renames IPv4 leases). A release is one
packet per lease, no signal, and read from the lease file before any signal.
A VM line that carries an IPv6 address carries no lease time, so that each family gets
its own tier's (dhcp.tiers, ipv6.tiers) from the ranges. The tier MTU is forced: sent to
clients that do not ask for it (busybox udhcpc).

dnsmasq 2.90 (Debian 12) segfaults on SIGHUP when a dhcp-hostsfile line carries a
`set:` tag and that host holds a lease: freeing the re-read host entries follows tag
links that DHCP processing pointed at stack memory. So hostsfile lines never carry a
tag. The few VMs that need per-VM options (a second NIC without default gateway,
extra options) are declared in the main config, which SIGHUP never frees; changing
one of those restarts dnsmasq, with its leases kept in the lease file.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import struct
import subprocess
import time
import zlib
from ipaddress import IPv4Address, IPv4Interface, IPv6Address
from itertools import compress
from operator import not_
from pathlib import Path
from typing import Any, NamedTuple

from vr.foundation.document import DhcpEntry, DhcpOption, DhcpRange, DhcpTier, Interface, Ipv6Tier, RouterDocument
from vr.foundation.errors import Problem
from vr.foundation.files import LiveContent, read_bytes_or_none, stat_key, write_new
from vr.foundation.memo import Memo
from vr.foundation.settings import Settings
from vr.services.base import Change, CheckFailed, Program, Service, run_checker
from vr.services.network import interface_names
from vr.services.probes import ProbeSpec
from vr.services.runtime import Runtime

PROGRAM = "dnsmasq"
MAIN = "dnsmasq.conf"
HOSTS = "dhcp-hosts"
NAMES = "names"  # a directory of shard files
ROUTER_NAMES = f"{NAMES}/router"
NAME_SHARDS = 256  # 4,000 VMs: about 16 per shard (what a removed VM costs dnsmasq to re-read: see _NameMirror)
DROP_INS = "dnsmasq-hosts.d"  # under the run dir: VM changes since dnsmasq last read dhcp-hosts
NAME_MIRROR = "dnsmasq-names"  # under the run dir: dnsmasq's hostsdir, the names as _NameMirror keeps them
ADDED = "+"  # the first character of a mirror file holding names a change added
SHADOWED = b"# shadowed: "
MAX_SHADOWED = 256  # removed VMs dnsmasq may still hold before a full re-read
PID_FILE = "dnsmasq.pid"  # under the run dir
NAMES_PREFIX = NAMES + "/"
LEASE_FILE = "dnsmasq.leases"  # in the state dir: leases outlive restarts, patches and rebuilds
DEFAULT_LEASE_TIME = 86400  # seconds, for an entry whose tier has no dhcp.tiers item
DHCPV6_SERVER_PORT = 547
DHCPV6_RELEASE, DHCPV6_RELAY_FORW, DHCPV6_RELAY_REPL = b"\x08", b"\x0c", b"\x0d"  # message types
# The options vr sends each tier itself, by dnsmasq's name: one that the document gives
# replaces vr's (a second line would conflict with it).
ROUTER_OPTION, DNS_OPTION, DOMAIN_OPTION, MTU_OPTION = 3, 6, 15, 26
OWN_OPTIONS = {"router": ROUTER_OPTION, "dns-server": DNS_OPTION, "domain-name": DOMAIN_OPTION, "mtu": MTU_OPTION}
RELEASE_WAIT = 0.5  # seconds for dnsmasq's answers to the releases (it answers in milliseconds)
# A dhcp-host field dnsmasq reads as a lease time or a keyword whatever its place: a VM of
# that name would get a 123 s lease and no name, or no lease at all ("ignore").
NOT_A_NAME = re.compile(r"ignore|infinite|[0-9]+[smhdw]?")
DATA_SERVER = "data-server"  # every tier's router address, by this name (CloudStack guests look it up)


class DnsmasqService(Service):
    name = "dnsmasq"
    checker_reads_unchanged = False  # `dnsmasq --test` reads the main config alone

    def read(self, doc: RouterDocument) -> Any:
        return (doc.router.name, doc.guest_interfaces(), doc.dns, doc.dhcp, doc.ipv6.tiers,
                doc.public_interface() if doc.dns.public else None)

    def configured(self, doc: RouterDocument) -> bool:
        return bool(doc.guest_interfaces())

    def verify(self, doc: RouterDocument) -> list[Problem]:
        problems: list[Problem] = []
        guests = {i.id: i for i in doc.guest_interfaces()}
        if doc.dns.public and (doc.public_interface() is None or doc.public_interface().ipv4() is None):
            problems.append(Problem("dns.public", "the router has no public interface with an IPv4 address"))
        seen_tiers: set[str] = set()
        for n, tier in enumerate(doc.dhcp.tiers):
            path = f"dhcp.tiers[{n}]"
            iface = guests.get(tier.tier)
            if iface is None:
                problems.append(Problem(f"{path}.tier", f"{tier.tier!r} is not a guest interface id"))
                continue
            if tier.tier in seen_tiers:
                problems.append(Problem(f"{path}.tier", f"tier {tier.tier!r} is configured twice"))
            seen_tiers.add(tier.tier)
            if tier.range is not None and iface.ipv4() is not None:
                own = _range_subnet(iface, tier.range)
                subnet = own.network
                for end in ("start", "end"):
                    address = getattr(tier.range, end)
                    if address not in subnet:
                        problems.append(Problem(f"{path}.range.{end}", f"{address} is outside tier subnet {subnet}"))
                if tier.range.start > tier.range.end:
                    problems.append(Problem(f"{path}.range", "start is after end"))
            problems += _option_problems(f"{path}.options", tier.options)
        # Per tier, computed once: its subnets as integers and the addresses no VM may take
        # (each subnet's network and broadcast, the router's own, a shared network's gateways).
        bounds = {}
        for tier_id, iface in guests.items():
            own = iface.ipv4s()
            reserved = {int(a) for a in iface.gateways}
            for address in own:
                reserved |= {int(address.network.network_address), int(address.network.broadcast_address), int(address.ip)}
            spans = tuple((int(a.network.network_address), int(a.network.broadcast_address)) for a in own)
            bounds[tier_id] = (spans, frozenset(reserved), ", ".join(str(a.network) for a in own))
        seen_ip: dict[tuple[str, int], int] = {}
        seen_name: dict[str, int] = {}
        macs: dict[str, int] = {}
        router_name = doc.router.name.lower()
        prefixes = {}  # tier -> (its /64 as an integer, the router's address as one, the network)
        for t in doc.ipv6.tiers:
            own = guests[t.tier].ipv6() if t.tier in guests else None
            if own is not None:
                prefixes[t.tier] = (int(own.ip) >> 64, int(own.ip), own.network)
        if self._entries_fine(doc.dhcp.entries, (bounds, prefixes, router_name)):
            return problems  # the per-VM pass below finds nothing: no need to run it
        seen_ipv6: dict[object, int] = {}
        for n, entry in enumerate(doc.dhcp.entries):
            tier = bounds.get(entry.tier)
            if tier is None:
                problems.append(Problem(f"dhcp.entries[{n}].tier", f"{entry.tier!r} is not a guest interface id"))
                continue
            spans, reserved, subnets = tier
            address = int(entry.ip)
            if not any(low <= address <= high for low, high in spans):
                problems.append(
                    Problem(f"dhcp.entries[{n}].ip", f"{entry.ip} is outside tier {entry.tier} subnet {subnets}")
                )
            elif address in reserved:
                problems.append(
                    Problem(f"dhcp.entries[{n}].ip", f"{entry.ip} is the network, broadcast or gateway address")
                )
            if not entry.default_gateway and any(_option_code(o) == ROUTER_OPTION for o in entry.options):
                problems.append(Problem(f"dhcp.entries[{n}].options",
                                        "a router option contradicts default_gateway false (which sends none)"))  # fmt: skip
            problems += _option_problems(f"dhcp.entries[{n}].options", entry.options)
            first = macs.setdefault(entry.mac, n)
            if first != n:
                problems.append(
                    Problem(f"dhcp.entries[{n}].mac", f"{entry.mac} is already used by dhcp.entries[{first}]")
                )
            hostname = entry.hostname.lower()
            first = seen_ip.setdefault((entry.tier, address), n)
            if first != n:
                problems.append(Problem(f"dhcp.entries[{n}].ip",
                                        f"{entry.ip} is already used in tier {entry.tier} by dhcp.entries[{first}]"))  # fmt: skip
            # A short name answers for one VM on this router, whatever its tier's domain.
            first = seen_name.setdefault(hostname, n)
            if first != n:
                where = "tier " + entry.tier if doc.dhcp.entries[first].tier == entry.tier else "another tier"
                problems.append(Problem(f"dhcp.entries[{n}].hostname",
                                        f"{hostname} is already used in {where} by dhcp.entries[{first}] "
                                        "(a short name answers for one VM on this router)"))  # fmt: skip
            if hostname == router_name:
                problems.append(Problem(f"dhcp.entries[{n}].hostname", "is the router's own name"))
            elif hostname == DATA_SERVER:
                problems.append(Problem(f"dhcp.entries[{n}].hostname", f"{DATA_SERVER} is the router's name on "
                                        "every tier (guests find their guest data by it)"))  # fmt: skip
            elif NOT_A_NAME.fullmatch(hostname):
                problems.append(
                    Problem(
                        f"dhcp.entries[{n}].hostname",
                        f"{entry.hostname!r} would be read by dnsmasq as a lease time or keyword, not a name",
                    )
                )
            if entry.ipv6 is not None or entry.duid is not None:
                problems += _ipv6_entry_problems(n, entry, prefixes, seen_ipv6)
        return problems

    def __init__(self) -> None:
        self._memo = Memo()  # each VM's own facts, per entry object: a one-VM change computes one

    def _entries_fine(self, entries: list[DhcpEntry], setting: tuple) -> bool:
        """Whether every VM passes its own checks and no MAC, address, name or IPv6 address is
        taken twice: counted by Memo.tally for the VMs that came and went, so a push to a
        4,000-VM router does not walk them all. When anything is wrong, verify's full pass
        names it (the same problems, in the same words)."""
        unfine, repeated = self._memo.tally("entries", entries, _entry_keys, setting)
        return not unfine and not repeated

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        if not doc.guest_interfaces():
            return {}
        settings = runtime.settings
        here = settings.service_dir(self.name)
        lease_times = {t.tier: t.lease_time for t in doc.dhcp.tiers}
        # Per VM, memoized: its main-config declaration when it needs one, else None (most VMs).
        entries = doc.dhcp.entries
        tagged = runtime.memoized("dnsmasq/tagged", entries, _tagged_values, lease_times)
        tagged_hosts = list(filter(None, tagged))
        plain_hosts = list(compress(entries, map(not_, tagged))) if tagged_hosts else entries
        ipv6_tiers = {t.tier: t for t in doc.ipv6.tiers}
        routed = [i for i in doc.guest_interfaces() if i.id in ipv6_tiers and i.ipv6()]  # IPv6 tiers
        domains = doc.tier_domains()
        names = _name_shards(runtime, doc.dhcp.entries, domains)
        router_names = (doc.router.name, domains, frozenset(i.id for i in routed))
        names[ROUTER_NAMES] = b"".join(runtime.memoized("dnsmasq/router-names", doc.guest_interfaces(),
                                                        functools.partial(_router_names, runtime), router_names))
        return {
            MAIN: runtime.render(
                "dnsmasq/dnsmasq.conf.j2",
                router=doc.router.name,
                listen=[a.ip for i in doc.guest_interfaces() for a in i.ipv4s()] + [i.ipv6().ip for i in routed],
                cache_size=doc.dns.cache_size,
                domain=doc.dns.domain,
                upstream=doc.dns.upstream,
                names_dir=_mirror_dir(runtime),
                hosts_file=here / HOSTS,
                drop_in_dir=_drop_in_dir(runtime),
                lease_file=self.lease_file(runtime),
                tier_domains=[(domains[i.id], a.network) for i in doc.guest_interfaces() for a in i.ipv4s()
                              if domains[i.id] != doc.dns.domain],
                local_domains=sorted(set(domains.values()) - {doc.dns.domain}),
                tiers=[v for t in doc.dhcp.tiers for v in _tier_values(doc, t, domains[t.tier])],
                public_dns=_public_dns(doc, domains),
                dhcpv6_tiers=[
                    _dhcpv6_values(ipv6_tiers[i.id], i, domains[i.id]) for i in routed
                    if ipv6_tiers[i.id].mode == "dhcpv6"
                ],
                tagged_hosts=tagged_hosts,
            ),
            HOSTS: runtime.render_each("dnsmasq/dhcp-host.j2", plain_hosts, _host_values, lease_times),
            **names,
        }

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        if not (staged_dir / MAIN).exists() or (change.written and MAIN not in change.written):
            return  # `dnsmasq --test` reads only the main file; the host files are ours, validated
        _check_readable_after_privilege_drop(runtime.settings.service_dir(self.name))
        _check_readable_after_privilege_drop(_drop_in_dir(runtime).parent)
        run_checker("dnsmasq --test", ["dnsmasq", "--test", f"--conf-file={staged_dir / MAIN}"], staged_dir)

    def programs(self, doc: RouterDocument, runtime: Runtime) -> list[Program]:
        if not doc.guest_interfaces():
            return []
        settings = runtime.settings
        # dhcp-hosts has every VM's line: no drop-in; the names mirror starts as the shards.
        fresh_start = ('mkdir -p "$1" "$2" && rm -f "$1"/* "$2"/* && cp "$3"/* "$2"/ && chmod 0644 "$2"/*; '
                       'shift 3; exec "$@"')  # fmt: skip
        return [
            Program(
                PROGRAM,
                [
                    "/bin/sh",
                    "-c",
                    fresh_start,
                    "dnsmasq-start",
                    str(_drop_in_dir(runtime)),
                    str(_mirror_dir(runtime)),
                    str(settings.service_dir(self.name) / NAMES),
                    "dnsmasq",
                    "--keep-in-foreground",
                    f"--conf-file={settings.service_dir(self.name) / MAIN}",
                    f"--pid-file={settings.run_dir / PID_FILE}",
                    "--log-facility=-",
                ],
            )
        ]

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        client = runtime.supervisor
        if doc is None or not doc.guest_interfaces():
            return  # supervisor removed the program with its config
        # Read before any signal: a re-read or a restart makes dnsmasq rewrite the lease file
        # (truncate, then write), and a read meanwhile would see no lease to release.
        leases = read_leases(self.lease_file(runtime)) if change.touches(HOSTS, MAIN) else None
        if client.state(PROGRAM) != "RUNNING":
            client.start(PROGRAM)  # its start command copies the names into the mirror
        elif change.touches(MAIN):
            client.restart(PROGRAM)
        else:
            if any(p.startswith(NAMES_PREFIX) for p in change.paths):
                mirror = _NameMirror(_mirror_dir(runtime), runtime.settings.run_dir / PID_FILE)
                if change.restore:  # whichever version dnsmasq holds: the mirror made equal to the names
                    mirror.reconcile(runtime.settings.service_dir(self.name) / NAMES)
                else:
                    mirror.update(*_names_delta(change), runtime.settings.service_dir(self.name) / NAMES)
            if change.touches(HOSTS):
                drop_ins = _drop_in_dir(runtime)
                drop_in = None if change.restore else _drop_in(change, _shadowed(drop_ins))
                if drop_in is None:
                    _empty(drop_ins)  # before the signal: dhcp-hosts already holds what they added
                    client.signal(PROGRAM, "HUP")  # re-reads the mirror too, as it stands
                else:
                    _renamed_in(drop_ins, f"{time.time_ns()}", drop_in)
        if leases is not None:
            _release_dropped_leases(change, doc, leases)

    def probe_spec(self, doc: RouterDocument, runtime: Runtime) -> ProbeSpec | None:
        """A guest's question: a VM's name (the router's own while there is none), asked of
        the first tier's gateway; and the DHCP port held where DHCP is served."""
        if not doc.guest_interfaces():
            return None
        known = next(iter(doc.dhcp.entries), None)
        name, address = (known.hostname, known.ip) if known else (doc.router.name, doc.guest_interfaces()[0].ipv4().ip)
        tier = known.tier if known else doc.guest_interfaces()[0].id
        args = {"server": str(doc.guest_interfaces()[0].ipv4().ip), "name": f"{name}.{doc.tier_domains()[tier]}.",
                "expect": str(address), "dhcp": bool(doc.dhcp.tiers)}  # fmt: skip
        return {"program": PROGRAM, "check": "dns", "args": args}

    def lease_file(self, runtime: Runtime) -> Path:
        return runtime.settings.state_dir / LEASE_FILE


def _release_dropped_leases(change: Change, doc: RouterDocument, leases: Leases) -> None:
    """SIGHUP does not revoke leases: tell dnsmasq that a removed VM's lease is gone, and
    an IPv6 lease whose VM was renamed too (a re-read renames IPv4 leases, never IPv6
    ones, so the old name would keep answering AAAA). One release per lease, no signal."""
    if not leases.v4 and not leases.v6:
        return
    # Only the lines that differ need parsing. A hosts-file line and a main-config one never
    # read alike (dhcp-host=), so each file is compared with its own former self.
    old_hosts, new_hosts = _line_set(change.previous.get(HOSTS) or b""), _line_set(change.written.get(HOSTS) or b"")
    old_main, new_main = _main_hosts(change.previous.get(MAIN)), _main_hosts(change.written.get(MAIN))
    gone_lines, added_lines = (old_hosts - new_hosts) | (old_main - new_main), (new_hosts - old_hosts) | (new_main - old_main)
    gone, still = _host_lines(gone_lines), _host_lines(added_lines)
    dropped = [(mac, ip) for mac, ip in gone.items() if mac in leases.v4 and still.get(mac) != ip]
    was, now = _ipv6_owners(gone_lines), _ipv6_owners(added_lines)  # address -> (MAC or DUID, name)
    dropped6 = [lease for lease in leases.v6 if lease.address in was and now.get(lease.address) != was[lease.address]]
    if not dropped and not (dropped6 and leases.server_id):
        return
    names = interface_names(doc)
    by_subnet = [(i.ipv4().network, names[i.id]) for i in doc.guest_interfaces()]
    by_prefix = [(i.ipv6(), names[i.id]) for i in doc.guest_interfaces() if i.ipv6()]
    for mac, ip in dropped:
        address = IPv4Address(ip)
        ifname = next((name for subnet, name in by_subnet if address in subnet), None)
        if ifname:
            subprocess.run(["dhcp_release", ifname, ip, mac], capture_output=True, timeout=10, check=False)
    for own, ifname in by_prefix:
        released = [lease for lease in dropped6 if IPv6Address(lease.address) in own.network]
        if released and leases.server_id:
            _release6(ifname, released, leases.server_id, own.ip)


def _release6(ifname: str, leases: list[Lease6], server_id: str, link_address: IPv6Address) -> None:
    """Release DHCPv6 leases as a relay agent on the tier would pass on their clients'
    Releases (RFC 8415 Relay-Forward, to dnsmasq on ff02::1:2 on the tier), naming
    dnsmasq's DUID and each client's DUID, IAID and address as the lease file holds them.

    Not as dnsmasq-utils' dhcp_release6 does it: dnsmasq looks the MAC of a sender that
    is not a relay up in the neighbour table, where the router's own address never is,
    and sleeps 5 x 100 ms over it, its DNS answers waiting too (dhcp_release6 then sleeps
    a second more itself). A Relay-Forward names its link (the router's address on the
    tier) and skips that lookup; its Relay-Reply comes back to port 547 of that address,
    where this socket, bound to the address itself, takes it before dnsmasq's wildcard
    socket does (which would look its own address up: the same stall). Bounded wait."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # dnsmasq's [::]:547 is REUSEADDR too
        try:
            sock.bind((str(link_address), DHCPV6_SERVER_PORT))
        except OSError:
            pass  # the releases still reach dnsmasq; its replies to itself cost it half a second
        destination = ("ff02::1:2", DHCPV6_SERVER_PORT, 0, socket.if_nametoindex(ifname))
        pending = 0
        for lease in leases:
            try:
                release = _release6_packet(os.urandom(3), lease, server_id)
            except ValueError:
                continue  # not a lease dnsmasq wrote (a client id that is not hex)
            relayed = DHCPV6_RELAY_FORW + b"\x00" + link_address.packed + IPv6Address(lease.address).packed
            sock.sendto(relayed + _option6(9, release), destination)
            pending += 1
        deadline = time.monotonic() + RELEASE_WAIT
        while pending and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                if sock.recv(1500)[:1] == DHCPV6_RELAY_REPL:
                    pending -= 1
            except TimeoutError:
                break


def _option6(code: int, body: bytes) -> bytes:
    return struct.pack("!HH", code, len(body)) + body


def _release6_packet(xid: bytes, lease: Lease6, server_id: str) -> bytes:
    """Release (RFC 8415 18.2.7): client id (1), server id (2), IA_NA (3) with its IAADDR (5)."""
    address = _option6(5, IPv6Address(lease.address).packed + struct.pack("!II", 0, 0))
    ia_na = _option6(3, struct.pack("!III", int(lease.iaid), 0, 0) + address)
    client, server = (bytes.fromhex(duid.replace(":", "")) for duid in (lease.client_id, server_id))
    return DHCPV6_RELEASE + xid + _option6(1, client) + _option6(2, server) + ia_na


def _check_readable_after_privilege_drop(directory: Path) -> None:
    """dnsmasq re-reads its host files on SIGHUP as an unprivileged user: every parent
    directory must let others through, or names silently vanish after the next reload."""
    for parent in [directory, *directory.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise CheckFailed(
                f"dnsmasq drops privileges and could not read its host files: directory {parent} "
                f"is mode {parent.stat().st_mode & 0o777:o} (needs o+x)"
            )


def _entry_facts(entry: DhcpEntry, setting: tuple) -> tuple:
    """(passes its own checks, mac, (tier, address), name, IPv6 address or None): verify's
    per-VM conditions, for the entry alone (its tier's bounds, the router's name)."""
    bounds, prefixes, router_name = setting
    tier = bounds.get(entry.tier)
    if tier is None:
        return (False, None, None, None, None)
    spans, reserved, _ = tier
    address = int(entry.ip)
    hostname = entry.hostname.lower()
    fine = any(low <= address <= high for low, high in spans) and address not in reserved \
        and hostname != router_name and hostname != DATA_SERVER and not NOT_A_NAME.fullmatch(hostname)  # fmt: skip
    if entry.options:
        fine = fine and not _option_problems("", entry.options) and (
            entry.default_gateway or all(_option_code(o) != ROUTER_OPTION for o in entry.options))
    ipv6 = None
    if entry.ipv6 is not None or entry.duid is not None:
        own = prefixes.get(entry.tier)
        ipv6 = int(entry.ipv6) if entry.ipv6 is not None else None
        fine = fine and own is not None and ipv6 is not None and ipv6 >> 64 == own[0] and ipv6 != own[1]
    return (fine, entry.mac, (entry.tier, address), hostname, ipv6)


def _entry_keys(entry: DhcpEntry, setting: tuple) -> tuple[bool, list]:
    """(passes its own checks, what no other VM may hold: its MAC, address, name, IPv6 address)."""
    fine, *keys = _entry_facts(entry, setting)
    return fine, [(column, key) for column, key in enumerate(keys) if key is not None]


def _ipv6_entry_problems(n: int, entry: DhcpEntry, prefixes: dict, seen: dict) -> list[Problem]:
    """A VM's IPv6 address: inside its tier's /64, not the router's, not another VM's.
    Compared as integers: ipaddress's own comparisons cost 4,000 VMs several milliseconds."""
    path = f"dhcp.entries[{n}]"
    tier = prefixes.get(entry.tier)
    if tier is None:
        return [Problem(f"{path}.ipv6", f"tier {entry.tier} has no IPv6 (ipv6.tiers)")]
    if entry.ipv6 is None:
        return [Problem(f"{path}.duid", "a DUID without an ipv6 address has nothing to hand out")]
    prefix, router, network = tier
    address = int(entry.ipv6)
    if address >> 64 != prefix:  # tiers are /64s (radvd's verify)
        return [Problem(f"{path}.ipv6", f"{entry.ipv6} is outside tier {entry.tier} prefix {network}")]
    if address == router:
        return [Problem(f"{path}.ipv6", f"{entry.ipv6} is the router's own address")]
    first = seen.setdefault(address, n)
    if first != n:
        return [Problem(f"{path}.ipv6", f"{entry.ipv6} is already used by dhcp.entries[{first}]")]
    return []


def _name_shards(runtime: Runtime, entries: list[DhcpEntry], domains: dict[str, str]) -> dict[str, bytes]:
    """The VMs' names, in shard files by a hash of the MAC (stable while the VM exists), each
    shard's lines sorted."""
    compiled = runtime.templates.get_template("dnsmasq/host-name.j2")

    def shard_and_lines(entry: DhcpEntry, domains: dict[str, str]) -> list[tuple[str, str]]:
        shard = f"{NAMES}/{zlib.crc32(entry.mac.encode()) % NAME_SHARDS:03d}"
        return [(shard, compiled.render(**_name_values(entry, domains.get(entry.tier, ""))))]

    shards = runtime.memo.grouped("dnsmasq/names", entries, shard_and_lines, domains)
    return {shard: lines.encode() for shard, lines in shards.items()}


def _router_names(runtime: Runtime, iface: Any, setting: tuple) -> bytes:
    """The router's own name on one guest tier, and data-server, on each of its addresses there
    (dnsmasq answers with the one of the asking guest's subnet: localise-queries); its IPv6
    address too where the tier routes IPv6."""
    name, domains, routed = setting
    return b"".join(runtime.render("dnsmasq/host-name.j2", ip=own.ip, hostname=name, aliases=(DATA_SERVER,),
                                   ipv6=iface.ipv6().ip if iface.id in routed and n == 0 else None,
                                   domain=domains[iface.id]) for n, own in enumerate(iface.ipv4s()))  # fmt: skip


def _drop_in_dir(runtime: Runtime) -> Path:
    return runtime.settings.run_dir / DROP_INS


def _mirror_dir(runtime: Runtime) -> Path:
    return runtime.settings.run_dir / NAME_MIRROR


def _names_delta(change: Change) -> tuple[set[bytes], set[bytes]]:
    """(lines added, lines gone) over the name files a change writes or removes."""
    added: set[bytes] = set()
    gone: set[bytes] = set()
    for relpath in change.paths:
        if relpath.startswith(NAMES_PREFIX):
            old = set((change.previous.get(relpath) or b"").splitlines())
            new = set((change.written.get(relpath) or b"").splitlines())
            added |= new - old
            gone |= old - new
    added.discard(b"")
    gone.discard(b"")
    return added - gone, gone - added  # a line that only moved between shards stays where it is


class _NameMirror:
    """dnsmasq's hostsdir: the rendered names, as few lines re-read per change as can be.
    Each line is in one file: a shard as copied at dnsmasq's start, or a file a change
    added (ADDED + a time). A change writes its added lines as one new file, and rewrites
    each file that held a gone line without it (deleted once empty). What vr last left in
    the directory is known while dnsmasq's PID and the directory's stat are those vr saw
    after its last edit; otherwise (a restart copied the shards again) it is read anew.
    The files a change adds are bounded by the VMs alive: each holds live VMs only."""

    def __init__(self, directory: Path, pid_file: Path) -> None:
        self.directory = directory
        self.pid_file = pid_file
        self.known = _MIRRORS.setdefault(str(directory), {"key": None, "files": {}})

    def update(self, added: set[bytes], gone: set[bytes], names_dir: Path) -> None:
        if self.known["key"] != self._key():
            self.reconcile(names_dir)  # not as vr left it: measured against the names whole
            return
        self._edit(added, gone)

    def reconcile(self, names_dir: Path) -> None:
        wanted = {line for lines in _read_dir(names_dir).values() for line in lines if line}
        self.known["files"] = _read_dir(self.directory)
        held = {line for lines in self.known["files"].values() for line in lines if line}
        self._edit(wanted - held, held - wanted)

    def _edit(self, added: set[bytes], gone: set[bytes]) -> None:
        files: dict[str, frozenset[bytes]] = self.known["files"]
        self.known["key"] = None  # until the edit is done: a failure midway reads the mirror anew
        if gone:
            for name, lines in list(files.items()):
                if lines & gone:
                    kept = lines - gone
                    if kept:
                        self._write(name, kept)
                    else:
                        (self.directory / name).unlink(missing_ok=True)
                        del files[name]
        if added:
            self._write(f"{ADDED}{time.time_ns()}", frozenset(added))
        self.known["key"] = self._key()

    def _write(self, name: str, lines: frozenset[bytes]) -> None:
        _renamed_in(self.directory, name, b"".join(line + b"\n" for line in sorted(lines)))
        self.known["files"][name] = lines

    def _key(self) -> tuple:
        return read_bytes_or_none(self.pid_file), stat_key(self.directory)


_MIRRORS: dict[str, dict] = {}  # mirror directory -> {"key": what it was after vr's last edit, "files": name -> lines}


def _read_dir(directory: Path) -> dict[str, frozenset[bytes]]:
    names = os.listdir(directory) if directory.is_dir() else []
    return {name: frozenset((read_bytes_or_none(directory / name) or b"").splitlines()) for name in names
            if not name.startswith(".")}  # fmt: skip


def _keys(line: bytes) -> list[bytes]:
    """What identifies a dhcp-hosts line to dnsmasq: its MAC or DUID, and its addresses
    ('mac,ip,name,lease', 'mac,ip,[v6],name' or 'id:duid,[v6],name'). A hostname is one
    label and a lease time a number, so the addresses are the fields with a dot or brackets."""
    first, *rest = line.split(b",")
    return [first, *(field for field in rest if field.startswith(b"[") or b"." in field)]


def _drop_in(change: Change, shadowed: list[bytes]) -> bytes | None:
    """The drop-in that brings dnsmasq from the previous dhcp-hosts to the new one, or None
    where only a full re-read is exact."""
    before, after = change.previous.get(HOSTS), change.written.get(HOSTS)
    if before is None or after is None:
        return None
    old, new = _line_set(before), _line_set(after)
    added, gone = sorted(new - old), sorted(old - new)
    if len(shadowed) + len(gone) > MAX_SHADOWED:
        return None
    held = {key for line in [*shadowed, *gone] for key in _keys(line)}
    if any(key in held for line in added for key in _keys(line)):
        return None  # a MAC, DUID or address dnsmasq still holds for a removed VM
    lines = [SHADOWED + line for line in gone] + [_keys(line)[0] + b",ignore" for line in gone] + added
    return b"".join(line + b"\n" for line in lines)


@functools.lru_cache(maxsize=4)  # the hosts file applied now is the one the next change starts from
def _line_set(content: bytes) -> frozenset[bytes]:
    return frozenset(content.splitlines())


def _shadowed(drop_ins: Path) -> list[bytes]:
    """The removed VMs' lines dnsmasq still holds, as the drop-ins recorded them. A drop-in
    is never changed once renamed in (each has a name of its own): each is read once, not
    on every change (a router collects one per VM change until the next full re-read)."""
    names = sorted(os.listdir(drop_ins)) if drop_ins.is_dir() else []
    known = _SHADOWED_BY_FILE.setdefault(str(drop_ins), {})
    for name in known.keys() - set(names):
        del known[name]
    lines = []
    for name in names:
        if name not in known:
            content = read_bytes_or_none(drop_ins / name) or b""
            known[name] = [line.removeprefix(SHADOWED) for line in content.splitlines() if line.startswith(SHADOWED)]
        lines += known[name]
    return lines


_SHADOWED_BY_FILE: dict[str, dict[str, list[bytes]]] = {}  # drop-in directory -> {file name: its shadowed lines}


def _renamed_in(directory: Path, name: str, content: bytes) -> None:
    """A file of a directory dnsmasq watches (inotify), written beside it and renamed in:
    dnsmasq must never read half a file. 0644: it reads it after dropping privileges."""
    directory.mkdir(mode=0o755, exist_ok=True)
    temporary = directory.parent / f".{directory.name}.tmp{os.getpid()}"
    write_new(temporary, content)
    os.replace(temporary, directory / name)


def _empty(drop_ins: Path) -> None:
    for name in os.listdir(drop_ins) if drop_ins.is_dir() else []:
        (drop_ins / name).unlink(missing_ok=True)


def _tagged_values(entry: DhcpEntry, lease_times: dict[str, int]) -> dict | None:
    """A VM with per-VM options (a second NIC without default gateway, extra options) is
    declared in the main config with a tag (see the module's docstring); None for the rest."""
    options = [_option(o) for o in entry.options]
    if not entry.default_gateway:
        # An empty router option: a VM's second NIC must not install a second default route.
        options.insert(0, "option:router")
    if not options:
        return None
    return {**_host_values(entry, lease_times), "tag": "vm" + entry.mac.replace(":", ""), "options": options}


def _host_values(entry: DhcpEntry, lease_times: dict[str, int]) -> dict:
    """A line that carries an IPv6 address carries no lease time: a dhcp-host's lease time
    is both families', and each must be its own tier's (dhcp.tiers, ipv6.tiers), which is
    what dnsmasq takes from the ranges when the line has none."""
    if entry.lease_time is not None:
        lease_time = entry.lease_time  # the VM's own: both families
    else:
        lease_time = None if entry.ipv6 is not None else lease_times.get(entry.tier, DEFAULT_LEASE_TIME)
    return {"mac": entry.mac, "ip": entry.ip, "hostname": entry.hostname, "lease_time": lease_time,
            "ipv6": entry.ipv6, "duid": entry.duid}  # fmt: skip


def _name_values(entry: DhcpEntry, domain: str) -> dict:
    # An AAAA name is written whole (name.domain): dnsmasq 2.90 re-reads a hosts file whose
    # IPv6 lines repeat dhcp-host names about 15 times slower (30-70 ms for 4,000 VMs).
    return {"ip": entry.ip, "hostname": entry.hostname, "aliases": (), "ipv6": entry.ipv6, "domain": domain}


def _dhcpv6_values(tier: Ipv6Tier, iface: Interface, domain: str) -> dict:
    own = iface.ipv6()
    return {
        "id": tier.tier,
        "tag": f"tier6_{tier.tier}",
        "prefix": own.network.network_address,
        "lease_time": tier.lease_time,
        "dns": ",".join(f"[{a}]" for a in tier.dns or [own.ip]),
        "search": ",".join(tier.search or [domain]),
    }


def _tier_values(doc: RouterDocument, tier: DhcpTier, domain: str) -> list[dict]:
    """One dhcp-range per subnet of the tier (CloudStack's ipaliases), each with its own tag
    and options: its gateway (a shared network's, else the router's address there) and the
    router's address there as DNS server. A VM's static address picks its subnet's range.
    An option vr sends itself (OWN_OPTIONS) that the tier names replaces vr's."""
    iface = doc.interface(tier.tier)
    given = {_option_code(o): o for o in tier.options if _option_code(o) in OWN_OPTIONS.values()}
    ranged = _range_subnet(iface, tier.range) if tier.range is not None else None
    values = []
    for n, own in enumerate(iface.ipv4s()):
        subnet = own.network
        start, end = (tier.range.start, tier.range.end) if own == ranged else (subnet.network_address, "static")
        dns_servers = tier.dns_servers or [own.ip]
        defaults = {
            ROUTER_OPTION: f"option:router,{iface.gateway_in(own)}",
            DNS_OPTION: "option:dns-server," + ",".join(str(s) for s in dns_servers),
            DOMAIN_OPTION: f"option:domain-name,{domain}",
        }
        options = [_option(given[code]) if code in given else text for code, text in defaults.items()]
        options += [_option(o) for o in tier.options if _option_code(o) not in OWN_OPTIONS.values()]
        # Sent whether asked or not: busybox udhcpc (CirrOS-style guests) never asks for option 26.
        forced = [_option(given[MTU_OPTION]) if MTU_OPTION in given else f"option:mtu,{iface.mtu}"]
        values.append({
            "id": tier.tier if n == 0 else f"{tier.tier} ({subnet})",
            "tag": f"tier_{tier.tier}" if n == 0 else f"tier_{tier.tier}_{n}",
            "start": start,
            "end": end,
            "netmask": subnet.netmask,
            "lease_time": tier.lease_time,
            "options": options,
            "forced": forced,
        })  # fmt: skip
    return values


def _public_dns(doc: RouterDocument, domains: dict[str, str]) -> dict | None:
    """dns.public: dnsmasq's authoritative mode on the public interface's address, one zone
    per domain holding its tiers' subnets (dnsmasq refuses any other question asked there)."""
    public = doc.public_interface()
    if not doc.dns.public or public is None or public.ipv4() is None:
        return None
    zones: dict[str, list[str]] = {}
    for iface in doc.guest_interfaces():
        zones.setdefault(domains[iface.id], []).extend(str(a.network) for a in iface.ipv4s())
    return {"address": public.ipv4().ip, "server": f"{doc.router.name}.{doc.dns.domain}",
            "zones": [",".join([domain, *subnets]) for domain, subnets in zones.items()]}  # fmt: skip


def _range_subnet(iface: Interface, dhcp_range: DhcpRange) -> IPv4Interface:
    """The router's address in the subnet a tier's dynamic range is in (its first when none)."""
    return next((a for a in iface.ipv4s() if dhcp_range.start in a.network), iface.ipv4())


def _option_code(option: DhcpOption) -> int | str:
    """An option's number where vr knows it (its own options by name), else its name."""
    if option.code is not None:
        return option.code
    return OWN_OPTIONS.get(option.name, option.name)


def _option_problems(path: str, options: list[DhcpOption]) -> list[Problem]:
    """An option given twice (by name or number) would be two conflicting lines."""
    problems, seen = [], {}
    for n, option in enumerate(options):
        first = seen.setdefault(_option_code(option), n)
        if first != n:
            problems.append(Problem(f"{path}[{n}]", f"the same option as {path}[{first}]"))
    return problems


def _option(option: DhcpOption) -> str:
    key = f"option:{option.name}" if option.name else str(option.code)
    return ",".join([key, *option.values])


def _main_hosts(main_file: bytes | None) -> frozenset[bytes]:
    """The VM declarations of the main config (its dhcp-host lines)."""
    return frozenset(line for line in (main_file or b"").splitlines() if line.startswith(b"dhcp-host="))


def _host_lines(lines: set[bytes]) -> dict[str, str]:
    """MAC -> IPv4 of each declaration ('mac,ip,...' or 'dhcp-host=mac,set:tag,ip,...')."""
    result = {}
    for line in lines:
        fields = line.decode().removeprefix("dhcp-host=").split(",")
        if len(fields) > 2 and fields[1].startswith("set:"):
            del fields[1]
        result[fields[0]] = fields[1]
    return result


def _ipv6_owners(lines: set[bytes]) -> dict[str, tuple[str, str]]:
    """IPv6 address -> (MAC or DUID, hostname) of each declaration that carries one
    ('mac,ip,[v6],name', 'id:duid,[v6],name', 'dhcp-host=mac,set:tag,ip,[v6],name,...')."""
    result = {}
    for line in lines:
        fields = line.decode().removeprefix("dhcp-host=").split(",")
        at = next((n for n, field in enumerate(fields) if field.startswith("[")), None)
        if at is not None and at + 1 < len(fields):
            result[fields[at][1:-1]] = (fields[0], fields[at + 1])
    return result


class Lease6(NamedTuple):
    iaid: str
    address: str
    client_id: str


class Leases(NamedTuple):
    v4: frozenset[str]  # MACs
    v6: tuple[Lease6, ...]  # IA_NA leases
    server_id: str | None  # dnsmasq's DUID, which dhcp_release6 must name


def read_leases(lease_file: Path) -> Leases:
    """dnsmasq's lease file: 'expiry mac ip name clid' (IPv4), 'duid DUID' (its own), then
    'expiry iaid ipv6 name clid' (IPv6; a temporary address's IAID starts with T)."""
    return _parsed_leases(_LEASE_TEXT.read(str(lease_file)) or b"")  # none before the first lease


_LEASE_TEXT = LiveContent()  # read again only when dnsmasq rewrote it (4,000 leases: ~3 ms to parse)


@functools.lru_cache(maxsize=1)
def _parsed_leases(content: bytes) -> Leases:
    v4, v6, server_id = set(), [], None
    text = content.decode(errors="replace")
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "duid":
            server_id = fields[1]
        elif len(fields) >= 5 and ":" in fields[2]:
            if fields[1].isdigit():
                v6.append(Lease6(fields[1], fields[2], fields[4]))
        elif len(fields) >= 2:
            v4.add(fields[1])
    return Leases(frozenset(v4), tuple(v6), server_id)  # kept for the next call: never changed


def lease_count(settings: Settings) -> int:
    """Leases dnsmasq holds now, IPv4 and IPv6 (its lease file; 0 before the first)."""
    leases = read_leases(settings.state_dir / LEASE_FILE)
    return len(leases.v4) + len(leases.v6)
