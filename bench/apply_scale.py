"""Bench: the core apply pipeline at scale, with the real dnsmasq, in a throwaway namespace.

Measures what the resident control-plane process pays, in-process:

  validate_ms        Pipeline.validate(full document, None)            (median of --runs)
  render_ms          Pipeline.plan(doc, None, force=True): every file  (median of --runs)
  cold_apply_ms      first Pipeline.apply(full document) on an empty state dir, push to healthy
                     (starts supervisord, dnsmasq and radvd; lazily imported modules included)
  incremental_*_ms   one-VM dhcp_entries upsert / delete payloads, --repeat times each
  incremental_*_agent_ms   the same (other VMs) through the daemon: vr.client.RouterClient over
                     HTTPS with a token to the agent on the control address (--no-agent: not)

By default every tier also has an IPv6 /64 in DHCPv6 mode (radvd runs; its probe solicits an
advertisement on every tier at each apply) and every VM an IPv6 address (--vms DHCPv6 entries);
--no-ipv6 gives the IPv4-only router. After each one-VM add, the new name is resolved with
dnspython against its tier gateway (timed separately), and with IPv6 its AAAA record against
the tier's IPv6 router address (timed too); after each remove both must be gone. dnsmasq's PID
(and radvd's) must stay the same across all incremental applies. Each apply's Result.timings_ms
is reported, plus "commit" (duration_ms minus the steps: document.json, events, clean-up) and
the time the apply spent in Python's cyclic garbage collector. --profile adds a cProfile of one more add.

Run as root:  .venv/bin/python bench/apply_scale.py [--vms 4000 --tiers 8 --repeat 20] [--no-ipv6] [--json]

Everything it creates (a lab router, bench/harness.py's BenchRouter: namespaces vrb3as<pid>-*, the
tiers beyond the lab's two on veth pairs inside the router namespace, a temp root, supervisord,
dnsmasq and radvd) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP. The host's own
interfaces are never touched: the process moves itself into the router namespace first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

from harness import (
    BASE_INTERFACES,
    DOMAIN,
    STEPS,
    BenchRouter,
    GcClock,
    InProcessDriver,
    aligned,
    attach_agent,
    check_stop,
    extra_vm,
    median_of,
    ms,
    p90,
    push_series,
    report,
    run_bench,
    series_figures,
    series_text,
    steps_text,
    vm_entries,
    vm_interfaces,
    vm_sections,
    vm_tiers,
    wait_resolves,
    yes,
)

from vr.client import ClientError
from vr.foundation.errors import VrError

TARGET_COLD_MS = 1000.0
TARGET_INCREMENTAL_MS = 50.0
ROUTER = "r-bench-vm"
DNS_TRIES = 50  # bounded wait for a HUP'd dnsmasq to answer for a new name (x 10 ms)


# ---------------------------------------------------------------------------- the document
def build_document(vms: int, tiers: int, ipv6: bool = True) -> tuple[dict, list[dict]]:
    """The VM router: tiers on eth2.., every VM with DHCPv4 (and DHCPv6 with ipv6)."""
    layout = vm_tiers(vms, tiers)
    dhcp_tiers, ipv6_tiers = vm_sections(layout, ipv6)
    doc = {
        "generation": 1,
        "router": {"name": ROUTER, "type": "isolated"},
        "interfaces": BASE_INTERFACES + vm_interfaces(layout, ipv6),
        "routes": [{"destination": "0.0.0.0/0", "gateway": "192.0.2.1"}],
        "dns": {"domain": DOMAIN, "upstream": ["192.0.2.1"]},
        "dhcp": {"tiers": dhcp_tiers, "entries": vm_entries(layout, vms, ipv6)},
    }
    if ipv6:
        doc["ipv6"] = {"tiers": ipv6_tiers}
    return doc, layout


# ---------------------------------------------------------------------------- measuring
class DnsCheck:
    """One record type's checks: after each add (timed, not in the apply) and after each remove."""

    def __init__(self, rdtype: str, key: str, server: str, field: str) -> None:
        self.rdtype, self.key, self.server, self.field = rdtype, key, server, field
        self.ms: list[float] = []
        self.tries: list[int] = []
        self.passed = self.gone = True

    def ask(self, vm: dict, tier: dict, want: str | None) -> tuple[bool, int]:
        return wait_resolves(f"{vm['hostname']}.{DOMAIN}.", str(tier[self.server]), want, self.rdtype, DNS_TRIES)

    def added(self, vm: dict, tier: dict) -> None:
        mark = time.perf_counter()
        passed, tries = self.ask(vm, tier, vm[self.field])
        self.ms.append(ms(mark))
        self.tries.append(tries)
        self.passed = self.passed and passed

    def removed(self, vm: dict, tier: dict) -> None:
        self.gone = self.ask(vm, tier, None)[0] and self.gone

    def figures(self, removes: bool) -> dict:
        if not self.ms:
            return {}
        k = self.key
        result = {
            f"{k}_check_ms_median": round(statistics.median(self.ms), 2),
            f"{k}_check_ms_max": round(max(self.ms), 2),
            f"{k}_check_first_try": all(t == 1 for t in self.tries),
            f"{k}_check_passed": self.passed,
        }
        if removes:
            result[f"{k}_removed_check_passed"] = self.gone
        return result


