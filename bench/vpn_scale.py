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

Each apply's Result.timings_ms is shown per step (as in last_apply.json), plus "commit". Its
"check" step includes Pipeline._stage (changed files written, unchanged ones hard-linked).

Targets: one-tunnel change (the slowest of the --changes applies) under 100 ms; zero untouched
tunnels disturbed. PASS/FAIL is printed per target; the exit status is non-zero only if the
bench itself broke.

Run as root:  .venv/bin/python bench/vpn_scale.py [--tunnels 50 --changes 5 --settle-s 1] [--json]
              (--profile: cProfile one more change, on stderr; --keep-logs DIR: the charons' logs)

Everything it creates (namespaces vrbv<pid>-*, a temp root, supervisord, dnsmasq, router A's
charon and checker, the peer charon) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP;
processes are stopped by PID. The host's own interfaces are never touched: the process moves
itself into the router namespace before it applies anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from common import (
    STEPS,
    aligned,
    check_stop,
    guarded,
    ms,
    report,
    steps_text,
    stop_process,
    stop_router,
    with_commit,
    yes,
)
from vici.exception import CommandException, SessionException

from vr.foundation import netns
from vr.foundation.errors import VrError
from vr.lab.harness import Lab
from vr.services.runtime import Runtime
from vr.services.strongswan import CHARON, client_conf, kernel_has_esp, live_socket, vici_session
from vr.transaction.pipeline import Pipeline

TARGET_ONE_CHANGE_MS = 100.0
TARGET_DISTURBED = 0
EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"
LOCAL_IP = "192.0.2.10"  # router A's public IP (configs/examples/router.json)
LOCAL_SUBNET = "10.1.1.0/24"  # router A's tier1
PEER_GATEWAY = "198.51.100.1"  # the "internet" namespace, towards <p>-rb
SITES_IF = "sites"  # a veth pair (no dummy driver here) in <p>-rb: 10.200.i.1/24 of every site
PEER_HALF_OPEN = 1000  # the peer charon's half-open IKE_SA limits (see peer_conf)
PEER_BASE = 10  # peer i answers on 198.51.100.(PEER_BASE + i)
IKE_PROPOSALS, ESP_PROPOSALS = ["aes256-sha256-modp2048"], ["aes256-sha256"]  # vr's defaults, mirrored
ESTABLISH_TIMEOUT_S = 60.0  # bounded wait for all tunnels up
REESTABLISH_TIMEOUT_S = 15.0  # bounded wait for a changed tunnel up again
ALL_POLL_S, ONE_POLL_S = 0.02, 0.005
KINDS = ("esp_lifetime", "dpd_interval", "peer_subnet")
KIND_LABEL = {
    "esp_lifetime": "esp_lifetime_s 3600 -> 3000",
    "dpd_interval": "dpd_interval_s 30 -> 20",
    "peer_subnet": "peer_subnets /24 -> /25",
}
PEER: dict[str, subprocess.Popen] = {}  # the peer charon, stopped by PID


class Sa(NamedTuple):
    ike: str  # IKE_SA uniqueid
    children: tuple[str, ...]  # CHILD_SA uniqueids
    up: bool  # ESTABLISHED with an INSTALLED child
    remote_ts: tuple[str, ...]  # of the installed children


# ---------------------------------------------------------------------------- the documents
def peer_ip(i: int) -> str:
    return f"198.51.100.{PEER_BASE + i}"


def peer_subnet(i: int, prefix: int = 24) -> str:
    return f"10.200.{i}.0/{prefix}"


def psk(i: int) -> str:
    return f"bench-only-psk-{i:03d}-vpn-scale"


def tunnel(i: int) -> dict:
    return {"id": f"peer-{i}", "local_ip": LOCAL_IP, "peer_ip": peer_ip(i), "local_subnets": [LOCAL_SUBNET],
            "peer_subnets": [peer_subnet(i)], "psk": psk(i)}  # fmt: skip


def changed(t: dict, i: int, kind: str) -> dict:
    if kind == "esp_lifetime":
        return {**t, "esp_lifetime_s": 3000}
    if kind == "dpd_interval":
        return {**t, "dpd_interval_s": 20}
    return {**t, "peer_subnets": [peer_subnet(i, 25)]}


def vpn_payload(generation: int, tunnels: list[dict]) -> dict:
    return {"generation": generation, "vpn": {"site_to_site": tunnels}}


def peer_conn(i: int) -> dict:
    """The peer's responder side of tunnel i: it accepts router A's proposals and subnets
    (and the narrower /25 of a peer_subnet change: a responder narrows to what is proposed)."""
    name = f"peer-{i}"
    child = {"local_ts": [peer_subnet(i)], "remote_ts": [LOCAL_SUBNET], "esp_proposals": ESP_PROPOSALS,
             "start_action": "none", "dpd_action": "clear"}  # fmt: skip
    return {name: {"version": "2", "local_addrs": [peer_ip(i)], "remote_addrs": [LOCAL_IP],
                   "proposals": IKE_PROPOSALS, "mobike": "no",
                   "local": {"auth": "psk", "id": peer_ip(i)}, "remote": {"auth": "psk", "id": LOCAL_IP},
                   "children": {name: child}}}  # fmt: skip


def router_name(i: int) -> str:
    return f"s2s-peer-{i}"


# ---------------------------------------------------------------------------- charon's view
def snapshot(socket_path: Path, ike: str | None = None) -> dict[str, list[Sa]]:
    """Connection -> its IKE_SAs, as that charon lists them (the listing consumed in full)."""
    with vici_session(socket_path) as session:
        items = list(session.list_sas({"ike": ike} if ike else None))
    found: dict[str, list[Sa]] = {}
    for item in items:
        for name, sa in item.items():
            children = list(sa.get("child-sas", {}).values())
            installed = [c for c in children if c.get("state") == b"INSTALLED"]
            found.setdefault(name, []).append(
                Sa(
                    ike=sa["uniqueid"].decode(),
                    children=tuple(sorted(c["uniqueid"].decode() for c in children)),
                    up=sa["state"] == b"ESTABLISHED" and bool(installed),
                    remote_ts=tuple(sorted(ts.decode() for c in installed for ts in c.get("remote-ts", []))),
                )
            )
    return found


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


# ---------------------------------------------------------------------------- the peer
def peer_conf(lab: Lab, socket_path: Path) -> bytes:
    """strongswan.conf of the peer charon: the lab client's, without virtual IPs or policy routes
    (N children share one remote subnet, and nothing is sent through the tunnels), and without
    charon's half-open limits per peer IP. Those model N peers as one: left at their defaults
    (block_threshold 5, cookie_threshold_ip 3), the one charon would drop or cookie all but the
    first few of router A's N simultaneous IKE_SA_INITs, and the rest would come up only at
    their retransmits, tens of seconds later; N separate peers never see that."""
    conf = client_conf(Runtime(lab.settings), socket_path)
    conf = conf.replace(b"install_routes = yes", b"install_routes = no")
    conf = conf.replace(b"install_virtual_ip = yes", b"install_virtual_ip = no")
    limits = "".join(f"  {key} = {PEER_HALF_OPEN}\n" for key in ("block_threshold", "cookie_threshold",
                                                                   "cookie_threshold_ip"))  # fmt: skip
    if b"charon {\n" not in conf:
        raise RuntimeError("the peer's strongswan.conf has no 'charon {' section to extend")
    return conf.replace(b"charon {\n", b"charon {\n" + limits.encode(), 1)


def start_peer(lab: Lab, tunnels: int) -> Path:
    """The peer's addresses and default route in <p>-rb, then its charon; the VICI socket.
    Each site's subnet gets an address (10.200.i.1) on a veth pair of its own: kernel-libipsec routes
    every CHILD_SA into its TUN device from a local address inside the local traffic selector,
    and refuses the CHILD_SA (TS_UNACCEPTABLE) without one."""
    namespace = lab.ns("rb")
    batch = "".join(f"addr add {peer_ip(i)}/24 dev eth1\n" for i in range(tunnels))
    batch += f"route add default via {PEER_GATEWAY}\nlink add {SITES_IF} type veth peer name {SITES_IF}-end\n"
    batch += f"link set {SITES_IF} up\nlink set {SITES_IF}-end up\n"
    batch += "".join(f"addr add {peer_subnet(i).replace('.0/', '.1/')} dev {SITES_IF}\n" for i in range(tunnels))
    done = subprocess.run(["ip", "-n", namespace, "-batch", "-"], input=batch, check=False, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"ip -n {namespace} -batch: {done.stderr.strip()[-300:]}")
    directory = lab.dir / "peer"
    directory.mkdir(exist_ok=True)
    socket_path, conf = directory / "charon.vici", directory / "strongswan.conf"
    conf.write_bytes(peer_conf(lab, socket_path))
    with open(directory / "charon.log", "ab") as log:
        PEER["charon"] = subprocess.Popen(["ip", "netns", "exec", namespace, CHARON], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "STRONGSWAN_CONF": str(conf)})  # fmt: skip
    return socket_path


