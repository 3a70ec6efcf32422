"""Load balancing end to end: haproxy in the router namespace, HTTP servers in the guests,
a public client. Certificates are made by the test (its own CA)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, make_ca_and_certificate, write_payload
from vr.services import haproxy
from vr.services.runtime import Runtime

LB_IP = "192.0.2.12"
MEMBERS = [{"ip": "10.1.1.10"}, {"ip": "10.1.2.10"}]  # web1 (g1), db1 (g2)


@pytest.fixture
def backends(lab):
    pids = {"web1": lab.serve(lab.ns("g1"), "web1", 8000, http=True),
            "db1": lab.serve(lab.ns("g2"), "db1", 8000, http=True)}  # fmt: skip
    lab.backend_pids = pids
    return lab


def nat_with_lb_ip() -> dict:
    nat = json.loads((EXAMPLES / "router.json").read_text())["nat"]
    nat["public_ips"].append({"ip": LB_IP})
    return nat


def lb_rule(**overrides) -> dict:
    rule = {"id": "web", "public_ip": LB_IP, "public_port": 80, "private_port": 8000, "members": MEMBERS,
            "health_check": {"type": "http", "interval_ms": 200, "rise": 1, "fall": 2}}  # fmt: skip
    return rule | overrides


def apply_lb(lab, tmp_path, generation: int, *rules: dict, check: bool = True):
    payload = {"generation": generation, "nat": nat_with_lb_ip(), "load_balancer": {"rules": list(rules)}}
    return lab.vr("apply", write_payload(tmp_path, payload, f"lb{generation}.json"), check=check)


def fetch(lab, *options: str, port: int = 80) -> dict:
    return lab.fetch(lab.ns("pub"), LB_IP, port, "--timeout", "3", *options)


def test_roundrobin_serves_both_members_and_only_the_listening_port_is_open(backends, tmp_path):
    lab = backends
    apply_lb(lab, tmp_path, 3, lb_rule())
    assert lab.wait_lb_up(), lab.lb_states()
    result = fetch(lab, "--count", "6")
    assert result["failed"] == 0 and result["answers"] == {"web1": 3, "db1": 3}
    assert fetch(lab, "--count", "1", "--timeout", "1", port=81)["failed"] == 1  # dropped by nftables
    assert lab.lb_states() == {"10.1.1.10:8000": "UP", "10.1.2.10:8000": "UP"}


@pytest.mark.parametrize(
    ("stickiness", "options"),
    [
        ({"type": "source"}, []),
        ({"type": "cookie"}, ["--cookies"]),
        ({"type": "app_cookie", "cookie": "app"}, ["--cookies"]),
    ],
    ids=["source", "cookie", "app_cookie"],
)
def test_stickiness_keeps_a_client_on_one_member(backends, tmp_path, stickiness, options):
    lab = backends
    apply_lb(lab, tmp_path, 3, lb_rule(stickiness=stickiness))
    assert lab.wait_lb_up(), lab.lb_states()
    result = fetch(lab, "--count", "8", *options)
    assert result["failed"] == 0 and len(result["answers"]) == 1, result


def test_a_member_whose_server_stops_is_marked_down_and_no_longer_served(backends, tmp_path):
    lab = backends
    apply_lb(lab, tmp_path, 3, lb_rule())
    assert lab.wait_lb_up(), lab.lb_states()
    os.kill(lab.backend_pids["db1"], signal.SIGTERM)
    os.waitpid(lab.backend_pids["db1"], 0)
    for _ in range(50):  # bounded: fall 2 x 200 ms
        if lab.lb_states()["10.1.2.10:8000"].startswith("DOWN"):
            break
    assert lab.lb_states()["10.1.2.10:8000"].startswith("DOWN")
    result = fetch(lab, "--count", "6")
    assert result["failed"] == 0 and result["answers"] == {"web1": 6}


def test_reloads_under_load_fail_no_request(backends, tmp_path):
    lab = backends
    apply_lb(lab, tmp_path, 3, lb_rule())
    assert lab.wait_lb_up(), lab.lb_states()
    # 2 x 1,000 requests over 4 s, with and without keep-alive, while the config changes 5 times.
    clients = [lab.fetch(lab.ns("pub"), LB_IP, 80, "--count", "1000", "--seconds", "4", *keep, wait=False)
               for keep in (["--keepalive"], [])]  # fmt: skip
    for n in range(5):  # a client timeout changes: a reload (a weight alone is set at runtime)
        result = apply_lb(lab, tmp_path, 4 + n, lb_rule(timeouts={"client_ms": 30000 + n}))
        assert "haproxy" in result.stdout
    outcomes = [json.loads(client.communicate(timeout=60)[0]) for client in clients]
    for outcome in outcomes:
        assert outcome["sent"] == 1000 and outcome["failed"] == 0, outcome["errors"]
        assert set(outcome["answers"]) == {"web1", "db1"}


def test_a_weight_change_is_set_at_runtime_without_a_reload(backends, tmp_path):
    """Members' weights alone: haproxy's runtime API sets them in the running workers (no new
    worker, no connection moved), and the file holds them for the next start."""
    lab = backends
    apply_lb(lab, tmp_path, 3, lb_rule())
    assert lab.wait_lb_up(), lab.lb_states()
    workers = haproxy_workers(lab)
    members = [MEMBERS[0] | {"weight": 0}, MEMBERS[1] | {"weight": 7}]  # web1 drained
    result = apply_lb(lab, tmp_path, 4, lb_rule(members=members))
    assert "changed: haproxy" in result.stdout
    assert haproxy_workers(lab) == workers  # the same worker serves on: nothing was reloaded
    runtime = Runtime(lab.settings)
    weights = [haproxy.ask(runtime, f"get weight be_web/{server}").split()[0]
               for server in ("10.1.1.10_8000", "10.1.2.10_8000")]  # fmt: skip
    assert weights == ["0", "7"]
    answers = fetch(lab, "--count", "6")["answers"]
    assert answers == {"db1": 6}  # a drained member takes no new connection
    config = (lab.settings.service_dir("haproxy") / haproxy.CONFIG).read_text()
    assert "weight 0" in config and "weight 7" in config
    lab.vr("start")  # a forced re-apply: the file's weights are the ones served
    assert lab.wait_lb_up() and fetch(lab, "--count", "4")["answers"] == {"db1": 4}


def haproxy_workers(lab) -> set[int]:
    """The PIDs of haproxy's master's children (its workers)."""
    master = next(s["pid"] for s in json.loads(lab.vr("status", "--json").stdout)["services"] if s["name"] == "haproxy")
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


def test_a_change_outside_the_lb_sections_does_not_touch_haproxy(backends, tmp_path):
    lab = backends
    apply_lb(lab, tmp_path, 3, lb_rule())
    pid = json.loads(lab.vr("status", "--json").stdout)
    before = next(s["pid"] for s in pid["services"] if s["name"] == "haproxy")
    vm = {"tier": "tier1", "mac": "02:00:00:00:01:99", "ip": "10.1.1.99", "hostname": "web9"}
    result = lab.vr("apply", write_payload(tmp_path, {"generation": 4, "dhcp_entries": {"upsert": [vm]}}))
    assert "dnsmasq" in result.stdout and "haproxy" not in result.stdout
    after = json.loads(lab.vr("status", "--json").stdout)
    assert next(s["pid"] for s in after["services"] if s["name"] == "haproxy") == before


# ---------------------------------------------------------------- TLS termination
def https_rule(*certificates: dict) -> dict:
    return lb_rule(id="secure", public_port=443, protocol="https", tls={"certificates": list(certificates)})


def test_https_is_terminated_with_the_uploaded_certificate(backends, tmp_path):
    lab = backends
    ca_file, certificate = make_ca_and_certificate(tmp_path, "lb.example.test")
    apply_lb(lab, tmp_path, 3, https_rule(certificate))
    pem_files = list((lab.settings.config_dir / "haproxy").glob("*.pem"))
    assert pem_files and all(p.stat().st_mode & 0o777 == 0o600 for p in pem_files)
    options = ["--scheme", "https", "--cafile", ca_file, "--sni", "lb.example.test"]
    assert lab.wait_lb_up(), lab.lb_states()
    result = fetch(lab, "--count", "4", *options, port=443)
    assert result["failed"] == 0 and result["answers"] == {"web1": 2, "db1": 2}
    wrong_name = fetch(lab, "--count", "1", "--scheme", "https", "--cafile", ca_file, "--sni", "other.test", port=443)
    assert wrong_name["failed"] == 1 and "certificate" in wrong_name["errors"][0].lower()


def test_a_key_that_does_not_match_is_refused_and_an_expired_certificate_is_a_warning(backends, tmp_path):
    lab = backends
    _, good = make_ca_and_certificate(tmp_path, "lb.example.test")
    _, other = make_ca_and_certificate(tmp_path, "other.example.test")
    result = apply_lb(lab, tmp_path, 3, https_rule(good | {"key": other["key"]}), check=False)
    assert result.returncode == 2
    assert "load_balancer.rules[0].tls.certificates[0].key: does not match" in result.stderr
    _, expired = make_ca_and_certificate(tmp_path, "old.example.test", days=-1)
    apply_lb(lab, tmp_path, 3, https_rule(expired))
    events = [json.loads(line) for line in lab.vr("events").stdout.splitlines()]
    warnings = [e for e in events if e["type"] == "warning"]
    assert warnings and "certificates[0].certificate: expired on" in warnings[-1]["message"]


def test_members_learn_the_client_from_forwarded_headers_and_http2_is_offered(backends, tmp_path):
    lab = backends
    ca_file, certificate = make_ca_and_certificate(tmp_path, "lb.example.test")
    apply_lb(lab, tmp_path, 3, lb_rule(), https_rule(certificate) | {"http2": True})
    assert lab.wait_lb_up(), lab.lb_states()
    plain = fetch(lab, "--count", "2", "--header", "X-Seen-Forwarded")
    assert plain["headers"] == {"192.0.2.1 http": 2}  # the public client, and how it came
    secure = fetch(lab, "--count", "2", "--header", "X-Seen-Forwarded", "--scheme", "https", "--cafile", ca_file,
                   "--sni", "lb.example.test", port=443)  # fmt: skip
    assert secure["headers"] == {"192.0.2.1 https": 2}
    curl = ["ip", "netns", "exec", lab.ns("pub"), "curl", "-s", "-o", "/dev/null", "-w", "%{http_version}",
            "--max-time", "5", "--cacert", ca_file, "--resolve", f"lb.example.test:443:{LB_IP}"]  # fmt: skip
    assert subprocess.run([*curl, "--http2", "https://lb.example.test/"], check=False, capture_output=True,
                          text=True, timeout=20).stdout == "2"  # fmt: skip
    assert subprocess.run([*curl, "--http1.1", "https://lb.example.test/"], check=False, capture_output=True,
                          text=True, timeout=20).stdout == "1.1"  # fmt: skip

    apply_lb(lab, tmp_path, 4, lb_rule(forwarded_headers=False))  # members that must not see them
    assert lab.wait_lb_up(), lab.lb_states()
    assert fetch(lab, "--count", "2", "--header", "X-Seen-Forwarded")["headers"] == {"- -": 2}


PROXY_MEMBER = r"""
import socket, sys, time
with socket.socket() as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(sys.argv[1])))
    server.listen(8)
    server.settimeout(1)
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            connection, _ = server.accept()
        except TimeoutError:
            continue
        with connection:
            connection.settimeout(2)
            try:
                first = connection.recv(200).split(b"\r\n")[0].decode(errors="replace")
                connection.sendall(f"member got: {first}\n".encode())
            except OSError:
                pass
