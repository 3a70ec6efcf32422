"""Bench: guest data on a router with 4,000 VMs, asked by guests in 4 namespaces, through the daemon.

The router (bench/harness.py's BenchRouter: namespaces vrb3md<pid>-*) boots with its bootstrap
document (a `vr apply`), then the manager pushes the whole document through the agent: 4,000
VMs on 8 tiers, each with user data (1 KiB), two SSH keys and its meta data, and 4 client VMs
(c1..c4: two on each of the lab's tiers, on bridges in g1 and g2) whose namespaces ask. The
clients are `wrk` (C, epoll) in each namespace at once, each sending from its VM's own address
and MAC (anti-spoofing is on):

  metadata_rps, metadata_p99_ms        GET /latest/meta-data/instance-id, keep-alive
  metadata_close_rps / _p99_ms         the same with Connection: close (a TCP connection a request)
  userdata_rps, userdata_p99_ms        GET /latest/user-data (1 KiB), keep-alive
  password_ms_p50 / _max               one send_my_password answered (a fresh password each time,
                                       set by a vm_passwords push), then saved_password
  data_change_served_ms                one VM's meta data changed by a vm_data push through the agent
                                       until a guest that polls meanwhile (every ms) is served the new
                                       value; data_change_push_ms: the push alone (answered)
  failed_requests                      non-2xx answers, socket errors and timeouts, every phase
  rss_total_mb, pss_total_mb           vr's processes (keeper, supervisord, daemon) after the cold push
                                       and after the load (rss_after_load_mb)

Run as root:  .venv/bin/python bench/metadata.py [--vms 4000 --seconds 5 --connections 16] [--json]

Everything it creates is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP; processes are
stopped by PID. Only addresses inside its own namespaces are used.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import time

from harness import (
    BASE_INTERFACES,
    DOMAIN,
    BenchRouter,
    CliDriver,
    agent_driver,
    agent_section,
    aligned,
    bench_token,
    check_stop,
    median_steps,
    memory_figures,
    ms,
    report,
    run_bench,
    vm_entries,
    vm_interfaces,
    vm_sections,
    vm_tiers,
)

TARGETS = {"metadata_rps": (3000, ">"), "metadata_p99_ms": (20, "<"), "data_change_served_ms": (20, "<"),
           "rss_total_mb": (100, "<"), "failed_requests": (0, "==")}  # fmt: skip
TIERS = (("tier1", "eth2", "10.1.1.1", "10.1.1.0/24", "g1"), ("tier2", "eth3", "10.1.2.1", "10.1.2.0/24", "g2"))
CLIENTS = [  # (namespace suffix, tier, MAC, address)
    ("c1", 0, "02:00:00:00:0c:01", "10.1.1.201"), ("c2", 0, "02:00:00:00:0c:02", "10.1.1.202"),
    ("c3", 1, "02:00:00:00:0c:03", "10.1.2.203"), ("c4", 1, "02:00:00:00:0c:04", "10.1.2.204"),
]  # fmt: skip
VM_MACS = 0x42
USER_DATA = base64.b64encode(b"#cloud-config\n" + b"# " + b"x" * 1000 + b"\nruncmd: [true]\n").decode()
# A guest that asks for one key every millisecond (at most for --change-timeout) and prints the
# monotonic time (CLOCK_MONOTONIC: the same in every namespace) at which the value changed.
POLLER = r"""
import http.client, sys, time
host, path, old, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
connection = http.client.HTTPConnection(host, 80, timeout=2)
print("ready", flush=True)
end = time.monotonic() + limit
while time.monotonic() < end:
    connection.request("GET", path)
    body = connection.getresponse().read().decode()
    if body != old:
        print(time.monotonic(), body, flush=True)
        break
    time.sleep(0.001)
else:
    print("unchanged", flush=True)
"""


def ssh_keys() -> list[str]:
    """Two real public keys (every VM's): the document refuses what is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    return [f"{ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*public).decode()} {who}@bench"
            for who in ("ops", "user")]  # fmt: skip


def build_document(args, token: str) -> dict:
    layout = vm_tiers(args.vms, 8, first_eth=4, id_prefix="vms")
    dhcp_tiers, _ = vm_sections(layout, ipv6=False)
    entries = vm_entries(layout, args.vms, ipv6=False, mac_prefix=VM_MACS)
    entries += [{"tier": TIERS[t][0], "mac": mac, "ip": ip, "hostname": name} for name, t, mac, ip in CLIENTS]
    keys = ssh_keys()
    vms = [{"mac": e["mac"], "user_data": USER_DATA, "public_keys": keys,
            "meta_data": {"instance-id": f"i-{e['hostname']}", "vm-id": e["hostname"], "availability-zone": "zone-1",
                          "service-offering": "Small Instance"}} for e in entries]  # fmt: skip
    guests = [{"id": tier, "role": "guest", "name": ifname, "addresses": [f"{ip}/24"]} for tier, ifname, ip, _, _ in TIERS]
    return {
        "generation": 2,
        "router": {"name": "r-md-vm", "type": "isolated"},
        "interfaces": [*BASE_INTERFACES, *guests, *vm_interfaces(layout, ipv6=False)],
        "routes": [{"destination": "0.0.0.0/0", "gateway": "192.0.2.1"}],
        "dns": {"domain": DOMAIN},
        "dhcp": {"tiers": [{"tier": t[0]} for t in TIERS] + dhcp_tiers, "entries": entries},
        "guest_data": {"vms": vms},
        **agent_section(token),
    }  # fmt: skip


