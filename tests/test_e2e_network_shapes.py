"""The network shapes of issue 19 with real traffic in the lab: a shared network's tier (the
router serves DHCP and DNS, the gateway is another machine) with two subnets on one link."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from tests.conftest import EXAMPLES, example_lab, write_payload

GATEWAY_MAC, SHARED_MAC, ALIAS_MAC = "02:00:00:00:02:fe", "02:00:00:00:02:20", "02:00:00:00:09:10"
BEHIND_GATEWAY = "198.51.100.1"  # only the shared network's gateway has it


def shared_network(generation: int) -> dict:
    """The example router with tier2 as a shared network: its subnet and a second one
    (ipaliases) on the same link, each with its own gateway and the tier's own domain."""
    doc = json.loads((EXAMPLES / "router.json").read_text())
    tier2 = next(i for i in doc["interfaces"] if i["id"] == "tier2")
    tier2 |= {"addresses": ["10.1.2.1/24", "10.9.0.2/24"], "gateways": ["10.1.2.254", "10.9.0.1"]}
    doc["nat"]["source_nat"] = [s for s in doc["nat"]["source_nat"] if s["tier"] != "tier2"]
    doc["nat"]["static_nat"] = []  # its private IP was on tier2
    doc["firewall"]["egress"] = [e for e in doc["firewall"]["egress"] if e["tier"] != "tier2"]
    doc["dhcp"]["tiers"][1] |= {"domain": "shared.example"}
    doc["dhcp"]["entries"] += [
        {"tier": "tier2", "mac": SHARED_MAC, "ip": "10.1.2.20", "hostname": "shared-vm"},
        {"tier": "tier2", "mac": ALIAS_MAC, "ip": "10.9.0.10", "hostname": "alias-vm", "lease_time": "infinite"},
    ]
    return {**doc, "generation": generation}


def ip(lab, guest: str, *args: str) -> None:
    subprocess.run(["ip", "-n", lab.ns(guest), *args], check=True, capture_output=True, timeout=10)


def shared_drops(lab) -> int:
    """Packets the router's forward chain dropped because their tier is a shared network's."""
    listed = subprocess.run(["ip", "netns", "exec", lab.router_ns, "nft", "list", "chain", "inet", "vr", "forward"],
                            capture_output=True, text=True, check=True, timeout=10).stdout  # fmt: skip
    return sum(int(n) for n in re.findall(r'iifname @shared_ifs counter packets (\d+)', listed))


def test_a_shared_tier_leases_each_subnets_gateway_and_the_router_routes_none_of_it(tmp_path):
    with example_lab(guests=("g1",)) as lab:
        lab.add_guests("g2", {"sgw": GATEWAY_MAC, "sg": SHARED_MAC, "sa": ALIAS_MAC})
        for address in ("10.1.2.254/24", "10.9.0.1/24"):
            ip(lab, "sgw", "addr", "add", address, "dev", "eth0")
        ip(lab, "sgw", "addr", "add", f"{BEHIND_GATEWAY}/32", "dev", "lo")
        lab.vr("apply", write_payload(tmp_path, shared_network(2)))

        shared = lab.dhcp("sg")
        assert (shared["address"], shared["routers"], shared["dns"], shared["domain"]) == \
            ("10.1.2.20", "10.1.2.254", "10.1.2.1", "shared.example")  # fmt: skip
        alias = lab.dhcp("sa")  # the second subnet on the same link: its own range, gateway and DNS address
        assert (alias["address"], alias["routers"], alias["dns"], alias["domain"]) == \
            ("10.9.0.10", "10.9.0.1", "10.9.0.2", "shared.example")  # fmt: skip
        assert "option dhcp-lease-time 4294967295;" in (lab.dir / "sa.leases").read_text()  # infinite
        assert lab.guest_lease("g1")["routers"] == "10.1.1.1"  # a routed tier keeps the router

        # The gateway is reached directly, and what is behind it through it.
        assert lab.ping(lab.ns("sg"), BEHIND_GATEWAY) and lab.ping(lab.ns("sa"), BEHIND_GATEWAY)
        # Names in the tier's own domain, from each subnet's router address; the others' in theirs.
        assert lab.resolve(lab.ns("sa"), "alias-vm.shared.example", "10.9.0.2") == ["10.9.0.10"]
        assert lab.resolve(lab.ns("sg"), "shared-vm.shared.example", "10.1.2.1") == ["10.1.2.20"]
        assert lab.resolve(lab.ns("sg"), "web1.cloud.internal", "10.1.2.1") == ["10.1.1.10"]
        assert lab.resolve(lab.ns("sg"), "alias-vm.cloud.internal", "10.1.2.1") == []

        # The router is not the tier's gateway: sent to it anyway, nothing is routed.
        before = shared_drops(lab)
        ip(lab, "sg", "route", "add", "10.1.1.0/24", "via", "10.1.2.1")
        assert not lab.ping(lab.ns("sg"), "10.1.1.10", count=2)
        assert shared_drops(lab) >= before + 2
        assert lab.ping(lab.ns("g1"), "192.0.2.1")  # the routed tier still is


