"""Bench: what clients of a lab router see while `vr patch apply` and `vr patch rollback` run.

A lab router (vr.lab.harness: namespaces <p>-r, -mgmt, -pub, -g1, -g2) with configs/examples/router.json,
guests g1 and g2 leased (10.1.1.10, 10.1.2.10), HTTP servers web1 (g1) and db1 (g2) on port 8000
behind one load-balancer rule 192.0.2.12:80 (haproxy, HTTP mode, health checks every 200 ms), a
TCP `serve` in g1 on port 80 behind the example port forward 192.0.2.10:8080 -> 10.1.1.10:80.
The patch is patches/examples/0.1.1 (haproxy adds `X-Vr-Release: 0.1.1` to HTTP answers: the
haproxy config changes, haproxy reloads, the monitor restarts on the new code), built and signed
here with a key made here, which the router is told to trust.

Each run: a baseline window (the traffic alone), then `vr patch apply BUNDLE --json`, then
`vr patch rollback --json`, each inside a traffic window (a command refused because a push
holds the router's lock, exit 75, is run again every 20 ms, at most 100 times, and counted) (vr/lab/traffic.py, --seconds long; the
command starts 1 s into it):
  ping  g1 -> the public host 192.0.2.1, 1,000 packets/s (source NAT)        lost
  http  public host -> 192.0.2.12:80, 100 GETs/s, a fresh connection each      failed
  tcp   public host -> 192.0.2.10:8080, one connection, a line every 50 ms     held (never failed)
  dns   g2 -> 10.1.2.1, A web1.cloud.internal every 10 ms, 50 ms to answer     failed, longest gap
                                             (and how many of the failed were answered late, < 1 s)
  dhcp  g2: a real dhclient renewal (DHCPREQUEST of its lease) every 0.5 s     failed, address kept
  agent the manager (mgmt namespace) -> the agent on 169.254.0.10:8443 over HTTPS with a token,
        --agent-rate requests/s: GET /v1/status and one-VM pushes in turn, no retries   failed
  guest data  g1 -> 10.1.1.1: its meta data (port 80) and the password service (8080,
        saved_password), 50 requests/s each, a fresh connection each, 5 s to answer
        (cloud-init's)                                                    failed, slowest
After each command: 10 GETs with the header read: X-Vr-Release 0.1.1 after apply, absent after
rollback. The command's wall time and the duration_ms it reports are recorded, and how much of
the window was left after it (under 0.5 s: the window did not cover it; a longer --seconds does).

The machine, per window, to tell the router's doing from the machine's: whether dnsmasq kept its
PID, the load average, the CPU pressure (PSI "some": the share of the window in which a runnable
task waited for a CPU), dnsmasq's own wait for a CPU (/proc/<pid>/schedstat; a DNS answer late by
~N ms with dnsmasq waiting ~N ms is CPU starvation, not the router), and how many network
namespaces of others exist (other sessions' labs on the same CPUs).

Targets: 0 pings lost, 0 HTTP requests failed, 0 agent requests failed, 0 guest data requests failed, the TCP
connection held, 0 DNS queries failed and
the longest DNS gap < 100 ms, 0 DHCP renewals failed and the address kept, the header right
(the baseline's are shown, not counted). With --runs N, baseline + apply + rollback N times;
the worst of the runs is reported (the most lost,
failed, longest, slowest; the fewest sent; held/kept only if held/kept every time). A missed target
is printed (exit 0); an error exits 1.

Run as root:  .venv/bin/python bench/patch_zero_downtime.py [--seconds 4 --runs 1] [--json]

Everything it creates (bench/harness.py's BenchRouter: namespaces vrb3pz<pid>-*, a temp root with the bundle and the key,
supervisord and its daemons, dhclient, the servers, the traffic clients) is removed on exit,
on error and on SIGINT/SIGTERM/SIGHUP; processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    LB_IP,
    LB_PORT,
    MEMBER_PORT,
    BenchRouter,
    CliDriver,
    agent_section,
    agent_traffic_result,
    aligned,
    bench_token,
    check_stop,
    lb_payload,
    report,
    run_bench,
    start_agent_traffic,
    stop_processes,
    wait_healthz,
    yes,
)

from vr.lab.harness import Lab
from vr.lab.traffic import Traffic

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "configs" / "examples"
PATCH_EXAMPLE, VERSION, HEADER = REPO / "patches" / "examples" / "0.1.1", "0.1.1", "X-Vr-Release"
BUSY_EXIT, BUSY_RETRIES, BUSY_PAUSE_S = 75, 100, 0.02  # `vr patch` finding the router's lock held: tried again
AGENT_VM = {"tier": "tier1", "mac": "02:00:00:00:01:60", "ip": "10.1.1.60", "hostname": "agent-vm"}  # pushed in turn
MEMBERS = {"g1": ("web1", "10.1.1.10"), "g2": ("db1", "10.1.2.10")}  # guest -> (server name, leased address)
FORWARD, FORWARD_GUEST, FORWARD_PORT = ("192.0.2.10", 8080), "g1", 80  # router.json's port forward web-http
DNS_NAME, DNS_ANSWER = "web1.cloud.internal", "10.1.1.10"
LEAD_S = 1.0  # traffic before the command
COVERED_S = 0.5  # traffic left after the command, at least, for the window to count as covering it
TARGET_DNS_GAP_MS = 100.0
PHASES = ("apply", "rollback")  # the measured commands
WINDOWS = ("baseline", *PHASES)  # baseline: the same traffic window without a command
PER_RUN = ("wall_ms", "duration_ms", "ping_lost", "http_failed", "tcp_held", "dns_failed", "dns_max_gap_ms",
           "dns_late_answers", "dhcp_failed", "dhcp_address_kept", "tail_s", "load_1m", "cpu_pressure_pct",
           "dnsmasq_cpu_wait_ms", "agent_failed", "guest_data_failed", "password_failed")  # fmt: skip
CHILDREN: list[subprocess.Popen] = []  # the servers, stopped by PID
TRAFFIC: list[Traffic] = []  # every traffic window, stopped (again) on the way out


# ---------------------------------------------------------------------------- the lab
def serve(lab: Lab, guest: str, name: str, port: int, http: bool, seconds: float) -> None:
    """A labserver serve(-http) in the guest, living as long as the run; stopped by PID."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns(guest), sys.executable, "-m", "vr.lab.server",
         "serve-http" if http else "serve", "--name", name, "--port", str(port), "--seconds", f"{seconds:.0f}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    CHILDREN.append(process)
    readable, _, _ = select.select([process.stdout], [], [], 15)
    if not readable or process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the server {name} in {guest}:{port} did not start")


