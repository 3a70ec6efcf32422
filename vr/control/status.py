"""`vr status`: what an operator (or the manager) needs to know about this router."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vr.foundation.files import read_json, read_report
from vr.foundation.settings import Settings

NUMBER = (int, float)
HEALTH_FIELDS = {"monitor_pid": (int, type(None)), "checked_at": NUMBER, "written_at": NUMBER, "stale_after_s": NUMBER,
                 "services": dict}  # fmt: skip
LAST_APPLY_FIELDS = {"time": NUMBER, "generation": (int, type(None)), "outcome": str, "message": str,
                     "duration_ms": NUMBER, "changed": list, "timings_ms": dict}  # fmt: skip
STALE_AFTER_S = 15.0  # for a health.json that does not say (written by an older monitor)


def recover_first(settings: Settings) -> str | None:
    """What every command that reads state does first: an apply a crash interrupted is rolled
    back (or finished) now. None when nothing is pending any more; otherwise why it still is
    (an apply holds the lock: it is in progress)."""
    if not settings.journal_path.exists():
        return None
    from vr.foundation.errors import Busy
    from vr.transaction.pipeline import Pipeline

    try:
        Pipeline(settings).recover()
    except Busy as error:
        return str(error)
    return None


def monitor_view(settings: Settings) -> dict:
    """health.json as a reader may trust it: a monitor that is gone, or has not checked for
    longer than it promised (stale_after_s), vouches for nothing: its services read unknown."""
    health = read_report(settings.run_dir / "health.json", HEALTH_FIELDS) or {}
    if not health:
        return {}
    health["services"] = {name: item for name, item in health.get("services", {}).items() if isinstance(item, dict)}
    pid, checked = health.get("monitor_pid"), health.get("checked_at") or health.get("written_at") or 0
    age = time.time() - checked
    gone = not pid or not _alive(pid)
    if gone or age > health.get("stale_after_s", STALE_AFTER_S):
        why = "the monitor is not running" if gone else f"the monitor has not checked for {age:.0f} s"
        health = {**health, "stale": True, "stale_reason": why,
                  "services": {name: {**item, "state": "unknown", "healthy": None, "reason": why}
                               for name, item in health.get("services", {}).items()}}  # fmt: skip
    else:
        health = {**health, "stale": False}
    return health


def collect(settings: Settings, firewall: bool = False, lb: bool = False, vpn: bool = False,
            pipeline: Any = None, usage: bool = False) -> dict:  # fmt: skip
    """pipeline: a warm one (the daemon's) whose parsed document is reused."""
    from vr.foundation.errors import StoredDocumentUnreadable
    from vr.foundation.lock import holder
    from vr.services import SERVICES
    from vr.transaction.pipeline import Pipeline

    pipeline = pipeline or Pipeline(settings)
    document_error = None
    try:
        doc = pipeline.stored_document()
    except StoredDocumentUnreadable as error:  # still a report: what runs, and why no apply will load
        doc, document_error = None, str(error)
    runtime = pipeline.runtime
    journal_pending = settings.journal_path.exists()
    in_progress = None
    if journal_pending:
        owner = holder(settings)
        in_progress = f"an apply is in progress (pid {owner})" if owner else "an interrupted apply awaits recovery"
    supervisor_up = runtime.supervisor.is_running()
    processes = {p["name"]: p for p in runtime.supervisor.all_processes()} if supervisor_up else {}
    health = monitor_view(settings)
    watched = health.get("services", {})
    services = []
    for service in SERVICES:
        if doc is None or not service.configured(doc):
            continue
        programs = service.programs(doc, runtime)
        started = time.perf_counter()
        # Only a service that runs programs depends on supervisord; the others probe as usual.
        reason = "supervisord is down" if programs and not supervisor_up else service.probe(doc, runtime)
        if reason is None and service.name == "network":
            reason = _network_missing(settings)
        item = {
            "name": service.name,
            "healthy": reason is None,
            "reason": reason,
            "probe_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        for program in programs[:1]:  # the service's daemon (helpers such as charon's checker follow it)
            info = processes.get(program.name, {})
            item.update(
                state=info.get("statename", "ABSENT"),
                pid=info.get("pid") or None,
                uptime_s=(info["now"] - info["start"]) if info.get("statename") == "RUNNING" else 0,
            )
        if service.name in watched:
            item["monitor"] = watched[service.name]
        services.append(item)
    last = read_report(settings.last_apply_path, LAST_APPLY_FIELDS)
    counters = None
    if firewall and doc is not None:
        from vr.services.nftables import rule_counters

        try:
            counters = rule_counters()
        except RuntimeError as error:
            counters = [{"chain": "-", "rule": str(error), "packets": 0, "bytes": 0}]
    traffic = None
    if usage and doc is not None:
        from vr.services.nftables import usage_report

        traffic = usage_report(doc)
    members = None
    if lb and doc is not None:
        members = _lb_members(doc, runtime)
    tunnels = None
    if vpn and doc is not None:
        tunnels = _vpn(doc, runtime)
    from vr.foundation.version import running_version
    from vr.services.radvd import tier_mode

    return {
        "release": running_version(),
        "ipv6": tier_mode(doc) if doc is not None else [],
        "vpn": tunnels,
        "firewall": counters,
        "usage": traffic,
        "lb": members,
        "router": doc.router.name if doc else None,
        "generation": doc.generation if doc else None,
        "last_apply": last,
        "journal_pending": journal_pending,
        "document_error": document_error,
        "apply_in_progress": in_progress,
        "services": services,
        # Never healthy over a pending journal: the files may be half old, half new.
        "healthy": doc is not None and not journal_pending and all(s["healthy"] for s in services),
        "monitor": {k: v for k, v in health.items() if k != "services"} or None,
    }


def _network_missing(settings: Settings) -> str | None:
    """What the kernel really has against network.json (what the last apply set): every
    address on its interface, every route vr added. None when all are there."""
    from ipaddress import ip_interface

    from pyroute2 import IPRoute

    from vr.services.network import ROUTE_PROTO_VR, STATE_FILE

    state = read_json(settings.service_dir("network") / STATE_FILE)
    if not state:
        return None
    with IPRoute() as ipr:
        links = {link.get("ifname"): link["index"] for link in ipr.get_links()}
        macs = {(link.get("address") or "").lower(): link["index"] for link in ipr.get_links()}
        for iface in state["interfaces"]:
            index = links.get(iface.get("name")) if iface.get("name") else macs.get(iface.get("mac"))
            if index is None:
                return f"interface {iface['id']} is missing"
            have = {ip_interface(f"{m.get('address')}/{m['prefixlen']}") for m in ipr.get_addr(index=index)}
            for address in iface["addresses"]:
                if ip_interface(address) not in have:
                    return f"address {address} is missing on interface {iface['id']}"
        routes = set()
        for msg in ipr.get_routes(proto=ROUTE_PROTO_VR):
            dst = f"{msg.get('dst') or ('::' if msg['family'] == 10 else '0.0.0.0')}/{msg['dst_len']}"
            routes.add((str(ip_interface(dst).network), msg.get("gateway")))
    for route in state["routes"]:
        if (route["destination"], route["gateway"]) not in routes:
            return f"route {route['destination']} via {route['gateway']} is missing"
    return None


def _alive(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:3]
    except (FileNotFoundError, IndexError):
        return False


def _lb_members(doc, runtime) -> list[dict]:
    """Each rule's members with haproxy's view of them (UP, DOWN, MAINT, no check)."""
    from vr.services.haproxy import member_address, server_states

    try:
        states = server_states(runtime) if doc.load_balancer.rules else {}
        error = None
    except OSError as failure:
        states, error = {}, f"haproxy's stats socket does not answer: {failure}"
    rows = []
    for rule in doc.load_balancer.rules:
        for member in rule.members:
            address = member_address(rule, member)
            state = states.get(rule.id, {}).get(address, error or "unknown")
            rows.append({"rule": rule.id, "listen": f"{rule.public_ip}:{rule.public_port}", "member": address,
                         "weight": member.weight, "state": state})  # fmt: skip
    return rows


def _vpn(doc, runtime) -> list[dict]:
    from vr.services.strongswan import StrongswanService, vpn_report

    if not StrongswanService().configured(doc):
        return []
    try:
        return vpn_report(doc, runtime)
    except OSError as error:
        return [{"connection": "-", "state": f"charon's VICI socket does not answer: {error}", "established_s": None,
                 "bytes_in": 0, "bytes_out": 0, "users": []}]  # fmt: skip


def render_text(report: dict) -> str:
    if report["router"] is None:
        return f"vr: {report['document_error']}" if report.get("document_error") else "no configuration applied yet"
    last = report["last_apply"] or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"])) if last.get("time") else "-"
    message = f": {last['message']}" if last.get("message") else ""
    lines = [
        f"router      {report['router']}",
        f"release     {report['release']}",
        f"generation  {report['generation']}",
        (
            f"last apply  {last.get('outcome', '-')} at {when} "
            f"(generation {last.get('generation')}, {last.get('duration_ms', 0):.0f} ms){message}"
        ),
        *([f"pending     {report['apply_in_progress']}"] if report.get("apply_in_progress") else []),
        *([f"monitor     UNKNOWN: {report['monitor'].get('stale_reason')}"]
          if (report.get("monitor") or {}).get("stale") else []),
        "",
        f"{'service':<12}{'state':<10}{'pid':>8}{'uptime':>9}{'restarts':>9}{'probe':>9}  health",
    ]
    for s in report["services"]:
        health = "ok" if s["healthy"] else f"FAILING: {s['reason']}"
        uptime = f"{s.get('uptime_s', 0)}s" if "state" in s else ""
        watched = s.get("monitor") or {}
        restarts = watched.get("restarts", "")
        probe = f"{watched['last_probe_ms']}ms" if watched.get("last_probe_ms") is not None else ""
        if watched and not watched.get("monitored"):
            health += " (not monitored)"
        elif watched.get("state") == "failed":
            health += f" (monitor: FAILED, {watched.get('reason')})"
        lines.append(
            f"{s['name']:<12}{s.get('state', '-'):<10}{s.get('pid') or '':>8}{uptime:>9}{restarts:>9}{probe:>9}  {health}"
        )
    if report.get("ipv6"):
        lines += ["", f"{'ipv6 tier':<12}{'prefix':<24}mode"]
        lines += [f"{t['tier']:<12}{t['prefix'] or '-':<24}{t['mode']}" for t in report["ipv6"]]
    if report.get("firewall") is not None:
        lines += ["", f"{'chain':<14}{'packets':>10}{'bytes':>12}  rule"]
        lines += [f"{c['chain']:<14}{c['packets']:>10}{c['bytes']:>12}  {c['rule']}" for c in report["firewall"]]
    if report.get("usage") is not None:
        lines += ["", f"{'usage':<10}{'of':<18}{'bytes in':>14}{'packets in':>12}{'bytes out':>14}{'packets out':>12}"]
        lines += [f"{u['kind']:<10}{u['name']:<18}{u['in_bytes']:>14}{u['in_packets']:>12}{u['out_bytes']:>14}"
                  f"{u['out_packets']:>12}" for u in report["usage"]]  # fmt: skip
    if report.get("lb") is not None:
        lines += ["", f"{'rule':<16}{'listen':<22}{'member':<22}{'weight':>6}  state"]
        lines += [
            f"{m['rule']:<16}{m['listen']:<22}{m['member']:<22}{m['weight']:>6}  {m['state']}" for m in report["lb"]
        ]
    if report.get("vpn") is not None:
        lines += ["", f"{'connection':<20}{'state':<13}{'up':>8}{'bytes in':>12}{'bytes out':>12}  users"]
        for c in report["vpn"]:
            up = f"{c['established_s']}s" if c["established_s"] is not None else "-"
            users = ", ".join(f"{u['user']} ({u['address']})" for u in c["users"])
            reason = f"  ({c['reason']})" if c.get("reason") else ""
            lines.append(
                f"{c['connection']:<20}{c['state']:<13}{up:>8}{c['bytes_in']:>12}{c['bytes_out']:>12}  {users}{reason}"
            )
    return "\n".join(lines)