ASK = r"""
import sys, dns.flags, dns.message, dns.query, dns.rcode
query = dns.message.make_query(sys.argv[1], "A")
try:
    answer = (dns.query.tcp if sys.argv[3] == "tcp" else dns.query.udp)(query, sys.argv[2], timeout=1.5)
except Exception as error:
    print("no answer", type(error).__name__)
else:
    print(dns.rcode.to_text(answer.rcode()), "aa" if answer.flags & dns.flags.AA else "-",
          " ".join(str(x) for s in answer.answer for x in s))
"""


def ask_dns(lab, namespace: str, name: str, server: str, transport: str = "udp") -> str:
    done = subprocess.run(["ip", "netns", "exec", lab.ns(namespace), sys.executable, "-c", ASK, name, server, transport],
                          capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    return done.stdout.strip()


def test_public_dns_answers_only_the_guests_names_and_only_when_asked(tmp_path):
    with example_lab(guests=("g1",)) as lab:
        assert ask_dns(lab, "pub", "web1.cloud.internal", "192.0.2.10").startswith("no answer")  # dropped
        doc = json.loads((EXAMPLES / "router.json").read_text())
        lab.vr("apply", write_payload(tmp_path, {"generation": 2, "dns": {**doc["dns"], "public": True}}))
        for transport in ("udp", "tcp"):
            assert ask_dns(lab, "pub", "web1.cloud.internal", "192.0.2.10", transport) == "NOERROR aa 10.1.1.10"
            assert ask_dns(lab, "pub", "example.com", "192.0.2.10", transport) == "REFUSED -"  # not a resolver
        assert ask_dns(lab, "pub", "web1.cloud.internal", "192.0.2.11").startswith("no answer")  # another public IP
        assert ask_dns(lab, "g1", "web1.cloud.internal", "10.1.1.1").endswith(" 10.1.1.10")  # guests as before,
        assert ask_dns(lab, "g1", "example.com", "10.1.1.1") != "REFUSED -"  # recursion included (sent upstream)
        lab.vr("apply", write_payload(tmp_path, {"generation": 3, "dns": doc["dns"]}))
        assert ask_dns(lab, "pub", "web1.cloud.internal", "192.0.2.10").startswith("no answer")


WEB1_MAC, WEB2_MAC = "02:00:00:00:01:10", "02:00:00:00:01:11"  # configs/examples/router.json's web1; web2 added


def test_guests_reach_forwards_static_nat_and_load_balancers_by_their_public_ips(tmp_path):
    """Hairpin NAT: from the same tier and from another, to a port forward, a static NAT and
    a load-balancer rule of their own router; replies come back through the router."""
    with example_lab(guests=("g2",)) as lab:
        lab.add_guests("g1", {"h1": WEB1_MAC, "h2": WEB2_MAC})  # web1 and web2, both on tier1
        doc = json.loads((EXAMPLES / "router.json").read_text())
        doc["dhcp"]["entries"].append({"tier": "tier1", "mac": WEB2_MAC, "ip": "10.1.1.11", "hostname": "web2"})
        doc["nat"]["public_ips"].append({"ip": "192.0.2.12"})
        doc["load_balancer"] = {"rules": [{"id": "web", "public_ip": "192.0.2.12", "public_port": 80,
                                           "private_port": 8000, "members": [{"ip": "10.1.1.10"}]}]}  # fmt: skip
        lab.vr("apply", write_payload(tmp_path, {**doc, "generation": 2}))
        assert lab.dhcp("h1")["address"] == "10.1.1.10" and lab.dhcp("h2")["address"] == "10.1.1.11"
        lab.serve(lab.ns("h1"), "web1", 80)
        lab.serve(lab.ns("h1"), "web1", 8000, http=True)
        lab.serve(lab.ns("g2"), "db1", 22)

        # A port forward, from the same tier (web2) and from another (db1): the router's
        # address on the member's tier is the source, so the answer comes back through it.
        assert lab.ask(lab.ns("h2"), "192.0.2.10", 8080) == "web1 sees 10.1.1.1"
        assert lab.ask(lab.ns("g2"), "192.0.2.10", 8080) == "web1 sees 10.1.1.1"
        assert lab.ask(lab.ns("h1"), "192.0.2.10", 8080) == "web1 sees 10.1.1.1"  # a VM to its own forward
        # A static NAT, from the other tier.
        assert lab.ask(lab.ns("h2"), "192.0.2.11", 22) == "db1 sees 10.1.2.1"
        # A load-balancer rule, from both tiers.
        for guest in ("h2", "g2"):
            fetched = lab.fetch(lab.ns(guest), "192.0.2.12", 80, "--count", "2", "--timeout", "3")
            assert fetched["failed"] == 0 and fetched["answers"] == {"web1": 2}, fetched
        # Nothing else of the public IPs opens to guests, and the public side is as before.
        assert lab.ask(lab.ns("h2"), "192.0.2.10", 8081, timeout=1) is None
        assert lab.ask(lab.ns("pub"), "192.0.2.10", 8080) == "web1 sees 192.0.2.1"


UDP_SEND = r"""
import socket, sys
count, size = int(sys.argv[3]), int(sys.argv[4])
answered = 0
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(2)
    for _ in range(count):
        s.sendto(b"x" * size, (sys.argv[1], int(sys.argv[2])))
        try:
            answered += len(s.recv(2048)) > 0
        except TimeoutError:
            pass
print(answered)
"""


def usage(lab) -> dict[tuple[str, str], dict]:
    report = json.loads(lab.vr("status", "--usage", "--json", check=False).stdout)
    return {(row["kind"], row["name"]): row for row in report["usage"]}


def test_usage_counters_count_known_traffic_and_survive_a_replace_and_a_reboot(tmp_path):
    with example_lab(guests=("g1",)) as lab:
        lab.serve(lab.ns("pub"), "public host", 7000)
        before = usage(lab)
        count, size = 5, 1000
        sent = subprocess.run(["ip", "netns", "exec", lab.ns("g1"), sys.executable, "-c", UDP_SEND, "192.0.2.1",
                               "7000", str(count), str(size)], capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        assert sent.stdout.strip() == str(count)
        after = usage(lab)
        answer = len(b"public host sees 192.0.2.10\n")
        request_bytes, answer_bytes = count * (20 + 8 + size), count * (20 + 8 + answer)  # IPv4 + UDP headers

        def moved(key, field):
            return after[key][field] - before[key][field]

        ip, tier, other = ("public_ip", "192.0.2.10"), ("tier", "tier1"), ("public_ip", "192.0.2.11")
        assert (moved(ip, "out_packets"), moved(ip, "out_bytes")) == (count, request_bytes)  # leaving with the SNAT IP
        assert (moved(ip, "in_packets"), moved(ip, "in_bytes")) == (count, answer_bytes)
        assert (moved(tier, "out_packets"), moved(tier, "out_bytes")) == (count, request_bytes)
        assert (moved(tier, "in_packets"), moved(tier, "in_bytes")) == (count, answer_bytes)
        assert moved(other, "out_bytes") == 0 and moved(("tier", "tier2"), "in_bytes") == 0

        # A whole-table replace (a chain changes) keeps them, in the same transaction.
        doc = json.loads((EXAMPLES / "router.json").read_text())
        doc["firewall"]["egress"][0]["default"] = "deny"
        lab.vr("apply", write_payload(tmp_path, {"generation": 2, "firewall": doc["firewall"]}))
        assert usage(lab)[ip] == after[ip] and usage(lab)[tier] == after[tier]

        # vr stop, then a reboot's empty kernel (the table gone), then vr start.
        lab.vr("stop")
        subprocess.run(["ip", "netns", "exec", lab.router_ns, "nft", "delete", "table", "inet", "vr"], check=True)
        lab.vr("start")
        assert usage(lab)[ip] == after[ip] and usage(lab)[tier] == after[tier]
        line = next(line for line in lab.vr("status", "--usage", check=False).stdout.splitlines()
                    if line.startswith("public_ip") and " 192.0.2.10 " in line)  # fmt: skip
        assert line.split()[2:] == [str(after[ip][f]) for f in ("in_bytes", "in_packets", "out_bytes", "out_packets")]


def test_an_added_public_ip_is_announced_to_the_link(tmp_path):
    """A gratuitous ARP for an added IPv4 address, an unsolicited neighbour advertisement for
    an added IPv6 one, seen by tcpdump on the public side (upstream switches and neighbours
    learn the router's MAC at once)."""
    with example_lab(guests=()) as lab:
        capture = subprocess.Popen(["ip", "netns", "exec", lab.ns("pub"), "timeout", "20", "tcpdump", "-i", "eth0",
                                    "-n", "-l", "-e", "arp or icmp6"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            while "listening" not in (line := capture.stderr.readline()):  # tcpdump is capturing from here
                assert line, "tcpdump ended before it listened"
            doc = json.loads((EXAMPLES / "router.json").read_text())
            doc["nat"]["public_ips"].append({"ip": "192.0.2.13"})
            public = next(i for i in doc["interfaces"] if i["role"] == "public")
            public["addresses"].append("2001:db8:ffff::13/64")
            lab.vr("apply", write_payload(tmp_path, {**doc, "generation": 2}))
            seen, deadline = [], time.monotonic() + 10
            while time.monotonic() < deadline and not (
                any("Request who-has 192.0.2.13 tell 192.0.2.13" in line for line in seen)
                and any("neighbor advertisement, tgt is 2001:db8:ffff::13" in line for line in seen)
            ):
                seen.append(capture.stdout.readline())
        finally:
            capture.kill()
            capture.wait()
        assert any("Request who-has 192.0.2.13 tell 192.0.2.13" in line for line in seen), seen
        assert any("Reply 192.0.2.13 is-at" in line for line in seen), seen
        assert any("neighbor advertisement, tgt is 2001:db8:ffff::13" in line for line in seen), seen
        assert not any("192.0.2.10 tell 192.0.2.10" in line for line in seen)  # only what was added


def test_a_vpc_reaches_a_private_network_through_its_private_gateway_under_its_acl(tmp_path):
    with example_lab() as lab:
        lab.add_peer("pg", "eth4", "172.16.0.1/24")  # the private network's router
        ip(lab, "pg", "addr", "add", "198.51.100.1/32", "dev", "lo")  # a network behind it
        ip(lab, "pg", "route", "add", "10.1.0.0/16", "via", "172.16.0.10")
        lab.serve(lab.ns("pg"), "private", 7000)
        doc = json.loads((EXAMPLES / "router.json").read_text())
        doc["router"]["type"] = "vpc"
        doc["interfaces"].append({"id": "pgw", "role": "private_gateway", "name": "eth4", "addresses": ["172.16.0.10/24"]})
        doc["routes"].append({"destination": "198.51.100.0/24", "gateway": "172.16.0.1"})
        deny_tier2 = {"number": 10, "action": "deny", "protocol": "tcp", "ports": 7000, "cidrs": ["10.1.2.0/24"]}
        doc["network_acls"] = [{"tier": "pgw", "ingress": [deny_tier2], "ingress_default": "allow"}]
        lab.vr("apply", write_payload(tmp_path, {**doc, "generation": 2}))

        routes = subprocess.run(["ip", "-n", lab.router_ns, "route", "show", "198.51.100.0/24"], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        assert "via 172.16.0.1 dev eth4" in routes
        assert lab.ask(lab.ns("g1"), "198.51.100.1", 7000) == "private sees 10.1.1.10"  # routed, no NAT
        assert lab.ask(lab.ns("g2"), "198.51.100.1", 7000, timeout=1) is None  # the gateway's ACL, entry 10
        assert lab.ask(lab.ns("pub"), "198.51.100.1", 7000, timeout=1) is None  # the public side never gets there
        assert lab.ask(lab.ns("pg"), "172.16.0.10", 53, timeout=1) is None  # the router answers nothing there

        # Source NAT on the gateway: the private network no longer needs a route back.
        ip(lab, "pg", "route", "del", "10.1.0.0/16")
        doc["interfaces"][-1]["source_nat"] = True
        doc["routes"].pop()
        doc["routes"].append({"destination": "198.51.100.0/25", "gateway": "172.16.0.1"})
        lab.vr("apply", write_payload(tmp_path, {**doc, "generation": 3}))
        assert lab.ask(lab.ns("g1"), "198.51.100.1", 7000) == "private sees 172.16.0.10"
        routes = subprocess.run(["ip", "-n", lab.router_ns, "route", "show"], capture_output=True, text=True,
                                check=True).stdout  # fmt: skip
        assert "198.51.100.0/25 via 172.16.0.1" in routes and "198.51.100.0/24" not in routes  # replaced


def test_two_public_networks_answer_each_on_its_own_side_and_replies_leave_by_it(tmp_path):
    """A second public network (another VLAN's public IPs) on eth4: its port forward answers
    a client behind its own gateway, the reply leaves by eth4 (the main table's default
    route is eth1's); a tier whose source NAT IP is on eth4 leaves by eth4."""
    with example_lab() as lab:
        lab.add_peer("pub2", "eth4", "198.51.100.1/24")  # the second public network's gateway
        for namespace, remote in (("pub2", "203.0.113.5"), ("pub", "203.0.113.6")):
            ip(lab, namespace, "addr", "add", f"{remote}/32", "dev", "lo")  # a client beyond each gateway
        lab.serve(lab.ns("g1"), "web1", 80)
        lab.serve(lab.ns("pub2"), "far host", 7000)
        doc = json.loads((EXAMPLES / "router.json").read_text())
        doc["interfaces"].append({"id": "public2", "role": "public", "name": "eth4", "addresses": ["198.51.100.10/24"],
                                  "gateways": ["198.51.100.1"]})  # fmt: skip
        doc["nat"]["public_ips"] += [{"ip": "198.51.100.11"}, {"ip": "198.51.100.12"}]
        doc["nat"]["port_forwarding"].append({"id": "web-2", "public_ip": "198.51.100.11", "protocol": "tcp",
                                              "public_ports": 8080, "private_ip": "10.1.1.10", "private_ports": 80})  # fmt: skip
        doc["firewall"]["ingress"].append({"id": "web-2", "public_ip": "198.51.100.11", "protocol": "tcp", "ports": 8080})
        doc["nat"]["source_nat"] = [{"tier": "tier1", "ip": "192.0.2.10"}, {"tier": "tier2", "ip": "198.51.100.12"}]
        doc["nat"]["static_nat"] = []
        lab.vr("apply", write_payload(tmp_path, {**doc, "generation": 2}))

        def ask_from(namespace: str, source: str, address: str, port: int) -> str | None:
            code = ("import socket, sys\ns = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=2, "
                    "source_address=(sys.argv[1], 0))\nprint(s.recv(200).decode().strip())")  # fmt: skip
            done = subprocess.run(["ip", "netns", "exec", lab.ns(namespace), sys.executable, "-c", code, source, address,
                                   str(port)], capture_output=True, text=True, timeout=20, check=False)  # fmt: skip
            return done.stdout.strip() or None

        # Each side's forward, from a client beyond its own gateway: the reply comes back by it.
        assert ask_from("pub2", "203.0.113.5", "198.51.100.11", 8080) == "web1 sees 203.0.113.5"
        assert ask_from("pub", "203.0.113.6", "192.0.2.10", 8080) == "web1 sees 203.0.113.6"
        assert ask_from("pub2", "203.0.113.5", "192.0.2.10", 8080) is None  # not eth4's IP: not its way in
        # A tier whose source NAT IP is the second network's leaves by it; the other by eth1.
        lab.dhcp("g2")
        assert lab.ask(lab.ns("g2"), "203.0.113.5", 7000) == "far host sees 198.51.100.12"
        assert lab.ask(lab.ns("g1"), "203.0.113.5", 7000, timeout=1) is None  # eth1's gateway has no way there
        rules = subprocess.run(["ip", "-n", lab.router_ns, "rule", "show"], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
        assert "fwmark 0x1 lookup 101" in rules and "from 198.51.100.11 lookup 101" in rules

        # Removed again: its table and rules go with it.
        doc["interfaces"].pop()
        doc["nat"]["public_ips"] = doc["nat"]["public_ips"][:-2]
        doc["nat"]["port_forwarding"].pop()
        doc["firewall"]["ingress"].pop()
        doc["nat"]["source_nat"] = [{"tier": "tier1", "ip": "192.0.2.10"}]
        lab.vr("apply", write_payload(tmp_path, {**doc, "generation": 3}))
        rules = subprocess.run(["ip", "-n", lab.router_ns, "rule", "show"], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
        assert "lookup 101" not in rules and "suppress_prefixlength" not in rules
        table = subprocess.run(["ip", "-n", lab.router_ns, "route", "show", "table", "101"], capture_output=True,
                               text=True, check=False).stdout  # fmt: skip
        assert table.strip() == ""
