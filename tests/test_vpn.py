"""The vpn section: what the document accepts, and that secrets never come back in a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from vr.foundation import document as docmod
from vr.foundation.errors import InvalidPayload
from vr.foundation.settings import Settings
from vr.services import swanctl
from vr.services.base import Change, CheckFailed
from vr.services.runtime import Runtime
from vr.services.strongswan import StrongswanService

PSK = "correct-horse-battery-staple"


def tunnel(**changes) -> dict:
    base = {"id": "site-b", "local_ip": "192.0.2.10", "peer_ip": "198.51.100.2",
            "local_subnets": ["10.1.0.0/16"], "peer_subnets": ["10.20.0.0/16"], "psk": PSK}  # fmt: skip
    return {**base, **changes}


def access(**changes) -> dict:
    base = {"public_ip": "192.0.2.13", "pool": "10.99.0.0/24", "dns": ["10.1.1.1"], "psk": PSK,
            "users": [{"username": "alice", "password": "alice-secret-1"}]}  # fmt: skip
    return {**base, **changes}


def problems(example: dict, vpn: dict) -> dict[str, str]:
    """Every refusal: the document's own, then strongSwan's verify."""
    example["vpn"] = vpn
    example["nat"]["public_ips"].append({"ip": "192.0.2.13"})
    try:
        doc = docmod.build_document(example)
    except InvalidPayload as error:
        return {p.path: p.reason for p in error.problems}
    return {p.path: p.reason for p in StrongswanService().verify(doc)}


def test_a_tunnel_and_remote_access_are_valid(example):
    assert problems(example, {"site_to_site": [tunnel()], "remote_access": access()}) == {}


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("ike_proposals", ["aes256-sha256-modp2047"], "unknown IKE proposal keyword 'modp2047'"),
        ("esp_proposals", ["sha256-modp2048"], "needs an encryption algorithm"),
        ("ike_version", 3, "Input should be 1 or 2"),
        ("esp_lifetime_s", 90000, "less than or equal to 86400"),
        ("dpd_action", "explode", "Input should be"),
        ("local_subnets", [], "at least 1 item"),
    ],
)
def test_tunnel_settings_are_checked(example, field, value, reason):
    found = problems(example, {"site_to_site": [tunnel(**{field: value})]})
    assert any(reason in message for path, message in found.items() if path.startswith(f"vpn.site_to_site[0].{field}"))


@pytest.mark.parametrize(
    ("secret", "reason"),
    [("short-psk", "at least 16 characters"), ("a-long-enough-key\nwith-newline", "control characters")],
)
def test_secrets_are_checked_and_never_repeated(example, secret, reason):
    found = problems(example, {"site_to_site": [tunnel(psk=secret)],
                               "remote_access": access(users=[{"username": "bob", "password": secret[:7]}])})  # fmt: skip
    assert reason in found["vpn.site_to_site[0].psk"]
    assert "at least 8 characters" in found["vpn.remote_access.users[0].password"]
    assert not any(secret[:7] in message for message in found.values())


def test_gateways_must_be_ours_and_free_for_ike(example):
    example["nat"]["port_forwarding"].append(
        {"id": "ike", "public_ip": "192.0.2.13", "protocol": "udp", "public_ports": "400-600",
         "private_ip": "10.1.1.10", "private_ports": "400-600"}
    )  # fmt: skip
    found = problems(example, {"site_to_site": [tunnel(local_ip="192.0.2.20", peer_ip="192.0.2.10")],
                               "remote_access": access()})  # fmt: skip
    assert "not an assigned public IP" in found["vpn.site_to_site[0].local_ip"]  # 192.0.2.20 is reserved
    assert "this router's own address" in found["vpn.site_to_site[0].peer_ip"]
    assert "udp 192.0.2.13:500 is a port forward" in found["vpn.remote_access.public_ip"]


def test_subnets_and_pool_do_not_collide(example):
    tunnels = [
        tunnel(peer_subnets=["10.1.2.0/25"]),  # inside tier2
        tunnel(id="site-c", peer_ip="198.51.100.3", local_subnets=["172.16.0.0/12"], peer_subnets=["10.20.5.0/24"]),
        tunnel(id="site-c", peer_ip="198.51.100.3", peer_subnets=["10.99.0.0/16"]),
    ]
    found = problems(example, {"site_to_site": tunnels, "remote_access": access(pool="10.1.1.0/24")})
    assert "overlaps the guest tier 10.1.2.0/24" in found["vpn.site_to_site[0].peer_subnets[0]"]
    assert "holds none of the guest tiers" in found["vpn.site_to_site[1].local_subnets[0]"]
    assert "already vpn.site_to_site[1]" in found["vpn.site_to_site[2].id"]
    assert "the same gateways as vpn.site_to_site[1]" in found["vpn.site_to_site[2].peer_ip"]
    assert "overlaps the guest tier 10.1.1.0/24" in found["vpn.remote_access.pool"]
    other = problems(example, {"site_to_site": tunnels[1:2] + [tunnel(peer_subnets=["10.20.0.0/16"])]})
    assert "overlaps vpn.site_to_site[0].peer_subnets[0]" in other["vpn.site_to_site[1].peer_subnets[0]"]


def test_remote_access_needs_one_server_identity_and_unique_users(example):
    found = problems(example, {"remote_access": access(psk=None)})
    assert "psk or certificate" in found["vpn.remote_access"]
    user = {"username": "alice", "password": "another-secret"}
    found = problems(example, {"remote_access": access(users=[user, user])})
    assert "already users[0]" in found["vpn.remote_access.users[1].username"]
    found = problems(example, {"remote_access": access(users=[{"username": "al ice", "password": "x" * 8}])})
    assert "not a valid VPN user name" in found["vpn.remote_access.users[0].username"]


def test_a_gateway_may_not_be_a_static_nat_ip(example):
    found = problems(example, {"site_to_site": [tunnel(local_ip="192.0.2.11")]})  # static NAT to 10.1.2.10
    assert "taken whole by a static NAT" in found["vpn.site_to_site[0].local_ip"]


def rendered(example: dict, vpn: dict, tmp_path: Path) -> dict[str, bytes]:
    example["vpn"] = vpn
    example["nat"]["public_ips"].append({"ip": "192.0.2.13"})
    doc = docmod.build_document(example)
    return StrongswanService().generate(doc, Runtime(Settings.under_root(tmp_path)))


def test_fragments_read_back_as_the_vici_messages_charon_gets(example, tmp_path):
    files = rendered(example, {"site_to_site": [tunnel(passive=True)], "remote_access": access()}, tmp_path)
    assert sorted(files) == ["remote-access.conf", "remote-access.secrets", "s2s-site-b.conf", "s2s-site-b.secrets",
                             "strongswan-check.conf", "strongswan.conf", "user-alice.secrets", "vpn-load.sh"]  # fmt: skip
    conn = swanctl.messages(swanctl.parse(files["s2s-site-b.conf"].decode()), None).conns["s2s-site-b"]
    assert conn["remote_addrs"] == ["198.51.100.2"] and conn["local"] == {"auth": "psk", "id": "192.0.2.10"}
    assert conn["children"]["s2s-site-b"]["remote_ts"] == ["10.20.0.0/16"]
    assert conn["children"]["s2s-site-b"]["start_action"] == "none"  # passive: waits for the peer
    secrets = swanctl.messages(swanctl.parse(files["s2s-site-b.secrets"].decode()), None).shared
    assert secrets == {"ike-s2s-site-b": {"id": "ike-s2s-site-b", "type": "IKE", "data": PSK.encode(),
                                          "owners": ["192.0.2.10", "198.51.100.2"]}}  # fmt: skip
    assert PSK not in files["s2s-site-b.secrets"].decode()  # written as 0s<base64>: nothing to escape
    pools = swanctl.messages(swanctl.parse(files["remote-access.conf"].decode()), None).pools
    assert pools == {"remote-access": {"addrs": "10.99.0.0/24", "dns": ["10.1.1.1"]}}


def test_a_psk_with_syntax_characters_stays_a_secret(example, tmp_path):
    hostile = r'k"} \n connections { evil { } } # = , {'
    files = rendered(example, {"site_to_site": [tunnel(psk=hostile)]}, tmp_path)
    shared = swanctl.messages(swanctl.parse(files["s2s-site-b.secrets"].decode()), None).shared
    assert shared["ike-s2s-site-b"]["data"] == hostile.encode()


def test_the_reader_refuses_what_vr_never_writes_without_quoting_it():
    with pytest.raises(swanctl.SwanctlError, match="line 2") as error:
        swanctl.parse('secrets {\n  ike-x { secret = "hunter2-hunter2" }\n}\n')
    assert "hunter2" not in str(error.value)
    with pytest.raises(swanctl.SwanctlError, match="not closed"):
        swanctl.parse("connections {\n  a {\n}\n")
    with pytest.raises(swanctl.SwanctlError):
        swanctl.value("10.0.0.0/8\nconnections {")


def test_charon_itself_checks_what_is_loaded(example, tmp_path):
    """The checker is a real charon in an empty network namespace; a proposal it does not
    know fails the check, with charon's own words, before anything live is touched."""
    runtime = Runtime(Settings.under_root(tmp_path))
    runtime.settings.ensure_dirs()
    files = rendered(example, {"site_to_site": [tunnel()]}, tmp_path)
    staged = tmp_path / "staged"
    staged.mkdir()
    files["s2s-site-b.conf"] = files["s2s-site-b.conf"].replace(b"aes256-sha256-modp2048", b"aes256-sha256-modp2047")
    for name, content in files.items():
        (staged / name).write_bytes(content)
    change = Change("strongswan", generated=files, written=dict(files))
    with pytest.raises(CheckFailed, match="invalid value for: proposals"):
        StrongswanService().check(staged, change, runtime)
    files["s2s-site-b.conf"] = files["s2s-site-b.conf"].replace(b"modp2047", b"modp2048")
    (staged / "s2s-site-b.conf").write_bytes(files["s2s-site-b.conf"])
    StrongswanService().check(staged, change, runtime)  # the good one passes
    assert not list(runtime.settings.run_dir.glob("charon-check*"))  # the one-off checker left nothing behind


