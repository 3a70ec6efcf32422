"""The ipv6 section and IPv6 on DHCP entries: what is refused (by path), and how a removed
prefix retires from radvd's config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tests.conftest import EXAMPLES
from vr.foundation import document as docmod
from vr.foundation.errors import InvalidPayload
from vr.foundation.settings import Settings
from vr.services import SERVICES
from vr.services.radvd import CONFIG, RETIRE_S, RadvdService, _retiring
from vr.services.runtime import Runtime

LAB_IPV6 = json.loads((EXAMPLES.parent / "lab" / "ipv6.json").read_text())


def with_ipv6(example: dict, **ipv6) -> dict:
    """The example router with the lab's IPv6 addresses, routes and db1's IPv6 address."""
    lab = copy.deepcopy(LAB_IPV6)
    example["interfaces"], example["routes"] = lab["interfaces"], lab["routes"]
    example["ipv6"] = {**lab["ipv6"], **ipv6}
    for entry in example["dhcp"]["entries"]:
        if entry["hostname"] == "db1":
            entry["ipv6"] = "2001:db8:1:2::10"
    return example


def problems(example: dict) -> dict[str, str]:
    try:
        doc = docmod.build_document(example)
    except InvalidPayload as error:
        return {p.path: p.reason for p in error.problems}
    return {p.path: p.reason for service in SERVICES for p in service.verify(doc)}


def test_the_lab_ipv6_router_is_valid(example):
    assert problems(with_ipv6(example)) == {}


def test_tiers_need_a_global_64_of_their_own(example):
    example = with_ipv6(example)
    tier1 = next(i for i in example["interfaces"] if i["id"] == "tier1")
    tier1["addresses"] = ["10.1.1.1/24", "2001:db8:1:1::1/56"]
    tier2 = next(i for i in example["interfaces"] if i["id"] == "tier2")
    tier2["addresses"] = ["10.1.2.1/24"]
    example["ipv6"]["tiers"].append({"tier": "tier1"})
    example["ipv6"]["firewall"] = {}
    for entry in example["dhcp"]["entries"]:
        entry.pop("ipv6", None)
    found = problems(example)
    assert "is not in a /64" in found["ipv6.tiers[0].tier"]
    assert "has no IPv6 address" in found["ipv6.tiers[1].tier"]
    assert found["ipv6.tiers[2].tier"] == "already ipv6.tiers[0]"


def test_router_advertisement_settings_are_checked(example):
    found = problems(with_ipv6(example, tiers=[{"tier": "tier1", "ra": {"preferred_lifetime_s": 90000}}]))
    assert "preferred_lifetime_s may not exceed valid_lifetime_s" in found["ipv6.tiers[0].ra"]
    found = problems(with_ipv6(example, tiers=[{"tier": "tier1", "ra": {"mtu": 1500}}]))
    assert found["ipv6.tiers[0].ra.mtu"] == "1500 is above the interface MTU 1450"


def test_vm_addresses_stay_inside_their_tier(example):
    example = with_ipv6(example)
    entries = example["dhcp"]["entries"]
    entries[0]["ipv6"] = "2001:db8:1:2::10"  # web1, tier1: tier2's prefix, and db1's address
    entries.append({"tier": "tier2", "mac": "02:00:00:00:02:11", "ip": "10.1.2.11", "hostname": "db2",
                    "ipv6": "2001:db8:1:2::1"})  # fmt: skip
    entries.append({"tier": "tier2", "mac": "02:00:00:00:02:12", "ip": "10.1.2.12", "hostname": "db3",
                    "ipv6": "2001:db8:1:2::10", "duid": "00:01:00:01:AB:CD:EF:01"})  # fmt: skip
    found = problems(example)
    assert found["dhcp.entries[0].ipv6"] == "2001:db8:1:2::10 is outside tier tier1 prefix 2001:db8:1:1::/64"
    assert found["dhcp.entries[2].ipv6"] == "2001:db8:1:2::1 is the router's own address"
    assert found["dhcp.entries[3].ipv6"] == "2001:db8:1:2::10 is already used by dhcp.entries[1]"
    example["dhcp"]["entries"][0]["duid"] = "zz"
    assert "not a valid DUID" in problems(example)["dhcp.entries[0].duid"]


def test_firewall_rules_are_on_ipv6_tiers_and_never_overlap(example):
    rule = {"id": "web", "destination": "2001:db8:1:1::10/128", "protocol": "tcp", "ports": "80-90"}
    found = problems(with_ipv6(example, firewall={
        "ingress": [rule, {**rule, "id": "web2", "ports": 85}, {**rule, "id": "far", "destination": "2001:db8:9::/64"},
                    {**rule, "id": "web", "ports": 443}],
        "egress": [{"tier": "tier1", "rules": [{"protocol": "all"}, {"protocol": "all", "destination_cidrs": ["2001:db8::/32"]}]},
                   {"tier": "tier3"}],
    }))  # fmt: skip
    assert found["ipv6.firewall.ingress[1]"] == (
        "ipv6 ingress rule 'web2' overlaps ipv6 ingress rule 'web' (ipv6.firewall.ingress[0]): tcp port 85")
    assert found["ipv6.firewall.ingress[2].destination"] == "2001:db8:9::/64 is inside no IPv6 tier's prefix"
    assert found["ipv6.firewall.ingress[3].id"] == "ipv6 ingress rule 'web' is already ipv6.firewall.ingress[0]"
    assert "ipv6.firewall.ingress[3]" not in found  # port 443 overlaps nothing
    assert found["ipv6.firewall.egress[0].rules[1]"] == (
        "ipv6 egress rule overlaps ipv6 egress rule ipv6.firewall.egress[0].rules[0]: all traffic")
    assert found["ipv6.firewall.egress[1].tier"] == "'tier3' is not an IPv6 tier"


def radvd_files(example: dict, tmp_path: Path, live: bytes | None = None) -> str:
    runtime = Runtime(Settings.under_root(tmp_path))
    if live is not None:
        (runtime.settings.service_dir("radvd")).mkdir(parents=True, exist_ok=True)
        (runtime.settings.service_dir("radvd") / CONFIG).write_bytes(live)
    return RadvdService().generate(docmod.build_document(example), runtime)[CONFIG].decode()


def test_a_removed_prefix_retires_with_zero_lifetimes_then_goes(example, tmp_path):
    both = radvd_files(with_ipv6(example), tmp_path)
    example = with_ipv6(example, tiers=LAB_IPV6["ipv6"]["tiers"][1:], firewall={})
    for entry in example["dhcp"]["entries"]:
        entry.pop("ipv6", None)
    example["ipv6"]["tiers"][0]["mode"] = "slaac"
    retiring = radvd_files(example, tmp_path, live=both.encode())
    block = retiring[retiring.index("interface eth2") :]
    assert "AdvDefaultLifetime 0;" in block and "# retiring until" in block
    assert "prefix 2001:db8:1:1::/64 {" in block and "AdvValidLifetime 0;" in block
    assert "AdvPreferredLifetime 0;" in block
    # Another render keeps the same deadline; once it has passed, the prefix is gone.
    (until,) = [int(line.split()[3].rstrip(":")) for line in retiring.splitlines() if "retiring until" in line]
    tiers = {"eth3": {"prefixes": [{"prefix": "2001:db8:1:2::/64"}]}}
    assert _retiring(retiring.encode(), tiers, now=until - 1) == [("eth2", "2001:db8:1:1::/64", until)]
    assert _retiring(retiring.encode(), tiers, now=until) == []
    assert _retiring(both.encode(), tiers, now=1000) == [("eth2", "2001:db8:1:1::/64", 1000 + RETIRE_S)]
