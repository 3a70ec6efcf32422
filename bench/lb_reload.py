"""Bench: requests through the load balancer (haproxy) while its config is reloaded every 200 ms.

A lab router (vr.lab.harness: namespaces <p>-r, -mgmt, -pub, -g1, -g2) with one load-balancer rule,
192.0.2.12:80 (http) -> web1 (g1, 10.1.1.10:8000) and db1 (g2, 10.1.2.10:8000). From the public
host (pub), two clients run concurrently, each sending --requests GETs spread over --seconds:
one on a keep-alive connection, one opening a connection per request (`Connection: close`).

  phase A  no reloads                                      (the baseline)
  phase B  the same clients while the process, inside the router namespace, applies a
           load_balancer payload every --reload-ms that flips member web1's weight 1 <-> 2:
           each apply changes haproxy.cfg, so each is `haproxy -c` then SIGUSR2 to the
           master (a hitless reload: listeners handed over to the new worker)

  phase C  (unless --no-agent) the same as B, each weight flip pushed through the daemon: vr.client.
           RouterClient over HTTPS with a token to the agent on the control address

Reported per phase and client: requests sent, failed (with the client's error messages),
p50/p99 latency in ms; for phase B, the reloads done, the achieved period and the apply times
(Pipeline.apply, push to healthy: median, p90, max, and the median of each step). The
target: 0 failed requests in phase B.

Run as root:  .venv/bin/python bench/lb_reload.py [--requests 2000 --seconds 10 --reload-ms 200] [--json]

Everything it creates (bench/harness.py's BenchRouter: namespaces vrb3lb<pid>-*, a temp root, supervisord, haproxy, dnsmasq,
dhclient, HTTP servers, fetch clients) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP;
processes are stopped by PID. The host's own interfaces are never touched: the process moves
itself into the router namespace before it applies anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    EXAMPLE_ROUTER,
    LB_IP,
    LB_PORT,
    MEMBER_PORT,
    AgentDriver,
    BenchRouter,
    InProcessDriver,
    aligned,
    attach_agent,
    check_stop,
    lb_rule,
    median_steps,
    ms,
    namespace_inode,
    p90,
    report,
    run_bench,
    series_text,
    steps_text,
    stop_process,
    stop_processes,
    yes,
)

from vr.client import ClientError
from vr.foundation.errors import VrError
from vr.lab.harness import Lab
from vr.services.haproxy import server_states

TARGET_FAILED = 0
RULE_ID = "web"
BACKENDS = {"g1": ("web1", "10.1.1.10"), "g2": ("db1", "10.1.2.10")}  # guest -> (server name, DHCP address)
CLIENTS = {"keepalive": ["--keepalive"], "close": []}  # client kind -> labserver fetch options
KIND_LABEL = {"keepalive": "keep-alive", "close": "new connection per request"}
PHASES = ("no_reload", "with_reloads", "with_reloads_agent")
PHASE_LABEL = {"no_reload": "no reloads", "with_reloads": "reloads", "with_reloads_agent": "reloads through the agent"}
READY_TRIES = 100  # bounded wait for both members UP (x 100 ms)
CLIENT_GRACE_S = 60  # a client may run this long beyond --seconds before it is killed
CHILDREN: list[subprocess.Popen] = []  # fetch clients, stopped by PID


# ---------------------------------------------------------------------------- the document
def nat_section() -> dict:
    nat = json.loads(EXAMPLE_ROUTER.read_text())["nat"]
    nat["public_ips"].append({"ip": LB_IP})
    return nat


def lb_payload(generation: int, web1_weight: int, interval_ms: int) -> dict:
    members = [{"ip": BACKENDS["g1"][1], "weight": web1_weight}, {"ip": BACKENDS["g2"][1], "weight": 1}]
    rule = lb_rule(RULE_ID, LB_IP, LB_PORT, members, interval_ms, protocol="http")
    return {"generation": generation, "nat": nat_section(), "load_balancer": {"rules": [rule]}}


# ---------------------------------------------------------------------------- processes
def haproxy_processes(inode: int) -> int:
    """haproxy processes in the router namespace: the master, its worker and old workers draining."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if (
                os.stat(f"/proc/{entry}/ns/net").st_ino == inode
                and Path(f"/proc/{entry}/comm").read_text().strip() == "haproxy"
            ):
                count += 1
        except OSError:
            continue
    return count


