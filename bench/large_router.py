"""Bench: the DESIGN's large router as one document, pushed and changed as a manager does.

One VPC router (bench/harness.py's BenchRouter, with the lab's VPN peer namespace): --vms VMs
(DHCPv4 and DHCPv6, in --tiers tiers on eth4..), --rules firewall and port-forwarding rules plus
--acl network ACL entries on tier1 (as bench/firewall_scale.py builds them), --lb-rules
load-balancer rules (two members each, on a public IP of their own), --tunnels site-to-site
tunnels against one peer charon (as bench/vpn_scale.py runs it). The other benches' payload
builders, composed.

Measured through the driver (--driver: agent, the default = vr.client.RouterClient over HTTPS with
a token, to the agent on the control address 169.254.0.10:8443, its self-signed certificate
verified; in-process = vr.transaction.pipeline.Pipeline in this process), each push answered
after the router is healthy. Through the agent the router first boots with a bootstrap document
(`vr apply`: its identity, control and public interfaces, the agent's token), as a router gets
from its manager at first boot; "empty" then means: no guest tier, rule, LB or tunnel yet.

  cold_push_ms            the whole document on an empty router, daemons starting
  one_vm_p50/p99_ms       one dhcp_entries upsert (a new VM), --changes times
  one_rule_p50/p99_ms     one ingress_rules upsert (one firewall rule), --changes times
  one_lb_p50_ms           the load_balancer section with one member's weight changed, --lb-changes
  one_tunnel_p50_ms       the vpn section with one tunnel's esp_lifetime_s changed, --tunnel-changes
  burst_changes_per_s     (agent) --burst one-VM pushes from --clients concurrent clients,
  burst_lost              generation=next; lost: answered applied but absent from the document
  burst_http_ceiling_per_s  the same clients, as many GET /healthz (no apply): what TLS, HTTP and
                          the clients allow here; burst_of_http_ceiling = burst / ceiling
  cli_one_vm_ms           (agent) `vr apply` of a one-VM payload, the CLI a thin client of the daemon
  fallback_one_vm_ms      the same through a fresh `vr apply` process with no daemon (in-process)
  rss_total_mb            RSS of vr's own processes (keeper, supervisord, the daemon/monitor), with
                          PSS and the per-process breakdown (/proc/PID/smaps_rollup)
  boot_to_healthy_ms      `vr stop`, the run dir wiped, then `vr start` until healthy
And the physical limits on this machine, measured by hand beside vr, and vr's ratio to them:
  limit_one_vm_ms         a hosts line renamed into the running dnsmasq's hostsdir until its name answers
  limit_one_rule_ms       one element added to the live nft table by one libnftables call
  one_vm_limit_ratio      one_vm_p50_ms / limit_one_vm_ms      (aim under 5)
  one_rule_limit_ratio    one_rule_p50_ms / limit_one_rule_ms  (aim under 5)

--quick: a tenth of the router and fewer changes, for development. A missed target is printed
(exit 0); an error exits 1.

Run as root:  .venv/bin/python bench/large_router.py [--quick] [--driver agent|in-process] [--json]

Everything it creates (namespaces vrb3lr<pid>-*, a temp root, supervisord and its daemons, the
peer charon) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP; processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from harness import (
    BASE_INTERFACES,
    DOMAIN,
    PUBLIC_IPS,
    PUBLIC_PEER,
    STOP,
    AgentDriver,
    BenchRouter,
    CliDriver,
    InProcessDriver,
    Pushed,
    agent_driver,
    agent_section,
    aligned,
    bench_token,
    check_stop,
    extra_vm,
    incremental_rules,
    lb_rules,
    load_peer,
    median_steps,
    memory_figures,
    ms,
    p50_p99_figures,
    report,
    router_connection,
    rule_sections,
    rule_tier_dhcp,
    rule_tier_interface,
    run_bench,
    snapshot,
    start_daemon,
    start_peer,
    stop_daemon,
    tunnel,
    vm_entries,
    vm_interfaces,
    vm_sections,
    vm_tiers,
    wait_healthz,
    wait_resolves,
    yes,
)

from vr.client import ClientError
from vr.foundation.errors import VrError
from vr.services.runtime import Runtime

ROUTER = "r-large"
LB_PUBLIC_IP = "192.0.2.40"  # the load balancer's own public IP (the rules' IPs are 192.0.2.10..25)
VM_MACS, ADDED_MACS = 0x10, 0x11  # MAC prefixes: the initial VMs, the ones added (none collides with tier1's)
TARGETS = {  # figure -> (target, "<" or ">=")
    "cold_push_ms": (1000, "<"),
    "one_vm_p50_ms": (15, "<"),
    "one_vm_p99_ms": (40, "<"),
    "one_rule_p50_ms": (10, "<"),
    "one_rule_p99_ms": (30, "<"),
    "one_lb_p50_ms": (60, "<"),
    "one_tunnel_p50_ms": (100, "<"),
    "burst_changes_per_s": (500, ">="),
    "burst_lost": (0, "<="),
    "cli_one_vm_ms": (150, "<"),
    "boot_to_healthy_ms": (2000, "<"),
    "rss_total_mb": (100, "<"),
    "one_vm_limit_ratio": (5, "<"),
    "one_rule_limit_ratio": (5, "<"),
}
SIZES = {  # name: (full, --quick)
    "vms": (4000, 400),
    "tiers": (8, 4),
    "rules": (10000, 1000),
    "acl": (1000, 100),
    "lb_rules": (200, 20),
    "tunnels": (50, 5),
    "changes": (100, 20),
    "lb_changes": (20, 5),
    "tunnel_changes": (20, 5),
    "burst": (500, 100),
    "clients": (20, 10),
    "cli_runs": (5, 3),
    "limit_runs": (20, 5),
}
ESTABLISH_TIMEOUT_S = 60.0
BURST_TIMEOUT_S = 300.0
HEALTHY_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------- the document
def build_document(args) -> tuple[dict, list[dict]]:
    """The large router: the VM tiers (apply_scale's), tier1 with the rules and the ACL
    (firewall_scale's), the load balancer, the tunnels (vpn_scale's)."""
    layout = vm_tiers(args.vms, args.tiers, first_eth=4, id_prefix="vms")
    dhcp_tiers, ipv6_tiers = vm_sections(layout, ipv6=True)
    rule_tier, rule_entries = rule_tier_dhcp()
    doc = {
        "generation": 1,
        "router": {"name": ROUTER, "type": "vpc"},
        "interfaces": [*BASE_INTERFACES, rule_tier_interface(), *vm_interfaces(layout, ipv6=True)],
        "routes": [{"destination": "0.0.0.0/0", "gateway": PUBLIC_PEER}],
        "dns": {"domain": DOMAIN, "upstream": [PUBLIC_PEER]},
        "dhcp": {"tiers": [rule_tier, *dhcp_tiers],
                 "entries": rule_entries + vm_entries(layout, args.vms, ipv6=True, mac_prefix=VM_MACS)},
        "ipv6": {"tiers": ipv6_tiers},
        **rule_sections(args.rules, extra_ips=(LB_PUBLIC_IP,), acl=args.acl),
        "load_balancer": {"rules": lb_rules(args.lb_rules, LB_PUBLIC_IP)},
        "vpn": {"site_to_site": [tunnel(i) for i in range(args.tunnels)]},
    }  # fmt: skip
    return doc, layout


# ---------------------------------------------------------------------------- measuring
class Run:
    """The router, its driver, the document as pushed so far, and the figures."""

    def __init__(self, args, router: BenchRouter, doc: dict, layout: list[dict]) -> None:
        self.args, self.router, self.doc, self.layout = args, router, doc, layout
        self.generation = doc["generation"]
        self.figures: dict = {}
        self.phase = "?"
        self.driver: InProcessDriver | AgentDriver | None = None
        self.token = ""
        self.added = 0  # VMs added so far (extra_vm's k)

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def push(self, payload: dict) -> Pushed:
        check_stop()
        pushed = self.driver.push(payload)
        if pushed.generation is not None:
            self.generation = max(self.generation, pushed.generation)
        return pushed

    def new_vm(self) -> tuple[dict, dict]:
        vm, tier = extra_vm(self.layout, self.added, ipv6=True, mac_prefix=ADDED_MACS)
        self.added += 1
        return vm, tier


def bootstrap_document(doc: dict) -> dict:
    """What a router boots with before its manager pushes anything: its identity, its control
    and public interfaces, and the agent (token, port). No guest tier, rule, LB or tunnel."""
    return {"generation": 1, "router": doc["router"], "interfaces": BASE_INTERFACES, "routes": doc["routes"],
            "dns": doc["dns"], "agent": doc["agent"]}  # fmt: skip


def cold_push(run: Run) -> None:
    """The whole document, pushed to a router that runs none of its daemons yet. In-process: on
    an empty state dir. Through the agent: the router booted with its bootstrap document (a
    `vr apply`: no daemon exists before it), so the daemon and its agent run, and nothing else."""
    settings = run.router.settings
    if run.args.driver == "agent":
        run.phase = "bootstrap (vr apply, before any daemon)"
        mark = time.perf_counter()
        CliDriver(run.router.lab).push(bootstrap_document(run.doc))
        run.phase = "bootstrap: the agent answers"
        run.driver = agent_driver(settings, run.token)
        run.figures["bootstrap_to_agent_ms"] = round(ms(mark), 1)
        run.doc["generation"] = run.generation = 2
    else:
        run.driver = InProcessDriver(settings)
    run.phase = "cold push"
    pushed = run.driver.put(run.doc)
    run.generation = max(run.generation, pushed.generation or 0)
    run.figures |= {"cold_push_ms": round(pushed.wall_ms, 1), "cold_push_timings_ms": pushed.timings_ms,
                    "cold_push_changed": pushed.changed}  # fmt: skip


def one_vm(run: Run) -> None:
    times, steps = [], []
    vm = tier = None
    for k in range(run.args.changes):
        run.phase = f"one-VM change #{k + 1}"
        vm, tier = run.new_vm()
        pushed = run.push({"generation": run.next_generation(), "dhcp_entries": {"upsert": [vm]}})
        times.append(pushed.wall_ms)
        steps.append(pushed.timings_ms)
    run.figures |= p50_p99_figures("one_vm", times) | {"one_vm_timings_ms_median": median_steps(steps)}
    if vm is not None:  # the last one answers by name (not timed)
        run.phase = "one-VM change: its name answers"
        run.figures["one_vm_resolves"] = wait_resolves(f"{vm['hostname']}.{DOMAIN}.", str(tier["gateway"]),
                                                       vm["ip"])[0]  # fmt: skip


def one_rule(run: Run) -> None:
    times, steps = [], []
    for j in range(run.args.changes):
        run.phase = f"one-rule change #{j + 1}"
        _, rule = incremental_rules(j)
        pushed = run.push({"generation": run.next_generation(), "ingress_rules": {"upsert": [rule]}})
        times.append(pushed.wall_ms)
        steps.append(pushed.timings_ms)
    run.figures |= p50_p99_figures("one_rule", times) | {"one_rule_timings_ms_median": median_steps(steps)}


def one_lb(run: Run) -> None:
    rules = run.doc["load_balancer"]["rules"]
    times = []
    for k in range(run.args.lb_changes):
        run.phase = f"one LB member change #{k + 1}"
        member = rules[k % len(rules)]["members"][0]
        member["weight"] = 2 if member.get("weight", 1) == 1 else 1
        pushed = run.push({"generation": run.next_generation(), "load_balancer": {"rules": rules}})
        times.append(pushed.wall_ms)
    run.figures |= p50_p99_figures("one_lb", times)


def one_tunnel(run: Run) -> None:
    tunnels = run.doc["vpn"]["site_to_site"]
    times = []
    for k in range(run.args.tunnel_changes):
        run.phase = f"one tunnel change #{k + 1}"
        t = tunnels[k % len(tunnels)]
        t["esp_lifetime_s"] = 3000 if t.get("esp_lifetime_s", 3600) == 3600 else 3600
        pushed = run.push({"generation": run.next_generation(), "vpn": {"site_to_site": tunnels}})
        times.append(pushed.wall_ms)
    run.figures |= p50_p99_figures("one_tunnel", times)


def tunnels_up(run: Run) -> None:
    """Bounded wait until the router's charon shows every tunnel ESTABLISHED (not timed as a target)."""
    from vr.services.strongswan import live_socket

    run.phase = "tunnels up"
    names = {router_connection(i) for i in range(run.args.tunnels)}
    deadline, up = time.monotonic() + ESTABLISH_TIMEOUT_S, set()
    mark = time.perf_counter()
    while time.monotonic() < deadline:
        check_stop()
        up = {name for name, sas in snapshot(live_socket(Runtime(run.router.settings))).items()
              if name in names and any(sa.up for sa in sas)}  # fmt: skip
        if up == names:
            break
        time.sleep(0.1)
    run.figures |= {"tunnels_established": len(up), "tunnels_established_ms": round(ms(mark), 1)}


def cli_vm_changes(run: Run, label: str, before=None, env: dict | None = None) -> list[float]:
    """--cli-runs one-VM changes, each a fresh `vr apply FILE` process (before() ahead of each,
    untimed); their wall times."""
    cli = CliDriver(run.router.lab, env)
    times = []
    for k in range(run.args.cli_runs):
        run.phase = f"{label} one-VM change #{k + 1}"
        if before:
            before()
        vm, _ = run.new_vm()
        check_stop()
        times.append(cli.push({"generation": run.next_generation(), "dhcp_entries": {"upsert": [vm]}}).wall_ms)
    return times


def cli_one_vm(run: Run) -> None:
    """`vr apply` with the daemon up: the CLI is a thin client of its local socket."""
    if run.args.driver != "agent":
        return
    times = cli_vm_changes(run, "thin CLI")
    run.figures["cli_one_vm_ms"] = round(statistics.median(times), 1)
    run.figures["cli_one_vm_runs_ms"] = [round(t, 1) for t in times]


def fallback(run: Run) -> None:
    """The same through a fresh `vr apply` process with no daemon: the daemon stopped through
    supervisord before each (an in-process apply starts it again), the CLI applying in-process."""
    settings = run.router.settings

    try:
        times = cli_vm_changes(run, "fallback", lambda: stop_daemon(settings), env={"VR_NO_DAEMON": "1"})
    finally:
        run.phase = "fallback: start the daemon again"
        start_daemon(settings)
    if run.args.driver == "agent":
        wait_healthz(settings)
    run.figures["fallback_one_vm_ms"] = round(statistics.median(times), 1)
    run.figures["fallback_one_vm_runs_ms"] = [round(t, 1) for t in times]


def burst(run: Run) -> None:
    """--burst one-VM pushes (generation=next) from --clients concurrent clients, each its own
    RouterClient. Lost: answered applied but absent from the router's document, or refused."""
    if run.args.driver != "agent":
        return
    from vr.client import RouterClient

    run.phase = "burst"
    driver = run.driver
    vms = [run.new_vm()[0] for _ in range(run.args.burst)]
    answers: list[object] = [None] * len(vms)
    clients = [RouterClient(driver.url, driver.token, ca=driver.ca) for _ in range(run.args.clients)]

    def pushing(client, indexes: range) -> None:
        for i in indexes:
            if STOP:
                return
            try:
                answers[i] = client.push({"dhcp_entries": {"upsert": [vms[i]]}}, next_generation=True)
            except ClientError as error:
                answers[i] = error

    threads = [threading.Thread(target=pushing, args=(c, range(n, len(vms), len(clients))), daemon=True)
               for n, c in enumerate(clients)]  # fmt: skip
    mark = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.1, BURST_TIMEOUT_S - (time.perf_counter() - mark)))
    wall_s = time.perf_counter() - mark
    check_stop()
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"the burst did not finish within {BURST_TIMEOUT_S:.0f} s")
    ceiling = http_ceiling(clients, len(vms))
    for client in clients:
        client.close()
    applied = [i for i, a in enumerate(answers) if isinstance(a, dict) and a.get("outcome") == "applied"]
    refused = [a for a in answers if not (isinstance(a, dict) and a.get("outcome") == "applied")]
    run.phase = "burst: the router's document"
    present = {e["mac"] for e in driver.client.config()["dhcp"]["entries"]}
    missing = sum(1 for i in applied if vms[i]["mac"] not in present)
    generations = {answers[i]["generation"] for i in applied}
    run.generation = max([run.generation, *generations])
    run.figures |= {
        "burst_changes_per_s": round(len(applied) / wall_s, 1),
        "burst_lost": missing + len(refused),
        "burst_applied": len(applied),
        "burst_refused": len(refused),
        "burst_refusals": sorted({str(a)[:200] for a in refused})[:5],
        "burst_transactions": len(generations),
        "burst_wall_ms": round(wall_s * 1000, 1),
        "burst_http_ceiling_per_s": round(ceiling, 1),
        "burst_of_http_ceiling": round(len(applied) / wall_s / ceiling, 2),
    }


