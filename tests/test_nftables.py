"""Firewall and NAT: what the document accepts, and what the ruleset says."""

from __future__ import annotations

import json

import pytest

from vr.foundation import document as docmod
from vr.foundation.errors import InvalidPayload
from vr.foundation.settings import Settings
from vr.services.network import NetworkService
from vr.services.nftables import NftablesService
from vr.services.runtime import Runtime


def problems(example: dict) -> dict[str, str]:
    try:
        doc = docmod.build_document(example)
    except InvalidPayload as error:
        return {p.path: p.reason for p in error.problems}
    return {p.path: p.reason for p in NftablesService().verify(doc)}


def ruleset(example: dict, tmp_path) -> str:
    doc = docmod.build_document(example)
    return NftablesService().generate(doc, Runtime(Settings.under_root(tmp_path)))["vr.nft"].decode()


def test_example_is_valid(example):
    assert problems(example) == {}


def test_public_ips_must_be_on_the_public_subnet_and_assigned_to_carry_rules(example):
    example["nat"]["public_ips"].append({"ip": "198.51.100.1"})
    example["nat"]["port_forwarding"][0]["public_ip"] = "192.0.2.20"  # reserved, not assigned
    found = problems(example)
    assert "not inside the public interface's subnets" in found["nat.public_ips[3].ip"]
    assert "not an assigned public IP" in found["nat.port_forwarding[0].public_ip"]


def test_port_forward_ranges_must_match_and_not_overlap(example):
    forwards = example["nat"]["port_forwarding"]
    forwards[0]["public_ports"] = "8000-8010"
    forwards[0]["private_ports"] = "80-85"
    forwards.append(
        {"id": "dup", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": "8005", "private_ip": "10.1.1.10",
         "private_ports": 22}
    )  # fmt: skip
    found = problems(example)
    assert "equal length" in found["nat.port_forwarding[0]"]
    example["nat"]["port_forwarding"][0]["private_ports"] = "80-90"
    found = problems(example)
    assert found["nat.port_forwarding[2].public_ports"] == (
        "port forward 'dup' overlaps port forward 'web-http' (nat.port_forwarding[0]): tcp port 8005"
    )


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"protocol": "tcp"}, "needs ports"),
        ({"protocol": "icmp", "ports": 22}, "tcp or udp only"),
        ({"protocol": "tcp", "ports": "9000-8000"}, "start 9000 is above end 8000"),
        ({"protocol": "tcp", "ports": 70000}, "less than or equal to 65535"),
        ({"protocol": "udp", "ports": 53, "icmp_type": 8}, "icmp only"),
        ({"protocol": "tcp", "ports": "22\n}"}, "valid"),
    ],
)
def test_ingress_rules_fit_their_protocol(example, rule, reason):
    example["firewall"]["ingress"] = [{"id": "r", "public_ip": "192.0.2.10", **rule}]
    found = problems(example)
    assert any(path.startswith("firewall.ingress[0]") and reason in text for path, text in found.items()), found


def test_private_side_must_be_a_guest_and_static_nat_not_on_source_nat_ip(example):
    example["nat"]["static_nat"].append({"public_ip": "192.0.2.10", "private_ip": "172.16.0.5"})
    found = problems(example)
    assert "not inside any guest tier" in found["nat.static_nat[1].private_ip"]
    assert "is a source NAT IP" in found["nat.static_nat[1].public_ip"]


def test_egress_names_known_tiers_once(example):
    example["firewall"]["egress"].append({"tier": "tier9"})
    example["firewall"]["egress"].append({"tier": "tier1"})
    found = problems(example)
    assert "not a guest tier" in found["firewall.egress[2].tier"]
    assert "listed twice" in found["firewall.egress[3].tier"]


def test_ruleset_is_sets_and_maps_not_a_rule_per_item(example, tmp_path):
    text = ruleset(example, tmp_path)
    assert "set public_ips { type ipv4_addr; elements = { 192.0.2.10, 192.0.2.11 }; }" in text  # .20 is reserved
    assert (
        "map pf_tcp { type ipv4_addr . inet_service : ipv4_addr . inet_service; elements = { 192.0.2.10 . 8080 : 10.1.1.10 . 80 }; }"
        in text
    )  # exact keys: a hash map
    assert "set in_tcp { type ipv4_addr . inet_service; elements = { 192.0.2.10 . 8080, 192.0.2.11 . 22 }; }" in text
    assert "192.0.2.11 : 10.1.2.10" in text and "10.1.2.10 : 192.0.2.11" in text
    assert "10.1.1.0/24 : 192.0.2.10" in text
    before = text.count("\n")
    example["nat"]["port_forwarding"] += [
        {"id": f"pf{n}", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 9000 + n,
         "private_ip": "10.1.1.10", "private_ports": 9000 + n}
        for n in range(500)
    ]  # fmt: skip
    assert ruleset(example, tmp_path).count("\n") == before  # 500 more forwards, not one more line