def start_clients(lab: Lab, args) -> dict[str, subprocess.Popen]:
    clients = {}
    for kind, options in CLIENTS.items():
        process = lab.fetch(lab.ns("pub"), LB_IP, LB_PORT, "--count", str(args.requests),
                            "--seconds", str(args.seconds), "--timeout", str(args.timeout), *options,
                            wait=False)  # fmt: skip
        CHILDREN.append(process)
        clients[kind] = process
    return clients


def note_ended(clients: dict[str, subprocess.Popen], ended: dict[str, float], started: float) -> bool:
    """Record when each client ended (seconds since started, its start-up included); True once all have."""
    for kind, process in clients.items():
        if kind not in ended and process.poll() is not None:
            ended[kind] = time.monotonic() - started
    return len(ended) == len(clients)


def finish_clients(clients: dict[str, subprocess.Popen], ended: dict[str, float], started: float, args) -> dict:
    """Each client's JSON summary (sent, answers, failed, errors, p50_ms, p99_ms) and when it
    ended, polled every 20 ms; bounded in time."""
    deadline = started + args.seconds + CLIENT_GRACE_S
    while not note_ended(clients, ended, started) and time.monotonic() < deadline:
        check_stop()
        time.sleep(0.02)
    outcomes = {}
    for kind, process in clients.items():
        if kind not in ended:
            stop_process(process)
            CHILDREN.remove(process)
            raise RuntimeError(f"the {kind} client did not finish within {args.seconds + CLIENT_GRACE_S} s")
        out, err = process.communicate(timeout=5)
        CHILDREN.remove(process)
        if process.returncode != 0:
            raise RuntimeError(f"the {kind} client exited {process.returncode}: {err.strip()[-500:]}")
        outcome = json.loads(out)
        outcome["elapsed_s"] = round(ended[kind], 2)
        outcomes[kind] = outcome
    return outcomes


# ---------------------------------------------------------------------------- measuring
def wait_ready(lab: Lab, driver: InProcessDriver) -> float:
    """Both members UP by haproxy's health checks, then both answer through the LB. Bounded."""
    mark = time.perf_counter()
    states: dict = {}
    for _ in range(READY_TRIES):
        check_stop()
        try:
            states = server_states(driver.runtime).get(RULE_ID, {})
        except OSError:
            states = {}
        if len(states) == len(BACKENDS) and all(state == "UP" for state in states.values()):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"members never all came up in {READY_TRIES / 10:.0f} s: {states}")
    probe = lab.fetch(lab.ns("pub"), LB_IP, LB_PORT, "--count", "4", "--timeout", "2")
    if probe["failed"] or set(probe["answers"]) != {name for name, _ in BACKENDS.values()}:
        raise RuntimeError(f"the LB does not serve both members: {probe}")
    return ms(mark)


def reload_loop(driver: InProcessDriver | AgentDriver, runtime, clients: dict[str, subprocess.Popen], ended: dict,
                started: float, state: dict, args) -> dict:  # fmt: skip
    """Apply a weight flip every --reload-ms until both clients are done. Bounded in count and time."""
    period = args.reload_ms / 1000
    limit = math.ceil((args.seconds + CLIENT_GRACE_S) / period)
    inode = namespace_inode()
    supervisor = runtime.supervisor
    master_before = supervisor.pid("haproxy")
    durations, steps, starts, changed, processes = [], [], [], set(), []
    not_reloaded = 0
    deadline = time.monotonic() + args.seconds + CLIENT_GRACE_S
    next_at = time.monotonic()
    for n in range(limit):
        check_stop()
        if note_ended(clients, ended, started) or time.monotonic() > deadline:
            break
        time.sleep(max(0.0, next_at - time.monotonic()))
        starts.append(time.monotonic())
        next_at = max(next_at + period, time.monotonic())  # late: no catch-up burst
        state["generation"] += 1
        state["phase"] = f"reload #{n + 1}"
        pushed = driver.push(lb_payload(state["generation"], 2 if n % 2 == 0 else 1, args.interval_ms))
        durations.append(pushed.wall_ms)
        steps.append(pushed.timings_ms)
        changed.update(pushed.changed)
        not_reloaded += "haproxy" not in pushed.changed
        processes.append(haproxy_processes(inode))
    master_after = supervisor.pid("haproxy")
    report = {
        "reloads_done": len(durations) - not_reloaded,
        "reload_applies": len(durations),
        "reload_applies_without_haproxy_change": not_reloaded,
        "reload_changed": sorted(changed),
        "haproxy_master_pid_unchanged": master_before is not None and master_before == master_after,
        "haproxy_processes_max": max(processes, default=0),
        "haproxy_processes_after_last_reload": processes[-1] if processes else 0,
    }
    if durations:
        report |= {
            "reload_apply_ms_median": round(statistics.median(durations), 1),
            "reload_apply_ms_p90": round(p90(durations), 1),
            "reload_apply_ms_max": round(max(durations), 1),
            "reload_apply_timings_ms_median": median_steps(steps),
        }
    if len(starts) > 1:
        report["reload_period_ms_achieved"] = round((starts[-1] - starts[0]) * 1000 / (len(starts) - 1), 1)
    return report