def lifetime_s(args) -> float:
    """The run's bound: the lab, then per run two windows and two commands (each bounded by 120 s)."""
    return 600 + args.runs * 2 * (args.seconds + 60 + 120)


def build(lab: Lab, root: Path, args, state: dict) -> Path:
    """The lab, its servers and LB rule; the signed bundle, its key trusted. The bundle's path."""
    state["phase"] = "apply configs/examples/router.json"
    cli = CliDriver(lab)  # an operator's `vr apply` processes
    cli.push(json.loads((EXAMPLES / "router.json").read_text()))
    for guest, (name, address) in MEMBERS.items():
        state["phase"] = f"DHCP in {guest}"
        lease = lab.dhcp(guest)
        if lease["address"] != address:
            raise RuntimeError(f"{guest} leased {lease['address']}, expected {address}")
        state["phase"] = f"start the servers in {guest}"
        serve(lab, guest, name, MEMBER_PORT, http=True, seconds=lifetime_s(args))
    serve(lab, FORWARD_GUEST, "web1", FORWARD_PORT, http=False, seconds=lifetime_s(args))
    state["phase"] = "apply the load-balancer rule"
    token = bench_token()  # the agent on: the manager's requests are part of the traffic
    state["token_file"] = root / "agent.token"
    state["token_file"].write_text(token)
    state["token_file"].chmod(0o600)
    cli.push(lb_payload(2, [ip for _, ip in MEMBERS.values()]) | agent_section(token))
    if not lab.wait_lb_up():
        raise RuntimeError(f"the LB members never came up: {lab.lb_states()}")
    state["phase"] = "the agent answers"
    wait_healthz(lab.settings, namespace=lab.ns("mgmt"))
    state["phase"] = f"make the {VERSION} bundle"
    source, keys, bundle = root / f"src-{VERSION}", root / "keys", root / f"vr-{VERSION}.tar.gz"
    keys.mkdir(mode=0o700)
    made = subprocess.run([sys.executable, str(REPO / "patches" / "make_source.py"), str(PATCH_EXAMPLE), str(source)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    if made.returncode != 0:
        raise RuntimeError(f"make_source.py: {made.stderr.strip() or made.stdout.strip()}")
    lab.vr("patch", "keygen", "-o", str(keys / "bench"))
    lab.vr("patch", "build", str(source), "--version", VERSION, "--key", str(keys / "bench.key"), "-o", str(bundle))
    trusted = lab.settings.trusted_keys_dir
    trusted.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keys / "bench.pub", trusted / "bench.pub")
    return bundle


# ---------------------------------------------------------------------------- measuring
def window(router: BenchRouter, args, command: list[str] | None, state: dict) -> dict:
    """Traffic for --seconds, the command LEAD_S into it (None: no command, the baseline); the
    command's and the traffic's figures, and the machine's load average when the window began."""
    lab = router.lab
    manager = start_agent_traffic(router, state["token_file"], args.seconds, args.agent_rate, AGENT_VM)
    traffic = Traffic(lab, seconds=args.seconds, lb_ip=LB_IP, lb_port=LB_PORT, header=HEADER, forward=FORWARD,
                      dns_name=DNS_NAME, dns_answer=DNS_ANSWER, dns_guest="g2", ping_guest="g1", dhcp_guest="g2",
                      guest_data=("g1", "10.1.1.1"))  # fmt: skip
    TRAFFIC.append(traffic)
    load, dnsmasq = os.getloadavg()[0], service_pid(lab, "dnsmasq")
    waited, stalled, began = runqueue_wait_ns(dnsmasq), cpu_stall_us(), time.monotonic()
    result, mark, done, busy = None, None, None, 0
    with traffic:
        while time.monotonic() < traffic.started + LEAD_S:
            check_stop()
            time.sleep(min(0.05, max(0.0, traffic.started + LEAD_S - time.monotonic())))
        if command is not None:
            mark = time.monotonic()
            result = lab.vr(*command, check=False)
            while result.returncode == BUSY_EXIT and busy < BUSY_RETRIES:  # a push through the agent holds the lock
                busy += 1
                time.sleep(BUSY_PAUSE_S)
                result = lab.vr(*command, check=False)
            done = time.monotonic()
    elapsed = time.monotonic() - began
    agent = agent_traffic_result(manager, args.seconds + 30)
    router.children.remove(manager)
    machine = {
        "load_1m": round(load, 2),
        "cpu_pressure_pct": None if stalled is None else round((cpu_stall_us() - stalled) / 1e4 / elapsed, 1),
        "dnsmasq_cpu_wait_ms": None if waited is None else round((runqueue_wait_ns(dnsmasq) - waited) / 1e6, 1),
        "dnsmasq_pid_kept": service_pid(lab, "dnsmasq") == dnsmasq,
        "other_namespaces": len(other_namespaces(lab)),
    }
    figures = traffic.result() | machine | {"agent_sent": agent["sent"], "agent_failed": agent["failed"],
                                              "agent_pushes": agent["pushes"], "agent_errors": agent["errors"],
                                              "agent_max_ms": round(agent["max_ms"], 1), "busy_retries": busy}  # fmt: skip
    if result is None:
        return figures | dict.fromkeys(("wall_ms", "duration_ms", "from_to", "outcome", "lead_s", "tail_s"))
    if result.returncode != 0:
        raise RuntimeError(f"vr {' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    return figures | {
        "wall_ms": round((done - mark) * 1000, 1),
        "duration_ms": reported["duration_ms"],
        "outcome": reported["outcome"],
        "from_to": f"{reported['from']} -> {reported['to']}",
        "lead_s": round(mark - traffic.started, 2),
        "tail_s": round(traffic.started + args.seconds - done, 2),
    }


def service_pid(lab: Lab, name: str) -> int | None:
    report = json.loads(lab.vr("status", "--json", check=False).stdout)  # exit 1 while unhealthy
    return next((s["pid"] for s in report["services"] if s["name"] == name), None)


def runqueue_wait_ns(pid: int | None) -> int | None:
    """How long the process has waited, runnable, for a CPU (/proc/<pid>/schedstat, field 2)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_stall_us() -> int | None:
    """The machine's CPU pressure: total time some runnable task waited for a CPU (PSI, µs)."""
    try:
        return int(re.search(r"^some .*total=(\d+)", Path("/proc/pressure/cpu").read_text(), re.MULTILINE).group(1))
    except (OSError, AttributeError):
        return None


def other_namespaces(lab: Lab) -> list[str]:
    """Network namespaces not ours: other sessions' labs, whose load shares the CPUs."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False).stdout
    return sorted({line.split()[0] for line in listed.splitlines() if line.strip()} - set(lab.namespaces))


def header_after(lab: Lab) -> dict:
    """10 GETs through the LB, fresh connections: the header's values, failures."""
    result = lab.fetch(lab.ns("pub"), LB_IP, LB_PORT, "--count", "10", "--timeout", "2", "--header", HEADER)
    return {"headers": result["headers"], "failed": result["failed"]}


def worst(runs: list[dict]) -> dict:
    """The worst of the runs for each figure (see the docstring)."""
    low = ("ping_sent", "http_sent", "tcp_exchanges", "dns_queries", "dhcp_renewals", "tail_s", "agent_sent",
           "guest_data_sent", "password_sent")  # fmt: skip
    high = ("ping_lost", "http_failed", "dns_failed", "dns_max_gap_ms", "dns_late_answers", "dhcp_failed", "wall_ms",
            "duration_ms", "load_1m", "cpu_pressure_pct", "dnsmasq_cpu_wait_ms", "other_namespaces", "agent_failed",
            "agent_max_ms", "busy_retries", "guest_data_failed", "password_failed", "guest_data_max_ms",
            "password_max_ms")  # fmt: skip
    out = {}
    for keys, pick in ((low, min), (high, max)):
        for key in keys:
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = pick(values) if values else None
    out["tcp_held"] = all(r["tcp_held"] for r in runs)
    out["dhcp_address_kept"] = all(r["dhcp_address_kept"] for r in runs)
    out["dnsmasq_pid_kept"] = all(r["dnsmasq_pid_kept"] for r in runs)
    out["headers_during"] = runs[-1]["headers"]
    for key in ("http_errors", "dns_errors", "dns_late", "dhcp_errors", "agent_errors", "guest_data_errors",
                "password_errors"):  # fmt: skip
        out[key] = [e for r in runs for e in r[key]][:5]
    out["tcp_error"] = next((r["tcp_error"] for r in runs if r["tcp_error"]), None)
    return out


def met(phase: dict) -> dict:
    return {
        "ping": phase["ping_lost"] == 0,
        "http": phase["http_failed"] == 0,
        "tcp": phase["tcp_held"],
        "dns_failed": phase["dns_failed"] == 0,
        "dns_gap": phase["dns_max_gap_ms"] < TARGET_DNS_GAP_MS,
        "dhcp": phase["dhcp_failed"] == 0 and phase["dhcp_address_kept"],
        "agent": phase["agent_failed"] == 0,
        "guest_data": phase["guest_data_failed"] == 0 and phase["password_failed"] == 0,
    }


def bench(args, router: BenchRouter) -> dict:
    """All the figures; a step that fails is recorded under "error" and ends the run."""
    targets = {"ping_lost": 0, "http_failed": 0, "tcp_held": True, "dns_failed": 0, "guest_data_failed": 0,
               "password_failed": 0,
               "dns_max_gap_ms_below": TARGET_DNS_GAP_MS, "dhcp_failed": 0, "dhcp_address_kept": True,
               "header_after_apply": VERSION, "header_after_rollback": None}  # fmt: skip
    figures: dict = {"lab": router.lab.prefix, "patch": VERSION, "seconds": args.seconds, "runs": args.runs,
                     "cpus": len(os.sched_getaffinity(0)), "targets": targets}  # fmt: skip
    state = {"phase": "?"}
    measured: dict[str, list[dict]] = {p: [] for p in WINDOWS}
    headers: dict[str, list[dict]] = {p: [] for p in PHASES}
    try:
        lab, root = router.lab, Path(router.root)
        bundle = build(lab, root, args, state)
        commands = {"baseline": None, "apply": ["patch", "apply", str(bundle), "--json"],
                    "rollback": ["patch", "rollback", "--json"]}  # fmt: skip
        for n in range(args.runs):
            for phase in WINDOWS:
                check_stop()
                state["phase"] = f"run {n + 1}: {phase}"
                measured[phase].append(window(router, args, commands[phase], state))
                if phase in PHASES:
                    headers[phase].append(header_after(lab))
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError, TypeError) as error:
        check_stop()
        figures["error"] = f"{state['phase']}: {type(error).__name__}: {error}"
    all_met = "error" not in figures and all(measured[p] for p in PHASES)
    for phase in WINDOWS:
        if not measured[phase] or (phase in PHASES and not headers[phase]):
            continue
        w = worst(measured[phase])
        targets = met(w)
        if phase not in PHASES:  # no command in it
            w = {key: value for key, value in w.items() if key not in ("wall_ms", "duration_ms", "tail_s")}
        figures |= {f"{phase}_{key}": value for key, value in w.items()}
        figures[f"{phase}_per_run"] = [{k: r[k] for k in PER_RUN} for r in measured[phase]]
        if phase in PHASES:
            expected = {VERSION: 10} if phase == "apply" else {}
            targets["header"] = all(h["headers"] == expected and h["failed"] == 0 for h in headers[phase])
            all_met = all_met and all(targets.values())  # the baseline's are shown, not counted
            figures |= {
                f"{phase}_header_after": headers[phase][-1]["headers"],
                f"{phase}_header_after_failed": max(h["failed"] for h in headers[phase]),
                f"{phase}_covered": w["tail_s"] >= COVERED_S,
                f"{phase}_from_to": measured[phase][-1]["from_to"],
                f"{phase}_outcome": measured[phase][-1]["outcome"],
            }
        figures[f"{phase}_met"] = targets
    figures["all_met"] = figures["all_targets_met"] = all_met
    return figures