def test_port_ranges_map_port_by_port_and_sources_are_kept(example, tmp_path):
    forward = example["nat"]["port_forwarding"][0]
    forward.update(public_ports="8000-8002", private_ports="9000-9002", source_cidrs=["203.0.113.0/24"])
    text = ruleset(example, tmp_path)
    for offset in range(3):
        assert f"203.0.113.0/24 . 192.0.2.10 . {8000 + offset} : 10.1.1.10 . {9000 + offset}" in text
    assert "map pf_tcp { type ipv4_addr . inet_service : ipv4_addr . inet_service; }" in text  # all by source


def test_egress_rules_are_exceptions_to_the_default(example, tmp_path):
    text = ruleset(example, tmp_path)
    assert ("set egress_tier2_tcp { type ipv4_addr . ipv4_addr . inet_service; flags interval; "
            "elements = { 0.0.0.0/0 . 0.0.0.0/0 . 25 }; }") in text  # fmt: skip
    assert "meta l4proto tcp ip saddr . ip daddr . tcp dport @egress_tier2_tcp counter drop" in text
    example["firewall"]["egress"][1]["default"] = "deny"
    example["firewall"]["egress"][1]["rules"][0]["source_cidrs"] = ["10.1.2.0/25", "10.1.2.128/26"]
    text = ruleset(example, tmp_path)
    assert "meta l4proto tcp ip saddr . ip daddr . tcp dport @egress_tier2_tcp counter accept" in text
    assert "elements = { 10.1.2.0/25 . 0.0.0.0/0 . 25, 10.1.2.128/26 . 0.0.0.0/0 . 25 }" in text


def test_assigned_public_ips_go_on_the_public_interface(example, tmp_path):
    doc = docmod.build_document(example)
    state = json.loads(NetworkService().generate(doc, Runtime(Settings.under_root(tmp_path)))["network.json"])
    public = next(i for i in state["interfaces"] if i["id"] == "public")
    assert public["addresses"] == ["192.0.2.10/24", "192.0.2.11/24"]  # .20 is only reserved


def vpc_acl(example: dict, ingress: list[dict], egress: list[dict] | None = None) -> dict:
    example["router"]["type"] = "vpc"
    example["network_acls"] = [{"tier": "tier2", "ingress": ingress, "egress": egress or []}]
    return example


def test_acls_are_for_vpc_routers_with_unique_numbers(example):
    example["network_acls"] = [{"tier": "tier2", "ingress": [{"number": 10, "action": "deny", "protocol": "all"}]}]
    assert "apply to VPC routers" in problems(example)["network_acls"]
    rules = [{"number": 10, "action": "deny", "protocol": "all"}, {"number": 10, "action": "allow", "protocol": 47}]
    found = problems(vpc_acl(example, rules))
    assert "10 is already used by network_acls[0].ingress[0]" in found["network_acls[0].ingress[1].number"]


def test_acl_entries_are_ordered_by_number_not_by_position(example, tmp_path):
    rules = [
        {"number": 20, "action": "allow", "protocol": "tcp", "ports": 22},
        {"number": 10, "action": "deny", "protocol": "tcp", "ports": 22, "cidrs": ["10.1.1.0/24", "10.9.0.0/16"]},
        {"number": 30, "action": "allow", "protocol": 47},
    ]
    text = ruleset(vpc_acl(example, rules), tmp_path)
    # 10 and 20 both match tcp/22 from 10.1.1.0/24: 10 goes in a block looked up first.
    assert (
        "acl_in_tier2_0_ports { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; "
        "elements = { 10.1.1.0/24 . tcp . 22 : drop, 10.9.0.0/16 . tcp . 22 : drop }; }" in text
    )
    # 20 and 30 never match the same packet: one block, two maps.
    assert (
        "acl_in_tier2_1_ports { type ipv4_addr . inet_proto . inet_service : verdict; flags interval; "
        "elements = { 0.0.0.0/0 . tcp . 22 : accept }; }" in text
    )
    assert (
        "acl_in_tier2_1_proto { type ipv4_addr . inet_proto : verdict; flags interval; "
        "elements = { 0.0.0.0/0 . 47 : accept }; }" in text
    )
    chain = text[text.index("chain in_tier2 {") :]
    assert chain.index("vmap @acl_in_tier2_0_ports") < chain.index("vmap @acl_in_tier2_1_ports")
    assert "acl_in_tier2_2" not in text


