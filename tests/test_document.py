"""The router document: schema, error paths, merge and generation rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vr.foundation import document as docmod
from vr.foundation.errors import InvalidPayload, StalePayload
from vr.foundation.settings import Settings
from vr.transaction.pipeline import Pipeline


def validate(raw: dict, stored: docmod.RouterDocument | None = None) -> docmod.RouterDocument:
    pipeline = Pipeline.__new__(Pipeline)  # validation needs no directories
    return Pipeline.validate(pipeline, raw, stored)


def problems_of(raw: dict, stored: docmod.RouterDocument | None = None) -> dict[str, str]:
    with pytest.raises(InvalidPayload) as caught:
        validate(raw, stored)
    return {p.path: p.reason for p in caught.value.problems}


def test_example_document_is_valid(example):
    doc = validate(example)
    assert doc.router.name == "r-101-vm"
    assert [e.hostname for e in doc.dhcp.entries] == ["web1", "db1"]


def test_each_error_names_its_json_path(example):
    example["dhcp"]["entries"][1]["mac"] = "02:00:00:00:02"
    example["dhcp"]["entries"][0]["ip"] = "10.1.1.300"
    example["interfaces"][2]["mtu"] = 100000
    found = problems_of(example)
    assert "MAC address" in found["dhcp.entries[1].mac"]
    assert "IPv4" in found["dhcp.entries[0].ip"]
    assert "9216" in found["interfaces[2].mtu"]


def test_addresses_must_be_inside_their_tier(example):
    example["dhcp"]["entries"][0]["ip"] = "10.1.2.50"  # tier2's subnet, entry says tier1
    example["dhcp"]["tiers"][0]["range"]["end"] = "10.1.9.9"
    found = problems_of(example)
    assert "outside tier tier1 subnet 10.1.1.0/24" in found["dhcp.entries[0].ip"]
    assert "outside tier subnet" in found["dhcp.tiers[0].range.end"]


def test_duplicates_within_a_tier_are_refused(example):
    entries = example["dhcp"]["entries"]
    entries.append({"tier": "tier1", "mac": "02:00:00:00:01:99", "ip": "10.1.1.10", "hostname": "WEB1"})
    entries.append({"tier": "tier2", "mac": "02:00:00:00:01:10", "ip": "10.1.2.77", "hostname": "other"})
    found = problems_of(example)
    assert "already used in tier tier1 by dhcp.entries[0]" in found["dhcp.entries[2].ip"]
    assert "already used in tier tier1" in found["dhcp.entries[2].hostname"]
    assert "already used by dhcp.entries[0]" in found["dhcp.entries[3].mac"]


def test_same_hostname_in_another_tier_is_refused_while_tiers_share_one_domain(example):
    """web1.cloud.internal can answer for one VM only: a second web1 on tier2 would get no name."""
    example["dhcp"]["entries"].append(
        {"tier": "tier2", "mac": "02:00:00:00:02:99", "ip": "10.1.2.99", "hostname": "Web1"}
    )
    found = problems_of(example)
    assert "already used in another tier by dhcp.entries[0]" in found["dhcp.entries[2].hostname"]


@pytest.mark.parametrize(
    "hostname",
    ["web1\nserver=/evil/6.6.6.6", "web 1", "web1,10.9.9.9", "-web", "web-", "a" * 64, "web1.example", 'we"b'],
)
def test_hostnames_follow_rfc1123(example, hostname):
    example["dhcp"]["entries"][0]["hostname"] = hostname
    assert "hostname" in problems_of(example)["dhcp.entries[0].hostname"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("dns", "domain"), "cloud.internal\nserver=/x/1.2.3.4"),
        (("dns", "domain"), "cloud internal"),
        (("router", "name"), "r1\n[program:evil]"),
        (("interfaces", 2, "name"), "eth2\nlisten-address=0.0.0.0"),
    ],
)
def test_strings_that_could_inject_a_directive_are_refused(example, path, value):
    node = example
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    found = problems_of(example)
    assert docmod.json_path(path) in found


@pytest.mark.parametrize("value", ["1,2", "a b", "x\ny", "q'", 'q"', "#comment", ""])
def test_dhcp_option_values_cannot_split_or_quote(example, value):
    example["dhcp"]["tiers"][0]["options"] = [{"name": "ntp-server", "values": [value]}]
    assert "dhcp.tiers[0].options[0].values[0]" in problems_of(example)


def test_unknown_keys_and_sections_are_errors(example):
    example["dhcp"]["entries"][0]["colour"] = "blue"
    example["metadata"] = {"files": []}
    example["vpn"] = {"tunnels": []}
    found = problems_of(example)
    assert found["dhcp.entries[0].colour"] == "unknown field"
    assert found["metadata"] == "unknown field"
    assert found["vpn.tunnels"] == "unknown field"


def test_first_payload_must_be_whole(example):
    found = problems_of({"generation": 1, "dns": example["dns"]})
    assert "the first payload must carry the whole router" in found["router"]
    assert "interfaces" in found


def test_partial_payload_replaces_only_its_section(example):
    stored = validate(example)
    doc = validate({"generation": 2, "dns": {"domain": "new.internal"}}, stored)
    assert doc.dns.domain == "new.internal"
    assert doc.dns.upstream == []  # the section was replaced, not deep-merged
    assert len(doc.dhcp.entries) == 2 and doc.generation == 2


def test_dhcp_entries_upsert_and_delete_by_mac(example):
    stored = validate(example)
    doc = validate(
        {
            "generation": 2,
            "dhcp_entries": {
                "upsert": [
                    {"tier": "tier1", "mac": "02:00:00:00:01:10", "ip": "10.1.1.20", "hostname": "web1"},
                    {"tier": "tier1", "mac": "02:00:00:00:01:11", "ip": "10.1.1.11", "hostname": "web2"},
                ],
                "delete": ["02:00:00:00:02:10"],
            },
        },
        stored,
    )
    assert [(e.mac, str(e.ip)) for e in doc.dhcp.entries] == [
        ("02:00:00:00:01:10", "10.1.1.20"),
        ("02:00:00:00:01:11", "10.1.1.11"),
    ]


def test_models_given_the_same_fields_share_their_names_and_a_merge_changes_no_other(example):
    """What pydantic keeps per model is shared between models (memory); a merge's copies must
    never change what the stored document says was set."""
    stored = validate(example)
    before = [sorted(e.model_fields_set) for e in stored.dhcp.entries]
    first, second = stored.dhcp.entries[:2]
    assert first.model_fields_set == second.model_fields_set and first.model_fields_set is second.model_fields_set
    doc = validate({"generation": 2, "dhcp_entries": {"upsert": [
        {"tier": "tier1", "mac": "02:00:00:00:01:12", "ip": "10.1.1.12", "hostname": "web3", "default_gateway": False},
    ]}}, stored)  # fmt: skip
    assert [sorted(e.model_fields_set) for e in stored.dhcp.entries] == before
    added = doc.dhcp.entries[-1]
    assert "default_gateway" in added.model_fields_set and "default_gateway" not in first.model_fields_set
    assert doc.dhcp.entries[0].model_fields_set == first.model_fields_set


def test_deleting_an_unknown_vm_is_an_error(example):
    stored = validate(example)
    found = problems_of({"generation": 2, "dhcp_entries": {"delete": ["02:00:00:00:09:09"]}}, stored)
    assert "no entry with mac 02:00:00:00:09:09" in found["dhcp_entries.delete[0]"]


@pytest.mark.parametrize("generation", [5, 3])
def test_stale_generation_is_refused(example, generation):
    example["generation"] = 5
    stored = validate(example)
    with pytest.raises(StalePayload, match=f"generation {generation} is not newer than the applied generation 5"):
        validate({"generation": generation, "dns": {"domain": "x.internal"}}, stored)


def test_generation_must_be_positive(example):
    example["generation"] = 0
    assert "generation" in problems_of(example)


def test_vr_schema_prints_json_schema(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vr", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(result.stdout)
    assert "dhcp_entries" in schema["properties"] and "generation" in schema["required"]


def test_cli_reports_paths_and_changes_nothing(tmp_path, example):
    example["dhcp"]["entries"][0]["mac"] = "zz"
    payload = tmp_path / "bad.json"
    payload.write_text(json.dumps(example))
    root = tmp_path / "router"
    result = subprocess.run(
        [sys.executable, "-m", "vr", "--root", str(root), "apply", str(payload)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "dhcp.entries[0].mac" in result.stderr and "nothing was changed" in result.stderr
    settings = Settings.under_root(root)
    assert not settings.document_path.exists()
    assert not (settings.config_dir / "dnsmasq").exists()


def test_monitor_settings_are_checked_by_name(example):
    example["monitor"] = {
        "alert_url": "http://manager/alerts\nX-Injected: 1",
        "services": {"sshd": {}},
        "restart": {"backoff_initial_s": 5, "backoff_max_s": 1},
    }
    found = problems_of(example)
    assert "http:// or https:// URL" in found["monitor.alert_url"]
    assert "unknown service(s) sshd" in found["monitor.services"]
    assert found["monitor.restart"] == "backoff_max_s may not be less than backoff_initial_s"
    example["monitor"] = {"services": {"dnsmasq": {"interval_s": 1, "timeout_s": 2}}}
    assert problems_of(example)["monitor.services.dnsmasq"] == "timeout_s may not exceed interval_s"


def shared(example: dict, addresses: list[str], gateways: list[str]) -> dict:
    tier2 = next(i for i in example["interfaces"] if i["id"] == "tier2")
    tier2["addresses"], tier2["gateways"] = addresses, gateways
    return example


@pytest.mark.parametrize(("addresses", "gateways", "path", "reason"), [
    (["10.1.2.1/24"], ["10.1.3.1"], "interfaces[3].gateways[0]", "not inside any of the tier's IPv4 subnets"),
    (["10.1.2.1/24"], ["10.1.2.1"], "interfaces[3].gateways[0]", "the router's own address"),
    (["10.1.2.1/24"], ["10.1.2.255"], "interfaces[3].gateways[0]", "network or broadcast"),
    (["10.1.2.1/24", "10.9.0.2/24"], ["10.1.2.254"], "interfaces[3].gateways", "10.9.0.0/24 of a shared tier has no gateway"),
    (["10.1.2.1/24"], ["10.1.2.254", "10.1.2.253"], "interfaces[3].gateways[1]", "already has a gateway"),
    (["10.1.2.1/24", "10.1.2.2/24"], [], "interfaces[3].addresses[1]", "one per subnet"),
])  # fmt: skip
def test_a_shared_tiers_gateways_are_checked_one_by_one(example, addresses, gateways, path, reason):
    found = problems_of(shared(example, addresses, gateways))
    assert reason in found[path]


def test_a_dhcp_router_routes_nothing_and_the_router_neither_nats_nor_filters_a_shared_tier(example):
    doc = shared(example, ["10.1.2.1/24"], ["10.1.2.254"])
    doc["nat"]["source_nat"] = [{"tier": "tier2", "ip": "192.0.2.10"}]
    doc["firewall"]["egress"] = [{"tier": "tier2", "default": "deny"}]
    found = problems_of(doc)
    assert "shared network" in found["nat.source_nat[0].tier"]
    assert "shared network" in found["firewall.egress[0].tier"]
    dhcp_only = shared(json.loads(json.dumps(example)), ["10.1.2.1/24"], ["10.1.2.254"])
    dhcp_only["router"]["type"] = "dhcp"
    found = problems_of(dhcp_only)
    assert "no public interface" in found["interfaces[1].role"]
    assert "shared networks" in found["interfaces[2].gateways"]  # tier1 is routed


def test_a_shared_tiers_vms_take_any_of_its_subnets_but_not_a_gateway(example):
    doc = shared(example, ["10.1.2.1/24", "10.9.0.2/24"], ["10.1.2.254", "10.9.0.1"])
    doc["dhcp"]["entries"] += [{"tier": "tier2", "mac": "02:00:00:00:09:10", "ip": "10.9.0.10", "hostname": "alias1"},
                               {"tier": "tier2", "mac": "02:00:00:00:09:11", "ip": "10.9.0.1", "hostname": "alias2"},
                               {"tier": "tier2", "mac": "02:00:00:00:09:12", "ip": "10.8.0.1", "hostname": "alias3"}]  # fmt: skip
    found = problems_of(doc)
    assert "dhcp.entries[2].ip" not in found
    assert "gateway" in found["dhcp.entries[3].ip"] and "outside tier tier2" in found["dhcp.entries[4].ip"]


@pytest.mark.parametrize(("lease_time", "fine"), [("infinite", True), (120, True), (31536000, True), (119, False),
                                                  ("forever", False), (True, False), ("3600", False)])  # fmt: skip
def test_a_vms_own_lease_time_is_seconds_or_infinite(example, lease_time, fine):
    example["dhcp"]["entries"][0]["lease_time"] = lease_time
    if fine:
        assert validate(example).dhcp.entries[0].lease_time == lease_time
    else:
        assert "dhcp.entries[0].lease_time" in problems_of(example)


def test_an_option_given_twice_or_against_default_gateway_is_refused(example):
    example["dhcp"]["tiers"][0]["options"] = [{"name": "router", "values": ["10.1.1.254"]}, {"code": 3, "values": []}]
    example["dhcp"]["entries"][0] |= {"default_gateway": False, "options": [{"name": "router", "values": ["10.1.1.9"]}]}
    found = problems_of(example)
    assert "same option as dhcp.tiers[0].options[0]" in found["dhcp.tiers[0].options[1]"]
    assert "contradicts default_gateway" in found["dhcp.entries[0].options"]


def test_public_dns_needs_a_public_interface(example):
    example["dns"]["public"] = True
    validate(example)
    example["interfaces"] = [i for i in example["interfaces"] if i["role"] != "public"]
    example["nat"] = {}
    example["firewall"] = {}
    example["routes"] = []
    assert "no public interface" in problems_of(example)["dns.public"]


def test_a_private_gateway_belongs_to_a_vpc_and_source_nat_to_a_private_gateway(example):
    example["interfaces"].append({"id": "pgw", "role": "private_gateway", "name": "eth4", "addresses": ["172.16.0.10/24"]})
    assert "router.type vpc" in problems_of(example)["interfaces[4].role"]
    example["router"]["type"] = "vpc"
    example["interfaces"][4]["source_nat"] = True
    assert validate(example).interfaces[4].source_nat
    example["interfaces"][2]["source_nat"] = True
    assert "applies to a private_gateway" in problems_of(example)["interfaces[2]"]


def test_the_stored_form_of_every_shape_loads_back_the_same(example):
    """The store keeps model_dump's output, every default written out: whatever a payload may
    leave out must load back from that form (a daemon restart, a fallback apply)."""
    example["router"]["type"] = "vpc"
    example["nat"]["public_ips"].append({"ip": "192.0.2.12"})
    rule = {"public_ip": "192.0.2.12", "private_port": 8000, "members": [{"ip": "10.1.1.10"}]}
    example["load_balancer"] = {"rules": [
        {**rule, "id": "raw", "public_port": 81, "protocol": "tcp", "proxy_protocol": "v2"},
        {**rule, "id": "plain", "public_port": 82},
        {**rule, "id": "source", "public_port": 83, "stickiness": {"type": "source", "table_size": 10}},
        {**rule, "id": "prefix", "public_port": 84, "stickiness": {"type": "cookie", "cookie": "J", "mode": "prefix"}},
        {**rule, "id": "app", "public_port": 85, "stickiness": {"type": "app_cookie", "cookie": "s", "length": 9}},
        {**rule, "id": "noxff", "public_port": 86, "forwarded_headers": False},
    ], "stats": {"address": "169.254.0.10", "username": "ops", "password": "password1"}}  # fmt: skip
    example["network_acls"] = [{"tier": "tier1", "ingress": [
        {"number": 1, "action": "deny", "protocol": "icmp", "icmp_type": 8, "icmp_code": 0},
        {"number": 2, "action": "allow", "protocol": "icmpv6"},
        {"number": 3, "action": "allow", "protocol": "all"},
    ]}]  # fmt: skip
    example["firewall"]["egress"] = [e for e in example["firewall"]["egress"] if e["tier"] != "tier1"]
    example["dhcp"]["entries"][0]["lease_time"] = "infinite"
    doc = validate(example)
    stored = json.loads(doc.model_dump_json())
    assert validate(stored) == doc
