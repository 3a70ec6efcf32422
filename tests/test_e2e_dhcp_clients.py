"""DHCP as clients other than dhclient see it: dhcpcd (DHCPv6) and busybox udhcpc (CirrOS-style
guests), real clients in the lab's guest namespaces, each with its own state and a script that
only records what it was given (vr.lab.harness: dhcpcd6, udhcpc)."""

from __future__ import annotations

import json
import shutil
import subprocess
from ipaddress import ip_address

import pytest

from tests.conftest import EXAMPLES, example_lab, write_payload

IPV6 = json.loads((EXAMPLES.parent / "lab" / "ipv6.json").read_text())
DB1_V6 = "2001:db8:1:2::10"  # configs/lab/ipv6.json: db1 (02:00:00:00:02:10) on tier2, DHCPv6
DNS6 = "2001:db8:1:1::1"  # the router on tier1, asked from g1


def ipv6_payload(generation: int, lease_time: int | None = None) -> dict:
    payload = json.loads(json.dumps(IPV6))
    if lease_time is not None:
        payload["ipv6"]["tiers"][1]["lease_time"] = lease_time
    return {**payload, "generation": generation}


def names(lab, name: str) -> dict[str, list[str]]:
    """What a guest on tier1 gets for a name: its A and AAAA answers."""
    fqdn = f"{name}.cloud.internal"
    return {rdtype: lab.resolve(lab.ns("g1"), fqdn, DNS6, rdtype=rdtype) for rdtype in ("A", "AAAA")}


def ptr(lab, address: str) -> list[str]:
    return lab.resolve(lab.ns("g1"), ip_address(address).reverse_pointer + ".", DNS6, rdtype="PTR")


def v6_leases(lab) -> list[str]:
    """dnsmasq's DHCPv6 lease lines ('expiry iaid address name client-id')."""
    text = (lab.settings.state_dir / "dnsmasq.leases").read_text()
    return [line for line in text.splitlines() if len(fields := line.split()) == 5 and ":" in fields[2]]


def address_of(lease: dict[str, str]) -> str | None:
    return lease.get("new_dhcp6_ia_na1_ia_addr1")


@pytest.fixture
def v6lab():
    with example_lab() as lab:  # g1 and g2 hold IPv4 leases (dhclient)
        yield lab


def test_dhcpv6_lease_time_is_the_ipv6_tiers(v6lab, tmp_path):
    lab = v6lab
    lab.vr("apply", write_payload(tmp_path, ipv6_payload(2, lease_time=7200)))
    lease = lab.dhcpcd6("g2")
    assert address_of(lease) == DB1_V6, (lab.dir / "g2.dhcpcd" / "client.log").read_text()[-2000:]
    assert lease["new_dhcp6_ia_na1_ia_addr1_vltime"] == "7200"  # ipv6.tiers[].lease_time, not dhcp's 3600
    assert lab.guest_lease("g2")["address"] == "10.1.2.10"
    assert "option dhcp-lease-time 3600;" in (lab.dir / "g2.leases").read_text()  # IPv4 keeps dhcp.tiers'


def test_deleted_or_renamed_vm_keeps_no_ipv6_lease_or_name(v6lab, tmp_path):
    lab = v6lab
    lab.vr("apply", write_payload(tmp_path, ipv6_payload(2)))
    lease = lab.dhcpcd6("g2")
    assert address_of(lease) == DB1_V6, (lab.dir / "g2.dhcpcd" / "client.log").read_text()[-2000:]
    assert lease["new_dhcp6_ia_na1_ia_addr1_vltime"] == "86400"  # the default of ipv6.tiers[].lease_time
    assert names(lab, "db1") == {"A": ["10.1.2.10"], "AAAA": [DB1_V6]}

    # Renamed (same MAC and addresses): the old name answers nothing, in IPv4 or IPv6.
    renamed = {"tier": "tier2", "mac": "02:00:00:00:02:10", "ip": "10.1.2.10", "hostname": "db7", "ipv6": DB1_V6}
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "dhcp_entries": {"upsert": [renamed]}}))
    assert names(lab, "db1") == {"A": [], "AAAA": []}
    assert names(lab, "db7") == {"A": ["10.1.2.10"], "AAAA": [DB1_V6]}
    assert ptr(lab, DB1_V6) == ["db7.cloud.internal."]
    assert not [line for line in v6_leases(lab) if " db1 " in line]

    # Deleted: neither its name nor its address answer, and its DHCPv6 lease is gone.
    lab.vr("apply", write_payload(tmp_path, {"generation": 4, "dhcp_entries": {"delete": ["02:00:00:00:02:10"]}}))
    assert names(lab, "db7") == {"A": [], "AAAA": []}
    assert ptr(lab, DB1_V6) == []
    assert not [line for line in v6_leases(lab) if f" {DB1_V6} " in line]

    # A new VM given the same IPv6 address gets it now, not "no addresses available".
    app2 = {"tier": "tier2", "mac": "02:00:00:00:02:99", "ip": "10.1.2.99", "hostname": "app2", "ipv6": DB1_V6}
    lab.vr("apply", write_payload(tmp_path, {"generation": 5, "dhcp_entries": {"upsert": [app2]}}))
    lab.stop_dhclient("g2")
    lab.set_guest_mac("g2", "02:00:00:00:02:99")
    for step in (
        ["link", "set", "eth0", "down"],
        ["-6", "addr", "flush", "dev", "eth0"],
        ["link", "set", "eth0", "up"],
    ):
        subprocess.run(["ip", "-n", lab.ns("g2"), *step], check=True)  # its own link-local address, from its MAC
    shutil.rmtree(lab.dir / "g2.dhcpcd")  # a new client: a new DUID
    lease = lab.dhcpcd6("g2")
    assert address_of(lease) == DB1_V6, (lab.dir / "g2.dhcpcd" / "client.log").read_text()[-2000:]
    assert names(lab, "app2")["AAAA"] == [DB1_V6]
    assert ptr(lab, DB1_V6) == ["app2.cloud.internal."]


def test_every_client_gets_the_tier_mtu_even_when_it_does_not_ask(lab):
    # busybox udhcpc asks for no MTU (option 26); the tier's MTU reaches it all the same.
    g1 = lab.udhcpc("g1")
    assert g1["ip"] == "10.1.1.10" and g1["router"] == "10.1.1.1"
    assert g1["mtu"] == "1450"
    assert lab.udhcpc("g2")["mtu"] == "1500"
    assert lab.guest_lease("g1")["mtu"] == "1450"  # dhclient, which asks for it, still gets it
    assert lab.guest_lease("g1")["link_mtu"] == 1450
