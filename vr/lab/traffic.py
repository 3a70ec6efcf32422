"""Client traffic through a lab router (vr.lab.harness.Lab) while something happens, and the figures after.

    with Traffic(lab, seconds=4.0, lb_ip="192.0.2.12", forward=("192.0.2.10", 8080),
                 dns_name="web1.cloud.internal", dns_answer="10.1.1.10") as traffic:
        time.sleep(1)
        lab.vr("patch", "apply", bundle)  # the thing under test
    figures = traffic.result()

One process per stream, each in its namespace (`ip netns exec`), bounded in count and in time
(`seconds`), all started together (the Python clients say "ready" and are released at once by a
line on stdin; ping starts right after), and all stopped by PID when the block ends, whatever
happens. On a normal exit the block waits (bounded) for the streams to finish their window; an
exception in the block stops them at once and result() then raises.

The streams and their figures (result() keys; a stream turned off gives None):

  ping   guest ping_guest (g1) -> ping_target (the public host 192.0.2.1), ping_rate (1,000)
         packets/s for `seconds` (`ping -i 0.001 -c N -W 1 -q`, source-NATed by the router; no
         -w: with a deadline ping quits at the first ICMP error, e.g. "net unreachable"):
           ping_sent       echo requests sent
           ping_received   echo replies received (each waited for up to 1 s)
           ping_lost       ping_sent - ping_received
  http   the public host (<p>-pub) -> lb_ip:lb_port (haproxy), http_rate (100) GETs/s over
         `seconds`, each on a fresh connection (labserver fetch, 1 s timeout per request):
           http_sent       requests meant (rate x seconds); one not made in time counts failed
           http_failed     requests without a 200 answer (refused, reset, timed out, other status)
           http_errors     the first few failures, as fetch words them
           http_answers    {backend name: answers}
           headers         {value: responses} of response header `header` (X-Vr-Release);
                           responses without it are not counted
  tcp    the public host -> forward (public ip, port): a TCP port forward of the router's
         document (else ValueError; in configs/examples/router.json: 192.0.2.10:8080 -> g1
         10.1.1.10:80). One connection, held for `seconds`; every 50 ms a line sent and its answer
         expected within 1 s (labserver hold), from a labserver serve behind the forward: the
         caller's, or with forward_server="g1" one started here in that guest, on the rule's
         private port, for the window:
           tcp_exchanges   lines answered
           tcp_held        the connection never failed (connected, greeted, every line answered)
           tcp_error       what broke it, if it broke
           tcp_greeting    the server's greeting ("<name> sees <client address>")
  dns    guest dns_guest (g2) -> dns_server (default: the DNS server of the guest's lease,
         10.1.2.1 for g2), an A query for dns_name every 10 ms, 50 ms to answer (labserver dnsgap):
           dns_queries     queries sent
           dns_failed      queries without a correct answer (holding dns_answer) in 50 ms
           dns_max_gap_ms  the longest time without a correct answer: between two consecutive
                           ones, and from the window's start to the first and from the last to its end
           dns_errors      the first few failures (a timeout says how long the client really waited)
           dns_late_answers  queries that timed out but were answered within 1 s (dns_late: after how
                           long), to tell a slow answer from a lost one
  guest_data  guest_data=(guest, its router address): that guest asks its meta data (GET
         /latest/meta-data/instance-id, port 80) and the password service (DomU_Request:
         saved_password, port 8080), guest_data_rate (50) requests/s each, a fresh connection each:
           guest_data_sent, guest_data_failed, guest_data_errors, guest_data_answers (body: count)
           password_sent, password_failed, password_errors, password_answers
  dhcp   guest dhcp_guest (g2): a real dhclient (-4 -1, the lab's config and script, a copy of
         the guest's lease file) every dhcp_interval (0.5 s): it asks for the lease it holds
         (DHCPREQUEST) and runs the script; killed once bound (labserver renew, 2 s to answer):
           dhcp_renewals      renewals answered (dhclient said "bound to <address>")
           dhcp_failed        renewals not answered within 2 s
           dhcp_address_kept  every renewal bound the guest's leased address and the guest's
                              interface still has it at the end
           dhcp_errors        the first few failures

Also: seconds (the window asked for), started (time.monotonic() when the streams were released;
the clock is the same in every process of the machine) and window_s (from then until the last
stream ended).
"""

from __future__ import annotations

import json
import re
import select
import shutil
import subprocess
import sys
import time
from typing import Self

from vr.lab.harness import DHCLIENT_CONF, Lab, dhclient_script, stop_process

