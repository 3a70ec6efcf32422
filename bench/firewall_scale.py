"""Bench: 10,000 firewall and NAT rules in vr's one nftables table, in throwaway namespaces.

The rules are a mix, on a VPC router: one in ten is a network ACL entry of the guest tier
(half ingress, half egress: allow and deny, tcp/udp/icmp/all, two CIDRs each, numbered, each
list ending in an allow-all); of the rest, half are port forwards (single ports, tcp and udp,
spread over 16 public IPs) and half ingress firewall rules (single ports and ranges, one to
three source CIDRs each; half of them open a port forward, the rest the public IPs themselves).

Measured in-process, in the router's namespace:

  render_ms              NftablesService.generate of the 10k document           (median of --runs)
  check_ms               NftablesService.check: `nft -c -f` on the staged file   (median of --runs)
  transaction_ms         nftables.Nftables().cmd(ruleset): one libnftables call replacing
                         the live 10k table with itself                          (median of --runs)
  full_apply_ms          Pipeline.apply of nat+firewall sections, example-size rules -> 10k,
                         push to healthy (Result.duration_ms, Result.timings_ms) (median of --runs)
  incremental_apply_ms   Pipeline.apply of a one-rule payload (port_forwarding_rules/ingress_rules upsert) adding ONE port forward
                         and its ingress rule to the 10k                         (median of --repeat)
                         (each apply's Result.timings_ms and its time in Python's GC are reported too)
  incremental_apply_agent_ms   the same one-rule changes (other ports) through the daemon:
                         vr.client.RouterClient over HTTPS with a token to the agent (--no-agent: not)
  rule_by_rule_ms        the same kind of rules created one `nft add rule` process per rule, in a
                         separate namespace: --naive-rules of them measured, extrapolated linearly
  throughput_*_gbps      iperf3 guest (g1) -> router (forward, source NAT) -> public host (pub),
                         example-size ruleset vs the 10k one, alternated         (median of --iperf-runs)

Run as root:  .venv/bin/python bench/firewall_scale.py [--rules 10000 --naive-rules 1000 --repeat 10
              --iperf-seconds 3] [--json]

Everything it creates (a lab router, bench/harness.py's BenchRouter: namespaces vrb3fw<pid>-r, -pub,
-g1 (web1's address, static), ... and -naive, a temp root, supervisord, dnsmasq, iperf3) is removed
on exit, on error and on SIGINT/SIGTERM/SIGHUP; processes are stopped by PID.
The host's own interfaces are never touched: the process moves itself into the router namespace.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    BASE_INTERFACES,
    DOMAIN,
    GUEST_IP,
    PUBLIC_IPS,
    PUBLIC_PEER,
    SOURCE_NAT_IP,
    BenchRouter,
    GcClock,
    InProcessDriver,
    acl_count,
    aligned,
    attach_agent,
    baseline_rules,
    check_stop,
    incremental_rules,
    median_of,
    median_steps,
    ms,
    p90,
    push_series,
    report,
    rule_sections,
    rule_tier_dhcp,
    rule_tier_interface,
    run,
    run_bench,
    series_figures,
    series_text,
    steps_text,
    stop_process,
    stop_processes,
    yes,
)

from vr.client import ClientError
from vr.foundation import netns
from vr.foundation.errors import VrError
from vr.services.base import Change
from vr.services.nftables import RULESET, NftablesService

TARGET_FULL_MS = 300.0
TARGET_INCREMENTAL_MS = 20.0
TARGET_THROUGHPUT_RATIO = 0.95
ROUTER = "r-fwbench-vm"
IPERF_PORT = "5201"
INCREMENTAL_NOTE = "a change that only adds or removes elements is applied as one add/delete element batch"
PF_SETS = ("pf_tcp", "pf_udp", "pf_tcp_from", "pf_udp_from")
INGRESS_SETS = ("in_all", "in_tcp", "in_udp", "in_all_from", "in_tcp_from", "in_udp_from", "in_icmp", "in_icmp_typed")
LISTEN_TRIES = 300  # bounded wait for iperf3's server to listen (x 10 ms)
CHILDREN: list[subprocess.Popen] = []  # started processes (iperf3 servers), stopped by PID


# ---------------------------------------------------------------------------- the document
def base_document() -> dict:
    """The VPC router (one guest tier, as configs/examples/router.json minus tier2), example-size rules."""
    dhcp_tier, entries = rule_tier_dhcp()
    return {
        "generation": 1,
        "router": {"name": ROUTER, "type": "vpc"},
        "interfaces": [*BASE_INTERFACES, rule_tier_interface()],
        "routes": [{"destination": "0.0.0.0/0", "gateway": PUBLIC_PEER}],
        "dns": {"domain": DOMAIN, "upstream": [PUBLIC_PEER]},
        "dhcp": {"tiers": [dhcp_tier], "entries": entries},
        **baseline_rules(),
    }


def element_count(sections: dict) -> dict[str, int]:
    """Elements the live table must hold (an ACL entry: one per CIDR; the bench's never nest;
    one without CIDRs is anywhere in both families, or in its protocol's one: icmp, icmpv6)."""
    forwards = len(sections["nat"]["port_forwarding"])  # single ports, no source CIDRs: one element each
    ingress = sum(len(r.get("source_cidrs", ["0.0.0.0/0"])) for r in sections["firewall"]["ingress"])
    acl = sum(len(e["cidrs"]) if "cidrs" in e else 1 if e["protocol"] in ("icmp", "icmpv6") else 2
              for a in sections["network_acls"] for e in a["ingress"] + a["egress"])  # fmt: skip
    return {"pf": forwards, "ingress": ingress, "acl": acl}


# ---------------------------------------------------------------------------- the lab
def guest_g1(router: BenchRouter) -> None:
    """g1 (the lab gives it web1's MAC) with web1's address, statically: no DHCP client to wait for."""
    g1 = router.ns("g1")
    run("ip", "-n", g1, "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
    run("ip", "-n", g1, "route", "add", "default", "via", "10.1.1.1")


# ---------------------------------------------------------------------------- throughput
def iperf(router: BenchRouter, seconds: int) -> dict:
    """One iperf3 run, g1 -> pub through the router. Server: one-shot, bound to the public host."""
    pub, g1 = router.ns("pub"), router.ns("g1")
    # 'ip netns exec' execs iperf3 in place: this PID is iperf3's own, and it is stopped by it.
    server = subprocess.Popen(
        ["ip", "netns", "exec", pub, "iperf3", "-s", "-1", "-J", "-B", PUBLIC_PEER, "-p", IPERF_PORT],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    CHILDREN.append(server)
    try:
        for _ in range(LISTEN_TRIES):
            check_stop()
            listening = run("ip", "netns", "exec", pub, "ss", "-Hltn", f"sport = :{IPERF_PORT}").stdout.strip()
            if listening or server.poll() is not None:
                break
            time.sleep(0.01)
        client = subprocess.run(
            ["ip", "netns", "exec", g1, "iperf3", "-c", PUBLIC_PEER, "-p", IPERF_PORT,
             "-t", str(seconds), "-O", "1", "-J"],
            check=False, capture_output=True, text=True, timeout=seconds + 30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            server_out, _ = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            stop_process(server)
            server_out = ""
    finally:
        stop_process(server)
        CHILDREN.remove(server)
    report = json.loads(client.stdout or "{}")
    if client.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 client: {report.get('error') or client.stderr.strip()}")
    try:
        seen = json.loads(server_out)["start"]["connected"][0]["remote_host"]
    except (ValueError, KeyError, IndexError):
        seen = None
    return {"gbps": report["end"]["sum_received"]["bits_per_second"] / 1e9, "server_saw": seen}


# ---------------------------------------------------------------------------- rule by rule
def naive_commands(sections: dict, count: int) -> list[list[str]]:
    """One `nft add rule` per rule, as routers that script their firewall do: a dnat rule per port
    forward, an accept rule per ingress rule (its sources as an anonymous set), a forward rule
    per ACL entry; interleaved, in the mix's proportions."""
    nat, firewall = sections["nat"], sections["firewall"]
    acl = [
        (direction, e) for a in sections["network_acls"] for direction in ("ingress", "egress") for e in a[direction]
    ]
    total = len(nat["port_forwarding"]) + len(firewall["ingress"]) + len(acl)
    n_pf = round(count * len(nat["port_forwarding"]) / total)
    n_acl = round(count * len(acl) / total)
    dnat = []
    for pf in nat["port_forwarding"][:n_pf]:
        dnat.append(["add", "rule", "ip", "naive", "prerouting", "iifname", "eth1", "ip", "daddr", pf["public_ip"],
                     pf["protocol"], "dport", str(pf["public_ports"]),
                     "dnat", "to", f"{pf['private_ip']}:{pf['private_ports']}"])  # fmt: skip
    accept = []
    for rule in firewall["ingress"][: count - n_pf - n_acl]:
        sources = rule["source_cidrs"]
        saddr = [] if sources == ["0.0.0.0/0"] else ["ip", "saddr", "{ " + ", ".join(sources) + " }"]
        accept.append(["add", "rule", "ip", "naive", "public_in", "iifname", "eth1", *saddr,
                       "ip", "daddr", rule["public_ip"], rule["protocol"], "dport", str(rule["ports"]), "accept"])  # fmt: skip
    forward = []
    for direction, entry in acl[:n_acl]:
        where = ["oifname", "eth2", "ip", "saddr"] if direction == "ingress" else ["iifname", "eth2", "ip", "daddr"]
        match = ["{ " + ", ".join(entry.get("cidrs", ["0.0.0.0/0"])) + " }"]
        if entry["protocol"] in ("tcp", "udp"):
            match += [entry["protocol"], "dport", str(entry["ports"])]
        elif entry["protocol"] == "icmp":
            match += ["icmp", "type", str(entry["icmp_type"])]
        verdict = "accept" if entry["action"] == "allow" else "drop"
        forward.append(["add", "rule", "ip", "naive", "forward", *where, *match, verdict])
    out = []
    for n in range(max(len(dnat), len(accept), len(forward))):
        out += dnat[n : n + 1] + accept[n : n + 1] + forward[n : n + 1]
    return out


NAIVE_TABLE = """\
table ip naive {
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; }
  chain public_in { type filter hook prerouting priority mangle; policy accept; ct state established,related accept; }
  chain forward { type filter hook forward priority filter; policy accept; ct state established,related accept; }
}
"""


def rule_by_rule(naive_ns: str, commands: list[list[str]]) -> list[float]:
    """Each command its own `nft` process in the naive namespace; per-command wall times (ms).
    The child joins the namespace with setns() before exec (this process has no threads), so
    no 'ip netns exec' overhead is counted."""
    run("ip", "netns", "exec", naive_ns, "nft", "-f", "-", stdin=NAIVE_TABLE)
    times = []
    for argv in commands:
        check_stop()
        mark = time.perf_counter()
        subprocess.run(["nft", *argv], check=True, capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL, preexec_fn=lambda: netns.enter(naive_ns))  # fmt: skip
        times.append(ms(mark))
    listed = run("ip", "netns", "exec", naive_ns, "nft", "-a", "list", "table", "ip", "naive").stdout.splitlines()
    rules = [line for line in listed if "# handle" in line and not line.lstrip().startswith(("table ", "chain "))]
    own = NAIVE_TABLE.count("ct state established,related accept")  # the chains' own first rules
    if len(rules) - own != len(commands):
        raise RuntimeError(f"rule by rule: {len(commands)} rules added, {len(rules) - own} listed")
    return times


# ---------------------------------------------------------------------------- measuring
def loaded_elements() -> dict[str, int]:
    """Elements in the live table, per set/map (a sanity check that the 10k are really in)."""
    import nftables

    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, error = nft.cmd("list table inet vr")
    if rc != 0:
        raise RuntimeError(f"list table inet vr: {error.strip()}")
    counts = {}
    for item in json.loads(out)["nftables"]:
        for kind in ("set", "map"):
            if kind in item:
                counts[item[kind]["name"]] = len(item[kind].get("elem", []))
    return counts


def bench(args, router: BenchRouter) -> dict:
    """All the figures; a step that fails is recorded under "error" and ends the run."""
    figures: dict = {
        "rules": args.rules,
        "note_incremental": INCREMENTAL_NOTE,
        "public_ips": len(PUBLIC_IPS),
        "runs": args.runs,
        "repeat": args.repeat,
        "cpus": len(os.sched_getaffinity(0)),
        "kernel": os.uname().release,
        "targets": {
            "full_apply_ms": TARGET_FULL_MS,
            "incremental_apply_ms": TARGET_INCREMENTAL_MS,
            "throughput_ratio": TARGET_THROUGHPUT_RATIO,
        },
    }
    gc_clock = GcClock()
    gc.callbacks.append(gc_clock)
    try:
        measure(args, router, figures, gc_clock)
    except (VrError, ClientError, RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as error:
        check_stop()
        figures["error"] = f"{figures.pop('_phase', '?')}: {type(error).__name__}: {error}"
    finally:
        gc.callbacks.remove(gc_clock)
    figures.pop("_phase", None)
    met = [figures.get(k, False) for k in ("full_apply_met", "incremental_apply_met", "throughput_met")]
    figures["all_met"] = all(met) and "error" not in figures
    return figures


def measure(args, router: BenchRouter, figures: dict, gc_clock: GcClock) -> None:
    guest_g1(router)
    settings = router.settings
    raw = base_document()
    big = rule_sections(args.rules)
    small = {name: raw[name] for name in big}
    expected = element_count(big)
    figures["port_forwards"] = len(big["nat"]["port_forwarding"])
    figures["ingress_rules"] = len(big["firewall"]["ingress"])
    figures["acl_rules"] = acl_count(big)
    figures["ingress_elements"] = expected["ingress"]
    figures["document_bytes"] = len(json.dumps(big))

    figures["_phase"] = "cold apply"
    driver = InProcessDriver(settings)
    pipeline = driver.pipeline
    figures["cold_apply_ms"] = round(driver.push(raw).wall_ms, 1)
    generation = raw["generation"]

    # Full applies, alternating example-size <-> 10k; throughput measured under each, interleaved
    # so that drift on the host (other load) hits both sides alike.
    cycles = max(args.runs, args.iperf_runs)
    full, full_steps, full_gc, back, back_steps = [], [], [], [], []
    tput: dict[str, list[float]] = {"0": [], "10k": []}
    server_saw = set()
    for cycle in range(cycles):
        if cycle < args.iperf_runs and args.iperf_seconds > 0:
            figures["_phase"] = f"throughput, example-size rules #{cycle + 1}"
            run_ = iperf(router, args.iperf_seconds)
            tput["0"].append(run_["gbps"])
            server_saw.add(run_["server_saw"])
        check_stop()
        figures["_phase"] = f"full apply #{cycle + 1}"
        generation += 1
        gc_before = gc_clock.total_ms
        pushed = driver.push({"generation": generation, **big})
        full.append(pushed.wall_ms)
        full_gc.append(gc_clock.total_ms - gc_before)
        full_steps.append(pushed.timings_ms)
        figures["full_apply_changed"] = pushed.changed
        if cycle == 0:
            figures["_phase"] = "count loaded elements"
            counts = loaded_elements()
            figures["loaded_elements"] = counts
            want = {
                "pf": sum(counts.get(s, 0) for s in PF_SETS),
                "ingress": sum(counts.get(s, 0) for s in INGRESS_SETS),
                "acl": sum(n for name, n in counts.items() if name.startswith("acl_")),
            }
            figures["loaded_elements_ok"] = want == expected
            if want != expected:
                raise RuntimeError(f"the live table holds {want}, expected {expected}")
        if cycle < args.iperf_runs and args.iperf_seconds > 0:
            figures["_phase"] = f"throughput, {args.rules} rules #{cycle + 1}"
            run_ = iperf(router, args.iperf_seconds)
            tput["10k"].append(run_["gbps"])
            server_saw.add(run_["server_saw"])
        if cycle < cycles - 1:
            figures["_phase"] = f"apply back to example-size rules #{cycle + 1}"
            generation += 1
            pushed = driver.push({"generation": generation, **small})
            back.append(pushed.wall_ms)
            back_steps.append(pushed.timings_ms)
    figures |= {
        "full_apply_ms": round(statistics.median(full), 1),
        "full_apply_ms_min": round(min(full), 1),
        "full_apply_ms_max": round(max(full), 1),
        "full_apply_count": len(full),
        "full_apply_timings_ms_median": median_steps(full_steps),
        "full_apply_gc_ms_median": round(statistics.median(full_gc), 1),
        "full_apply_met": statistics.median(full) < TARGET_FULL_MS,
    }
    if back:
        figures["full_apply_back_ms"] = round(statistics.median(back), 1)
        figures["full_apply_back_timings_ms_median"] = median_steps(back_steps)
    if tput["0"] and tput["10k"]:
        zero, loaded = statistics.median(tput["0"]), statistics.median(tput["10k"])
        figures |= {
            "throughput_0_rules_gbps": round(zero, 2),
            "throughput_10k_rules_gbps": round(loaded, 2),
            "throughput_runs_gbps": {k: [round(v, 2) for v in vs] for k, vs in tput.items()},
            "throughput_ratio": round(loaded / zero, 3),
            "throughput_met": loaded / zero >= TARGET_THROUGHPUT_RATIO,
            "throughput_source_nat_seen": server_saw == {SOURCE_NAT_IP},
        }
    else:
        figures["throughput_met"] = False
        figures["throughput_skipped"] = True

    # The pieces, with the 10k table live.
    figures["_phase"] = "render"
    service = NftablesService()
    doc = pipeline.stored_document()
    runtime = pipeline.runtime
    figures["render_ms"] = round(median_of(lambda: service.generate(doc, runtime), args.runs), 1)
    text = service.generate(doc, runtime)[RULESET]
    figures["ruleset_bytes"] = len(text)
    staged = Path(tempfile.mkdtemp(prefix="stage-", dir=settings.state_dir))
    (staged / RULESET).write_bytes(text)
    figures["_phase"] = "check"
    figures["check_ms"] = round(median_of(lambda: service.check(staged, Change("nftables"), runtime), args.runs), 1)
    shutil.rmtree(staged, ignore_errors=True)

    figures["_phase"] = "transaction"
    import nftables

    ruleset = text.decode()

    def transaction() -> None:
        rc, _, error = nftables.Nftables().cmd(ruleset)
        if rc != 0:
            raise RuntimeError(f"nftables refused the ruleset: {error.strip()}")

    figures["transaction_ms"] = round(median_of(transaction, args.runs), 1)

    # Incremental: one port forward and its ingress rule, on top of the 10k (cumulative).
    series, steps, gc_ms, changed = [], [], [], set()
    forwards, ingress = list(big["nat"]["port_forwarding"]), list(big["firewall"]["ingress"])
    for j in range(args.repeat):
        check_stop()
        figures["_phase"] = f"incremental apply #{j + 1}"
        forward, rule = incremental_rules(j)
        forwards.append(forward)
        ingress.append(rule)
        generation += 1
        # What a manager sends for one new rule: the rule, not the ten thousand around it.
        payload = {"generation": generation, "port_forwarding_rules": {"upsert": [forward]},
                   "ingress_rules": {"upsert": [rule]}}  # fmt: skip
        gc_before = gc_clock.total_ms
        pushed = driver.push(payload)
        series.append(pushed.wall_ms)
        gc_ms.append(gc_clock.total_ms - gc_before)
        steps.append(pushed.timings_ms)
        changed.update(pushed.changed)
    if series:
        figures |= {
            "incremental_apply_ms_median": round(statistics.median(series), 1),
            "incremental_apply_ms_p90": round(p90(series), 1),
            "incremental_apply_ms_max": round(max(series), 1),
            "incremental_apply_count": len(series),
            "incremental_apply_timings_ms_median": median_steps(steps),
            "incremental_apply_gc_ms_median": round(statistics.median(gc_ms), 1),
            "incremental_apply_changed": sorted(changed),
            "incremental_apply_met": statistics.median(series) < TARGET_INCREMENTAL_MS,
        }
        figures["_phase"] = "count loaded elements after the incremental adds"
        counts = loaded_elements()
        figures["incremental_rules_loaded"] = sum(counts.get(s, 0) for s in PF_SETS) == len(forwards)

    if args.agent and args.repeat:
        # The same one-rule changes (other ports) through the daemon's agent, as a manager pushes.
        figures["_phase"] = "agent on"
        generation += 1
        agent = attach_agent(driver, settings, generation)
        try:
            figures["_phase"] = "incremental applies through the agent"
            pairs = [incremental_rules(args.repeat + j) for j in range(args.repeat)]
            payloads = ({"port_forwarding_rules": {"upsert": [forward]}, "ingress_rules": {"upsert": [rule]}}
                        for forward, rule in pairs)  # fmt: skip
            figures |= series_figures("incremental_apply_agent_ms", push_series(agent, payloads))
        finally:
            agent.close()

    # Rule by rule, in the naive namespace.
    figures["_phase"] = "rule by rule"
    commands = naive_commands(big, min(args.naive_rules, args.rules))
    if commands:
        times = rule_by_rule(router.ns("naive"), commands)
        measured = sum(times)
        tenth = max(1, len(times) // 10)
        extrapolated = measured * args.rules / len(times)
        figures |= {
            "rule_by_rule_measured_rules": len(times),
            "rule_by_rule_measured_ms": round(measured, 1),
            "rule_by_rule_ms_per_rule_first_10pct": round(statistics.median(times[:tenth]), 2),
            "rule_by_rule_ms_per_rule_last_10pct": round(statistics.median(times[-tenth:]), 2),
            "rule_by_rule_ms_extrapolated": round(extrapolated, 1),
            "rule_by_rule_is_extrapolated": len(times) < args.rules,
            "rule_by_rule_ratio": round(extrapolated / figures["full_apply_ms"], 1),
            "rule_by_rule_ratio_vs_transaction": round(extrapolated / figures["transaction_ms"], 1),
        }


# ---------------------------------------------------------------------------- output
def table(f: dict) -> str:
    rows = [
        (
            "rules",
            (
                f"{f['rules']}: {f.get('port_forwards', '?')} port forwards (tcp+udp, single ports, "
                f"{f['public_ips']} public IPs), {f.get('ingress_rules', '?')} ingress rules "
                f"({f.get('ingress_elements', '?')} source/port elements), {f.get('acl_rules', '?')} ACL entries"
            ),
        ),
        ("cpus available / kernel", f"{f['cpus']} / {f['kernel']}"),
    ]
    if "cold_apply_ms" in f:
        rows.append(("cold_apply_ms (example-size, not a target)", f"{f['cold_apply_ms']:.1f}"))
    if "loaded_elements" in f:
        loaded = ", ".join(f"{k} {v}" for k, v in sorted(f["loaded_elements"].items()) if v)
        rows.append(("elements in the live table", f"{loaded}  as expected: {yes(f['loaded_elements_ok'])}"))
    for key, label in (
        ("render_ms", "render_ms (generate, median)"),
        ("check_ms", "check_ms (nft -c -f, median)"),
        ("transaction_ms", "transaction_ms (1 libnftables call, median)"),
    ):
        if key in f:
            rows.append((label, f"{f[key]:.1f}"))
    if "ruleset_bytes" in f:
        rows.append(("  ruleset size", f"{f['ruleset_bytes'] / 1024:.0f} KiB"))
    if "full_apply_ms" in f:
        rows += [
            (
                f"full_apply_ms (example -> {f['rules']}, x{f['full_apply_count']})",
                (
                    f"median {f['full_apply_ms']:.1f}  min {f['full_apply_ms_min']:.1f}  max {f['full_apply_ms_max']:.1f}"
                    f"  target < {TARGET_FULL_MS:.0f}  met: {yes(f['full_apply_met'])}"
                ),
            ),
            ("  timings_ms (median)", steps_text(f["full_apply_timings_ms_median"])),
            ("  of which in Python's GC (median)", f"{f['full_apply_gc_ms_median']:.1f} ms"),
            ("  services changed", ", ".join(f["full_apply_changed"]) or "none"),
        ]
    if "full_apply_back_ms" in f:
        rows += [
            (f"apply back ({f['rules']} -> example)", f"median {f['full_apply_back_ms']:.1f}"),
            ("  timings_ms (median)", steps_text(f["full_apply_back_timings_ms_median"])),
        ]
    if "incremental_apply_ms_median" in f:
        rows += [
            (
                f"incremental_apply_ms (+1 PF +1 rule, x{f['incremental_apply_count']})",
                (
                    f"median {f['incremental_apply_ms_median']:.1f}  p90 {f['incremental_apply_ms_p90']:.1f}  "
                    f"max {f['incremental_apply_ms_max']:.1f}  target < {TARGET_INCREMENTAL_MS:.0f}  "
                    f"met: {yes(f['incremental_apply_met'])}"
                ),
            ),
            ("  timings_ms (median)", steps_text(f["incremental_apply_timings_ms_median"])),
            ("  of which in Python's GC (median)", f"{f['incremental_apply_gc_ms_median']:.1f} ms"),
            ("  services changed", ", ".join(f["incremental_apply_changed"]) or "none"),
            ("  note", f["note_incremental"]),
        ]
    if "incremental_apply_agent_ms_median" in f:
        rows += [
            (f"incremental_apply_agent_ms (x{f['incremental_apply_agent_ms_count']}, through the agent)",
             f"{series_text(f, 'incremental_apply_agent_ms')}  target < {TARGET_INCREMENTAL_MS:.0f}"),
            ("  timings_ms (median, as the daemon reports)", steps_text(f["incremental_apply_agent_timings_ms_median"])),
        ]  # fmt: skip
    if "rule_by_rule_ms_extrapolated" in f:
        label = "EXTRAPOLATED linearly" if f["rule_by_rule_is_extrapolated"] else "measured"
        rows += [
            (
                "rule_by_rule (one `nft add rule` each)",
                (
                    f"measured {f['rule_by_rule_measured_rules']} rules in {f['rule_by_rule_measured_ms']:.0f} ms "
                    f"(per rule: first 10% {f['rule_by_rule_ms_per_rule_first_10pct']:.2f} ms, "
                    f"last 10% {f['rule_by_rule_ms_per_rule_last_10pct']:.2f} ms)"
                ),
            ),
            (f"  rule_by_rule_ms for {f['rules']}", f"{f['rule_by_rule_ms_extrapolated']:.0f}  ({label})"),
            (
                "  ratio rule_by_rule / vr",
                (
                    f"{f['rule_by_rule_ratio']:.1f}x full apply, "
                    f"{f['rule_by_rule_ratio_vs_transaction']:.1f}x the transaction alone"
                ),
            ),
        ]
    if "throughput_ratio" in f:
        runs = f["throughput_runs_gbps"]
        rows += [
            ("throughput_0_rules_gbps (example-size)", f"{f['throughput_0_rules_gbps']:.2f}  runs {runs['0']}"),
            (f"throughput with {f['rules']} rules (gbps)", f"{f['throughput_10k_rules_gbps']:.2f}  runs {runs['10k']}"),
            (
                "  throughput_ratio",
                f"{f['throughput_ratio']:.3f}  target >= {TARGET_THROUGHPUT_RATIO}  met: {yes(f['throughput_met'])}",
            ),
            ("  source NAT seen by the server", yes(f["throughput_source_nat_seen"])),
        ]
    return aligned(rows, f)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=10000, help="port forwards + ingress rules (half each)")
    parser.add_argument("--naive-rules", type=int, default=1000, help="rules created one nft process each")
    parser.add_argument("--repeat", type=int, default=10, help="one-rule incremental applies")
    parser.add_argument("--runs", type=int, default=5, help="render/check/transaction runs and full-apply cycles")
    parser.add_argument("--iperf-seconds", type=int, default=3, help="per iperf3 run; 0 skips throughput")
    parser.add_argument("--iperf-runs", type=int, default=3, help="iperf3 runs per ruleset (median)")
    parser.add_argument("--no-agent", dest="agent", action="store_false",
                        help="in-process only: not the same one-rule changes through the daemon's agent")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    if not 2 <= args.rules <= 40000 or args.naive_rules < 0 or args.repeat < 0 or args.runs < 1:
        parser.error("need 2 <= rules <= 40000, naive-rules >= 0, repeat >= 0, runs >= 1")
    if args.iperf_seconds < 0 or args.iperf_runs < 1:
        parser.error("need iperf-seconds >= 0, iperf-runs >= 1")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")

    router = BenchRouter("firewall_scale", "fw", namespaces=("naive",))
    router.cleanups.append(lambda: stop_processes(CHILDREN, "firewall_scale"))
    figures = run_bench(router, lambda r: bench(args, r))
    return report(table(figures), figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
