"""Firewall and NAT end to end: real kernel, real connections between namespaces."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES, live_files, write_payload


@pytest.fixture
def servers(lab):
    lab.serve(lab.ns("pub"), "public host", 7000)
    lab.serve(lab.ns("pub"), "public smtp", 25)
    lab.serve(lab.ns("g1"), "web1", 80)
    lab.serve(lab.ns("g1"), "web1", 5353)
    lab.serve(lab.ns("g2"), "db1", 22)
    return lab


def ruleset(lab) -> str:
    """The live table without its counters (-s): the router's own background traffic (DHCP,
    neighbour discovery) moves the input chain's, and a replace resets them all."""
    return subprocess.run(
        ["ip", "netns", "exec", lab.router_ns, "nft", "-s", "list", "table", "inet", "vr"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def test_guests_leave_with_their_source_nat_ip(servers):
    lab = servers
    assert lab.ask(lab.ns("g1"), "192.0.2.1", 7000) == "public host sees 192.0.2.10"
    assert lab.ask(lab.ns("g2"), "192.0.2.1", 7000) == "public host sees 192.0.2.11"  # its static NAT IP


def firewall_hits(lab) -> dict[str, int]:
    report = json.loads(lab.vr("status", "--json", "--firewall").stdout)
    return {c["rule"]: c["packets"] for c in report["firewall"]}


def test_public_reaches_guests_only_through_forwards_and_static_nat(servers):
    lab, pub = servers, servers.ns("pub")
    assert firewall_hits(lab)["ingress allowed: tcp"] == 0
    assert lab.ask(pub, "192.0.2.10", 8080) == "web1 sees 192.0.2.1"
    assert firewall_hits(lab)["ingress allowed: tcp"] == 1  # the SYN; the rest is established
    assert lab.ask(pub, "192.0.2.10", 5353, udp=True) == "web1 sees 192.0.2.1"
    assert lab.ask(pub, "192.0.2.11", 22) == "db1 sees 192.0.2.1"
    assert lab.ping(pub, "192.0.2.11")  # icmp echo opened on the static NAT IP
    dropped = firewall_hits(lab)["ingress dropped: no rule"]
    assert lab.ask(pub, "192.0.2.10", 8081, timeout=1) is None  # no forward, no rule
    assert firewall_hits(lab)["ingress dropped: no rule"] > dropped
    assert lab.ask(pub, "192.0.2.10", 80, timeout=1) is None
    assert lab.ask(pub, "10.1.1.10", 80, timeout=1) is None  # no way in but NAT


def test_a_forward_without_its_firewall_rule_is_closed(servers, tmp_path):
    lab = servers
    firewall = json.loads((EXAMPLES / "router.json").read_text())["firewall"]
    firewall["ingress"] = [r for r in firewall["ingress"] if r["id"] != "http"]
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "firewall": firewall}))
    assert lab.ask(lab.ns("pub"), "192.0.2.10", 8080, timeout=1) is None
    assert lab.ask(lab.ns("pub"), "192.0.2.10", 5353, udp=True) == "web1 sees 192.0.2.1"


def test_egress_deny_blocks_only_what_it_names(servers):
    lab = servers
    assert lab.ask(lab.ns("g2"), "192.0.2.1", 25, timeout=1) is None  # tier2 denies tcp/25
    assert lab.ask(lab.ns("g1"), "192.0.2.1", 25) == "public smtp sees 192.0.2.10"


