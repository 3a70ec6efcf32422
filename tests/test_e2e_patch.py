"""Live patches on a running lab router: guests leased, HTTP balanced by haproxy, a port
forward, DNS. The example bundles (patches/examples) are built and signed by the test."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.conftest import example_lab, write_payload
from tests.test_e2e_haproxy import LB_IP, lb_rule, nat_with_lb_ip
from tests.test_e2e_monitor import MANAGER_PORT, Manager
from vr import __version__
from vr.foundation.files import read_json
from vr.lab.traffic import Traffic

PORT_FORWARD = ("192.0.2.10", 8080)  # configs/examples/router.json: to g1 (10.1.1.10) port 80


@pytest.fixture
def router(workshop, tmp_path):
    """The example lab with a load-balancer rule over two HTTP guests, trusting the publisher."""
    with example_lab() as lab:
        lab.serve(lab.ns("g1"), "web1", 8000, http=True)
        lab.serve(lab.ns("g2"), "db1", 8000, http=True)
        payload = {"generation": 2, "nat": nat_with_lb_ip(), "load_balancer": {"rules": [lb_rule()]}}
        lab.vr("apply", write_payload(tmp_path, payload, "lb.json"))
        assert lab.wait_lb_up(), lab.lb_states()
        lab.settings.trusted_keys_dir.mkdir(parents=True)
        shutil.copy(workshop["pub"], lab.settings.trusted_keys_dir / "publisher.pub")
        yield lab


def status(lab) -> dict:
    return json.loads(lab.vr("status", "--json", check=False).stdout)


def release_header(lab) -> dict:
    return lab.fetch(lab.ns("pub"), LB_IP, 80, "--count", "4", "--header", "X-Vr-Release")


def monitor_version(lab) -> str | None:
    return (read_json(lab.settings.run_dir / "health.json") or {}).get("version")


def wait_for(check, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return result


def haproxy_config(lab) -> str:
    return (lab.settings.service_dir("haproxy") / "haproxy.cfg").read_text()


def leases(lab) -> set[tuple[str, str]]:
    """dnsmasq's lease file: (MAC, address) of every lease (expiry times move with renewals)."""
    text = (lab.settings.state_dir / "dnsmasq.leases").read_text()
    return {(line.split()[1], line.split()[2]) for line in text.splitlines() if line.strip()}


def test_apply_and_rollback_under_traffic_lose_nothing(router, workshop):
    """During the patch and its rollback: 1,000 pings/s guest -> public, HTTP through haproxy,
    a TCP connection through a port forward, DNS queries, DHCP renewals, a guest asking its
    meta data and the password service. Nothing may fail."""
    lab = router
    held = leases(lab)
    assert len(held) == 2
    for action, args, header in (("apply", [str(workshop["bundle"])], "0.1.1"), ("rollback", [], None)):
        # A window long enough for the command on a loaded machine: the header must show up inside it.
        with Traffic(lab, seconds=6.0, lb_ip=LB_IP, forward=PORT_FORWARD, forward_server="g1",
                     dns_name="web1.cloud.internal", dns_answer="10.1.1.10", dns_timeout=1.0,
                     guest_data=("g1", "10.1.1.1")) as traffic:  # fmt: skip
            time.sleep(0.5)
            result = lab.vr("patch", action, *args, "--json")
        figures = traffic.result()
        assert json.loads(result.stdout)["outcome"] == "ok"
        assert figures["ping_sent"] >= 3000 and figures["ping_lost"] == 0, (action, figures)
        assert figures["http_sent"] >= 300 and figures["http_failed"] == 0, (action, figures["http_errors"])
        assert figures["tcp_held"] and figures["tcp_exchanges"] >= 60, (action, figures["tcp_error"])
        assert figures["dns_queries"] >= 100 and figures["dns_failed"] == 0, (action, figures["dns_errors"])
        assert figures["dhcp_renewals"] >= 3 and figures["dhcp_failed"] == 0, (action, figures["dhcp_errors"])
        assert figures["dhcp_address_kept"]
        # The guest's meta data and password service, served by the daemon the patch replaces.
        assert figures["guest_data_sent"] >= 250 and figures["guest_data_failed"] == 0, figures["guest_data_errors"]
        assert figures["guest_data_answers"] == {"web1": figures["guest_data_sent"]}  # its own (instance-id: hostname)
        assert figures["password_failed"] == 0 and figures["password_answers"] == {"saved_password": figures["password_sent"]}
        # The answers change release mid-stream: the new header appears (apply) or goes (rollback).
        assert (header in figures["headers"]) if header else figures["headers"].get("0.1.1", 0) < figures["http_sent"]
        assert release_header(lab)["headers"] == ({header: 4} if header else {})
        assert leases(lab) == held
    assert status(lab)["healthy"]


