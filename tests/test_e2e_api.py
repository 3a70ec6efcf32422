"""The daemon's API routes on a lab router, over its local socket (the same routes the agent
serves with a token): commit-confirm, the dry run, the redacted document, PUT as a whole
document, status, events, and what wrong methods and paths answer."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import EXAMPLES, example_lab, live_files, make_ca_and_certificate
from vr.client import LocalClient

NEW_VM = {"tier": "tier1", "mac": "02:00:00:00:07:01", "ip": "10.1.1.71", "hostname": "api-vm"}


@pytest.fixture(scope="module")
def api_lab():
    with example_lab(guests=()) as lab:
        yield lab


def ask(lab, method: str, path: str, body: object = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return LocalClient(lab.settings.daemon_socket).request(method, path, data)


def generation(lab) -> int:
    return ask(lab, "GET", "/v1/status?firewall=0&lb=0&vpn=0")[1]["generation"]


def hosts(lab) -> str:
    return "".join(p.read_text() for p in (lab.settings.config_dir / "dnsmasq").rglob("*") if p.is_file())


def test_an_unconfirmed_push_rolls_itself_back(api_lab):
    lab = api_lab
    before = generation(lab)
    status, body = ask(lab, "PATCH", "/v1/config?confirm_s=2&generation=next", {"dhcp_entries": {"upsert": [NEW_VM]}})
    assert status == 200, body
    assert body["confirm"]["rollback_to"] == before and body["generation"] == before + 1
    assert "api-vm" in hosts(lab)
    deadline = time.monotonic() + 30
    while "api-vm" in hosts(lab) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "api-vm" not in hosts(lab)  # back to the document from before the push
    assert generation(lab) == before + 2  # the rollback is an ordinary transaction: generations only grow
    kinds = [e["outcome"] for e in ask(lab, "GET", "/v1/events?resource=router&limit=20")[1]["events"]
             if e["type"] == "confirm"]  # fmt: skip
    assert kinds[-2:] == ["expired", "rolled-back"]
    assert ask(lab, "POST", "/v1/config/confirm")[0] == 409  # nothing pending any more


def test_a_confirmed_push_stays(api_lab):
    lab = api_lab
    status, body = ask(lab, "PATCH", "/v1/config?confirm_s=3&generation=next", {"dhcp_entries": {"upsert": [NEW_VM]}})
    assert status == 200, body
    assert ask(lab, "POST", "/v1/config/confirm") == (200, {"confirmed": body["generation"]})
    time.sleep(4)
    assert "api-vm" in hosts(lab) and generation(lab) == body["generation"]
    assert ask(lab, "PATCH", "/v1/config?generation=next", {"dhcp_entries": {"delete": [NEW_VM["mac"]]}})[0] == 200


def test_a_dry_run_answers_the_plan_and_changes_nothing(api_lab, tmp_path):
    lab = api_lab
    files = live_files(lab)
    _, pair = make_ca_and_certificate(tmp_path, "router.example")
    agent = {"port": 8443, "tokens": ["x" * 40], "tls": pair}
    payload = {"dhcp_entries": {"upsert": [NEW_VM]}, "agent": agent}
    status, body = ask(lab, "POST", "/v1/config/validate?generation=next", payload)
    assert status == 200, body
    assert body["valid"] is True and body["generation"] == generation(lab) + 1
    changed = {item["service"]: item["files"] for item in body["changes"]}
    assert "dnsmasq" in changed and any("+02:00:00:00:07:01" in text or "api-vm" in text
                                        for text in changed["dnsmasq"].values())  # fmt: skip
    assert changed["agent"]["tls.pem"] == "<secret: changed>"
    assert "PRIVATE KEY" not in json.dumps(body)
    assert live_files(lab) == files
    status, body = ask(lab, "POST", "/v1/config/validate?generation=next", {"dns": {"domain": "-bad-"}})
    assert status == 422 and body["error"]["path"] == "dns.domain"


def test_the_document_is_shown_without_a_secret(api_lab):
    status, document = ask(api_lab, "GET", "/v1/config")
    assert status == 200
    text = json.dumps(document)
    assert document["agent"]["tokens"] == ["<redacted>"]
    assert "PRIVATE KEY" not in text and "sha256:" not in text
    stored = api_lab.settings.document_path.read_text()
    assert "sha256:" in stored  # the token is kept hashed; the answer does not even show the hash


def test_put_is_a_whole_document(api_lab):
    lab = api_lab
    whole = json.loads((EXAMPLES / "router.json").read_text())
    whole["generation"] = generation(lab) + 1
    whole["load_balancer"] = {"rules": []}
    status, body = ask(lab, "PUT", "/v1/config", whole)
    assert status == 200, body
    without_vpn = {k: v for k, v in whole.items() if k != "vpn"}
    without_vpn["generation"] += 1
    assert ask(lab, "PUT", "/v1/config", without_vpn)[0] == 200
    assert ask(lab, "GET", "/v1/config")[1]["vpn"]["site_to_site"] == []  # left out: back to its default
    status, body = ask(lab, "PUT", "/v1/config", {"generation": whole["generation"] + 2, "dns": whole["dns"]})
    assert status == 422 and {p["path"] for p in body["error"]} >= {"router", "interfaces"}


def test_status_carries_what_a_manager_polls(api_lab):
    status, report = ask(api_lab, "GET", "/v1/status")
    assert status == 200
    assert report["router"] == "r-101-vm" and report["healthy"] is True
    assert report["daemon"]["pid"] > 1 and report["daemon"]["release"] == report["release"]
    system = report["system"]
    assert system["memory_total_bytes"] > 0 and system["disk_free_bytes"] > 0 and len(system["load"]) == 3
    assert system["conntrack_limit"] is None or system["conntrack_limit"] > 0
    assert isinstance(report["dhcp_leases"], int) and report["lb_members_up"] >= 0


def test_events_filter_by_resource_time_and_count(api_lab):
    lab = api_lab
    stamp = time.time()
    assert ask(lab, "PATCH", "/v1/config?generation=next", {"dhcp_entries": {"upsert": [NEW_VM]}})[0] == 200
    status, body = ask(lab, "GET", f"/v1/events?resource=vm:{NEW_VM['mac']}&since={stamp}")
    assert status == 200 and [e["outcome"] for e in body["events"]] == ["added"]
    assert len(ask(lab, "GET", "/v1/events?limit=2")[1]["events"]) == 2
    assert ask(lab, "GET", "/v1/events?limit=zero")[0] == 400


def test_wrong_routes_methods_and_bodies_get_a_json_error(api_lab):
    lab = api_lab
    files = live_files(lab)
    cases = [("GET", "/v1/nothing", None, 404), ("DELETE", "/v1/config", None, 405),
             ("PATCH", "/v1/config", b"{not json", 400), ("PATCH", "/v1/config", b"", 400),
             ("PATCH", "/v1/config?confirm_s=-1", {"generation": 10**6}, 400),
             ("PATCH", "/v1/config?generation=later", {}, 400),
             ("PATCH", "/v1/config", {"generation": 1}, 409), ("PATCH", "/v1/config", [1, 2], 422)]  # fmt: skip
    for method, path, body, expected in cases:
        status, answer = ask(lab, method, path, body)
        assert status == expected and "error" in answer, (method, path, status, answer)
    assert live_files(lab) == files
