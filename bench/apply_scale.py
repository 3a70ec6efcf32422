"""Bench: the core apply pipeline at scale, with the real dnsmasq, in a throwaway namespace.

Measures what the resident control-plane process pays, in-process:

  validate_ms        Pipeline.validate(full document, None)            (median of --runs)
  render_ms          Pipeline.plan(doc, None, force=True): every file  (median of --runs)
  cold_apply_ms      first Pipeline.apply(full document) on an empty state dir, push to healthy
                     (starts supervisord and dnsmasq; lazily imported modules included)
  incremental_*_ms   one-VM dhcp_entries upsert / delete payloads, --repeat times each

After each one-VM add, the new name is resolved with dnspython against its tier gateway
(timed separately); after each remove it must be gone. dnsmasq's PID must stay the same
across all incremental applies. Each apply's Result.timings_ms is reported, plus "commit"
(duration_ms minus the steps: document.json, events, clean-up) and the time the apply
spent in Python's cyclic garbage collector. --profile adds a cProfile of one more add.

Run as root:  .venv/bin/python bench/apply_scale.py [--vms 4000 --tiers 8 --repeat 20] [--json]

Everything it creates (namespace vrbench-<pid> with veth pairs, a temp root, supervisord
and dnsmasq) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP. The host's own
interfaces are never touched: the process moves itself into the namespace first.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import (
    STEPS,
    aligned,
    check_stop,
    guarded,
    median_of,
    ms,
    p90,
    report,
    steps_text,
    stop_router,
    with_commit,
    yes,
)

from vr import netns
from vr.errors import VrError
from vr.pipeline import Pipeline
from vr.settings import Settings

TARGET_COLD_MS = 1000.0
TARGET_INCREMENTAL_MS = 50.0
DOMAIN = "cloud.internal"
ROUTER = "r-bench-vm"
BASE_NET = ipaddress.IPv4Address("10.64.0.0")  # guest tiers are carved from 10.64.0.0/10
HEADROOM = 64  # addresses per tier kept free beyond the initial VMs, for the incremental adds
DNS_TRIES = 50  # bounded wait for a HUP'd dnsmasq to answer for a new name (x 10 ms)
# Result.timings_ms steps; "commit" is ours: duration_ms minus their sum (document.json, events, clean-up).


# The signal that asked us to stop. Its handler raises SystemExit, but an exception raised
# inside a gc callback is swallowed, and one inside an apply becomes ApplyFailed after the
# rollback: so every loop also checks this.


class GcClock:
    """Time the interpreter spends in its cyclic garbage collector (all generations)."""

    def __init__(self) -> None:
        self.total_ms, self.full, self._start = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_ms += ms(self._start)
            self.full += info["generation"] == 2


# ---------------------------------------------------------------------------- the document
def tier_layout(vms: int, tiers: int) -> list[dict]:
    """One subnet per tier, each big enough for its share of the VMs plus headroom."""
    per_tier = math.ceil(vms / tiers)
    bits = max(8, math.ceil(math.log2(per_tier + HEADROOM + 4)))
    size = 2**bits
    if tiers * size > 2**22:
        raise SystemExit("too many VMs for 10.64.0.0/10")
    layout = []
    for n in range(tiers):
        network = ipaddress.IPv4Network((int(BASE_NET) + n * size, 32 - bits))
        layout.append(
            {
                "id": f"tier{n + 1}",
                "name": f"eth{n + 2}",
                "network": network,
                "gateway": network.network_address + 1,
                # VM addresses start at .10 (relative to the subnet); the first per_tier are the
                # initial VMs, the next HEADROOM are for the incremental adds.
                "first": network.network_address + 10,
                "count": per_tier,
            }
        )
    return layout


def mac_for(prefix: int, n: int) -> str:
    return f"02:{prefix:02x}:" + ":".join(f"{(n >> shift) & 0xFF:02x}" for shift in (24, 16, 8, 0))


def build_document(vms: int, tiers: int) -> tuple[dict, list[dict]]:
    layout = tier_layout(vms, tiers)
    width = max(4, len(str(vms)))
    interfaces = [
        {"id": "control", "role": "control", "name": "eth0", "addresses": ["169.254.0.10/16"]},
        {"id": "public", "role": "public", "name": "eth1", "addresses": ["192.0.2.10/24"]},
    ]
    dhcp_tiers = []
    for tier in layout:
        prefix = tier["network"].prefixlen
        interfaces.append(
            {"id": tier["id"], "role": "guest", "name": tier["name"], "addresses": [f"{tier['gateway']}/{prefix}"]}
        )
        dhcp_tiers.append({"tier": tier["id"], "lease_time": 3600})
    entries = []
    for n in range(vms):
        tier = layout[n % tiers]
        entries.append(
            {
                "tier": tier["id"],
                "mac": mac_for(0, n + 1),
                "ip": str(tier["first"] + n // tiers),
                "hostname": f"vm-{n + 1:0{width}d}",
            }
        )
    doc = {
        "generation": 1,
        "router": {"name": ROUTER, "type": "isolated"},
        "interfaces": interfaces,
        "routes": [{"destination": "0.0.0.0/0", "gateway": "192.0.2.1"}],
        "dns": {"domain": DOMAIN, "upstream": ["192.0.2.1"]},
        "dhcp": {"tiers": dhcp_tiers, "entries": entries},
    }
    return doc, layout


def extra_vm(layout: list[dict], k: int) -> dict:
    """The k-th VM added incrementally: its own MAC prefix, an address above the initial VMs."""
    tier = layout[k % len(layout)]
    return {
        "tier": tier["id"],
        "mac": mac_for(1, k + 1),
        "ip": str(tier["first"] + tier["count"] + k // len(layout)),
        "hostname": f"vm-add-{k + 1:04d}",
        "_gateway": str(tier["gateway"]),
    }


# ---------------------------------------------------------------------------- namespace
def run(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=20, stdin=subprocess.DEVNULL, capture_output=True)


def add_veths(name: str, ifnames: list[str]) -> None:
    for n, ifname in enumerate(ifnames):
        peer = f"p{n}"
        run("ip", "netns", "exec", name, "ip", "link", "add", ifname, "type", "veth", "peer", "name", peer)
        run("ip", "netns", "exec", name, "ip", "link", "set", peer, "up")


# ---------------------------------------------------------------------------- measuring


def resolve(name: str, server: str, timeout: float = 0.5) -> list[str]:
    import dns.message
    import dns.query
    import dns.rdatatype

    query = dns.message.make_query(name, dns.rdatatype.A)
    response = dns.query.udp(query, server, timeout=timeout)
    return [str(r) for rrset in response.answer for r in rrset if rrset.rdtype == dns.rdatatype.A]


def wait_resolves(name: str, server: str, want: str | None) -> tuple[bool, int]:
    """(passed, tries): want=None means the name must no longer resolve. Bounded by DNS_TRIES."""
    import dns.exception

    for attempt in range(1, DNS_TRIES + 1):
        try:
            answers = resolve(name, server)
        except (dns.exception.Timeout, OSError):
            answers = None
        if answers is not None and ((want is None and not answers) or (want is not None and want in answers)):
            return True, attempt
        time.sleep(0.01)
    return False, DNS_TRIES


def bench(args, settings: Settings) -> dict:
    """All the figures; an apply that fails is recorded under "error" and ends the run."""
    raw, layout = build_document(args.vms, args.tiers)
    figures: dict = {
        "vms": args.vms,
        "tiers": args.tiers,
        "repeat": args.repeat,
        "cpus": len(os.sched_getaffinity(0)),
        "document_bytes": len(json.dumps(raw)),
        "targets": {"cold_apply_ms": TARGET_COLD_MS, "incremental_ms": TARGET_INCREMENTAL_MS},
    }
    try:
        measure(args, settings, raw, layout, figures)
    except VrError as error:
        check_stop()
        figures["error"] = f"{figures.pop('_phase', 'apply')}: {type(error).__name__}: {error}"
    figures.pop("_phase", None)
    met = [figures.get(k, False) for k in ("cold_apply_met", "incremental_add_met", "incremental_remove_met")]
    checks = [figures.get(k, False) for k in ("dnsmasq_pid_unchanged", "dns_check_passed", "dns_removed_check_passed")]
    figures["all_met"] = all(met) and all(checks) and "error" not in figures
    return figures


def measure(args, settings: Settings, raw: dict, layout: list[dict], figures: dict) -> None:
    # Cold: a fresh pipeline on an empty state dir, push to healthy.
    figures["_phase"] = "cold apply"
    pipeline = Pipeline(settings)
    mark = time.perf_counter()
    result = pipeline.apply(raw)
    figures["cold_apply_ms"] = round(ms(mark), 1)
    figures["cold_apply_met"] = figures["cold_apply_ms"] < TARGET_COLD_MS
    figures["cold_apply_timings_ms"] = with_commit(result)
    figures["cold_apply_changed"] = result.changed

    # Validate and render the full document, in the now warm process.
    figures["_phase"] = "validate"
    figures["validate_ms"] = round(median_of(lambda: pipeline.validate(raw, None), args.runs), 1)
    doc = pipeline.validate(raw, None)
    figures["_phase"] = "render"
    figures["render_ms"] = round(median_of(lambda: pipeline.plan(doc, None, force=True), args.runs), 1)

    supervisor = pipeline.runtime.supervisor
    pid_before = supervisor.pid("dnsmasq")
    figures["dnsmasq_pid"] = pid_before
    pids_seen = {pid_before}
    generation = raw["generation"]
    series = {
        kind: {"ms": [], "steps": {s: [] for s in STEPS}, "changed": set(), "gc_ms": [], "gc_full": 0}
        for kind in ("add", "remove")
    }
    gc_clock = GcClock()
    gc.callbacks.append(gc_clock)
    dns_ms, dns_tries, dns_ok, gone_ok, added = [], [], True, True, []

    def one(kind: str, payload: dict) -> None:
        check_stop()
        figures["_phase"] = f"incremental {kind} #{len(series[kind]['ms']) + 1}"
        gc_ms, gc_full = gc_clock.total_ms, gc_clock.full
        mark = time.perf_counter()
        result = pipeline.apply(payload)
        series[kind]["ms"].append(ms(mark))
        series[kind]["gc_ms"].append(gc_clock.total_ms - gc_ms)
        series[kind]["gc_full"] += gc_clock.full - gc_full
        series[kind]["changed"].update(result.changed)
        for step, value in with_commit(result).items():
            series[kind]["steps"][step].append(value)
        pids_seen.add(supervisor.pid("dnsmasq"))

    try:
        for k in range(args.repeat):
            vm = extra_vm(layout, k)
            gateway = vm.pop("_gateway")
            generation += 1
            one("add", {"generation": generation, "dhcp_entries": {"upsert": [vm]}})
            added.append((vm, gateway))
            mark = time.perf_counter()
            passed, tries = wait_resolves(f"{vm['hostname']}.{DOMAIN}.", gateway, vm["ip"])
            dns_ms.append(ms(mark))
            dns_tries.append(tries)
            dns_ok = dns_ok and passed
        for vm, gateway in added:
            generation += 1
            one("remove", {"generation": generation, "dhcp_entries": {"delete": [vm["mac"]]}})
            gone_ok = gone_ok and wait_resolves(f"{vm['hostname']}.{DOMAIN}.", gateway, None)[0]
    finally:
        gc.callbacks.remove(gc_clock)
        figures["dnsmasq_pid_unchanged"] = pids_seen == {pid_before} and pid_before is not None
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
        if dns_ms:
            figures |= {
                "dns_check_ms_median": round(statistics.median(dns_ms), 2),
                "dns_check_ms_max": round(max(dns_ms), 2),
                "dns_check_first_try": all(t == 1 for t in dns_tries),
                "dns_check_passed": dns_ok,
            }
        if series["remove"]["ms"]:
            figures["dns_removed_check_passed"] = gone_ok

    if args.profile:
        figures["_phase"] = "profiled add"
        profile_one(pipeline, layout, generation, args.repeat)


def profile_one(pipeline: Pipeline, layout: list[dict], generation: int, k: int) -> None:
    """One extra one-VM add under cProfile (not part of the figures), top functions on stderr."""
    import cProfile
    import io
    import pstats

    vm = extra_vm(layout, k)
    vm.pop("_gateway")
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
    if "dns_check_passed" in f:
        rows.append(
            (
                "DNS check after add (not in apply)",
                (
                    f"passed: {yes(f['dns_check_passed'])}  median {f['dns_check_ms_median']:.2f} ms  "
                    f"max {f['dns_check_ms_max']:.2f} ms  first try: {yes(f['dns_check_first_try'])}"
                ),
            )
        )
    if "dns_removed_check_passed" in f:
        rows.append(("DNS name gone after remove", yes(f["dns_removed_check_passed"])))
    if "dnsmasq_pid_unchanged" in f:
        rows.append(
            ("dnsmasq PID unchanged (incremental)", f"{yes(f['dnsmasq_pid_unchanged'])} (pid {f['dnsmasq_pid']})")
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
    args = parser.parse_args(argv)
    if not 1 <= args.tiers <= 62 or args.vms < 1 or args.repeat < 0 or args.runs < 1:
        parser.error("need 1 <= tiers <= 62, vms >= 1, repeat >= 0, runs >= 1")
    if os.geteuid() != 0:
        parser.error("run as root: it creates a network namespace")

    name = f"vrbench-{os.getpid()}"
    root = tempfile.mkdtemp(prefix="vrbench-")
    os.chmod(root, 0o755)  # dnsmasq drops privileges and must still read its files
    settings = Settings.under_root(root, netns=name)
    ns_created = entered = False

    def work() -> dict:
        nonlocal ns_created, entered
        if os.path.exists(f"/run/netns/{name}"):
            raise SystemExit(f"apply_scale: namespace {name} already exists; not touching it")
        ns_created = True  # from here on it is ours, even if 'ip netns add' is interrupted half-way
        run("ip", "netns", "add", name)
        add_veths(name, ["eth0", "eth1"] + [f"eth{n + 2}" for n in range(args.tiers)])
        netns.enter(name)  # before any thread exists: daemons and probes all live in there
        entered = True
        return bench(args, settings)

    figures = guarded(work, lambda: cleanup(settings, name, root, ns_created, entered))
    return report(table(figures), figures, args.json)


def cleanup(settings: Settings, name: str, root: str, ns_created: bool, entered: bool) -> None:
    if entered:
        stop_router(settings, root, "apply_scale")
    if ns_created:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
