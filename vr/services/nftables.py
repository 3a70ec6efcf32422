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
and static NAT. The router's own addresses have an input policy by interface role (drop
what is not opened, silently): every router has the table, public interface or not.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import itertools
import json
import os
import re
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from itertools import filterfalse
from pathlib import Path
from typing import Any

from vr.foundation.document import AclRule, EgressRule, IngressRule, LbRule, PortForward, RouterDocument
from vr.foundation.errors import Problem
from vr.foundation.files import read_bytes_or_none, write_new
from vr.services.base import Change, CheckFailed, Service, repeats
from vr.services.guestdata import DATA_PORT, PASSWORD_PORT
from vr.services.network import interface_names
from vr.services.probes import ProbeSpec
from vr.services.runtime import Runtime

RULESET = "vr.nft"
# The per-VM sets' elements (anti-spoofing: one element per VM), kept apart from the ruleset:
# a one-VM change renders and compares this file alone, never the 10,000-rule table.
VM_ELEMENTS = "vms.nft"
# Each set's VMs in lines by a hash of the MAC ("spoof4/17"): a one-VM change compares and
# splits one line of about 60 elements, not 4,000.
VM_SHARDS = 64
ARP_TABLE = "arp vr"  # its sets' names start with arp_
ELEMENT_BATCH_LIMIT = 500  # elements added + removed, above which the table is replaced whole
TABLE = "inet vr"

# What the router itself answers, by interface role, on that interface's own addresses
# (the public side answers only what the document opens on its public IPs: see the
# public_local chain). One place for each list: the sets are rendered from them.
LOCAL_PORTS: dict[str, dict[str, tuple[int, ...]]] = {
    # DNS, DHCP (unicast renewals; broadcasts have their own rule), DHCPv6 (unicast; multicast too).
    "guest": {"tcp": (53,), "udp": (53, 67), "tcp6": (53,), "udp6": (53, 547)},
    # CloudStack's management SSH; the agent's port (the document's agent.port) joins it when served.
    "control": {"tcp": (3922,), "udp": (), "tcp6": (3922,), "udp6": ()},
}
# The guest data service (vr/services/guestdata.py: data, passwords) on each tier's own IPv4 addresses.
METADATA_PORTS: tuple[int, ...] = (DATA_PORT, PASSWORD_PORT)