def http_ceiling(clients: list, count: int) -> float:
    """The same clients asking GET /healthz (no apply, no body) as fast as they can, as
    many requests as the burst made: what TLS, HTTP and the clients themselves allow on
    this machine, the most any burst of pushes could reach."""
    threads = [threading.Thread(target=lambda c=c, n=n: [c.healthz() for _ in range(n)], daemon=True)
               for c, n in zip(clients, [len(range(k, count, len(clients))) for k in range(len(clients))])]  # fmt: skip
    mark = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.1, BURST_TIMEOUT_S - (time.perf_counter() - mark)))
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"{count} GET /healthz did not finish within {BURST_TIMEOUT_S:.0f} s")
    return count / (time.perf_counter() - mark)


def limit_one_vm(run: Run) -> None:
    """A hosts line renamed into the running dnsmasq's hostsdir (inotify), until its name answers
    (polled every ms): what a name change costs dnsmasq itself. Files removed afterwards."""
    from vr.services.dnsmasq import NAME_MIRROR

    names_dir = run.router.settings.run_dir / NAME_MIRROR  # dnsmasq's --hostsdir
    if not names_dir.is_dir():
        raise RuntimeError(f"no dnsmasq hostsdir at {names_dir}")
    tier = run.layout[0]
    times, made = [], []
    try:
        for k in range(run.args.limit_runs):
            run.phase = f"limit: hostsdir line #{k + 1}"
            check_stop()
            name, ip = f"limit-{k}", str(tier["network"].broadcast_address - 1 - k)  # above every VM
            staged = run.router.dir / f"limit-{k}.hosts"
            staged.write_text(f"{ip} {name}\n")
            mark = time.perf_counter()
            os.rename(staged, names_dir / f"vrb3-limit-{k}")  # atomic: dnsmasq sees it whole
            made.append(names_dir / f"vrb3-limit-{k}")
            answered, _ = wait_resolves(f"{name}.{DOMAIN}.", str(tier["gateway"]), ip, tries=2000, pause_s=0.001)
            if not answered:
                raise RuntimeError(f"dnsmasq never answered for {name} dropped into {names_dir}")
            times.append(ms(mark))
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    run.figures["limit_one_vm_ms"] = round(statistics.median(times), 2)