def test_removing_a_forward_keeps_established_connections_only(servers, tmp_path):
    lab = servers
    client_code = (
        "import socket, sys\n"
        "s = socket.create_connection(('192.0.2.10', 8080), timeout=5)\n"
        "print(s.recv(100).decode().strip(), flush=True)\n"
        "for line in sys.stdin:\n"
        "    s.sendall(line.encode()); print(s.recv(100).decode().strip(), flush=True)\n"
    )
    client = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("pub"), sys.executable, "-c", client_code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "web1 sees 192.0.2.1"
        nat = json.loads((EXAMPLES / "router.json").read_text())["nat"]
        nat["port_forwarding"] = [f for f in nat["port_forwarding"] if f["id"] != "web-http"]
        lab.vr("apply", write_payload(tmp_path, {"generation": 2, "nat": nat}))
        assert "8080 : 10.1.1.10" not in ruleset(lab)  # the forward is gone from the map
        client.stdin.write("still there?\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "web1 still here"  # conntrack was not flushed
        assert lab.ask(lab.ns("pub"), "192.0.2.10", 8080, timeout=1) is None  # a new one is refused
    finally:
        client.stdin.close()
        client.wait(timeout=10)


def test_a_refused_payload_leaves_the_ruleset_byte_identical(servers, tmp_path):
    lab = servers
    before = ruleset(lab)
    nat = json.loads((EXAMPLES / "router.json").read_text())["nat"]
    nat["port_forwarding"][0]["public_ip"] = "192.0.2.20"  # reserved: carries no rules
    result = lab.vr("apply", write_payload(tmp_path, {"generation": 2, "nat": nat}), check=False)
    assert result.returncode == 2 and "nat.port_forwarding[0].public_ip" in result.stderr
    assert ruleset(lab) == before
    assert lab.ask(lab.ns("pub"), "192.0.2.10", 8080) == "web1 sees 192.0.2.1"


def test_a_deleted_table_is_restored_by_the_next_start(lab, tmp_path):
    # The monitor would repair it first (test_e2e_monitor): here the start alone must.
    off = {"generation": 2, "monitor": {"services": {"nftables": {"enabled": False}}}}
    lab.vr("apply", write_payload(tmp_path, off))
    subprocess.run(["ip", "netns", "exec", lab.router_ns, "nft", "delete", "table", "inet", "vr"], check=True)
    assert json.loads(lab.vr("status", "--json", check=False).stdout)["healthy"] is False
    lab.vr("start")
    assert "map pf_tcp" in ruleset(lab)


def test_vpc_acl_first_match_by_number(servers, tmp_path):
    lab = servers
    router = {"name": "r-101-vm", "type": "vpc"}
    deny_first = [
        {"number": 20, "action": "allow", "protocol": "tcp", "ports": 22},
        {"number": 10, "action": "deny", "protocol": "tcp", "ports": 22, "cidrs": ["10.1.1.0/24"]},
    ]
    egress = [{"number": 10, "action": "deny", "protocol": "udp", "ports": 7000}]
    acls = [{"tier": "tier2", "ingress": deny_first, "egress": egress}]
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "router": router, "network_acls": acls}))
    assert lab.ask(lab.ns("g1"), "10.1.2.10", 22, timeout=1) is None  # rule 10 denies tier1
    assert lab.ask(lab.ns("pub"), "192.0.2.11", 22) == "db1 sees 192.0.2.1"  # rule 20 allows the rest
    assert lab.ask(lab.ns("g2"), "192.0.2.1", 7000, udp=True, timeout=1) is None  # egress rule 10
    assert lab.ask(lab.ns("g2"), "192.0.2.1", 7000) == "public host sees 192.0.2.11"  # default allow

    deny_first[0]["number"] = 5  # now the allow comes first
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "network_acls": acls}))
    assert lab.ask(lab.ns("g1"), "10.1.2.10", 22) == "db1 sees 10.1.1.10"


def normalized_table(lab) -> list:
    """The live table as data, set elements sorted and counters dropped (a replace resets them)."""
    listing = subprocess.run(
        ["ip", "netns", "exec", lab.router_ns, "nft", "-j", "list", "table", "inet", "vr"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    items = []
    for item in json.loads(listing)["nftables"]:
        for body in item.values():
            if isinstance(body, dict):
                body.pop("handle", None)
        for kind in ("set", "map"):
            if kind in item:
                item[kind]["elem"] = sorted(json.dumps(e, sort_keys=True) for e in item[kind].get("elem", []))
        if "rule" in item:
            item["rule"]["expr"] = [e for e in item["rule"]["expr"] if "counter" not in e]
        items.append(json.dumps(item, sort_keys=True))
    return sorted(items)


def test_one_rule_change_updates_elements_and_ends_identical_to_a_full_apply(servers, tmp_path):
    lab = servers
    doc = json.loads((EXAMPLES / "router.json").read_text())
    nat, firewall = doc["nat"], doc["firewall"]
    nat["port_forwarding"].append(
        {"id": "ssh", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 2222, "private_ip": "10.1.1.10",
         "private_ports": 80}
    )  # fmt: skip
    firewall["ingress"].append({"id": "ssh", "public_ip": "192.0.2.10", "protocol": "tcp", "ports": 2222})
    lab.serve(lab.ns("pub"), "probe", 7100)  # a flow that counts, to tell an element update from a replace
    assert lab.ask(lab.ns("g1"), "192.0.2.1", 7100) == "probe sees 192.0.2.10"
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "nat": nat, "firewall": firewall}))
    assert lab.ask(lab.ns("pub"), "192.0.2.10", 2222) == "web1 sees 192.0.2.1"
    counters = {
        c["rule"]: c["packets"] for c in json.loads(lab.vr("status", "--json", "--firewall").stdout)["firewall"]
    }
    assert counters["egress tier1: default accept"] > 0  # counters survived: elements only, not a replace
    incremental = normalized_table(lab)
    lab.vr("start")  # a forced full replace of the same document
    assert normalized_table(lab) == incremental