def clients_up(router: BenchRouter) -> None:
    """Each client VM on its tier's link (a bridge in g1 or g2), at its DHCP entry's address."""
    for n, (_, _, _, _, guest) in enumerate(TIERS):
        router.lab.add_guests(guest, {name: mac for name, t, mac, _ in CLIENTS if t == n})
    for name, t, _, ip in CLIENTS:
        subprocess.run(["ip", "-n", router.ns(name), "addr", "add", f"{ip}/24", "dev", "eth0"], check=True, timeout=10)
        subprocess.run(["ip", "-n", router.ns(name), "route", "add", "default", "via", TIERS[t][2]], check=True,
                       timeout=10)  # fmt: skip


def wrk_all(router: BenchRouter, path: str, seconds: int, connections: int, close: bool) -> dict:
    """wrk in every client namespace at once: summed requests/s, the worst p99, failures."""
    processes = []
    for name, t, _, _ in CLIENTS:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "2s"]
        argv += ["-H", "Connection: close"] if close else []
        processes.append(router.start([*argv, f"http://{TIERS[t][2]}{path}"], router.ns(name), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    rps, p99, failed, requests = 0.0, 0.0, 0, 0
    for process in processes:
        out, err = process.communicate(timeout=seconds + 30)
        if process.returncode != 0:
            raise RuntimeError(f"wrk exited {process.returncode}: {err.strip()[-300:]}")
        rps += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p99 = max(p99, _latency_ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)))
        requests += int(re.search(r"(\d+) requests in", out).group(1))
        for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"connect (\d+), read (\d+), write (\d+), timeout (\d+)"):
            found = re.search(pattern, out)
            failed += sum(int(g) for g in found.groups()) if found else 0
    return {"rps": round(rps), "p99_ms": round(p99, 2), "failed": failed, "requests": requests}