class NftablesService(Service):
    name = "nftables"

    def read(self, doc: RouterDocument) -> Any:
        return (self._table_facts(doc), doc.dhcp.entries)

    def _table_facts(self, doc: RouterDocument) -> tuple:
        """What the table (vr.nft) is made from: all of read() but the VMs, whose anti-spoofing
        elements alone (vms.nft) a one-VM change renders."""
        vpn = self._vpn_facts(doc.vpn)
        ipv6 = (tuple(t.tier for t in doc.ipv6.tiers), doc.ipv6.firewall)
        agent = doc.agent.port if doc.agent.served() else None
        ranges = tuple((t.tier, t.range) for t in doc.dhcp.tiers)
        spoofing = (tuple(i.id for i in doc.spoof_checked_tiers()), _dhcpv6_tiers(doc), ranges)
        return (doc.router, doc.interfaces, doc.nat, doc.firewall, doc.network_acls, doc.load_balancer, vpn, ipv6,
                agent, doc.dns.public, spoofing)  # fmt: skip

    def __init__(self) -> None:
        # What the last verify found, per rule list: merge keeps every unchanged rule
        # object, so a one-rule change re-checks one rule and the group it falls in.
        self._indexes: dict[str, _RuleIndex] = {}
        self._scope: _Scope | None = None
        self._vpn_seen: list[tuple[Any, tuple]] = []
        # The last table facts verified (with their problems) and rendered (with the ruleset):
        # a change of VMs alone keeps them, compared by identity first (merge keeps each object).
        self._verified: tuple[tuple, list[Problem]] | None = None
        self._rendered: tuple[tuple, dict[str, str], bytes] | None = None
        self._tiers_with_vms: tuple[list, set[str]] = ([], set())  # the last dhcp.entries, and their tiers

    def verify(self, doc: RouterDocument) -> list[Problem]:
        facts = self._table_facts(doc)
        if self._verified is None or self._verified[0] != facts:
            self._verified = (facts, self._verify_table(doc))
        return [*self._verified[1], *self._unknown_tiers(doc)]

    def _unknown_tiers(self, doc: RouterDocument) -> list[Problem]:
        """A warning: an anti-spoofing tier without a VM the document knows (no DHCP entry, no
        dynamic range) drops whatever its guests send."""
        if self._tiers_with_vms[0] is not doc.dhcp.entries:
            self._tiers_with_vms = (doc.dhcp.entries, {e.tier for e in doc.dhcp.entries})
        known = self._tiers_with_vms[1] | {t.tier for t in doc.dhcp.tiers if t.range is not None}
        unknown = {i.id for i in doc.spoof_checked_tiers()} - known
        return [Problem(f"interfaces[{n}].anti_spoofing", f"tier {i.id} has no DHCP entry or range: anti-spoofing "
                        "drops everything its guests send (false, for guests the router does not know)", warning=True)
                for n, i in enumerate(doc.interfaces) if i.id in unknown]  # fmt: skip

    def _verify_table(self, doc: RouterDocument) -> list[Problem]:
        problems: list[Problem] = []
        public_subnets = [a.network for i in doc.public_interfaces() for a in i.ipv4s()]
        tiers = {i.id: i for i in doc.routed_tiers()}  # a shared network's tier is not the router's to NAT or filter
        private = {i.id for i in doc.private_gateways()}  # filtered like a tier (its ACL), never a NAT target
        shared = {i.id for i in doc.guest_interfaces() if i.shared()}

        def not_routed(path: str, tier: str) -> list[Problem]:
            if tier in tiers:
                return []
            if tier in shared:
                return [Problem(path, f"{tier!r} is a shared network's tier: the router is not its gateway")]
            return [Problem(path, f"{tier!r} is not a guest tier")]

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
        subnets = tuple(a.network for i in tiers.values() for a in i.ipv4s())
        scope = self._intern(_Scope(frozenset(assigned), subnets, frozenset(
            s.public_ip for s in doc.nat.static_nat
        )))  # fmt: skip

        source_nat_ips = set()
        for n, item in enumerate(doc.nat.source_nat):
            problems += not_routed(f"nat.source_nat[{n}].tier", item.tier)
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
            problems += not_routed(f"firewall.egress[{n}].tier", egress.tier)
        for n, _ in repeats(e.tier for e in doc.firewall.egress):
            tier = doc.firewall.egress[n].tier
            problems.append(Problem(f"firewall.egress[{n}].tier", f"tier {tier!r} is listed twice"))
        problems += _ipv6_problems(doc)
        if doc.network_acls and doc.router.type != "vpc":
            problems.append(Problem("network_acls", "network ACLs apply to VPC routers (router.type is isolated)"))
        for n, _ in repeats(acl.tier for acl in doc.network_acls):
            problems.append(Problem(f"network_acls[{n}].tier", f"tier {doc.network_acls[n].tier!r} has two ACLs"))
        for n, acl in enumerate(doc.network_acls):
            if acl.tier not in private:
                problems += not_routed(f"network_acls[{n}].tier", acl.tier)
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

    def _vpn_facts(self, vpn: Any) -> tuple:
        """The tunnels' gateways and far networks, sorted, kept per section object: every
        transaction reads them for both documents, and merge keeps an unchanged section's."""
        for known, facts in self._vpn_seen:
            if known is vpn:
                return facts
        facts = (vpn.gateways(), vpn.remote_networks())
        self._vpn_seen = [(vpn, facts), *self._vpn_seen[:1]]  # the stored document's and the new one's
        return facts

    def _intern(self, scope: _Scope) -> _Scope:
        """The same scope object while public IPs, tiers and static NAT stay the same, so
        per-rule results keyed by it stay valid."""
        if self._scope is None or self._scope.values() != scope.values():
            self._scope = scope
        return self._scope

    def _check_rules(self, section: str, rules: list, facts_of: Any, scope: _Scope) -> list[Problem]:
        index = self._indexes.get(section)
        if index is None:
            index = self._indexes[section] = _RuleIndex(section, facts_of)
        return index.check(rules, scope)

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        names = interface_names(doc)
        facts = self._table_facts(doc)
        if self._rendered is not None and self._rendered[0] == facts and self._rendered[1] == names:
            ruleset = self._rendered[2]
        else:
            ruleset = self._ruleset(doc, names, runtime)
            self._rendered = (facts, names, ruleset)
        checked = doc.spoof_checked_tiers()
        setting = (tuple((i.id, names.get(i.id)) for i in checked), _dhcpv6_tiers(doc))
        elements = runtime.memo.grouped("nftables.vms", doc.dhcp.entries, _vm_elements, setting, separator=", ")
        vms = "".join(f"{shard} {elements[shard]}\n" for shard in sorted(elements))
        return {RULESET: ruleset, VM_ELEMENTS: vms.encode()}

    def _ruleset(self, doc: RouterDocument, names: dict[str, str], runtime: Runtime) -> bytes:
        public = doc.public_interface()
        nat = doc.nat
        # Elements by set name. Exact keys (no source restriction, one port) go in hash maps
        # and sets, which the kernel loads in linear time; only the rest needs interval sets.
        sets: dict[str, list[str]] = {name: [] for name in _SETS}
        # The rules' elements, each set's sorted and joined (only the sets a change touches
        # are joined again), then listed as one item per rule list.
        for slot, rules, elements_of in (("nftables.pf", nat.port_forwarding, _forward_elements),
                                         ("nftables.in", doc.firewall.ingress, _ingress_elements)):  # fmt: skip
            for name, joined in runtime.memo.grouped(slot, rules, elements_of, separator=", ").items():
                sets[name].append(joined)
        sets["public_ips"] = sorted(str(p.ip) for p in nat.public_ips if not p.reserved)
        sets["static_in"] = [f"{s.public_ip} : {s.private_ip}" for s in nat.static_nat]
        sets["static_out"] = [f"{s.private_ip} : {s.public_ip}" for s in nat.static_nat]
        tier_subnets = {i.id: [a.network for a in i.ipv4s()] for i in doc.routed_tiers()}
        sets["source_nat"] = [f"{subnet} : {s.ip}" for s in nat.source_nat for subnet in tier_subnets.get(s.tier, ())]
        sets["lb"] = [f"{r.public_ip} . {r.public_port}" for r in doc.load_balancer.rules if not r.source_cidrs]
        sets["lb_from"] = [f"{net} . {r.public_ip} . {r.public_port}" for r in doc.load_balancer.rules
                           for net in r.source_cidrs]  # fmt: skip
        for kind in ("all", "tcp", "udp", "icmp", "icmp_typed"):
            sets[f"in6_{kind}"] = []
        for rule in doc.ipv6.firewall.ingress:
            for source in rule.source_cidrs:
                sets[f"in6_{_kind(rule)}"].append(_element(f"{source} . {rule.destination}", rule))
        egress6_by_tier = {e.tier: e for e in doc.ipv6.firewall.egress}
        sets["vpn_gateways"] = [str(ip) for ip in doc.vpn.gateways()]
        sets["vpn_remote"] = [str(net) for net in doc.vpn.remote_networks()]
        sets.update(_local_elements(doc, names))
        egress_by_tier = {e.tier: e for e in doc.firewall.egress}
        compiled = runtime.memoized("nftables.acl", doc.network_acls, _acl_blocks)
        acl_by_tier = {acl.tier: (acl, blocks) for acl, blocks in zip(doc.network_acls, compiled, strict=True)}
        tiers = []
        sets["shared_ifs"] = [f'"{names[i.id]}"' for i in doc.guest_interfaces() if i.shared() and names.get(i.id)]
        sets["routed_ifs"] = [f'"{names[i.id]}"' for i in doc.routed_tiers() if names.get(i.id)]
        sets.update(_public_elements(doc, names))
        usage = _usage_counters(doc, names)
        for direction in ("in", "out"):
            sets[f"usage_ip_{direction}"] = [f'{ip} : "{name}"' for (kind, ip, way), name in usage.items()
                                            if kind == "ip" and way == direction]  # fmt: skip
            sets[f"usage_tier_{direction}"] = [f'"{names[tier]}" : "{name}"' for (kind, tier, way), name in usage.items()
                                              if kind == "tier" and way == direction]  # fmt: skip
        checked = doc.spoof_checked_tiers()
        sets["spoof_ifs"] = [f'"{names[i.id]}"' for i in checked if names.get(i.id)]
        dhcpv6 = set(_dhcpv6_tiers(doc))
        sets["spoof6_ifs"] = [f'"{names[i.id]}"' for i in checked if names.get(i.id) and i.id in dhcpv6]
        ranges = {t.tier: t.range for t in doc.dhcp.tiers if t.range is not None}
        sets["spoof_mac_ifs"] = [f'"{names[i.id]}"' for i in checked if names.get(i.id) and i.id not in ranges]
        sets["spoof_ranges"] = [f'"{names[i.id]}" . {ranges[i.id].start}-{ranges[i.id].end}' for i in checked
                                if names.get(i.id) and i.id in ranges]  # fmt: skip
        sets["private_nat_ifs"] = [f'"{names[i.id]}"' for i in doc.private_gateways() if i.source_nat and names.get(i.id)]
        for iface in [*doc.routed_tiers(), *doc.private_gateways()]:
            chain = iface.id.replace("-", "_")
            policy = egress_by_tier.get(iface.id)
            default = policy.default if policy else "allow"
            policy6 = egress6_by_tier.get(iface.id)
            default6 = policy6.default if policy6 else "allow"
            for kind in ("all", "tcp", "udp", "icmp", "icmp_typed"):
                sets[f"egress_{chain}_{kind}"] = []
                sets[f"egress6_{chain}_{kind}"] = []
            for rule in policy.rules if policy else []:
                for source in rule.source_cidrs or _ANYWHERE:  # leaving the tier: from it, whatever the source
                    for destination in rule.destination_cidrs:
                        sets[f"egress_{chain}_{_kind(rule)}"].append(_element(f"{source} . {destination}", rule))
            for rule in policy6.rules if policy6 else []:
                for destination in rule.destination_cidrs:
                    sets[f"egress6_{chain}_{_kind(rule)}"].append(_element(str(destination), rule))
            acl, acl_blocks = acl_by_tier.get(iface.id, (None, {}))
            blocks = {"out": [], "in": [], "out6": [], "in6": []}
            for direction, in_order in acl_blocks.items():
                for n, block in enumerate(in_order):
                    name = f"acl_{direction}_{chain}_{n}"
                    blocks[direction].append({"name": name, "first": block.first, "last": block.last})
                    for shape, elements in block.items():
                        sets[f"{name}_{shape}"] = elements
            tiers.append(
                {
                    "chain": chain,
                    "ifname": names[iface.id],
                    "default": "accept" if default == "allow" else "drop",
                    "exception": "drop" if default == "allow" else "accept",
                    "default6": "accept" if default6 == "allow" else "drop",
                    "exception6": "drop" if default6 == "allow" else "accept",
                    "acl": acl is not None,
                    "private": iface.role == "private_gateway",
                    # ACL verdicts: leaving a tier, 'allow' returns so the entered tier's ACL decides too.
                    "acl_out": blocks["out"],
                    "acl_out_default": ("return" if acl.egress_default == "allow" else "drop") if acl else "return",
                    "acl_in": blocks["in"],
                    "acl_out6": blocks["out6"],
                    "acl_in6": blocks["in6"],
                    "acl_in_default": ("accept" if acl.ingress_default == "allow" else "drop") if acl else "accept",
                }
            )
        # Each set's elements joined here, in one C call: the template's join filter over
        # 10,000 elements cost a one-rule change several milliseconds.
        listed = {name: f" elements = {{ {', '.join(elements)} }};" if elements else "" for name, elements in sets.items()}
        ruleset = runtime.render(
            "nftables/vr.nft.j2", router=doc.router.name, public_if=names[public.id] if public else None, tiers=tiers,
            sets=listed, usage_counters=sorted(usage.values()), several_public=bool(doc.public_marks()),
            shared_tiers=bool(sets["shared_ifs"]),
        )  # fmt: skip
        return ruleset

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
            batch = "".join(f"table {table} {{}}\ndelete table {table}\n" for table in (TABLE, ARP_TABLE))
        else:
            # Only elements changed: touch only them. Otherwise, or when the live table is not
            # the one vr left (deleted or edited by hand: the batch is refused whole), replace
            # the whole table, the VMs' elements with it; both are one transaction and end identical.
            delta = _element_delta(change)
            if delta is not None and (not delta or _nft(delta)[0] == 0):
                return
            batch = _with_usage(ruleset.decode(), _usage_now(runtime.settings))
            batch += _vm_element_adds(change.desired(VM_ELEMENTS))
        rc, error = _nft(batch)
        if rc != 0:
            raise RuntimeError(f"nftables refused the ruleset: {error.strip()}")

    def probe_spec(self, doc: RouterDocument, runtime: Runtime) -> ProbeSpec | None:
        return {"program": None, "check": "nft_table", "args": {"table": TABLE}}


