"""IPv6 end to end: radvd and dnsmasq in the router namespace, guests with the kernel's own
SLAAC and a real `dhclient -6`, a public host, the IPv6 firewall. configs/lab/ipv6.json:
tier1 SLAAC, tier2 DHCPv6 (db1 gets 2001:db8:1:2::10), routed, no NAT."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import EXAMPLES, example_lab, write_payload

IPV6 = json.loads((EXAMPLES.parent / "lab" / "ipv6.json").read_text())
PUBLIC6 = "2001:db8:ffff::1"


@pytest.fixture(scope="module")
def v6lab():
    with example_lab(guests=("g1",)) as lab:
        lab.vr("apply", str(write_payload(lab.dir, {**IPV6, "generation": 2}, "ipv6.json")))
        yield lab


def apply_ipv6(lab, tmp_path, ipv6: dict) -> str:
    generation = json.loads(lab.vr("status", "--json").stdout)["generation"] + 1
    return lab.vr("apply", write_payload(tmp_path, {"generation": generation, "ipv6": ipv6}, "v6.json")).stdout


def in_ns(lab, guest: str, *command: str, timeout: float = 15) -> str:
    result = subprocess.run(["ip", "netns", "exec", lab.ns(guest), *command], capture_output=True, text=True,
                            timeout=timeout, check=False)  # fmt: skip
    return result.stdout + result.stderr


def slaac_address(lab, guest: str = "g1", tries: int = 50) -> str | None:
    """Bounded wait for the guest's kernel to form its SLAAC address from an advertisement."""
    for _ in range(tries):
        address = lab.global_ipv6(guest)
        if address:
            return address
        time.sleep(0.1)
    return None


def test_a_slaac_guest_gets_its_prefix_dns_mtu_and_default_route(v6lab):
    lab = v6lab
    advert = in_ns(lab, "g1", "rdisc6", "-1", "-w", "3000", "eth0")
    assert re.search(r"Prefix\s+: 2001:db8:1:1::/64", advert), advert
    assert re.search(r"Autonomous address conf.:\s+Yes", advert)
    assert re.search(r"Recursive DNS server\s+: 2001:db8:1:1::1", advert)
    assert re.search(r"DNS search list\s+: cloud.internal", advert)
    assert re.search(r"MTU\s+:\s+1450 bytes", advert)
    address = slaac_address(lab)
    assert address and address.startswith("2001:db8:1:1:")
    assert re.search(r"default via fe80::\S+ dev eth0 proto ra", in_ns(lab, "g1", "ip", "-6", "route"))


def test_a_stateful_guest_gets_its_configured_address_and_names_resolve(v6lab):
    lab = v6lab
    advert = in_ns(lab, "g2", "rdisc6", "-1", "-w", "3000", "eth0")
    assert re.search(r"Stateful address conf.\s+:\s+Yes", advert), advert
    assert re.search(r"Autonomous address conf.:\s+No", advert)
    assert lab.dhcp6("g2") == "2001:db8:1:2::10"
    assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "2001:db8:1:1::1", rdtype="AAAA") == ["2001:db8:1:2::10"]
    assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "2001:db8:1:1::1") == ["10.1.2.10"]
    # IPv6 came on top of IPv4: the guest's IPv4 lease is still dnsmasq's.
    assert "10.1.1.10" in (lab.settings.state_dir / "dnsmasq.leases").read_text()


def test_guests_reach_the_public_side_by_their_own_address(v6lab):
    lab = v6lab
    address = slaac_address(lab)
    lab.serve(lab.ns("pub"), "public host", 7000)
    try:
        assert lab.ask(lab.ns("g1"), PUBLIC6, 7000) == f"public host sees {address}"  # routed, not NATed
        assert lab.ask(lab.ns("g1"), "192.0.2.1", 7000) == "public host sees 192.0.2.10"  # IPv4 still NATed
    finally:
        lab.stop_servers()


