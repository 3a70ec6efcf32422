"""radvd: IPv6 router advertisements on guest tiers (prefix, M/O flags, MTU, RDNSS, DNSSL).

radvd re-reads its config on SIGHUP but exits if the new one does not parse, so the
staged file goes through `radvd --configtest` first. SIGHUP advertises nothing for a
prefix that left the config: guests would keep a dead address until its valid lifetime
ran out. So a removed prefix stays in the config for RETIRE_S with zero lifetimes
(guests deprecate it at the next advertisement), marked with the time it may go; the next
render after that drops it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from vr.foundation.document import Ipv6Tier, RouterDocument
from vr.foundation.errors import Problem
from vr.foundation.files import read_bytes_or_none
from vr.services.base import Change, Program, Service, repeats, run_checker
from vr.services.network import interface_names
from vr.services.probes import ProbeSpec
from vr.services.runtime import Runtime

PROGRAM = "radvd"
CONFIG = "radvd.conf"
RETIRE_S = 1800  # three advertisements at the longest default interval, and then some
_LIVE_PREFIX = re.compile(
    r"^interface (?P<ifname>\S+) \{$|^  # retiring until (?P<until>\d+):|^  prefix (?P<prefix>\S+) \{$", re.MULTILINE
)


class RadvdService(Service):
    name = "radvd"

    def read(self, doc: RouterDocument) -> Any:
        return (doc.router.name, doc.interfaces, doc.tier_domains(), doc.ipv6.tiers)

    def configured(self, doc: RouterDocument) -> bool:
        return bool(doc.ipv6.tiers)

    def verify(self, doc: RouterDocument) -> list[Problem]:
        problems: list[Problem] = []
        guests = {i.id: i for i in doc.guest_interfaces()}
        for n, tier in enumerate(doc.ipv6.tiers):
            path = f"ipv6.tiers[{n}]"
            iface = guests.get(tier.tier)
            if iface is None:
                problems.append(Problem(f"{path}.tier", f"{tier.tier!r} is not a guest interface id"))
                continue
            address = iface.ipv6()
            if iface.shared():
                problems.append(Problem(f"{path}.tier", f"{tier.tier!r} is a shared network's tier: the router is "
                                                        "not its gateway, and does not advertise itself as its IPv6 router"))  # fmt: skip
            elif address is None:
                problems.append(Problem(f"{path}.tier", f"interface {tier.tier!r} has no IPv6 address (its /64)"))
            elif address.network.prefixlen != 64:
                problems.append(Problem(f"{path}.tier", f"{address} is not in a /64: SLAAC and routing need a /64"))
            elif address.ip.is_link_local or address.ip.is_multicast:
                problems.append(Problem(f"{path}.tier", f"{address} is not a global unicast address"))
            if tier.ra.mtu is not None and tier.ra.mtu > iface.mtu:
                problems.append(Problem(f"{path}.ra.mtu", f"{tier.ra.mtu} is above the interface MTU {iface.mtu}"))
            for m, server in enumerate(tier.dns):
                if server.is_multicast or server.is_unspecified:
                    problems.append(Problem(f"{path}.dns[{m}]", f"{server} is not a unicast address"))
        for n, first in repeats(t.tier for t in doc.ipv6.tiers):
            problems.append(Problem(f"ipv6.tiers[{n}].tier", f"already ipv6.tiers[{first}]"))
        return problems

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        names = interface_names(doc)
        tiers = {}
        for tier in doc.ipv6.tiers:
            iface = doc.interface(tier.tier)
            if iface is not None and iface.ipv6() is not None:
                tiers[names[iface.id]] = _tier_values(doc, tier, iface, names[iface.id])
        here = runtime.settings.service_dir(self.name)
        for ifname, prefix, until in _retiring(read_bytes_or_none(here / CONFIG), tiers, now=int(time.time())):
            values = tiers.setdefault(ifname, _retired_interface(ifname))
            values["prefixes"].append(
                {"prefix": prefix, "autonomous": "on", "valid": 0, "preferred": 0, "retiring_until": until}
            )
        if not tiers:
            return {}
        return {CONFIG: runtime.render("radvd/radvd.conf.j2", router=doc.router.name, tiers=list(tiers.values()))}

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        staged = staged_dir / CONFIG
        if staged.exists():
            run_checker("radvd --configtest", ["radvd", "--configtest", "--config", str(staged), "--logmethod",
                                               "stderr_clean"], staged_dir)  # fmt: skip

    def programs(self, doc: RouterDocument, runtime: Runtime) -> list[Program]:
        advertising = any((iface := doc.interface(t.tier)) is not None and iface.ipv6() is not None
                          for t in doc.ipv6.tiers)  # fmt: skip
        if not advertising and not self.generate(doc, runtime):  # no tier, and no prefix still retiring
            return []
        settings = runtime.settings
        command = ["radvd", "--nodaemon", "--config", str(settings.service_dir(self.name) / CONFIG),
                   "--pidfile", str(settings.run_dir / "radvd.pid"), "--logmethod", "stderr_clean"]  # fmt: skip
        return [Program(PROGRAM, command)]

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        client = runtime.supervisor
        if change.desired(CONFIG) is None:
            return  # supervisord stopped radvd with its program
        if client.state(PROGRAM) != "RUNNING":
            client.start(PROGRAM)
        elif change.touches(CONFIG) or change.restore:
            client.signal(PROGRAM, "HUP")

    def probe_spec(self, doc: RouterDocument, runtime: Runtime) -> ProbeSpec | None:
        """A solicitation on the first IPv6 tier, answered with its prefix. One tier: a
        process per tier would cost every apply a millisecond or two per tier, and the
        config all tiers share is checked already."""
        if not self.configured(doc):
            return None
        iface = next((doc.interface(t.tier) for t in doc.ipv6.tiers if doc.interface(t.tier)), None)
        if iface is None or iface.ipv6() is None:
            return None
        args = {"interface": interface_names(doc)[iface.id], "prefix": str(iface.ipv6().network)}
        return {"program": PROGRAM, "check": "router_advertisement", "args": args}


def tier_mode(doc: RouterDocument) -> list[dict]:
    """Each IPv6 tier's prefix and mode (for vr status)."""
    rows = []
    for tier in doc.ipv6.tiers:
        iface = doc.interface(tier.tier)
        address = iface.ipv6() if iface else None
        rows.append({"tier": tier.tier, "prefix": str(address.network) if address else None, "mode": tier.mode})
    return rows


