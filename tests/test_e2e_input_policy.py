"""The router's own addresses, probed the way an attacker on the public segment would: a
host there routes the guest and control ranges to the router and scans every address it
has (nmap), asks its DNS, pings it. Only what the document opens may answer, and nothing
else may even refuse (no RST, no ICMP port unreachable). Guests keep DNS and DHCP on their
own tier's router address; the control interface answers only the control ports."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import EXAMPLES, example_lab, make_ca_and_certificate, write_payload
from tests.test_e2e_vpn import RA_IP, road_warrior_connect
from vr.services.strongswan import vici_session

LAB = EXAMPLES.parent / "lab"
IPV6 = json.loads((LAB / "ipv6.json").read_text())
LB = json.loads((LAB / "load-balancer.json").read_text())["load_balancer"]
VPN = json.loads((LAB / "vpn.json").read_text())["vpn"]
LB_IP = LB["rules"][0]["public_ip"]  # 192.0.2.12
# source NAT + site-to-site gateway, static NAT, load balancer, remote-access gateway (192.0.2.13)
PUBLIC_V4 = ["192.0.2.10", "192.0.2.11", LB_IP, RA_IP]
VPN_GATEWAYS = ["192.0.2.10", RA_IP]
GUEST_V4 = ["10.1.1.1", "10.1.2.1"]
CONTROL = "169.254.0.10"
PUBLIC_V6 = "2001:db8:ffff::10"
GUEST_V6 = ["2001:db8:1:1::1", "2001:db8:1:2::1"]
EVERY_ADDRESS = [*PUBLIC_V4, *GUEST_V4, CONTROL, PUBLIC_V6, *GUEST_V6]
SSH_PORT = 3922  # CloudStack's management SSH on the control address
AGENT_PORT = 8443  # vr's agent (configs/examples/router.json: agent.port)
TCP_SCAN = ("-Pn", "-n", "-sS", "-p-", "--max-retries", "1", "-T5", "--min-rate", "20000")
UDP_PORTS = "53,67,123,161,500,547,4500"


@pytest.fixture(scope="module")
def policy_lab(tmp_path_factory):
    """The example router with IPv6, a load balancer, a site-to-site and a remote-access VPN
    gateway (the lab's road warrior may dial in), an ICMP ingress rule on its source NAT IP;
    servers behind the forwards; a listener on every router address (tcp+udp 3922, bound to
    ::), as a management SSH would be; routes from the public host to the guest ranges (the
    lab has them) and to the control range."""
    with example_lab(vpn=True) as lab:
        nat = json.loads((EXAMPLES / "router.json").read_text())["nat"]
        nat["public_ips"] += [{"ip": LB_IP}, {"ip": RA_IP}]
        ping = {"id": "ping-snat", "public_ip": "192.0.2.10", "protocol": "icmp", "icmp_type": 8}
        lab.ca_file, identity = make_ca_and_certificate(tmp_path_factory.mktemp("ca"), "vpn.lab.example")
        access = {"public_ip": RA_IP, "pool": "10.99.0.0/24", "dns": ["10.1.1.1"], "certificate": identity,
                  "users": [{"username": "alice", "password": "alice-password-1"}]}  # fmt: skip
        payload = {**IPV6, "generation": 2, "nat": nat, "load_balancer": LB, "vpn": {**VPN, "remote_access": access},
                   "ingress_rules": {"upsert": [ping]}}  # fmt: skip
        lab.vr("apply", write_payload(lab.dir, payload, "policy.json"))
        lab.serve(lab.ns("g1"), "web1", 80)
        lab.serve(lab.ns("g2"), "db1", 22)
        for guest, name in (("g1", "web1"), ("g2", "db1")):
            lab.serve(lab.ns(guest), name, 8000, http=True)
        lab.serve(lab.router_ns, "router ssh", SSH_PORT)
        subprocess.run(["ip", "-n", lab.ns("pub"), "route", "add", "169.254.0.0/16", "via", "192.0.2.10"],
                       check=True, timeout=10)  # fmt: skip
        assert lab.wait_lb_up()
        for _ in range(100):  # bounded: g1 forms its SLAAC address at the next advertisement
            if lab.global_ipv6("g1"):
                break
            time.sleep(0.1)
        yield lab


def answering(scan: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The ports that answered at all: anything but silence (filtered, or open|filtered for UDP)."""
    silent = ("not shown: filtered", "not shown: open|filtered")
    return {address: {port: state for port, state in ports.items()
                      if port not in silent and state not in ("filtered", "open|filtered")}
            for address, ports in scan.items()}  # fmt: skip


def test_a_tcp_scan_from_the_public_side_finds_only_what_the_document_opens(policy_lab):
    lab = policy_lab
    scan = lab.scan(lab.ns("pub"), EVERY_ADDRESS, *TCP_SCAN)
    assert sorted(scan) == sorted(EVERY_ADDRESS), scan  # every address was scanned (-Pn)
    assert answering(scan) == {
        "192.0.2.10": {"tcp/8080": "open"},  # the port forward to web1 (its firewall rule opens it)
        "192.0.2.11": {"tcp/22": "open"},  # static NAT to db1, its ingress rule
        LB_IP: {"tcp/80": "open"},  # the load balancer's listener
        **{address: {} for address in [RA_IP, *GUEST_V4, CONTROL, PUBLIC_V6, *GUEST_V6]},
    }


def test_a_udp_scan_from_the_public_side_gets_no_answer_and_no_refusal(policy_lab):
    lab = policy_lab
    scan = lab.scan(lab.ns("pub"), EVERY_ADDRESS, "-Pn", "-n", "-sU", "-p", UDP_PORTS, "--max-retries", "1", "-T5")
    assert sorted(scan) == sorted(EVERY_ADDRESS), scan
    # IKE (500, 4500) is open on the VPN gateways only: charon may answer nmap's IKEv1 probe
    # there ("open") or not ("open|filtered"). Nothing else answers, not even with an ICMP
    # port unreachable ("closed").
    found = answering(scan)
    for gateway in VPN_GATEWAYS:
        assert set(found.pop(gateway).items()) <= {("udp/500", "open"), ("udp/4500", "open")}
    assert found == {address: {} for address in EVERY_ADDRESS if address not in VPN_GATEWAYS}


def dig(lab, server: str, name: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab.ns("pub"), "dig", f"@{server}", name, "+time=1", "+tries=1",
                           *options], capture_output=True, text=True, timeout=20, check=False)  # fmt: skip


