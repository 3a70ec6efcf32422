"""Interfaces, addresses, routes and forwarding, set over netlink with pyroute2.

The generated file is the desired state (network.json); apply reconciles the kernel
with it. Routes vr adds carry their own protocol number, so vr only ever removes
routes it added, never the host's or another tool's.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from collections import Counter
from ipaddress import ip_interface
from pathlib import Path
from typing import Any, Self

from vr.foundation.document import RouterDocument
from vr.foundation.errors import Problem
from vr.services.base import Change, CheckFailed, Service
from vr.services.runtime import Runtime

ROUTE_PROTO_VR = 250  # 'rtprot' number marking routes that belong to vr
STATE_FILE = "network.json"
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv6/conf/all/forwarding": "1",
    "net/ipv6/conf/default/accept_ra": "0",  # the router makes advertisements; it never takes them
    # ARP answers only for an address of the interface asked on, and from the address of the
    # interface it leaves by: a guest gateway never shows up on the public link, nor the reverse.
    "net/ipv4/conf/all/arp_ignore": "1",
    "net/ipv4/conf/all/arp_announce": "2",
}
ETH_P_ARP = 0x0806
MAIN_TABLE = 254
PUBLIC_TABLE_BASE = 100  # another public network's routing table: 100 + its mark (document.public_marks)
RULES_FIRST, RULES_LAST = 5000, 5199  # the policy rules' priorities that are vr's
IFA_F_NODAD = 0x02  # the router's own IPv6 addresses are usable at once (radvd, dnsmasq bind them)


class NetworkService(Service):
    name = "network"

    def read(self, doc: RouterDocument) -> Any:
        return (doc.interfaces, doc.routes, doc.nat.public_ips)

    def verify(self, doc: RouterDocument) -> list[Problem]:
        problems: list[Problem] = []
        for key in ("id", "name", "mac"):
            counts = Counter(getattr(i, key) for i in doc.interfaces if getattr(i, key) is not None)
            for n, iface in enumerate(doc.interfaces):
                value = getattr(iface, key)
                if value is not None and counts[value] > 1:
                    problems.append(Problem(f"interfaces[{n}].{key}", f"{value!r} is used by more than one interface"))
        for role in ("control",):
            indexes = [n for n, i in enumerate(doc.interfaces) if i.role == role]
            for n in indexes[1:]:
                problems.append(Problem(f"interfaces[{n}].role", f"only one {role} interface is allowed"))
        subnets: list[tuple[int, str, Any]] = []  # (interface index, path, subnet)
        addresses: dict[Any, str] = {}
        for n, iface in enumerate(doc.interfaces):
            if iface.role == "guest" and iface.ipv4() is None:
                problems.append(
                    Problem(f"interfaces[{n}].addresses", "a guest tier needs an IPv4 address (its gateway)")
                )
            for m, address in enumerate(iface.addresses):
                path = f"interfaces[{n}].addresses[{m}]"
                network = address.network
                if address.ip == network.network_address and network.prefixlen < network.max_prefixlen - 1:
                    problems.append(Problem(path, f"{address} is the network address of its subnet"))
                if address.ip in addresses:
                    problems.append(Problem(path, f"{address.ip} is already {addresses[address.ip]}"))
                addresses.setdefault(address.ip, path)
                # Several addresses in one subnet on one interface are fine (public IPs); across interfaces, not.
                clash = next((p for i, p, other in subnets if i != n and other.overlaps(network)), None)
                if clash:
                    problems.append(Problem(path, f"subnet {network} overlaps {clash}"))
                subnets.append((n, f"{path} ({network})", network))
        problems += _tier_problems(doc)
        for n, route in enumerate(doc.routes):
            if not any(route.gateway in net for _, _, net in subnets if net.version == route.gateway.version):
                problems.append(Problem(f"routes[{n}].gateway", f"{route.gateway} is not on any connected subnet"))
        return problems

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        return {STATE_FILE: _encode(desired_state(doc))}

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        from pyroute2 import IPRoute

        state = json.loads((staged_dir / STATE_FILE).read_bytes())
        with IPRoute() as ipr:
            names, macs = _links(ipr)
        for iface in state["interfaces"]:
            if _find(iface, names, macs) is None:
                raise CheckFailed(f"interface {iface['id']} ({iface['name'] or iface['mac']}) is not on this router")

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        from pyroute2 import IPRoute

        new = json.loads(change.desired(STATE_FILE) or b'{"interfaces": [], "routes": []}')
        old_raw = change.previous.get(STATE_FILE)
        old = json.loads(old_raw) if old_raw else {"interfaces": [], "routes": []}
        with IPRoute() as ipr, Announcer() as announcer:
            names, macs = _links(ipr)
            ipr.link("set", index=names["lo"], state="up")  # local sockets (DNS to our own address) need it
            kept = {i["id"] for i in new["interfaces"]}
            for iface in old["interfaces"]:
                if iface["id"] not in kept and (index := _find(iface, names, macs)) is not None:
                    _set_addresses(ipr, index, [])
            for iface in new["interfaces"]:
                index = _find(iface, names, macs)
                if index is None:
                    raise RuntimeError(f"interface {iface['id']} disappeared during the apply")
                _ipv6_sysctls(_name_of(ipr, index))  # before the link comes up: its link-local skips DAD too
                ipr.link("set", index=index, mtu=iface["mtu"], state="up")
                added = _set_addresses(ipr, index, iface["addresses"])
                if added and iface.get("role") in ("public", "guest"):
                    link = ipr.get_links(index)[0]
                    announcer.announce(link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS"), added)
            _set_routes(ipr, new["routes"])
            _set_public_tables(ipr, new.get("public_tables", []), names, macs)
        for key, value in SYSCTLS.items():
            Path("/proc/sys", key).write_text(value)

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        for key, value in SYSCTLS.items():
            if Path("/proc/sys", key).read_text().strip() != value:
                return f"sysctl {key} is not {value}"
        return None


def _tier_problems(doc: RouterDocument) -> list[Problem]:
    """A guest tier holds one router address per IPv4 subnet; a shared network's tier names
    the gateway of each of its subnets; a dhcp router routes nothing: only shared tiers,
    no public side."""
    problems: list[Problem] = []
    dhcp_router = doc.router.type == "dhcp"
    for n, iface in enumerate(doc.interfaces):
        path = f"interfaces[{n}]"
        if iface.role == "private_gateway":
            if doc.router.type != "vpc":
                problems.append(Problem(f"{path}.role", "a private gateway belongs to a VPC router (router.type vpc)"))
            if iface.ipv4() is None:
                problems.append(Problem(f"{path}.addresses", "a private gateway needs an IPv4 address"))
        if iface.role == "public" and iface.id in doc.public_marks():
            own = iface.ipv4s()
            if len(iface.gateways) != 1 or not any(iface.gateways[0] in a.network for a in own):
                problems.append(Problem(f"{path}.gateways", "another public network needs its gateway, one address "
                                                            "inside its subnets (its own routing table's default route)"))  # fmt: skip
            continue
        if iface.role != "guest":
            if iface.gateways:
                problems.append(Problem(f"{path}.gateways", "only a guest tier (a shared network) or a public "
                                                            "interface after the first has gateways"))  # fmt: skip
            if dhcp_router and iface.role == "public":
                problems.append(Problem(f"{path}.role", "a dhcp router routes nothing: it has no public interface"))
            continue
        own = iface.ipv4s()
        for m, address in enumerate(own):
            first = next(k for k, other in enumerate(own) if other.network == address.network)
            if first != m:
                problems.append(Problem(f"{path}.addresses[{iface.addresses.index(address)}]",
                                        f"the tier already has an address in {address.network}: one per subnet"))  # fmt: skip
        covered: dict[object, int] = {}
        for m, gateway in enumerate(iface.gateways):
            where = f"{path}.gateways[{m}]"
            subnet = next((a for a in own if gateway in a.network), None)
            if subnet is None:
                problems.append(Problem(where, f"{gateway} is not inside any of the tier's IPv4 subnets"))
            elif gateway in (subnet.network.network_address, subnet.network.broadcast_address):
                problems.append(Problem(where, f"{gateway} is the network or broadcast address of {subnet.network}"))
            elif any(gateway == a.ip for a in own):
                problems.append(Problem(where, f"{gateway} is the router's own address: leave gateways empty"))
            elif subnet.network in covered:
                problems.append(Problem(where, f"{subnet.network} already has a gateway "
                                               f"({path}.gateways[{covered[subnet.network]}])"))  # fmt: skip
            else:
                covered[subnet.network] = m
        if iface.gateways:
            for address in own:
                if address.network not in covered:
                    problems.append(Problem(f"{path}.gateways", f"subnet {address.network} of a shared tier has no gateway"))
        elif dhcp_router:
            problems.append(Problem(f"{path}.gateways", "a dhcp router's tiers are shared networks: "
                                                        "give the gateway of each subnet"))  # fmt: skip
    return problems


def desired_state(doc: RouterDocument) -> dict:
    return {
        "interfaces": [
            {
                "id": i.id,
                "name": i.name,
                "mac": i.mac,
                "mtu": i.mtu,
                "role": i.role,
                "addresses": sorted({str(a) for a in i.addresses} | _public_ip_addresses(doc, i)),
            }
            for i in doc.interfaces
        ],
        "routes": [
            {"destination": str(r.destination), "gateway": str(r.gateway), "metric": r.metric} for r in doc.routes
        ],
        "public_tables": _public_tables(doc),
    }


def _public_tables(doc: RouterDocument) -> list[dict]:
    """Each public interface after the first: its routing table (its subnets, a default route
    by its gateway), the mark that selects it, and its addresses (the router's own traffic
    from them uses it too)."""
    tables = []
    for iface in doc.public_interfaces():
        mark = doc.public_marks().get(iface.id)
        if mark is None or not iface.gateways:
            continue
        sources = {str(a.ip) for a in iface.ipv4s()} | {a.split("/")[0] for a in _public_ip_addresses(doc, iface)}
        tables.append({"id": iface.id, "name": iface.name, "mac": iface.mac, "mark": mark,
                       "table": PUBLIC_TABLE_BASE + mark, "gateway": str(iface.gateways[0]),
                       "subnets": sorted({str(a.network) for a in iface.ipv4s()}), "sources": sorted(sources)})  # fmt: skip
    return tables


def _public_ip_addresses(doc: RouterDocument, iface) -> set[str]:
    """Assigned public IPs live on the public interface, with its subnet's prefix length."""
    if iface.role != "public":
        return set()
    result = set()
    for public_ip in doc.nat.public_ips:
        subnet = next((a.network for a in iface.addresses if public_ip.ip in a.network), None)
        if subnet is not None and not public_ip.reserved:
            result.add(f"{public_ip.ip}/{subnet.prefixlen}")
    return result