def test_acl_blocks_split_only_where_entries_overlap():
    from vr.foundation.document import AclRule
    from vr.services.nftables import _blocks

    def entry(number: int, **match) -> AclRule:
        return AclRule.model_validate({"number": number, "action": "deny", **match})

    disjoint = [
        entry(n, protocol="tcp", ports=1000 + n, cidrs=[f"198.18.{n // 256}.{n % 256}/32"]) for n in range(1, 501)
    ]
    assert len(_blocks(disjoint, "accept", 4)) == 1
    overlapping = [
        entry(1, protocol="tcp", ports="20-30", cidrs=["10.0.0.0/8"]),
        entry(2, protocol="udp", ports=25, cidrs=["10.1.0.0/16"]),  # another protocol: same block
        entry(3, protocol="all", cidrs=["10.1.2.0/24"]),  # inside 1's network, any port: a new block
        entry(4, protocol="icmp", icmp_type=8, cidrs=["192.0.2.0/24"]),
        entry(5, protocol="icmp", cidrs=["192.0.2.128/25"]),  # any icmp type covers type 8: new block
        entry(6, protocol="tcp", ports=80, cidrs=["10.0.0.0/8", "10.5.0.0/16"]),  # nested: one element
    ]
    blocks = _blocks(overlapping, "accept", 4)
    assert [(b.first, b.last) for b in blocks] == [(1, 2), (3, 4), (5, 6)]
    assert blocks[2]["ports"] == ["10.0.0.0/8 . tcp . 80 : drop"]


@pytest.mark.parametrize(
    ("second", "conflict"),
    [
        ({"ports": 8080, "source_cidrs": ["10.0.0.0/8"]}, True),  # inside 0.0.0.0/0 on the same port
        ({"ports": "8000-8090"}, True),
        ({"ports": 8081}, False),
        ({"ports": 8080, "protocol": "udp"}, False),
    ],
)
def test_overlapping_ingress_rules_are_refused_with_both_paths(example, second, conflict):
    rule = {"id": "second", "public_ip": "192.0.2.10", "protocol": "tcp", **second}
    example["firewall"]["ingress"].append(rule)
    found = problems(example)
    if conflict:
        assert "ingress rule 'second' overlaps ingress rule 'http' (firewall.ingress[0]): tcp port 8080" in found[
            "firewall.ingress[4]"
        ]
    else:
        assert found == {}


def test_rule_ids_are_unique(example):
    example["firewall"]["ingress"][1]["id"] = "http"
    assert problems(example)["firewall.ingress[1].id"] == "ingress rule 'http' is already firewall.ingress[0]"


def test_single_rules_are_upserted_and_deleted_by_id(example):
    from vr.transaction.pipeline import Pipeline

    stored = Pipeline.validate(Pipeline.__new__(Pipeline), example, None)
    payload = {
        "generation": 2,
        "port_forwarding_rules": {
            "upsert": [{"id": "web-http", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 8443,
                        "private_ip": "10.1.1.10", "private_ports": 443}],
            "delete": ["web-udp"],
        },
        "ingress_rules": {"upsert": [{"id": "https", "public_ip": "192.0.2.10", "protocol": "tcp", "ports": 8443}]},
    }  # fmt: skip
    doc = Pipeline.validate(Pipeline.__new__(Pipeline), payload, stored)
    assert [(f.id, f.public_ports.start) for f in doc.nat.port_forwarding] == [("web-http", 8443)]
    assert [r.id for r in doc.firewall.ingress][-1] == "https" and len(doc.firewall.ingress) == 5
    with pytest.raises(InvalidPayload, match="no entry with id nope"):
        Pipeline.validate(Pipeline.__new__(Pipeline), {"generation": 3, "ingress_rules": {"delete": ["nope"]}}, doc)


