"""The daemon's own life, end to end on a lab router serving the agent (configs/examples/router.json):
killed (-9), hung (SIGSTOP) and restarted as a patch restarts it (`supervisorctl restart monitor`),
with a local client (the unix socket, as the CLI) and the manager (HTTPS from the control network)
sending requests all along.

What a client sees: no request is refused (the keeper holds the listening sockets while no daemon
runs: a client that connects meanwhile waits in their backlog and is answered by the next daemon),
every request gets its answer, and every push answered "applied" is in the stored document after.
A request the killed daemon had already taken dies with it (a reset, no answer): the clients here
send it again, as RouterClient does for a request a second copy of which is harmless (reads,
pushes with generation=next upserting the same item); those are counted apart and said. So are
the 503 answers (Retry-After) while the next daemon rolls back an apply the killed one left half
done: a client is asked to come back, as the API promises, and it does."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

import pytest

from tests.conftest import REPO_DIR, example_lab
from tests.test_e2e_agent import InNamespace, connects, router_certificate
from tests.test_e2e_monitor import wait_for
from vr import client as vc
from vr.foundation.events import EventLog
from vr.foundation.settings import SUPERVISOR_CONFIG
from vr.services.supervisor_rpc import SupervisorClient
from vr.transaction.store import DocumentStore

TOKEN = (REPO_DIR / "configs" / "lab" / "agent-token").read_text().strip()
CONTROL, PORT = "169.254.0.10", 8443
URL = f"https://{CONTROL}:{PORT}"
REQUESTS = 16  # per client and scenario: half pushes, half reads
RESENDS = 3  # a request the dying daemon took is sent again at most this often


def daemon_pid(lab) -> int | None:
    return SupervisorClient(lab.settings).pid("monitor")


def health(lab) -> dict:
    try:
        return json.loads((lab.settings.run_dir / "health.json").read_text())
    except (OSError, ValueError):
        return {}


def stored_macs(lab) -> set[str]:
    """The VMs of the stored document, as a fresh process reads it from disk (document and log)."""
    document = DocumentStore(lab.settings).load()
    return {entry.mac for entry in document.dhcp.entries}


def vm(scenario: int, client: int, index: int) -> dict:
    """A VM of its own for each push: scenario, client and index in its MAC, IP and name."""
    number = scenario * 2 * REQUESTS + client * REQUESTS + index
    return {"tier": "tier2", "mac": f"02:00:00:00:{0xa0 + scenario:02x}:{client * REQUESTS + index:02x}",
            "ip": f"10.1.2.{20 + number}", "hostname": f"life{number}"}  # fmt: skip


def local_healthz(lab, timeout: float = 60.0) -> int:
    return vc.LocalClient(lab.settings.daemon_socket, timeout=timeout).request("GET", "/healthz")[0]


def daemon_events(lab) -> list[dict]:
    return list(EventLog(lab.settings.events_path).read("service:daemon"))


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """The example router (its document serves the agent) with the manager's namespace beside it."""
    where = tmp_path_factory.mktemp("lifecycle")
    with example_lab(guests=("g1",)) as lab:
        manager = InNamespace(lab.ns("mgmt"))
        try:
            assert wait_for(lambda: manager(connects, CONTROL, PORT, 1.0), 60), "the agent never listened"
            yield {"lab": lab, "manager": manager, "ca": router_certificate(lab, where)}
        finally:
            manager.close()


class Traffic:
    """A bounded number of requests from two clients, each in its own thread: the local one over
    the unix socket (pushes and /healthz) and the manager over HTTPS (pushes and /v1/status,
    through RouterClient in the control network's namespace). Every request's fate is kept."""

    def __init__(self, env: dict, scenario: int) -> None:
        self.env, self.lab, self.scenario = env, env["lab"], scenario
        self.failures: list[str] = []  # refused, or never answered
        self.applied: set[str] = set()  # MACs of pushes answered "applied"
        self.resent = 0  # requests the dying daemon had taken, sent again
        self.recovering = 0  # 503 answers (with Retry-After) while an apply the killed daemon left is rolled back
        self.done = {"local": 0, "agent": 0}
        self.threads = [threading.Thread(target=self._local, daemon=True),
                        threading.Thread(target=self._agent, daemon=True)]  # fmt: skip

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for thread in self.threads:
            thread.join(timeout=180)
        assert not any(t.is_alive() for t in self.threads), "a client never got its answers"

    def started(self, count: int = 3) -> bool:
        return min(self.done.values()) >= count

    def _local(self) -> None:
        client = vc.LocalClient(self.lab.settings.daemon_socket, timeout=60)
        for index in range(REQUESTS):
            item = vm(self.scenario, 0, index)
            if index % 2:
                request = ("GET", "/healthz", None)
            else:
                body = json.dumps({"dhcp_entries": {"upsert": [item]}}).encode()
                request = ("PATCH", "/v1/config?generation=next", body)
            resends, deadline = 0, time.monotonic() + 60
            while True:
                try:
                    status, answer = client.request(*request)
                except (ConnectionRefusedError, FileNotFoundError) as error:
                    self.failures.append(f"local {request[:2]}: refused ({error})")
                    break
                except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as error:
                    if resends == RESENDS:
                        self.failures.append(f"local {request[:2]}: no answer ({error!r})")
                        break
                    resends += 1
                    self.resent += 1
                    continue
                except OSError as error:
                    self.failures.append(f"local {request[:2]}: {error!r}")
                    break
                if status == 503 and time.monotonic() < deadline:
                    # The killed daemon left an apply half-done: rolled back first; asked to come back (Retry-After).
                    self.recovering += 1
                    time.sleep(1)
                    continue
                if status != 200:
                    self.failures.append(f"local {request[:2]}: {status} {answer}")
                elif request[0] == "PATCH" and answer.get("outcome") == "applied":
                    self.applied.add(item["mac"])
                break
            self.done["local"] += 1
            time.sleep(0.05)

    def _agent(self) -> None:
        client = vc.RouterClient(URL, TOKEN, ca=self.env["ca"], timeout=60, retries=30, backoff_s=0.05,
                                 max_total_s=120)  # fmt: skip
        for index in range(REQUESTS):
            item = vm(self.scenario, 1, index)
            try:
                if index % 2:
                    self.env["manager"](client.status)
                else:
                    answer = self.env["manager"](client.push, {"dhcp_entries": {"upsert": [item]}},
                                                 next_generation=True)  # fmt: skip
                    if answer.get("outcome") == "applied":
                        self.applied.add(item["mac"])
            except vc.ClientError as error:
                self.failures.append(f"agent #{index}: {error}")
            self.done["agent"] += 1
            time.sleep(0.05)


