"""Bench: 50 site-to-site VPN tunnels (strongSwan), loaded at once, then changed one at a time.

A lab router A (vr.lab.harness with vpn=True: namespaces <p>-r, -pub, -rb, ...) gets
configs/examples/router.json (public IP 192.0.2.10, tiers 10.1.1.0/24 and 10.1.2.0/24). The
peers are not vr routers: one plain charon in <p>-rb answers on 198.51.100.10 .. .(10+N-1),
with N responder connections loaded over VICI (PSK, one key per tunnel, start_action none;
tunnel i: local 10.200.i.0/24, remote 10.1.1.0/24). Router A's tunnels are active: it initiates.

Measured in-process, in the router's namespace (Pipeline.apply, push to healthy):

  load_all_ms           the apply of the vpn section with all N tunnels (Result.duration_ms;
                        starts charon and its checker under supervisord)
  all_established_ms    from that push until router A's charon shows every tunnel ESTABLISHED
                        with an INSTALLED CHILD_SA (polled every 20 ms, bounded)
  one_change_ms         the apply of the vpn section with ONE tunnel changed, --changes times,
                        each a different tunnel, the kind of change in turn:
                          esp_lifetime_s 3600 -> 3000      (child setting)
                          dpd_interval_s 30 -> 20          (IKE setting)
                          peer_subnets /24 -> /25           (narrower; the peer accepts it; nftables too)
  changed_reestablished_ms   from that push until the changed tunnel is ESTABLISHED again with
                        new SA ids (polled every 5 ms, bounded). charon replaces the connection
                        and initiates anew while the apply is still running, so this is
                        usually the apply's time plus one poll
  untouched_disturbed   tunnels never changed whose SA ids (IKE uniqueid, CHILD uniqueids) differ
                        from those recorded once all were up, on router A's charon and on the
                        peer's, checked after every change (--settle-s after the re-establishment)

  one_change_agent_ms   (unless --no-agent) --changes more one-tunnel changes (esp_lifetime_s
                        flipped) pushed through the daemon: vr.client.RouterClient over HTTPS
                        with a token to the agent on the control address (wall time)

Each apply's Result.timings_ms is shown per step (as in last_apply.json), plus "commit". Its
"check" step includes Pipeline._stage (changed files written, unchanged ones hard-linked).

Targets: one-tunnel change (the slowest of the --changes applies) under 100 ms; zero untouched
tunnels disturbed. PASS/FAIL is printed per target; the exit status is non-zero only if the
bench itself broke.

Run as root:  .venv/bin/python bench/vpn_scale.py [--tunnels 50 --changes 5 --settle-s 1] [--json]
              (--profile: cProfile one more change, on stderr; --keep-logs DIR: the charons' logs)

Everything it creates (bench/harness.py's BenchRouter: namespaces vrb3bv<pid>-*, a temp root, supervisord, dnsmasq, router A's
charon and checker, the peer charon) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP;
processes are stopped by PID. The host's own interfaces are never touched: the process moves
itself into the router namespace before it applies anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    EXAMPLE_ROUTER,
    STEPS,
    VPN_LOCAL_IP,
    BenchRouter,
    InProcessDriver,
    Sa,
    aligned,
    attach_agent,
    check_stop,
    load_peer,
    ms,
    peer_ip,
    peer_subnet,
    push_series,
    report,
    router_connection,
    run_bench,
    series_figures,
    series_text,
    snapshot,
    start_peer,
    steps_text,
    tunnel,
    yes,
)
from vici.exception import CommandException, SessionException

from vr.client import ClientError
from vr.foundation.errors import VrError
from vr.lab.harness import Lab
from vr.services.strongswan import kernel_has_esp, live_socket, vici_session

TARGET_ONE_CHANGE_MS = 100.0
TARGET_DISTURBED = 0
ESTABLISH_TIMEOUT_S = 60.0  # bounded wait for all tunnels up
REESTABLISH_TIMEOUT_S = 15.0  # bounded wait for a changed tunnel up again
ALL_POLL_S, ONE_POLL_S = 0.02, 0.005
KINDS = ("esp_lifetime", "dpd_interval", "peer_subnet")
KIND_LABEL = {
    "esp_lifetime": "esp_lifetime_s 3600 -> 3000",
    "dpd_interval": "dpd_interval_s 30 -> 20",
    "peer_subnet": "peer_subnets /24 -> /25",
}


# ---------------------------------------------------------------------------- the documents
def changed(t: dict, i: int, kind: str) -> dict:
    if kind == "esp_lifetime":
        return {**t, "esp_lifetime_s": 3000}
    if kind == "dpd_interval":
        return {**t, "dpd_interval_s": 20}
    return {**t, "peer_subnets": [peer_subnet(i, 25)]}


def vpn_payload(generation: int, tunnels: list[dict]) -> dict:
    return {"generation": generation, "vpn": {"site_to_site": tunnels}}


# ---------------------------------------------------------------------------- charon's view
def ids(snap: dict[str, list[Sa]]) -> dict[str, tuple]:
    """Connection -> the ids that must not change unless it did: (IKE uniqueid, CHILD uniqueids) each."""
    return {name: tuple(sorted((sa.ike, sa.children) for sa in sas)) for name, sas in snap.items()}


def ids_text(value: tuple | None) -> str:
    if not value:
        return "none"
    return " + ".join(f"IKE {ike} CHILD {','.join(children) or '-'}" for ike, children in value)


def wait_all_up(socket_path: Path, names: list[str], since: float) -> tuple[float, dict[str, list[Sa]]]:
    """Bounded wait until every connection is up; ms since `since`, and the listing."""
    deadline = time.monotonic() + ESTABLISH_TIMEOUT_S
    snap: dict[str, list[Sa]] = {}
    while time.monotonic() < deadline:
        check_stop()
        snap = snapshot(socket_path)
        if all(any(sa.up for sa in snap.get(name, [])) for name in names):
            return ms(since), snap
        time.sleep(ALL_POLL_S)
    down = [n for n in names if not any(sa.up for sa in snap.get(n, []))]
    raise RuntimeError(f"{len(down)} of {len(names)} tunnels not up after {ESTABLISH_TIMEOUT_S:.0f} s: {down[:5]}")


def wait_changed(socket_path: Path, name: str, old: tuple, since: float, want_ts: str | None) -> float | None:
    """Bounded wait until the connection is up with SA ids it did not have (and, if given, the
    children's remote traffic selector); ms since `since`, or None if that never happened."""
    deadline = time.monotonic() + REESTABLISH_TIMEOUT_S
    while time.monotonic() < deadline:
        check_stop()
        for sa in snapshot(socket_path, name).get(name, []):
            if sa.up and (sa.ike, sa.children) not in old and (want_ts is None or sa.remote_ts == (want_ts,)):
                return ms(since)
        time.sleep(ONE_POLL_S)
    return None


# ---------------------------------------------------------------------------- measuring
def bench(args, router: BenchRouter) -> dict:
    """All the figures; a step that fails is recorded under "error" and ends the run."""
    figures: dict = {
        "tunnels": args.tunnels,
        "changes": args.changes,
        "settle_s": args.settle_s,
        "cpus": len(os.sched_getaffinity(0)),
        "targets": {"one_change_ms_max": TARGET_ONE_CHANGE_MS, "untouched_disturbed": TARGET_DISTURBED},
    }
    state = {"generation": 0, "phase": "?"}
    try:
        measure(args, router, figures, state)
    except (VrError, RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError,
            CommandException, SessionException, ClientError) as error:  # fmt: skip
        check_stop()
        figures["error"] = f"{state['phase']}: {type(error).__name__}: {error}"
    runs = figures.get("change_runs", [])
    complete = len(runs) == args.changes and "error" not in figures
    figures["one_change_met"] = complete and figures.get("one_change_ms_max", 1e9) < TARGET_ONE_CHANGE_MS
    figures["undisturbed_met"] = (
        complete
        and figures.get("untouched_disturbed") == TARGET_DISTURBED
        and figures.get("peer_untouched_disturbed") == TARGET_DISTURBED
    )
    figures["reestablished_met"] = complete and all(r["reestablished_ms"] is not None for r in runs)
    figures["all_met"] = figures["one_change_met"] and figures["undisturbed_met"] and figures["reestablished_met"]
    return figures


def measure(args, router: BenchRouter, figures: dict, state: dict) -> None:
    driver = InProcessDriver(router.settings)
    router_socket = live_socket(driver.runtime)
    state["phase"] = "apply configs/examples/router.json"
    example = json.loads(EXAMPLE_ROUTER.read_text())
    figures["router_apply_ms"] = round(driver.push(example).duration_ms, 1)
    state["generation"] = example["generation"]
    figures["esp"] = "kernel" if kernel_has_esp() else "kernel-libipsec (charon's userspace ESP)"

    check_stop()
    state["phase"] = "start the peer charon"
    peer_socket = start_peer(router, args.tunnels)
    state["phase"] = "load the peer's connections"
    took, figures["strongswan_version"] = load_peer(peer_socket, args.tunnels)
    figures["peer_load_ms"] = round(took, 1)

    check_stop()
    state["phase"] = f"apply {args.tunnels} tunnels"
    tunnels = [tunnel(i) for i in range(args.tunnels)]
    names = [router_connection(i) for i in range(args.tunnels)]
    state["generation"] += 1
    mark = time.perf_counter()
    pushed = driver.push(vpn_payload(state["generation"], tunnels))
    figures["load_all_ms"] = round(pushed.duration_ms, 1)
    figures["load_all_timings_ms"] = {step: round(v, 2) for step, v in pushed.timings_ms.items()}
    figures["load_all_changed"] = pushed.changed
    state["phase"] = f"wait for all {args.tunnels} tunnels"
    established, _ = wait_all_up(router_socket, names, mark)
    figures["all_established_ms"] = round(established, 1)
    time.sleep(args.settle_s)  # late retransmits or duplicate SAs would show in the baseline otherwise
    with vici_session(router_socket) as session:
        figures["router_conns_loaded"] = len(session.get_conns()["conns"])
    baseline, peer_baseline = ids(snapshot(router_socket)), ids(snapshot(peer_socket))
    figures["router_ike_sas"] = sum(len(v) for v in baseline.values())
    figures["peer_ike_sas"] = sum(len(v) for v in peer_baseline.values())
    missing = [n for n in names if n not in baseline] + [f"peer-{i}" for i in range(args.tunnels)
                                                         if f"peer-{i}" not in peer_baseline]  # fmt: skip
    if missing:
        raise RuntimeError(f"no SA listed for {missing[:5]}")

    runs: list[dict] = []
    figures["change_runs"] = runs
    disturbed: set[str] = set()
    peer_disturbed: set[str] = set()
    touched: set[int] = set()
    for k in range(args.changes):
        check_stop()
        i, kind = k * args.tunnels // args.changes, KINDS[k % len(KINDS)]
        name, peer_name = router_connection(i), f"peer-{i}"
        state["phase"] = f"change {k + 1}: {name} {KIND_LABEL[kind]}"
        touched.add(i)
        tunnels[i] = changed(tunnels[i], i, kind)
        state["generation"] += 1
        old = baseline[name]
        mark = time.perf_counter()
        pushed = driver.push(vpn_payload(state["generation"], tunnels))
        wall = pushed.wall_ms
        back = wait_changed(router_socket, name, old, mark, peer_subnet(i, 25) if kind == "peer_subnet" else None)
        time.sleep(args.settle_s)
        now, peer_now = ids(snapshot(router_socket)), ids(snapshot(peer_socket))
        moved = sorted(n for n in baseline if n != name and now.get(n) != baseline[n])
        peer_moved = sorted(n for n in peer_baseline if n != peer_name and peer_now.get(n) != peer_baseline[n])
        runs.append(
            {
                "tunnel": f"peer-{i}",
                "kind": kind,
                "apply_ms": round(pushed.duration_ms, 1),
                "apply_wall_ms": round(wall, 1),
                "timings_ms": {step: round(v, 2) for step, v in pushed.timings_ms.items()},
                "changed": pushed.changed,
                "reestablished_ms": None if back is None else round(back, 1),
                "sa_before": ids_text(old),
                "sa_after": ids_text(now.get(name)),
                "disturbed": moved,
                "peer_disturbed": peer_moved,
            }
        )
        disturbed.update(moved)
        peer_disturbed.update(peer_moved)
        baseline[name], peer_baseline[peer_name] = now.get(name), peer_now.get(peer_name)
        for n in moved:  # count each disturbed tunnel once, against what it has now
            baseline[n] = now.get(n)
        for n in peer_moved:
            peer_baseline[n] = peer_now.get(n)

    untouched = {router_connection(i) for i in range(args.tunnels)} - {router_connection(i) for i in touched}
    figures["untouched_tunnels"] = len(untouched)
    figures["untouched_disturbed"] = len(disturbed & untouched)
    figures["untouched_disturbed_names"] = sorted(disturbed & untouched)
    peer_untouched = {f"peer-{i}" for i in range(args.tunnels)} - {f"peer-{i}" for i in touched}
    figures["peer_untouched_disturbed"] = len(peer_disturbed & peer_untouched)
    figures["peer_untouched_disturbed_names"] = sorted(peer_disturbed & peer_untouched)
    applies = [r["apply_ms"] for r in runs]
    if applies:
        figures["one_change_ms_median"] = round(statistics.median(applies), 1)
        figures["one_change_ms_max"] = round(max(applies), 1)
        figures["one_change_timings_ms_median"] = {
            s: round(statistics.median(r["timings_ms"].get(s, 0.0) for r in runs), 2) for s in STEPS
        }
    back_ms = [r["reestablished_ms"] for r in runs if r["reestablished_ms"] is not None]
    if back_ms:
        figures["changed_reestablished_ms_median"] = round(statistics.median(back_ms), 1)
        figures["changed_reestablished_ms_max"] = round(max(back_ms), 1)
    untried = [i for i in range(args.tunnels) if i not in touched]
    if args.profile and untried:
        state["phase"] = "profiled change"
        state["generation"] += 1
        i = untried[-1]
        tunnels[i] = changed(tunnels[i], i, "esp_lifetime")
        profile_one(driver.pipeline, vpn_payload(state["generation"], tunnels))
    if args.agent and args.changes:
        through_agent(args, router, driver, tunnels, state, figures)


def through_agent(args, router: BenchRouter, driver: InProcessDriver, tunnels: list[dict], state: dict,
                  figures: dict) -> None:  # fmt: skip
    """--changes one-tunnel changes (esp_lifetime_s flipped, the least touched tunnels first)
    pushed through the daemon: vr.client.RouterClient over HTTPS with a token to the agent."""
    state["phase"] = "agent on"
    state["generation"] += 1
    agent = attach_agent(driver, router.settings, state["generation"])
    order = list(reversed(range(args.tunnels)))

    def payloads():
        for k in range(args.changes):
            t = tunnels[order[k % len(order)]]
            t["esp_lifetime_s"] = 3000 if t.get("esp_lifetime_s", 3600) != 3000 else 3600
            state["phase"] = f"change {k + 1} through the agent: {t['id']}"
            yield {"vpn": {"site_to_site": tunnels}}

    try:
        done = push_series(agent, payloads())
    finally:
        agent.close()
    figures |= series_figures("one_change_agent_ms", done)


def profile_one(pipeline, payload: dict) -> None:
    """One extra one-tunnel change under cProfile (not part of the figures), top functions on stderr."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    pipeline.apply(payload)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue(), file=sys.stderr)


# ---------------------------------------------------------------------------- output
def pass_fail(met: bool) -> str:
    return "PASS" if met else "FAIL"


def table(f: dict) -> str:
    rows = [
        (
            "tunnels",
            (
                f"{f['tunnels']} site-to-site, IKEv2 PSK: router A {VPN_LOCAL_IP} (initiates) -> one peer charon "
                f"on {peer_ip(0)} .. {peer_ip(f['tunnels'] - 1)}"
            ),
        ),
        (
            "cpus / strongSwan / ESP",
            f"{f['cpus']} / {f.get('strongswan_version', '?')} / {f.get('esp', '?')}",
        ),
    ]
    if "router_apply_ms" in f:
        rows.append(("router A apply (configs/examples/router.json)", f"{f['router_apply_ms']:.1f} ms"))
    if "peer_load_ms" in f:
        rows.append(("peer: connections + keys loaded over VICI", f"{f['peer_load_ms']:.1f} ms"))
    if "load_all_ms" in f:
        rows += [
            (
                f"load_all_ms ({f['tunnels']} tunnels, push to healthy)",
                f"{f['load_all_ms']:.1f} ms; changed: {', '.join(f['load_all_changed']) or 'none'}",
            ),
            ("  timings_ms", steps_text(f["load_all_timings_ms"])),
        ]
    if "all_established_ms" in f:
        rows.append(
            (
                "all_established_ms (from the push)",
                (
                    f"{f['all_established_ms']:.0f} ms; after {f['settle_s']:g} s: {f['router_conns_loaded']} conns "
                    f"loaded, IKE_SAs: router {f['router_ike_sas']}, peer {f['peer_ike_sas']}"
                ),
            )
        )
    for n, r in enumerate(f.get("change_runs", []), 1):
        back = "NOT re-established" if r["reestablished_ms"] is None else f"up again {r['reestablished_ms']:.0f} ms"
        rows += [
            (
                f"change {n}: {r['tunnel']} {KIND_LABEL[r['kind']]}",
                (
                    f"apply {r['apply_ms']:.1f} ms ({', '.join(r['changed']) or 'nothing'})  {back}  "
                    f"untouched disturbed: router {len(r['disturbed'])}, peer {len(r['peer_disturbed'])}"
                ),
            ),
            ("  its SAs", f"{r['sa_before']}  ->  {r['sa_after']}"),
            ("  timings_ms", steps_text(r["timings_ms"])),
        ]
        for name in r["disturbed"] + r["peer_disturbed"]:
            rows.append(("  DISTURBED", name))
    if "one_change_ms_max" in f:
        rows += [
            (
                "one_change_ms (push to healthy)",
                (
                    f"median {f['one_change_ms_median']:.1f}  max {f['one_change_ms_max']:.1f}  "
                    f"target max < {TARGET_ONE_CHANGE_MS:.0f}  {pass_fail(f['one_change_met'])}"
                ),
            ),
            ("  timings_ms (median)", steps_text(f["one_change_timings_ms_median"])),
        ]
    if "changed_reestablished_ms_max" in f:
        rows.append(
            (
                "changed_reestablished_ms (from the push)",
                (
                    f"median {f['changed_reestablished_ms_median']:.0f}  max {f['changed_reestablished_ms_max']:.0f}  "
                    f"all re-established: {yes(f['reestablished_met'])}"
                ),
            )
        )
    if "one_change_agent_ms_median" in f:
        rows.append((f"one_change_agent_ms (x{f['one_change_agent_ms_count']}, through the agent)",
                     f"{series_text(f, 'one_change_agent_ms')}  target max < {TARGET_ONE_CHANGE_MS:.0f}"))  # fmt: skip
    if "untouched_disturbed" in f:
        rows.append(
            (
                "untouched_disturbed (SA ids changed)",
                (
                    f"router {f['untouched_disturbed']}, peer {f['peer_untouched_disturbed']} of "
                    f"{f['untouched_tunnels']}  target {TARGET_DISTURBED}  {pass_fail(f['undisturbed_met'])}"
                ),
            )
        )
    return aligned(rows, f)


# ---------------------------------------------------------------------------- clean-up
def keep_logs(lab: Lab, target: str) -> None:
    """The charons' and supervisord's logs, copied out before the temp root goes."""
    try:
        Path(target).mkdir(parents=True, exist_ok=True)
        peer_log = lab.dir / "peer" / "charon.log"
        if peer_log.exists():
            shutil.copy(peer_log, Path(target) / "peer-charon.log")
        if lab.settings.log_dir.exists():
            shutil.copytree(lab.settings.log_dir, Path(target) / "router-log", dirs_exist_ok=True)
    except OSError as error:
        print(f"vpn_scale: keeping the logs: {error}", file=sys.stderr)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=50, help="site-to-site tunnels (peers)")
    parser.add_argument("--changes", type=int, default=5, help="one-tunnel changes, each to a different tunnel")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="wait this long after a tunnel is up before SA ids are compared")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="cProfile one extra one-tunnel change (stderr)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the charons' and supervisord's logs there at the end")
    parser.add_argument("--no-agent", dest="agent", action="store_false",
                        help="in-process only: no one-tunnel changes through the daemon's agent")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    if not 1 <= args.tunnels <= 200 or not 0 <= args.changes <= args.tunnels or not 0 <= args.settle_s <= 30:
        parser.error("need 1 <= tunnels <= 200, 0 <= changes <= tunnels, 0 <= settle-s <= 30")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")

    router = BenchRouter("vpn_scale", "bv", vpn=True)
    if args.keep_logs:  # the cleanups run before the root goes
        router.cleanups.append(lambda: keep_logs(router.lab, args.keep_logs))
    figures = run_bench(router, lambda r: bench(args, r))
    return report(table(figures), figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
