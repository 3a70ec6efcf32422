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

import ctypes
import functools
import itertools
import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from vr.document import AclRule, EgressRule, IngressRule, LbRule, PortForward, RouterDocument
from vr.errors import Problem
from vr.memo import Memo
from vr.runtime import Runtime
from vr.services.base import Change, CheckFailed, Service, repeats
from vr.services.network import interface_names

RULESET = "vr.nft"
ELEMENT_BATCH_LIMIT = 500  # elements added + removed, above which the table is replaced whole
TABLE = "inet vr"


class NftablesService(Service):
    name = "nftables"

    def read(self, doc: RouterDocument) -> Any:
        return (doc.router, doc.interfaces, doc.nat, doc.firewall, doc.network_acls, doc.load_balancer)

    def configured(self, doc: RouterDocument) -> bool:
        return doc.public_interface() is not None

    def __init__(self) -> None:
        # Per-rule results and overlap-free groups of the last verify: merge keeps every
        # unchanged rule object, so a one-rule change re-checks one rule and one group.
        self._memo = Memo()
        self._clean_groups: dict[str, dict[tuple, tuple]] = {}
        self._scope: _Scope | None = None

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
        scope = self._intern(_Scope(frozenset(assigned), tuple(tiers.values()), frozenset(
            s.public_ip for s in doc.nat.static_nat
        )))  # fmt: skip

        source_nat_ips = set()
        for n, item in enumerate(doc.nat.source_nat):
            if item.tier not in tiers:
                problems.append(Problem(f"nat.source_nat[{n}].tier", f"{item.tier!r} is not a guest tier"))
            problems += _found(f"nat.source_nat[{n}]", scope.need_assigned("ip", item.ip))
            source_nat_ips.add(item.ip)
        for n, item in enumerate(doc.nat.static_nat):
            path = f"nat.static_nat[{n}]"
            problems += _found(path, scope.need_assigned("public_ip", item.public_ip))
            problems += _found(path, scope.need_guest("private_ip", item.private_ip))
            if item.public_ip in source_nat_ips:
                problems.append(Problem(f"{path}.public_ip", f"{item.public_ip} is a source NAT IP"))
        for key in ("public_ip", "private_ip"):
            for n, _ in repeats(getattr(item, key) for item in doc.nat.static_nat):
                value = getattr(doc.nat.static_nat[n], key)
                problems.append(Problem(f"nat.static_nat[{n}].{key}", f"{value} already has a static NAT"))
        problems += self._check_rules("nat.port_forwarding", doc.nat.port_forwarding, _forward_facts, scope)
        problems += self._check_rules("firewall.ingress", doc.firewall.ingress, _ingress_facts, scope)
        for e, egress in enumerate(doc.firewall.egress):
            problems += self._check_rules(f"firewall.egress[{e}].rules", egress.rules, _egress_facts, scope)
        problems += self._check_rules("load_balancer.rules", doc.load_balancer.rules, _lb_facts, scope)
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

    def _intern(self, scope: _Scope) -> _Scope:
        """The same scope object while public IPs, tiers and static NAT stay the same, so
        per-rule results keyed by it stay valid."""
        if self._scope is None or self._scope.values() != scope.values():
            self._scope = scope
        return self._scope

    def _check_rules(self, section: str, rules: list, facts_of: Any, scope: _Scope) -> list[Problem]:
        """One pass over a rule list: each rule's own problems (memoized per rule), repeated
        ids, and overlaps. Overlapping elements (same group, overlapping ports and networks)
        would make the kernel refuse the whole set; CloudStack refuses such rules too. Only
        groups whose elements changed since the last clean verify are swept again."""
        problems: list[Problem] = []
        groups: dict[tuple, list[tuple[int, tuple]]] = {}
        first_of: dict[str, int] = {}
        facts = self._memo.map(section, ((r, scope) for r in rules), facts_of)
        for n, (rule, (found, rule_id, spans)) in enumerate(zip(rules, facts, strict=True)):
            if found:
                problems += _found(f"{section}[{n}]", found)
            if rule_id is not None and first_of.setdefault(rule_id, n) != n:
                problems.append(Problem(f"{section}[{n}].id", f"{rule_id!r} is already {section}[{first_of[rule_id]}]"))
            for span in spans:
                groups.setdefault(span[0], []).append((n, span))
        clean_before, clean_now = self._clean_groups.get(section, {}), {}
        for group, members in groups.items():
            signature = tuple(span for _, span in members)  # the spans are memoized: compared by identity
            if clean_before.get(group) != signature:
                found = _sweep(members, section + "[{}]" + (".public_ports" if group[1] == "forward" else ""))
                if found:
                    problems += found
                    continue
            clean_now[group] = signature
        self._clean_groups[section] = clean_now
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
                lb=_lb_elements(doc.load_balancer.rules),
                tiers=tiers,
            )
        }

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        """libnftables' dry run of the new table: its chains, rules and sets, the sets
        declared but not filled. Elements are built by vr from validated values and verify
        has refused overlaps; loading 10,000 of them twice (here and in apply) would double
        a full apply. An element-only change is not dry-run at all: a dry run costs the
        kernel's abort path (8-16 ms) and the element batch is atomic anyway. Should the
        kernel refuse anything in apply, nothing of the batch is applied and the pipeline
        rolls back."""
        staged = staged_dir / RULESET
        if not staged.exists() or _element_delta(change) is not None:
            return
        rc, error = _nft(_without_elements(staged.read_text()), dry_run=True)
        if rc != 0:
            raise CheckFailed(f"nftables refused the ruleset: {error.strip()}")

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        ruleset = change.desired(RULESET)
        if ruleset is None:
            batch = f"table {TABLE} {{}}\ndelete table {TABLE}\n"
        else:
            # Only elements changed: touch only them. Otherwise (and to restore a table deleted
            # by hand) replace the whole table; both are one transaction and end identical.
            delta = _element_delta(change)
            batch = delta if delta is not None else ruleset.decode()
        rc, error = _nft(batch)
        if rc != 0:
            raise RuntimeError(f"nftables refused the ruleset: {error.strip()}")

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
    if change.restore or not old or not new or RULESET not in change.written or not _table_present():
        return None
    return _delta_between(old, new)


