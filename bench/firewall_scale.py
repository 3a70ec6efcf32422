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
  rule_by_rule_ms        the same kind of rules created one `nft add rule` process per rule, in a
                         separate namespace: --naive-rules of them measured, extrapolated linearly
  throughput_*_gbps      iperf3 guest (g1) -> router (forward, source NAT) -> public host (pub),
                         example-size ruleset vs the 10k one, alternated         (median of --iperf-runs)

Run as root:  .venv/bin/python bench/firewall_scale.py [--rules 10000 --naive-rules 1000 --repeat 10
              --iperf-seconds 3] [--json]

Everything it creates (namespaces vrfw<pid>-r, -pub, -g1, -naive, a temp root, supervisord, dnsmasq,
iperf3) is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP; processes are stopped by PID.
The host's own interfaces are never touched: the process moves itself into the router namespace.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    stop_process,
    stop_processes,
    stop_router,
    with_commit,
    yes,
)

from vr.foundation import netns
from vr.foundation.errors import VrError
from vr.foundation.settings import Settings
from vr.services.base import Change
from vr.services.nftables import RULESET, NftablesService
from vr.transaction.pipeline import Pipeline

TARGET_FULL_MS = 300.0
TARGET_INCREMENTAL_MS = 20.0
TARGET_THROUGHPUT_RATIO = 0.95
ROUTER = "r-fwbench-vm"
DOMAIN = "cloud.internal"
PUBLIC_NET = ipaddress.IPv4Network("192.0.2.0/24")
PUBLIC_PEER = "192.0.2.1"  # the public host (pub namespace): iperf3 server, the router's default gateway
PUBLIC_IPS = [str(ipaddress.IPv4Address("192.0.2.10") + n) for n in range(16)]  # all assigned, all on eth1
SOURCE_NAT_IP = PUBLIC_IPS[0]
GUEST_IP, GUEST_MAC = "10.1.1.10", "02:00:00:00:01:10"  # the g1 namespace (static address, no DHCP)
PF_PORT_BASE = 10000  # port forwards: 10000.. per (public IP, protocol)
FW_PORT_BASE = 30000  # ingress rules that do not open a port forward: 30000.. per (public IP, protocol)
INC_PORT_BASE = 60000  # the incremental adds
IPERF_PORT = "5201"
ACL_SHARE = 10  # one rule in ten is an ACL entry
ACL_LIST_MAX = 2000  # entries per ACL list (document limit)
INCREMENTAL_NOTE = "a change that only adds or removes elements is applied as one add/delete element batch"
PF_SETS = ("pf_tcp", "pf_udp", "pf_tcp_from", "pf_udp_from")
INGRESS_SETS = ("in_all", "in_tcp", "in_udp", "in_all_from", "in_tcp_from", "in_udp_from", "in_icmp", "in_icmp_typed")
# Result.timings_ms steps; "commit" is ours: duration_ms minus their sum (document.json, events, clean-up).
LISTEN_TRIES = 300  # bounded wait for iperf3's server to listen (x 10 ms)

# The signal that asked us to stop (its handler raises SystemExit; an apply turns that into a
# rollback and re-raises it, but every loop checks this too).
CHILDREN: list[subprocess.Popen] = []  # started processes (iperf3 servers), stopped by PID


class GcClock:
    """Time the interpreter spends in its cyclic garbage collector (all generations)."""

    def __init__(self) -> None:
        self.total_ms, self._start = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_ms += ms(self._start)


def median_steps(series: list[dict[str, float]]) -> dict[str, float]:
    return {s: round(statistics.median(t.get(s, 0.0) for t in series), 2) for s in STEPS if series}


# ---------------------------------------------------------------------------- the document
def base_document() -> dict:
    """The router (one guest tier, as configs/examples/router.json minus tier2), example-size rules."""
    return {
        "generation": 1,
        "router": {"name": ROUTER, "type": "vpc"},
        "interfaces": [
            {"id": "control", "role": "control", "name": "eth0", "addresses": ["169.254.0.10/16"]},
            {
                "id": "public",
                "role": "public",
                "name": "eth1",
                "addresses": [f"{PUBLIC_IPS[0]}/{PUBLIC_NET.prefixlen}"],
            },
            {"id": "tier1", "role": "guest", "name": "eth2", "addresses": ["10.1.1.1/24"]},
        ],
        "routes": [{"destination": "0.0.0.0/0", "gateway": PUBLIC_PEER}],
        "dns": {"domain": DOMAIN, "upstream": [PUBLIC_PEER]},
        "dhcp": {
            "tiers": [{"tier": "tier1", "range": {"start": "10.1.1.100", "end": "10.1.1.150"}, "lease_time": 3600}],
            "entries": [
                {"tier": "tier1", "mac": GUEST_MAC, "ip": GUEST_IP, "hostname": "web1"},
                {"tier": "tier1", "mac": "02:00:00:00:01:11", "ip": "10.1.1.11", "hostname": "web2"},
            ],
        },
        **baseline_sections(),
    }