READY_TIMEOUT_S = 20.0  # each client's start (Python, imports) in its namespace
GRACE_S = 10.0  # the streams' own bounds end them within seconds + a few; then they are stopped
HTTP_TIMEOUT_S = 1.0
# What a guest waits for an answer: cloud-init's CloudStack data source gives each request 5 s
# (and retries), the password client 20 s. A daemon replaced by a patch answers what queued meanwhile.
GUEST_DATA_TIMEOUT_S = 5.0
TCP_INTERVAL_S, TCP_TIMEOUT_S = 0.05, 1.0
DNS_INTERVAL_S, DNS_TIMEOUT_S = 0.01, 0.05
DHCP_TIMEOUT_S = 2.0


class Traffic:
    def __init__(
        self,
        lab: Lab,
        seconds: float = 4.0,
        *,
        lb_ip: str | None = None,
        lb_port: int = 80,
        http_rate: float = 100.0,
        header: str = "X-Vr-Release",
        forward: tuple[str, int] | None = None,
        forward_server: str | None = None,
        dns_name: str | None = None,
        dns_answer: str | None = None,
        dns_guest: str = "g2",
        dns_server: str | None = None,
        dns_timeout: float = DNS_TIMEOUT_S,
        ping: bool = True,
        ping_guest: str = "g1",
        ping_target: str = "192.0.2.1",
        ping_rate: float = 1000.0,
        dhcp: bool = True,
        dhcp_guest: str = "g2",
        dhcp_interval: float = 0.5,
        guest_data: tuple[str, str] | None = None,
        guest_data_rate: float = 50.0,
    ):
        """lb_ip: the HTTP stream (off if None); forward: the TCP stream (off if None), with
        forward_server=guest to start the labserver serve behind it for the window (else the
        caller runs one); dns_name and dns_answer: the DNS stream (off if None); dns_timeout: how
        long an answer may take to count (a test on a shared machine gives more than the bench's
        50 ms: it asserts answers, the bench measures gaps); ping, dhcp: those streams on or off."""
        if not 0.5 <= seconds <= 300:
            raise ValueError("seconds: 0.5 to 300")
        if dns_name is not None and not dns_answer:
            raise ValueError("dns_name needs dns_answer (the address a correct answer holds)")
        self.lab, self.seconds = lab, float(seconds)
        self.lb_ip, self.lb_port, self.http_rate, self.header = lb_ip, lb_port, http_rate, header
        self.forward, self.forward_server = forward, forward_server
        self.dns_name, self.dns_answer, self.dns_guest, self.dns_server = dns_name, dns_answer, dns_guest, dns_server
        self.dns_timeout = dns_timeout
        self.ping, self.ping_guest, self.ping_target, self.ping_rate = ping, ping_guest, ping_target, ping_rate
        self.dhcp, self.dhcp_guest, self.dhcp_interval = dhcp, dhcp_guest, dhcp_interval
        self.guest_data, self.guest_data_rate = guest_data, guest_data_rate
        self.processes: dict[str, subprocess.Popen] = {}  # stream -> its process (stopped by PID)
        self.server: subprocess.Popen | None = None  # the serve behind the forward, if started here
        self.started: float | None = None
        self._result: dict | None = None
        self._problems: list[str] = []

    # ------------------------------------------------------------------ the block
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._collect()
            else:
                self._problems.append(f"the block raised {exc_type.__name__}: streams stopped early")
        finally:
            self.stop()
        return False

    def start(self) -> None:
        """Start every stream; return when they all run (released together)."""
        try:
            if self.forward is not None:
                private_ip, private_port = self._forward_target()
                if self.forward_server is not None:
                    self._start_server(private_ip, private_port)
            clients = self._clients()
            for name, cmd in clients.items():
                self.processes[name] = self._popen(cmd, stdin=subprocess.PIPE)
            for name in clients:
                self._expect_ready(name, self.processes[name])
            for name in clients:  # all at once
                process = self.processes[name]
                process.stdin.write("go\n")
                process.stdin.close()
                process.stdin = None  # communicate() would flush it
            self.started = time.monotonic()
            if self.ping:
                count = max(1, round(self.seconds * self.ping_rate))
                ping = self._in(self.ping_guest, "ping", "-q", "-n", "-i", f"{1 / self.ping_rate:.6f}", "-c", str(count),
                                "-W", "1", self.ping_target)  # fmt: skip
                self.processes["ping"] = self._popen(ping)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Every process started here that still runs: TERM, then KILL, by its PID."""
        for process in [*self.processes.values(), *([self.server] if self.server else [])]:
            stop_process(process)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
        self.server = None

    def result(self) -> dict:
        """The figures (module docstring); RuntimeError if a stream could not be measured."""
        if self._problems or self._result is None:
            raise RuntimeError("traffic not measured: " + ("; ".join(self._problems) or "the block has not ended"))
        return self._result

    # ------------------------------------------------------------------ the streams
    def _in(self, guest_or_ns: str, *cmd: str) -> list[str]:
        namespace = guest_or_ns if guest_or_ns.startswith(self.lab.prefix + "-") else self.lab.ns(guest_or_ns)
        return ["ip", "netns", "exec", namespace, *cmd]

    def _labserver(self, where: str, *args: str) -> list[str]:
        return self._in(where, sys.executable, "-m", "vr.lab.server", *args)

    def _clients(self) -> dict[str, list[str]]:
        seconds = f"{self.seconds:g}"
        clients = {}
        if self.lb_ip is not None:
            count = max(1, round(self.seconds * self.http_rate))
            clients["http"] = self._labserver(
                "pub", "fetch", self.lb_ip, str(self.lb_port), "--count", str(count), "--seconds", seconds,
                "--timeout", f"{HTTP_TIMEOUT_S:g}", "--header", self.header, "--deadline", f"{self.seconds + 2:g}",
                "--wait-go",
            )  # fmt: skip
        if self.forward is not None:
            host, port = self.forward
            clients["tcp"] = self._labserver(
                "pub", "hold", host, str(port), "--seconds", seconds, "--interval", f"{TCP_INTERVAL_S:g}",
                "--timeout", f"{TCP_TIMEOUT_S:g}", "--wait-go",
            )  # fmt: skip
        if self.dns_name is not None:
            server = self.dns_server or (self.lab.guest_lease(self.dns_guest)["dns"] or "").split(",")[0].strip()
            if not server:
                raise RuntimeError(f"guest {self.dns_guest}'s lease names no DNS server: give dns_server")
            clients["dns"] = self._labserver(
                self.dns_guest, "dnsgap", self.dns_name, server, "--expect", self.dns_answer, "--seconds", seconds,
                "--interval", f"{DNS_INTERVAL_S:g}", "--timeout", f"{self.dns_timeout:g}", "--wait-go",
            )  # fmt: skip
        if self.guest_data is not None:
            guest, router = self.guest_data
            count = str(max(1, round(self.seconds * self.guest_data_rate)))
            common = ("--count", count, "--seconds", seconds, "--timeout", f"{GUEST_DATA_TIMEOUT_S:g}",
                      "--deadline", f"{self.seconds + GUEST_DATA_TIMEOUT_S + 1:g}", "--wait-go")  # fmt: skip
            clients["guest_data"] = self._labserver(guest, "fetch", router, "80", "--path",
                                                    "/latest/meta-data/instance-id", *common)  # fmt: skip
            clients["password"] = self._labserver(guest, "fetch", router, "8080", "--request-header",
                                                  "DomU_Request: saved_password", *common)  # fmt: skip
        if self.dhcp:
            lab_leases = self.lab.dir / f"{self.dhcp_guest}.leases"
            address = self.lab.guest_lease(self.dhcp_guest)["address"]
            if not address:
                raise RuntimeError(f"guest {self.dhcp_guest} holds no lease ({lab_leases}): lab.dhcp() it first")
            leases = self.lab.dir / f"{self.dhcp_guest}.traffic.leases"  # a copy: the lab's own file stays as it is
            shutil.copyfile(lab_leases, leases)
            conf = self.lab.dir / "dhclient.conf"
            if not conf.exists():
                conf.write_text(DHCLIENT_CONF)
            clients["dhcp"] = self._labserver(
                self.dhcp_guest, "renew", "eth0", "--conf", str(conf), "--leases", str(leases),
                "--script", str(dhclient_script()), "--expect", address, "--seconds", seconds,
                "--interval", f"{self.dhcp_interval:g}", "--timeout", f"{DHCP_TIMEOUT_S:g}", "--wait-go",
            )  # fmt: skip
        return clients

    def _forward_target(self) -> tuple[str, int]:
        """The private address and port the router's document forwards `forward` to (TCP)."""
        host, port = self.forward
        document = json.loads(self.lab.settings.document_path.read_text())
        rules = [r for r in (document.get("nat") or {}).get("port_forwarding") or [] if r["protocol"] == "tcp"]
        for rule in rules:
            low, high = _ports(rule["public_ports"])
            if rule["public_ip"] == host and low <= port <= high:
                return rule["private_ip"], _ports(rule["private_ports"])[0] + port - low
        known = ", ".join(
            f"{r['public_ip']}:{_text(r['public_ports'])} -> {r['private_ip']}:{_text(r['private_ports'])}"
            for r in rules
        )
        raise ValueError(f"forward {host}:{port}: no TCP port forward in the router's document ({known or 'none'})")

    def _start_server(self, private_ip: str, port: int) -> None:
        guest = self.forward_server
        if self.lab.guest_lease(guest)["address"] != private_ip:
            raise ValueError(f"forward_server {guest}: the forward goes to {private_ip}, which {guest} does not hold")
        lifetime = self.seconds + READY_TIMEOUT_S + GRACE_S + 30
        self.server = self._popen(self._labserver(guest, "serve", "--name", guest, "--port", str(port),
                                                  "--seconds", f"{lifetime:g}"))  # fmt: skip
        self._expect_ready(f"serve in {guest}:{port}", self.server)

    @staticmethod
    def _popen(cmd: list[str], stdin=subprocess.DEVNULL) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def _expect_ready(name: str, process: subprocess.Popen) -> None:
        readable, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
        line = process.stdout.readline().strip() if readable else None
        if line != "ready":
            error = ""
            if process.poll() is not None:
                error = process.stderr.read().strip()[-300:]
            raise RuntimeError(f"{name} did not start within {READY_TIMEOUT_S:.0f} s: {line!r} {error}".rstrip())

    # ------------------------------------------------------------------ the figures
    def _collect(self) -> None:
        """Wait (bounded) for every stream to end its window; parse what each printed."""
        deadline = (self.started or time.monotonic()) + self.seconds + GRACE_S
        outputs: dict[str, str] = {}
        for name, process in self.processes.items():
            try:
                out, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._problems.append(f"{name} still ran {GRACE_S:.0f} s after its window (stopped)")
                continue
            if name == "ping":
                if process.returncode not in (0, 1):  # 1: some replies missing
                    self._problems.append(f"ping exited {process.returncode}: {err.strip()[-300:]}")
                outputs[name] = out
            elif process.returncode != 0 or not out.strip():
                self._problems.append(f"{name} exited {process.returncode}: {err.strip()[-300:]}")
            else:
                outputs[name] = out.strip().splitlines()[-1]
        window_s = time.monotonic() - self.started if self.started else None
        if self._problems:
            return
        result: dict = {"seconds": self.seconds, "started": self.started, "window_s": round(window_s, 3)}
        result |= dict.fromkeys(("ping_sent", "ping_received", "ping_lost"))
        if "ping" in outputs:
            found = re.search(r"(\d+) packets transmitted, (\d+) received", outputs["ping"])
            if not found:
                self._problems.append(f"ping said no totals: {outputs['ping'].strip()[-300:]!r}")
                return
            sent, received = int(found.group(1)), int(found.group(2))
            result |= {"ping_sent": sent, "ping_received": received, "ping_lost": sent - received}
        http = json.loads(outputs["http"]) if "http" in outputs else {}
        result |= {
            "http_sent": http.get("sent"),
            "http_failed": http.get("failed"),
            "http_errors": http.get("errors", [])[:5] if http else None,
            "http_answers": http.get("answers"),
            "headers": http.get("headers"),
        }
        tcp = json.loads(outputs["tcp"]) if "tcp" in outputs else {}
        result |= {
            "tcp_exchanges": tcp.get("exchanges"),
            "tcp_held": (not tcp["failed"]) if tcp else None,
            "tcp_error": tcp.get("error"),
            "tcp_greeting": tcp.get("greeting"),
        }
        dns = json.loads(outputs["dns"]) if "dns" in outputs else {}
        result |= {
            "dns_queries": dns.get("queries"),
            "dns_failed": dns.get("failed"),
            "dns_max_gap_ms": dns.get("max_gap_ms"),
            "dns_errors": dns.get("errors"),
            "dns_late_answers": dns.get("late_answers"),
            "dns_late": dns.get("late"),
        }
        for stream in ("guest_data", "password"):
            fetched = json.loads(outputs[stream]) if stream in outputs else {}
            result |= {f"{stream}_sent": fetched.get("sent"), f"{stream}_failed": fetched.get("failed"),
                       f"{stream}_errors": fetched.get("errors", [])[:5] if fetched else None,
                       f"{stream}_answers": fetched.get("answers"), f"{stream}_max_ms": fetched.get("max_ms")}  # fmt: skip
        dhcp = json.loads(outputs["dhcp"]) if "dhcp" in outputs else {}
        result |= {
            "dhcp_renewals": dhcp.get("renewals"),
            "dhcp_failed": dhcp.get("failed"),
            "dhcp_address_kept": dhcp.get("address_kept"),
            "dhcp_errors": dhcp.get("errors"),
        }
        self._result = result


def _ports(value: object) -> tuple[int, int]:
    """A document's ports (8080, "8000-8010" or {"start", "end"}) as (first, last)."""
    if isinstance(value, dict):
        return int(value["start"]), int(value["end"])
    low, _, high = str(value).partition("-")
    return int(low), int(high or low)


def _text(value: object) -> str:
    low, high = _ports(value)
    return str(low) if low == high else f"{low}-{high}"