def interface_names(doc: RouterDocument) -> dict[str, str]:
    """Interface id -> kernel name; an interface given only by MAC is looked up over netlink."""
    names = {i.id: i.name for i in doc.interfaces if i.name}
    if len(names) < len(doc.interfaces):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            by_mac = {link.get("address"): link.get("ifname") for link in ipr.get_links()}
        names.update({i.id: by_mac.get(i.mac, "") for i in doc.interfaces if not i.name})
    return names


def _encode(state: dict) -> bytes:
    return (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()


def _links(ipr) -> tuple[dict[str, int], dict[str, int]]:
    names, macs = {}, {}
    for link in ipr.get_links():
        names[link.get("ifname")] = link["index"]
        if link.get("address"):
            macs[link.get("address").lower()] = link["index"]
    return names, macs


def _find(iface: dict, names: dict[str, int], macs: dict[str, int]) -> int | None:
    if iface.get("name"):
        return names.get(iface["name"])
    return macs.get(iface["mac"])


def _set_addresses(ipr, index: int, wanted: list[str]) -> list:
    """Make the interface's addresses exactly `wanted` (IPv6 link-local ones are the kernel's);
    the addresses it added."""
    current = set()
    for msg in ipr.get_addr(index=index):
        address = ip_interface(f"{msg.get('address')}/{msg['prefixlen']}")
        if not (address.version == 6 and address.ip.is_link_local):
            current.add(address)
    want = {ip_interface(a) for a in wanted}
    from pyroute2.netlink.exceptions import NetlinkError

    for address in current - want:
        try:
            ipr.addr("del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        except NetlinkError as error:
            # Deleting a subnet's primary address makes the kernel drop its secondaries too.
            if error.code != errno.EADDRNOTAVAIL:
                raise
    added = sorted(want - current, key=str)
    for address in added:
        flags = {"flags": IFA_F_NODAD} if address.version == 6 else {}
        ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen, **flags)
    return added


class Announcer:
    """Tell each link that its new addresses are at this MAC (a public IP added, a router
    replaced): a gratuitous ARP request and reply per IPv4 address, an unsolicited neighbour
    advertisement (router, override) per IPv6 one. One packet socket and one ICMPv6 socket for
    the whole apply, neither bound to a protocol: a packet socket that listens costs the kernel
    a network-wide synchronisation to close (about 15 ms each, 250 ms on a cold apply of ten
    links). Best effort: a link that takes nothing (down, no carrier) only loses the
    announcement, never the apply."""

    def __init__(self) -> None:
        self._arp: socket.socket | None = None
        self._nd: socket.socket | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        for sock in (self._arp, self._nd):
            if sock is not None:
                sock.close()

    def announce(self, ifname: str, mac: str, addresses: list) -> None:
        own = bytes.fromhex(mac.replace(":", ""))
        try:
            for address in (a for a in addresses if a.version == 4):
                if self._arp is None:
                    self._arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # sends, never listens
                ip = address.ip.packed
                for operation in (1, 2):  # request and reply: switches and hosts honour one or the other
                    target_mac = b"\0" * 6 if operation == 1 else own
                    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, operation) + own + ip + target_mac + ip
                    frame = b"\xff" * 6 + own + struct.pack("!H", ETH_P_ARP) + arp
                    self._arp.sendto(frame, (ifname, ETH_P_ARP))
            index = None
            for address in (a for a in addresses if a.version == 6):
                if self._nd is None:
                    self._nd = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                    self._nd.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                index = index or socket.if_nametoindex(ifname)
                # type 136, code 0, checksum (the kernel's), flags R|O, target, target link-layer option
                advert = struct.pack("!BBHI", 136, 0, 0, 0xA0000000) + address.ip.packed + b"\x02\x01" + own
                self._nd.sendto(advert, ("ff02::1", 0, 0, index))
        except OSError:
            pass