@functools.lru_cache(maxsize=2)  # check and apply ask for the same pair
def _delta_between(old: bytes, new: bytes) -> str | None:
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


_ELEMENTS = re.compile(r" elements = \{ .* \};(?= \}$)", re.MULTILINE)


def _without_elements(ruleset: str) -> str:
    return _ELEMENTS.sub("", ruleset)


def _table_present() -> bool:
    # One small set that every vr table defines: listing tables, chains or the table itself
    # makes libnftables fetch every element (tens of ms with 10k rules); this does not.
    return _nft(f"list set {TABLE} public_ips")[0] == 0


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


def _lb_elements(rules: list[LbRule]) -> dict[str, list[str]]:
    """The load balancers' listening ports, open on their public IPs (to their sources only)."""
    exact = [f"{r.public_ip} . {r.public_port}" for r in rules if not r.source_cidrs]
    by_source = [f"{net} . {r.public_ip} . {r.public_port}" for r in rules for net in r.source_cidrs]
    return {"exact": exact, "from": by_source}


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


@dataclass(frozen=True, eq=False)  # hashed by identity: a memo key costs nothing to hash
class _Scope:
    """What a single rule is checked against."""

    assigned: frozenset[IPv4Address]
    tier_subnets: tuple[IPv4Network, ...]
    static_public: frozenset[IPv4Address]

    def values(self) -> tuple:
        return (self.assigned, self.tier_subnets, self.static_public)

    def need_assigned(self, field: str, ip: IPv4Address) -> list[tuple[str, str]]:
        if ip in self.assigned:
            return []
        return [(field, f"{ip} is not an assigned public IP of this router (nat.public_ips)")]

    def need_guest(self, field: str, ip: IPv4Address) -> list[tuple[str, str]]:
        if any(ip in subnet for subnet in self.tier_subnets):
            return []
        return [(field, f"{ip} is not inside any guest tier")]


def _found(path: str, found: list[tuple[str, str]]) -> list[Problem]:
    return [Problem(f"{path}.{field}" if field else path, message) for field, message in found]


# Facts of one rule, memoized: (its own problems as (field, message), its id, its spans).
# A span is (group, low port, high port, network as an integer range, network).