def nat_section(port_forwarding: list[dict]) -> dict:
    # The same public IPs and source NAT in both rule sets: only the nftables service changes.
    return {
        "public_ips": [{"ip": ip} for ip in PUBLIC_IPS],
        "source_nat": [{"tier": "tier1", "ip": SOURCE_NAT_IP}],
        "static_nat": [],
        "port_forwarding": port_forwarding,
    }


def firewall_section(ingress: list[dict]) -> dict:
    return {"ingress": ingress, "egress": [{"tier": "tier1", "default": "allow"}]}


def acl_section(entries: int) -> list[dict]:
    """tier1's ACL with this many entries: ingress and egress alternately, each list ending in
    an allow-all (so that port forwards still reach the guest and the guest reaches the public
    host); no other entry matches that traffic (their CIDRs are elsewhere)."""
    lists: dict[str, list[dict]] = {"ingress": [], "egress": []}
    for k in range(max(0, entries - 2)):
        side = lists[("ingress", "egress")[k % 2]]
        protocol = ("tcp", "udp", "icmp", "all")[k % 4]
        entry = {"number": len(side) + 1, "action": ("deny", "allow")[k % 3 == 0], "protocol": protocol,
                 "cidrs": [f"198.18.{k // 256 % 256}.{k % 256}/32", f"100.{64 + k % 64}.{k % 256}.0/24"]}  # fmt: skip
        if protocol in ("tcp", "udp"):
            entry["ports"] = 1000 + k % 5000
        elif protocol == "icmp":
            entry["icmp_type"] = 8
        side.append(entry)
    for side in lists.values():
        side.append({"number": len(side) + 1, "action": "allow", "protocol": "all"})
    return [{"tier": "tier1", **lists, "ingress_default": "deny", "egress_default": "allow"}]


def acl_count(sections: dict) -> int:
    return sum(len(acl["ingress"]) + len(acl["egress"]) for acl in sections["network_acls"])


def baseline_sections() -> dict:
    """The example's rules ("0 rules"): two port forwards, their two ingress rules, source NAT,
    tier1's ACL with its two allow-alls."""
    ip = PUBLIC_IPS[0]
    forwards = [
        {"id": "web-http", "public_ip": ip, "protocol": "tcp", "public_ports": 8080,
         "private_ip": GUEST_IP, "private_ports": 80},
        {"id": "web-udp", "public_ip": ip, "protocol": "udp", "public_ports": 5353,
         "private_ip": GUEST_IP, "private_ports": 5353},
    ]  # fmt: skip
    ingress = [
        {"id": "http", "public_ip": ip, "protocol": "tcp", "ports": 8080, "source_cidrs": ["0.0.0.0/0"]},
        {"id": "udp", "public_ip": ip, "protocol": "udp", "ports": 5353},
    ]
    return {"nat": nat_section(forwards), "firewall": firewall_section(ingress), "network_acls": acl_section(2)}


def sources_for(k: int) -> list[str]:
    """One to three source CIDRs, disjoint within a rule (overlapping elements are refused by nft)."""
    kind = k % 4
    if kind == 0:
        return ["0.0.0.0/0"]
    if kind == 1:
        return [f"{11 + k % 50}.{k % 256}.0.0/16"]
    if kind == 2:
        return [f"203.0.113.{k % 256}/32", "198.51.100.0/24"]
    return [f"172.{16 + k % 16}.{k % 256}.0/24", f"100.{64 + k % 64}.0.0/16", "192.0.2.0/28"]