def _local_elements(doc: RouterDocument, names: dict[str, str]) -> dict[str, list[str]]:
    """The input policy's elements: each guest and control interface . its own address . the
    ports its role answers (LOCAL_PORTS); the guest interfaces (DHCP broadcasts, RS) and
    their IPv4 addresses (DNS for tunnelled clients); every interface of a role (what is
    not one is charon's TUN device)."""
    sets: dict[str, list[str]] = {"local_tcp": [], "local_udp": [], "local6_tcp": [], "local6_udp": [],
                                  "guest_ifs": [], "role_ifs": [], "guest_ips": [], "control_ifs": []}  # fmt: skip
    for iface in doc.interfaces:
        name = names.get(iface.id)
        if not name:  # not found: the network check refuses the apply
            continue
        sets["role_ifs"].append(f'"{name}"')
        if iface.role == "control":
            sets["control_ifs"].append(f'"{name}"')
        ports = LOCAL_PORTS.get(iface.role)
        if ports is None:  # public: what the document opens on its public IPs (public_local); private: nothing
            if iface.role == "public" and doc.dns.public and iface.ipv4() is not None:  # and DNS when asked
                for protocol in ("tcp", "udp"):
                    sets[f"local_{protocol}"].append(f'"{name}" . {iface.ipv4().ip} . 53')
            continue
        if iface.role == "control" and doc.agent.served():
            ports = {**ports, "tcp": ports["tcp"] + (doc.agent.port,), "tcp6": ports["tcp6"] + (doc.agent.port,)}
        if iface.role == "guest":
            sets["guest_ifs"].append(f'"{name}"')
            sets["guest_ips"] += [str(a.ip) for a in iface.addresses if a.version == 4]
            ports = {**ports, "tcp": ports["tcp"] + METADATA_PORTS}
        for address in iface.addresses:
            family = "6" if address.version == 6 else ""
            for protocol in ("tcp", "udp"):
                sets[f"local{family}_{protocol}"] += [f'"{name}" . {address.ip} . {port}'
                                                      for port in ports[protocol + family]]  # fmt: skip
    stats = doc.load_balancer.stats  # haproxy's statistics page: on the interface of its address only
    owner = doc.interface_holding(stats.address) if stats else None
    if owner is not None and names.get(owner.id):
        sets["local_tcp"].append(f'"{names[owner.id]}" . {stats.address} . {stats.port}')
    return sets


def _split(ruleset: str) -> tuple[str, dict[str, str]]:
    """Our own rendering -> (the ruleset without element lists, set name -> its elements as
    listed: "A, B"). Listed, not split: a change compares each set's text and splits only
    the sets that differ (splitting all 10,000 elements cost 4 ms a change)."""
    skeleton, elements = [], {}
    for line in ruleset.split("\n"):
        if line.startswith(("  set ", "  map ")):  # "  set NAME { DEFINITION;[ elements = { A, B };] }"
            head, listed, items = line.partition(" elements = { ")
            elements[head.split(" ", 4)[3]] = items.removesuffix(" }; }") if listed else ""
            line = "  set-or-map" + (head + " }" if listed else line)[5:]
        skeleton.append(line)
    return "\n".join(skeleton), elements


# The sets every table has (the egress sets are per tier); see configs/nftables/vr.nft.j2.
_SETS = ("public_ips", "pf_tcp", "pf_udp", "pf_tcp_from", "pf_udp_from", "static_in", "static_out", "source_nat",
         "in_all", "in_tcp", "in_udp", "in_all_from", "in_tcp_from", "in_udp_from", "in_icmp", "in_icmp_typed",
         "lb", "lb_from", "vpn_gateways", "vpn_remote", "in6_all", "in6_tcp", "in6_udp", "in6_icmp", "in6_icmp_typed",
         "local_tcp", "local_udp", "local6_tcp", "local6_udp", "guest_ifs", "role_ifs", "guest_ips",
         "control_ifs", "shared_ifs", "routed_ifs", "private_nat_ifs", "public_ifs", "public_marks", "static_marks",
         "source_nat_marks", "usage_ip_in", "usage_ip_out", "usage_tier_in",
         "usage_tier_out", "spoof_ifs", "spoof_mac_ifs", "spoof6_ifs", "spoof_ranges")  # fmt: skip


