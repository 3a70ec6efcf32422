"""Helpers the benches share: timing, step breakdowns, signals and clean-up, stray processes, output."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path

from vr.foundation.settings import Settings
from vr.lab.harness import Lab, stop_process
from vr.services.runtime import Runtime

STEPS = ("validate", "render", "check", "switch", "reload", "health", "commit")
STOP: dict[str, int] = {}


def check_stop() -> None:
    if STOP:
        raise SystemExit(128 + STOP["signum"])


def with_commit(result) -> dict[str, float]:
    timings = dict(result.timings_ms)
    timings["commit"] = round(result.duration_ms - sum(timings.values()), 2)
    return timings


def namespace_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def stray_pids(ns_inode: int | None, root: str) -> list[int]:
    """Processes left in our namespace (None: in any) that run from our temp root: only ever ours."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if ns_inode is not None and os.stat(f"/proc/{entry}/ns/net").st_ino != ns_inode:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if root in cmdline:
            found.append(int(entry))
    return found


def ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def steps_text(timings: dict) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in timings.items())


def stop_router(settings: Settings, root: str, label: str) -> None:
    """Stop the bench router's daemons through supervisord; kill by PID only what it left."""
    inode = namespace_inode()
    try:
        Runtime(settings).supervisor.shutdown()  # stops dnsmasq through supervisord, then itself
    except (OSError, ValueError, RuntimeError, xmlrpc.client.Error) as error:  # clean-up goes on
        print(f"{label}: supervisord shutdown: {error}", file=sys.stderr)
    for pid in stray_pids(inode, root):  # only if supervisord failed to stop its children
        print(f"{label}: killing leftover pid {pid}", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def aligned(rows: list[tuple[str, str]], figures: dict) -> str:
    """The table every bench prints: its rows, any error, and whether all targets were met."""
    rows = list(rows)
    if "error" in figures:
        rows.append(("ERROR", figures["error"]))
    rows.append(("all targets met", "yes" if figures["all_met"] else "NO"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def yes(value: bool) -> str:
    return "yes" if value else "NO"


def median_of(fn, runs: int) -> float:
    """Median wall time of fn() over runs (ms); stops between runs if we were asked to."""
    times = []
    for _ in range(runs):
        check_stop()
        mark = time.perf_counter()
        fn()
        times.append(ms(mark))
    return statistics.median(times)


def stop_processes(processes: list[subprocess.Popen], label: str) -> None:
    for process in processes:
        try:
            stop_process(process)
        except (OSError, subprocess.SubprocessError) as error:  # clean-up goes on
            print(f"{label}: stopping pid {process.pid}: {error}", file=sys.stderr)


def guarded(work: Callable[[], dict], cleanup: Callable[[], None]) -> dict:
    """work()'s figures. SIGINT, SIGTERM and SIGHUP end it (as SystemExit, recorded in STOP
    for the loops' check_stop); cleanup() always runs, with those signals held off."""

    def on_signal(signum, _frame):
        STOP["signum"] = signum
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        figures = work()
        check_stop()
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # let the clean-up finish
        cleanup()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return figures


def report(table: str, figures: dict, as_json: bool) -> int:
    """Print the table (and the figures as the last line, one JSON object); the exit code."""
    print(table)
    if as_json:
        print(json.dumps(figures, sort_keys=True))
    return 1 if "error" in figures else 0


def lab_cleanup(lab: Lab, root: str, label: str) -> None:
    """The lab down (its servers, dhclient, supervisord and daemons, namespaces), then any
    process still running from the lab's root, by PID, and the root removed."""
    import shutil

    try:
        lab.down()
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        print(f"{label}: lab down: {error}", file=sys.stderr)
    for pid in stray_pids(None, root):  # the lab spans namespaces; only if something outlived the above
        print(f"{label}: killing leftover pid {pid}", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(root, ignore_errors=True)


EXAMPLE_ROUTER = Path(__file__).resolve().parent.parent / "configs" / "examples" / "router.json"
LB_IP, LB_PORT, MEMBER_PORT = "192.0.2.12", 80, 8000


def lb_payload(generation: int, member_ips: list[str]) -> dict:
    """The example router's NAT plus the load balancer's IP, and one HTTP rule LB_IP:80 over
    the members' port 8000 with a fast health check: the benches' load-balancer payload."""
    nat = json.loads(EXAMPLE_ROUTER.read_text())["nat"]
    nat["public_ips"].append({"ip": LB_IP})
    rule = {"id": "web", "public_ip": LB_IP, "public_port": LB_PORT, "private_port": MEMBER_PORT,
            "members": [{"ip": ip} for ip in member_ips],
            "health_check": {"type": "http", "interval_ms": 200, "rise": 1, "fall": 2}}  # fmt: skip
    return {"generation": generation, "nat": nat, "load_balancer": {"rules": [rule]}}
