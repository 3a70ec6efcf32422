"""/metrics (vr.control.metrics): what a Prometheus server scraping the daemon reads. The
exposition passes promtool's lint, and its figures are the router's: taken on a lab router
by a process inside the router's namespace, as the daemon runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

import vr.control.status
from tests.conftest import EXAMPLES, example_lab
from vr.control.metrics import MAX_RULE_SERIES, OTHER, RouterMetrics
from vr.foundation.settings import Settings

SCRAPE = """\
import sys
from vr.foundation import netns
netns.enter(sys.argv[2])
from vr.control.metrics import RouterMetrics
from vr.foundation.settings import Settings
sys.stdout.write(RouterMetrics(Settings.under_root(sys.argv[1], netns=sys.argv[2])).render().decode())
"""


def samples(text: str) -> dict[tuple, float]:
    """(name, sorted label pairs) -> value, as Prometheus' own parser reads the exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def promtool_check(text: str) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], check=False, input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def scrape(lab) -> str:
    """render() in a fresh process inside the router's namespace, as the daemon calls it."""
    root = str(lab.settings.state_dir.parent)
    cmd = [sys.executable, "-c", SCRAPE, root, lab.router_ns]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def status(lab, *flags: str) -> dict:
    return json.loads(lab.vr("status", "--json", *flags, check=False).stdout)


# ---------------------------------------------------------------- the counters the daemon feeds
def test_applies_are_counted_by_outcome_and_transactions_timed_by_step(tmp_path):
    metrics = RouterMetrics(Settings.under_root(tmp_path))
    timings = {"validate": 2.0, "render": 4.0, "check": 30.0, "switch": 1.0, "reload": 6.0, "health": 20.0}
    metrics.observe_apply("applied", timings, duration_ms=65.0)
    metrics.observe_apply("applied", {**timings, "health": 3000.0})
    metrics.observe_apply("rejected", {})
    metrics.observe_apply("rolled-back", {"validate": 1.0, "render": 2.0})
    text = metrics.render().decode()
    promtool_check(text)
    found = samples(text)
    assert value(found, "vr_applies_total", outcome="applied") == 2
    assert value(found, "vr_applies_total", outcome="rejected") == 1
    assert value(found, "vr_applies_total", outcome="rolled-back") == 1
    assert value(found, "vr_applies_total", outcome="stale") == 0  # every outcome shows from the start
    assert value(found, "vr_apply_duration_seconds_count", step="total") == 3  # a refused push ran nothing
    assert value(found, "vr_apply_duration_seconds_count", step="health") == 2
    assert value(found, "vr_apply_duration_seconds_sum", step="health") == pytest.approx(3.02)
    assert value(found, "vr_apply_duration_seconds_sum", step="total") == pytest.approx(0.065 + 3.043 + 0.003)
    assert value(found, "vr_apply_duration_seconds_bucket", step="check", le="0.025") == 0
    assert value(found, "vr_apply_duration_seconds_bucket", step="check", le="0.05") == 2
    assert value(found, "process_resident_memory_bytes") > 0
    with pytest.raises(ValueError, match="outcome: 'bogus' is not one of applied, rejected"):
        metrics.observe_apply("bogus", {})