def phase(lab: Lab, args, during=None) -> dict[str, dict]:
    started, ended = time.monotonic(), {}
    clients = start_clients(lab, args)
    extra = during(clients, ended, started) if during else {}
    outcomes = finish_clients(clients, ended, started, args)
    return {"clients": outcomes, **extra}


def record(figures: dict, name: str, outcomes: dict[str, dict]) -> None:
    """Per client kind, then the phase totals: sent and failed summed, p99 the worse of the two."""
    for kind, o in outcomes.items():
        figures |= {
            f"sent_{name}_{kind}": o["sent"],
            f"failed_{name}_{kind}": o["failed"],
            f"p50_ms_{name}_{kind}": None if o["p50_ms"] is None else round(o["p50_ms"], 2),
            f"p99_ms_{name}_{kind}": None if o["p99_ms"] is None else round(o["p99_ms"], 2),
            f"answers_{name}_{kind}": o["answers"],
            f"errors_{name}_{kind}": o["errors"],
            f"elapsed_s_{name}_{kind}": o["elapsed_s"],
            f"achieved_rps_{name}_{kind}": round(o["sent"] / o["elapsed_s"], 1),
        }
    p99s = [o["p99_ms"] for o in outcomes.values() if o["p99_ms"] is not None]
    figures |= {
        f"sent_{name}": sum(o["sent"] for o in outcomes.values()),
        f"failed_{name}": sum(o["failed"] for o in outcomes.values()),
        f"p99_ms_{name}": round(max(p99s), 2) if p99s else None,
    }