def test_a_verify_that_remembers_the_last_one_finds_what_a_fresh_one_finds(example):
    """The pipeline keeps one service and verifies each payload's merged document with it;
    after clean documents it looks only at the rules that came or went."""
    service = NftablesService()

    def found(doc) -> dict[str, str]:
        mine = {p.path: p.reason for p in service.verify(doc)}
        assert mine == {p.path: p.reason for p in NftablesService().verify(doc)}
        return mine

    def merged(doc, generation: int, **items) -> docmod.RouterDocument:
        return docmod.merge(doc, docmod.parse_payload({"generation": generation, **items}))

    stored = docmod.build_document(example)
    assert found(stored) == {}
    inside_http = {"id": "inside", "public_ip": "192.0.2.10", "protocol": "tcp", "ports": 8080,
                   "source_cidrs": ["10.0.0.0/8"]}  # fmt: skip
    refused = merged(stored, 2, ingress_rules={"upsert": [inside_http]})
    assert found(refused)["firewall.ingress[4]"] == (
        "ingress rule 'inside' overlaps ingress rule 'http' (firewall.ingress[0]): tcp port 8080, "
        "sources 10.0.0.0/8 and 0.0.0.0/0"
    )
    # After a refusal the stored document is the base again, and it is still clean.
    assert found(stored) == {}
    replaced = merged(stored, 2, ingress_rules={"upsert": [inside_http], "delete": ["http"]})
    assert found(replaced) == {}
    assert [r.id for r in replaced.firewall.ingress] == ["udp", "db-ssh", "db-ping", "inside"]
    twice = {"ingress": [*example["firewall"]["ingress"], {**inside_http, "id": "udp", "ports": 9000}],
             "egress": example["firewall"]["egress"]}  # fmt: skip
    assert (
        "'udp' is already firewall.ingress[1]" in found(merged(replaced, 3, firewall=twice))["firewall.ingress[4].id"]
    )
    moved = {"id": "web-http", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 5353,
             "private_ip": "10.1.1.10", "private_ports": 80}  # fmt: skip
    assert found(merged(replaced, 3, port_forwarding_rules={"upsert": [moved]})) == {}  # tcp 5353 is free
    udp = {**moved, "id": "other", "protocol": "udp"}
    clash = found(merged(replaced, 3, port_forwarding_rules={"upsert": [udp]}))
    assert clash["nat.port_forwarding[2].public_ports"] == (
        "port forward 'other' overlaps port forward 'web-udp' (nat.port_forwarding[1]): udp port 5353"
    )


def test_every_router_has_the_input_policy_with_or_without_a_public_interface(example, tmp_path):
    """The router's own addresses are closed but for what their role answers, on every router:
    one without a public side (DHCP and DNS only) gets the table too, without NAT."""
    example["interfaces"] = [i for i in example["interfaces"] if i["role"] != "public"]
    example.update(routes=[], nat={}, firewall={})
    text = ruleset(example, tmp_path)
    assert "type filter hook input priority filter; policy drop;" in text
    assert '"eth2" . 10.1.1.1 . 53, "eth2" . 10.1.1.1 . 67' in text
    assert "chain gate" not in text and "snat" not in text and "dnat" not in text


def test_each_role_answers_only_on_its_own_addresses(example, tmp_path):
    example["interfaces"][2]["addresses"].append("2001:db8:1:1::1/64")
    example["interfaces"][1]["addresses"].append("2001:db8:ffff::10/64")
    text = ruleset(example, tmp_path)
    sets = {line.split()[1]: line for line in text.splitlines() if line.startswith("  set local")}
    assert sets["local_tcp"].endswith(
        'elements = { "eth0" . 169.254.0.10 . 3922, "eth0" . 169.254.0.10 . 8443, "eth2" . 10.1.1.1 . 53, '
        '"eth2" . 10.1.1.1 . 80, "eth2" . 10.1.1.1 . 8080, "eth3" . 10.1.2.1 . 53, "eth3" . 10.1.2.1 . 80, '
        '"eth3" . 10.1.2.1 . 8080 }; }'
    )  # control: SSH and the agent (agent.port); guests: DNS and guest data (80, 8080) on their own gateway
    assert sets["local_udp"].endswith(
        'elements = { "eth2" . 10.1.1.1 . 53, "eth2" . 10.1.1.1 . 67, "eth3" . 10.1.2.1 . 53, "eth3" . 10.1.2.1 . 67 }; }'
    )
    assert sets["local6_udp"].endswith('elements = { "eth2" . 2001:db8:1:1::1 . 53, "eth2" . 2001:db8:1:1::1 . 547 }; }')
    assert sets["local6_tcp"].endswith('elements = { "eth2" . 2001:db8:1:1::1 . 53 }; }')  # guest data: IPv4 only
    assert "eth1" not in "".join(sets.values())  # the public side: only what the document opens (public_local)
    assert 'iifname @public_ifs ip daddr @public_ips jump public_local' in text
    # DNS for tunnelled clients (remote access) on the guest addresses; what is not one of the
    # document's interfaces is charon's userspace-ESP TUN device.
    assert "set guest_ips { type ipv4_addr; elements = { 10.1.1.1, 10.1.2.1 }; }" in text
    assert 'set role_ifs { type ifname; elements = { "eth0", "eth1", "eth2", "eth3" }; }' in text


