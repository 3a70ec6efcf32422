"""Lab traffic endpoints: `serve` answers each TCP connection or UDP datagram with
"<name> sees <peer address>", so a test can tell who answered and what source address
NAT left; `ask` is the client. Lab and test use only: bounded in time, never daemonizes."""

from __future__ import annotations

import argparse
import socket
import socketserver
import sys


def serve(name: str, port: int, seconds: float) -> None:
    class TcpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(30)
            self.request.sendall(f"{name} sees {self.client_address[0]}\n".encode())
            try:  # keep the connection open until the client closes it (long-lived flow tests)
                while self.request.recv(1024):
                    self.request.sendall(f"{name} still here\n".encode())
            except OSError:
                pass

    class UdpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request[1].sendto(f"{name} sees {self.client_address[0]}\n".encode(), self.client_address)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    tcp = socketserver.ThreadingTCPServer(("0.0.0.0", port), TcpHandler)
    udp = socketserver.UDPServer(("0.0.0.0", port), UdpHandler)
    import threading

    for server in (tcp, udp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait(seconds)


def ask(host: str, port: int, udp: bool, timeout: float) -> str:
    if udp:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
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
    p = sub.add_parser("ask")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--udp", action="store_true")
    p.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.name, args.port, args.seconds)
        return 0
    try:
        print(ask(args.host, args.port, args.udp, args.timeout))
    except OSError as error:
        print(f"no answer: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