def bench(args, router: BenchRouter) -> dict:
    """All the figures; an apply that fails is recorded under "error" and ends the run."""
    raw, layout = build_document(args.vms, args.tiers, args.ipv6)
    figures: dict = {
        "vms": args.vms,
        "tiers": args.tiers,
        "ipv6": args.ipv6,
        "ipv6_tiers": len(raw.get("ipv6", {}).get("tiers", [])),
        "dhcpv6_entries": sum("ipv6" in e for e in raw["dhcp"]["entries"]),
        "repeat": args.repeat,
        "cpus": len(os.sched_getaffinity(0)),
        "document_bytes": len(json.dumps(raw)),
        "targets": {"cold_apply_ms": TARGET_COLD_MS, "incremental_ms": TARGET_INCREMENTAL_MS},
    }
    try:
        measure(args, InProcessDriver(router.settings), raw, layout, figures)
    except (VrError, ClientError, RuntimeError) as error:
        check_stop()
        figures["error"] = f"{figures.pop('_phase', 'apply')}: {type(error).__name__}: {error}"
    figures.pop("_phase", None)
    met = [figures.get(k, False) for k in ("cold_apply_met", "incremental_add_met", "incremental_remove_met")]
    check_keys = ["dnsmasq_pid_unchanged", "dns_check_passed", "dns_removed_check_passed"]
    if args.ipv6:
        check_keys += ["radvd_pid_unchanged", "dns_aaaa_check_passed", "dns_aaaa_removed_check_passed"]
    checks = [figures.get(k, False) for k in check_keys]
    figures["all_met"] = all(met) and all(checks) and "error" not in figures
    return figures