def test_a_failed_collection_still_answers_with_what_it_has(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("supervisord went away")

    monkeypatch.setattr(vr.control.status, "collect", broken)
    pipeline = SimpleNamespace(stored_document=lambda: SimpleNamespace(generation=7))
    metrics = RouterMetrics(Settings.under_root(tmp_path), pipeline=pipeline)
    metrics.observe_apply("applied", {"render": 1.0})
    text = metrics.render().decode()
    promtool_check(text)
    found = samples(text)
    assert value(found, "vr_collection_ok", part="status") == 0
    assert value(found, "vr_collection_ok", part="firewall") == 0
    assert value(found, "vr_generation") == 7  # the warm pipeline's document still tells it
    assert value(found, "vr_applies_total", outcome="applied") == 1


def test_the_status_collection_is_cached_and_rules_are_capped(tmp_path, monkeypatch):
    rules = [{"chain": "forward", "rule": f"rule {i}", "packets": i, "bytes": 100 * i} for i in range(600)]
    calls = []

    def report(settings, firewall=False, lb=False, vpn=False, pipeline=None, usage=False):
        calls.append((firewall, lb, vpn))
        return {"release": "0.1.0", "router": "r1", "generation": 3, "healthy": True, "services": [],
                "firewall": rules, "lb": [], "vpn": []}  # fmt: skip

    monkeypatch.setattr(vr.control.status, "collect", report)
    metrics = RouterMetrics(Settings.under_root(tmp_path), cache_s=3600)
    first = metrics.render()
    metrics.render()
    assert calls == [(True, True, True)]  # two scrapes, one collection
    metrics.observe_apply("rejected", {})
    metrics.render()
    assert len(calls) == 1  # a refused push changed nothing
    metrics.observe_apply("applied", {"render": 1.0})
    metrics.render()
    assert len(calls) == 2  # a transaction did: the next scrape reads the router again
    found = samples(first.decode())
    named = {dict(key[1])["rule"] for key in found if key[0] == "vr_rule_packets_total"}
    assert len(named) == MAX_RULE_SERIES + 1
    assert "rule 599" in named and "rule 100" in named and "rule 99" not in named  # the busiest have names
    assert value(found, "vr_rule_packets_total", rule=OTHER) == sum(range(100))
    assert value(found, "vr_rule_bytes_total", rule=OTHER) == 100 * sum(range(100))
    RouterMetrics(Settings.under_root(tmp_path), cache_s=0).render()
    assert len(calls) == 3


# ---------------------------------------------------------------- a lab router
@pytest.fixture(scope="module")
def router():
    with example_lab() as lab:
        yield lab


def test_the_figures_are_the_routers_and_rule_counters_move_with_traffic(router):
    lab = router
    deadline = time.monotonic() + 20
    while status(lab)["monitor"] is None and time.monotonic() < deadline:  # its first round of probes
        time.sleep(0.2)
    text = scrape(lab)
    promtool_check(text)
    found = samples(text)
    report = status(lab)
    assert report["monitor"] is not None
    assert value(found, "vr_generation") == report["generation"]
    assert value(found, "vr_info", router=report["router"], release=report["release"]) == 1
    assert value(found, "vr_healthy") == 1
    for service in report["services"]:
        assert value(found, "vr_service_up", service=service["name"]) == 1, service
        restarts = (service.get("monitor") or {}).get("restarts")
        if restarts is not None:
            assert value(found, "vr_service_restarts_total", service=service["name"]) == restarts
        assert value(found, "vr_probe_latency_seconds", service=service["name"]) >= 0
    assert value(found, "vr_dhcp_leases") == 2  # g1 and g2 hold a lease
    assert value(found, "vr_conntrack_limit") > 0
    assert all(value(found, "vr_collection_ok", part=part) == 1 for part in ("status", "firewall", "dhcp", "conntrack"))

    before = value(found, "vr_rule_packets_total", rule="ingress allowed: tcp")
    lab.serve(lab.ns("g1"), "web1", 80)
    try:
        for _ in range(3):  # three connections through the port forward 192.0.2.10:8080 -> web1:80
            assert lab.ask(lab.ns("pub"), "192.0.2.10", 8080) == "web1 sees 192.0.2.1"
    finally:
        lab.stop_servers()
    after = samples(scrape(lab))
    assert value(after, "vr_rule_packets_total", rule="ingress allowed: tcp") >= before + 3
    assert value(after, "vr_rule_bytes_total", rule="ingress allowed: tcp") > value(
        found, "vr_rule_bytes_total", rule="ingress allowed: tcp"
    )
    assert value(after, "vr_conntrack_entries") >= 3  # the forwarded connections are still tracked


def test_load_balancer_members_as_haproxy_sees_them(router, tmp_path):
    lab = router
    lab.serve(lab.ns("g1"), "web1", 8000, http=True)
    db1 = lab.serve(lab.ns("g2"), "db1", 8000, http=True)
    try:
        generation = status(lab)["generation"] + 1
        lb = json.loads((EXAMPLES.parent / "lab" / "load-balancer.json").read_text())["load_balancer"]
        nat = json.loads((EXAMPLES / "router.json").read_text())["nat"]
        nat["public_ips"].append({"ip": lb["rules"][0]["public_ip"]})
        payload = tmp_path / "lb.json"
        payload.write_text(json.dumps({"generation": generation, "nat": nat, "load_balancer": lb}))
        lab.vr("apply", str(payload))
        assert lab.wait_lb_up()
        found = samples(scrape(lab))
        assert value(found, "vr_generation") == generation
        assert value(found, "vr_lb_member_up", rule="web", member="10.1.1.10:8000") == 1
        assert value(found, "vr_lb_member_up", rule="web", member="10.1.2.10:8000") == 1
        assert value(found, "vr_lb_members", state="UP") == 2

        os.kill(db1, signal.SIGTERM)  # db1's server stops: haproxy's check marks it DOWN
        os.waitpid(db1, 0)
        deadline = time.monotonic() + 15
        while lab.lb_states().get("10.1.2.10:8000") != "DOWN" and time.monotonic() < deadline:
            time.sleep(0.2)
        found = samples(scrape(lab))
        assert value(found, "vr_lb_member_up", rule="web", member="10.1.2.10:8000") == 0
        assert value(found, "vr_lb_member_up", rule="web", member="10.1.1.10:8000") == 1
        assert value(found, "vr_lb_members", state="DOWN") == 1
        assert value(found, "vr_collection_ok", part="lb") == 1
    finally:
        lab.stop_servers()


def test_lb_members_fold_haproxy_transitions_and_a_dead_stats_socket_shows(tmp_path, monkeypatch):
    def member(address: str, state: str) -> dict:
        return {"rule": "web", "listen": "192.0.2.12:80", "member": address, "weight": 1, "state": state}

    rows = [member("10.1.1.10:80", "UP 1/2"), member("10.1.1.11:80", "DOWN"), member("10.1.1.12:80", "no check")]

    def report(settings, firewall=False, lb=False, vpn=False, pipeline=None, usage=False):
        return {"release": "0.1.0", "router": "r1", "generation": 3, "healthy": True, "services": [],
                "firewall": [], "lb": rows, "vpn": []}  # fmt: skip

    monkeypatch.setattr(vr.control.status, "collect", report)
    found = samples(RouterMetrics(Settings.under_root(tmp_path), cache_s=0).render().decode())
    assert value(found, "vr_lb_member_up", rule="web", member="10.1.1.10:80") == 1  # one check failed: still UP
    assert value(found, "vr_lb_member_up", rule="web", member="10.1.1.11:80") == 0
    assert value(found, "vr_lb_member_up", rule="web", member="10.1.1.12:80") == 1  # unchecked: it gets traffic
    assert value(found, "vr_lb_members", state="UP") == 1 and value(found, "vr_lb_members", state="DOWN") == 1
    assert value(found, "vr_collection_ok", part="lb") == 1

    rows[:] = [member("10.1.1.10:80", "haproxy's stats socket does not answer: [Errno 111] Connection refused")]
    found = samples(RouterMetrics(Settings.under_root(tmp_path), cache_s=0).render().decode())
    assert value(found, "vr_collection_ok", part="lb") == 0
    assert value(found, "vr_lb_members", state="unknown") == 1
    assert value(found, "vr_generation") == 3  # the rest of the scrape is there


def test_vpn_connections_count_their_sas_and_bytes(tmp_path, monkeypatch):
    def tunnel(name: str, state: str, users: list[dict] = (), bytes_in: int = 0, bytes_out: int = 0) -> dict:
        return {"connection": name, "state": state, "established_s": None, "bytes_in": bytes_in,
                "bytes_out": bytes_out, "users": list(users), "reason": None}  # fmt: skip

    users = [{"user": "alice", "address": "10.9.0.1"}, {"user": "bob", "address": "10.9.0.2"}]
    rows = [tunnel("s2s-b", "ESTABLISHED", bytes_in=1200, bytes_out=3400), tunnel("s2s-c", "DOWN"),
            tunnel("remote-access", "ESTABLISHED", users)]  # fmt: skip

    def report(settings, firewall=False, lb=False, vpn=False, pipeline=None, usage=False):
        return {"release": "0.1.0", "router": "r1", "generation": 3, "healthy": True, "services": [],
                "firewall": [], "lb": [], "vpn": rows}  # fmt: skip

    monkeypatch.setattr(vr.control.status, "collect", report)
    text = RouterMetrics(Settings.under_root(tmp_path), cache_s=0).render().decode()
    promtool_check(text)
    found = samples(text)
    assert value(found, "vr_vpn_sas", connection="s2s-b") == 1
    assert value(found, "vr_vpn_sas", connection="s2s-c") == 0
    assert value(found, "vr_vpn_sas", connection="remote-access") == 2  # one per connected user
    assert value(found, "vr_vpn_bytes_total", connection="s2s-b", direction="in") == 1200
    assert value(found, "vr_vpn_bytes_total", connection="s2s-b", direction="out") == 3400

    rows[:] = [tunnel("-", "charon's VICI socket does not answer: [Errno 2] No such file or directory")]
    found = samples(RouterMetrics(Settings.under_root(tmp_path), cache_s=0).render().decode())
    assert value(found, "vr_collection_ok", part="vpn") == 0
    assert not [key for key in found if key[0] == "vr_vpn_sas"]  # no made-up connection "-"


def test_usage_is_exported_per_public_ip_and_tier_in_and_out(tmp_path, monkeypatch):
    rows = [{"kind": "public_ip", "name": "192.0.2.10", "in_bytes": 560, "in_packets": 5, "out_bytes": 5140,
             "out_packets": 5},
            {"kind": "tier", "name": "tier1", "in_bytes": 0, "in_packets": 0, "out_bytes": 7, "out_packets": 1}]  # fmt: skip

    def report(settings, firewall=False, lb=False, vpn=False, pipeline=None, usage=False):
        assert usage  # a scrape asks for them
        return {"release": "0.1.0", "router": "r1", "generation": 3, "healthy": True, "services": [],
                "firewall": [], "lb": [], "vpn": [], "usage": rows}  # fmt: skip

    monkeypatch.setattr(vr.control.status, "collect", report)
    found = samples(RouterMetrics(Settings.under_root(tmp_path), cache_s=0).render().decode())
    assert value(found, "vr_usage_bytes_total", kind="public_ip", id="192.0.2.10", direction="out") == 5140
    assert value(found, "vr_usage_packets_total", kind="public_ip", id="192.0.2.10", direction="in") == 5
    assert value(found, "vr_usage_bytes_total", kind="tier", id="tier1", direction="out") == 7