def _element_delta(change: Change) -> str | None:
    """The add/delete element batch turning the live ruleset into the new one, when only
    elements differ; None means replace it all. Whether the live table is still the one
    vr loaded is not asked (a libnftables call each in check and apply): the kernel
    refuses a batch whose table or elements are not there, and apply replaces it all then."""
    new = change.desired(RULESET)
    old = change.previous.get(RULESET) if change.touches(RULESET) else new  # untouched: live as generated
    if change.restore or not old or not new or not change.touches(RULESET, VM_ELEMENTS):  # nothing: a forced load
        return None
    deltas = []
    if change.touches(RULESET):
        deltas.append(_delta_between(old, new))
    if change.touches(VM_ELEMENTS):
        deltas.append(_vm_delta(change.previous.get(VM_ELEMENTS) or b"", change.desired(VM_ELEMENTS) or b""))
    return None if None in deltas else "".join(deltas)


def loadable(ruleset: bytes, vm_elements: bytes | None) -> str:
    """The table and the VMs' elements as one batch (what the monitor loads to repair drift)."""
    return ruleset.decode() + _vm_element_adds(vm_elements)


def _vm_lines(listed: bytes) -> dict[str, str]:
    """vms.nft -> {"spoof4/17": "A, B", ...}."""
    return dict(line.split(" ", 1) for line in listed.decode().splitlines() if " " in line)


def _vm_element_adds(listed: bytes | None) -> str:
    """The VMs' elements, added to the table just loaded (in the same transaction)."""
    sets: dict[str, list[str]] = {}
    for shard, items in _vm_lines(listed or b"").items():
        sets.setdefault(shard.split("/")[0], []).append(items)
    return "".join(f"add element {_table_of(name)} {name} {{ {', '.join(parts)} }}\n" for name, parts in sets.items())


@functools.lru_cache(maxsize=2)  # check and apply ask for the same pair
def _vm_delta(old: bytes, new: bytes) -> str | None:
    """The element batch from one vms.nft to another: only the lines that differ are split."""
    old_lines, new_lines = set(old.splitlines()), set(new.splitlines())  # bytes compared whole, nothing decoded
    before, after = _vm_lines(b"\n".join(old_lines - new_lines)), _vm_lines(b"\n".join(new_lines - old_lines))
    gone: dict[str, list[str]] = {}
    added: dict[str, list[str]] = {}
    for shard in before.keys() | after.keys():
        was, now = _elements(before.get(shard, "")), _elements(after.get(shard, ""))
        name = shard.split("/")[0]
        gone.setdefault(name, []).extend(sorted(was - now))
        added.setdefault(name, []).extend(sorted(now - was))
    if sum(map(len, gone.values())) + sum(map(len, added.values())) > ELEMENT_BATCH_LIMIT:
        return None
    commands = [f"delete element {_table_of(name)} {name} {{ {', '.join(items)} }}" for name, items in gone.items() if items]
    commands += [f"add element {_table_of(name)} {name} {{ {', '.join(items)} }}" for name, items in added.items() if items]
    return "\n".join(commands) + "\n" if commands else ""


def _table_of(name: str) -> str:
    return ARP_TABLE if name.startswith("arp_") else TABLE


def _vm_elements(entry: Any, setting: tuple) -> list[tuple[str, str]]:
    """A VM of an anti-spoofing tier: its address and MAC, IPv4 and (where the router gives
    IPv6 addresses) IPv6; its MAC alone for the rest of its IPv6 (link-local, SLAAC)."""
    checked, dhcpv6 = setting
    ifname = next((name for tier, name in checked if tier == entry.tier), None)
    if not ifname:
        return []
    shard = zlib.crc32(entry.mac.encode()) % VM_SHARDS
    address, mac = f'"{ifname}" . {entry.ip} . {entry.mac}', f'"{ifname}" . {entry.mac}'
    found = [("spoof4", address), ("spoof_macs", mac), ("arp_spoof4", address), ("arp_spoof_macs", mac)]
    if entry.ipv6 is not None and entry.tier in dhcpv6:
        found.append(("spoof6", f'"{ifname}" . {entry.ipv6} . {entry.mac}'))
    return [(f"{name}/{shard:02d}", element) for name, element in found]


def _dhcpv6_tiers(doc: RouterDocument) -> tuple[str, ...]:
    """The tiers whose VMs' IPv6 addresses the router gives (DHCPv6), each VM its entry's."""
    return tuple(t.tier for t in doc.ipv6.tiers if t.mode == "dhcpv6")


@functools.lru_cache(maxsize=3)  # the ruleset being applied is the live one of the next change
def _parts(ruleset: bytes) -> tuple[str, dict[str, str]]:
    return _split(ruleset.decode())


@functools.lru_cache(maxsize=2)  # check and apply ask for the same pair
def _delta_between(old: bytes, new: bytes) -> str | None:
    old_skeleton, old_elements = _parts(old)
    new_skeleton, new_elements = _parts(new)
    if old_skeleton != new_skeleton:
        return None
    commands, moved = [], 0
    for name, wanted in new_elements.items():
        if old_elements[name] == wanted:
            continue
        before, after = _elements(old_elements[name]), _elements(wanted)
        gone = sorted(e.split(" : ")[0] for e in before - after)
        moved += len(gone) + len(after - before)
        if gone:
            commands.append(f"delete element {_table_of(name)} {name} {{ {', '.join(gone)} }}")
        added = sorted(after - before)
        if added:
            commands.append(f"add element {_table_of(name)} {name} {{ {', '.join(added)} }}")
    # Mass changes are cheaper as a fresh table: deleting elements one by one from the
    # concatenated interval sets costs far more than loading them anew.
    return "\n".join(commands) + "\n" if moved <= ELEMENT_BATCH_LIMIT else None


@functools.lru_cache(maxsize=8)  # the VMs' sets come in twins (inet and arp): the second is split once
def _elements(listed: str) -> frozenset[str]:
    return frozenset(listed.split(", ")) if listed else frozenset()


_ELEMENTS = re.compile(r" elements = \{ .* \};(?= \}$)", re.MULTILINE)


def _without_elements(ruleset: str) -> str:
    return _ELEMENTS.sub("", ruleset)


def _public_elements(doc: RouterDocument, names: dict[str, str]) -> dict[str, list[str]]:
    """The public interfaces, and the marks that route a connection by the public network it
    belongs to: the one it came in by, or the one its static or source NAT IP is on."""
    marks = doc.public_marks()
    mark_of_ip = {}
    for public_ip in doc.nat.public_ips:
        owner = doc.public_interface_of(public_ip.ip)
        if owner is not None and owner.id in marks:
            mark_of_ip[public_ip.ip] = marks[owner.id]
    tiers = {i.id: i for i in doc.routed_tiers()}
    snat = [f"{a.network} : {mark_of_ip[s.ip]}" for s in doc.nat.source_nat if s.ip in mark_of_ip and s.tier in tiers
            for a in tiers[s.tier].ipv4s()]  # fmt: skip
    return {
        "public_ifs": [f'"{names[i.id]}"' for i in doc.public_interfaces() if names.get(i.id)],
        "public_marks": [f'"{names[i]}" : {mark}' for i, mark in marks.items() if names.get(i)],
        "static_marks": [f"{s.private_ip} : {mark_of_ip[s.public_ip]}" for s in doc.nat.static_nat
                         if s.public_ip in mark_of_ip],
        "source_nat_marks": snat,
    }  # fmt: skip