def _tier_values(doc: RouterDocument, tier: Ipv6Tier, iface, ifname: str) -> dict:
    ra = tier.ra
    stateful = tier.mode == "dhcpv6"
    return {
        "ifname": ifname,
        "max_interval": ra.interval_s,
        "min_interval": max(3, ra.interval_s // 3),
        "router_lifetime": ra.router_lifetime_s,
        "managed": "on" if stateful else "off",
        "other": "on" if stateful else "off",
        "mtu": ra.mtu or iface.mtu,
        "prefixes": [
            {
                "prefix": str(iface.ipv6().network),
                "autonomous": "off" if stateful else "on",
                "valid": ra.valid_lifetime_s,
                "preferred": ra.preferred_lifetime_s,
                "retiring_until": None,
            }
        ],
        "rdnss": [str(a) for a in tier.dns] or [str(iface.ipv6().ip)],
        "dnssl": tier.search or [doc.tier_domains()[tier.tier]],
        "dns_lifetime": 2 * ra.interval_s,
    }


def _retired_interface(ifname: str) -> dict:
    """A tier whose IPv6 is gone: advertise only its retiring prefixes, and no default router."""
    return {"ifname": ifname, "max_interval": 600, "min_interval": 200, "router_lifetime": 0, "managed": "off",
            "other": "off", "mtu": 0, "prefixes": [], "rdnss": [], "dnssl": [], "dns_lifetime": 0}  # fmt: skip


def _retiring(live: bytes | None, tiers: dict[str, dict], now: int) -> list[tuple[str, str, int]]:
    """(interface, prefix, until) of every prefix the live config advertises that the new one
    drops: newly removed ones retire for RETIRE_S from now; those already retiring keep
    their time, until it has passed."""
    if not live:
        return []
    result, ifname, until = [], "", None
    for match in _LIVE_PREFIX.finditer(live.decode()):
        if match["ifname"]:
            ifname, until = match["ifname"], None
        elif match["until"]:
            until = int(match["until"])
        else:
            prefix, marked, until = match["prefix"], until, None
            wanted = {p["prefix"] for p in tiers.get(ifname, {}).get("prefixes", [])}
            if prefix in wanted:
                continue
            if marked is None:
                result.append((ifname, prefix, now + RETIRE_S))
            elif marked > now:
                result.append((ifname, prefix, marked))
    return result