def _ipv6_sysctls(ifname: str) -> None:
    """The router never takes advertisements, and its addresses (the link-local one that
    radvd speaks from included) are usable at once instead of after a second of DAD."""
    conf = Path("/proc/sys/net/ipv6/conf", ifname)
    if conf.is_dir():
        (conf / "accept_ra").write_text("0")
        (conf / "accept_dad").write_text("0")


def _name_of(ipr, index: int) -> str:
    return ipr.get_links(index)[0].get("ifname")


def _set_public_tables(ipr, tables: list[dict], names: dict, macs: dict) -> None:
    """Policy routing for several public networks: the main table first for everything but
    its default route, then each other public network's table by its mark (connections it
    carries) and by its addresses (the router's own traffic from them). Only what differs
    from the kernel's is changed, and only rules and routes that are vr's."""
    wanted_rules = {(RULES_FIRST, MAIN_TABLE, 0, None, 0)} if tables else set()
    wanted_routes = set()
    for table in tables:
        index = _find(table, names, macs)
        if index is None:
            continue
        wanted_rules.add((RULES_FIRST + table["mark"], table["table"], table["mark"], None, None))
        wanted_rules |= {(RULES_FIRST + 100 + table["mark"], table["table"], 0, source, None) for source in table["sources"]}
        wanted_routes |= {(table["table"], subnet, None, index) for subnet in table["subnets"]}
        wanted_routes.add((table["table"], "0.0.0.0/0", table["gateway"], index))
    current_rules = {}
    for rule in ipr.get_rules(family=socket.AF_INET):
        priority = rule.get_attr("FRA_PRIORITY") or 0
        if RULES_FIRST <= priority <= RULES_LAST:
            source = rule.get_attr("FRA_SRC")
            key = (priority, rule.get_attr("FRA_TABLE") or rule["table"], rule.get_attr("FRA_FWMARK") or 0,
                   source, rule.get_attr("FRA_SUPPRESS_PREFIXLEN") if priority == RULES_FIRST else None)  # fmt: skip
            current_rules[key] = rule
    for priority, table, mark, source, suppress in current_rules.keys() - wanted_rules:
        ipr.rule("del", priority=priority, table=table, **({"fwmark": mark} if mark else {}),
                 **({"src": source, "src_len": 32} if source else {}))  # fmt: skip
    for priority, table, mark, source, suppress in sorted(wanted_rules - current_rules.keys(), key=str):
        extra = {"suppress_prefixlen": suppress} if suppress is not None else {}
        ipr.rule("add", priority=priority, table=table, **({"fwmark": mark} if mark else {}),
                 **({"src": source, "src_len": 32} if source else {}), **extra)  # fmt: skip
    current_routes = set()
    for msg in ipr.get_routes(family=socket.AF_INET, proto=ROUTE_PROTO_VR):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if PUBLIC_TABLE_BASE < table < PUBLIC_TABLE_BASE + 64:
            current_routes.add((table, f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}",
                                msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_OIF")))  # fmt: skip
    for table, dst, gateway, oif in current_routes - wanted_routes:
        ipr.route("del", table=table, dst=dst, proto=ROUTE_PROTO_VR, **({"gateway": gateway} if gateway else {}))
    for table, dst, gateway, oif in sorted(wanted_routes - current_routes, key=lambda r: (r[0], r[2] is not None)):
        ipr.route("replace", table=table, dst=dst, oif=oif, proto=ROUTE_PROTO_VR,
                  **({"gateway": gateway} if gateway else {"scope": 253}))  # fmt: skip


def _set_routes(ipr, wanted: list[dict]) -> None:
    def key(dst: str, gateway: str, metric: int) -> tuple[str, str, int]:
        return (dst, gateway, metric)

    current = {}
    for msg in ipr.get_routes(proto=ROUTE_PROTO_VR, table=MAIN_TABLE):
        dst = f"{msg.get('dst') or ('::' if msg['family'] == 10 else '0.0.0.0')}/{msg['dst_len']}"
        current[key(str(ip_interface(dst).network), msg.get("gateway"), msg.get("priority") or 0)] = msg
    want = {key(r["destination"], r["gateway"], r["metric"]): r for r in wanted}
    for k in current.keys() - want.keys():
        ipr.route("del", dst=k[0], gateway=k[1], priority=k[2], proto=ROUTE_PROTO_VR)
    for k in sorted(want.keys() - current.keys()):
        ipr.route("add", dst=k[0], gateway=k[1], priority=k[2], proto=ROUTE_PROTO_VR)