def _usage_counters(doc: RouterDocument, names: dict[str, str]) -> dict[tuple[str, str, str], str]:
    """(kind, public IP or tier id, direction) -> the named counter: each assigned public IP
    and each routed tier, in and out."""
    counters = {}
    for direction in ("in", "out"):
        for public_ip in doc.nat.public_ips:
            if not public_ip.reserved:
                counters[("ip", str(public_ip.ip), direction)] = f"usage_ip_{int(public_ip.ip):08x}_{direction}"
        for iface in doc.routed_tiers():
            if names.get(iface.id):
                counters[("tier", iface.id, direction)] = f"usage_tier_{iface.id.replace('-', '_')}_{direction}"
    return counters


USAGE_FILE = "usage.json"  # in the state dir: the counters as `vr stop` left them (a reboot empties the kernel's)
_USAGE_LINE = re.compile(r"^  counter (usage_\w+) \{ packets 0 bytes 0 \}$", re.MULTILINE)


def _usage_now(settings: Any) -> dict[str, tuple[int, int]]:
    """The usage counters' values: the live table's, or, when there is none (after a reboot),
    what `vr stop` saved."""
    live = _read_usage()
    if live:
        return live
    saved = read_bytes_or_none(settings.state_dir / USAGE_FILE)
    try:
        values = json.loads(saved) if saved else {}
        return {name: (int(p), int(b)) for name, (p, b) in values.items() if str(name).startswith("usage_")}
    except (ValueError, TypeError):
        return {}  # a damaged file: counting starts again, the apply goes on


def _with_usage(ruleset: str, values: dict[str, tuple[int, int]]) -> str:
    """The ruleset with each usage counter declared at the value it holds now: the replace
    and the restore are one transaction."""
    if not values:
        return ruleset

    def restored(match: re.Match) -> str:
        packets, size = values.get(match.group(1), (0, 0))
        return f"  counter {match.group(1)} {{ packets {packets} bytes {size} }}"

    return _USAGE_LINE.sub(restored, ruleset)