def _forward_facts(rule: PortForward, scope: _Scope) -> tuple[list, str, list[tuple]]:
    found = scope.need_assigned("public_ip", rule.public_ip) + scope.need_guest("private_ip", rule.private_ip)
    if rule.public_ip in scope.static_public:
        found.append(("public_ip", f"{rule.public_ip} is taken whole by a static NAT"))
    ordered = sorted(rule.source_cidrs, key=lambda net: (int(net.network_address), -net.prefixlen))
    for earlier, later in itertools.pairwise(ordered):
        if later.overlaps(earlier):
            found.append(("", f"overlaps itself (sources, {later} and {earlier})"))
    # One public IP, protocol and port leads to one place, whatever the sources.
    group = (int(rule.public_ip), "forward", rule.protocol)
    return found, rule.id, [(group, rule.public_ports.start, rule.public_ports.end, _ALL, None)]


def _ingress_facts(rule: IngressRule, scope: _Scope) -> tuple[list, str, list[tuple]]:
    group = (int(rule.public_ip), rule.protocol)
    return scope.need_assigned("public_ip", rule.public_ip), rule.id, _spans(group, rule, rule.source_cidrs)


def _egress_facts(rule: EgressRule, _: _Scope) -> tuple[list, None, list[tuple]]:
    return [], None, _spans((0, rule.protocol), rule, rule.destination_cidrs)


def _lb_facts(rule: LbRule, _: _Scope) -> tuple[list, None, list[tuple]]:
    """A load balancer's sources must not overlap (its other checks are haproxy's verify)."""
    group = (int(rule.public_ip), "lb", "tcp")
    return [], None, [(group, rule.public_port, rule.public_port, net.bounds, net) for net in rule.source_cidrs]


_ALL = (0, 2**32 - 1)


def _spans(group: tuple, rule: IngressRule | EgressRule, networks: list[IPv4Network]) -> list[tuple]:
    """One span per network; ports, or the ICMP type as a one-value range (-1..256: all)."""
    if rule.ports is not None:
        low, high = rule.ports.start, rule.ports.end
    elif rule.icmp_type is not None:
        low = high = rule.icmp_type
    else:
        low, high = -1, 256
    return [(group, low, high, net.bounds, net) for net in networks]


def _sweep(members: list[tuple[int, tuple]], path: str) -> list[Problem]:
    """Overlaps within one group, swept by port start so that disjoint rules cost no
    pairwise comparison. The rule later in the document (the one just added) is named."""
    members.sort(key=lambda m: m[1][1])
    problems: list[Problem] = []
    reported: set[int] = set()
    active: list[tuple[int, tuple]] = []
    for n, span in members:
        group, low, _, (net_low, net_high), network = span
        protocol = group[-1]
        active = [a for a in active if a[1][2] >= low]
        for m, other in active:
            if net_low <= other[3][1] and other[3][0] <= net_high:
                mine, theirs = (n, network), (m, other[4])
                (later, later_net), (earlier, earlier_net) = (mine, theirs) if n >= m else (theirs, mine)
                if later not in reported:
                    where = "itself" if later == earlier else path.format(earlier)
                    what = f"{protocol}, {later_net} and {earlier_net}" if later_net else f"{protocol} ports"
                    problems.append(Problem(path.format(later), f"overlaps {where} ({what})"))
                    reported.add(later)
        active.append((n, span))
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


def _nft(commands: str, dry_run: bool = False) -> tuple[int, str]:
    """One libnftables call, in this process: the whole batch is one kernel transaction
    (a dry run sends it and aborts it). Returns (rc, error text)."""
    # A context's netlink socket stays in the namespace it was opened in.
    context = _context(dry_run, os.stat("/proc/self/ns/net").st_ino)
    rc, _, error = context.cmd(commands)
    return rc, error


@functools.cache
def _context(dry_run: bool, _namespace: int) -> Any:
    import nftables

    context = nftables.Nftables()
    if dry_run:  # pip-nftables 1.0.2 has no set_dry_run; libnftables has had it since 0.9.1
        library = ctypes.CDLL("libnftables.so.1")
        library.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        library.nft_ctx_set_dry_run(context._Nftables__ctx, True)
    return context