@pytest.mark.parametrize(
    ("breakage", "step"),
    [
        # A rule nftables refuses: the dry run of the new table (check) catches it.
        (lambda t: t + "add rule inet vr no_such_chain accept\n", "check failed for nftables"),
        # An element it refuses (overlapping intervals): elements are not dry-run, so the
        # batch is refused in apply, atomically, and the rollback restores the whole table.
        (
            lambda t: t.replace(
                "{{ sets.source_nat }}", '{{ sets.source_nat | replace(" };", ", 10.1.0.0/16 : 192.0.2.10 };") }}'
            ),
            "apply failed for nftables",
        ),
    ],
    ids=["rule", "element"],
)
def test_a_ruleset_nftables_refuses_is_rolled_back(servers, tmp_path, breakage, step):
    lab = servers
    templates = tmp_path / "templates"
    shutil.copytree(lab.settings.template_dir, templates)
    template = templates / "nftables" / "vr.nft.j2"
    broken = breakage(template.read_text())
    assert broken != template.read_text()
    template.write_text(broken)
    before, files = ruleset(lab), live_files(lab)
    nat = json.loads((EXAMPLES / "router.json").read_text())["nat"]
    nat["port_forwarding"].append(
        {"id": "web-alt", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 8081,
         "private_ip": "10.1.1.10", "private_ports": 80}
    )  # fmt: skip
    result = lab.vr(
        "apply", write_payload(tmp_path, {"generation": 2, "nat": nat}), env={"VR_TEMPLATE_DIR": str(templates)},
        check=False,
    )  # fmt: skip
    assert result.returncode == 4 and step in result.stderr
    assert ruleset(lab) == before and live_files(lab) == files
    assert lab.ask(lab.ns("pub"), "192.0.2.10", 8080) == "web1 sees 192.0.2.1"


def test_an_element_change_on_a_table_changed_by_hand_loads_the_whole_table(lab, tmp_path):
    """Element-only changes go as add/delete batches without first asking whether the live
    table is still vr's: a table deleted or edited by hand refuses the batch whole, and the
    whole table is loaded instead, ending as a full apply would."""
    firewall = json.loads((EXAMPLES / "router.json").read_text())["firewall"]
    off = {"generation": 2, "monitor": {"services": {"nftables": {"enabled": False}}}}  # the monitor would repair it
    lab.vr("apply", write_payload(tmp_path, off))

    def nft(*args: str) -> None:
        subprocess.run(["ip", "netns", "exec", lab.router_ns, "nft", *args], check=True)

    nft("delete", "table", "inet", "vr")
    firewall["ingress"].append({"id": "extra", "public_ip": "192.0.2.10", "protocol": "tcp", "ports": 2223})
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "firewall": firewall}))
    assert "192.0.2.10 . 2223" in ruleset(lab) and "map pf_tcp" in ruleset(lab)
    nft("flush", "set", "inet", "vr", "in_tcp")  # what the next change deletes from is gone
    firewall["ingress"].pop()
    lab.vr("apply", write_payload(tmp_path, {"generation": 4, "firewall": firewall}))
    incremental = normalized_table(lab)
    assert "2223" not in incremental
    lab.vr("start")  # a forced full replace of the same document
    assert normalized_table(lab) == incremental
    assert json.loads(lab.vr("status", "--json").stdout)["healthy"] is True


ICMP_LISTEN = r"""
import socket, sys, time
marker = sys.argv[1].encode()
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
    s.settimeout(0.2)
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        try:
            packet = s.recv(2048)
        except TimeoutError:
            continue
        if marker in packet:
            print("arrived", packet[(packet[0] & 15) * 4 + 1], flush=True)  # the ICMP code as received
            break
"""
ICMP_SEND = r"""
import os, socket, struct, sys
icmp_type, code, marker = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
body = struct.pack("!HH", os.getpid() & 0xFFFF, 1) + marker  # an id of its own: no earlier flow's conntrack entry
header = struct.pack("!BBH", icmp_type, code, 0)
packet = struct.pack("!BBH", icmp_type, code, checksum(header + body)) + body
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
    for _ in range(3):
        s.sendto(packet, (sys.argv[1], 0))
"""


