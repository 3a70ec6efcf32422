"""Bench: the core apply pipeline at scale, with the real dnsmasq, in a throwaway namespace.

Measures what the resident control-plane process pays, in-process:

  validate_ms        Pipeline.validate(full document, None)            (median of --runs)
  render_ms          Pipeline.plan(doc, None, force=True): every file  (median of --runs)
  cold_apply_ms      first Pipeline.apply(full document) on an empty state dir, push to healthy
                     (starts supervisord, dnsmasq and radvd; lazily imported modules included)
  incremental_*_ms   one-VM dhcp_entries upsert / delete payloads, --repeat times each

By default every tier also has an IPv6 /64 in DHCPv6 mode (radvd runs; its probe solicits an
advertisement on every tier at each apply) and every VM an IPv6 address (--vms DHCPv6 entries);
--no-ipv6 gives the IPv4-only router. After each one-VM add, the new name is resolved with
dnspython against its tier gateway (timed separately), and with IPv6 its AAAA record against
the tier's IPv6 router address (timed too); after each remove both must be gone. dnsmasq's PID
(and radvd's) must stay the same across all incremental applies. Each apply's Result.timings_ms
is reported, plus "commit" (duration_ms minus the steps: document.json, events, clean-up) and
the time the apply spent in Python's cyclic garbage collector. --profile adds a cProfile of one more add.

Run as root:  .venv/bin/python bench/apply_scale.py [--vms 4000 --tiers 8 --repeat 20] [--no-ipv6] [--json]

Everything it creates (namespace vrbench-<pid> with veth pairs, a temp root, supervisord,
dnsmasq and radvd) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP. The host's own
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

from vr.foundation import netns
from vr.foundation.errors import VrError
from vr.foundation.settings import Settings
from vr.transaction.pipeline import Pipeline

TARGET_COLD_MS = 1000.0
TARGET_INCREMENTAL_MS = 50.0
DOMAIN = "cloud.internal"
ROUTER = "r-bench-vm"
BASE_NET = ipaddress.IPv4Address("10.64.0.0")  # guest tiers are carved from 10.64.0.0/10
BASE_NET6 = ipaddress.IPv6Address("2001:db8:64::")  # and their /64s from 2001:db8:64::/48 (documentation range)
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
    """One subnet per tier, each big enough for its share of the VMs plus headroom, and a /64.
    A VM's IPv6 address has the same offset in the /64 as its IPv4 address in the subnet."""
    per_tier = math.ceil(vms / tiers)
    bits = max(8, math.ceil(math.log2(per_tier + HEADROOM + 4)))
    size = 2**bits
    if tiers * size > 2**22:
        raise SystemExit("too many VMs for 10.64.0.0/10")
    layout = []
    for n in range(tiers):
        network = ipaddress.IPv4Network((int(BASE_NET) + n * size, 32 - bits))
        network6 = ipaddress.IPv6Network((int(BASE_NET6) + ((n + 1) << 64), 64))
        layout.append(
            {
                "id": f"tier{n + 1}",
                "name": f"eth{n + 2}",
                "network": network,
                "gateway": network.network_address + 1,
                "network6": network6,
                "gateway6": network6.network_address + 1,  # the router's own address in the /64
                # VM addresses start at .10 (relative to the subnet); the first per_tier are the
                # initial VMs, the next HEADROOM are for the incremental adds.
                "first": network.network_address + 10,
                "count": per_tier,
            }
        )
    return layout


def mac_for(prefix: int, n: int) -> str:
    return f"02:{prefix:02x}:" + ":".join(f"{(n >> shift) & 0xFF:02x}" for shift in (24, 16, 8, 0))


def vm_entry(tier: dict, index: int, mac: str, hostname: str, ipv6: bool) -> dict:
    """The dhcp entry of the VM at index (from .10) in its tier; with ipv6, at the same offset in the /64."""
    offset = int(tier["first"]) - int(tier["network"].network_address) + index
    entry = {"tier": tier["id"], "mac": mac, "ip": str(tier["first"] + index), "hostname": hostname}
    if ipv6:
        entry["ipv6"] = str(tier["network6"].network_address + offset)
    return entry