def load_peer(socket_path: Path, tunnels: int) -> tuple[float, str]:
    """Every responder connection and its key, over VICI (waits up to 5 s for the socket);
    ms taken, and the daemon's version."""
    try:
        with vici_session(socket_path, wait_s=5) as session:
            version = session.version()
            mark = time.perf_counter()
            for i in range(tunnels):
                session.load_shared({"id": f"psk-peer-{i}", "type": "IKE", "data": psk(i),
                                     "owners": [peer_ip(i), LOCAL_IP]})  # fmt: skip
                session.load_conn(peer_conn(i))
            took = ms(mark)
            loaded = len(session.get_conns()["conns"])
    except OSError as error:
        log = (socket_path.parent / "charon.log").read_text(errors="replace").strip()
        raise RuntimeError(f"the peer charon does not answer ({error}): {log[-300:]}") from None
    if loaded != tunnels:
        raise RuntimeError(f"the peer charon loaded {loaded} connections of {tunnels}")
    return took, f"{version['daemon'].decode()} {version['version'].decode()}"


# ---------------------------------------------------------------------------- measuring
def bench(args, lab: Lab) -> dict:
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
        measure(args, lab, figures, state)
    except (VrError, RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError,
            CommandException, SessionException) as error:  # fmt: skip
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