def scale_sections(rules: int) -> dict:
    """rules // 10 ACL entries; of the rest, half port forwards and half ingress rules. Every
    (public IP, protocol, port) is claimed once, so no two elements of a set overlap."""
    n_acl = min(max(2, rules // ACL_SHARE), 2 * ACL_LIST_MAX)
    n_pf = (rules - n_acl) // 2
    n_in = rules - n_acl - n_pf
    nips = len(PUBLIC_IPS)
    forwards = []
    for k in range(n_pf):
        forwards.append(
            {
                "id": f"pf-{k}",
                "public_ip": PUBLIC_IPS[k % nips],
                "protocol": ("tcp", "udp")[(k // nips) % 2],
                "public_ports": PF_PORT_BASE + k // (2 * nips),
                "private_ip": f"10.1.1.{20 + k % 200}",
                "private_ports": 1024 + k % 4000,
            }
        )
    cursor: dict[tuple[str, str], int] = {}
    ingress = []
    for k in range(n_in):
        if k % 2 == 0 and k < n_pf:  # opens port forward k
            pf = forwards[k]
            ip, protocol, ports = pf["public_ip"], pf["protocol"], str(pf["public_ports"])
        else:  # opens a port (every 7th: a range of 10) on a public IP itself
            ip, protocol = PUBLIC_IPS[k % nips], ("tcp", "udp")[(k // nips) % 2]
            start = cursor.get((ip, protocol), FW_PORT_BASE)
            width = 10 if k % 7 == 0 else 1
            cursor[(ip, protocol)] = start + width
            ports = f"{start}-{start + width - 1}" if width > 1 else str(start)
        ingress.append(
            {"id": f"in-{k}", "public_ip": ip, "protocol": protocol, "ports": ports, "source_cidrs": sources_for(k)}
        )
    return {"nat": nat_section(forwards), "firewall": firewall_section(ingress), "network_acls": acl_section(n_acl)}


def incremental_rules(j: int) -> tuple[dict, dict]:
    """The j-th single port forward added incrementally, and the ingress rule that opens it."""
    ip, port = PUBLIC_IPS[0], INC_PORT_BASE + j
    forward = {"id": f"inc-{j}", "public_ip": ip, "protocol": "tcp", "public_ports": port,
               "private_ip": GUEST_IP, "private_ports": 8000 + j}  # fmt: skip
    rule = {"id": f"inc-{j}", "public_ip": ip, "protocol": "tcp", "ports": port, "source_cidrs": ["0.0.0.0/0"]}
    return forward, rule


def element_count(sections: dict) -> dict[str, int]:
    """Elements the live table must hold (an ACL entry: one per CIDR; the bench's never nest)."""
    forwards = len(sections["nat"]["port_forwarding"])  # single ports, no source CIDRs: one element each
    ingress = sum(len(r.get("source_cidrs", ["0.0.0.0/0"])) for r in sections["firewall"]["ingress"])
    acl = sum(len(e.get("cidrs", ["0.0.0.0/0"])) for a in sections["network_acls"] for e in a["ingress"] + a["egress"])
    return {"pf": forwards, "ingress": ingress, "acl": acl}


# ---------------------------------------------------------------------------- namespaces
def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, timeout=20, input=stdin, capture_output=True, text=True)


def build_lab(prefix: str, created: list[str]) -> dict[str, str]:
    """<p>-r (eth0 control with a local peer, eth1 public, eth2 tier1), <p>-pub, <p>-g1, <p>-naive."""
    names = {s: f"{prefix}-{s}" for s in ("r", "pub", "g1", "naive")}
    for name in names.values():
        if os.path.exists(f"/run/netns/{name}"):
            raise SystemExit(f"firewall_scale: namespace {name} already exists; not touching it")
    for name in names.values():
        created.append(name)  # from here on it is ours, even if 'ip netns add' is interrupted half-way
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
    r, pub, g1 = names["r"], names["pub"], names["g1"]
    run("ip", "-n", r, "link", "add", "eth0", "type", "veth", "peer", "name", "p0")
    run("ip", "-n", r, "link", "set", "p0", "up")
    run("ip", "link", "add", "eth1", "netns", r, "type", "veth", "peer", "name", "eth0", "netns", pub)
    run("ip", "link", "add", "eth2", "netns", r, "type", "veth", "peer", "name", "eth0", "netns", g1)
    run("ip", "-n", pub, "addr", "add", f"{PUBLIC_PEER}/{PUBLIC_NET.prefixlen}", "dev", "eth0")
    run("ip", "-n", pub, "link", "set", "eth0", "up")
    run("ip", "-n", g1, "link", "set", "eth0", "address", GUEST_MAC)
    run("ip", "-n", g1, "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
    run("ip", "-n", g1, "link", "set", "eth0", "up")
    run("ip", "-n", g1, "route", "add", "default", "via", "10.1.1.1")
    return names


# ---------------------------------------------------------------------------- throughput
def iperf(names: dict[str, str], seconds: int) -> dict:
    """One iperf3 run, g1 -> pub through the router. Server: one-shot, bound to the public host."""
    pub, g1 = names["pub"], names["g1"]
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


def bench(args, settings: Settings, names: dict[str, str]) -> dict:
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
        measure(args, settings, names, figures, gc_clock)
    except (VrError, RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as error:
        check_stop()
        figures["error"] = f"{figures.pop('_phase', '?')}: {type(error).__name__}: {error}"
    finally:
        gc.callbacks.remove(gc_clock)
    figures.pop("_phase", None)
    met = [figures.get(k, False) for k in ("full_apply_met", "incremental_apply_met", "throughput_met")]
    figures["all_met"] = all(met) and "error" not in figures
    return figures


def measure(args, settings: Settings, names: dict[str, str], figures: dict, gc_clock: GcClock) -> None:
    raw = base_document()
    big = scale_sections(args.rules)
    small = {name: raw[name] for name in big}
    expected = element_count(big)
    figures["port_forwards"] = len(big["nat"]["port_forwarding"])
    figures["ingress_rules"] = len(big["firewall"]["ingress"])
    figures["acl_rules"] = acl_count(big)
    figures["ingress_elements"] = expected["ingress"]
    figures["document_bytes"] = len(json.dumps(big))

    figures["_phase"] = "cold apply"
    pipeline = Pipeline(settings)
    mark = time.perf_counter()
    result = pipeline.apply(raw)
    figures["cold_apply_ms"] = round(ms(mark), 1)
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
            run_ = iperf(names, args.iperf_seconds)
            tput["0"].append(run_["gbps"])
            server_saw.add(run_["server_saw"])
        check_stop()
        figures["_phase"] = f"full apply #{cycle + 1}"
        generation += 1
        gc_before = gc_clock.total_ms
        mark = time.perf_counter()
        result = pipeline.apply({"generation": generation, **big})
        full.append(ms(mark))
        full_gc.append(gc_clock.total_ms - gc_before)
        full_steps.append(with_commit(result))
        figures["full_apply_changed"] = result.changed
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
            run_ = iperf(names, args.iperf_seconds)
            tput["10k"].append(run_["gbps"])
            server_saw.add(run_["server_saw"])
        if cycle < cycles - 1:
            figures["_phase"] = f"apply back to example-size rules #{cycle + 1}"
            generation += 1
            mark = time.perf_counter()
            result = pipeline.apply({"generation": generation, **small})
            back.append(ms(mark))
            back_steps.append(with_commit(result))
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
        mark = time.perf_counter()
        result = pipeline.apply(payload)
        series.append(ms(mark))
        gc_ms.append(gc_clock.total_ms - gc_before)
        steps.append(with_commit(result))
        changed.update(result.changed)
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

    # Rule by rule, in the naive namespace.
    figures["_phase"] = "rule by rule"
    commands = naive_commands(big, min(args.naive_rules, args.rules))
    if commands:
        times = rule_by_rule(names["naive"], commands)
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
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args(argv)
    if not 2 <= args.rules <= 40000 or args.naive_rules < 0 or args.repeat < 0 or args.runs < 1:
        parser.error("need 2 <= rules <= 40000, naive-rules >= 0, repeat >= 0, runs >= 1")
    if args.iperf_seconds < 0 or args.iperf_runs < 1:
        parser.error("need iperf-seconds >= 0, iperf-runs >= 1")
    if os.geteuid() != 0:
        parser.error("run as root: it creates network namespaces")

    prefix = f"vrfw{os.getpid()}"
    root = tempfile.mkdtemp(prefix="vrfw-")
    os.chmod(root, 0o755)  # dnsmasq drops privileges and must still read its files
    settings = Settings.under_root(root, netns=f"{prefix}-r")
    created: list[str] = []
    entered = False

    def work() -> dict:
        nonlocal entered
        names = build_lab(prefix, created)
        netns.enter(names["r"])  # before any thread exists: daemons, probes and nft all live in there
        entered = True
        return bench(args, settings, names)

    figures = guarded(work, lambda: cleanup(settings, root, created, entered))
    return report(table(figures), figures, args.json)


def cleanup(settings: Settings, root: str, created: list[str], entered: bool) -> None:
    stop_processes(CHILDREN, "firewall_scale")
    if entered:
        stop_router(settings, root, "firewall_scale")
    for name in created:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
