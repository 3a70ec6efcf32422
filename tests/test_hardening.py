"""Hostile and careless input: every refusal is exit 2 with the path and the reason, never
a traceback, never a value coerced into something the manager did not mean, never an
echo of a huge value, and never a stored document that the next command cannot load."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, make_ca_and_certificate
from vr.foundation import document as docmod
from vr.foundation import jsontext
from vr.foundation.errors import InvalidPayload, StalePayload
from vr.foundation.settings import Settings
from vr.transaction.pipeline import Pipeline

EXAMPLE = json.loads((EXAMPLES / "router.json").read_text())


def example(**changes) -> dict:
    doc = copy.deepcopy(EXAMPLE)
    doc.update(changes)
    return doc


def vr_offline(root: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """vr with no namespace: only for payloads refused before anything is applied."""
    return subprocess.run([sys.executable, "-m", "vr", "--root", str(root), *args], input=stdin,
                          capture_output=True, timeout=60, check=False)  # fmt: skip


def refused(raw: object) -> dict[str, str]:
    """path -> reason of what parse + merge refuse, for a router with the example stored."""
    stored = docmod.merge(None, docmod.parse_payload(EXAMPLE))
    with pytest.raises(InvalidPayload) as caught:
        docmod.merge(stored, docmod.parse_payload(raw))
    return {p.path: p.reason for p in caught.value.problems}


# ------------------------------------------------------------------ JSON text from outside
DEEP = b'{"generation": 2, "routes": ' + b"[" * 10000 + b"]" * 10000 + b"}"
TEXTS = {
    "nested 10,000 deep": (DEEP, "nested too deep"),
    "invalid UTF-8": (b'{"generation": 2, "dns": {"domain": "caf\xe9"}}', "not UTF-8 text: invalid byte at offset"),
    "UTF-16": ('{"generation": 2}'.encode("utf-16"), "byte order mark"),
    "UTF-16 without BOM": ('{"generation": 2}'.encode("utf-16-le"), "not valid JSON"),
    "5,000-digit integer": (b'{"generation": ' + b"9" * 5000 + b"}", "an integer of 5000 digits"),
    "duplicate top-level key": (b'{"generation": 2, "dns": {"domain": "a.internal"}, "dns": {"domain": "b.internal"}}',
                                "key 'dns' appears twice"),
    "duplicate nested key": (b'{"generation": 2, "dns": {"domain": "a.internal", "domain": "b.internal"}}',
                             "dns: key 'domain' appears twice"),
    "NaN": (b'{"generation": NaN}', "NaN is not JSON"),
    "huge float": (b'{"generation": 2, "monitor": {"services": {"dnsmasq": {"interval_s": 1e999}}}}',
                   "a number out of range"),
    "lone surrogate": (b'{"generation": 2, "router": {"name": "r\\ud800", "type": "vpc"}}',
                       "router.name: a lone UTF-16 surrogate"),
    "not an object": (b"[1, 2]", "a payload is a JSON object"),
    "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_unreadable_json_is_refused_by_the_cli_with_the_reason(tmp_path, name):
    data, reason = TEXTS[name]
    result = vr_offline(tmp_path / "router", "apply", "-", stdin=data)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "payload refused, nothing was changed" in stderr and reason in stderr, stderr
    assert not (tmp_path / "router" / "state" / "document.json").exists()


def test_the_json_reader_keeps_paired_surrogates_and_ordinary_text():
    assert jsontext.loads(b'{"a": "\\ud83d\\ude00", "b": [1, -2, 3.5], "c": null}') == {"a": "\U0001f600",
                                                                                      "b": [1, -2, 3.5], "c": None}


# ------------------------------------------------------------------ strict types
@pytest.mark.parametrize(
    ("payload", "path", "reason"),
    [
        ({"generation": "13"}, "generation", "expected an integer, got a string"),
        ({"generation": True}, "generation", "expected an integer, got a boolean"),
        ({"generation": 2.0}, "generation", "expected an integer, got a number"),
        ({"generation": 2, "routes": [{"destination": 0, "gateway": "192.0.2.1"}]}, "routes[0].destination",
         "not a valid IP network: expected a string, got int"),
        ({"generation": 2, "routes": [{"destination": "0.0.0.0/0", "gateway": 3232235777}]}, "routes[0].gateway",
         "expected a string"),
        ({"generation": 2, "routes": [{"destination": "fe80::/64%eth0", "gateway": "fe80::1"}]},
         "routes[0].destination", "not a valid IP network"),
        ({"generation": 2, "dns": {"domain": "cloud.internal", "cache_size": "1000"}}, "dns.cache_size",
         "expected an integer, got a string"),
        ({"generation": 2, "interfaces": [{"id": "x", "role": "guest", "name": "eth9", "addresses": [10]}]},
         "interfaces[0].addresses[0]", "expected a string"),
        ({"generation": 2, "firewall": {"ingress": [{"id": "r", "public_ip": "192.0.2.10", "protocol": "tcp",
                                                     "ports": True}]}}, "firewall.ingress[0].ports", "expected"),
        ({"generation": 2, "firewall": {"ingress": [{"id": "r", "public_ip": "192.0.2.10", "protocol": "tcp",
                                                     "ports": "२२"}]}}, "firewall.ingress[0].ports",
         "not a valid port or port range"),
        ({"generation": 2, "monitor": {"services": {"dnsmasq": {"enabled": "yes"}}}},
         "monitor.services.dnsmasq.enabled", "expected true or false, got a string"),
    ],
)
def test_types_are_never_coerced(payload, path, reason):
    found = refused(payload)
    assert path in found and reason in found[path], found


def test_coercions_the_issue_found_are_refused(tmp_path):
    """max_connections true (rendered as maxconn 1), passive "yes": refused, by path."""
    doc = example(generation=1)
    doc["load_balancer"] = {"rules": [{"id": "web", "public_ip": "192.0.2.10", "public_port": 80, "private_port": 80,
                                       "max_connections": True}]}  # fmt: skip
    doc["vpn"] = {"site_to_site": [{"id": "s2s", "local_ip": "192.0.2.10", "peer_ip": "198.51.100.10",
                                    "local_subnets": ["10.1.1.0/24"], "peer_subnets": ["10.2.1.0/24"],
                                    "psk": "a-long-enough-secret", "passive": "yes"}]}  # fmt: skip
    with pytest.raises(InvalidPayload) as caught:
        docmod.parse_payload(doc)
    found = {p.path: p.reason for p in caught.value.problems}
    assert found["load_balancer.rules[0].max_connections"] == "expected an integer, got a boolean"
    assert found["vpn.site_to_site[0].passive"] == "expected true or false, got a string"


def test_generation_is_bounded_to_a_json_safe_integer():
    found = refused({"generation": 10_000_000_000_000_000_000})
    assert "at most 9007199254740991" in found["generation"] and "no newer one" in found["generation"]
    stored = docmod.merge(None, docmod.parse_payload(EXAMPLE))
    assert docmod.merge(stored, docmod.parse_payload({"generation": 2**53 - 1})).generation == 2**53 - 1


# ------------------------------------------------------------------ limits hold after the merge
def test_a_payload_section_has_the_document_s_own_limits():
    """The wedge: 100,000 routes were accepted, and then no command could load the document."""
    found = refused({"generation": 2, "routes": [{"destination": "0.0.0.0/0", "gateway": "192.0.2.1"}] * 100_000})
    assert "routes" in found and "at most 4096" in found["routes"]
    for name in docmod.SECTIONS:  # by construction: every section, not only routes
        section = docmod.Payload.model_fields[name].annotation.__args__[0]
        stored = docmod.RouterDocument.model_fields[name]
        assert list(getattr(section, "__metadata__", ())) == list(stored.metadata), name


def test_upserts_cannot_grow_a_list_past_its_bound():
    stored = docmod.merge(None, docmod.parse_payload(example(nat={**EXAMPLE["nat"], "port_forwarding": []})))
    limit = 20_000
    upserts = [{"id": f"pf{n}", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 1 + n,
                "private_ip": "10.1.1.10", "private_ports": 1 + n} for n in range(limit)]  # fmt: skip
    full = docmod.merge(stored, docmod.parse_payload({"generation": 2, "port_forwarding_rules": {"upsert": upserts}}))
    assert len(full.nat.port_forwarding) == limit  # exactly at the bound: accepted
    with pytest.raises(InvalidPayload) as caught:
        docmod.merge(full, docmod.parse_payload({"generation": 3, "port_forwarding_rules": {"upsert": [
            {**upserts[0], "id": "one-more"}]}}))  # fmt: skip
    (problem,) = caught.value.problems
    assert problem.path == "port_forwarding_rules.upsert"
    assert f"would make nat.port_forwarding {limit + 1} items long" in problem.reason


def test_every_merged_document_loads_again():
    """What merge builds is what the store writes: it must load with the same model."""
    stored = docmod.merge(None, docmod.parse_payload(EXAMPLE))
    vm = {"tier": "tier1", "mac": "02:00:00:00:01:99", "ip": "10.1.1.99", "hostname": "vm99"}
    doc = docmod.merge(stored, docmod.parse_payload({"generation": 2, "dhcp_entries": {"upsert": [vm]},
                                                     "routes": []}))  # fmt: skip
    again = docmod.RouterDocument.model_validate_json(doc.model_dump_json())
    assert again == doc


# ------------------------------------------------------------------ what a refusal repeats
def test_a_refusal_quotes_only_a_short_prefix_of_a_huge_value(tmp_path):
    root = tmp_path / "router"
    doc = example()
    doc["dhcp"]["entries"][0]["hostname"] = "x" * 4_000_000 + "\n"
    result = vr_offline(root, "apply", "-", stdin=json.dumps(doc).encode())
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "dhcp.entries[0].hostname: not a valid hostname" in stderr
    assert "(4000001 characters)" in stderr and len(stderr) < 2_000
    events = (root / "log" / "events.jsonl").read_bytes()
    assert b'"outcome": "rejected"' in events and len(events) < 4_000
    assert (root / "state" / "last_apply.json").stat().st_size < 4_000


def test_a_refusal_with_thousands_of_problems_stays_readable(tmp_path):
    doc = example()
    doc["dhcp"]["entries"] = [{"tier": "tier1", "mac": "zz", "ip": "10.1.1.10", "hostname": "h"}] * 5000
    result = vr_offline(tmp_path / "router", "apply", "-", stdin=json.dumps(doc).encode())
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "(5000 problem(s))" in stderr and "... and 4900 more" in stderr
    assert len(stderr.splitlines()) < 110
    event = json.loads((tmp_path / "router" / "log" / "events.jsonl").read_text().splitlines()[-1])
    assert "and 4980 more problem(s)" in event["message"] and len(event["message"]) <= 2100


def test_a_key_from_outside_is_quoted_short_in_the_path():
    found = refused({"generation": 2, "z" * 100_000: 1})
    (path,) = found
    assert path.startswith("'zzzz") and len(path) < 100 and found[path] == "unknown field"


# ------------------------------------------------------------------ PEM fields
def test_only_the_pem_blocks_are_written(tmp_path):
    _, pair = make_ca_and_certificate(tmp_path, "www.example.test")
    cert_pem, key_pem = pair["certificate"], pair["key"]
    doc = example()
    doc["load_balancer"] = {"rules": [{
        "id": "tls", "public_ip": "192.0.2.10", "public_port": 443, "private_port": 80, "protocol": "https",
        "members": [{"ip": "10.1.1.10"}],
        "tls": {"certificates": [{"certificate": "Bag Attributes\n" + cert_pem + "address=/evil/1.2.3.4\n",
                                  "key": key_pem + "\naddress=/evil/1.2.3.4"}]}}]}  # fmt: skip
    payload = tmp_path / "lb.json"
    payload.write_text(json.dumps(doc))
    result = vr_offline(tmp_path / "router", "render", str(payload), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr.decode()
    pems = list((tmp_path / "out").rglob("*.pem"))
    assert pems
    for pem in pems:
        text = pem.read_text()
        assert "evil" not in text and "Bag Attributes" not in text
        assert text.startswith("-----BEGIN ") and text.rstrip().endswith("-----")
    with pytest.raises(InvalidPayload) as caught:
        docmod.parse_payload({**doc, "load_balancer": {"rules": [{**doc["load_balancer"]["rules"][0], "tls": {
            "certificates": [{"certificate": "address=/evil/1.2.3.4", "key": key_pem}]}}]}})  # fmt: skip
    assert any("no PEM block" in p.reason for p in caught.value.problems)


# ------------------------------------------------------------------ per-rule refusals name the payload
def test_an_item_payload_refusal_names_the_payload_s_own_path(tmp_path):
    pipeline = Pipeline(Settings.under_root(tmp_path / "router"))
    doc = example()
    doc["nat"]["port_forwarding"] = [
        {"id": f"pf{n}", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 1000 + n,
         "private_ip": "10.1.1.10", "private_ports": 1000 + n} for n in range(50)]  # fmt: skip
    stored = pipeline.validate(doc, None)
    clash = {"id": "late", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": "1010-1011",
             "private_ip": "10.1.1.10", "private_ports": "2010-2011"}  # fmt: skip
    fine = {**clash, "id": "fine", "public_ports": 5000, "private_ports": 5000}
    with pytest.raises(InvalidPayload) as caught:
        pipeline.validate({"generation": 2, "port_forwarding_rules": {"upsert": [fine, clash]}}, stored)
    text = str(caught.value)
    assert "port_forwarding_rules.upsert[1]" in text, text
    assert "nat.port_forwarding[51]" not in text and "nat.port_forwarding[50]" not in text
    vm = {"tier": "tier1", "mac": "02:00:00:00:01:99", "ip": "10.1.1.10", "hostname": "vm99"}  # web1's address
    with pytest.raises(InvalidPayload) as caught:
        pipeline.validate({"generation": 2, "dhcp_entries": {"upsert": [vm]}}, stored)
    assert [p.path for p in caught.value.problems] == ["dhcp_entries.upsert[0].ip"], caught.value.problems


def test_a_stale_generation_is_still_stale():
    stored = docmod.merge(None, docmod.parse_payload(EXAMPLE))
    with pytest.raises(StalePayload):
        docmod.merge(stored, docmod.parse_payload({"generation": 1}))


# ------------------------------------------------------------------ the command line
def test_version_is_printed_and_listed_in_help(tmp_path):
    from vr import __version__

    result = vr_offline(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.decode().strip() == f"vr {__version__}"
    assert "--version" in vr_offline(tmp_path, "--help").stdout.decode()


def test_an_unreadable_payload_file_is_a_refusal(tmp_path):
    result = vr_offline(tmp_path / "router", "apply", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and b"cannot read" in result.stderr and b"Traceback" not in result.stderr


# ------------------------------------------------------------------ one payload, one word per item
@pytest.mark.parametrize(
    ("changes", "path", "reason"),
    [
        ({"upsert": [{"tier": "tier1", "mac": "02:00:00:00:01:77", "ip": "10.1.1.77", "hostname": "a"},
                     {"tier": "tier1", "mac": "02:00:00:00:01:77", "ip": "10.1.1.78", "hostname": "b"}]},
         "dhcp_entries.upsert[1].mac", "02:00:00:00:01:77 is also dhcp_entries.upsert[0]"),
        ({"upsert": [{"tier": "tier1", "mac": "02:00:00:00:01:10", "ip": "10.1.1.10", "hostname": "web1"}],
          "delete": ["02:00:00:00:01:10"]}, "dhcp_entries.delete[0]", "is also upserted (dhcp_entries.upsert[0])"),
        ({"delete": ["02:00:00:00:01:10", "02:00:00:00:01:10"]}, "dhcp_entries.delete[1]",
         "is also dhcp_entries.delete[0]"),
    ],
)
def test_an_item_named_twice_in_one_payload_is_refused(changes, path, reason):
    found = refused({"generation": 2, "dhcp_entries": changes})
    assert path in found and reason in found[path], found


def test_a_port_range_shorthand_is_whole_or_refused():
    found = refused({"generation": 2, "firewall": {"ingress": [{"id": "r", "public_ip": "192.0.2.10",
                                                                "protocol": "tcp", "ports": "8080-"}]}})  # fmt: skip
    assert "not a valid port or port range" in found["firewall.ingress[0].ports"]


# ------------------------------------------------------------------ which router: never guessed
@pytest.mark.parametrize(
    ("args", "env", "reason"),
    [
        (["--root", ""], {}, "--root is empty"),
        (["--netns", ""], {}, "--netns is empty"),
        ([], {"VR_ROOT": ""}, "VR_ROOT is set but empty"),
        (["--netns", "../../etc"], {}, "is not a network namespace name"),
        (["--netns", "n" * 300], {}, "is not a network namespace name"),
        (["--netns", "vr-no-such-namespace"], {}, "does not exist"),
    ],
)
def test_an_empty_or_odd_root_or_namespace_is_refused_not_taken_for_the_host(tmp_path, args, env, reason):
    import os

    result = subprocess.run([sys.executable, "-m", "vr", *args, "status"], capture_output=True, text=True,
                            timeout=60, check=False, env={**os.environ, **env}, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and reason in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not Path("/var/lib/vr/document.json").exists() or "VR_ROOT" not in env


# ------------------------------------------------------------------ the spool reads only plain files
def test_the_spool_refuses_a_fifo_or_a_link_without_reading_it(tmp_path):
    import os

    from vr.control.spool import Spool

    spool = Spool(Pipeline(Settings.under_root(tmp_path / "router")))
    os.mkfifo(spool.incoming / "a.json")
    (spool.incoming / "b.json").symlink_to("/dev/zero")
    assert [spool.process(path) for path in spool.pending()] == [False, False]  # at once: neither is read
    for name in ("a.json", "b.json"):
        assert (spool.failed / name).is_symlink() or (spool.failed / name).exists()
        assert (spool.failed / (name + ".error")).read_text().strip()
