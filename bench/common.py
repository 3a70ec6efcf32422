"""Helpers the benches share: timing, step breakdowns, and finding our own stray processes."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import xmlrpc.client
from pathlib import Path

from vr.runtime import Runtime
from vr.settings import Settings

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


def stray_pids(ns_inode: int, root: str) -> list[int]:
    """Processes left in our namespace that run from our temp root: only ever ours."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino != ns_inode:
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