def bench(args, lab: Lab) -> dict:
    """All the figures; a step that fails is recorded under "error" and ends the run."""
    figures: dict = {
        "requests_per_client": args.requests,
        "clients": len(CLIENTS),
        "seconds": args.seconds,
        "rate_per_client_rps": round(args.requests / args.seconds, 1),
        "reload_ms": args.reload_ms,
        "health_check_interval_ms": args.interval_ms,
        "cpus": len(os.sched_getaffinity(0)),
        "haproxy_version": haproxy_version(),
        "targets": {"failed_with_reloads": TARGET_FAILED},
    }
    state = {"generation": 0, "phase": "?"}
    try:
        measure(args, lab, figures, state)
    except (VrError, ClientError, RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as error:
        check_stop()
        figures["error"] = f"{state['phase']}: {type(error).__name__}: {error}"
    if "failed_with_reloads" in figures:
        figures["reload_met"] = figures["failed_with_reloads"] <= TARGET_FAILED and figures.get("reloads_done", 0) > 0
    else:
        figures["reload_met"] = False
    if "failed_with_reloads_agent" in figures:
        figures["reload_agent_met"] = (figures["failed_with_reloads_agent"] <= TARGET_FAILED
                                       and figures.get("reloads_done_agent", 0) > 0)  # fmt: skip
    figures["all_met"] = (figures["reload_met"] and figures.get("reload_agent_met", True)
                          and figures.get("failed_no_reload") == 0 and "error" not in figures)  # fmt: skip
    return figures


def measure(args, lab: Lab, figures: dict, state: dict) -> None:
    driver = InProcessDriver(lab.settings)
    state["phase"] = "apply configs/examples/router.json"
    example = json.loads(EXAMPLE_ROUTER.read_text())
    driver.push(example)
    state["generation"] = example["generation"]
    for guest in BACKENDS:
        check_stop()
        state["phase"] = f"DHCP in {guest}"
        lease = lab.dhcp(guest)
        if lease["address"] != BACKENDS[guest][1]:
            raise RuntimeError(f"{guest} leased {lease['address']}, expected {BACKENDS[guest][1]}")
    state["phase"] = "start the HTTP servers"
    for guest, (name, _) in BACKENDS.items():
        lab.serve(lab.ns(guest), name, MEMBER_PORT, http=True)
    state["phase"] = "apply the load-balancer rule"
    state["generation"] += 1
    pushed = driver.push(lb_payload(state["generation"], 1, args.interval_ms))
    figures["lb_first_apply_ms"] = round(pushed.wall_ms, 1)
    figures["lb_first_apply_changed"] = pushed.changed
    state["phase"] = "wait for both members"
    figures["ready_ms"] = round(wait_ready(lab, driver), 1)

    check_stop()
    state["phase"] = "phase A (no reloads)"
    record(figures, "no_reload", phase(lab, args)["clients"])

    check_stop()
    state["phase"] = "phase B (reloads)"
    outcome = phase(lab, args, lambda *running: reload_loop(driver, driver.runtime, *running, state, args))
    state["phase"] = "phase B (reloads), results"
    record(figures, "with_reloads", outcome.pop("clients"))
    figures |= outcome

    if args.agent:  # phase C: the same, the weight flips pushed through the daemon's agent
        check_stop()
        state["phase"] = "agent on"
        state["generation"] += 1
        agent = attach_agent(driver, lab.settings, state["generation"])
        try:
            state["phase"] = "phase C (reloads through the agent)"
            outcome = phase(lab, args, lambda *running: reload_loop(agent, driver.runtime, *running, state, args))
        finally:
            agent.close()
        state["phase"] = "phase C (reloads through the agent), results"
        record(figures, "with_reloads_agent", outcome.pop("clients"))
        figures |= {agent_name(k): v for k, v in outcome.items()}


def agent_name(key: str) -> str:
    """A reload figure's name for phase C: reload_apply_ms_median -> reload_apply_agent_ms_median."""
    return key.replace("_ms", "_agent_ms", 1) if "_ms" in key else f"{key}_agent"


def haproxy_version() -> str:
    try:
        out = subprocess.run(["haproxy", "-v"], check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.split("\n")[0].removeprefix("HAProxy version ").split(" ")[0]


# ---------------------------------------------------------------------------- output
def table(f: dict) -> str:
    def latency(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [
        (
            "load",
            (
                f"{f['clients']} clients at once, each {f['requests_per_client']} GETs over {f['seconds']} s "
                f"({f['rate_per_client_rps']:.0f} req/s each): {KIND_LABEL['keepalive']}, {KIND_LABEL['close']}"
            ),
        ),
        ("cpus available / haproxy", f"{f['cpus']} / {f['haproxy_version']}"),
    ]
    if "lb_first_apply_ms" in f:
        rows.append(("first LB apply (starts haproxy)", f"{f['lb_first_apply_ms']:.1f} ms"))
    if "ready_ms" in f:
        rows.append(("both members UP and answering after", f"{f['ready_ms']:.0f} ms"))
    for name in PHASES:
        if f"sent_{name}" not in f:
            continue
        for kind in CLIENTS:
            answers = ", ".join(f"{k} {v}" for k, v in sorted(f[f"answers_{name}_{kind}"].items())) or "none"
            rows.append(
                (
                    f"{PHASE_LABEL[name]}, {KIND_LABEL[kind]}",
                    (
                        f"sent {f[f'sent_{name}_{kind}']}  failed {f[f'failed_{name}_{kind}']}  "
                        f"p50 {latency(f[f'p50_ms_{name}_{kind}'])} ms  p99 {latency(f[f'p99_ms_{name}_{kind}'])} ms  "
                        f"answers: {answers}  done after {f[f'elapsed_s_{name}_{kind}']:.1f} s"
                    ),
                )
            )
            achieved = f[f"achieved_rps_{name}_{kind}"]
            if achieved < 0.9 * f["rate_per_client_rps"]:
                rows.append(
                    (
                        "  BEHIND its schedule",
                        (
                            f"{achieved:.0f} req/s achieved (start-up included) of {f['rate_per_client_rps']:.0f}: "
                            "one request at a time, and answers took longer than the gap between requests"
                        ),
                    )
                )
            for error in f[f"errors_{name}_{kind}"]:
                rows.append(("  client error (first 10 at most)", error))
        rows.append(
            (
                f"  {PHASE_LABEL[name]}: total",
                f"sent {f[f'sent_{name}']}  failed {f[f'failed_{name}']}  p99 {latency(f[f'p99_ms_{name}'])} ms (worse client)",
            )
        )
    if "reload_applies" in f:
        period = f.get("reload_period_ms_achieved")
        rows += [
            (
                f"reloads (one apply every {f['reload_ms']} ms)",
                (
                    f"{f['reloads_done']} reloads in {f['reload_applies']} applies, "
                    f"achieved period {'-' if period is None else f'{period:.0f}'} ms; services changed: "
                    f"{', '.join(f['reload_changed']) or 'none'}"
                ),
            ),
        ]
        if "reload_apply_ms_median" in f:
            rows += [
                (
                    "  reload apply ms (push to healthy)",
                    (
                        f"median {f['reload_apply_ms_median']:.1f}  p90 {f['reload_apply_ms_p90']:.1f}  "
                        f"max {f['reload_apply_ms_max']:.1f}"
                    ),
                ),
                ("  timings_ms (median)", steps_text(f["reload_apply_timings_ms_median"])),
            ]
        rows += [
            ("  haproxy master pid unchanged", yes(f["haproxy_master_pid_unchanged"])),
            (
                "  haproxy processes (master + workers)",
                f"max {f['haproxy_processes_max']}, {f['haproxy_processes_after_last_reload']} after the last reload",
            ),
        ]
    if "reload_applies_agent" in f:
        done = f"{f['reloads_done_agent']} reloads in {f['reload_applies_agent']} applies"
        kept = yes(f["haproxy_master_pid_unchanged_agent"])
        rows.append(("reloads through the agent", f"{done}; haproxy master pid unchanged: {kept}"))
        if "reload_apply_agent_ms_median" in f:
            rows.append(("  reload apply ms (push to healthy, agent)", series_text(f, "reload_apply_agent_ms")))
    if "failed_with_reloads_agent" in f:
        verdict = f"{f['failed_with_reloads_agent']}  target {TARGET_FAILED}  met: {yes(f['reload_agent_met'])}"
        rows.append(("failed_with_reloads_agent", verdict))
    if "failed_with_reloads" in f:
        rows.append(
            (
                "failed_with_reloads",
                f"{f['failed_with_reloads']}  target {TARGET_FAILED}  met: {yes(f['reload_met'])}",
            )
        )
    return aligned(rows, f)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="GETs per client (two clients run at once)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each client spreads its requests over this long")
    parser.add_argument("--reload-ms", type=int, default=200, help="period of the reloads in phase B")
    parser.add_argument("--interval-ms", type=int, default=500, help="haproxy's health-check interval")
    parser.add_argument("--timeout", type=float, default=5.0, help="the clients' per-request timeout (s)")
    parser.add_argument("--no-agent", dest="agent", action="store_false",
                        help="no phase C: the same reloads pushed through the daemon's agent")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 0.1 <= args.seconds <= 600:
        parser.error("need 1 <= requests <= 100000 and 0.1 <= seconds <= 600")
    if args.reload_ms < 20 or args.interval_ms < 100 or args.timeout <= 0:
        parser.error("need reload-ms >= 20, interval-ms >= 100, timeout > 0")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")

    router = BenchRouter("lb_reload", "lb")
    router.cleanups.append(lambda: stop_processes(CHILDREN, "lb_reload"))
    figures = run_bench(router, lambda r: bench(args, r.lab))
    return report(table(figures), figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