@pytest.mark.parametrize(
    ("proposal", "keyword"),
    [
        ("aes256-aesxcbc-modp2048", "aesxcbc"),  # integrity, and the PRF charon derives from it
        ("aes256-sha256-prfaesxcbc-modp2048", "prfaesxcbc"),
        ("aes128-aescmac-ecp256", "aescmac"),
    ],
)
def test_a_keyword_this_charon_cannot_do_is_refused(example, proposal, keyword):
    """The keyword is strongSwan's, but the charon this router ships has no plugin for it:
    the tunnel would never come up (key derivation fails at runtime), so it is refused."""
    found = problems(example, {"site_to_site": [tunnel(ike_proposals=["aes256-sha256-modp2048", proposal])]})
    assert list(found) == ["vpn.site_to_site[0].ike_proposals[1]"], found
    assert f"{keyword!r}" in found["vpn.site_to_site[0].ike_proposals[1]"]


def test_keywords_this_charon_implements_are_accepted(example):
    ike = ["aes256gcm16-prfsha384-curve448", "chacha20poly1305-prfsha256-x25519", "aes128ccm16-prfsha256-ecp384",
           "camellia256-sha512-modp4096", "3des-md5-modp1024"]  # fmt: skip
    esp = ["aes256gcm16-curve448", "chacha20poly1305", "aes128-sha384-modp3072-esn", "aes256-sha1"]
    assert problems(example, {"site_to_site": [tunnel(ike_proposals=ike, esp_proposals=esp)]}) == {}


def test_remote_access_does_not_advertise_the_routers_addresses(example, tmp_path):
    """MOBIKE would send a client every address of the router (ADDITIONAL_IP4_ADDRESS), guest
    tiers included; the router does not move, so it is off, as for the tunnels."""
    files = rendered(example, {"site_to_site": [tunnel()], "remote_access": access()}, tmp_path)
    for name, conn in [("remote-access", "remote-access.conf"), ("s2s-site-b", "s2s-site-b.conf")]:
        loaded = swanctl.messages(swanctl.parse(files[conn].decode()), None).conns[name]
        assert loaded["mobike"] == "no", name