def build_document(vms: int, tiers: int, ipv6: bool = True) -> tuple[dict, list[dict]]:
    layout = tier_layout(vms, tiers)
    width = max(4, len(str(vms)))
    interfaces = [
        {"id": "control", "role": "control", "name": "eth0", "addresses": ["169.254.0.10/16"]},
        {"id": "public", "role": "public", "name": "eth1", "addresses": ["192.0.2.10/24"]},
    ]
    dhcp_tiers, ipv6_tiers = [], []
    for tier in layout:
        addresses = [f"{tier['gateway']}/{tier['network'].prefixlen}"]
        if ipv6:
            addresses.append(f"{tier['gateway6']}/64")
            ipv6_tiers.append({"tier": tier["id"], "mode": "dhcpv6", "lease_time": 3600})
        interfaces.append({"id": tier["id"], "role": "guest", "name": tier["name"], "addresses": addresses})
        dhcp_tiers.append({"tier": tier["id"], "lease_time": 3600})
    entries = [
        vm_entry(layout[n % tiers], n // tiers, mac_for(0, n + 1), f"vm-{n + 1:0{width}d}", ipv6) for n in range(vms)
    ]
    doc = {
        "generation": 1,
        "router": {"name": ROUTER, "type": "isolated"},
        "interfaces": interfaces,
        "routes": [{"destination": "0.0.0.0/0", "gateway": "192.0.2.1"}],
        "dns": {"domain": DOMAIN, "upstream": ["192.0.2.1"]},
        "dhcp": {"tiers": dhcp_tiers, "entries": entries},
    }
    if ipv6:
        doc["ipv6"] = {"tiers": ipv6_tiers}
    return doc, layout


def extra_vm(layout: list[dict], k: int, ipv6: bool) -> tuple[dict, dict]:
    """The k-th VM added incrementally (its own MAC prefix, addresses above the initial VMs), and its tier."""
    tier = layout[k % len(layout)]
    index = tier["count"] + k // len(layout)
    return vm_entry(tier, index, mac_for(1, k + 1), f"vm-add-{k + 1:04d}", ipv6), tier


# ---------------------------------------------------------------------------- namespace
def run(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=20, stdin=subprocess.DEVNULL, capture_output=True)


def add_veths(name: str, ifnames: list[str]) -> None:
    for n, ifname in enumerate(ifnames):
        peer = f"p{n}"
        run("ip", "netns", "exec", name, "ip", "link", "add", ifname, "type", "veth", "peer", "name", peer)
        run("ip", "netns", "exec", name, "ip", "link", "set", peer, "up")


# ---------------------------------------------------------------------------- measuring


def resolve(name: str, server: str, rdtype: str = "A", timeout: float = 0.5) -> list[str]:
    import dns.message
    import dns.query
    import dns.rdatatype

    wanted = dns.rdatatype.from_text(rdtype)
    query = dns.message.make_query(name, wanted)
    response = dns.query.udp(query, server, timeout=timeout)
    return [str(r) for rrset in response.answer for r in rrset if rrset.rdtype == wanted]


def wait_resolves(name: str, server: str, want: str | None, rdtype: str = "A") -> tuple[bool, int]:
    """(passed, tries): want=None means the name must no longer resolve. Bounded by DNS_TRIES."""
    import dns.exception

    for attempt in range(1, DNS_TRIES + 1):
        try:
            answers = resolve(name, server, rdtype)
        except (dns.exception.Timeout, OSError):
            answers = None
        if answers is not None and ((want is None and not answers) or (want is not None and want in answers)):
            return True, attempt
        time.sleep(0.01)
    return False, DNS_TRIES


class DnsCheck:
    """One record type's checks: after each add (timed, not in the apply) and after each remove."""

    def __init__(self, rdtype: str, key: str, server: str, field: str) -> None:
        self.rdtype, self.key, self.server, self.field = rdtype, key, server, field
        self.ms: list[float] = []
        self.tries: list[int] = []
        self.passed = self.gone = True

    def ask(self, vm: dict, tier: dict, want: str | None) -> tuple[bool, int]:
        return wait_resolves(f"{vm['hostname']}.{DOMAIN}.", str(tier[self.server]), want, self.rdtype)

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


def bench(args, settings: Settings) -> dict:
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
        measure(args, settings, raw, layout, figures)
    except VrError as error:
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
        mark = time.perf_counter()
        result = pipeline.apply(payload)
        series[kind]["ms"].append(ms(mark))
        series[kind]["gc_ms"].append(gc_clock.total_ms - gc_ms)
        series[kind]["gc_full"] += gc_clock.full - gc_full
        series[kind]["changed"].update(result.changed)
        for step, value in with_commit(result).items():
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
        profile_one(pipeline, layout, generation, args.repeat, args.ipv6)


def profile_one(pipeline: Pipeline, layout: list[dict], generation: int, k: int, ipv6: bool) -> None:
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
    parser.add_argument(
        "--no-ipv6", dest="ipv6", action="store_false", help="IPv4 only: no IPv6 tiers, no DHCPv6 entries"
    )
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
