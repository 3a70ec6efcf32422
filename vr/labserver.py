"""Lab traffic endpoints: `serve` answers each TCP connection or UDP datagram with
"<name> sees <peer address>", so a test can tell who answered and what source address
NAT left; `ask` is the client. Lab and test use only: bounded in time, never daemonizes."""

from __future__ import annotations

import argparse
import socket
import socketserver
import sys


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
    import time

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
    connection = None
    gap = args.seconds / max(args.count, 1)
    started = time.monotonic()
    for n in range(args.count):
        time.sleep(max(0.0, started + n * gap - time.monotonic()))
        mark = time.monotonic()
        try:
            if connection is None:
                connection = connect()
            headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
            if not args.keepalive:
                headers["Connection"] = "close"
            connection.request("GET", "/", headers=headers)
            response = connection.getresponse()
            body = response.read().decode().strip()
            if args.cookies:
                for header in response.headers.get_all("Set-Cookie") or []:
                    key, _, value = header.split(";")[0].partition("=")
                    cookies[key.strip()] = value.strip()
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
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
    return {"sent": args.count, "answers": answers, "failed": len(errors), "errors": errors[:10],
            "p50_ms": latencies[len(latencies) // 2] if latencies else None, "p99_ms": p99}  # fmt: skip


def ask(host: str, port: int, udp: bool, timeout: float) -> str:
    if udp:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(b"hello\n", (host, port))
            return sock.recv(1024).decode().strip()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return sock.recv(1024).decode().strip()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vr.labserver")
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
    p = sub.add_parser("ask")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--udp", action="store_true")
    p.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.name, args.port, args.seconds)
        return 0
    if args.mode == "serve-http":
        serve_http(args.name, args.port, args.seconds)
        return 0
    if args.mode == "fetch":
        import json

        if args.count > 100_000 or args.seconds > 600:
            parser.error("--count is at most 100000 and --seconds at most 600")
        print(json.dumps(fetch(args)))
        return 0
    try:
        print(ask(args.host, args.port, args.udp, args.timeout))
    except OSError as error:
        print(f"no answer: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