def test_a_patch_survives_a_reboot_of_the_router(router, workshop):
    lab = router
    result = lab.vr("patch", "apply", str(workshop["bundle"]))
    assert "apply 0.1.0 -> 0.1.1: ok" in result.stdout
    assert release_header(lab)["headers"] == {"0.1.1": 4}
    lab.vr("stop")  # supervisord and every daemon gone, as at a power-off
    assert status(lab)["healthy"] is False
    lab.vr("start")
    report = status(lab)
    assert report["healthy"] and report["release"] == "0.1.1"
    assert wait_for(lambda: monitor_version(lab) == "0.1.1")
    assert wait_for(lab.wait_lb_up)
    assert release_header(lab)["headers"] == {"0.1.1": 4}


def test_a_patch_that_breaks_health_is_rolled_back_by_itself(router, workshop, tmp_path):
    lab = router
    manager = Manager(lab, tmp_path / "alerts.jsonl")
    lab.vr("apply", write_payload(tmp_path, {"generation": 3, "monitor": {
        "alert_url": f"http://127.0.0.1:{MANAGER_PORT}/alerts"}}, "monitor.json"))  # fmt: skip
    manager.start()
    try:
        result = lab.vr("patch", "apply", str(workshop["broken"]), check=False)
        assert result.returncode == 4, result.stderr
        assert "rolled back to 0.1.0" in result.stderr and "dnsmasq" in result.stderr
        report = status(lab)
        assert report["healthy"] and report["release"] == __version__
        assert lab.resolve(lab.ns("g1"), "web1.cloud.internal", "10.1.1.1") == ["10.1.1.10"]
        assert "port=53\n" in (lab.settings.service_dir("dnsmasq") / "dnsmasq.conf").read_text()
        assert wait_for(lambda: monitor_version(lab) == __version__)
        patch = json.loads(lab.vr("patch", "status", "--json").stdout)
        assert (patch["current"], patch["last"]["to"], patch["last"]["outcome"]) == (
            __version__,
            "0.2.0",
            "rolled-back",
        )
        alerts = wait_for(lambda: [a for a in manager.alerts() if a["service"] == "patch"])
        assert len(alerts) == 1 and alerts[0]["severity"] == "critical"
        assert "0.2.0 failed" in alerts[0]["message"] and "rolled back to 0.1.0" in alerts[0]["message"]
    finally:
        manager.stop()
    outcomes = [json.loads(line)["outcome"] for line in lab.vr("events", "--resource", "release").stdout.splitlines()]
    assert outcomes[-3:] == ["failed", "restarted", "rolled-back"]  # the old monitor restarted


def test_a_patch_changing_a_service_it_does_not_declare_is_refused(router, workshop, tmp_path):
    from vr.patching import bundles as patching

    lab = router
    bundle = tmp_path / "undeclared.tar.gz"
    patching.build(workshop["source"], "0.1.1", workshop["key"], bundle, services=["dnsmasq"])
    result = lab.vr("patch", "apply", str(bundle), check=False)
    assert result.returncode == 2
    assert "changes the files of haproxy, which its manifest does not declare (services: dnsmasq)" in result.stderr
    assert status(lab)["release"] == __version__ and "X-Vr-Release" not in haproxy_config(lab)
    assert not lab.settings.releases_dir.exists() or not (lab.settings.releases_dir / "0.1.1").exists()


def test_a_patch_killed_after_its_reload_is_rolled_back_by_vr_recover(router, workshop):
    lab = router
    killed = lab.vr("patch", "apply", str(workshop["bundle"]), env={"VR_FAULT_AT": "patch-gated"}, check=False)
    assert killed.returncode == -9
    assert "X-Vr-Release 0.1.1" in haproxy_config(lab)  # the new release had re-rendered
    recovered = lab.vr("recover")
    assert recovered.returncode == 0
    assert "X-Vr-Release" not in haproxy_config(lab)
    report = status(lab)
    assert report["healthy"] and report["release"] == __version__
    assert wait_for(lambda: monitor_version(lab) == __version__)
    assert release_header(lab)["headers"] == {}