def assert_kept(lab, traffic: Traffic) -> None:
    assert traffic.failures == [], traffic.failures
    assert len(traffic.applied) == REQUESTS  # every push answered "applied" (half of each client's)
    assert traffic.applied <= stored_macs(lab)
    print(
        f"\n{traffic.resent} request(s) the dying daemon had taken were sent again; {traffic.recovering} "
        "answered 503 (recovering) and sent again"
    )


def restarted_from(lab, old: int, timeout: float = 60) -> int:
    """The new daemon's PID once supervisord runs it and it answers."""
    new = wait_for(lambda: (daemon_pid(lab) or old) != old and daemon_pid(lab), timeout)
    assert new, f"daemon pid {old} was not replaced"
    assert local_healthz(lab) == 200
    return new


# ---------------------------------------------------------------- kill -9
def test_a_killed_daemon_is_restarted_and_refuses_loses_nothing(router):
    lab = router["lab"]
    old = daemon_pid(lab)
    checked = health(lab).get("checked_at")
    assert old and health(lab).get("monitor_pid") == old
    item = vm(0, 0, REQUESTS - 1)
    status, answer = vc.LocalClient(lab.settings.daemon_socket).request(
        "PATCH", "/v1/config?generation=next", json.dumps({"dhcp_entries": {"upsert": [item]}}).encode()
    )
    assert status == 200 and answer["outcome"] == "applied"

    with Traffic(router, scenario=1) as traffic:
        assert wait_for(traffic.started, 60)
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        assert local_healthz(lab) == 200  # connected while no daemon ran: answered by the next one
        print(f"\nkilled -> answering again: {(time.monotonic() - killed_at) * 1000:.0f} ms")
    new = restarted_from(lab, old)
    assert item["mac"] in stored_macs(lab)  # answered "applied" before the kill: kept
    assert_kept(lab, traffic)

    # The monitor resumes in the new daemon: its report, and a dnsmasq killed now is restarted.
    assert wait_for(lambda: health(lab).get("monitor_pid") == new and health(lab).get("checked_at") != checked, 30)
    dnsmasq = SupervisorClient(lab.settings).pid("dnsmasq")
    os.kill(dnsmasq, signal.SIGKILL)
    assert wait_for(lambda: (SupervisorClient(lab.settings).pid("dnsmasq") or dnsmasq) != dnsmasq, 30)


# ---------------------------------------------------------------- SIGSTOP
def test_a_hung_daemon_is_killed_by_the_keeper_and_restarted(router):
    lab = router["lab"]
    old = daemon_pid(lab)
    assert old and local_healthz(lab) == 200
    since = len(daemon_events(lab))
    os.kill(old, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        assert local_healthz(lab, timeout=120) == 200  # waits: the keeper kills it, the next one answers
        print(f"\nhung -> answering again: {(time.monotonic() - stopped_at) * 1000:.0f} ms")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)  # only if the keeper did not kill it
    assert not Path(f"/proc/{old}").exists() or "zombie" in Path(f"/proc/{old}/status").read_text()
    restarted_from(lab, old)
    killed = [e for e in daemon_events(lab)[since:] if e["type"] == "keeper"]
    assert [e["outcome"] for e in killed] == ["killed"] and f"pid {old}" in killed[0]["message"]


# ---------------------------------------------------------------- a restart, as a patch does it
def test_a_restart_with_requests_in_flight_refuses_and_loses_nothing(router):
    lab = router["lab"]
    old = daemon_pid(lab)
    assert old and local_healthz(lab) == 200
    config = lab.settings.service_dir("supervisor") / SUPERVISOR_CONFIG
    since = len(daemon_events(lab))
    with Traffic(router, scenario=2) as traffic:
        assert wait_for(traffic.started, 60)
        restart = subprocess.run([str(lab.settings.bin_dir / "supervisorctl"), "-c", str(config), "restart", "monitor"],
                                 capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert restart.returncode == 0, restart.stdout + restart.stderr
    restarted_from(lab, old)
    assert_kept(lab, traffic)
    assert traffic.resent == 0 and traffic.recovering == 0  # a graceful stop answers what it took, leaves no apply
    assert not [e for e in daemon_events(lab)[since:] if e["type"] == "keeper"]  # a stopping daemon is no hang