# ---------------------------------------------------------------------------- output
def table(f: dict) -> str:
    present = [p for p in WINDOWS if f"{p}_met" in f]
    rows = [
        ("patch", f"{f['patch']} (haproxy adds {HEADER}), lab {f['lab']}, cpus {f['cpus']}"),
        ("traffic window", f"{f['seconds']:g} s, the command {LEAD_S:g} s into it; runs {f['runs']} (worst shown)"),
        ("baseline", "the same traffic, no command (before each apply): the lab's own noise; not a target"),
    ]
    others = max((f.get(f"{p}_other_namespaces") or 0 for p in WINDOWS), default=0)
    if others:
        note = f"up to {others} network namespaces of others (concurrent labs share the CPUs): see the cpu rows"
        rows.append(("NOTE", note))
    rows.append(("", ""))
    if not present:
        return aligned(rows, f)

    def line(label: str, cell, target: str = "", key: str | None = None) -> None:
        """One row: cell(phase) for each window ("-" where the window has no such figure)."""
        cells = "".join(f"{cell(p) if f.get(f'{p}_{figure(label)}') is not None else '-':>18}" for p in present)
        verdict = ""
        if key is not None:
            verdict = "  ".join(f"{p} {'met' if f[f'{p}_met'][key] else 'MISSED'}" for p in present
                                if key in f[f"{p}_met"])  # fmt: skip
        rows.append((label, f"{cells}   {target:<16}{verdict}".rstrip()))

    def figure(label: str) -> str:  # the figure a row needs: absent (None) in some windows
        return {"command": "from_to", "traffic after it s": "tail_s", "duration_ms (vr's)": "duration_ms",
                f"{HEADER} after (10)": "header_after"}.get(label, "wall_ms" if label == "wall ms" else "met")  # fmt: skip

    rows.append(("", "".join(f"{p:>18}" for p in present) + "   target"))
    line("command", lambda p: f[f"{p}_from_to"])
    line("wall ms", lambda p: f"{f[f'{p}_wall_ms']:.0f}")
    line("duration_ms (vr's)", lambda p: f"{f[f'{p}_duration_ms']:.0f}")
    line("traffic after it s", lambda p: f"{f[f'{p}_tail_s']:.2f}" + ("" if f[f"{p}_covered"] else " (SHORT)"))
    line("ping sent / lost", lambda p: f"{f[f'{p}_ping_sent']} / {f[f'{p}_ping_lost']}", "0 lost", "ping")
    line("http sent / failed", lambda p: f"{f[f'{p}_http_sent']} / {f[f'{p}_http_failed']}", "0 failed", "http")
    line("tcp held (lines)", lambda p: f"{yes(f[f'{p}_tcp_held'])} ({f[f'{p}_tcp_exchanges']})", "held", "tcp")
    line("dns queries / failed", lambda p: f"{f[f'{p}_dns_queries']} / {f[f'{p}_dns_failed']}", "0 failed",
         "dns_failed")  # fmt: skip
    line("  of which late", lambda p: str(f[f"{p}_dns_late_answers"]))
    line("dns longest gap ms", lambda p: f"{f[f'{p}_dns_max_gap_ms']:.1f}", f"< {TARGET_DNS_GAP_MS:.0f}", "dns_gap")
    line("dhcp renewals / failed", lambda p: f"{f[f'{p}_dhcp_renewals']} / {f[f'{p}_dhcp_failed']}",
         "0 failed, kept", "dhcp")  # fmt: skip
    line("dhcp address kept", lambda p: yes(f[f"{p}_dhcp_address_kept"]))
    line("agent requests / failed", lambda p: f"{f[f'{p}_agent_sent']} / {f[f'{p}_agent_failed']}", "0 failed",
         "agent")  # fmt: skip
    line("  agent slowest ms", lambda p: f"{f[f'{p}_agent_max_ms']:.0f}")
    line("guest data / password failed", lambda p: f"{f[f'{p}_guest_data_sent']}, {f[f'{p}_password_sent']} / "
         f"{f[f'{p}_guest_data_failed']}, {f[f'{p}_password_failed']}", "0 failed", "guest_data")  # fmt: skip
    line("  guest data slowest ms", lambda p: f"{max(f[f'{p}_guest_data_max_ms'] or 0, f[f'{p}_password_max_ms'] or 0):.0f}")
    line("command refused busy, retried", lambda p: str(f[f"{p}_busy_retries"]))
    line(f"{HEADER} during", lambda p: _headers(f[f"{p}_headers_during"]))
    line(f"{HEADER} after (10)", lambda p: _headers(f[f"{p}_header_after"]), f"{VERSION} / absent", "header")
    line("dnsmasq kept its pid", lambda p: yes(f[f"{p}_dnsmasq_pid_kept"]))
    line("load average (1 min)", lambda p: f"{f[f'{p}_load_1m']:.2f}")
    line("cpu pressure % (PSI)", lambda p: _num(f[f"{p}_cpu_pressure_pct"], ".1f"))
    line("dnsmasq cpu wait ms, sum", lambda p: _num(f[f"{p}_dnsmasq_cpu_wait_ms"], ".1f"))
    for p in present:
        for key in ("http_errors", "dns_errors", "dns_late", "dhcp_errors", "agent_errors", "guest_data_errors",
                "password_errors"):  # fmt: skip
            label = {"dns_late": "dns late"}.get(key, key.replace("_", " ")[:-1])
            rows += [(f"  {p} {label}", e) for e in f[f"{p}_{key}"]]
        if f[f"{p}_tcp_error"]:
            rows.append((f"  {p} tcp error", f[f"{p}_tcp_error"]))
        if p in PHASES and not f[f"{p}_covered"]:
            rows.append((f"  {p} window", "the command outlasted the traffic: use a longer --seconds"))
    if any(f.get(f"{p}_per_run") and len(f[f"{p}_per_run"]) > 1 for p in present):
        for p in present:
            for n, r in enumerate(f[f"{p}_per_run"]):
                command = f"command {r['wall_ms']:.0f} ms, " if r["wall_ms"] is not None else ""
                text = (f"{command}lost {r['ping_lost']}, http failed {r['http_failed']}, tcp held "
                        f"{yes(r['tcp_held'])}, dns failed {r['dns_failed']} (late {r['dns_late_answers']}, gap "
                        f"{r['dns_max_gap_ms']:.0f} ms), dhcp failed {r['dhcp_failed']}, load {r['load_1m']:.2f}, "
                        f"cpu pressure {_num(r['cpu_pressure_pct'], '.1f')} %, dnsmasq cpu wait "
                        f"{_num(r['dnsmasq_cpu_wait_ms'], '.1f')} ms")  # fmt: skip
                rows.append((f"  {p} run {n + 1}", text))
    return aligned(rows, f)


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _headers(seen: dict) -> str:
    return ", ".join(f"{value} x{count}" for value, count in sorted(seen.items())) or "absent"


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="each traffic window (the command starts 1 s in)")
    parser.add_argument("--runs", type=int, default=1, help="apply + rollback this many times; the worst is shown")
    parser.add_argument("--agent-rate", type=float, default=20.0,
                        help="the manager's requests to the agent per second (half status, half one-VM pushes)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    if not 2 <= args.seconds <= 120 or not 1 <= args.runs <= 50 or not 1 <= args.agent_rate <= 200:
        parser.error("need 2 <= seconds <= 120, 1 <= runs <= 50 and 1 <= agent-rate <= 200")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")

    router = BenchRouter("patch_zero_downtime", "pz")
    router.cleanups += [lambda: stop_processes(CHILDREN, "patch_zero_downtime"), stop_traffic]
    figures = run_bench(router, lambda r: bench(args, r), enter=False)
    return report(table(figures), figures, args.json)


def stop_traffic() -> None:
    for traffic in TRAFFIC:  # each stops its own on the way out of its block; again, in case a signal cut that
        try:
            traffic.stop()
        except (OSError, subprocess.SubprocessError) as error:
            print(f"patch_zero_downtime: stopping traffic: {error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