def test_an_ipv6_address_that_is_not_the_vms_own_is_dropped_and_counted(v6lab):
    """Anti-spoofing on a DHCPv6 tier: db1 (g2) sends from its entry's address, not another of the prefix."""
    lab = v6lab
    assert lab.dhcp6("g2") == "2001:db8:1:2::10"
    forged = "2001:db8:1:2::99"
    subprocess.run(["ip", "-n", lab.ns("g2"), "addr", "add", f"{forged}/64", "dev", "eth0", "nodad"], check=True,
                   timeout=10)  # fmt: skip
    lab.serve(lab.ns("pub"), "public host", 7000)

    def dropped() -> int:
        rules = json.loads(lab.vr("status", "--json", "--firewall", check=False).stdout)["firewall"]
        return sum(r["packets"] for r in rules if r["rule"] == "anti-spoofing: not a VM's IPv6 address and MAC")

    try:
        before = dropped()
        def ask_from(source: str) -> str:
            return in_ns(lab, "g2", sys.executable, "-m", "vr.lab.server", "ask", PUBLIC6, "7000", "--timeout", "2",
                         "--source", source).strip()  # fmt: skip

        assert "public host sees" not in ask_from(forged)
        assert dropped() > before
        assert ask_from("2001:db8:1:2::10") == "public host sees 2001:db8:1:2::10"  # its own still passes
    finally:
        lab.stop_servers()
        subprocess.run(["ip", "-n", lab.ns("g2"), "addr", "del", f"{forged}/64", "dev", "eth0"], check=False, timeout=10)


def test_the_public_side_reaches_a_guest_only_through_an_ingress_rule(v6lab, tmp_path):
    lab = v6lab
    address = slaac_address(lab)
    lab.serve(lab.ns("g1"), "web1", 8080)
    try:
        closed = {**IPV6["ipv6"], "firewall": {"ingress": []}}
        apply_ipv6(lab, tmp_path, closed)
        assert lab.ask(lab.ns("pub"), address, 8080, timeout=1.0) is None
        apply_ipv6(lab, tmp_path, IPV6["ipv6"])  # tcp 8080 to tier1's /64
        assert lab.ask(lab.ns("pub"), address, 8080) == f"web1 sees {PUBLIC6}"
        assert lab.ask(lab.ns("pub"), address, 8081, timeout=1.0) is None
    finally:
        lab.stop_servers()


# The guest sends a datagram out (conntrack learns the flow); the public host answers with
# an ICMPv6 packet-too-big about it, as a router with a smaller MTU on the path would.
GUEST_LISTENS = """
import socket, sys
raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
raw.settimeout(5)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.bind(("::", 40000))
udp.sendto(b"x" * 64, (sys.argv[1], 7001))
print("sent", flush=True)
while True:
    data = raw.recv(2048)
    if data[0] == 2:
        print("packet-too-big mtu", int.from_bytes(data[4:8], "big"), flush=True)
        break
"""
PUBLIC_SENDS = """
import socket, struct, sys
guest, public = socket.inet_pton(socket.AF_INET6, sys.argv[1]), socket.inet_pton(socket.AF_INET6, sys.argv[2])
invoking = struct.pack("!IHBB", 6 << 28, 8 + 64, 17, 64) + guest + public + struct.pack("!HHHH", 40000, 7001, 72, 0)
raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
raw.sendto(struct.pack("!BBHI", 2, 0, 0, 1280) + invoking + b"x" * 64, (sys.argv[1], 0))
"""


