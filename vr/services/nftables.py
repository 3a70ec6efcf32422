"""nftables: the router's one ruleset (table inet vr), changed only in whole transactions.

Matching is by sets and maps, so a lookup costs the same with ten rules or ten thousand:
hash maps for exact keys (public IP . port), concatenated interval sets only where a rule
has source CIDRs or port ranges. A change that only adds or removes a few elements is one
add/delete element batch; anything else creates, deletes and redefines the table in one
batch. Either way it is one kernel transaction: at no instant is the router without
rules, and conntrack is never flushed (established flows through a removed port forward
keep going; new ones are refused).

Ingress filtering runs in prerouting before DNAT (priority mangle), where the public IP
a packet was sent to is still visible: one gate covers the router itself, port forwards
and static NAT.
"""

from __future__ import annotations

import re
import subprocess
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from vr.document import AclRule, EgressRule, IngressRule, PortForward, RouterDocument
from vr.errors import Problem
from vr.runtime import Runtime
from vr.services.base import Change, CheckFailed, Service, repeats
from vr.services.network import interface_names

RULESET = "vr.nft"
ELEMENT_BATCH_LIMIT = 500  # elements added + removed, above which the table is replaced whole
TABLE = "inet vr"


class NftablesService(Service):
    name = "nftables"

    def read(self, doc: RouterDocument) -> Any:
        return (doc.router, doc.interfaces, doc.nat, doc.firewall, doc.network_acls)

    def configured(self, doc: RouterDocument) -> bool:
        return doc.public_interface() is not None

    def verify(self, doc: RouterDocument) -> list[Problem]:
        problems: list[Problem] = []
        public = doc.public_interface()
        public_subnets = [a.network for a in public.addresses if a.version == 4] if public else []
        tiers = {i.id: i.ipv4().network for i in doc.guest_interfaces()}
        assigned: set[IPv4Address] = set()
        for n, item in enumerate(doc.nat.public_ips):
            if not any(item.ip in subnet for subnet in public_subnets):
                problems.append(
                    Problem(f"nat.public_ips[{n}].ip", f"{item.ip} is not inside the public interface's subnets")
                )
            if not item.reserved:
                assigned.add(item.ip)
        for n, _ in repeats(p.ip for p in doc.nat.public_ips):
            problems.append(Problem(f"nat.public_ips[{n}].ip", f"{doc.nat.public_ips[n].ip} is listed twice"))

        def need_assigned(path: str, ip: IPv4Address) -> None:
            if ip not in assigned:
                problems.append(Problem(path, f"{ip} is not an assigned public IP of this router (nat.public_ips)"))

        def need_guest(path: str, ip: IPv4Address) -> None:
            if not any(ip in subnet for subnet in tiers.values()):
                problems.append(Problem(path, f"{ip} is not inside any guest tier"))

        source_nat_ips = set()
        for n, item in enumerate(doc.nat.source_nat):
            if item.tier not in tiers:
                problems.append(Problem(f"nat.source_nat[{n}].tier", f"{item.tier!r} is not a guest tier"))
            need_assigned(f"nat.source_nat[{n}].ip", item.ip)
            source_nat_ips.add(item.ip)
        static_public = {item.public_ip for item in doc.nat.static_nat}
        for n, item in enumerate(doc.nat.static_nat):
            path = f"nat.static_nat[{n}]"
            need_assigned(f"{path}.public_ip", item.public_ip)
            need_guest(f"{path}.private_ip", item.private_ip)
            if item.public_ip in source_nat_ips:
                problems.append(Problem(f"{path}.public_ip", f"{item.public_ip} is a source NAT IP"))
        for key in ("public_ip", "private_ip"):
            for n, _ in repeats(getattr(item, key) for item in doc.nat.static_nat):
                value = getattr(doc.nat.static_nat[n], key)
                problems.append(Problem(f"nat.static_nat[{n}].{key}", f"{value} already has a static NAT"))
        for n, rule in enumerate(doc.nat.port_forwarding):
            path = f"nat.port_forwarding[{n}]"
            need_assigned(f"{path}.public_ip", rule.public_ip)
            need_guest(f"{path}.private_ip", rule.private_ip)
            if rule.public_ip in static_public:
                problems.append(Problem(f"{path}.public_ip", f"{rule.public_ip} is taken whole by a static NAT"))
        problems += _conflicts(  # one public IP, protocol and port leads to one place
            (r.public_ip, r.protocol, None, r.public_ports.start, r.public_ports.end,
             ("nat.port_forwarding[{}].public_ports", n))
            for n, r in enumerate(doc.nat.port_forwarding)
        )  # fmt: skip
        for section, rules in (
            ("nat.port_forwarding", doc.nat.port_forwarding),
            ("firewall.ingress", doc.firewall.ingress),
        ):
            for n, first in repeats(rule.id for rule in rules):
                problems.append(Problem(f"{section}[{n}].id", f"{rules[n].id!r} is already {section}[{first}]"))
        for n, rule in enumerate(doc.firewall.ingress):
            need_assigned(f"firewall.ingress[{n}].public_ip", rule.public_ip)
        problems += _conflicts(
            (r.public_ip, r.protocol, source, *_span(r), ("firewall.ingress[{}]", n))
            for n, r in enumerate(doc.firewall.ingress)
            for source in r.source_cidrs
        )
        problems += _conflicts(
            (n, "sources", source, 0, 0, ("nat.port_forwarding[{}]", n))
            for n, r in enumerate(doc.nat.port_forwarding)
            for source in r.source_cidrs
        )
        for e, egress in enumerate(doc.firewall.egress):
            problems += _conflicts(
                (egress.tier, r.protocol, destination, *_span(r), (f"firewall.egress[{e}].rules[{{}}]", n))
                for n, r in enumerate(egress.rules)
                for destination in r.destination_cidrs
            )
        for n, egress in enumerate(doc.firewall.egress):
            if egress.tier not in tiers:
                problems.append(Problem(f"firewall.egress[{n}].tier", f"{egress.tier!r} is not a guest tier"))
        for n, _ in repeats(e.tier for e in doc.firewall.egress):
            tier = doc.firewall.egress[n].tier
            problems.append(Problem(f"firewall.egress[{n}].tier", f"tier {tier!r} is listed twice"))
        if doc.network_acls and doc.router.type != "vpc":
            problems.append(Problem("network_acls", "network ACLs apply to VPC routers (router.type is isolated)"))
        for n, _ in repeats(acl.tier for acl in doc.network_acls):
            problems.append(Problem(f"network_acls[{n}].tier", f"tier {doc.network_acls[n].tier!r} has two ACLs"))
        for n, acl in enumerate(doc.network_acls):
            if acl.tier not in tiers:
                problems.append(Problem(f"network_acls[{n}].tier", f"{acl.tier!r} is not a guest tier"))
            for direction in ("ingress", "egress"):
                rules = getattr(acl, direction)
                for m, first in repeats(rule.number for rule in rules):
                    problems.append(
                        Problem(
                            f"network_acls[{n}].{direction}[{m}].number",
                            f"{rules[m].number} is already used by network_acls[{n}].{direction}[{first}]",
                        )
                    )
        return problems

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        public = doc.public_interface()
        if public is None:
            return {}
        names = interface_names(doc)
        nat, firewall = doc.nat, doc.firewall
        # Exact keys (no source restriction, one port) go in hash maps and sets: the kernel
        # loads those in linear time. Only the rest needs concatenated interval sets.
        pf: dict[str, list[str]] = {"tcp": [], "udp": [], "tcp_from": [], "udp_from": []}
        for elements in runtime.memoized("nftables.pf", ((r, None) for r in nat.port_forwarding), _forward_elements):
            for kind, element in elements:
                pf[kind].append(element)
        ingress: dict[str, list[str]] = {
            k: [] for k in ("tcp", "udp", "all", "tcp_from", "udp_from", "all_from", "icmp", "icmp_typed")
        }
        for elements in runtime.memoized("nftables.in", ((r, None) for r in firewall.ingress), _ingress_elements):
            for kind, element in elements:
                ingress[kind].append(element)
        tier_subnets = {i.id: i.ipv4().network for i in doc.guest_interfaces()}
        egress_by_tier = {e.tier: e for e in firewall.egress}
        acl_by_tier = {a.tier: a for a in doc.network_acls}
        tiers = []
        for iface in doc.guest_interfaces():
            policy = egress_by_tier.get(iface.id)
            rules = policy.rules if policy else []
            default = policy.default if policy else "allow"
            sets: dict[str, list[str]] = {"tcp": [], "udp": [], "icmp": [], "icmp_typed": [], "all": []}
            for rule in rules:
                for destination in rule.destination_cidrs:
                    sets[_kind(rule)].append(_element(str(destination), rule))
            acl = acl_by_tier.get(iface.id)
            tiers.append(
                {
                    "chain": iface.id.replace("-", "_"),
                    "ifname": names[iface.id],
                    "default": "accept" if default == "allow" else "drop",
                    "exception": "drop" if default == "allow" else "accept",
                    "sets": sets,
                    "acl": acl is not None,
                    # ACL verdicts: leaving a tier, 'allow' returns so the entered tier's ACL decides too.
                    "acl_out": _acl_rules(acl.egress, "daddr", "return") if acl else [],
                    "acl_out_default": ("return" if acl.egress_default == "allow" else "drop") if acl else "return",
                    "acl_in": _acl_rules(acl.ingress, "saddr", "accept") if acl else [],
                    "acl_in_default": ("accept" if acl.ingress_default == "allow" else "drop") if acl else "accept",
                }
            )
        return {
            RULESET: runtime.render(
                "nftables/vr.nft.j2",
                router=doc.router.name,
                public_if=names[public.id],
                public_ips=sorted(p.ip for p in nat.public_ips if not p.reserved),
                pf=pf,
                static_in=[f"{s.public_ip} : {s.private_ip}" for s in nat.static_nat],
                static_out=[f"{s.private_ip} : {s.public_ip}" for s in nat.static_nat],
                source_nat=[f"{tier_subnets[s.tier]} : {s.ip}" for s in nat.source_nat if s.tier in tier_subnets],
                ingress=ingress,
                tiers=tiers,
            )
        }

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        if not (staged_dir / RULESET).exists():
            return
        batch = staged_dir / RULESET
        delta = _element_delta(change)
        if delta is not None:  # check what will run: the element batch, against the live table
            batch = staged_dir / "delta.nft"
            batch.write_text(delta)
        result = subprocess.run(
            ["nft", "-c", "-f", str(batch)], check=False, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise CheckFailed("nft -c: " + result.stderr.strip().replace(str(staged_dir) + "/", ""))

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        ruleset = change.desired(RULESET)
        if ruleset is None:
            _nft(f"table {TABLE} {{}}\ndelete table {TABLE}\n")
            return
        delta = _element_delta(change)
        # Only elements changed: touch only them. Otherwise (and to restore a table deleted
        # by hand) replace the whole table; both are one transaction and end identical.
        _nft(delta if delta is not None else ruleset.decode())

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        if doc.public_interface() is None:
            return None
        return None if _table_present() else f"table {TABLE} is missing"


_SET_LINE = re.compile(r"  (?:set|map) (\w+) \{ (.*?;)(?: elements = \{ (.*) \};)? \}")


def _split(ruleset: str) -> tuple[str, dict[str, list[str]]]:
    """Our own rendering -> (the ruleset without element lists, set name -> elements)."""
    skeleton, elements = [], {}
    for line in ruleset.splitlines():
        match = _SET_LINE.fullmatch(line)
        if match:
            name, definition, items = match.groups()
            elements[name] = items.split(", ") if items else []
            line = f"  set-or-map {name} {{ {definition} }}"
        skeleton.append(line)
    return "\n".join(skeleton), elements


def _element_delta(change: Change) -> str | None:
    """The add/delete element batch turning the live ruleset into the new one, when only
    elements differ and the live table is there to receive it; None means replace it all."""
    old, new = change.previous.get(RULESET), change.desired(RULESET)
    if not old or not new or RULESET not in change.written or not _table_present():
        return None
    old_skeleton, old_elements = _split(old.decode())
    new_skeleton, new_elements = _split(new.decode())
    if old_skeleton != new_skeleton:
        return None
    commands, moved = [], 0
    for name, wanted in new_elements.items():
        before, after = set(old_elements[name]), set(wanted)
        gone = sorted(e.split(" : ")[0] for e in before - after)
        moved += len(gone) + len(after - before)
        if gone:
            commands.append(f"delete element {TABLE} {name} {{ {', '.join(gone)} }}")
        added = sorted(after - before)
        if added:
            commands.append(f"add element {TABLE} {name} {{ {', '.join(added)} }}")
    # Mass changes are cheaper as a fresh table: deleting elements one by one from the
    # concatenated interval sets costs far more than loading them anew.
    return "\n".join(commands) + "\n" if moved <= ELEMENT_BATCH_LIMIT else None


def _table_present() -> bool:
    import nftables

    # One small set that every vr table defines: listing tables, chains or the table itself
    # makes libnftables fetch every element (tens of ms with 10k rules); this does not.
    return nftables.Nftables().cmd(f"list set {TABLE} public_ips")[0] == 0


def rule_counters() -> list[dict]:
    """Every commented rule of vr's table with its packet and byte counters."""
    import json

    import nftables

    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, output, error = nft.cmd(f"list table {TABLE}")
    if rc != 0:
        raise RuntimeError(f"cannot list table {TABLE}: {error.strip()}")
    result = []
    for item in json.loads(output)["nftables"]:
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        counter = next((e["counter"] for e in rule["expr"] if "counter" in e), {"packets": 0, "bytes": 0})
        result.append({"chain": rule["chain"], "rule": rule["comment"], **counter})
    return result


def _acl_rules(rules: list[AclRule], address: str, allow: str) -> list[dict]:
    """Numbered ACL entries in order: first match wins, so these stay ordered rules."""
    result = []
    for rule in sorted(rules, key=lambda r: r.number):
        match = [f"ip {address} {{ {', '.join(str(c) for c in rule.cidrs)} }}"]
        if isinstance(rule.protocol, int):
            match.append(f"meta l4proto {rule.protocol}")
        elif rule.protocol != "all":
            match.append(f"meta l4proto {rule.protocol}")
            if rule.ports is not None:
                ports = rule.ports
                span = str(ports.start) if ports.size == 1 else f"{ports.start}-{ports.end}"
                match.append(f"{rule.protocol} dport {span}")
            if rule.icmp_type is not None:
                match.append(f"icmp type {rule.icmp_type}")
        result.append(
            {"number": rule.number, "match": " ".join(match), "verdict": allow if rule.action == "allow" else "drop"}
        )
    return result


def _forward_elements(rule: PortForward, _: None) -> list[tuple[str, str]]:
    """(map, element) pairs of one port forward. Exact keys (no source restriction) go in
    hash maps, which the kernel loads in linear time; the rest in interval maps."""
    result = []
    for offset in range(rule.public_ports.size):
        target = f"{rule.private_ip} . {rule.private_ports.start + offset}"
        port = rule.public_ports.start + offset
        if not rule.source_cidrs:
            result.append((rule.protocol, f"{rule.public_ip} . {port} : {target}"))
        for source in rule.source_cidrs:
            result.append((f"{rule.protocol}_from", f"{source} . {rule.public_ip} . {port} : {target}"))
    return result


def _ingress_elements(rule: IngressRule, _: None) -> list[tuple[str, str]]:
    """(set, element) pairs of one ingress rule: from anywhere to one port is an exact key."""
    result = []
    kind = _kind(rule)
    for source in rule.source_cidrs:
        exact = source.prefixlen == 0 and kind in ("tcp", "udp", "all") and (kind == "all" or rule.ports.size == 1)
        if exact:
            result.append((kind, _element(str(rule.public_ip), rule)))
        else:
            result.append(
                (kind if kind.startswith("icmp") else f"{kind}_from", _element(f"{source} . {rule.public_ip}", rule))
            )
    return result


def _span(rule: Any) -> tuple[int, int]:
    """The ports (or ICMP type) a rule covers, as an inclusive range; -1..256 means all."""
    if rule.ports is not None:
        return rule.ports.start, rule.ports.end
    if rule.icmp_type is not None:
        return rule.icmp_type, rule.icmp_type
    return -1, 256


def _conflicts(items: Any) -> list[Problem]:
    """Rules whose elements overlap (same group, overlapping ports and networks) would make
    the kernel refuse the whole set; CloudStack refuses such conflicting rules too.
    Sweep by port start per group, so disjoint rules cost no pairwise comparison."""
    by_group: dict[tuple, list[tuple]] = {}
    for order, (group, protocol, network, low, high, path) in enumerate(items):
        # Networks as integer ranges (None: all addresses), compared without ipaddress objects.
        span = (0, 2**32) if network is None else (int(network.network_address), int(network.broadcast_address))
        by_group.setdefault((group, protocol), []).append((low, high, span, path, order, network))
    problems: list[Problem] = []
    reported: set[tuple[str, int]] = set()
    for (_, protocol), elements in by_group.items():
        elements.sort(key=lambda e: e[0])
        active: list[tuple] = []
        for element in elements:
            low, _, (net_low, net_high), _, _, _ = element
            active = [a for a in active if a[1] >= low]
            for other in active:
                if net_low <= other[2][1] and other[2][0] <= net_high:
                    # Name the rule that comes later in the document: the one just added.
                    later, earlier = (element, other) if element[4] > other[4] else (other, element)
                    if later[3] not in reported:
                        # Paths are (format, index) pairs, formatted only for the rare conflict.
                        where = "itself" if later[3] == earlier[3] else earlier[3][0].format(earlier[3][1])
                        what = f"{protocol}, {later[5]} and {earlier[5]}" if later[5] else f"{protocol} ports"
                        problems.append(Problem(later[3][0].format(later[3][1]), f"overlaps {where} ({what})"))
                        reported.add(later[3])
            active.append(element)
    return problems


def _kind(rule: EgressRule | Any) -> str:
    if rule.protocol == "icmp" and rule.icmp_type is not None:
        return "icmp_typed"
    return rule.protocol


def _element(prefix: str, rule: Any) -> str:
    if rule.protocol in ("tcp", "udp"):
        ports = rule.ports
        return f"{prefix} . {ports.start}" if ports.size == 1 else f"{prefix} . {ports.start}-{ports.end}"
    if rule.protocol == "icmp" and rule.icmp_type is not None:
        return f"{prefix} . {rule.icmp_type}"
    return prefix


def _nft(commands: str) -> None:
    """One libnftables call: the whole batch is one kernel transaction."""
    import nftables

    rc, _, error = nftables.Nftables().cmd(commands)
    if rc != 0:
        raise RuntimeError(f"nftables refused the ruleset: {error.strip()}")
