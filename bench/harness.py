"""The benches' shared harness: a router in namespaces, the drivers that push to it, the payload
builders, the timing helpers, the clean-up and the report. Each bench is its scenario on top.

- BenchRouter: a lab router (vr.lab.harness.Lab: <p>-r, -mgmt, -pub, -g1, -g2; with vpn=True also
  <p>-rb, where the peer charon lives), plus guest interfaces beyond the lab's two tiers (veth pairs
  inside the router namespace) and namespaces of the bench's own. Every name starts with PREFIX.
- Drivers: how a push reaches the router. InProcessDriver (vr.transaction.pipeline.Pipeline in
  this process: the process must be in the router namespace), CliDriver (a fresh `vr apply`
  process per push), AgentDriver (vr.client.RouterClient over HTTPS with a token, to the agent on
  the control address). Each push answers a Pushed: wall time and what the router reported.
- Payload builders: VMs with DHCPv4+v6 (vm_tiers, vm_entries, extra_vm), firewall and NAT rules
  and a VPC network ACL (rule_sections), load-balancer rules (lb_rules), site-to-site tunnels and
  the peer charon that answers them (tunnel, start_peer, load_peer).
- Figures: ms, percentile (p50/p90/p99), series; the report: a plain aligned table, and with
  --json one JSON object as the last line (figure names carry their unit).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import NamedTuple

from vr.foundation.settings import Settings
from vr.lab.harness import Lab, stop_process
from vr.services.runtime import Runtime

PREFIX = "vrb3"  # every namespace a bench creates starts with this
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "configs" / "examples"
EXAMPLE_ROUTER = EXAMPLES / "router.json"
STEPS = ("validate", "render", "check", "switch", "reload", "health", "commit")
STOP: dict[str, int] = {}  # the signal that asked us to stop (see guarded)


# ============================================================================ timing
def check_stop() -> None:
    """Every loop calls this: a signal's SystemExit can be swallowed (a gc callback) or turned
    into a rollback inside an apply."""
    if STOP:
        raise SystemExit(128 + STOP["signum"])


def ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p50 of 100 values: the 50th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def p90(values: list[float]) -> float:
    return percentile(values, 90)


def p50_p99_figures(name: str, values: list[float]) -> dict:
    """name_p50_ms, name_p99_ms, name_max_ms, name_count for a list of ms figures."""
    if not values:
        return {f"{name}_count": 0}
    return {f"{name}_p50_ms": round(percentile(values, 50), 2), f"{name}_p99_ms": round(percentile(values, 99), 2),
            f"{name}_max_ms": round(max(values), 2), f"{name}_count": len(values)}  # fmt: skip


def median_of(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of fn() over runs (ms); stops between runs if we were asked to."""
    times = []
    for _ in range(runs):
        check_stop()
        mark = time.perf_counter()
        fn()
        times.append(ms(mark))
    return statistics.median(times)


def with_commit(result) -> dict[str, float]:
    """A Result's step timings plus "commit": duration_ms minus the steps (document.json, events, clean-up)."""
    timings = dict(result.timings_ms)
    timings["commit"] = round(result.duration_ms - sum(timings.values()), 2)
    return timings


def median_steps(timings: list[dict[str, float]]) -> dict[str, float]:
    return {s: round(statistics.median(t.get(s, 0.0) for t in timings), 2) for s in STEPS} if timings else {}


def steps_text(timings: dict) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in timings.items())


class GcClock:
    """Time the interpreter spends in its cyclic garbage collector (all generations)."""

    def __init__(self) -> None:
        self.total_ms, self.full, self._start = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_ms += ms(self._start)
            self.full += info["generation"] == 2


# ============================================================================ report
def yes(value: bool) -> str:
    return "yes" if value else "NO"


