"""The router's HTTPS agent, end to end, as the manager sees it: a lab router whose document
has an `agent` section, driven by vr.client.RouterClient from the manager's side (the lab's
control network namespace, <p>-mgmt at 169.254.0.1), the router at 169.254.0.10:8443."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, example_lab, live_files, make_ca_and_certificate, write_payload
from vr import client as vc
from vr.foundation import netns
from vr.foundation.events import EventLog
from vr.transaction.store import DocumentStore

TOKEN = "manager-token-" + "k3" * 20
CONTROL = "169.254.0.10"
PORT = 8443
URL = f"https://{CONTROL}:{PORT}"
NEW_VM = {"tier": "tier1", "mac": "02:00:00:00:01:20", "ip": "10.1.1.20", "hostname": "web2"}
STORED = ("stored document",)  # live_files' key for it
STORED_HASH = "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()  # what the router keeps: no credential


class InNamespace:
    """Calls run in one thread that entered a network namespace: the sockets a client opens
    there are the namespace's (setns moves only the calling thread)."""

    def __init__(self, name: str):
        self.pool = ThreadPoolExecutor(1, initializer=netns.enter, initargs=(name,))

    def __call__(self, fn, *args, **kw):
        return self.pool.submit(fn, *args, **kw).result(timeout=300)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def connects(address: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def router_certificate(lab, where: Path) -> Path:
    """The self-signed certificate the router made at first start, copied from its state dir
    as the manager would (it is its own CA); the key beside it stays on the router."""
    made = lab.settings.agent_tls_dir / "certificate.pem"
    text = made.read_text()
    assert "BEGIN CERTIFICATE" in text and "PRIVATE KEY" not in text
    copy = where / "router-ca.pem"
    copy.write_text(text)
    return copy


@pytest.fixture(scope="module")
def agent_lab(tmp_path_factory):
    """The example router (one guest with a lease) with the agent switched on by a push of its
    `agent` section; the manager's namespace, the router's CA and a token file beside it."""
    where = tmp_path_factory.mktemp("agent")
    with example_lab(guests=("g1",)) as lab:
        lab.vr("apply", write_payload(where, {"generation": 2, "agent": {"tokens": [TOKEN]}}, "agent.json"))
        manager = InNamespace(lab.ns("mgmt"))
        try:
            deadline = time.monotonic() + 60
            while not manager(connects, CONTROL, PORT, 1.0):
                assert time.monotonic() < deadline, "the agent never listened on the control address"
                time.sleep(0.2)
            token_file = where / "token"
            token_file.write_text(TOKEN + "\n")
            token_file.chmod(0o600)
            env = {"lab": lab, "manager": manager, "ca": router_certificate(lab, where), "token_file": token_file,
                   "dir": where}  # fmt: skip
            while not _accepted(env):  # the daemon re-reads its agent section just after the apply answered
                assert time.monotonic() < deadline, "the agent never took the pushed token"
                time.sleep(0.2)
            yield env
        finally:
            manager.close()


def _accepted(env: dict) -> bool:
    try:
        env["manager"](client_for(env).status, firewall=False, lb=False, vpn=False)
    except vc.Unauthorized:
        return False
    return True


def client_for(env: dict, token: str | None = TOKEN, **kw) -> vc.RouterClient:
    return vc.RouterClient(URL, token, ca=env["ca"], **{"retries": 2, "backoff_s": 0.05, **kw})


def stored(lab) -> dict:
    """The router's last-known-good as it loads it (document.json and the log of item changes)."""
    return DocumentStore(lab.settings).load().model_dump(mode="json")


def generation(env: dict) -> int:
    return stored(env["lab"])["generation"]


def config_files(lab) -> dict[str, bytes]:
    """The rendered files under the config dir (the stored document aside: it holds its generation)."""
    return {name: content for name, content in live_files(lab).items() if name not in STORED}


def stored_without_generation(lab) -> dict:
    document = stored(lab)
    document.pop("generation")
    return document


def call(env: dict, method: str, *args, **kw):
    """One client call from the manager's namespace."""
    client = client_for(env)
    return env["manager"](getattr(client, method), *args, **kw)


def vr_remote(env: dict, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """`vr remote` as the manager runs it, in the manager's namespace."""
    lab = env["lab"]
    command = ["ip", "netns", "exec", lab.ns("mgmt"), sys.executable, "-m", "vr", "remote", "--url", URL,
               "--token-file", str(env["token_file"]), "--ca", str(env["ca"]), *args]  # fmt: skip
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, input=input)


# ------------------------------------------------------------------ pushes


def test_a_push_changes_the_router_as_vr_apply_does(agent_lab):
    env, lab = agent_lab, agent_lab["lab"]
    g = generation(env)
    before = config_files(lab)
    answer = call(env, "push", {"generation": g + 1, "dhcp_entries": {"upsert": [NEW_VM]}})
    assert answer["outcome"] == "applied" and answer["generation"] == g + 1
    assert "dnsmasq" in answer["changed"]
    assert generation(env) == g + 1
    by_agent, document_by_agent = config_files(lab), stored_without_generation(lab)
    assert by_agent != before
    events = [e for e in EventLog(lab.settings.events_path).read(f"vm:{NEW_VM['mac']}") if e["generation"] == g + 1]
    assert [(e["type"], e["outcome"]) for e in events] == [("dhcp", "added")]
    assert events[0] in call(env, "events", resource=f"vm:{NEW_VM['mac']}")
    assert call(env, "status")["generation"] == g + 1

    # The same change again through `vr apply`, from the state before it: the same files.
    lab.vr("apply", write_payload(env["dir"], {"generation": g + 2, "dhcp_entries": {"delete": [NEW_VM["mac"]]}}))
    assert config_files(lab) == before
    printed = lab.vr("apply", write_payload(env["dir"], {"generation": g + 3, "dhcp_entries": {"upsert": [NEW_VM]}}))
    assert config_files(lab) == by_agent
    assert stored_without_generation(lab) == document_by_agent
    changed = re.fullmatch(r"applied generation (\d+) in \d+ ms; changed: (.+)\n", printed.stdout)
    assert changed and int(changed[1]) == g + 3
    assert changed[2].split(", ") == answer["changed"]


def test_a_whole_document_and_a_dry_run(agent_lab):
    env, lab = agent_lab, agent_lab["lab"]
    g = generation(env)
    document = json.loads((EXAMPLES / "router.json").read_text())
    document.update(generation=g + 1, agent={"tokens": [TOKEN]})
    document["dhcp"]["entries"].append({**NEW_VM, "hostname": "web3"})
    before = config_files(lab)
    plan = call(env, "validate", document)
    assert plan["valid"] is True and plan["generation"] == g + 1
    diffs = {s["service"]: s["files"] for s in plan["changes"]}
    assert any("web3" in diff for diff in diffs["dnsmasq"].values())
    assert config_files(lab) == before and generation(env) == g  # a dry run
    answer = call(env, "put", document)
    assert answer["generation"] == g + 1 and generation(env) == g + 1
    assert b"web3" in b"".join(c for n, c in config_files(lab).items() if n.startswith("dnsmasq/"))
    current = call(env, "config")
    assert current["generation"] == g + 1
    assert TOKEN not in json.dumps(current)  # secrets redacted (and the token is stored only hashed)


# ------------------------------------------------------------------ refusals change nothing


def unchanged(env: dict):
    """A context in which the router must not change: files, stored document, generation."""
    lab = env["lab"]

    class Unchanged:
        def __enter__(self):
            self.files, self.generation = live_files(lab), generation(env)
            return self

        def __exit__(self, *exc):
            if exc[0] is None:
                assert generation(env) == self.generation
                assert live_files(lab) == self.files

    return Unchanged()


@pytest.mark.parametrize("token", [None, "wrong-token-" + "z" * 30, "sha256:" + "0" * 64, STORED_HASH])
def test_a_wrong_or_missing_token_is_refused_and_changes_nothing(agent_lab, token):
    env = agent_lab
    with unchanged(env):
        client = client_for(env, token=token)
        with pytest.raises(vc.Unauthorized) as caught:
            env["manager"](client.push, {"generation": generation(env) + 1, "dhcp_entries": {"upsert": [NEW_VM]}})
        assert caught.value.status == 401
        assert caught.value.problems[0][0] == "Authorization"
        for read in ("status", "config", "metrics"):
            with pytest.raises(vc.Unauthorized):
                env["manager"](getattr(client, read))
        assert env["manager"](client.healthz) is True  # needs no token, says only ok/not ok


def test_oversized_invalid_and_stale_pushes_are_refused(agent_lab):
    env = agent_lab
    g = generation(env)
    with unchanged(env):
        huge = b'{"generation": %d, "dns": {"padding": "' % (g + 1) + b"a" * (64 * 1024 * 1024) + b'"}}'
        with pytest.raises(vc.TooLarge) as too_large:
            call(env, "push", huge)
        assert too_large.value.status == 413
        bad = {**NEW_VM, "mac": "02:00:00:00:01"}
        with pytest.raises(vc.Invalid) as invalid:
            call(env, "push", {"generation": g + 1, "dhcp_entries": {"upsert": [bad]}})
        assert invalid.value.status == 422
        assert any(path == "dhcp_entries.upsert[0].mac" for path, _ in invalid.value.problems), invalid.value.problems
        with pytest.raises(vc.Stale) as stale:
            call(env, "push", {"generation": g, "dhcp_entries": {"upsert": [NEW_VM]}})
        assert stale.value.status == 409 and "not newer" in str(stale.value)
        with pytest.raises(vc.BadRequest) as unreadable:
            call(env, "push", b'{"generation": ')
        assert unreadable.value.status == 400


# ------------------------------------------------------------------ who answers, to whom


def test_the_agent_certificate_is_verified(agent_lab, tmp_path):
    env = agent_lab
    assert call(env, "status")["router"] == "r-101-vm"  # verified against the router's own certificate
    stranger_ca, _ = make_ca_and_certificate(tmp_path, "somebody-else")
    stranger = vc.RouterClient(URL, TOKEN, ca=stranger_ca, retries=0)
    with pytest.raises(vc.TlsFailed) as caught:
        env["manager"](stranger.status)
    assert "does not verify" in str(caught.value)


def test_the_agent_answers_on_the_control_address_only(agent_lab):
    env, lab = agent_lab, agent_lab["lab"]
    assert env["manager"](connects, CONTROL, PORT)
    guest, public = InNamespace(lab.ns("g1")), InNamespace(lab.ns("pub"))
    try:
        assert lab.guest_lease("g1")["configured"]  # the guest has its address, and a route to every router address
        for address in ("10.1.1.1", "192.0.2.10", CONTROL):
            assert not guest(connects, address, PORT), f"the agent answered a guest on {address}"
        assert not public(connects, "192.0.2.10", PORT), "the agent answered on the public address"
    finally:
        guest.close()
        public.close()


# ------------------------------------------------------------------ `vr remote`


def test_vr_remote_prints_what_the_local_commands_print(agent_lab):
    env, lab = agent_lab, agent_lab["lab"]
    local, remote = lab.vr("status", check=False), vr_remote(env, "status")
    assert remote.returncode == local.returncode, remote.stderr
    local_lines, remote_lines = local.stdout.splitlines(), remote.stdout.splitlines()
    assert remote_lines[:4] == local_lines[:4]  # router, release, generation, last apply
    assert len(remote_lines) == len(local_lines)
    for theirs, ours in zip(local_lines[4:], remote_lines[4:], strict=True):
        # service rows: name, state, pid and health alike; uptime and probe latency move on
        assert ours.split()[:3] == theirs.split()[:3]
        assert ours.split("  ")[-1:] == theirs.split("  ")[-1:]
    assert json.loads(vr_remote(env, "status", "--json").stdout)["generation"] == generation(env)

    g = generation(env)
    payload = json.dumps({"generation": g + 1, "dhcp_entries": {"upsert": [{**NEW_VM, "hostname": "web4"}]}})
    applied = vr_remote(env, "apply", "-", input=payload)
    assert applied.returncode == 0, applied.stderr
    assert re.fullmatch(rf"applied generation {g + 1} in \d+ ms; changed: [a-z, ]+\n", applied.stdout)
    assert generation(env) == g + 1

    stale = vr_remote(env, "apply", "-", input=payload)
    assert stale.returncode == 3
    assert stale.stderr.startswith("vr: ") and "not newer" in stale.stderr
    confirmed = json.dumps({"generation": g + 2, "dhcp_entries": {"upsert": [{**NEW_VM, "hostname": "web5"}]}})
    pending = vr_remote(env, "apply", "--confirm", "300", "-", input=confirmed)
    assert pending.returncode == 0, pending.stderr
    first, second = pending.stdout.splitlines()
    assert re.fullmatch(rf"applied generation {g + 2} in \d+ ms; changed: [a-z, ]+", first)
    assert second.endswith(f"or it rolls back to generation {g + 1}")
    kept = vr_remote(env, "confirm")
    assert (kept.returncode, kept.stdout) == (0, f"confirmed generation {g + 2}\n")
    again = vr_remote(env, "confirm")
    assert again.returncode == 2 and "no commit-confirm is pending" in again.stderr
    assert generation(env) == g + 2

    events = vr_remote(env, "events", "--resource", f"vm:{NEW_VM['mac']}")
    local_events = lab.vr("events", "--resource", f"vm:{NEW_VM['mac']}").stdout
    assert events.stdout == local_events and events.stdout


def test_token_rotation_and_client_certificates(agent_lab, tmp_path):
    """Two tokens at once while the manager rotates; with a client CA in the document, a
    client without a certificate it signed is refused even with a good token. Restored after."""
    env, lab = agent_lab, agent_lab["lab"]
    ca_file, pair = make_ca_and_certificate(tmp_path, "manager-1")
    cert, key = tmp_path / "manager.pem", tmp_path / "manager.key"
    cert.write_text(pair["certificate"])
    key.write_text(pair["key"])
    rotated = "rotated-token-" + "r7" * 20
    agent = {"tokens": [TOKEN, rotated], "client_ca": Path(ca_file).read_text()}
    lab.vr("apply", write_payload(tmp_path, {"generation": generation(env) + 1, "agent": agent}))
    try:
        # The daemon re-reads its agent section after the apply answered: wait (bounded) until a
        # handshake without a certificate fails, which /healthz shows without changing anything.
        deadline = time.monotonic() + 15
        while env["manager"](client_for(env).healthz):
            assert time.monotonic() < deadline, "the agent still takes clients without a certificate"
            time.sleep(0.2)
        for token in (TOKEN, rotated):
            with_cert = client_for(env, token=token, cert=(str(cert), str(key)))
            assert env["manager"](with_cert.status)["generation"] == generation(env)
        with unchanged(env):
            without = client_for(env, retries=0)
            with pytest.raises(vc.Unavailable):
                env["manager"](without.push, {"generation": generation(env) + 1, "dhcp_entries": {"upsert": [NEW_VM]}})
            wrong_token = client_for(env, token="wrong-token-" + "z" * 30, cert=(str(cert), str(key)))
            with pytest.raises(vc.Unauthorized):
                env["manager"](wrong_token.status)
    finally:
        lab.vr("apply", write_payload(tmp_path, {"generation": generation(env) + 1, "agent": {"tokens": [TOKEN]}}))
    deadline = time.monotonic() + 15
    while not env["manager"](client_for(env).healthz):
        assert time.monotonic() < deadline, "the agent did not take clients without a certificate again"
        time.sleep(0.2)
    assert env["manager"](client_for(env).status)["generation"] == generation(env)
    with pytest.raises(vc.Unauthorized):  # the rotated-out token no longer opens anything
        env["manager"](client_for(env, token=rotated).status)
