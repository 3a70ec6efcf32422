"""`vr status`: what an operator (or the manager) needs to know about this router."""

from __future__ import annotations

import time

from vr.files import read_json
from vr.settings import Settings


def collect(settings: Settings, firewall: bool = False, lb: bool = False, vpn: bool = False) -> dict:
    from vr.pipeline import Pipeline
    from vr.services import SERVICES

    pipeline = Pipeline(settings)
    doc = pipeline.stored_document()
    runtime = pipeline.runtime
    supervisor_up = runtime.supervisor.is_running()
    processes = {p["name"]: p for p in runtime.supervisor.all_processes()} if supervisor_up else {}
    health = read_json(settings.run_dir / "health.json") or {}
    watched = health.get("services", {})
    services = []
    for service in SERVICES:
        if doc is None or not service.configured(doc):
            continue
        programs = service.programs(doc, runtime)
        started = time.perf_counter()
        # Only a service that runs programs depends on supervisord; the others probe as usual.
        reason = "supervisord is down" if programs and not supervisor_up else service.probe(doc, runtime)
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
    last = read_json(settings.last_apply_path)
    counters = None
    if firewall and doc is not None:
        from vr.services.nftables import rule_counters

        try:
            counters = rule_counters()
        except RuntimeError as error:
            counters = [{"chain": "-", "rule": str(error), "packets": 0, "bytes": 0}]
    members = None
    if lb and doc is not None:
        members = _lb_members(doc, runtime)
    tunnels = None
    if vpn and doc is not None:
        tunnels = _vpn(doc, runtime)
    from vr.release import running_version
    from vr.services.radvd import tier_mode

    return {
        "release": running_version(),
        "ipv6": tier_mode(doc) if doc is not None else [],
        "vpn": tunnels,
        "firewall": counters,
        "lb": members,
        "router": doc.router.name if doc else None,
        "generation": doc.generation if doc else None,
        "last_apply": last,
        "journal_pending": settings.journal_path.exists(),
        "services": services,
        "healthy": doc is not None and all(s["healthy"] for s in services),
        "monitor": {k: v for k, v in health.items() if k != "services"} or None,
    }


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
        return "no configuration applied yet"
    last = report["last_apply"] or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"])) if last else "-"
    message = f": {last['message']}" if last.get("message") else ""
    lines = [
        f"router      {report['router']}",
        f"release     {report['release']}",
        f"generation  {report['generation']}",
        (
            f"last apply  {last.get('outcome', '-')} at {when} "
            f"(generation {last.get('generation')}, {last.get('duration_ms', 0):.0f} ms){message}"
        ),
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
            lines.append(
                f"{c['connection']:<20}{c['state']:<13}{up:>8}{c['bytes_in']:>12}{c['bytes_out']:>12}  {users}"
            )
    return "\n".join(lines)