def _latency_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def ask(router: BenchRouter, client: tuple, port: int, header: str | None = None, path: str = "/") -> str:
    name, t, _, _ = client
    argv = ["curl", "-s", "-m", "5", "-f", *(["-H", header] if header else []), f"http://{TIERS[t][2]}:{port}{path}"]
    done = subprocess.run(["ip", "netns", "exec", router.ns(name), *argv], capture_output=True, text=True, timeout=15,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{name}: curl {port}{path} exited {done.returncode}")
    return done.stdout


def bench(args, router: BenchRouter) -> dict:
    token = bench_token()
    doc = build_document(args, token)
    f: dict = {"vms": args.vms, "clients": len(CLIENTS), "seconds": args.seconds, "connections": args.connections,
               "cpus": len(os.sched_getaffinity(0)), "load_1m_start": round(os.getloadavg()[0], 2),
               "document_bytes": len(json.dumps(doc)), "targets": {k: f"{op} {v}" for k, (v, op) in TARGETS.items()}}  # fmt: skip
    phase = "bootstrap"
    try:
        CliDriver(router.lab).push({"generation": 1, "router": doc["router"], "interfaces": BASE_INTERFACES,
                                    "routes": doc["routes"], "dns": doc["dns"], "agent": doc["agent"]})  # fmt: skip
        driver = agent_driver(router.settings, token)
        phase = "cold push"
        pushed = driver.put(doc)
        f["cold_push_ms"] = round(pushed.wall_ms, 1)
        f |= {k: v for k, v in memory_figures(router.settings).items() if k != "vr_processes"}
        f["vr_processes"] = memory_figures(router.settings)["vr_processes"]
        phase = "clients"
        clients_up(router)
        failed = 0
        for label, path, close in (("metadata", "/latest/meta-data/instance-id", False),
                                   ("metadata_close", "/latest/meta-data/instance-id", True),
                                   ("userdata", "/latest/user-data", False)):  # fmt: skip
            check_stop()
            phase = f"wrk {label}"
            result = wrk_all(router, path, args.seconds, args.connections, close)
            f |= {f"{label}_rps": result["rps"], f"{label}_p99_ms": result["p99_ms"], f"{label}_requests": result["requests"]}
            failed += result["failed"]
        phase = "password"
        times = []
        for k in range(args.passwords):
            check_stop()
            client = CLIENTS[k % len(CLIENTS)]
            secret = f"Bench-{k}-{os.getpid()}"
            driver.push({"vm_passwords": [{"mac": client[2], "password": secret}]}, next_generation=True)
            mark = time.perf_counter()
            answer = ask(router, client, 8080, "DomU_Request: send_my_password")
            times.append(ms(mark))
            failed += answer != secret
            failed += ask(router, client, 8080, "DomU_Request: send_my_password") != "saved_password"
        f["password_ms_p50"], f["password_ms_max"] = round(statistics.median(times), 2), round(max(times), 2)
        phase = "data change"
        served, pushes, steps = [], [], []
        for k in range(args.changes):
            check_stop()
            client = CLIENTS[k % len(CLIENTS)]
            path = "/latest/meta-data/availability-zone"
            old = ask(router, client, 80, path=path)
            poller = router.start([sys.executable, "-c", POLLER, TIERS[client[1]][2], path, old, "10"],
                                  router.ns(client[0]), stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert poller.stdout.readline().strip() == "ready"
            meta = {"instance-id": f"i-{client[0]}", "availability-zone": f"zone-{k + 2}"}
            mark, start = time.perf_counter(), time.monotonic()
            pushed = driver.push({"vm_data": {"upsert": [{"mac": client[2], "meta_data": meta}]}}, next_generation=True)
            pushes.append(ms(mark))
            steps.append(pushed.timings_ms)
            line = poller.stdout.readline().split()
            poller.wait(timeout=15)
            if not line or line[0] == "unchanged" or line[1] != f"zone-{k + 2}":
                failed += 1
                continue
            served.append((float(line[0]) - start) * 1000)
        f["data_change_served_ms"] = round(statistics.median(served), 2) if served else None
        f["data_change_served_max_ms"] = round(max(served), 2) if served else None
        f["data_change_push_ms"] = round(statistics.median(pushes), 2)
        f["data_change_timings_ms"] = median_steps(steps)
        f["failed_requests"] = failed
        after = memory_figures(router.settings)
        f["rss_after_load_mb"], f["pss_after_load_mb"] = after["rss_total_mb"], after["pss_total_mb"]
    except (RuntimeError, OSError, ValueError, KeyError, AttributeError, subprocess.SubprocessError) as error:
        check_stop()
        f["error"] = f"{phase}: {type(error).__name__}: {error}"
    f["load_1m_end"] = round(os.getloadavg()[0], 2)
    f["met"] = {k: _met(f.get(k), v, op) for k, (v, op) in TARGETS.items()}
    f["all_met"] = "error" not in f and all(f["met"].values())
    return f


def _met(value, target, op) -> bool:
    if value is None:
        return False
    return value > target if op == ">" else value < target if op == "<" else value == target


def table(f: dict) -> str:
    def row(name: str, unit: str = "") -> tuple[str, str]:
        value = f.get(name)
        target = f["targets"].get(name, "")
        mark = "" if name not in f.get("met", {}) else ("  met" if f["met"][name] else "  NOT met")
        return (name, f"{value}{unit}  {('target ' + target) if target else ''}{mark}")

    rows = [("router", (f"{f['vms']} VMs with guest data, {f['clients']} guest clients x {f['connections']} "
                       f"connections, {f['seconds']} s a phase, {f['cpus']} cores"))]  # fmt: skip
    rows += [row(n) for n in ("cold_push_ms", "metadata_rps", "metadata_p99_ms", "metadata_close_rps",
                              "metadata_close_p99_ms", "userdata_rps", "userdata_p99_ms", "password_ms_p50",
                              "password_ms_max", "data_change_push_ms", "data_change_timings_ms", "data_change_served_ms",
                              "data_change_served_max_ms", "failed_requests", "rss_total_mb", "pss_total_mb",
                              "rss_after_load_mb")]  # fmt: skip
    rows += [(f"  {p['name']}", f"rss {p['rss_mb']} MB, pss {p['pss_mb']} MB") for p in f.get("vr_processes", [])]
    if "error" in f:
        rows.append(("error", f["error"]))
    return aligned(rows, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=4000)
    parser.add_argument("--seconds", type=int, default=5, help="each wrk phase")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections per client namespace")
    parser.add_argument("--passwords", type=int, default=8)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    if not 8 <= args.vms <= 20000 or not 1 <= args.seconds <= 60 or not 1 <= args.connections <= 256:
        parser.error("need 8 <= vms <= 20000, 1 <= seconds <= 60, 1 <= connections <= 256")
    if min(args.passwords, args.changes) < 1:
        parser.error("every count must be at least 1")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")
    router = BenchRouter("metadata", "md", extra_interfaces=8)
    figures = run_bench(router, lambda r: bench(args, r))
    return report(table(figures), figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