def test_the_agents_port_opens_only_while_the_agent_is_served(example, tmp_path):
    moved = {**example, "agent": {"port": 9443, "tokens": ["x" * 40]}}
    assert '"eth0" . 169.254.0.10 . 9443' in ruleset(moved, tmp_path / "moved")
    unserved = {**example, "agent": {"port": 9443, "tokens": []}}  # no way to authenticate: not served
    text = ruleset(unserved, tmp_path / "unserved")
    assert "9443" not in text and '"eth0" . 169.254.0.10 . 3922' in text


def test_overlap_messages_name_the_rules_of_both_sides(example):
    """A refusal of a per-rule upsert is read by a manager that never saw the merged
    document's positions: each message names both rules by id (by position only where
    rules have none), and what they both match."""
    example["nat"]["port_forwarding"].append(
        {"id": "pf-17", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": "8070-8090",
         "private_ip": "10.1.1.10", "private_ports": "7070-7090"}
    )  # fmt: skip
    example["firewall"]["ingress"].append(
        {"id": "ping-all", "public_ip": "192.0.2.11", "protocol": "icmp", "source_cidrs": ["192.0.2.0/24"]}
    )
    example["firewall"]["egress"][1]["rules"].append({"protocol": "tcp", "ports": "20-30",
                                                      "destination_cidrs": ["198.51.100.0/24"]})  # fmt: skip
    example["load_balancer"] = {"rules": [
        {"id": "web", "public_ip": "192.0.2.10", "public_port": 80, "private_port": 8000,
         "members": [{"ip": "10.1.1.10"}], "source_cidrs": ["10.0.0.0/8", "10.1.0.0/16"]}
    ]}  # fmt: skip
    found = problems(example)
    assert found["nat.port_forwarding[2].public_ports"] == (
        "port forward 'pf-17' overlaps port forward 'web-http' (nat.port_forwarding[0]): tcp port 8080"
    )
    assert found["firewall.ingress[4]"] == (
        "ingress rule 'ping-all' overlaps ingress rule 'db-ping' (firewall.ingress[3]): icmp type 8, "
        "sources 192.0.2.0/24 and 0.0.0.0/0"
    )
    assert found["firewall.egress[1].rules[1]"] == (
        "egress rule overlaps egress rule firewall.egress[1].rules[0]: tcp port 25, "
        "destinations 198.51.100.0/24 and 0.0.0.0/0"
    )  # egress rules have no ids: their positions
    assert found["load_balancer.rules[0]"] == (
        "load-balancer rule 'web' overlaps itself: tcp port 80, sources 10.1.0.0/16 and 10.0.0.0/8"
    )


def test_acl_entries_apply_to_the_families_of_their_cidrs(example, tmp_path):
    example["router"]["type"] = "vpc"
    example["network_acls"] = [{"tier": "tier2", "ingress": [
        {"number": 1, "action": "deny", "protocol": "tcp", "ports": 22, "cidrs": ["2001:db8:1:1::/64"]},
        {"number": 2, "action": "deny", "protocol": "icmpv6", "icmp_type": 128, "icmp_code": 0},
        {"number": 3, "action": "allow", "protocol": "all"},
    ]}]  # fmt: skip
    text = ruleset(example, tmp_path)
    assert "map acl_in6_tier2_0_ports { type ipv6_addr . inet_proto . inet_service : verdict; flags interval; " \
           "elements = { 2001:db8:1:1::/64 . tcp . 22 : drop }; }" in text  # fmt: skip
    assert "elements = { ::/0 . 128 . 0 : drop }" in text and "elements = { ::/0 . 0-255 : accept }" in text
    assert "map acl_in_tier2_0_proto { type ipv4_addr . inet_proto : verdict; flags interval; " \
           "elements = { 0.0.0.0/0 . 0-255 : accept }; }" in text  # IPv4: only entry 3 names it  # fmt: skip


@pytest.mark.parametrize(("entry", "reason"), [
    ({"protocol": "icmp", "cidrs": ["::/0"]}, "use protocol icmpv6"),
    ({"protocol": "icmpv6", "cidrs": ["10.0.0.0/8"]}, "use protocol icmp"),
    ({"protocol": "tcp", "ports": 22, "cidrs": []}, "at least one network"),
])  # fmt: skip
def test_an_acl_entry_of_one_family_names_networks_of_that_family(example, entry, reason):
    example["router"]["type"] = "vpc"
    example["network_acls"] = [{"tier": "tier2", "ingress": [{"number": 1, "action": "deny", **entry}]}]
    with pytest.raises(docmod.InvalidPayload) as caught:
        docmod.build_document(example)
    assert any(reason in p.reason for p in caught.value.problems), caught.value.problems