def icmp_arrives(lab, source: str, target: str, address: str, icmp_type: int, code: int) -> bool:
    """Whether ICMP of this type and code, sent from the source namespace to address (three
    packets), reaches the target namespace (a raw socket there sees every ICMP packet)."""
    marker = f"vr-icmp-{icmp_type}-{code}-{id(lab)}"
    listener = subprocess.Popen(["ip", "netns", "exec", lab.ns(target), sys.executable, "-c", ICMP_LISTEN, marker, "2"],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert listener.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", lab.ns(source), sys.executable, "-c", ICMP_SEND, address,
                        str(icmp_type), str(code), marker], check=True, timeout=10)  # fmt: skip
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    return out.strip() == f"arrived {code}"


def test_icmp_codes_in_ingress_rules_egress_rules_and_acls(servers, tmp_path):
    lab = servers
    doc = json.loads((EXAMPLES / "router.json").read_text())
    ping = next(r for r in doc["firewall"]["ingress"] if r["id"] == "db-ping")
    ping["icmp_code"] = 5  # type 8 with code 5 only
    lab.vr("apply", write_payload(tmp_path, {**doc, "generation": 2}))
    assert icmp_arrives(lab, "pub", "g2", "192.0.2.11", 8, 5)
    assert not icmp_arrives(lab, "pub", "g2", "192.0.2.11", 8, 0)
    assert not lab.ping(lab.ns("pub"), "192.0.2.11")

    # Leaving a tier: an egress exception for one code (tier1 denies by default here).
    egress = [{"tier": "tier1", "default": "deny", "rules": [{"protocol": "icmp", "icmp_type": 8, "icmp_code": 3}]}]
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "firewall": {**doc["firewall"], "egress": egress}}))
    assert icmp_arrives(lab, "g1", "pub", "192.0.2.1", 8, 3)
    assert not icmp_arrives(lab, "g1", "pub", "192.0.2.1", 8, 1)

    # A VPC tier's ACL: the lowest number that matches decides, code by code.
    acls = [{"tier": "tier2", "ingress": [{"number": 10, "action": "deny", "protocol": "icmp", "icmp_type": 8,
                                            "icmp_code": 5, "cidrs": ["0.0.0.0/0"]},
                                           {"number": 20, "action": "allow", "protocol": "icmp", "icmp_type": 8}]}]  # fmt: skip
    ping["icmp_code"] = None
    lab.vr("apply", write_payload(tmp_path, {"generation": 4, "router": {"name": "r-101-vm", "type": "vpc"},
                                             "firewall": doc["firewall"], "network_acls": acls}))  # fmt: skip
    assert not icmp_arrives(lab, "pub", "g2", "192.0.2.11", 8, 5)
    assert icmp_arrives(lab, "pub", "g2", "192.0.2.11", 8, 7)
    assert lab.ping(lab.ns("pub"), "192.0.2.11")


def test_egress_rules_by_source_inside_the_tier(servers, tmp_path):
    lab = servers
    doc = json.loads((EXAMPLES / "router.json").read_text())
    rule = {"protocol": "tcp", "ports": 7000, "source_cidrs": ["10.1.1.0/28"]}
    firewall = {**doc["firewall"], "egress": [{"tier": "tier1", "default": "deny", "rules": [rule]}]}
    lab.vr("apply", write_payload(tmp_path, {"generation": 2, "firewall": firewall}))
    assert lab.ask(lab.ns("g1"), "192.0.2.1", 7000) == "public host sees 192.0.2.10"  # 10.1.1.10 is inside
    rule["source_cidrs"] = ["10.1.1.128/25"]
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "firewall": firewall}))
    assert lab.ask(lab.ns("g1"), "192.0.2.1", 7000, timeout=1) is None

    rule["source_cidrs"] = ["10.1.1.0/28", "10.9.9.0/24"]  # not the tier's: refused, nothing changed
    refused = lab.vr("apply", write_payload(tmp_path, {"generation": 4, "firewall": firewall}), check=False)
    assert refused.returncode == 2
    assert "firewall.egress[0].rules[0].source_cidrs[1]: 10.9.9.0/24 is not inside any guest tier" in refused.stderr
    assert lab.ask(lab.ns("g1"), "192.0.2.1", 7000, timeout=1) is None