def measure(args, lab: Lab, figures: dict, state: dict) -> None:
    pipeline = Pipeline(lab.settings)
    router_socket = live_socket(pipeline.runtime)
    state["phase"] = "apply configs/examples/router.json"
    example = json.loads((EXAMPLES / "router.json").read_text())
    figures["router_apply_ms"] = round(pipeline.apply(example).duration_ms, 1)
    state["generation"] = example["generation"]
    figures["esp"] = "kernel" if kernel_has_esp() else "kernel-libipsec (charon's userspace ESP)"

    check_stop()
    state["phase"] = "start the peer charon"
    peer_socket = start_peer(lab, args.tunnels)
    state["phase"] = "load the peer's connections"
    took, figures["strongswan_version"] = load_peer(peer_socket, args.tunnels)
    figures["peer_load_ms"] = round(took, 1)

    check_stop()
    state["phase"] = f"apply {args.tunnels} tunnels"
    tunnels = [tunnel(i) for i in range(args.tunnels)]
    names = [router_name(i) for i in range(args.tunnels)]
    state["generation"] += 1
    mark = time.perf_counter()
    result = pipeline.apply(vpn_payload(state["generation"], tunnels))
    figures["load_all_ms"] = round(result.duration_ms, 1)
    figures["load_all_timings_ms"] = {step: round(v, 2) for step, v in with_commit(result).items()}
    figures["load_all_changed"] = result.changed
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
        name, peer_name = router_name(i), f"peer-{i}"
        state["phase"] = f"change {k + 1}: {name} {KIND_LABEL[kind]}"
        touched.add(i)
        tunnels[i] = changed(tunnels[i], i, kind)
        state["generation"] += 1
        old = baseline[name]
        mark = time.perf_counter()
        result = pipeline.apply(vpn_payload(state["generation"], tunnels))
        wall = ms(mark)
        back = wait_changed(router_socket, name, old, mark, peer_subnet(i, 25) if kind == "peer_subnet" else None)
        time.sleep(args.settle_s)
        now, peer_now = ids(snapshot(router_socket)), ids(snapshot(peer_socket))
        moved = sorted(n for n in baseline if n != name and now.get(n) != baseline[n])
        peer_moved = sorted(n for n in peer_baseline if n != peer_name and peer_now.get(n) != peer_baseline[n])
        runs.append(
            {
                "tunnel": f"peer-{i}",
                "kind": kind,
                "apply_ms": round(result.duration_ms, 1),
                "apply_wall_ms": round(wall, 1),
                "timings_ms": {step: round(v, 2) for step, v in with_commit(result).items()},
                "changed": result.changed,
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

    untouched = {router_name(i) for i in range(args.tunnels)} - {router_name(i) for i in touched}
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
        profile_one(pipeline, vpn_payload(state["generation"], tunnels))


def profile_one(pipeline: Pipeline, payload: dict) -> None:
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
                f"{f['tunnels']} site-to-site, IKEv2 PSK: router A {LOCAL_IP} (initiates) -> one peer charon "
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
def our_charons(root: str) -> list[int]:
    """charon processes reading a strongswan.conf under our temp root: router A's, its checker
    (in a namespace of its own), the peer's. Only ever ours."""
    found = []
    marker = f"STRONGSWAN_CONF={root}/".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() != Path(CHARON).name[:15]:
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(item.startswith(marker) for item in environ):
            found.append(int(entry))
    return found


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


def cleanup(lab: Lab, root: str, entered: bool, logs: str | None) -> None:
    if entered:
        stop_router(lab.settings, root, "vpn_scale")  # supervisord, router A's charon and checker, dnsmasq
    for process in PEER.values():
        try:
            stop_process(process)
        except (OSError, subprocess.SubprocessError) as error:  # clean-up goes on
            print(f"vpn_scale: stopping the peer charon (pid {process.pid}): {error}", file=sys.stderr)
    for pid in our_charons(root):  # only if supervisord or a TERM failed to stop them
        print(f"vpn_scale: killing leftover charon pid {pid}", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if logs:
        keep_logs(lab, logs)
    try:
        lab.down()  # namespaces
    except (OSError, subprocess.SubprocessError) as error:
        print(f"vpn_scale: lab down: {error}", file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=50, help="site-to-site tunnels (peers)")
    parser.add_argument("--changes", type=int, default=5, help="one-tunnel changes, each to a different tunnel")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="wait this long after a tunnel is up before SA ids are compared")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="cProfile one extra one-tunnel change (stderr)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the charons' and supervisord's logs there at the end")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    if not 1 <= args.tunnels <= 200 or not 0 <= args.changes <= args.tunnels or not 0 <= args.settle_s <= 30:
        parser.error("need 1 <= tunnels <= 200, 0 <= changes <= tunnels, 0 <= settle-s <= 30")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")

    root = tempfile.mkdtemp(prefix="vrbv-")
    os.chmod(root, 0o755)  # dnsmasq drops privileges and must still read its files
    lab = Lab(root, prefix=f"vrbv{os.getpid() % 100000}", vpn=True)
    entered = False

    def work() -> dict:
        nonlocal entered
        lab.up()  # removes what it made if it fails
        netns.enter(lab.router_ns)  # before any thread exists: supervisord and its daemons live in there
        entered = True
        return bench(args, lab)

    figures = guarded(work, lambda: cleanup(lab, root, entered, args.keep_logs))
    return report(table(figures), figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