def aligned(rows: list[tuple[str, str]], figures: dict) -> str:
    """The table every bench prints: its rows, any error, and whether all targets were met."""
    rows = list(rows)
    if "error" in figures:
        rows.append(("ERROR", figures["error"]))
    rows.append(("all targets met", "yes" if figures["all_met"] else "NO"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def report(table: str, figures: dict, as_json: bool) -> int:
    """Print the table (and the figures as the last line, one JSON object); the exit code."""
    print(table)
    if as_json:
        print(json.dumps(figures, sort_keys=True))
    return 1 if "error" in figures else 0


# ============================================================================ signals, clean-up
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


def kill_pids(pids: list[int], label: str, what: str = "leftover pid") -> None:
    for pid in pids:
        print(f"{label}: killing {what} {pid}", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_router(settings: Settings, root: str, label: str) -> None:
    """Stop the bench router's daemons through supervisord; kill by PID only what it left
    (in the namespace this process is in)."""
    inode = namespace_inode()
    try:
        Runtime(settings).supervisor.shutdown()  # stops the daemons through supervisord, then itself
    except (OSError, ValueError, RuntimeError, xmlrpc.client.Error) as error:  # clean-up goes on
        print(f"{label}: supervisord shutdown: {error}", file=sys.stderr)
    kill_pids(stray_pids(inode, root), label)  # only if supervisord failed to stop its children


def stop_processes(processes: list[subprocess.Popen], label: str) -> None:
    for process in processes:
        try:
            stop_process(process)
        except (OSError, subprocess.SubprocessError) as error:  # clean-up goes on
            print(f"{label}: stopping pid {process.pid}: {error}", file=sys.stderr)


def lab_cleanup(lab: Lab, root: str, label: str) -> None:
    """The lab down (its servers, dhclient, supervisord and daemons, namespaces), then any
    process still running from the lab's root, by PID, and the root removed."""
    try:
        lab.down()
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        print(f"{label}: lab down: {error}", file=sys.stderr)
    kill_pids(stray_pids(None, root), label)  # the lab spans namespaces; only if something outlived the above
    shutil.rmtree(root, ignore_errors=True)


# ============================================================================ the router
def run(*argv: str, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, timeout=timeout, input=stdin, capture_output=True, text=True)


class BenchRouter:
    """A lab router in namespaces for one bench run, under a temp root it removes.

    extra_interfaces: guest interfaces beyond the lab's eth0..eth3 (eth4, eth5, ...: veth pairs
    inside the router namespace, their peers up, for tiers that need no guest namespace).
    namespaces: suffixes of further empty namespaces (lo up) the bench wires itself.
    CHILDREN: processes the bench started (clients, servers, the peer charon), stopped by PID."""

    def __init__(self, label: str, code: str, vpn: bool = False, extra_interfaces: int = 0,
                 namespaces: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.label = label
        self.root = tempfile.mkdtemp(prefix=f"{PREFIX}{code}-")
        os.chmod(self.root, 0o755)  # dnsmasq drops privileges and must still read its files
        self.lab = Lab(self.root, prefix=f"{PREFIX}{code}{os.getpid() % 100000}", vpn=vpn)
        self.extra_interfaces = extra_interfaces
        self.own = [self.lab.ns(s) for s in namespaces]
        self.children: list[subprocess.Popen] = []
        self.cleanups: list[Callable[[], None]] = []  # the bench's own, run first, last added first
        self.entered = False
        self._made: list[str] = []

    @property
    def settings(self) -> Settings:
        return self.lab.settings

    @property
    def dir(self) -> Path:
        return self.lab.dir

    def ns(self, suffix: str) -> str:
        return self.lab.ns(suffix)

    def up(self, enter: bool = True) -> None:
        """The namespaces and links; then, with enter, this process moves into the router
        namespace (before any thread exists: the daemons, probes and nft calls live in there)."""
        for name in [*self.lab.namespaces, *self.own]:
            if os.path.exists(f"/run/netns/{name}"):
                raise SystemExit(f"{self.label}: namespace {name} already exists; not touching it")
        self.lab.up()  # removes what it made if it fails
        for name in self.own:
            self._made.append(name)  # ours from here on, even if 'ip netns add' is interrupted
            run("ip", "netns", "add", name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        if self.extra_interfaces:
            batch = "".join(f"link add eth{4 + n} type veth peer name p{4 + n}\nlink set p{4 + n} up\n"
                            for n in range(self.extra_interfaces))  # fmt: skip
            run("ip", "-n", self.lab.router_ns, "-batch", "-", stdin=batch)
        if enter:
            from vr.foundation import netns

            netns.enter(self.lab.router_ns)
            self.entered = True

    def down(self) -> None:
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:  # clean-up goes on
                print(f"{self.label}: clean-up: {error}", file=sys.stderr)
        stop_processes(self.children, self.label)
        if self.entered:
            stop_router(self.settings, self.root, self.label)
        else:
            try:
                Runtime(self.settings).supervisor.shutdown()
            except (OSError, ValueError, RuntimeError, xmlrpc.client.Error) as error:  # clean-up goes on
                print(f"{self.label}: supervisord shutdown: {error}", file=sys.stderr)
        kill_pids(our_charons(self.root), self.label, "leftover charon pid")  # in namespaces of their own
        for name in self._made:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=20, capture_output=True)
        lab_cleanup(self.lab, self.root, self.label)

    def start(self, argv: list[str], namespace: str | None = None, **popen) -> subprocess.Popen:
        """A process of the bench's (in a namespace: `ip netns exec` execs it in place, so the
        PID is its own), stopped by PID on the way out."""
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        process = subprocess.Popen([*prefix, *argv], **popen)
        self.children.append(process)
        return process

    def vr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.lab.vr(*args, check=check)

    def status(self) -> dict:
        return json.loads(self.lab.vr("status", "--json", check=False).stdout)  # exit 1 while unhealthy


def run_bench(router: BenchRouter, work: Callable[[BenchRouter], dict], enter: bool = True) -> dict:
    """up, work, down, under guarded: the figures (an error inside work is work's to record).
    vr's bytecode first, as an installed package has it (`make` does it too): where
    PYTHONDONTWRITEBYTECODE is set, each fresh `vr` process would compile its modules again."""
    import compileall

    import vr

    compileall.compile_dir(Path(vr.__file__).parent, quiet=1)

    def body() -> dict:
        router.up(enter=enter)
        return work(router)

    return guarded(body, router.down)


# ============================================================================ drivers
@dataclass
class Pushed:
    """One push's answer: the wall time the pusher saw, and what the router reported."""

    wall_ms: float
    generation: int | None = None
    changed: list[str] = field(default_factory=list)
    duration_ms: float | None = None  # as the router measured it
    timings_ms: dict[str, float] = field(default_factory=dict)  # with "commit", as with_commit gives
    batched: int = 1


class InProcessDriver:
    """Pipeline.apply in this process (warm: what the daemon holds). The process must be in the
    router namespace (BenchRouter.up(enter=True))."""

    name = "in-process"

    def __init__(self, settings: Settings) -> None:
        from vr.transaction.pipeline import Pipeline

        self.pipeline = Pipeline(settings)

    @property
    def runtime(self) -> Runtime:
        return self.pipeline.runtime

    def push(self, payload: dict, next_generation: bool = False) -> Pushed:
        mark = time.perf_counter()
        if next_generation:
            from vr.transaction.pipeline import Push

            outcome = self.pipeline.apply_batch([Push(payload, next_generation=True)])[0]
            if isinstance(outcome, BaseException):
                raise outcome
            result = outcome
        else:
            result = self.pipeline.apply(payload)
        wall = ms(mark)
        return Pushed(wall, result.generation, list(result.changed), result.duration_ms, with_commit(result),
                      result.batched)  # fmt: skip

    def put(self, document: dict) -> Pushed:
        return self.push(document)

    def close(self) -> None:
        pass


class CliDriver:
    """A fresh `vr apply FILE` process per push (no daemon: the in-process fallback; with one:
    the thin client). The wall time includes the interpreter's start."""

    name = "cli"

    def __init__(self, lab: Lab, env: dict | None = None) -> None:
        self.lab, self.env = lab, env
        self.count = 0

    def push(self, payload: dict, next_generation: bool = False) -> Pushed:
        if next_generation:
            raise ValueError("the CLI driver pushes explicit generations only")
        self.count += 1
        path = self.lab.dir / f"cli-push-{self.count}.json"
        path.write_text(json.dumps(payload))
        mark = time.perf_counter()
        done = self.lab.vr("apply", str(path), check=False, env=self.env)
        wall = ms(mark)
        path.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"vr apply exited {done.returncode}: {done.stderr.strip()[-300:]}")
        # "applied generation G in D ms; changed: a, b"
        words = done.stdout.split()
        generation = int(words[2]) if len(words) > 2 and words[2].isdigit() else None
        reported = float(words[4]) if len(words) > 4 and words[3] == "in" else None
        changed = done.stdout.split("changed:", 1)[-1].strip() if "changed:" in done.stdout else ""
        return Pushed(wall, generation, [c.strip() for c in changed.split(",") if c.strip() not in ("", "nothing")],
                      reported)  # fmt: skip

    def close(self) -> None:
        pass


class AgentDriver:
    """vr.client.RouterClient over HTTPS with a bearer token, to the agent on the control address,
    as a manager pushes. Partial payloads go as PATCH, whole documents as PUT."""

    name = "agent"

    def __init__(self, url: str, token: str, ca: str | None = None) -> None:
        from vr.client import RouterClient

        self.url, self.token, self.ca = url, token, ca
        self.client = RouterClient(url, token, ca=ca)

    def push(self, payload: dict, next_generation: bool = False) -> Pushed:
        mark = time.perf_counter()
        answer = self.client.push(payload, next_generation=next_generation)
        return self._pushed(ms(mark), answer)

    def put(self, document: dict) -> Pushed:
        mark = time.perf_counter()
        answer = self.client.put(document)
        return self._pushed(ms(mark), answer)

    @staticmethod
    def _pushed(wall: float, answer: dict) -> Pushed:
        timings = dict(answer.get("timings_ms") or {})
        if answer.get("duration_ms") is not None and timings:
            timings["commit"] = round(answer["duration_ms"] - sum(timings.values()), 2)
        return Pushed(wall, answer.get("generation"), list(answer.get("changed") or []), answer.get("duration_ms"),
                      timings, answer.get("batched", 1))  # fmt: skip

    def status(self) -> dict:
        return self.client.status()

    def close(self) -> None:
        self.client.close()


def push_series(driver, payloads, after: Callable[[dict, Pushed], None] | None = None,
                next_generation: bool = True) -> dict:  # fmt: skip
    """Each payload pushed in turn (payloads may be a generator: built as it goes), by default
    without a generation (the router gives each the next); the wall times, each push's step
    timings and the services changed. after(payload, pushed) runs untimed after each."""
    times, steps, changed = [], [], set()
    for payload in payloads:
        check_stop()
        pushed = driver.push(payload, next_generation=next_generation)
        times.append(pushed.wall_ms)
        steps.append(pushed.timings_ms)
        changed.update(pushed.changed)
        if after:
            after(payload, pushed)
    return {"ms": times, "steps": steps, "changed": changed}


def series_figures(name: str, data: dict) -> dict:
    """{name}_median, _p90, _max, _count (ms, the name carries the unit), the median of each
    step, the services changed: the same shape as the in-process series of the benches."""
    values = data["ms"]
    if not values:
        return {}
    stem = name.removesuffix("_ms")
    return {f"{name}_median": round(statistics.median(values), 1), f"{name}_p90": round(p90(values), 1),
            f"{name}_max": round(max(values), 1), f"{name}_count": len(values),
            f"{stem}_timings_ms_median": median_steps(data["steps"]), f"{stem}_changed": sorted(data["changed"])}  # fmt: skip


def series_text(f: dict, name: str) -> str:
    return f"median {f[f'{name}_median']:.1f}  p90 {f[f'{name}_p90']:.1f}  max {f[f'{name}_max']:.1f}"


AGENT_PORT = 8443
CONTROL_IP = "169.254.0.10"  # the router's control address (the lab's eth0; configs/examples/router.json)


def agent_section(token: str, port: int = AGENT_PORT) -> dict:
    """The document's agent section: one token (stored hashed), a self-signed pair made at first start."""
    return {"agent": {"port": port, "tokens": [token]}}


def bench_token() -> str:
    return "vrb3-bench-token-" + os.urandom(16).hex()


AGENT_URL = f"https://{CONTROL_IP}:{AGENT_PORT}"


def agent_ca(settings: Settings) -> Path:
    """The agent's self-signed certificate (made at the daemon's first start), which the client trusts."""
    return settings.agent_tls_dir / "certificate.pem"


HEALTHZ_IN_NAMESPACE = r"""
import sys, time
sys.path.insert(0, sys.argv[4])
from harness import wait_healthz_here
from vr.foundation.settings import Settings
print(wait_healthz_here(Settings.under_root(sys.argv[1]), sys.argv[2], float(sys.argv[3]), 0.02))
"""


def wait_healthz(settings: Settings, url: str = AGENT_URL, timeout_s: float = 30.0, pause_s: float = 0.02,
                 namespace: str | None = None) -> float:  # fmt: skip
    """Bounded wait until the agent answers GET /healthz ok (its certificate verified once it
    exists); ms waited. From this process (in the router namespace), or from namespace (the
    manager's, for a bench that stays outside the router). Raises RuntimeError when it never does."""
    if namespace is None:
        return wait_healthz_here(settings, url, timeout_s, pause_s)
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", HEALTHZ_IN_NAMESPACE,
                           str(settings.state_dir.parent), url, str(timeout_s), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=timeout_s + 30, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "healthz wait failed")
    return float(done.stdout.strip())


def wait_healthz_here(settings: Settings, url: str, timeout_s: float, pause_s: float) -> float:
    import requests

    mark = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        check_stop()
        ca = agent_ca(settings)
        if ca.exists():
            try:
                answer = requests.get(f"{url}/healthz", verify=str(ca), timeout=1)
                if answer.status_code == 200:
                    return ms(mark)
                last = f"HTTP {answer.status_code}: {answer.text[:200]}"
            except requests.RequestException as error:
                last = str(error)[:200]
        time.sleep(pause_s)
    raise RuntimeError(f"the agent at {url} did not answer /healthz ok within {timeout_s:.0f} s: {last}")


def agent_driver(settings: Settings, token: str, url: str = AGENT_URL) -> AgentDriver:
    """The agent up (healthz ok), then a driver to it that verifies its certificate."""
    wait_healthz(settings, url)
    return AgentDriver(url, token, str(agent_ca(settings)))


def attach_agent(driver, settings: Settings, generation: int) -> AgentDriver:
    """The agent turned on (a push of the agent section, one token, through driver), then a
    driver to it: for a bench that measured in-process to measure the same through the daemon."""
    token = bench_token()
    driver.push({"generation": generation, **agent_section(token)})
    return agent_driver(settings, token)


# A manager's bounded request loop against the agent (run in the manager's namespace): every
# other request a GET /v1/status, the others one-VM pushes (generation=next) that add and
# remove one VM in turn; no retries, so that every refusal counts. One JSON line at the end.
AGENT_TRAFFIC = r"""
import json, sys, time
from vr.client import ClientError, RouterClient

url, token_file, ca, seconds, rate, vm = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), \
    float(sys.argv[5]), json.loads(sys.argv[6])
client = RouterClient(url, open(token_file).read().strip(), ca=ca, retries=0, timeout=10)
out = {"sent": 0, "failed": 0, "pushes": 0, "errors": [], "max_ms": 0.0}
start = time.monotonic()
end, n = start + seconds, 0
while time.monotonic() < end:
    at = start + n / rate
    time.sleep(max(0.0, at - time.monotonic()))
    mark = time.perf_counter()
    try:
        if n % 2 == 0:
            client.status()
        else:
            change = {"upsert": [vm]} if n % 4 == 1 else {"delete": [vm["mac"]]}
            client.push({"dhcp_entries": change}, next_generation=True)
            out["pushes"] += 1
    except ClientError as error:
        out["failed"] += 1
        if len(out["errors"]) < 5:
            out["errors"].append(f"{time.monotonic() - start:.2f}s: {type(error).__name__}: {error}"[:300])
    out["max_ms"] = max(out["max_ms"], (time.perf_counter() - mark) * 1000)
    out["sent"] += 1
    n += 1
print(json.dumps(out), flush=True)
"""


def start_agent_traffic(router: BenchRouter, token_file: Path, seconds: float, rate: float, vm: dict,
                        namespace: str | None = None) -> subprocess.Popen:  # fmt: skip
    """The agent request loop for seconds at rate requests/s, from the manager's namespace
    (the lab's mgmt, 169.254.0.1, on the control network); read it with agent_traffic_result."""
    argv = [sys.executable, "-c", AGENT_TRAFFIC, AGENT_URL, str(token_file), str(agent_ca(router.settings)),
            str(seconds), str(rate), json.dumps(vm)]  # fmt: skip
    return router.start(argv, namespace or router.ns("mgmt"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)  # fmt: skip


def agent_traffic_result(process: subprocess.Popen, timeout_s: float) -> dict:
    """The request loop's summary: sent, failed, pushes, errors (the first 5), max_ms."""
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process(process)
        raise RuntimeError(f"the agent request loop did not end within {timeout_s:.0f} s") from None
    if process.returncode != 0 or not out.strip():
        raise RuntimeError(f"the agent request loop exited {process.returncode}: {err.strip()[-300:]}")
    return json.loads(out.strip().splitlines()[-1])


def stop_daemon(settings: Settings, timeout_s: float = 15.0) -> None:
    """The daemon stopped through supervisord (program "monitor"), whatever its state (an apply
    may just have started it again), and its socket silent: the CLI then falls back to in-process."""
    from vr.client import LocalClient

    supervisor = Runtime(settings).supervisor
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_stop()
        try:
            supervisor.rpc.stopProcess("monitor", True)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise
        if not LocalClient(settings.daemon_socket).available():
            return
        time.sleep(0.05)
    raise RuntimeError(f"the daemon's socket still answers {timeout_s:.0f} s after the daemon was stopped")


def start_daemon(settings: Settings) -> None:
    """The daemon started again (unless an apply already did)."""
    try:
        Runtime(settings).supervisor.start("monitor")
    except xmlrpc.client.Fault as fault:
        if "ALREADY_STARTED" not in fault.faultString:
            raise


# ============================================================================ processes
def vr_processes(settings: Settings) -> dict[int, str]:
    """vr's own processes of this router: the keeper, supervisord (its PID file), and supervisord's
    children that run vr (the daemon / monitor): pid -> a short name."""
    found: dict[int, str] = {}
    for path, name in ((settings.keeper_pid_path, "keeper"), (settings.run_dir / "supervisord.pid", "supervisord")):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and Path(f"/proc/{text}").exists():
            found[int(text)] = name
    supervisord = next((pid for pid, name in found.items() if name == "supervisord"), None)
    if supervisord is not None:
        try:
            children = Path(f"/proc/{supervisord}/task/{supervisord}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [a.decode(errors="replace") for a in argv if a]
            if "vr" in words:  # python -m vr monitor / daemon
                found[int(child)] = "vr " + " ".join(words[words.index("vr") + 1 :][:1])
            elif any(w.startswith("vr.") for w in words):  # python -m vr.something
                found[int(child)] = next(w for w in words if w.startswith("vr."))
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """Rss and Pss of one process (kB, /proc/PID/smaps_rollup)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key.lower()] = int(rest.split()[0])
    return values


def memory_figures(settings: Settings) -> dict:
    """rss_total_mb, pss_total_mb and the per-process breakdown of vr's own processes."""
    per, rss, pss = [], 0, 0
    for pid, name in sorted(vr_processes(settings).items()):
        try:
            used = memory_kb(pid)
        except OSError:
            continue
        rss, pss = rss + used["rss"], pss + used["pss"]
        per.append({"pid": pid, "name": name, "rss_mb": round(used["rss"] / 1024, 1),
                    "pss_mb": round(used["pss"] / 1024, 1)})  # fmt: skip
    return {"rss_total_mb": round(rss / 1024, 1), "pss_total_mb": round(pss / 1024, 1), "vr_processes": per}


# ============================================================================ DNS
def resolve(name: str, server: str, rdtype: str = "A", timeout: float = 0.5) -> list[str]:
    import dns.message
    import dns.query
    import dns.rdatatype

    wanted = dns.rdatatype.from_text(rdtype)
    response = dns.query.udp(dns.message.make_query(name, wanted), server, timeout=timeout)
    return [str(r) for rrset in response.answer for r in rrset if rrset.rdtype == wanted]


def wait_resolves(name: str, server: str, want: str | None, rdtype: str = "A", tries: int = 50,
                  pause_s: float = 0.01) -> tuple[bool, int]:  # fmt: skip
    """(passed, tries): want=None means the name must no longer resolve. Bounded by tries."""
    import dns.exception

    for attempt in range(1, tries + 1):
        try:
            answers = resolve(name, server, rdtype)
        except (dns.exception.Timeout, OSError):
            answers = None
        if answers is not None and ((want is None and not answers) or (want is not None and want in answers)):
            return True, attempt
        time.sleep(pause_s)
    return False, tries


# ============================================================================ payloads: VMs
DOMAIN = "cloud.internal"
VM_BASE_NET = IPv4Address("10.64.0.0")  # VM tiers are carved from 10.64.0.0/10
VM_BASE_NET6 = IPv6Address("2001:db8:64::")  # and their /64s from 2001:db8:64::/48 (documentation range)
HEADROOM = 64  # addresses per tier kept free beyond the initial VMs, for incremental adds


def vm_tiers(vms: int, tiers: int, first_eth: int = 2, id_prefix: str = "tier") -> list[dict]:
    """One subnet per tier (on eth<first_eth>, ...), each big enough for its share of the VMs plus
    headroom, and a /64. A VM's IPv6 address has the same offset in the /64 as its IPv4 one."""
    per_tier = math.ceil(vms / tiers)
    bits = max(8, math.ceil(math.log2(per_tier + HEADROOM + 4)))
    size = 2**bits
    if tiers * size > 2**22:
        raise SystemExit("too many VMs for 10.64.0.0/10")
    layout = []
    for n in range(tiers):
        network = IPv4Network((int(VM_BASE_NET) + n * size, 32 - bits))
        network6 = IPv6Network((int(VM_BASE_NET6) + ((n + 1) << 64), 64))
        layout.append({"id": f"{id_prefix}{n + 1}", "name": f"eth{first_eth + n}", "network": network,
                       "gateway": network.network_address + 1, "network6": network6,
                       "gateway6": network6.network_address + 1,  # the router's own address in the /64
                       # VMs from .10: the first per_tier the initial ones, the next HEADROOM for adds
                       "first": network.network_address + 10, "count": per_tier})  # fmt: skip
    return layout


def mac_for(prefix: int, n: int) -> str:
    return f"02:{prefix:02x}:" + ":".join(f"{(n >> shift) & 0xFF:02x}" for shift in (24, 16, 8, 0))


def vm_entry(tier: dict, index: int, mac: str, hostname: str, ipv6: bool) -> dict:
    """The dhcp entry of the VM at index (from .10) in its tier; with ipv6, at the same offset in the /64."""
    offset = int(tier["first"]) - int(tier["network"].network_address) + index
    entry = {"tier": tier["id"], "mac": mac, "ip": str(tier["first"] + index), "hostname": hostname}
    if ipv6:
        entry["ipv6"] = str(tier["network6"].network_address + offset)
    return entry


def vm_entries(layout: list[dict], vms: int, ipv6: bool = True, mac_prefix: int = 0) -> list[dict]:
    width = max(4, len(str(vms)))
    tiers = len(layout)
    return [vm_entry(layout[n % tiers], n // tiers, mac_for(mac_prefix, n + 1), f"vm-{n + 1:0{width}d}", ipv6)
            for n in range(vms)]  # fmt: skip


def vm_interfaces(layout: list[dict], ipv6: bool) -> list[dict]:
    return [{"id": t["id"], "role": "guest", "name": t["name"],
             "addresses": [f"{t['gateway']}/{t['network'].prefixlen}"] + ([f"{t['gateway6']}/64"] if ipv6 else [])}
            for t in layout]  # fmt: skip


def vm_sections(layout: list[dict], ipv6: bool) -> tuple[list[dict], list[dict]]:
    """(dhcp tiers, ipv6 tiers) of the VM tiers: DHCPv4 everywhere, DHCPv6 where ipv6."""
    dhcp = [{"tier": t["id"], "lease_time": 3600} for t in layout]
    v6 = [{"tier": t["id"], "mode": "dhcpv6", "lease_time": 3600} for t in layout] if ipv6 else []
    return dhcp, v6


def extra_vm(layout: list[dict], k: int, ipv6: bool, mac_prefix: int = 1) -> tuple[dict, dict]:
    """The k-th VM added incrementally (its own MAC prefix, addresses above the initial VMs), and its tier."""
    tier = layout[k % len(layout)]
    index = tier["count"] + k // len(layout)
    return vm_entry(tier, index, mac_for(mac_prefix, k + 1), f"vm-add-{k + 1:04d}", ipv6), tier


BASE_INTERFACES = [
    {"id": "control", "role": "control", "name": "eth0", "addresses": ["169.254.0.10/16"]},
    {"id": "public", "role": "public", "name": "eth1", "addresses": ["192.0.2.10/24"]},
]


# ============================================================================ payloads: rules
PUBLIC_PEER = "192.0.2.1"  # the lab's public host: the router's default gateway
PUBLIC_IPS = [str(IPv4Address("192.0.2.10") + n) for n in range(16)]  # all assigned, all on eth1
SOURCE_NAT_IP = PUBLIC_IPS[0]
RULE_TIER, RULE_TIER_IF, RULE_TIER_GATEWAY = "tier1", "eth2", "10.1.1.1/24"  # the rules' guest tier (g1)
GUEST_IP, GUEST_MAC = "10.1.1.10", "02:00:00:00:01:10"  # g1 (the lab's MAC)
PF_PORT_BASE = 10000  # port forwards: 10000.. per (public IP, protocol)
FW_PORT_BASE = 30000  # ingress rules that do not open a port forward: 30000.. per (public IP, protocol)
INC_PORT_BASE = 60000  # the incremental adds
ACL_SHARE = 10  # one rule in ten is an ACL entry
ACL_LIST_MAX = 2000  # entries per ACL list (document limit)


def nat_section(port_forwarding: list[dict], extra_ips: tuple[str, ...] = ()) -> dict:
    # The same public IPs and source NAT in every rule set: only the nftables service changes.
    return {"public_ips": [{"ip": ip} for ip in [*PUBLIC_IPS, *extra_ips]],
            "source_nat": [{"tier": RULE_TIER, "ip": SOURCE_NAT_IP}], "static_nat": [],
            "port_forwarding": port_forwarding}  # fmt: skip


def firewall_section(ingress: list[dict]) -> dict:
    return {"ingress": ingress, "egress": [{"tier": RULE_TIER, "default": "allow"}]}


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
    return [{"tier": RULE_TIER, **lists, "ingress_default": "deny", "egress_default": "allow"}]


def acl_count(sections: dict) -> int:
    return sum(len(acl["ingress"]) + len(acl["egress"]) for acl in sections["network_acls"])


def baseline_rules(extra_ips: tuple[str, ...] = ()) -> dict:
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
    return {"nat": nat_section(forwards, extra_ips), "firewall": firewall_section(ingress),
            "network_acls": acl_section(2)}  # fmt: skip


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


def rule_sections(rules: int, extra_ips: tuple[str, ...] = (), acl: int | None = None) -> dict:
    """rules // 10 ACL entries (or acl of them, on top of the rules); of the rest, half port
    forwards and half ingress rules. Every (public IP, protocol, port) is claimed once, so no two
    elements of a set overlap."""
    if acl is not None:
        rules += acl
    n_acl = min(max(2, rules // ACL_SHARE if acl is None else acl), 2 * ACL_LIST_MAX)
    n_pf = (rules - n_acl) // 2
    n_in = rules - n_acl - n_pf
    nips = len(PUBLIC_IPS)
    forwards = [{"id": f"pf-{k}", "public_ip": PUBLIC_IPS[k % nips], "protocol": ("tcp", "udp")[(k // nips) % 2],
                 "public_ports": PF_PORT_BASE + k // (2 * nips), "private_ip": f"10.1.1.{20 + k % 200}",
                 "private_ports": 1024 + k % 4000} for k in range(n_pf)]  # fmt: skip
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
        ingress.append({"id": f"in-{k}", "public_ip": ip, "protocol": protocol, "ports": ports,
                        "source_cidrs": sources_for(k)})  # fmt: skip
    return {"nat": nat_section(forwards, extra_ips), "firewall": firewall_section(ingress),
            "network_acls": acl_section(n_acl)}  # fmt: skip


def incremental_rules(j: int) -> tuple[dict, dict]:
    """The j-th single port forward added incrementally, and the ingress rule that opens it."""
    ip, port = PUBLIC_IPS[0], INC_PORT_BASE + j
    forward = {"id": f"inc-{j}", "public_ip": ip, "protocol": "tcp", "public_ports": port,
               "private_ip": GUEST_IP, "private_ports": 8000 + j}  # fmt: skip
    rule = {"id": f"inc-{j}", "public_ip": ip, "protocol": "tcp", "ports": port, "source_cidrs": ["0.0.0.0/0"]}
    return forward, rule


def rule_tier_interface() -> dict:
    return {"id": RULE_TIER, "role": "guest", "name": RULE_TIER_IF, "addresses": [RULE_TIER_GATEWAY]}


def rule_tier_dhcp() -> tuple[dict, list[dict]]:
    """tier1's dhcp tier (a small range) and its two VMs (web1 is g1)."""
    tier = {"tier": RULE_TIER, "range": {"start": "10.1.1.100", "end": "10.1.1.150"}, "lease_time": 3600}
    entries = [{"tier": RULE_TIER, "mac": GUEST_MAC, "ip": GUEST_IP, "hostname": "web1"},
               {"tier": RULE_TIER, "mac": "02:00:00:00:01:11", "ip": "10.1.1.11", "hostname": "web2"}]  # fmt: skip
    return tier, entries


# ============================================================================ payloads: load balancer
LB_IP, LB_PORT, MEMBER_PORT = "192.0.2.12", 80, 8000


def lb_rule(rule_id: str, public_ip: str, public_port: int, members: list[dict], interval_ms: int = 200,
            protocol: str | None = None, **health) -> dict:  # fmt: skip
    """One load-balancer rule over the members' MEMBER_PORT with an HTTP health check."""
    rule = {"id": rule_id, "public_ip": public_ip, "public_port": public_port, "private_port": MEMBER_PORT,
            "members": members, "health_check": {"type": "http", "interval_ms": interval_ms, **health}}  # fmt: skip
    if protocol:
        rule["protocol"] = protocol
    return rule


def lb_payload(generation: int, member_ips: list[str]) -> dict:
    """The example router's NAT plus the load balancer's IP, and one HTTP rule LB_IP:80 over
    the members' port 8000 with a fast health check: the benches' load-balancer payload."""
    nat = json.loads(EXAMPLE_ROUTER.read_text())["nat"]
    nat["public_ips"].append({"ip": LB_IP})
    rule = lb_rule("web", LB_IP, LB_PORT, [{"ip": ip} for ip in member_ips], rise=1, fall=2)
    return {"generation": generation, "nat": nat, "load_balancer": {"rules": [rule]}}


def lb_rules(count: int, public_ip: str, members_each: int = 2, port_base: int = 20000,
             interval_ms: int = 2000) -> list[dict]:  # fmt: skip
    """count rules on public_ip (ports port_base..), each over members_each members in tier1
    (10.1.1.20..): the large router's load balancer. Nothing answers on the members: their
    health checks fail, which only marks them DOWN."""
    return [lb_rule(f"lb-{k}", public_ip, port_base + k,
                    [{"ip": f"10.1.1.{20 + (k * members_each + m) % 200}"} for m in range(members_each)],
                    interval_ms)
            for k in range(count)]  # fmt: skip


# ============================================================================ payloads: VPN and its peer
VPN_LOCAL_IP = "192.0.2.10"  # the router's public IP
VPN_LOCAL_SUBNET = "10.1.1.0/24"  # the router's tier1
PEER_GATEWAY = "198.51.100.1"  # the "internet" namespace, towards <p>-rb
SITES_IF = "sites"  # a veth pair (no dummy driver here) in <p>-rb: 10.200.i.1/24 of every site
PEER_HALF_OPEN = 1000  # the peer charon's half-open IKE_SA limits (see peer_conf)
PEER_BASE = 10  # peer i answers on 198.51.100.(PEER_BASE + i)
IKE_PROPOSALS, ESP_PROPOSALS = ["aes256-sha256-modp2048"], ["aes256-sha256"]  # vr's defaults, mirrored


def peer_ip(i: int) -> str:
    return f"198.51.100.{PEER_BASE + i}"


def peer_subnet(i: int, prefix: int = 24) -> str:
    return f"10.200.{i}.0/{prefix}"


def psk(i: int) -> str:
    return f"bench-only-psk-{i:03d}-vpn-scale"


def tunnel(i: int) -> dict:
    """Router-side tunnel i (active: the router initiates) to peer i."""
    return {"id": f"peer-{i}", "local_ip": VPN_LOCAL_IP, "peer_ip": peer_ip(i), "local_subnets": [VPN_LOCAL_SUBNET],
            "peer_subnets": [peer_subnet(i)], "psk": psk(i)}  # fmt: skip


def router_connection(i: int) -> str:
    return f"s2s-peer-{i}"


def peer_conn(i: int) -> dict:
    """The peer's responder side of tunnel i: it accepts the router's proposals and subnets
    (and the narrower /25 of a peer_subnet change: a responder narrows to what is proposed)."""
    name = f"peer-{i}"
    child = {"local_ts": [peer_subnet(i)], "remote_ts": [VPN_LOCAL_SUBNET], "esp_proposals": ESP_PROPOSALS,
             "start_action": "none", "dpd_action": "clear"}  # fmt: skip
    return {name: {"version": "2", "local_addrs": [peer_ip(i)], "remote_addrs": [VPN_LOCAL_IP],
                   "proposals": IKE_PROPOSALS, "mobike": "no",
                   "local": {"auth": "psk", "id": peer_ip(i)}, "remote": {"auth": "psk", "id": VPN_LOCAL_IP},
                   "children": {name: child}}}  # fmt: skip


def peer_conf(lab: Lab, socket_path: Path) -> bytes:
    """strongswan.conf of the peer charon: the lab client's, without virtual IPs or policy routes
    (N children share one remote subnet, and nothing is sent through the tunnels), and without
    charon's half-open limits per peer IP. Those model N peers as one: left at their defaults
    (block_threshold 5, cookie_threshold_ip 3), the one charon would drop or cookie all but the
    first few of the router's N simultaneous IKE_SA_INITs, and the rest would come up only at
    their retransmits, tens of seconds later; N separate peers never see that."""
    from vr.services.strongswan import client_conf

    conf = client_conf(Runtime(lab.settings), socket_path)
    conf = conf.replace(b"install_routes = yes", b"install_routes = no")
    conf = conf.replace(b"install_virtual_ip = yes", b"install_virtual_ip = no")
    limits = "".join(f"  {key} = {PEER_HALF_OPEN}\n" for key in ("block_threshold", "cookie_threshold",
                                                                   "cookie_threshold_ip"))  # fmt: skip
    if b"charon {\n" not in conf:
        raise RuntimeError("the peer's strongswan.conf has no 'charon {' section to extend")
    return conf.replace(b"charon {\n", b"charon {\n" + limits.encode(), 1)


def start_peer(router: BenchRouter, tunnels: int) -> Path:
    """The peer's addresses and default route in <p>-rb, then its charon (stopped by PID with the
    router's children); its VICI socket. Each site's subnet gets an address (10.200.i.1) on a veth
    pair of its own: kernel-libipsec routes every CHILD_SA into its TUN device from a local address
    inside the local traffic selector, and refuses the CHILD_SA (TS_UNACCEPTABLE) without one."""
    from vr.services.strongswan import CHARON

    namespace = router.ns("rb")
    batch = "".join(f"addr add {peer_ip(i)}/24 dev eth1\n" for i in range(tunnels))
    batch += f"route add default via {PEER_GATEWAY}\nlink add {SITES_IF} type veth peer name {SITES_IF}-end\n"
    batch += f"link set {SITES_IF} up\nlink set {SITES_IF}-end up\n"
    batch += "".join(f"addr add {peer_subnet(i).replace('.0/', '.1/')} dev {SITES_IF}\n" for i in range(tunnels))
    done = subprocess.run(["ip", "-n", namespace, "-batch", "-"], input=batch, check=False, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"ip -n {namespace} -batch: {done.stderr.strip()[-300:]}")
    directory = router.dir / "peer"
    directory.mkdir(exist_ok=True)
    socket_path, conf = directory / "charon.vici", directory / "strongswan.conf"
    conf.write_bytes(peer_conf(router.lab, socket_path))
    with open(directory / "charon.log", "ab") as log:
        router.start([CHARON], namespace, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                     env={**os.environ, "STRONGSWAN_CONF": str(conf)})  # fmt: skip
    return socket_path


def load_peer(socket_path: Path, tunnels: int) -> tuple[float, str]:
    """Every responder connection and its key, over VICI (waits up to 5 s for the socket);
    ms taken, and the daemon's version."""
    from vr.services.strongswan import vici_session

    try:
        with vici_session(socket_path, wait_s=5) as session:
            version = session.version()
            mark = time.perf_counter()
            for i in range(tunnels):
                session.load_shared({"id": f"psk-peer-{i}", "type": "IKE", "data": psk(i),
                                     "owners": [peer_ip(i), VPN_LOCAL_IP]})  # fmt: skip
                session.load_conn(peer_conn(i))
            took = ms(mark)
            loaded = len(session.get_conns()["conns"])
    except OSError as error:
        log = (socket_path.parent / "charon.log").read_text(errors="replace").strip()
        raise RuntimeError(f"the peer charon does not answer ({error}): {log[-300:]}") from None
    if loaded != tunnels:
        raise RuntimeError(f"the peer charon loaded {loaded} connections of {tunnels}")
    return took, f"{version['daemon'].decode()} {version['version'].decode()}"


class Sa(NamedTuple):
    """One IKE_SA as a charon lists it."""

    ike: str  # IKE_SA uniqueid
    children: tuple[str, ...]  # CHILD_SA uniqueids
    up: bool  # ESTABLISHED with an INSTALLED child
    remote_ts: tuple[str, ...]  # of the installed children


def snapshot(socket_path: Path, ike: str | None = None) -> dict[str, list[Sa]]:
    """Connection -> its IKE_SAs, as that charon lists them (the listing consumed in full)."""
    from vr.services.strongswan import vici_session

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


def our_charons(root: str) -> list[int]:
    """charon processes reading a strongswan.conf under our temp root: the router's, its checker
    (in a namespace of its own), the peer's. Only ever ours."""
    from vr.services.strongswan import CHARON

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