def measure(args, driver: InProcessDriver, raw: dict, layout: list[dict], figures: dict) -> None:
    # Cold: a fresh pipeline on an empty state dir, push to healthy.
    figures["_phase"] = "cold apply"
    pipeline = driver.pipeline
    pushed = driver.push(raw)
    figures["cold_apply_ms"] = round(pushed.wall_ms, 1)
    figures["cold_apply_met"] = figures["cold_apply_ms"] < TARGET_COLD_MS
    figures["cold_apply_timings_ms"] = pushed.timings_ms
    figures["cold_apply_changed"] = pushed.changed

    # Validate and render the full document, in the now warm process.
    figures["_phase"] = "validate"
    figures["validate_ms"] = round(median_of(lambda: pipeline.validate(raw, None), args.runs), 1)
    doc = pipeline.validate(raw, None)
    figures["_phase"] = "render"
    figures["render_ms"] = round(median_of(lambda: pipeline.plan(doc, None, force=True), args.runs), 1)

    supervisor = pipeline.runtime.supervisor
    programs = ("dnsmasq", "radvd") if args.ipv6 else ("dnsmasq",)
    pids_before = {program: supervisor.pid(program) for program in programs}
    figures |= {f"{program}_pid": pid for program, pid in pids_before.items()}
    pids_seen = {program: {pid} for program, pid in pids_before.items()}
    generation = raw["generation"]
    series = {
        kind: {"ms": [], "steps": {s: [] for s in STEPS}, "changed": set(), "gc_ms": [], "gc_full": 0}
        for kind in ("add", "remove")
    }
    gc_clock = GcClock()
    gc.callbacks.append(gc_clock)
    dns_checks = [DnsCheck("A", "dns", "gateway", "ip")]
    if args.ipv6:
        dns_checks.append(DnsCheck("AAAA", "dns_aaaa", "gateway6", "ipv6"))
    added = []

    def one(kind: str, payload: dict) -> None:
        check_stop()
        figures["_phase"] = f"incremental {kind} #{len(series[kind]['ms']) + 1}"
        gc_ms, gc_full = gc_clock.total_ms, gc_clock.full
        pushed = driver.push(payload)
        series[kind]["ms"].append(pushed.wall_ms)
        series[kind]["gc_ms"].append(gc_clock.total_ms - gc_ms)
        series[kind]["gc_full"] += gc_clock.full - gc_full
        series[kind]["changed"].update(pushed.changed)
        for step, value in pushed.timings_ms.items():
            series[kind]["steps"][step].append(value)
        for program, seen in pids_seen.items():
            seen.add(supervisor.pid(program))

    try:
        for k in range(args.repeat):
            vm, tier = extra_vm(layout, k, args.ipv6)
            generation += 1
            one("add", {"generation": generation, "dhcp_entries": {"upsert": [vm]}})
            added.append((vm, tier))
            for check in dns_checks:
                check.added(vm, tier)
        for vm, tier in added:
            generation += 1
            one("remove", {"generation": generation, "dhcp_entries": {"delete": [vm["mac"]]}})
            for check in dns_checks:
                check.removed(vm, tier)
    finally:
        gc.callbacks.remove(gc_clock)
        for program, pid in pids_before.items():
            figures[f"{program}_pid_unchanged"] = pids_seen[program] == {pid} and pid is not None
        for kind, data in series.items():
            if data["ms"]:
                name = f"incremental_{kind}_ms"
                figures |= {
                    f"{name}_median": round(statistics.median(data["ms"]), 1),
                    f"{name}_p90": round(p90(data["ms"]), 1),
                    f"{name}_max": round(max(data["ms"]), 1),
                    f"{name}_count": len(data["ms"]),
                    f"incremental_{kind}_timings_ms_median": {
                        s: round(statistics.median(v), 2) for s, v in data["steps"].items()
                    },
                    f"incremental_{kind}_changed": sorted(data["changed"]),
                    f"incremental_{kind}_gc_ms_median": round(statistics.median(data["gc_ms"]), 1),
                    f"incremental_{kind}_gc_full_collections": data["gc_full"],
                    f"incremental_{kind}_met": statistics.median(data["ms"]) < TARGET_INCREMENTAL_MS,
                }
        for check in dns_checks:
            figures |= check.figures(bool(series["remove"]["ms"]))

    if args.profile:
        figures["_phase"] = "profiled add"
        generation += 1
        profile_one(pipeline, layout, generation, args.repeat, args.ipv6)
    if args.agent:
        through_agent(args, driver, layout, generation + 1, figures)


def through_agent(args, driver: InProcessDriver, layout: list[dict], generation: int, figures: dict) -> None:
    """The same one-VM adds and removes (other VMs) through the daemon: vr.client.RouterClient
    over HTTPS with a token, to the agent on the control address, as a manager pushes."""
    figures["_phase"] = "agent on"
    agent = attach_agent(driver, driver.pipeline.settings, generation)
    vms = [extra_vm(layout, args.repeat + 1 + k, args.ipv6)[0] for k in range(args.repeat)]
    try:
        figures["_phase"] = "incremental adds through the agent"
        adds = push_series(agent, ({"dhcp_entries": {"upsert": [vm]}} for vm in vms))
        figures |= series_figures("incremental_add_agent_ms", adds)
        figures["_phase"] = "incremental removes through the agent"
        removes = push_series(agent, ({"dhcp_entries": {"delete": [vm["mac"]]}} for vm in vms))
        figures |= series_figures("incremental_remove_agent_ms", removes)
    finally:
        agent.close()


def profile_one(pipeline, layout: list[dict], generation: int, k: int, ipv6: bool) -> None:
    """One extra one-VM add under cProfile (not part of the figures), top functions on stderr."""
    import cProfile
    import io
    import pstats

    vm, _ = extra_vm(layout, k, ipv6)
    profiler = cProfile.Profile()
    profiler.enable()
    pipeline.apply({"generation": generation + 1, "dhcp_entries": {"upsert": [vm]}})
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
    print(out.getvalue(), file=sys.stderr)