def limit_one_rule(run: Run) -> None:
    """One element added to the live table's in_tcp set by one libnftables call (one context, as
    the pipeline holds one), then deleted again (not timed)."""
    import nftables

    nft = nftables.Nftables()
    times = []
    for k in range(run.args.limit_runs):
        run.phase = f"limit: one nft element #{k + 1}"
        check_stop()
        element = f"{{ {PUBLIC_IPS[1]} . {61000 + k} }}"
        mark = time.perf_counter()
        rc, _, error = nft.cmd(f"add element inet vr in_tcp {element}")
        took = ms(mark)
        if rc != 0:
            raise RuntimeError(f"nft add element: {error.strip()}")
        times.append(took)
        nft.cmd(f"delete element inet vr in_tcp {element}")
    run.figures["limit_one_rule_ms"] = round(statistics.median(times), 3)


def memory(run: Run) -> None:
    run.phase = "memory"
    run.figures |= memory_figures(run.router.settings)


def boot(run: Run) -> None:
    """`vr stop`, the run dir wiped (as after a reboot), then `vr start` until vr status is healthy."""
    run.phase = "boot: vr stop"
    run.router.vr("stop")
    run_dir = run.router.settings.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run.phase = "boot: vr start"
    mark = time.perf_counter()
    run.router.vr("start")
    if run.args.driver == "agent":  # healthy as the manager sees it: the agent answers /healthz ok
        wait_healthz(run.router.settings, timeout_s=HEALTHY_TIMEOUT_S, pause_s=0.005)
    started = ms(mark)
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while run.router.vr("status", check=False).returncode != 0:
        check_stop()
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy within {HEALTHY_TIMEOUT_S:.0f} s of vr start")
        time.sleep(0.05)
    run.figures |= {"boot_to_healthy_ms": round(started, 1), "boot_healthy_confirmed_ms": round(ms(mark), 1)}