def _read_usage() -> dict[str, tuple[int, int]] | None:
    """name -> (packets, bytes) of the live table's usage counters; None without the table.
    One netlink dump of the table's counter objects (NFT_MSG_GETOBJ): libnftables' `list
    counters` first fetches every set's elements, ~140 ms with 10,000 rules, paid by each
    whole-table replace."""
    request = struct.pack("=BBH", _NFPROTO_INET, 0, 0)  # nfgenmsg: family, version 0, res_id
    request += _nla(_NFTA_OBJ_TABLE, b"vr\0") + _nla(_NFTA_OBJ_TYPE, struct.pack("!I", _NFT_OBJECT_COUNTER))
    header = struct.pack("=IHHII", 16 + len(request), (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETOBJ,
                         _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)  # fmt: skip
    found: dict[str, tuple[int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.settimeout(5)
        sock.sendall(header + request)
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    error = struct.unpack_from("=i", data, offset + 16)[0]
                    return None if error else found  # ENOENT: no table
                attributes = dict(_attributes(data[offset + 20 : offset + length]))
                name = attributes.get(_NFTA_OBJ_NAME, b"").rstrip(b"\0").decode()
                values = dict(_attributes(attributes.get(_NFTA_OBJ_DATA, b"")))
                if name.startswith("usage_"):
                    packets = struct.unpack("!Q", values.get(_NFTA_COUNTER_PACKETS, bytes(8)))[0]
                    size = struct.unpack("!Q", values.get(_NFTA_COUNTER_BYTES, bytes(8)))[0]
                    found[name] = (packets, size)
                offset += (length + 3) & ~3
                if length < 16:
                    return None


# Netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nf_tables.h) for _read_usage.
_NETLINK_NETFILTER, _NFNL_SUBSYS_NFTABLES, _NFT_MSG_GETOBJ, _NFPROTO_INET = 12, 10, 19, 1
_NLM_F_REQUEST, _NLM_F_DUMP, _NLMSG_ERROR, _NLMSG_DONE = 0x1, 0x300, 2, 3
_NFTA_OBJ_TABLE, _NFTA_OBJ_NAME, _NFTA_OBJ_TYPE, _NFTA_OBJ_DATA, _NFT_OBJECT_COUNTER = 1, 2, 3, 4, 1
_NFTA_COUNTER_BYTES, _NFTA_COUNTER_PACKETS = 1, 2


def _nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]  # without the nested and byte-order flags
        offset += (length + 3) & ~3


def save_usage(settings: Any) -> None:
    """`vr stop`: the usage counters to the state dir, for the next start to restore."""
    values = _read_usage()
    if values:
        write_new(settings.state_dir / USAGE_FILE, json.dumps({k: list(v) for k, v in values.items()}).encode())


def usage_report(doc: RouterDocument) -> list[dict]:
    """Per public IP and per tier: bytes and packets in and out, as the live counters hold them."""
    values = _read_usage() or {}
    rows: dict[tuple[str, str], dict] = {}
    for (kind, name, direction), counter in _usage_counters(doc, interface_names(doc)).items():
        row = rows.setdefault((kind, name), {"kind": "public_ip" if kind == "ip" else "tier", "name": name})
        packets, size = values.get(counter, (0, 0))
        row[f"{direction}_bytes"], row[f"{direction}_packets"] = size, packets
    return list(rows.values())


def rule_counters() -> list[dict]:
    """Every commented rule of vr's table with its packet and byte counters."""
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
        # An anonymous counter's figures; a named counter chosen by a map (usage) has none here.
        counter = next((e["counter"] for e in rule["expr"] if "counter" in e), {"packets": 0, "bytes": 0})
        if not isinstance(counter, dict) or "packets" not in counter:
            continue
        result.append({"chain": rule["chain"], "rule": rule["comment"], "packets": counter["packets"],
                       "bytes": counter.get("bytes", 0)})  # fmt: skip
    return result


class _AclBlock(dict):
    """Consecutive ACL entries (by number) of which no two match the same packet, so their
    order within the block does not matter: each is one element of a verdict map, and the
    block is three map lookups however many entries it holds. Blocks stay in number order,
    so the first matching entry still decides. Elements by key shape:
      ports  address . protocol . port range (tcp and udp entries)
      proto  address . protocol range (all, protocol numbers, icmp of any type)
      icmp   address . icmp type . icmp code (a range: any code of the type)"""

    def __init__(self, bits: int = 32) -> None:
        super().__init__(ports=[], proto=[], icmp=[])
        self.bits = bits  # the family's address length: 32 (IPv4) or 128 (IPv6)
        self.first: int | None = None  # entry numbers
        self.last: int | None = None
        self._spans: list[tuple] = []  # (net low, net high, prefix length, protocol, port, type, code ranges), by net low
        self._nets: dict[tuple[int, int], list[tuple]] = {}  # (prefix length, network) -> its spans
        self._lengths: set[int] = set()

    def admits(self, spans: list[tuple]) -> bool:
        return not any(self._overlaps(span) for span in spans)

    def add(self, number: int, spans: list[tuple], elements: list[tuple[str, str]]) -> None:
        self.first = number if self.first is None else self.first
        self.last = number
        for span in spans:
            bisect.insort(self._spans, span)
            self._nets.setdefault((span[2], span[0]), []).append(span)
            self._lengths.add(span[2])
        for shape, element in elements:
            self[shape].append(element)

    def _overlaps(self, span: tuple) -> bool:
        low, high, length = span[:3]
        # CIDRs nest or are disjoint: the block's networks that contain this one, then the
        # ones inside it (a start within its range).
        candidates = [s for n in self._lengths if n <= length
                      for s in self._nets.get((n, low & _mask(n, self.bits)), ())]  # fmt: skip
        start = bisect.bisect_left(self._spans, (low,))
        candidates += itertools.takewhile(lambda s: s[0] <= high, self._spans[start:])
        return any(all(a[0] <= b[1] and b[0] <= a[1] for a, b in zip(span[3:], other[3:])) for other in candidates)


def _ports_text(ports: Any) -> str:
    return str(ports.start) if ports.size == 1 else f"{ports.start}-{ports.end}"


def _outermost(networks: list) -> list:
    """An entry's own CIDRs may nest; the outer one says it all (and elements must not overlap)."""
    if len(networks) <= 1:
        return networks
    kept: list = []
    for net in sorted(networks, key=lambda n: (_bounds(n)[0], -_bounds(n)[1])):
        if not kept or _bounds(net)[0] > _bounds(kept[-1])[1]:
            kept.append(net)
    return kept


def _bounds(net: Any) -> tuple[int, int]:
    """A network as an integer range (vr's IPv4 networks keep theirs; IPv6 ones are computed)."""
    bounds = getattr(net, "bounds", None)
    return bounds if bounds is not None else (int(net.network_address), int(net.broadcast_address))


def _mask(length: int, bits: int = 32) -> int:
    return (2**bits - 1) ^ (2 ** (bits - length) - 1)


_PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
_ANY_PORT, _ANY_TYPE = (0, 65535), (0, 255)


def _acl_blocks(acl: Any, _: None) -> dict[str, list[_AclBlock]]:
    """A tier's ACL, each direction and family as blocks (see _AclBlock). Leaving a tier,
    'allow' returns so that the entered tier's ACL decides too."""
    return {"out": _blocks(acl.egress, "return", 4), "in": _blocks(acl.ingress, "accept", 4),
            "out6": _blocks(acl.egress, "return", 6), "in6": _blocks(acl.ingress, "accept", 6)}  # fmt: skip


def _blocks(rules: list[AclRule], allow: str, version: int) -> list[_AclBlock]:
    """One family's blocks: the entries with CIDRs of that family, in number order."""
    blocks: list[_AclBlock] = []
    for rule in sorted(rules, key=lambda r: r.number):
        networks = _outermost([net for net in rule.cidrs if net.version == version])
        if not networks:
            continue
        verdict = allow if rule.action == "allow" else "drop"
        if rule.protocol == "all":
            protocol, shape, key = (0, 255), "proto", "0-255"
        elif isinstance(rule.protocol, int):
            protocol, shape, key = (rule.protocol, rule.protocol), "proto", str(rule.protocol)
        else:
            number = _PROTOCOLS[rule.protocol]
            protocol = (number, number)
            if rule.ports is not None:
                shape, key = "ports", f"{rule.protocol} . {_ports_text(rule.ports)}"
            elif rule.icmp_type is not None:
                shape, key = "icmp", f"{rule.icmp_type} . {_code_text(rule)}"
            else:
                shape, key = "proto", str(number)
        ports = (rule.ports.start, rule.ports.end) if rule.ports is not None else _ANY_PORT
        types = (rule.icmp_type, rule.icmp_type) if rule.icmp_type is not None else _ANY_TYPE
        codes = (rule.icmp_code, rule.icmp_code) if rule.icmp_code is not None else _ANY_TYPE
        spans = [(*_bounds(net), net.prefixlen, protocol, ports, types, codes) for net in networks]
        elements = [(shape, f"{net} . {key} : {verdict}") for net in networks]
        if not blocks or not blocks[-1].admits(spans):
            blocks.append(_AclBlock(32 if version == 4 else 128))
        blocks[-1].add(rule.number, spans, elements)
    return blocks


def _forward_elements(rule: PortForward, _: None) -> list[tuple[str, str]]:
    """(map, element) pairs of one port forward. Exact keys (no source restriction) go in
    hash maps, which the kernel loads in linear time; the rest in interval maps."""
    result = []
    for offset in range(rule.public_ports.size):
        target = f"{rule.private_ip} . {rule.private_ports.start + offset}"
        port = rule.public_ports.start + offset
        if not rule.source_cidrs:
            result.append((f"pf_{rule.protocol}", f"{rule.public_ip} . {port} : {target}"))
        for source in rule.source_cidrs:
            result.append((f"pf_{rule.protocol}_from", f"{source} . {rule.public_ip} . {port} : {target}"))
    return result


def _ipv6_problems(doc: RouterDocument) -> list[Problem]:
    """IPv6 firewall rules: on IPv6 tiers, unique ids, and no two rules of one set that
    overlap (an interval set refuses overlapping elements, and the whole apply with it)."""
    problems: list[Problem] = []
    prefixes = {}
    for tier in doc.ipv6.tiers:
        iface = doc.interface(tier.tier)
        if iface is not None and iface.ipv6() is not None:
            prefixes[tier.tier] = iface.ipv6().network
    firewall = doc.ipv6.firewall
    for n, rule in enumerate(firewall.ingress):
        if not any(rule.destination.subnet_of(p) for p in prefixes.values()):
            problems.append(Problem(f"ipv6.firewall.ingress[{n}].destination",
                                    f"{rule.destination} is inside no IPv6 tier's prefix"))  # fmt: skip
    for n, first in repeats(r.id for r in firewall.ingress):
        problems.append(Problem(f"ipv6.firewall.ingress[{n}].id",
                                f"ipv6 ingress rule {firewall.ingress[n].id!r} is already ipv6.firewall.ingress[{first}]"))  # fmt: skip
    problems += _overlapping6("ipv6.firewall.ingress", "ipv6 ingress rule", firewall.ingress,
                              lambda r: [(s, r.destination) for s in r.source_cidrs])  # fmt: skip
    for n, egress in enumerate(firewall.egress):
        if egress.tier not in prefixes:
            problems.append(Problem(f"ipv6.firewall.egress[{n}].tier", f"{egress.tier!r} is not an IPv6 tier"))
        problems += _overlapping6(f"ipv6.firewall.egress[{n}].rules", "ipv6 egress rule", egress.rules,
                                  lambda r: [(d,) for d in r.destination_cidrs])  # fmt: skip
    for n, first in repeats(e.tier for e in firewall.egress):
        problems.append(Problem(f"ipv6.firewall.egress[{n}].tier", f"already ipv6.firewall.egress[{first}]"))
    return problems


def _overlapping6(section: str, label: str, rules: list, networks: Any) -> list[Problem]:
    """Pairs of rules whose elements would overlap in one set: same kind, every address
    part overlapping, and the ports (or ICMPv6 type) too. Quadratic within a kind: IPv6
    rule lists are short (a guest's own address is routed, there is no NAT to describe).
    Rules with ids (ingress) are named by them, the others by position."""
    problems, seen = [], {}
    for n, rule in enumerate(rules):
        kind = _kind(rule)
        mine = networks(rule)
        for m, other, theirs in seen.get(kind, []):
            if _same_traffic(rule, other) and any(
                all(a.overlaps(b) for a, b in zip(x, y, strict=True)) for x in mine for y in theirs
            ):
                rule_id, other_id = getattr(rule, "id", None), getattr(other, "id", None)
                who = f"{label} {rule_id!r}" if rule_id is not None else label
                whom = f"{label} {other_id!r} ({section}[{m}])" if other_id is not None else f"{label} {section}[{m}]"
                problems.append(Problem(f"{section}[{n}]", f"{who} overlaps {whom}: {_traffic6(rule, other)}"))
                break
        seen.setdefault(kind, []).append((n, rule, mine))
    return problems


def _traffic6(a: Any, b: Any) -> str:
    """What two overlapping IPv6 rules both match, in words."""
    if a.ports is not None:
        return _traffic(a.protocol, max(a.ports.start, b.ports.start), min(a.ports.end, b.ports.end))
    if a.protocol == "icmp":
        if a.icmp_type is None:
            return "icmpv6 (all types)"
        code = a.icmp_code if a.icmp_code is not None else b.icmp_code
        return f"icmpv6 type {a.icmp_type}" + (f" code {code}" if code is not None else "")
    return "all traffic"


def _same_traffic(a: Any, b: Any) -> bool:
    if a.ports is not None:
        return a.ports.start <= b.ports.end and b.ports.start <= a.ports.end
    return a.icmp_type == b.icmp_type and (a.icmp_code is None or b.icmp_code is None or a.icmp_code == b.icmp_code)


def _ingress_elements(rule: IngressRule, _: None) -> list[tuple[str, str]]:
    """(set, element) pairs of one ingress rule: from anywhere to one port is an exact key."""
    result = []
    kind = _kind(rule)
    for source in rule.source_cidrs:
        exact = source.prefixlen == 0 and kind in ("tcp", "udp", "all") and (kind == "all" or rule.ports.size == 1)
        if exact:
            result.append((f"in_{kind}", _element(str(rule.public_ip), rule)))
        else:
            name = f"in_{kind}" if kind.startswith("icmp") else f"in_{kind}_from"
            result.append((name, _element(f"{source} . {rule.public_ip}", rule)))
    return result


class _RuleIndex:
    """One rule list as the last verify saw it: each rule's facts (keyed by object, as
    merge keeps every unchanged rule object), how often each id is used, and each overlap
    group's spans. When the last verify was clean and the scope is the same, only the
    rules that came or went are looked at: a removed rule cannot create a problem, an
    added one can only clash with its id or within its groups. Anything else is a full
    pass, which still reuses each unchanged rule's facts."""

    def __init__(self, section: str, facts_of: Any) -> None:
        self.section = section
        self.facts_of = facts_of
        self.scope: _Scope | None = None
        self.clean = False
        self.facts: dict[int, tuple[object, tuple]] = {}  # id(rule) -> (rule, facts)
        self.id_count: dict[str, int] = {}
        self.groups: dict[tuple, dict[int, list[tuple]]] = {}  # group -> id(rule) -> its spans

    def check(self, rules: list, scope: _Scope) -> list[Problem]:
        keys = list(map(id, rules))
        if not (self.clean and scope is self.scope):
            return self._full(rules, keys, scope)
        added = set(filterfalse(self.facts.__contains__, keys))
        if len(self.facts) + len(added) != len(keys):  # rules went away (validation never repeats an object)
            for key in self.facts.keys() - set(keys):
                self._forget(key)
        if not added:
            return []
        touched: set[tuple] = set()
        problems: list[tuple[object, str, str]] = []  # (rule, field, message), placed below
        for rule in itertools.compress(rules, map(added.__contains__, keys)):
            found, rule_id, group, spans = self._learn(rule, scope)
            problems += [(rule, field, message) for field, message in found]
            if rule_id is not None and self.id_count[rule_id] > 1:
                problems.append((rule, "id", ""))
            if spans:
                touched.add(group)
        overlaps = [group for group in touched if self._sweep_group(group)]  # positions only if one is found
        if not problems and not overlaps:
            return []
        # Rare: name the places. Positions cost a pass over the list, paid only here.
        self.clean = False
        position = {key: n for n, key in enumerate(keys)}
        result = []
        for rule, field, message in problems:
            n = position[id(rule)]
            if field == "id":
                first = next(m for m, other in enumerate(rules) if other.id == rule.id)
                label = _LABELS[self.facts_of][0]
                result.append(Problem(f"{self.section}[{n}].id",
                                      f"{label} {rule.id!r} is already {self.section}[{first}]"))  # fmt: skip
            else:
                result += _found(f"{self.section}[{n}]", [(field, message)])
        for group in overlaps:
            result += self._sweep_group(group, position)
        return result

    def _full(self, rules: list, keys: list[int], scope: _Scope) -> list[Problem]:
        previous = self.facts if scope is self.scope else {}
        self.scope, self.facts, self.id_count, self.groups = scope, {}, {}, {}
        problems: list[Problem] = []
        first_of: dict[str, int] = {}
        for n, (rule, key) in enumerate(zip(rules, keys, strict=True)):
            hit = previous.get(key)
            found, rule_id, _, _ = self._learn(rule, scope, hit[1] if hit and hit[0] is rule else None)
            if found:
                problems += _found(f"{self.section}[{n}]", found)
            if rule_id is not None and first_of.setdefault(rule_id, n) != n:
                message = f"{_LABELS[self.facts_of][0]} {rule_id!r} is already {self.section}[{first_of[rule_id]}]"
                problems.append(Problem(f"{self.section}[{n}].id", message))
        position = {key: n for n, key in enumerate(keys)}
        for group in self.groups:
            problems += self._sweep_group(group, position)
        self.clean = not problems
        return problems

    def _learn(self, rule: object, scope: _Scope, facts: tuple | None = None) -> tuple:
        if facts is None:
            facts = self.facts_of(rule, scope)
        key = id(rule)
        self.facts[key] = (rule, facts)
        _, rule_id, group, spans = facts
        if rule_id is not None:
            self.id_count[rule_id] = self.id_count.get(rule_id, 0) + 1
        if spans:
            members = self.groups.get(group)
            if members is None:
                members = self.groups[group] = {}
            members[key] = spans
        return facts

    def _forget(self, key: int) -> None:
        _, (_, rule_id, group, spans) = self.facts.pop(key)
        if rule_id is not None:
            self.id_count[rule_id] -= 1
        if spans:
            members = self.groups[group]
            del members[key]
            if not members:
                del self.groups[group]

    def _sweep_group(self, group: tuple, position: dict[int, int] | None = None) -> list[Problem]:
        """The group's overlaps, each naming both rules (their ids, and their positions when
        given); without positions, only whether there are any."""
        members = [(position[key] if position else 0, span, key) for key, spans in self.groups[group].items()
                   for span in spans]  # fmt: skip
        label, nets = _LABELS[self.facts_of]
        where = self.section + "[{}]"
        found = _sweep(members)
        problems = []
        for (n, span, key), (m, other, other_key) in found:  # the later rule, the earlier one
            rule_id, other_id = (getattr(self.facts[k][0], "id", None) for k in (key, other_key))
            what = _traffic(group[-1], max(span[0], other[0]), min(span[1], other[1]))
            if span[3] is not None:
                what += f", {nets} {span[3]} and {other[3]}"
            if len(span) >= 6 and len(other) >= 6:
                what += f", sources {span[5]} and {other[5]}"
            who = f"{label} {rule_id!r}" if rule_id is not None else label
            if key == other_key:
                message = f"{who} overlaps itself: {what}"
            elif other_id is not None:
                message = f"{who} overlaps {label} {other_id!r} ({where.format(m)}): {what}"
            else:
                message = f"{who} overlaps {label} {where.format(m)}: {what}"
            path = where.format(n) + (".public_ports" if group[1] == "forward" else "")
            problems.append(Problem(path, message))
        return problems


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

    @functools.cached_property
    def _tier_bounds(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(net.network_address), int(net.broadcast_address)) for net in self.tier_subnets)

    def holds_guest_network(self, network: IPv4Network) -> bool:
        low, high = network.bounds
        return any(tier_low <= low and high <= tier_high for tier_low, tier_high in self._tier_bounds)

    def need_guest(self, field: str, ip: IPv4Address) -> list[tuple[str, str]]:
        value = int(ip)
        if any(low <= value <= high for low, high in self._tier_bounds):
            return []
        return [(field, f"{ip} is not inside any guest tier")]


def _found(path: str, found: list[tuple[str, str]]) -> list[Problem]:
    return [Problem(f"{path}.{field}" if field else path, message) for field, message in found]


# Facts of one rule: (its own problems as (field, message), its id, the group its spans
# fall in, its spans). A span is (low port, high port, network as an integer range, network).


def _forward_facts(rule: PortForward, scope: _Scope) -> tuple[list, str, tuple, list[tuple]]:
    found = scope.need_assigned("public_ip", rule.public_ip) + scope.need_guest("private_ip", rule.private_ip)
    if rule.public_ip in scope.static_public:
        found.append(("public_ip", f"{rule.public_ip} is taken whole by a static NAT"))
    ordered = sorted(rule.source_cidrs, key=lambda net: (int(net.network_address), -net.prefixlen))
    for earlier, later in itertools.pairwise(ordered) if len(ordered) > 1 else ():
        if later.overlaps(earlier):
            found.append(("", f"port forward {rule.id!r} overlaps itself: sources {later} and {earlier}"))
    # One public IP, protocol and port leads to one place, whatever the sources.
    group = (int(rule.public_ip), "forward", rule.protocol)
    return found, rule.id, group, [(rule.public_ports.start, rule.public_ports.end, _ALL, None)]


def _ingress_facts(rule: IngressRule, scope: _Scope) -> tuple[list, str, tuple, list[tuple]]:
    group = (int(rule.public_ip), rule.protocol)
    return scope.need_assigned("public_ip", rule.public_ip), rule.id, group, _spans(rule, rule.source_cidrs)


def _egress_facts(rule: EgressRule, scope: _Scope) -> tuple[list, None, tuple, list[tuple]]:
    """Sources, where a rule names them, are inside a tier the router routes; two rules
    overlap when their destinations and their sources do."""
    found = [(f"source_cidrs[{n}]", f"{net} is not inside any guest tier")
             for n, net in enumerate(rule.source_cidrs) if not scope.holds_guest_network(net)]  # fmt: skip
    spans = _spans(rule, rule.destination_cidrs)
    if rule.source_cidrs:
        spans = [(*span, source.bounds, source) for span in spans for source in rule.source_cidrs]
    return found, None, (0, rule.protocol), spans


def _lb_facts(rule: LbRule, _: _Scope) -> tuple[list, None, tuple, list[tuple]]:
    """A load balancer's sources must not overlap (its other checks are haproxy's verify)."""
    group = (int(rule.public_ip), "lb", "tcp")
    return [], None, group, [(rule.public_port, rule.public_port, net.bounds, net) for net in rule.source_cidrs]


_ALL = (0, 2**32 - 1)
_ANYWHERE = ("0.0.0.0/0",)
# How a rule list's overlap messages name its rules, and the networks its spans carry.
_LABELS = {_forward_facts: ("port forward", ""), _ingress_facts: ("ingress rule", "sources"),
           _egress_facts: ("egress rule", "destinations"), _lb_facts: ("load-balancer rule", "sources")}  # fmt: skip


def _spans(rule: IngressRule | EgressRule, networks: list[IPv4Network]) -> list[tuple]:
    """One span per network; ports, or the ICMP type and code as one range (type * 256 +
    code: a type alone is its 256 codes; -1..65536: every type)."""
    if rule.ports is not None:
        low, high = rule.ports.start, rule.ports.end
    elif rule.icmp_type is not None:
        low = high = rule.icmp_type * 256 + (rule.icmp_code or 0)
        high = low if rule.icmp_code is not None else low + 255
    else:
        low, high = -1, 65536
    return [(low, high, net.bounds, net) for net in networks]


def _sweep(members: list[tuple[int, tuple, int]]) -> list[tuple[tuple, tuple]]:
    """Overlaps within one group, swept by port start so that disjoint rules cost no
    pairwise comparison: (later member, earlier member) pairs, each later rule (the one
    just added, by position) once."""
    members.sort(key=lambda m: m[1][0])
    found: list[tuple[tuple, tuple]] = []
    reported: set[int] = set()
    active: list[tuple[int, tuple, int]] = []
    for member in members:
        n, span, _ = member
        low, _, (net_low, net_high), *_ = span
        active = [a for a in active if a[1][1] >= low]
        for other in active:
            if net_low <= other[1][2][1] and other[1][2][0] <= net_high and _sources_meet(span, other[1]):
                later, earlier = (member, other) if n >= other[0] else (other, member)
                if later[0] not in reported:
                    found.append((later, earlier))
                    reported.add(later[0])
        active.append(member)
    return found


def _sources_meet(span: tuple, other: tuple) -> bool:
    """Whether two spans' sources overlap (a span without sources: from the whole tier)."""
    if len(span) < 6 or len(other) < 6:
        return True
    return span[4][0] <= other[4][1] and other[4][0] <= span[4][1]


def _traffic(protocol: str, low: int, high: int) -> str:
    """What two rules both match, in words: ports for tcp and udp, the type (and code) for
    icmp (see _spans)."""
    if protocol in ("tcp", "udp"):
        return f"{protocol} port {low}" if low == high else f"{protocol} ports {low}-{high}"
    if protocol == "icmp":
        if low < 0 or high // 256 != low // 256:
            return "icmp (all types)"
        return f"icmp type {low // 256} code {low % 256}" if low == high else f"icmp type {low // 256}"
    return "all traffic"


def _kind(rule: EgressRule | Any) -> str:
    if rule.protocol == "icmp" and rule.icmp_type is not None:
        return "icmp_typed"
    return rule.protocol


def _element(prefix: str, rule: Any) -> str:
    if rule.protocol in ("tcp", "udp"):
        return f"{prefix} . {_ports_text(rule.ports)}"
    if rule.protocol == "icmp" and rule.icmp_type is not None:
        return f"{prefix} . {rule.icmp_type} . {_code_text(rule)}"
    return prefix


def _code_text(rule: Any) -> str:
    """An ICMP rule's code as a set element's part: its one code, or every code of its type."""
    return str(rule.icmp_code) if rule.icmp_code is not None else "0-255"


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