def test_packet_too_big_reaches_a_guest_whose_inbound_is_denied(v6lab, tmp_path):
    lab = v6lab
    address = slaac_address(lab)
    apply_ipv6(lab, tmp_path, {**IPV6["ipv6"], "firewall": {"ingress": []}})
    listener = subprocess.Popen(["ip", "netns", "exec", lab.ns("g1"), sys.executable, "-c", GUEST_LISTENS, PUBLIC6],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert listener.stdout.readline().strip() == "sent"
        in_ns(lab, "pub", sys.executable, "-c", PUBLIC_SENDS, address, PUBLIC6)
        out, err = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert out.strip() == "packet-too-big mtu 1280", err
    assert lab.ask(lab.ns("pub"), address, 8080, timeout=1.0) is None  # and the rest stays out


def test_status_shows_each_ipv6_tier(v6lab):
    report = json.loads(v6lab.vr("status", "--json").stdout)
    assert report["ipv6"] == [
        {"tier": "tier1", "prefix": "2001:db8:1:1::/64", "mode": "slaac"},
        {"tier": "tier2", "prefix": "2001:db8:1:2::/64", "mode": "dhcpv6"},
    ]
    assert "tier1       2001:db8:1:1::/64       slaac" in v6lab.vr("status").stdout


def test_a_removed_prefix_is_advertised_with_zero_lifetimes(v6lab, tmp_path):
    lab = v6lab
    address = slaac_address(lab)
    apply_ipv6(lab, tmp_path, {**IPV6["ipv6"], "tiers": IPV6["ipv6"]["tiers"][1:], "firewall": {}})
    advert = in_ns(lab, "g1", "rdisc6", "-1", "-w", "3000", "eth0")
    assert re.search(r"Prefix\s+: 2001:db8:1:1::/64", advert), advert
    assert re.search(r"Valid time\s+:\s+0 \(", advert) and re.search(r"Pref. time\s+:\s+0 \(", advert)
    assert re.search(r"Router lifetime\s+:\s+0 \(", advert)  # no longer this tier's IPv6 router
    shown = ""
    for _ in range(50):  # the guest deprecates its address at that advertisement
        shown = in_ns(lab, "g1", "ip", "-6", "addr", "show", "dev", "eth0")
        if re.search(rf"{address}/64 .*deprecated", shown):
            break
        time.sleep(0.1)
    assert re.search(rf"{address}/64 .*deprecated", shown), shown


def test_a_vpc_tiers_acl_decides_for_ipv6_first_match_by_number(tmp_path):
    with example_lab(guests=("g1",)) as lab:
        acl = [{"number": 10, "action": "deny", "protocol": "tcp", "ports": 22, "cidrs": ["2001:db8:1:1::/64"]},
               {"number": 20, "action": "deny", "protocol": "icmpv6", "icmp_type": 128},
               {"number": 30, "action": "allow", "protocol": "all"}]  # anywhere: both families  # fmt: skip
        payload = {**IPV6, "generation": 2, "router": {"name": "r-101-vm", "type": "vpc"},
                   "network_acls": [{"tier": "tier2", "ingress": acl}]}  # fmt: skip
        lab.vr("apply", write_payload(tmp_path, payload))
        assert lab.dhcp6("g2") == "2001:db8:1:2::10"
        lab.dhcp("g2")
        own = slaac_address(lab)
        lab.serve(lab.ns("g2"), "db1", 22)
        lab.serve(lab.ns("g2"), "db1", 8000)
        try:
            assert lab.ask(lab.ns("g1"), "2001:db8:1:2::10", 22, timeout=1) is None  # entry 10, IPv6 only
            assert lab.ask(lab.ns("g1"), "2001:db8:1:2::10", 8000) == f"db1 sees {own}"  # entry 30
            assert not lab.ping(lab.ns("g1"), "2001:db8:1:2::10")  # entry 20: ICMPv6 echo requests
            assert lab.ask(lab.ns("g1"), "10.1.2.10", 22) == "db1 sees 10.1.1.10"  # IPv4: entries 10, 20 name none
            assert lab.ping(lab.ns("g1"), "10.1.2.10")

            acl.append({"number": 5, "action": "allow", "protocol": "tcp", "ports": 22})  # now first, both families
            lab.vr("apply", write_payload(tmp_path, {"generation": 3, "network_acls": payload["network_acls"]}))
            assert lab.ask(lab.ns("g1"), "2001:db8:1:2::10", 22) == f"db1 sees {own}"
        finally:
            lab.stop_servers()
