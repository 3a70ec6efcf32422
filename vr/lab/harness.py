"""A lab router in network namespaces: the demo, and the fixture of the end-to-end tests.

Topology (all names carry one unique prefix, all addresses live only inside them):

    <p>-mgmt  eth0 169.254.0.1/16 ── eth0 (control)  ┐
    <p>-pub   eth0 192.0.2.1/24   ── eth1 (public)   │ <p>-r: the router, its own vr
    <p>-g1    eth0 (DHCP)         ── eth2 (tier1)    │        instance under DIR/router
    <p>-g2    eth0 (DHCP)         ── eth3 (tier2)    ┘

With vpn=True, a second site and a road warrior join the "internet" (<p>-pub forwards):

    <p>-pub   eth1 198.51.100.1/24 ── eth1 of <p>-rb: router B (198.51.100.10), its own vr
                                      under DIR/router-b, configs/lab/site-b.json
    <p>-rb    eth2 10.2.1.1/24     ── eth0 of <p>-gb: B's guest, 10.2.1.10
    <p>-pub   eth2 203.0.113.1/24  ── eth0 of <p>-rw: a road warrior, 203.0.113.10

Guests run a real `dhclient` with their own lease file, pid file and script, so nothing
on the host (resolv.conf, leases) is touched. Everything started is stopped by PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from vr.foundation.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
GUEST_MACS = {"g1": "02:00:00:00:01:10", "g2": "02:00:00:00:02:10"}
# (router interface, peer namespace suffix, peer address)
LINKS = [
    ("eth0", "mgmt", "169.254.0.1/16"),
    ("eth1", "pub", "192.0.2.1/24"),
    ("eth2", "g1", None),
    ("eth3", "g2", None),
]
DHCLIENT_CONF = """\
timeout 10;
retry 1;
request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers, interface-mtu, host-name;
"""


def _run(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def examples_dir() -> Path:
    if EXAMPLES.is_dir():
        return EXAMPLES
    return Settings().template_dir / "examples"


# (namespace, interface, address, peer namespace, peer interface, peer address, peer's default route)
VPN_LINKS = [
    ("pub", "eth1", "198.51.100.1/24", "rb", "eth1", None, None),
    ("rb", "eth2", None, "gb", "eth0", "10.2.1.10/24", "10.2.1.1"),
    ("pub", "eth2", "203.0.113.1/24", "rw", "eth0", "203.0.113.10/24", "203.0.113.1"),
]


def stop_process(process: subprocess.Popen) -> None:
    """Stop one process we started, by its PID: TERM, then KILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class Lab:
    def __init__(self, directory: Path | str, prefix: str | None = None, vpn: bool = False):
        self.dir = Path(directory).resolve()
        self.prefix = prefix or "vrl" + hashlib.sha1(str(self.dir).encode()).hexdigest()[:6]
        self.router_ns = f"{self.prefix}-r"
        self.settings = Settings.under_root(self.dir / "router", netns=self.router_ns)
        self.vpn = vpn
        self.site_b = Settings.under_root(self.dir / "router-b", netns=self.ns("rb"))
        self.extra_guests: list[str] = []  # namespaces add_guests made (suffixes)

    def ns(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    @property
    def namespaces(self) -> list[str]:
        names = [self.router_ns, *(self.ns(peer) for _, peer, _ in LINKS)]
        names += [self.ns(n) for n in ("rb", "gb", "rw")] if self.vpn else []
        return names + [self.ns(n) for n in self.extra_guests]

    # ------------------------------------------------------------ build and tear down
    def up(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # dnsmasq drops privileges and re-reads its files on SIGHUP
        (self.dir / "lab.json").write_text(json.dumps({"prefix": self.prefix}))
        (self.dir / "dhclient.conf").write_text(DHCLIENT_CONF)
        try:
            for name in self.namespaces:
                _run("ip", "netns", "add", name)
                _run("ip", "-n", name, "link", "set", "lo", "up")
                # Fresh links would hold their IPv6 addresses tentative for a second or two.
                _run("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            for router_if, peer, address in LINKS:
                peer_ns = self.ns(peer)
                _run("ip", "link", "add", router_if, "netns", self.router_ns, "type", "veth",
                     "peer", "name", "eth0", "netns", peer_ns)  # fmt: skip
                if peer in GUEST_MACS:
                    _run("ip", "-n", peer_ns, "link", "set", "eth0", "address", GUEST_MACS[peer])
                if address:
                    _run("ip", "-n", peer_ns, "addr", "add", address, "dev", "eth0")
                _run("ip", "-n", peer_ns, "link", "set", "eth0", "up")
            _run("ip", "-n", self.ns("pub"), "route", "add", "10.1.0.0/16", "via", "192.0.2.10")
            # The public side's IPv6: routes the tiers' /64s (configs/lab/ipv6.json) to the router.
            _run("ip", "-n", self.ns("pub"), "addr", "add", "2001:db8:ffff::1/64", "dev", "eth0", "nodad")
            _run("ip", "-n", self.ns("pub"), "route", "add", "2001:db8:1::/48", "via", "2001:db8:ffff::10")
            if self.vpn:
                self._vpn_links()
        except BaseException:
            self.down()
            raise

    def add_guests(self, tier_guest: str, guests: dict[str, str]) -> None:
        """More machines on one guest tier's link (a shared network's gateway, a second VM):
        the tier's guest namespace becomes a bridge (its eth0, the router's peer, a port of
        it; its own address and dhclient gone) and each new namespace (suffix -> MAC) has an
        eth0 on that bridge. They are deleted with the lab."""
        bridge_ns = self.ns(tier_guest)
        self.stop_dhclient(tier_guest)
        if not self.extra_guests or _run("ip", "-n", bridge_ns, "link", "show", "br0", check=False).returncode:
            _run("ip", "-n", bridge_ns, "addr", "flush", "dev", "eth0")
            # The guest's MAC goes with the guest: a bridge port keeping it would take its frames.
            _run("ip", "-n", bridge_ns, "link", "set", "eth0", "address", "02:00:00:fe:00:01")
            _run("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", bridge_ns, "link", "set", "eth0", "master", "br0")
            _run("ip", "-n", bridge_ns, "link", "set", "br0", "up")
        for suffix, mac in guests.items():
            name = self.ns(suffix)
            self.extra_guests.append(suffix)
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            port = f"p{len(self.extra_guests)}"
            _run("ip", "link", "add", "eth0", "netns", name, "address", mac, "type", "veth",
                 "peer", "name", port, "netns", bridge_ns)  # fmt: skip
            _run("ip", "-n", bridge_ns, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", name, "link", "set", "eth0", "up")

    def add_peer(self, suffix: str, router_if: str, address: str) -> str:
        """A namespace on a new link of the router's (router_if there, eth0 with address in
        the peer): a private gateway's network, another public network. Deleted with the lab."""
        name = self.ns(suffix)
        self.extra_guests.append(suffix)
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        _run("ip", "link", "add", router_if, "netns", self.router_ns, "type", "veth", "peer", "name", "eth0",
             "netns", name)  # fmt: skip
        _run("ip", "-n", name, "addr", "add", address, "dev", "eth0")
        _run("ip", "-n", name, "link", "set", "eth0", "up")
        return name

    def _vpn_links(self) -> None:
        _run("ip", "netns", "exec", self.ns("pub"), "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for namespace, ifname, address, peer, peer_if, peer_address, gateway in VPN_LINKS:
            _run("ip", "link", "add", ifname, "netns", self.ns(namespace), "type", "veth",
                 "peer", "name", peer_if, "netns", self.ns(peer))  # fmt: skip
            for where, name, ip in ((namespace, ifname, address), (peer, peer_if, peer_address)):
                if ip:
                    _run("ip", "-n", self.ns(where), "addr", "add", ip, "dev", name)
                _run("ip", "-n", self.ns(where), "link", "set", name, "up")
            if gateway:
                _run("ip", "-n", self.ns(peer), "route", "add", "default", "via", gateway)

    def down(self) -> None:
        self.stop_servers()
        for guest in [*GUEST_MACS, *self.extra_guests]:
            self.stop_dhclient(guest)
        self.stop_road_warrior()
        for settings in (self.settings, self.site_b):
            if settings.supervisor_socket.exists() or (settings.run_dir / "supervisord.pid").exists():
                from vr.services.runtime import Runtime

                try:
                    Runtime(settings).supervisor.shutdown()
                except OSError:
                    pass
        existing = _run("ip", "netns", "list", check=False).stdout
        for name in self.namespaces:
            if re.search(rf"^{re.escape(name)}\b", existing, re.MULTILINE):
                _run("ip", "netns", "del", name, check=False)

    # ------------------------------------------------------------ the router's vr
    def vr(self, *args: str, input: str | None = None, env: dict | None = None, check: bool = True,
           site: str = "a"):  # fmt: skip
        settings = self.site_b if site == "b" else self.settings
        cmd = [sys.executable, "-m", "vr", "--root", str(settings.state_dir.parent), "--netns", settings.netns]
        result = subprocess.run(
            [*cmd, *args],
            check=False,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **(env or {})},
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"vr {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def apply_examples(self) -> list[str]:
        payloads = sorted(examples_dir().glob("*.json"), key=lambda p: json.loads(p.read_text())["generation"])
        return [self.vr("apply", str(p)).stdout.strip() for p in payloads]

    # ------------------------------------------------------------ the manager's side: the agent
    AGENT_URL = "https://169.254.0.10:8443"  # configs/examples/router.json: the control address, agent.port

    @property
    def agent_token_file(self) -> Path:
        """The lab's token (configs/lab/agent-token; its hash is in router.json), 0600 as the
        client wants it: a checkout does not keep the mode."""
        path = self.dir / "agent-token"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            path.write_text((examples_dir().parent / "lab" / "agent-token").read_text())
            path.chmod(0o600)
        return path

    @property
    def agent_ca(self) -> Path:
        """The agent's self-signed certificate: the CA the manager trusts it with."""
        return self.settings.agent_tls_dir / "certificate.pem"

    def remote(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`vr remote ...` from the management network, as a manager would run it."""
        cmd = ["ip", "netns", "exec", self.ns("mgmt"), sys.executable, "-m", "vr", "remote", "--url", self.AGENT_URL,
               "--token-file", str(self.agent_token_file), "--ca", str(self.agent_ca), *args]  # fmt: skip
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"vr remote {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    # ------------------------------------------------------------ VPN peers
    def apply_site_b(self) -> str:
        """Router B: its own vr and payload; its tunnel to A is passive (A initiates)."""
        return self.vr("apply", str(examples_dir().parent / "lab" / "site-b.json"), site="b").stdout.strip()

    def apply_vpn(self, extra: dict | None = None) -> str:
        """Router A's tunnel to B (configs/lab/vpn.json), as the next generation."""
        stored = json.loads(self.vr("status", "--json", check=False).stdout)["generation"]
        payload = json.loads((examples_dir().parent / "lab" / "vpn.json").read_text())
        payload.update(extra or {}, generation=stored + 1)
        path = self.dir / f"vpn-{stored + 1}.json"
        path.write_text(json.dumps(payload))
        return self.vr("apply", str(path)).stdout.strip()

    def wait_tunnel(self, connection: str = "s2s-site-b", site: str = "a", timeout: float = 15) -> dict | None:
        """Bounded wait until charon reports the connection ESTABLISHED; its status row."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = json.loads(self.vr("status", "--json", "--vpn", site=site, check=False).stdout)
            row = next((r for r in report.get("vpn") or [] if r["connection"] == connection), None)
            if row and row["state"] == "ESTABLISHED":
                return row
            time.sleep(0.2)
        return None

    def start_road_warrior(self) -> Path:
        """A client charon in <p>-rw (the test loads its credentials over VICI); its socket."""
        from vr.services.runtime import Runtime
        from vr.services.strongswan import CHARON, client_conf

        directory = self.dir / "rw"
        directory.mkdir(exist_ok=True)
        socket_path = directory / "charon.vici"
        conf = directory / "strongswan.conf"
        conf.write_bytes(client_conf(Runtime(self.settings), socket_path))
        with open(directory / "charon.log", "ab") as log:
            process = subprocess.Popen(["ip", "netns", "exec", self.ns("rw"), CHARON], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "STRONGSWAN_CONF": str(conf)})  # fmt: skip
        (directory / "charon.pid").write_text(str(process.pid))
        for _ in range(250):
            if socket_path.exists():
                break
            time.sleep(0.02)
        return socket_path

    def stop_road_warrior(self) -> None:
        pid_file = self.dir / "rw" / "charon.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(250):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.02)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        pid_file.unlink()

    # ------------------------------------------------------------ guests
    def dhcp(self, guest: str, timeout: float = 30) -> dict:
        """Run a real dhclient in the guest; return what the guest got."""
        lease_file, pid_file = self.dir / f"{guest}.leases", self.dir / f"{guest}.dhclient.pid"
        _stop_by_pid_file(pid_file)  # a guest asked again: its previous dhclient would outlive the lab
        _run("ip", "netns", "exec", self.ns(guest), "dhclient", "-4", "-1", "-v",
             "-cf", str(self.dir / "dhclient.conf"), "-lf", str(lease_file), "-pf", str(pid_file),
             "-sf", str(dhclient_script()), "eth0", timeout=timeout)  # fmt: skip
        return self.guest_lease(guest)

    def dhcp6(self, guest: str, timeout: float = 30) -> str | None:
        """A real `dhclient -6` in the guest (stateful DHCPv6); the address it configured."""
        lease_file, pid_file = self.dir / f"{guest}.leases6", self.dir / f"{guest}.dhclient6.pid"
        _stop_by_pid_file(pid_file)
        _run("ip", "netns", "exec", self.ns(guest), "dhclient", "-6", "-1", "-v",
             "-cf", str(self.dir / "dhclient.conf"), "-lf", str(lease_file), "-pf", str(pid_file),
             "-sf", str(dhclient_script()), "eth0", timeout=timeout)  # fmt: skip
        return self.global_ipv6(guest)

    def global_ipv6(self, guest: str) -> str | None:
        shown = _run("ip", "-n", self.ns(guest), "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
        found = re.findall(r"inet6 ([0-9a-f:]+)/", shown)
        return found[0] if found else None

    def set_guest_mac(self, guest: str, mac: str) -> None:
        _run("ip", "-n", self.ns(guest), "-4", "addr", "flush", "dev", "eth0")
        _run("ip", "-n", self.ns(guest), "link", "set", "eth0", "address", mac)

    def guest_lease(self, guest: str) -> dict:
        """The newest lease dhclient recorded, and the address the guest's interface has."""
        text = (self.dir / f"{guest}.leases").read_text()
        last = text[text.rfind("lease {") :]
        fields = dict(re.findall(r"^\s*(?:option )?([a-z-]+) (.+);$", last, re.MULTILINE))
        shown = _run("ip", "-n", self.ns(guest), "-4", "-o", "addr", "show", "dev", "eth0").stdout
        mtu = _run("ip", "-n", self.ns(guest), "-o", "link", "show", "dev", "eth0").stdout
        return {
            "address": fields.get("fixed-address"),
            "routers": fields.get("routers"),
            "dns": fields.get("domain-name-servers"),
            "domain": (fields.get("domain-name") or "").strip('"'),
            "mtu": fields.get("interface-mtu"),
            "configured": re.findall(r"inet (\S+)", shown),
            "link_mtu": int(re.search(r"mtu (\d+)", mtu).group(1)),
        }

    def stop_dhclient(self, guest: str) -> None:
        for pid_file in (self.dir / f"{guest}.dhclient.pid", self.dir / f"{guest}.dhclient6.pid"):
            _stop_by_pid_file(pid_file)

    # Test clients other than dhclient. Each records the environment its script receives in
    # DIR/<guest>.<client>/<event>.env (RECORD_ENV), so nothing in the guest or on the host
    # changes but what the client itself configures in the guest's namespace.
    def dhcpcd6(self, guest: str, timeout: int = 10) -> dict[str, str]:
        """A real `dhcpcd -6` in the guest (stateful DHCPv6, one shot); what its script got
        at BOUND6 ({} if it got no lease). Its state (DUID, leases) is DIR/<guest>.dhcpcd:
        remove that directory and the guest is a new client. dhcpcd 9.4 has no options for
        its database and run directories, so they are bind-mounted in the private mount
        namespace `ip netns exec` makes, over the host's paths in that namespace only."""
        here = self._client_dir(guest, "dhcpcd")
        for sub in ("db", "run"):
            (here / sub).mkdir(exist_ok=True)
        (here / "dhcpcd.conf").write_text("ipv6only\nnoipv6rs\nia_na 1\npersistent\n")
        command = (
            f'mount --bind "$1/db" /var/lib/dhcpcd && mount --bind "$1/run" /run && '
            f'exec dhcpcd -6 -1 -B -d -t {int(timeout)} -f "$1/dhcpcd.conf" -c "$1/record-env" eth0'
        )
        self._run_client(guest, here, ["sh", "-c", command, "dhcpcd6", str(here)], timeout)
        return _read_env(here / "BOUND6.env")

    def udhcpc(self, guest: str, timeout: int = 10) -> dict[str, str]:
        """busybox udhcpc in the guest, as a CirrOS-style guest asks (its default option
        list, no MTU among it); what its script got at `bound` ({} if it got no lease)."""
        here = self._client_dir(guest, "udhcpc")
        tries = max(1, int(timeout) // 2)
        command = ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", str(tries), "-T", "2",
                   "-s", str(here / "record-env")]  # fmt: skip
        self._run_client(guest, here, command, timeout)
        return _read_env(here / "bound.env")

    def _client_dir(self, guest: str, client: str) -> Path:
        here = self.dir / f"{guest}.{client}"
        here.mkdir(exist_ok=True)
        for stale in here.glob("*.env"):
            stale.unlink()
        script = here / "record-env"
        script.write_text(RECORD_ENV)
        script.chmod(0o755)
        return here

    def _run_client(self, guest: str, here: Path, command: list[str], timeout: int) -> None:
        """Run a client to its end in the guest's namespace; stopped by PID if it overstays."""
        with open(here / "client.log", "ab") as log:
            process = subprocess.Popen(["ip", "netns", "exec", self.ns(guest), *command], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            try:
                process.wait(timeout=timeout + 10)
            except subprocess.TimeoutExpired:
                pass
            finally:
                stop_process(process)

    def resolve(self, namespace: str, name: str, server: str, timeout: float = 2.0, rdtype: str = "A") -> list[str]:
        """A DNS query made from inside a namespace, as a guest's resolver would."""
        code = (
            "import sys, dns.message, dns.query, dns.rdatatype\n"
            "t = dns.rdatatype.from_text(sys.argv[4])\n"
            "q = dns.message.make_query(sys.argv[1], t)\n"
            "r = dns.query.udp(q, sys.argv[2], timeout=float(sys.argv[3]))\n"
            "print(' '.join(str(x) for s in r.answer for x in s if s.rdtype == t))\n"
        )
        result = _run("ip", "netns", "exec", namespace, sys.executable, "-c", code, name, server, str(timeout),
                      rdtype, check=False, timeout=timeout + 10)  # fmt: skip
        if result.returncode != 0:
            raise TimeoutError(f"no DNS answer from {server} in {namespace}: {result.stderr.strip().splitlines()[-1:]}")
        return result.stdout.split()

    def serve(self, namespace: str, name: str, port: int, http: bool = False) -> int:
        """A TCP+UDP endpoint in a namespace that answers with its name and the peer it sees
        (http: an HTTP server answering with its name)."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "vr.lab.server",
             "serve-http" if http else "serve", "--name", name, "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        process.stdout.readline()  # "ready"
        with open(self.dir / "servers.pids", "a") as pids:
            pids.write(f"{process.pid}\n")
        return process.pid

    def stop_servers(self) -> None:
        pid_file = self.dir / "servers.pids"
        if not pid_file.exists():
            return
        for line in pid_file.read_text().split():
            try:
                os.kill(int(line), signal.SIGTERM)
                os.waitpid(int(line), 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        pid_file.unlink()

    def ask(self, namespace: str, host: str, port: int, udp: bool = False, timeout: float = 2.0) -> str | None:
        """Connect (or send a datagram) from a namespace; the answer, or None if nothing came."""
        cmd = ["ip", "netns", "exec", namespace, sys.executable, "-m", "vr.lab.server", "ask", host, str(port),
               "--timeout", str(timeout)]  # fmt: skip
        result = _run(*cmd, *(["--udp"] if udp else []), check=False, timeout=timeout + 10)
        return result.stdout.strip() if result.returncode == 0 else None

    def fetch(self, namespace: str, host: str, port: int, *options: str, wait: bool = True):
        """Bounded HTTP(S) GETs from a namespace (labserver fetch); its JSON summary, or with
        wait=False the running process (read its stdout when done)."""
        cmd = ["ip", "netns", "exec", namespace, sys.executable, "-m", "vr.lab.server", "fetch", host, str(port),
               *options]  # fmt: skip
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not wait:
            return process
        out, err = process.communicate(timeout=120)
        if process.returncode != 0:
            raise RuntimeError(f"fetch failed: {err.strip()}")
        return json.loads(out)

    def lb_states(self) -> dict[str, str]:
        """Each load-balancer member ("ip:port") and its state as haproxy sees it (vr status --lb)."""
        report = json.loads(self.vr("status", "--json", "--lb", check=False).stdout)  # exit 1: unhealthy
        return {m["member"]: m["state"] for m in report["lb"] or []}

    def wait_lb_up(self, tries: int = 40) -> bool:
        """Bounded wait until every member is UP (health checks need rise x interval)."""
        for _ in range(tries):
            states = self.lb_states()
            if states and all(state == "UP" for state in states.values()):
                return True
            time.sleep(0.1)
        return False

    def ping(self, namespace: str, address: str, count: int = 2) -> bool:
        return _run("ip", "netns", "exec", namespace, "ping", "-c", str(count), "-W", "1", "-i", "0.2", address,
                    check=False).returncode == 0  # fmt: skip

    def scan(self, namespace: str, targets: list[str], *options: str, timeout: float = 300) -> dict[str, dict[str, str]]:
        """An nmap scan from a namespace (root: SYN and UDP scans), bounded by timeout; IPv4 and
        IPv6 targets may be mixed (one nmap run per family). address -> {"tcp/80": state, ...}
        for every port nmap names, and {"not shown: STATE": count} for the ports it folds."""
        import xml.etree.ElementTree as ET

        found: dict[str, dict[str, str]] = {}
        for family in (["-4"], ["-6"]):
            chosen = [t for t in targets if (":" in t) == (family == ["-6"])]
            if not chosen:
                continue
            result = _run("ip", "netns", "exec", namespace, "nmap", *family, "-oX", "-", *options, *chosen,
                          timeout=timeout)  # fmt: skip
            for host in ET.fromstring(result.stdout).iter("host"):
                address = host.find("address").get("addr")
                ports = found.setdefault(address, {})
                for folded in host.iter("extraports"):
                    ports[f"not shown: {folded.get('state')}"] = folded.get("count")
                for port in host.iter("port"):
                    ports[f"{port.get('protocol')}/{port.get('portid')}"] = port.find("state").get("state")
        return found

    def renew_unicast(self, guest: str, timeout: float = 20) -> list[str]:
        """A DHCP renewal as a bound client makes it: busybox udhcpc takes the guest's lease
        (it changes nothing in the guest: its script is /bin/true), then on SIGUSR1 renews it
        with a DHCPREQUEST unicast to the server. What udhcpc said; stopped by its PID."""
        import select

        address = self.guest_lease(guest)["address"]
        process = subprocess.Popen(["ip", "netns", "exec", self.ns(guest), "busybox", "udhcpc", "-f", "-i", "eth0",
                                    "-s", "/bin/true", "-r", address, "-t", "3", "-T", "1", "-A", "1", "-n"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        said: list[str] = []
        try:
            deadline = time.monotonic() + timeout
            buffered = b""
            while (left := deadline - time.monotonic()) > 0 and select.select([process.stdout], [], [], left)[0]:
                chunk = process.stdout.read1(4096)
                if not chunk:
                    break
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    said.append(line.decode(errors="replace").strip().removeprefix("udhcpc: "))
                    if said[-1].startswith("lease of"):
                        if any(s.startswith("sending renew") for s in said):
                            return said
                        process.send_signal(signal.SIGUSR1)
            return said
        finally:
            stop_process(process)
            process.stdout.close()


RECORD_ENV = """\
#!/bin/sh
# A lab test client's script (dhcpcd: $reason; udhcpc: $1): records what it was given, changes nothing.
env | sort > "$(dirname "$0")/${reason:-$1}.env"
exit 0
"""


def _stop_by_pid_file(pid_file: Path) -> None:
    """The process a pid file names, stopped (TERM, then KILL after 2 s) and the file removed."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)


def _read_env(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def dhclient_script() -> Path:
    return examples_dir().parent / "lab" / "dhclient-script"  # executable in git and when installed


def main(args) -> int:
    lab = Lab(args.dir, args.prefix, vpn=True)
    if args.action == "up":
        lab.up()
        apply_demo_payloads(lab)
        show(lab)
    elif args.action == "status":
        show(lab)
    elif args.action == "down":
        lab.down()
        print(f"lab {lab.prefix} removed")
    elif args.action == "demo":
        try:
            lab.up()
            apply_demo_payloads(lab)
            show(lab)
        finally:
            lab.down()
            print(f"\nlab {lab.prefix} torn down: namespaces deleted, daemons stopped")
    return 0


def apply_demo_payloads(lab: Lab) -> None:
    """The first payload as at a router's first boot (`vr apply`, no daemon yet: in-process;
    it starts the daemon); the next ones as a manager sends them: through the agent, over
    HTTPS with the lab's token, by `vr remote` (vr.client.RouterClient)."""
    first, *rest = sorted(examples_dir().glob("*.json"), key=lambda p: json.loads(p.read_text())["generation"])
    print(f"router: {lab.vr('apply', str(first)).stdout.strip()}  ({first.name}, vr apply on the router)")
    for payload in rest:
        answer = lab.remote("apply", str(payload)).stdout.strip()
        print(f"manager: {answer}  ({payload.name}, vr remote apply through the agent {lab.AGENT_URL})")


def show(lab: Lab) -> None:
    print(f"\nlab {lab.prefix}: router namespace {lab.router_ns}, state under {lab.dir}")
    for guest, mac in GUEST_MACS.items():
        if not (lab.dir / f"{guest}.leases").exists():
            lab.dhcp(guest)
        lease = lab.guest_lease(guest)
        print(
            f"  guest {lab.ns(guest)} ({mac}): leased {lease['address']} via {lease['routers']}, "
            f"dns {lease['dns']}, domain {lease['domain']}, mtu {lease['link_mtu']}"
        )
    g1_dns = lab.guest_lease("g1")["dns"]
    for name in ("web1", "db1", "web2"):
        fqdn = f"{name}.cloud.internal"
        try:
            answer = ", ".join(lab.resolve(lab.ns("g1"), fqdn, g1_dns)) or "NXDOMAIN"
        except TimeoutError as error:
            answer = f"no answer ({error})"
        print(f"  guest {lab.ns('g1')} resolves {fqdn} -> {answer}")
    reached = "ok" if lab.ping(lab.ns("g1"), "192.0.2.1") else "FAILED"
    print(f"  guest {lab.ns('g1')} pings the public host 192.0.2.1 through the router: {reached}")
    show_nat(lab)
    show_guest_data(lab)
    show_lb(lab)
    show_ipv6(lab)
    show_vpn(lab)
    print(f"\nthe manager asks the agent ({lab.AGENT_URL}): vr remote status")
    print(lab.remote("status", check=False).stdout)


def show_nat(lab: Lab) -> None:
    """Source NAT, port forwards and static NAT, seen from both sides with real connections."""
    lab.serve(lab.ns("pub"), "public host", 7000)
    lab.serve(lab.ns("g1"), "web1", 80)
    lab.serve(lab.ns("g1"), "web1", 5353)
    lab.serve(lab.ns("g2"), "db1", 22)
    checks = [
        ("guest g1 -> public host tcp/7000 (source NAT)", lab.ns("g1"), "192.0.2.1", 7000, False),
        ("guest g2 -> public host tcp/7000 (static NAT)", lab.ns("g2"), "192.0.2.1", 7000, False),
        ("public -> 192.0.2.10 tcp/8080 (port forward)", lab.ns("pub"), "192.0.2.10", 8080, False),
        ("public -> 192.0.2.10 udp/5353 (port forward)", lab.ns("pub"), "192.0.2.10", 5353, True),
        ("public -> 192.0.2.11 tcp/22 (static NAT)", lab.ns("pub"), "192.0.2.11", 22, False),
        ("public -> 192.0.2.10 tcp/8081 (no rule)", lab.ns("pub"), "192.0.2.10", 8081, False),
    ]
    for label, namespace, host, port, udp in checks:
        answer = lab.ask(namespace, host, port, udp=udp, timeout=1.0)
        print(f"  {label}: {answer or 'no answer (dropped)'}")
    lab.stop_servers()


def show_guest_data(lab: Lab) -> None:
    """configs/lab/guest-data.json: web1's user data, two SSH keys and a one-time password,
    read by the guest with curl from its router (data-server), as cloud-init would at boot."""
    stored = json.loads(lab.vr("status", "--json").stdout)["generation"]
    payload = json.loads((examples_dir().parent / "lab" / "guest-data.json").read_text())
    path = lab.dir / "guest-data.json"
    path.write_text(json.dumps({**payload, "generation": stored + 1}))
    print(f"router: {lab.vr('apply', str(path)).stdout.strip()}")
    g1 = lab.ns("g1")

    found = lab.resolve(g1, "data-server", lab.guest_lease("g1")["dns"])  # asked of the router's DNS
    print(f"  guest {g1} resolves data-server -> {', '.join(found) or 'nothing'}")
    server = found[0] if found else "10.1.1.1"

    def curl(url: str, *headers: str) -> str:
        # The name as the router answered it: the lab's guests have no resolver of their own.
        pinned = [a for port in (80, 8080) for a in ("--resolve", f"data-server:{port}:{server}")]
        command = ["ip", "netns", "exec", g1, "curl", "-s", "-m", "3", *pinned, *(a for h in headers for a in ("-H", h)),
                   url]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=15, check=False)
        return done.stdout if done.returncode == 0 else f"no answer (curl exit {done.returncode})"

    user_data = curl("http://data-server/latest/user-data").rstrip("\n").splitlines()
    print(f"  guest {g1}: curl http://data-server/latest/user-data ->")
    print("\n".join(f"      {line}" for line in user_data))
    keys = curl("http://data-server/latest/meta-data/public-keys").splitlines()
    print(f"  guest {g1}: its SSH keys ({len(keys)}): " + "; ".join(f"{k.split()[0]} ...{k.split()[1][-12:]} {k.split()[-1]}"
                                                                   for k in keys if len(k.split()) >= 3))  # fmt: skip
    print(f"  guest {g1}: meta-data/ lists {', '.join(curl('http://data-server/latest/meta-data/').splitlines())}")
    asked = "DomU_Request: send_my_password"
    print(f"  guest {g1}: its password (port 8080, {asked}): {curl('http://data-server:8080/', asked)!r}, "
          f"asked again: {curl('http://data-server:8080/', asked)!r}")
    other = subprocess.run(["ip", "netns", "exec", lab.ns("g2"), "curl", "-s", "-m", "3", "http://10.1.1.1/latest/user-data"],
                           capture_output=True, text=True, timeout=15, check=False)  # fmt: skip
    print(f"  guest {lab.ns('g2')} (db1, tier2) asks tier1's address for user data: "
          f"{'no answer (not its tier)' if other.returncode else repr(other.stdout)}")


def show_lb(lab: Lab) -> None:
    """The lab's load-balancer rule (configs/lab/load-balancer.json) on a third public IP:
    HTTP servers in both guests, a public client served by both in turn."""
    lab.serve(lab.ns("g1"), "web1", 8000, http=True)
    lab.serve(lab.ns("g2"), "db1", 8000, http=True)
    stored = json.loads(lab.vr("status", "--json").stdout)["generation"]
    lb = json.loads((examples_dir().parent / "lab" / "load-balancer.json").read_text())["load_balancer"]
    nat = json.loads((examples_dir() / "router.json").read_text())["nat"]
    nat["public_ips"].append({"ip": lb["rules"][0]["public_ip"]})
    payload = lab.dir / "load-balancer.json"
    payload.write_text(json.dumps({"generation": stored + 1, "nat": nat, "load_balancer": lb}))
    print(f"router: {lab.vr('apply', str(payload)).stdout.strip()}")
    lab.wait_lb_up()
    result = lab.fetch(lab.ns("pub"), "192.0.2.12", 80, "--count", "6")
    answers = ", ".join(f"{name} x{count}" for name, count in sorted(result["answers"].items())) or "none"
    print(f"  public -> 192.0.2.12 tcp/80 (load balancer, 6 requests): {answers}; failed {result['failed']}")
    print("\n".join("  " + line for line in lab.vr("status", "--lb").stdout.splitlines()[-3:]))
    lab.stop_servers()


def show_ipv6(lab: Lab) -> None:
    """configs/lab/ipv6.json: tier1 SLAAC (the guest's kernel makes its address from radvd's
    advertisement), tier2 DHCPv6 (dnsmasq hands db1 its address); routed, not NATed."""
    stored = json.loads(lab.vr("status", "--json").stdout)["generation"]
    payload = json.loads((examples_dir().parent / "lab" / "ipv6.json").read_text())
    path = lab.dir / "ipv6.json"
    path.write_text(json.dumps({**payload, "generation": stored + 1}))
    print(f"router: {lab.vr('apply', str(path)).stdout.strip()}")
    address = None
    for _ in range(50):  # bounded: the guest's kernel forms its address at the next advertisement
        if address := lab.global_ipv6("g1"):
            break
        time.sleep(0.1)
    print(f"  guest {lab.ns('g1')} made {address or 'NO ADDRESS'} from radvd's prefix 2001:db8:1:1::/64 (SLAAC)")
    print(f"  guest {lab.ns('g2')} got {lab.dhcp6('g2') or 'NO ADDRESS'} by DHCPv6 from dnsmasq")
    try:
        aaaa = ", ".join(lab.resolve(lab.ns("g1"), "db1.cloud.internal", "2001:db8:1:1::1", rdtype="AAAA"))
    except TimeoutError as error:
        aaaa = f"no answer ({error})"
    print(f"  guest {lab.ns('g1')} resolves db1.cloud.internal AAAA -> {aaaa or 'nothing'}")
    lab.serve(lab.ns("pub"), "public host", 7000)
    answer = lab.ask(lab.ns("g1"), "2001:db8:ffff::1", 7000)
    print(f"  guest g1 -> [2001:db8:ffff::1]:7000 over IPv6 (routed, no NAT): {answer or 'no answer'}")
    lab.stop_servers()


def show_vpn(lab: Lab) -> None:
    """Router B (its own vr) and a site-to-site tunnel from A: guests ping across it."""
    if not (lab.site_b.state_dir / "document.json").exists():
        print(f"router B: {lab.apply_site_b()}")
        print(f"router: {lab.apply_vpn()}")
    row = lab.wait_tunnel()
    print(f"  tunnel s2s-site-b (192.0.2.10 <-> 198.51.100.10): {row['state'] if row else 'NOT UP'}")
    reached = "ok" if lab.ping(lab.ns("g1"), "10.2.1.10", count=3) else "FAILED"
    print(f"  guest {lab.ns('g1')} (10.1.1.10) pings router B's guest 10.2.1.10 through the tunnel: {reached}")
    print("\n".join("  " + line for line in lab.vr("status", "--vpn").stdout.splitlines()[-2:]))
