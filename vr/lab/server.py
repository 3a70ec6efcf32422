"""Lab traffic endpoints: `serve` answers each TCP connection or UDP datagram with
"<name> sees <peer address>", so a test can tell who answered and what source address
NAT left; `ask` is the client. Lab and test use only: bounded in time, never daemonizes.

Clients that measure while something happens (vr/lab/traffic.py runs them, one per stream), each
bounded in time and printing one JSON summary: `fetch` (HTTP GETs; --header counts a response
header's values), `hold` (one long-lived TCP connection to a `serve`, a line exchanged every
--interval), `dnsgap` (an A query every --interval; the longest time without a correct answer),
`renew` (a real dhclient renewal every --interval in the guest it runs in). With --wait-go a
client prints "ready" and starts at the first line on stdin, so several start together."""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import socketserver
import subprocess
import sys
import time


def _peer(address: str) -> str:
    """The peer as the client knows itself: an IPv4 client on a dual-stack socket is ::ffff:a.b.c.d."""
    return address.removeprefix("::ffff:")


class _DualStackTcp(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6  # with IPV6_V6ONLY off (Linux's default): IPv4 and IPv6
    allow_reuse_address = True
    daemon_threads = True


class _DualStackUdp(socketserver.UDPServer):
    address_family = socket.AF_INET6


def serve(name: str, port: int, seconds: float) -> None:
    class TcpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(30)
            self.request.sendall(f"{name} sees {_peer(self.client_address[0])}\n".encode())
            try:  # keep the connection open until the client closes it (long-lived flow tests)
                while self.request.recv(1024):
                    self.request.sendall(f"{name} still here\n".encode())
            except OSError:
                pass

    class UdpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request[1].sendto(f"{name} sees {_peer(self.client_address[0])}\n".encode(), self.client_address)

    tcp = _DualStackTcp(("::", port), TcpHandler)
    udp = _DualStackUdp(("::", port), UdpHandler)
    import threading

    for server in (tcp, udp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait(seconds)


def serve_http(name: str, port: int, seconds: float) -> None:
    """HTTP/1.1 (keep-alive) answering every GET with "<name>", and an application cookie
    `app=<name>` for app-cookie stickiness."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK wait

        def do_GET(self) -> None:
            body = f"{name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", f"app={name}")
            # What a load balancer told the member about its client, for tests to count (fetch --header).
            seen = " ".join(self.headers.get(h, "-") for h in ("X-Forwarded-For", "X-Forwarded-Proto"))
            self.send_header("X-Seen-Forwarded", seen)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait(seconds)


def fetch(args: argparse.Namespace) -> dict:
    """args.count GETs (bounded), spread over args.seconds, on one keep-alive connection or
    one connection each; cookies kept if asked. Returns who answered, failures, latencies."""
    import http.client
    import ssl

    context = None
    if args.scheme == "https":
        context = ssl.create_default_context(cafile=args.cafile)

    def connect() -> http.client.HTTPConnection:
        if context is None:
            return http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        connection = http.client.HTTPSConnection(args.sni or args.host, args.port, timeout=args.timeout,
                                                 context=context)  # fmt: skip
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        connection.sock = context.wrap_socket(sock, server_hostname=args.sni or args.host)
        return connection

    answers: dict[str, int] = {}
    errors: list[str] = []
    latencies: list[float] = []
    cookies: dict[str, str] = {}
    headers_seen: dict[str, int] = {}
    connection = None
    gap = args.seconds / max(args.count, 1)
    _wait_go(args)
    started = time.monotonic()
    for n in range(args.count):
        if args.deadline is not None and time.monotonic() - started > args.deadline:
            errors.extend(f"request {m}: not made: --deadline {args.deadline:g} s passed" for m in range(n, args.count))
            break
        time.sleep(max(0.0, started + n * gap - time.monotonic()))
        mark = time.monotonic()
        try:
            if connection is None:
                connection = connect()
            headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
            headers |= dict(h.split(": ", 1) for h in args.request_header or ())
            if not args.keepalive:
                headers["Connection"] = "close"
            connection.request("GET", args.path, headers=headers)
            response = connection.getresponse()
            body = response.read().decode().strip()
            if args.cookies:
                for header in response.headers.get_all("Set-Cookie") or []:
                    key, _, value = header.split(";")[0].partition("=")
                    cookies[key.strip()] = value.strip()
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            if args.header:
                for value in response.headers.get_all(args.header) or []:
                    headers_seen[value] = headers_seen.get(value, 0) + 1
            answers[body] = answers.get(body, 0) + 1
            latencies.append((time.monotonic() - mark) * 1000)
            if not args.keepalive or response.will_close:
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException) as error:
            errors.append(f"request {n}: {type(error).__name__}: {error}")
            if connection is not None:
                connection.close()
            connection = None
    if connection is not None:
        connection.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
    summary = {"sent": args.count, "answers": answers, "failed": len(errors), "errors": errors[:10],
               "p50_ms": latencies[len(latencies) // 2] if latencies else None, "p99_ms": p99,
               "max_ms": latencies[-1] if latencies else None}  # fmt: skip
    if args.header:
        summary["headers"] = headers_seen  # {value: responses carrying it}; a response without it: not counted
    return summary


def _wait_go(args: argparse.Namespace) -> None:
    """With --wait-go: say "ready", then start at the first line on stdin (none: end here)."""
    if args.wait_go:
        print("ready", flush=True)
        if not sys.stdin.readline():
            raise SystemExit("no go: stdin closed")


def hold(args: argparse.Namespace) -> dict:
    """One TCP connection to a `serve`, kept for --seconds: read its greeting, then every
    --interval send a line and expect its answer ("<name> still here") within --timeout. Ends
    at the first failure (the connection is no use after it)."""
    exchanges, error, slowest, greeting = 0, None, 0.0, None
    _wait_go(args)
    started = time.monotonic()
    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = sock.makefile("rb")
            line = reader.readline()
            if not line.endswith(b"\n"):
                raise OSError("no greeting: connection closed")
            greeting = line.decode(errors="replace").strip()
            n = 1
            while n * args.interval <= args.seconds:
                time.sleep(max(0.0, started + n * args.interval - time.monotonic()))
                mark = time.monotonic()
                sock.sendall(f"line {n}\n".encode())
                if not reader.readline().endswith(b"\n"):
                    raise OSError(f"connection closed after {exchanges} exchanges")
                slowest = max(slowest, time.monotonic() - mark)
                exchanges += 1
                n += 1
    except OSError as failure:  # socket.timeout included
        error = f"after {time.monotonic() - started:.3f} s, {exchanges} exchanges: {type(failure).__name__}: {failure}"
    return {"exchanges": exchanges, "failed": error is not None, "error": error, "greeting": greeting,
            "slowest_ms": round(slowest * 1000, 1)}  # fmt: skip


def dnsgap(args: argparse.Namespace) -> dict:
    """An A query for NAME to SERVER every --interval (a fresh socket each, --timeout to
    answer) for --seconds. max_gap_ms: the longest time without a correct answer (one holding
    --expect): between two consecutive ones, and from the start to the first and from the last
    to the end of the window. A query that timed out is still listened to for 1 s, without
    holding up the next ones: late_answers counts those answered late (late: when), so a slow
    answer is told apart from a lost one; each error says how long its client really waited."""
    import select

    import dns.exception
    import dns.message
    import dns.rdatatype

    queries, failed, errors = 0, 0, []
    pending: list[tuple[socket.socket, int, float, int]] = []  # timed out: (socket, query id, sent, number)
    late: list[str] = []
    counts = {"late": 0}

    def listen_late(wait: float) -> None:
        readable = select.select([p[0] for p in pending], [], [], wait)[0] if pending else []
        now = time.monotonic()
        for entry in list(pending):
            sock, query_id, sent, n = entry
            answered = False
            if sock in readable:
                try:
                    answered = dns.message.from_wire(sock.recv(4096)).id == query_id
                except (OSError, dns.exception.DNSException):
                    answered = False
                if answered:
                    counts["late"] += 1
                    if len(late) < 5:
                        late.append(f"query {n} answered after {(now - sent) * 1000:.1f} ms")
            if answered or now - sent > 1.0:
                sock.close()
                pending.remove(entry)

    _wait_go(args)
    started = time.monotonic()
    end = started + args.seconds
    last_good, max_gap = started, 0.0
    while (at := started + queries * args.interval) < end:
        time.sleep(max(0.0, at - time.monotonic()))
        listen_late(0)
        queries += 1
        query = dns.message.make_query(args.name, dns.rdatatype.A)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent = time.monotonic()
        keep = False
        try:
            sock.settimeout(args.timeout)
            sock.connect((args.server, 53))  # connected: a closed port is refused at once (ICMP)
            sock.send(query.to_wire())
            until = sent + args.timeout
            while True:
                try:
                    response = dns.message.from_wire(sock.recv(4096))
                except TimeoutError:
                    keep = True
                    raise TimeoutError(f"no answer; waited {(time.monotonic() - sent) * 1000:.1f} ms") from None
                if response.id == query.id:
                    break
                sock.settimeout(max(0.001, until - time.monotonic()))
            got = [str(r) for rrset in response.answer for r in rrset if rrset.rdtype == dns.rdatatype.A]
            if args.expect not in got:
                raise ValueError(f"answer {got}, rcode {response.rcode()}")
        except (OSError, ValueError, dns.exception.DNSException) as error:
            failed += 1
            if len(errors) < 5:
                errors.append(f"query {queries} at {sent - started:.3f} s: {type(error).__name__}: {error}")
            continue
        finally:
            if keep:
                pending.append((sock, query.id, sent, queries))
            else:
                sock.close()
        now = time.monotonic()
        max_gap, last_good = max(max_gap, now - last_good), now
    max_gap = max(max_gap, end - last_good)
    while pending and time.monotonic() < end + 1.0:
        listen_late(0.05)
    for sock, *_ in pending:
        sock.close()
    return {"queries": queries, "failed": failed, "max_gap_ms": round(max_gap * 1000, 1), "errors": errors,
            "late_answers": counts["late"], "late": late}  # fmt: skip


def renew(args: argparse.Namespace) -> dict:
    """Every --interval for --seconds, a real dhclient (-4 -1, foreground) in this namespace with
    the given config, lease file and script: it asks for the lease the file holds (INIT-REBOOT,
    DHCPREQUEST) and runs the script; counted renewed when it says "bound to <address>" within
    --timeout. Then it is killed (SIGKILL: no release, no script run) and the next one starts."""
    # setpriv --pdeathsig: dhclient is killed if this process dies (even by SIGKILL) while it runs
    command = ["setpriv", "--pdeathsig", "KILL", "dhclient", "-4", "-1", "-d", "-v", "-cf", args.conf,
               "-lf", args.leases, "--no-pid", "-sf", args.script, args.interface]  # fmt: skip
    renewals, failed, errors, addresses, slowest = 0, 0, [], {}, 0.0
    _wait_go(args)
    started = time.monotonic()
    n = 0
    while (at := started + n * args.interval) < started + args.seconds:
        time.sleep(max(0.0, at - time.monotonic()))
        n += 1
        mark = time.monotonic()
        address, said = _one_dhclient(command, args.timeout)
        if address is None:
            failed += 1
            if len(errors) < 5:
                errors.append(f"renewal {n} at {mark - started:.3f} s: no lease within {args.timeout:g} s: {said}")
            continue
        renewals += 1
        slowest = max(slowest, time.monotonic() - mark)
        addresses[address] = addresses.get(address, 0) + 1
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", args.interface], capture_output=True, text=True,
                           timeout=10, check=False).stdout  # fmt: skip
    configured = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", shown)
    kept = set(addresses) <= {args.expect} and args.expect in configured
    return {"renewals": renewals, "failed": failed, "attempts": n, "addresses": addresses, "configured": configured,
            "address_kept": kept, "slowest_ms": round(slowest * 1000, 1), "errors": errors}  # fmt: skip


def _one_dhclient(command: list[str], timeout: float) -> tuple[str | None, str]:
    """Run dhclient until it reports "bound to <address>" (or timeout passes); kill it by its PID."""
    import select

    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    said: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        buffered = b""
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([process.stderr], [], [], left)[0]:
                break
            chunk = process.stderr.read1(4096)
            if not chunk:
                break  # it exited (-1: no lease)
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text.startswith(("DHCP", "bound to", "No ", "receive_packet")):
                    said.append(text)
                if found := re.match(r"bound to (\S+)", text):
                    return found.group(1), " | ".join(said[-3:])
        return None, " | ".join(said[-3:]) or "nothing said"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stderr.close()


def ask(host: str, port: int, udp: bool, timeout: float, source: str | None = None) -> str:
    """One line from a serve; source: the guest's address to send from (one of its own)."""
    if udp:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            if source:
                sock.bind((source, 0))
            sock.sendto(b"hello\n", (host, port))
            return sock.recv(1024).decode().strip()
    with socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None) as sock:
        return sock.recv(1024).decode().strip()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vr.lab.server")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=600)
    p = sub.add_parser("serve-http")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=600)
    p = sub.add_parser("fetch", help="bounded HTTP(S) GETs; prints one JSON summary")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--scheme", choices=("http", "https"), default="http")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seconds", type=float, default=0.0, help="spread the requests over this long")
    p.add_argument("--keepalive", action="store_true")
    p.add_argument("--cookies", action="store_true", help="send back the cookies received")
    p.add_argument("--cafile")
    p.add_argument("--sni", help="server name for TLS (the host is an address)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--header", help="also count the values of this response header (JSON: headers)")
    p.add_argument("--deadline", type=float, help="requests not made within this many seconds count as failed")
    p.add_argument("--path", default="/", help="the path asked")
    p.add_argument("--request-header", action="append", help='"Name: value" sent with each request (repeatable)')
    p.add_argument("--wait-go", action="store_true", help='print "ready", start at a line on stdin')
    p = sub.add_parser("hold", help="one long-lived TCP connection to a serve; prints one JSON summary")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--interval", type=float, default=0.05, help="a line sent this often, answered within --timeout")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--wait-go", action="store_true")
    p = sub.add_parser("dnsgap", help="A queries every --interval; prints one JSON summary")
    p.add_argument("name")
    p.add_argument("server")
    p.add_argument("--expect", required=True, help="the address a correct answer holds")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=0.05)
    p.add_argument("--wait-go", action="store_true")
    p = sub.add_parser("renew", help="a real dhclient renewal every --interval; prints one JSON summary")
    p.add_argument("interface")
    p.add_argument("--conf", required=True)
    p.add_argument("--leases", required=True, help="dhclient's lease file: the lease it asks for again")
    p.add_argument("--script", required=True)
    p.add_argument("--expect", required=True, help="the address the guest must keep")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=2.0, help="a renewal not bound within this long failed")
    p.add_argument("--wait-go", action="store_true")
    p = sub.add_parser("ask")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--udp", action="store_true")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--source", help="send from this address of the caller's")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.name, args.port, args.seconds)
        return 0
    if args.mode == "serve-http":
        serve_http(args.name, args.port, args.seconds)
        return 0
    if args.mode == "fetch":
        if args.count > 100_000 or args.seconds > 600:
            parser.error("--count is at most 100000 and --seconds at most 600")
        print(json.dumps(fetch(args)))
        return 0
    if args.mode in ("hold", "dnsgap", "renew"):
        if not 0 < args.seconds <= 600 or not 0.001 <= args.interval <= 60 or not 0 < args.timeout <= 60:
            parser.error("need 0 < --seconds <= 600, 0.001 <= --interval <= 60 and 0 < --timeout <= 60")
        # SIGTERM ends it through SystemExit, so a running dhclient is killed on the way out (finally)
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        print(json.dumps({"hold": hold, "dnsgap": dnsgap, "renew": renew}[args.mode](args)))
        return 0
    try:
        print(ask(args.host, args.port, args.udp, args.timeout, args.source))
    except OSError as error:
        print(f"no answer: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