@pytest.mark.parametrize("server", [*GUEST_V4, CONTROL, "192.0.2.10", PUBLIC_V6, *GUEST_V6])
def test_the_router_is_no_resolver_for_the_public_side(policy_lab, server):
    lab = policy_lab
    for name, options in (("db1.cloud.internal", ()), ("example.org", ()), ("db1.cloud.internal", ("+tcp",))):
        answer = dig(lab, server, name, *options)
        assert answer.returncode == 9, (server, name, answer.stdout)  # 9: no reply from the server


def test_the_router_answers_pings_only_where_an_ingress_rule_opens_icmp(policy_lab):
    lab, pub = policy_lab, policy_lab.ns("pub")
    assert lab.ping(pub, "192.0.2.10")  # ingress rule ping-snat: echo to the router's own public IP
    for address in [*GUEST_V4, CONTROL, PUBLIC_V6, *GUEST_V6]:
        assert not lab.ping(pub, address, count=1), address


def test_guests_keep_dns_and_dhcp_on_their_own_tier_only(policy_lab):
    lab = policy_lab
    g1 = lab.ns("g1")
    assert lab.resolve(g1, "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
    assert lab.resolve(g1, "db1.cloud.internal", "2001:db8:1:1::1", rdtype="AAAA") == ["2001:db8:1:2::10"]
    for other_tier in ("10.1.2.1", "2001:db8:1:2::1"):  # tier2's router address, reached from tier1
        with pytest.raises(TimeoutError):
            lab.resolve(g1, "db1.cloud.internal", other_tier, timeout=1.0)
    with pytest.raises(TimeoutError):
        lab.resolve(g1, "db1.cloud.internal", "192.0.2.10", timeout=1.0)  # nor the public IP
    said = lab.renew_unicast("g1")
    assert "sending renew to server 10.1.1.1" in said, said  # unicast, to the tier's router address
    assert said[-1] == "lease of 10.1.1.10 obtained from 10.1.1.1, lease time 3600", said


def test_the_control_interface_answers_only_the_control_ports(policy_lab):
    lab = policy_lab
    scan = lab.scan(lab.ns("mgmt"), [CONTROL], *TCP_SCAN)
    assert answering(scan) == {CONTROL: {f"tcp/{SSH_PORT}": "open", f"tcp/{AGENT_PORT}": "open"}}
    assert lab.ask(lab.ns("mgmt"), CONTROL, SSH_PORT) == "router ssh sees 169.254.0.1"
    assert lab.ask(lab.ns("pub"), CONTROL, SSH_PORT, timeout=1) is None  # not from the public side
    assert lab.ask(lab.ns("g1"), "10.1.1.1", SSH_PORT, timeout=1) is None  # nor from a guest


def test_a_remote_access_user_gets_dns_through_the_tunnel_only(policy_lab):
    """The router hands road warriors its tier's DNS (remote_access.dns): asked through the
    tunnel it answers; asked by the same host from outside the tunnel, it does not."""
    lab = policy_lab
    rw = lab.ns("rw")
    with pytest.raises(TimeoutError):  # the road warrior routes 10.1.0.0/16 through the public side
        lab.resolve(rw, "db1.cloud.internal", "10.1.1.1", timeout=1.0)
    client = lab.start_road_warrior()
    try:
        with vici_session(client, wait_s=5) as session:
            assert road_warrior_connect(session, "alice", "alice-password-1", lab.ca_file) == ["10.99.0.1"]
        assert lab.resolve(rw, "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
    finally:
        lab.stop_road_warrior()


def _in(lab, namespace: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", namespace, *cmd], capture_output=True, text=True, timeout=30,
                          check=check)  # fmt: skip


def dropped(lab, comment: str) -> int:
    """Packets counted by the router's rule with this comment (vr status --firewall)."""
    rules = json.loads(lab.vr("status", "--json", "--firewall", check=False).stdout)["firewall"]
    return sum(r["packets"] for r in rules if r["rule"] == comment)


def test_a_forged_source_gets_nowhere_from_a_guest_or_the_public_side(policy_lab):
    """g1 using db1's address (a tier2 address on tier1), the public host using a guest's: the
    router routes neither (reverse path), while the same hosts with their own addresses pass."""
    lab = policy_lab
    # g1's forgery meets anti-spoofing first (not its DHCP entry's address), the public host's
    # the reverse path check: each counted by its rule.
    def forgeries() -> int:
        return dropped(lab, "spoofed source dropped") + dropped(lab, "anti-spoofing: not a VM's address and MAC")

    before, public_before = forgeries(), dropped(lab, "spoofed source dropped")
    forged = [(lab.ns("g1"), "10.1.2.77", "192.0.2.1"), (lab.ns("pub"), "10.1.1.99", "192.0.2.11")]
    try:
        for namespace, source, _ in forged:
            _in(lab, namespace, "ip", "addr", "add", f"{source}/32", "dev", "eth0", check=True)
        for namespace, source, target in forged:
            assert _in(lab, namespace, "ping", "-c", "2", "-W", "1", "-I", source, target).returncode != 0
    finally:
        for namespace, source, _ in forged:
            _in(lab, namespace, "ip", "addr", "del", f"{source}/32", "dev", "eth0")
    assert forgeries() >= before + 4
    assert dropped(lab, "spoofed source dropped") >= public_before + 2
    assert lab.ping(lab.ns("g1"), "192.0.2.1") and lab.ping(lab.ns("pub"), "192.0.2.10")


def test_the_control_network_is_never_routed(policy_lab):
    """The management host reaches the router's own control ports, never a guest or the public side."""
    lab = policy_lab
    mgmt = lab.ns("mgmt")
    before = dropped(lab, "control: never routed")
    _in(lab, mgmt, "ip", "route", "add", "10.1.0.0/16", "via", CONTROL)
    _in(lab, mgmt, "ip", "route", "add", "192.0.2.0/24", "via", CONTROL)
    try:
        assert lab.ask(mgmt, "10.1.1.10", 8000) is None
        assert not lab.ping(mgmt, "192.0.2.1")
    finally:
        _in(lab, mgmt, "ip", "route", "del", "10.1.0.0/16")
        _in(lab, mgmt, "ip", "route", "del", "192.0.2.0/24")
    assert dropped(lab, "control: never routed") > before
    assert lab.ask(mgmt, CONTROL, SSH_PORT) is not None  # its own port still answers


def test_dns_tells_a_guest_neither_its_version_nor_its_upstream(policy_lab):
    lab = policy_lab
    for name in ("version.bind", "servers.bind"):
        answer = _in(lab, lab.ns("g1"), "dig", "+short", "+time=2", "+tries=1", "@10.1.1.1", name, "CH", "TXT").stdout
        assert "dnsmasq" not in answer and "192.0.2.1" not in answer, (name, answer)
    assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