def bench(args, router: BenchRouter) -> dict:
    """All the figures; a step that fails is recorded under "error" and ends the run."""
    doc, layout = build_document(args)
    token = bench_token()
    if args.driver == "agent":
        doc |= agent_section(token)
    run = Run(args, router, doc, layout)
    run.token = token
    run.figures |= {"driver": args.driver, "quick": args.quick, "cpus": len(os.sched_getaffinity(0)),
                    "load_1m_start": round(os.getloadavg()[0], 2),
                    "document_bytes": len(json.dumps(doc)),
                    **{name: getattr(args, name) for name in SIZES},
                    "targets": {k: f"{op} {v}" for k, (v, op) in TARGETS.items()}}  # fmt: skip
    try:
        run.phase = "start the peer charon"
        socket_path = start_peer(router, args.tunnels)
        run.phase = "load the peer's connections"
        load_peer(socket_path, args.tunnels)
        cold_push(run)
        tunnels_up(run)
        # memory before the fallback stops the daemon: the one that served every push so far
        for step in (one_vm, one_rule, one_lb, one_tunnel, burst, cli_one_vm, memory, limit_one_vm, limit_one_rule,
                     fallback, boot):  # fmt: skip
            step(run)
    except (VrError, ClientError, RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as error:
        check_stop()
        run.figures["error"] = f"{run.phase}: {type(error).__name__}: {error}"
    f = run.figures
    f["load_1m_end"] = round(os.getloadavg()[0], 2)
    if f.get("one_vm_p50_ms") and f.get("limit_one_vm_ms"):
        f["one_vm_limit_ratio"] = round(f["one_vm_p50_ms"] / f["limit_one_vm_ms"], 1)
    if f.get("one_rule_p50_ms") and f.get("limit_one_rule_ms"):
        f["one_rule_limit_ratio"] = round(f["one_rule_p50_ms"] / f["limit_one_rule_ms"], 1)
    f["met"] = {k: met(f[k], v, op) for k, (v, op) in TARGETS.items() if f.get(k) is not None}
    f["all_met"] = "error" not in f and all(f["met"].values()) and all(k in f["met"] for k in measured(args))
    return f


def measured(args) -> list[str]:
    """The target figures this driver measures (the in-process driver has no burst and no thin CLI)."""
    return [k for k in TARGETS if args.driver == "agent" or k not in ("burst_changes_per_s", "burst_lost",
                                                                       "cli_one_vm_ms")]  # fmt: skip


def met(value: float, target: float, op: str) -> bool:
    return {"<": value < target, "<=": value <= target, ">=": value >= target}[op]


# ---------------------------------------------------------------------------- output
def table(f: dict) -> str:
    def cell(key: str, unit: str = "ms") -> str:
        if f.get(key) is None:
            return "-"
        text = f"{f[key]:g} {unit}".rstrip()
        if key in TARGETS:
            target, op = TARGETS[key]
            text += f"   target {op} {target:g}   {'met' if f['met'][key] else 'MISSED'}"
        return text

    rows = [
        ("router", (f"{f['vms']} VMs (DHCPv4+v6, {f['tiers']} tiers), {f['rules']} rules + {f['acl']} ACL entries, "
                    f"{f['lb_rules']} LB rules, {f['tunnels']} tunnels; document {f['document_bytes'] / 1024:.0f} KiB"
                    + ("  (--quick)" if f["quick"] else ""))),
        ("driver / cpus", f"{f['driver']} / {f['cpus']}"),
        ("machine load (1 min), start / end", f"{f['load_1m_start']:g} / {f['load_1m_end']:g}  (others' work shares the cpus)"),
        ("cold_push_ms", cell("cold_push_ms")),
    ]  # fmt: skip
    if "tunnels_established" in f:
        established = f"{f['tunnels_established']} of {f['tunnels']} after {f['tunnels_established_ms']:.0f} ms"
        rows.append(("  tunnels established", established))
    for name, label in (("one_vm", "one-VM change"), ("one_rule", "one-rule change"), ("one_lb", "one LB member"),
                        ("one_tunnel", "one tunnel")):  # fmt: skip
        if f.get(f"{name}_count"):
            rows += [(f"{name}_p50_ms ({label}, x{f[f'{name}_count']})", cell(f"{name}_p50_ms")),
                     (f"{name}_p99_ms", cell(f"{name}_p99_ms"))]  # fmt: skip
    for key in ("burst_changes_per_s", "burst_lost", "cli_one_vm_ms"):
        if key in f:
            rows.append((key, cell(key, {"burst_changes_per_s": "/s", "burst_lost": ""}.get(key, "ms"))))
    if "burst_http_ceiling_per_s" in f:
        rows.append(("  the clients' HTTP ceiling (GET /healthz)",
                     f"{f['burst_http_ceiling_per_s']:g} /s   the burst reached {f['burst_of_http_ceiling']:g} of it"))
    if "fallback_one_vm_ms" in f:
        rows.append(("fallback_one_vm_ms (fresh vr apply, no daemon)",
                     f"{cell('fallback_one_vm_ms')}   runs {f['fallback_one_vm_runs_ms']}"))  # fmt: skip
    if "boot_to_healthy_ms" in f:
        seen = f"(healthy seen by vr status after {f['boot_healthy_confirmed_ms']:.0f} ms)"
        rows.append(("boot_to_healthy_ms (vr start)", f"{cell('boot_to_healthy_ms')}   {seen}"))
    if "rss_total_mb" in f:
        rows.append(("rss_total_mb (vr's processes)", f"{cell('rss_total_mb', 'MB')}   PSS {f['pss_total_mb']:g} MB"))
        rows += [(f"  {p['name']} (pid {p['pid']})", f"RSS {p['rss_mb']:g} MB  PSS {p['pss_mb']:g} MB")
                 for p in f["vr_processes"]]  # fmt: skip
    for key, label in (("limit_one_vm_ms", "hostsdir line -> name answers"),
                       ("limit_one_rule_ms", "one nft element, one libnftables call")):  # fmt: skip
        if key in f:
            rows.append((f"{key} ({label})", cell(key)))
    for key in ("one_vm_limit_ratio", "one_rule_limit_ratio"):
        if key in f:
            rows.append((key, cell(key, "")))
    if "one_vm_resolves" in f:
        rows.append(("  the last VM added answers by name", yes(f["one_vm_resolves"])))
    return aligned(rows, f)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the router, fewer changes (development)")
    parser.add_argument("--driver", choices=("agent", "in-process"), default="agent",
                        help="agent: through the daemon over HTTPS, as a manager (default); in-process: a Pipeline here")  # fmt: skip
    for name in SIZES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    for name, sizes in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, sizes[1] if args.quick else sizes[0])
    if not 1 <= args.tiers <= 24 or args.vms < args.tiers or not 1 <= args.tunnels <= 200 or args.lb_rules < 1:
        parser.error("need 1 <= tiers <= 24, vms >= tiers, 1 <= tunnels <= 200, lb-rules >= 1")
    if min(args.changes, args.lb_changes, args.tunnel_changes, args.cli_runs, args.limit_runs, args.clients) < 1:
        parser.error("every count must be at least 1")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")

    router = BenchRouter("large_router", "lr", vpn=True, extra_interfaces=args.tiers)
    figures = run_bench(router, lambda r: bench(args, r))
    return report(table(figures), figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