# ---------------------------------------------------------------------------- output
def table(f: dict) -> str:
    rows = [
        ("router", f"{f['vms']} VMs in {f['tiers']} tiers, document {f['document_bytes'] / 1024:.0f} KiB"),
        ("cpus available", str(f["cpus"])),
        (
            "IPv6",
            f"{f['ipv6_tiers']} tiers DHCPv6 (a /64 each), {f['dhcpv6_entries']} DHCPv6 entries"
            if f["ipv6"]
            else "off (--no-ipv6)",
        ),
    ]
    if "cold_apply_ms" in f:
        rows += [
            (
                "cold_apply_ms (push to healthy)",
                f"{f['cold_apply_ms']:.1f}  target < {TARGET_COLD_MS:.0f}  met: {yes(f['cold_apply_met'])}",
            ),
            ("  timings_ms", steps_text(f["cold_apply_timings_ms"])),
        ]
    if "validate_ms" in f:
        rows.append(("validate_ms (median)", f"{f['validate_ms']:.1f}"))
    if "render_ms" in f:
        rows.append(("render_ms (median, all services)", f"{f['render_ms']:.1f}"))
    for kind in ("add", "remove"):
        name = f"incremental_{kind}_ms"
        if f"{name}_median" not in f:
            continue
        rows += [
            (
                f"{name} (x{f[f'{name}_count']})",
                (
                    f"median {f[f'{name}_median']:.1f}  p90 {f[f'{name}_p90']:.1f}  max {f[f'{name}_max']:.1f}  "
                    f"target < {TARGET_INCREMENTAL_MS:.0f}  met: {yes(f[f'incremental_{kind}_met'])}"
                ),
            ),
            ("  timings_ms (median)", steps_text(f[f"incremental_{kind}_timings_ms_median"])),
            ("  services changed", ", ".join(f[f"incremental_{kind}_changed"]) or "none"),
            (
                "  of which in Python's GC",
                (
                    f"median {f[f'incremental_{kind}_gc_ms_median']:.1f} ms per apply, "
                    f"{f[f'incremental_{kind}_gc_full_collections']} full collections in {f[f'{name}_count']} applies"
                ),
            ),
        ]
    for kind in ("add", "remove"):
        name = f"incremental_{kind}_agent_ms"
        if f"{name}_median" in f:
            rows += [
                (f"{name} (x{f[f'{name}_count']}, through the agent)",
                 f"{series_text(f, name)}  target < {TARGET_INCREMENTAL_MS:.0f}"),
                ("  timings_ms (median, as the daemon reports)", steps_text(f[f"incremental_{kind}_agent_timings_ms_median"])),
            ]  # fmt: skip
    for k, label in (("dns", "DNS"), ("dns_aaaa", "DNS AAAA")):
        if f"{k}_check_passed" in f:
            rows.append(
                (
                    f"{label} check after add (not in apply)",
                    (
                        f"passed: {yes(f[f'{k}_check_passed'])}  median {f[f'{k}_check_ms_median']:.2f} ms  "
                        f"max {f[f'{k}_check_ms_max']:.2f} ms  first try: {yes(f[f'{k}_check_first_try'])}"
                    ),
                )
            )
        if f"{k}_removed_check_passed" in f:
            rows.append((f"{label} name gone after remove", yes(f[f"{k}_removed_check_passed"])))
    for program in ("dnsmasq", "radvd"):
        if f"{program}_pid_unchanged" in f:
            rows.append(
                (
                    f"{program} PID unchanged (incremental)",
                    f"{yes(f[f'{program}_pid_unchanged'])} (pid {f[f'{program}_pid']})",
                )
            )
    return aligned(rows, f)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=4000)
    parser.add_argument("--tiers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20, help="one-VM adds, then as many removes")
    parser.add_argument("--runs", type=int, default=5, help="runs of validate and render (median)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra add (stderr)")
    parser.add_argument("--no-agent", dest="agent", action="store_false",
                        help="in-process only: not the same adds and removes through the daemon's agent")  # fmt: skip
    parser.add_argument(
        "--no-ipv6", dest="ipv6", action="store_false", help="IPv4 only: no IPv6 tiers, no DHCPv6 entries"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.tiers <= 62 or args.vms < 1 or args.repeat < 0 or args.runs < 1:
        parser.error("need 1 <= tiers <= 62, vms >= 1, repeat >= 0, runs >= 1")
    if os.geteuid() != 0:
        parser.error("run as root: it creates a network namespace")

    router = BenchRouter("apply_scale", "as", extra_interfaces=max(0, args.tiers - 2))
    figures = run_bench(router, lambda r: bench(args, r))
    return report(table(figures), figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
