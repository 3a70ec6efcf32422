"""A real Prometheus server scrapes the router's agent, as a manager's monitoring would: from
the manager's namespace, over HTTPS (the agent's self-signed certificate as its CA) with the
bearer token, every second; the test reads vr's figures back through Prometheus' query API
and sees them move after an apply and after traffic."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import example_lab, write_payload
from vr.lab.harness import stop_process

TOKEN = "vr-e2e-metrics-token-0123456789abcdef"
CONTROL = "169.254.0.10"  # the router's control address in configs/examples/router.json
PORT = 8443
WAIT_S = 30.0

FREE_PORT = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
GET = """\
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
        print(answer.read().decode())
except OSError as error:
    print(f"unreachable: {error}")
"""


def in_namespace(namespace: str, code: str, *args: str) -> str:
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", code, *args], check=True,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    return result.stdout.strip()


class Prometheus:
    """/usr/bin/prometheus in a namespace: its own config and storage under a temp dir, on a
    free loopback port there; queried from inside that namespace; stopped by its PID."""

    def __init__(self, namespace: str, directory: Path, jobs: list[dict]):
        self.namespace, self.dir = namespace, directory
        self.port = int(in_namespace(namespace, FREE_PORT))
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": jobs}
        (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        # `ip netns exec` execs prometheus: the PID is prometheus' own.
        with open(self.dir / "prometheus.log", "wb") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, "/usr/bin/prometheus",
                 f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while "Ready" not in self._get("/-/ready"):
            assert self.process.poll() is None, (self.dir / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def _get(self, path: str) -> str:
        return in_namespace(self.namespace, GET, f"http://127.0.0.1:{self.port}{path}")

    def query(self, expr: str) -> list[dict]:
        """The instant vector of a PromQL expression: [{"metric": {...}, "value": [t, "v"]}]."""
        from urllib.parse import urlencode

        answer = json.loads(self._get("/api/v1/query?" + urlencode({"query": expr})))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait(self, expr: str, holds: Callable[[float | None], bool], timeout: float = WAIT_S) -> float | None:
        """Bounded: the expression's value once holds(value) is true; fails with the last value."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.value(expr)
            if holds(found):
                return found
            assert time.monotonic() < deadline, f"{expr} = {found} after {timeout:g} s"
            time.sleep(0.5)


@contextlib.contextmanager
def prometheus(namespace: str, directory: Path, jobs: list[dict]) -> Iterator[Prometheus]:
    server = Prometheus(namespace, directory, jobs)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def agent_certificate(lab) -> str:
    """The self-signed certificate the agent made at its first start (kept in its state dir):
    what the manager pins as the router's CA. Bounded wait: the daemon makes it when it serves."""
    path = lab.settings.agent_tls_dir / "certificate.pem"
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert time.monotonic() < deadline, f"the agent made no certificate ({path})"
        time.sleep(0.2)
    return path.read_text()


def status(lab) -> dict:
    return json.loads(lab.vr("status", "--json", check=False).stdout)


def job(name: str, directory: Path, token: str) -> dict:
    (directory / f"{name}.token").write_text(token)
    return {
        "job_name": name,
        "scheme": "https",
        "metrics_path": "/metrics",
        "authorization": {"type": "Bearer", "credentials_file": str(directory / f"{name}.token")},
        "tls_config": {"ca_file": str(directory / "agent-ca.pem")},
        "static_configs": [{"targets": [f"{CONTROL}:{PORT}"]}],
    }


@pytest.fixture
def agent_lab(tmp_path):
    """The example router with the agent served (a token), answering on its control address;
    and the generation that payload made."""
    with example_lab() as lab:
        generation = status(lab)["generation"] + 1
        answer = lab.vr("apply", write_payload(tmp_path, {"generation": generation, "agent": {"tokens": [TOKEN]}},
                                               "agent.json"))  # fmt: skip
        assert answer.stdout.startswith(f"applied generation {generation} "), answer.stdout
        yield lab, generation


def test_prometheus_scrapes_the_agent_and_sees_vr_move(agent_lab, tmp_path):
    lab, generation = agent_lab
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "agent-ca.pem").write_text(agent_certificate(lab))
    jobs = [job("vr", directory, TOKEN), job("vr-wrong-token", directory, "x" * 40)]
    with prometheus(lab.ns("mgmt"), directory, jobs) as server:
        # Scraped over TLS, the certificate verified against the agent's own, the token accepted.
        assert server.wait('up{job="vr"}', lambda v: v == 1) == 1
        assert server.wait('vr_generation{job="vr"}', lambda v: v is not None) == generation
        assert server.value('vr_service_up{job="vr",service="dnsmasq"}') == 1
        assert server.value('vr_dhcp_leases{job="vr"}') == 2
        assert server.value('process_resident_memory_bytes{job="vr"}') > 0  # the daemon's own memory
        # A wrong token: the agent answers 401 and Prometheus marks that target down.
        assert server.wait('up{job="vr-wrong-token"}', lambda v: v is not None) == 0

        applied = server.value('vr_applies_total{job="vr",outcome="applied"}') or 0
        vm = {"tier": "tier1", "mac": "02:00:00:00:01:77", "ip": "10.1.1.77", "hostname": "web77"}
        payload = {"generation": generation + 1, "dhcp_entries": {"upsert": [vm]}}
        assert lab.vr("apply", write_payload(tmp_path, payload, "vm.json")).stdout.startswith("applied generation")
        assert server.wait('vr_generation{job="vr"}', lambda v: v == generation + 1) == generation + 1
        server.wait('vr_applies_total{job="vr",outcome="applied"}', lambda v: v is not None and v >= applied + 1)
        assert server.value('vr_apply_duration_seconds_count{job="vr",step="total"}') >= 1

        rule = 'vr_rule_packets_total{job="vr",rule="ingress allowed: tcp"}'
        before = server.wait(rule, lambda v: v is not None)
        lab.serve(lab.ns("g1"), "web1", 80)
        try:
            for _ in range(3):  # three connections through the port forward 192.0.2.10:8080 -> web1:80
                assert lab.ask(lab.ns("pub"), "192.0.2.10", 8080) == "web1 sees 192.0.2.1"
        finally:
            lab.stop_servers()
        assert server.wait(rule, lambda v: v is not None and v >= before + 3) >= before + 3
        assert server.wait('vr_conntrack_entries{job="vr"}', lambda v: v is not None and v >= 3) >= 3