"""


def test_proxy_protocol_hands_members_the_clients_address(lab, tmp_path):
    member = subprocess.Popen(["ip", "netns", "exec", lab.ns("g1"), sys.executable, "-c", PROXY_MEMBER, "9000"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert member.stdout.readline().strip() == "ready"
        rule = {"id": "raw", "public_ip": LB_IP, "public_port": 9000, "private_port": 9000, "protocol": "tcp",
                "members": [{"ip": "10.1.1.10"}], "proxy_protocol": "v1"}  # fmt: skip
        apply_lb(lab, tmp_path, 3, rule)
        answer = lab.ask(lab.ns("pub"), LB_IP, 9000, timeout=3)
        assert answer is not None and answer.startswith(f"member got: PROXY TCP4 192.0.2.1 {LB_IP} "), answer
        assert answer.endswith(" 9000")
        refused = apply_lb(lab, tmp_path, 4, rule | {"forwarded_headers": True}, check=False)
        assert refused.returncode == 2 and "tcp carries no headers" in refused.stderr
    finally:
        member.kill()
        member.wait()


def test_the_statistics_page_answers_on_its_address_only_and_with_its_password(backends, tmp_path):
    lab = backends
    payload = {"generation": 3, "nat": nat_with_lb_ip(), "load_balancer": {
        "rules": [lb_rule()],
        "stats": {"address": "169.254.0.10", "port": 8404, "username": "ops", "password": "s3cret-pass:word"}}}  # fmt: skip
    lab.vr("apply", write_payload(tmp_path, payload))
    assert lab.wait_lb_up(), lab.lb_states()
    secrets = lab.settings.config_dir / "haproxy" / "stats.secrets"
    assert secrets.stat().st_mode & 0o777 == 0o600
    assert "s3cret" not in (lab.settings.config_dir / "haproxy" / "haproxy.cfg").read_text()

    def status(namespace: str, address: str, *auth: str) -> str:
        return subprocess.run(["ip", "netns", "exec", lab.ns(namespace), "curl", "-s", "-o", "/dev/null", "-w",
                               "%{http_code}", "--max-time", "2", *auth, f"http://{address}:8404/"],
                              check=False, capture_output=True, text=True, timeout=20).stdout  # fmt: skip

    assert status("mgmt", "169.254.0.10", "-u", "ops:s3cret-pass:word") == "200"
    assert status("mgmt", "169.254.0.10") == "401"
    assert status("mgmt", "169.254.0.10", "-u", "ops:wrong-password") == "401"
    assert status("pub", "192.0.2.10", "-u", "ops:s3cret-pass:word") == "000"  # not on the public side
    assert status("g1", "10.1.1.1", "-u", "ops:s3cret-pass:word") == "000"  # nor on a tier
    shown = lab.vr("diff", write_payload(tmp_path, {**payload, "generation": 4, "load_balancer": {
        **payload["load_balancer"], "stats": {**payload["load_balancer"]["stats"], "password": "an0ther-pass"}}}))
    assert "stats.secrets" in shown.stdout  # named as changed, never shown
    assert "an0ther" not in shown.stdout and "s3cret" not in shown.stdout
