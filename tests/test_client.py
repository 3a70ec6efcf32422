"""The manager's client (vr/client.py) against a small aiohttp server started here: what a
manager sees when the router answers, refuses, is busy, is away or is not who it claims.
These test the CLIENT; tests/test_e2e_agent.py drives the real daemon."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Self

import pytest
from aiohttp import web

from vr import client as vc
from vr.cli import main as vr_main

TOKEN = "t0ken-" + "x" * 40


def self_signed(where: Path, name: str, address: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for `address` that is its own CA, as the router makes at first start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = where / f"{name}.pem", where / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_file, key_file


class FakeRouter:
    """An aiohttp server in a thread: each (method, path) answers from its script in turn (the
    last answer repeats), and every request that arrived is recorded."""

    def __init__(self, tls: tuple[Path, Path] | None = None, port: int = 0, unix: str | None = None,
                 client_ca: Path | None = None):  # fmt: skip
        self.client_ca = client_ca
        self.script: dict[tuple[str, str], list] = {}
        self.seen: list[dict] = []
        self.tls, self.port, self.unix = tls, port, unix
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def answer(self, method: str, path: str, *answers) -> None:
        """Each answer: (status, body) or (status, body, headers) or a number of seconds to
        sleep before answering with the next one."""
        self.script[(method, path)] = list(answers)

    def count(self, method: str, path: str) -> int:
        return sum(1 for s in self.seen if s["method"] == method and s["path"] == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.path, "query": dict(request.query),
                          "authorization": request.headers.get("Authorization"), "body": body,
                          "content_type": request.headers.get("Content-Type")})  # fmt: skip
        answers = self.script.get((request.method, request.path))
        if not answers:
            return web.json_response({"error": {"path": request.path, "reason": "no such route"}}, status=404)
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, int | float):
            await asyncio.sleep(answer)
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
        status, payload, headers = (*answer, {})[:3]
        if isinstance(payload, str):
            return web.Response(text=payload, status=status, headers=headers)
        return web.json_response(payload, status=status, headers=headers)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        if self.unix:
            await web.UnixSite(self.runner, self.unix).start()
            return
        context = None
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, self.tls))
            if self.client_ca:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(str(self.client_ca))
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def __enter__(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


@pytest.fixture
def certs(tmp_path) -> dict:
    router = self_signed(tmp_path, "router")
    stranger = self_signed(tmp_path, "stranger")
    return {"router": router, "stranger": stranger}


@pytest.fixture
def router(certs):
    with FakeRouter(tls=certs["router"]) as fake:
        yield fake


def make_client(fake: FakeRouter, certs: dict, **kw) -> vc.RouterClient:
    kw = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout": 10, **kw}
    return vc.RouterClient(fake.url, TOKEN, ca=certs["router"][0], **kw)


APPLIED = {"outcome": "applied", "generation": 8, "changed": ["dnsmasq", "nftables"], "duration_ms": 41.6,
           "timings_ms": {}, "warnings": [], "batched": 1}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ what goes out


def test_push_sends_the_token_and_the_payload_and_returns_the_answer(router, certs):
    router.answer("PATCH", "/v1/config", (200, APPLIED))
    with make_client(router, certs) as client:
        answer = client.push({"generation": 8, "dhcp_entries": {"upsert": []}}, confirm_s=30)
    assert answer == APPLIED
    (request,) = router.seen
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert request["content_type"] == "application/json"
    assert json.loads(request["body"]) == {"generation": 8, "dhcp_entries": {"upsert": []}}
    assert request["query"] == {"confirm_s": "30"}


def test_next_generation_and_reads(router, certs):
    router.answer("PATCH", "/v1/config", (200, APPLIED))
    router.answer("GET", "/v1/events", (200, {"events": [{"event": "apply", "generation": 8}]}))
    router.answer("GET", "/healthz", (200, {"ok": True}))
    router.answer("GET", "/metrics", (200, "vr_applies_total 3\n"))
    with make_client(router, certs) as client:
        client.push({"dhcp_entries": {"delete": ["02:00:00:00:01:10"]}}, next_generation=True)
        assert client.events(resource="vm:02:00:00:00:01:10", limit=5) == [{"event": "apply", "generation": 8}]
        assert client.healthz() is True
        assert client.metrics() == "vr_applies_total 3\n"
    assert router.seen[0]["query"] == {"generation": "next"}
    assert router.seen[1]["query"] == {"resource": "vm:02:00:00:00:01:10", "limit": "5"}
    assert router.seen[2]["authorization"] == f"Bearer {TOKEN}"  # sent, though /healthz does not need it


def test_a_patch_bundle_goes_as_octet_stream(router, certs, tmp_path):
    bundle = tmp_path / "vr-0.1.1.tar.gz"
    bundle.write_bytes(b"\x1f\x8b" + os.urandom(5000))
    result = {"action": "patch", "from": "0.1.0", "to": "0.1.1", "outcome": "applied", "duration_ms": 900.0,
              "message": "ok"}  # fmt: skip
    router.answer("POST", "/v1/patch", (200, result))
    with make_client(router, certs) as client:
        assert client.upload_patch(bundle, allow_downgrade=True) == result
    (request,) = router.seen
    assert request["body"] == bundle.read_bytes()
    assert request["content_type"] == "application/octet-stream"
    assert request["query"] == {"allow_downgrade": "1"}


# ------------------------------------------------------------------ retries


def test_503_is_retried_honouring_retry_after(router, certs):
    busy = (503, {"error": {"path": "", "reason": "recovering an interrupted apply"}}, {"Retry-After": "0"})
    router.answer("PATCH", "/v1/config", busy, busy, (200, APPLIED))
    with make_client(router, certs) as client:
        assert client.push({"generation": 8})["generation"] == 8
    assert router.count("PATCH", "/v1/config") == 3


def test_503_gives_up_after_the_retries(router, certs):
    router.answer("GET", "/v1/status", (503, {"error": {"path": "", "reason": "starting"}}, {"Retry-After": "0"}))
    with make_client(router, certs, retries=3) as client, pytest.raises(vc.Unavailable) as caught:
        client.status()
    assert router.count("GET", "/v1/status") == 4  # the first try and three retries
    assert caught.value.status == 503
    assert "starting" in str(caught.value)


def test_the_total_time_bounds_the_retries(router, certs):
    """A Retry-After longer than the client's total budget allows ends the retries early."""
    router.answer("GET", "/v1/status", (503, {"error": {"path": "", "reason": "starting"}}, {"Retry-After": "1"}))
    client = make_client(router, certs, retries=10, max_backoff_s=1.0, max_total_s=1.5)
    with client, pytest.raises(vc.Unavailable):
        client.status()
    assert router.count("GET", "/v1/status") == 2


@pytest.mark.parametrize(
    "status, kind, exit_code",
    [(400, vc.BadRequest, 2), (401, vc.Unauthorized, 77), (404, vc.NotFound, 1), (409, vc.Stale, 3),
     (413, vc.TooLarge, 2), (422, vc.Invalid, 2), (500, vc.ApplyFailed, 4)],
)  # fmt: skip
def test_4xx_and_500_are_never_retried(router, certs, status, kind, exit_code):
    reasons = {409: "generation 3 is not newer than the applied generation 7: payload refused as stale"}
    path = "generation" if status == 409 else "dhcp.entries[0].mac"  # a stale push: the router names the generation
    error = {"error": {"path": path, "reason": reasons.get(status, f"refused with {status}")}}
    router.answer("PATCH", "/v1/config", (status, error))
    with make_client(router, certs) as client, pytest.raises(kind) as caught:
        client.push({"generation": 3})
    assert router.count("PATCH", "/v1/config") == 1
    assert isinstance(caught.value, vc.ClientError)
    assert caught.value.status == status
    assert caught.value.problems == [(path, error["error"]["reason"])]
    assert str(caught.value).startswith(f"{path}: ")
    assert caught.value.exit_code == exit_code


def test_a_list_of_problems_and_a_busy_router(router, certs):
    problems = [{"path": "interfaces[1].addresses[0]", "reason": "not an address"},
                {"path": "dhcp.entries[3].ip", "reason": "outside every tier"}]  # fmt: skip
    router.answer("PUT", "/v1/config", (422, {"error": problems}))
    router.answer("PATCH", "/v1/config", (409, {"error": {"path": "lock", "reason": "another apply or patch is running "
                                                          "(pid 42); try again when it ends"}}))  # fmt: skip
    router.answer("POST", "/v1/config/confirm", (409, {"error": {"path": "", "reason": "no commit-confirm pending"}}))
    with make_client(router, certs) as client:
        with pytest.raises(vc.Invalid) as invalid:
            client.put({"generation": 9})
        with pytest.raises(vc.Busy) as busy:
            client.push({"generation": 9})
        with pytest.raises(vc.Conflict) as nothing:
            client.confirm()
    assert invalid.value.problems == [("interfaces[1].addresses[0]", "not an address"),
                                      ("dhcp.entries[3].ip", "outside every tier")]  # fmt: skip
    assert str(invalid.value) == "interfaces[1].addresses[0]: not an address; dhcp.entries[3].ip: outside every tier"
    assert busy.value.exit_code == 75
    assert type(nothing.value) is vc.Conflict


def test_an_answer_that_is_not_json_still_says_what_happened(router, certs):
    router.answer("GET", "/v1/status", (502, "<html>bad gateway</html>"))
    with make_client(router, certs) as client, pytest.raises(vc.ClientError) as caught:
        client.status()
    assert caught.value.status == 502
    assert "bad gateway" in str(caught.value)


def test_connection_refused_is_retried_until_the_router_answers(certs):
    """The router's agent restarting: refused at first, then answering on the same port."""
    port = free_port()
    started: list[FakeRouter] = []

    def come_up() -> None:
        time.sleep(0.3)
        fake = FakeRouter(tls=certs["router"], port=port)
        fake.answer("GET", "/v1/status", (200, {"healthy": True, "generation": 8}))
        started.append(fake.__enter__())

    thread = threading.Thread(target=come_up)
    thread.start()
    try:
        client = vc.RouterClient(f"https://127.0.0.1:{port}", TOKEN, ca=certs["router"][0], retries=200,
                                 backoff_s=0.05, max_backoff_s=0.1, max_total_s=20)  # fmt: skip
        assert client.status() == {"healthy": True, "generation": 8}
    finally:
        thread.join(10)
        for fake in started:
            fake.__exit__()
    assert started and started[0].count("GET", "/v1/status") == 1


def test_connection_refused_gives_up_bounded(certs):
    client = vc.RouterClient(f"https://127.0.0.1:{free_port()}", TOKEN, ca=certs["router"][0], retries=3,
                             backoff_s=0.01, max_backoff_s=0.02)  # fmt: skip
    attempts = []
    original = client.session.request
    client.session.request = lambda *a, **kw: attempts.append(1) or original(*a, **kw)
    with pytest.raises(vc.Unavailable) as caught:
        client.push({"generation": 1})
    assert len(attempts) == 4
    assert caught.value.status is None
    assert "connection refused" in str(caught.value)
    attempts.clear()
    with pytest.raises(vc.Unavailable):  # refused: it never went out, so even this one is resent
        client.push(b'{"dhcp_entries": {"upsert": []}}')
    assert len(attempts) == 4


def test_plain_http_is_refused():
    with pytest.raises(ValueError, match="HTTPS only"):
        vc.RouterClient("http://169.254.0.10:8443", TOKEN)


def test_a_push_that_may_have_arrived_is_resent_only_when_it_carries_its_generation(router, certs):
    """No answer in time: the push may have been applied. With its generation, resending is
    harmless (the router says stale if the first one went through); without, it is not resent."""
    router.answer("PATCH", "/v1/config", 4.0, (200, APPLIED), (200, APPLIED))
    with make_client(router, certs, timeout=1.5) as client:
        with pytest.raises(vc.Unavailable) as caught:
            client.push(b'{"dhcp_entries": {"upsert": []}}')
        assert "may have been carried out" in str(caught.value)
        assert router.count("PATCH", "/v1/config") == 1
    router.answer("PATCH", "/v1/config", 4.0, (200, APPLIED), (200, APPLIED))
    with make_client(router, certs, timeout=1.5) as client:
        assert client.push({"generation": 8})["generation"] == 8
    assert router.count("PATCH", "/v1/config") == 3


# ------------------------------------------------------------------ TLS


def test_the_agent_certificate_is_verified(router, certs):
    router.answer("GET", "/v1/status", (200, {"healthy": True}))
    with make_client(router, certs) as client:
        assert client.status() == {"healthy": True}
    stranger = vc.RouterClient(router.url, TOKEN, ca=certs["stranger"][0], backoff_s=0.01)
    with pytest.raises(vc.TlsFailed) as caught:
        stranger.status()
    assert "does not verify" in str(caught.value)
    assert router.count("GET", "/v1/status") == 1  # the stranger's request never reached the server
    assert stranger.healthz() is False


def test_the_certificate_must_name_the_address(tmp_path):
    other = self_signed(tmp_path, "elsewhere", address="127.0.0.2")
    with FakeRouter(tls=other) as fake:
        client = vc.RouterClient(fake.url, TOKEN, ca=other[0])
        with pytest.raises(vc.TlsFailed):
            client.status()
        assert fake.seen == []


def test_a_client_certificate_when_the_router_asks_for_one(certs, tmp_path):
    from tests.conftest import make_ca_and_certificate

    client_ca, pair = make_ca_and_certificate(tmp_path, "manager-1")
    (tmp_path / "manager.pem").write_text(pair["certificate"])
    (tmp_path / "manager.key").write_text(pair["key"])
    with FakeRouter(tls=certs["router"], client_ca=Path(client_ca)) as fake:
        fake.answer("GET", "/v1/status", (200, {"healthy": True}))
        cert = (str(tmp_path / "manager.pem"), str(tmp_path / "manager.key"))
        with make_client(fake, certs, cert=cert) as client:
            assert client.status() == {"healthy": True}
        with make_client(fake, certs, retries=0) as client, pytest.raises(vc.Unavailable) as caught:
            client.status()  # no certificate: the handshake fails
        assert caught.value.status is None
    assert fake.count("GET", "/v1/status") == 1


# ------------------------------------------------------------------ the token file


def test_the_token_file(tmp_path):
    token = tmp_path / "token"
    token.write_text(f"  {TOKEN}\n")
    token.chmod(0o600)
    assert vc.read_token_file(token) == TOKEN
    token.chmod(0o644)
    with pytest.raises(ValueError, match="mode 0644 lets group or others read"):
        vc.read_token_file(token)
    token.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        vc.read_token_file(token)
    token.write_text("\n")
    token.chmod(0o600)
    with pytest.raises(ValueError, match="empty"):
        vc.read_token_file(token)
    token.write_text("two words\n")
    with pytest.raises(ValueError, match="one word"):
        vc.read_token_file(token)
    with pytest.raises(ValueError, match="cannot read"):
        vc.read_token_file(tmp_path / "missing")


# ------------------------------------------------------------------ `vr remote`


def remote(router: FakeRouter, certs: dict, tmp_path: Path, *args: str, token_mode: int = 0o600,
           url: str | None = None) -> list[str]:  # fmt: skip
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(token_mode)
    return ["remote", "--url", url or router.url, "--token-file", str(token), "--ca", str(certs["router"][0]),
            *args]  # fmt: skip


def test_remote_apply_prints_what_vr_apply_prints(router, certs, tmp_path, capsys):
    payload = tmp_path / "p.json"
    payload.write_text('{"generation": 8, "dhcp_entries": {"upsert": []}}')
    router.answer("PATCH", "/v1/config", (200, {**APPLIED, "warnings": ["dhcp: tier2 has no range"]}))
    assert vr_main(remote(router, certs, tmp_path, "apply", str(payload))) == 0
    out, err = capsys.readouterr()
    assert out == "applied generation 8 in 42 ms; changed: dnsmasq, nftables\n"
    assert err == "vr: warning: dhcp: tier2 has no range\n"
    assert router.seen[0]["body"] == payload.read_bytes()  # sent as written: the router judges it


def test_remote_status_and_events(router, certs, tmp_path, capsys):
    from vr.control.status import render_text

    report = {"router": "r-1", "release": "0.1.0", "generation": 8, "healthy": True,
              "last_apply": {"outcome": "applied", "time": 1.7e9, "generation": 8, "duration_ms": 40.0},
              "services": [{"name": "dnsmasq", "healthy": True, "state": "RUNNING", "pid": 77, "uptime_s": 9}],
              "daemon": {"pid": 5, "uptime_s": 3, "version": "0.1.0"}}  # fmt: skip
    events = [{"event": "apply", "generation": 7}, {"event": "apply", "generation": 8}]
    router.answer("GET", "/v1/status", (200, report))
    router.answer("GET", "/v1/events", (200, {"events": events}))
    assert vr_main(remote(router, certs, tmp_path, "status")) == 0
    assert capsys.readouterr().out == render_text(report) + "\n"
    assert vr_main(remote(router, certs, tmp_path, "status", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == report
    assert vr_main(remote(router, certs, tmp_path, "events", "--resource", "service:dnsmasq", "--limit", "2")) == 0
    assert capsys.readouterr().out == "".join(json.dumps(e, sort_keys=True) + "\n" for e in events)
    assert router.seen[-1]["query"] == {"resource": "service:dnsmasq", "limit": "2"}


@pytest.mark.parametrize(
    "status, reason, code",
    [(422, "not a MAC address", 2), (409, "generation 3 is not newer than the applied generation 7", 3),
     (409, "another apply or patch is running (pid 9); try again when it ends", 75), (401, "no valid token", 77),
     (500, "reload failed for haproxy: exit 1; rolled back to generation 7", 4), (400, "not JSON", 2)],
)  # fmt: skip
def test_remote_errors_and_exit_codes(router, certs, tmp_path, capsys, status, reason, code):
    payload = tmp_path / "p.json"
    payload.write_text('{"generation": 3}')
    path = "generation" if reason.startswith("generation") else "lock" if reason.startswith("another apply") \
        else "dhcp_entries.upsert[0].mac"  # fmt: skip
    router.answer("PATCH", "/v1/config", (status, {"error": {"path": path, "reason": reason}}))
    assert vr_main(remote(router, certs, tmp_path, "apply", str(payload))) == code
    err = capsys.readouterr().err
    assert f"{path}: " + reason in err
    assert err.startswith("vr: ")
    assert "Traceback" not in err


def test_remote_refuses_a_readable_token_file_and_reports_unreachable(router, certs, tmp_path, capsys):
    assert vr_main(remote(router, certs, tmp_path, "status", token_mode=0o644)) == 2
    assert "lets group or others read" in capsys.readouterr().err
    assert router.seen == []
    nobody = f"https://127.0.0.1:{free_port()}"
    assert vr_main(remote(router, certs, tmp_path, "--retries", "2", "status", url=nobody)) == 1
    assert "connection refused" in capsys.readouterr().err


# ------------------------------------------------------------------ the local socket


def test_local_client_over_the_unix_socket(tmp_path):
    path = str(tmp_path / "vr.sock")
    assert vc.LocalClient(path).available() is False  # no socket yet
    with FakeRouter(unix=path) as fake:
        fake.answer("PATCH", "/v1/config", (200, APPLIED))
        fake.answer("GET", "/metrics", (200, "vr_up 1\n"))
        local = vc.LocalClient(path)
        assert local.available() is True
        status, body = local.request("PATCH", "/v1/config?generation=next", b'{"dhcp_entries": {}}',
                                     "application/json")  # fmt: skip
        assert (status, body) == (200, APPLIED)
        assert fake.seen[0]["query"] == {"generation": "next"} and fake.seen[0]["body"] == b'{"dhcp_entries": {}}'
        assert local.request("GET", "/nowhere") == (404, {"error": {"path": "/nowhere", "reason": "no such route"}})
        assert local.request("GET", "/metrics") == (200, {"text": "vr_up 1\n"})
        error = vc.error_for(404, local.request("GET", "/nowhere")[1])
        assert isinstance(error, vc.NotFound) and error.problems == [("/nowhere", "no such route")]
    # A socket file a dead daemon left: present, but nobody accepts.
    if os.path.exists(path):
        os.unlink(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert os.path.exists(path)
    assert vc.LocalClient(path).available() is False
    with pytest.raises(OSError):
        vc.LocalClient(path).request("GET", "/v1/status")


ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"outcome": "x"}'
CHUNKED = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n'


@pytest.mark.parametrize("sent, error", [
    (b"", ConnectionResetError),                        # killed before it answered
    (ANSWER[:20], ConnectionResetError),                 # killed inside the head
    (ANSWER[:-3], ConnectionResetError),                 # killed inside a Content-Length body
    (CHUNKED + b"10\r\n{\"outcome", ConnectionResetError),  # killed inside a chunk
    (CHUNKED + b"10\r\n{\"outcome\": \"x\"}\r\n", ConnectionResetError),  # no last chunk
    (b"SSH-2.0-OpenSSH\r\n\r\n", ConnectionError),      # something else on the socket
    (CHUNKED + b"zz\r\n", ConnectionError),
    (ANSWER, None),
    (ANSWER[: ANSWER.index(b"{")], "HEAD"),             # a HEAD answer: Content-Length, and no body
    (CHUNKED + b"10\r\n{\"outcome\": \"x\"}\r\n0\r\n\r\n", None),
])  # fmt: skip
def test_an_answer_the_daemon_did_not_finish_is_a_reset_never_an_answer(tmp_path, sent, error):
    """A daemon killed mid-answer reads as a reset (the caller sends again or falls back), a
    server that does not speak HTTP as a plain connection error, never as a short answer."""
    path = str(tmp_path / "vr.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer_once() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(sent)

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        if error == "HEAD":
            assert vc.LocalClient(path, timeout=5).request("HEAD", "/healthz")[0] == 200
        elif error is None:
            assert vc.LocalClient(path, timeout=5).request("GET", "/v1/status") == (200, {"outcome": "x"})
        else:
            with pytest.raises(error) as raised:
                vc.LocalClient(path, timeout=5).request("GET", "/v1/status")
            if error is ConnectionError:
                assert not isinstance(raised.value, ConnectionResetError)
    finally:
        thread.join(timeout=5)
        server.close()


def test_remote_validate_confirm_config_and_metrics(router, certs, tmp_path, capsys):
    payload = tmp_path / "p.json"
    payload.write_text('{"generation": 9}')
    diff = "--- live/dnsmasq/hosts\n+++ new/dnsmasq/hosts\n@@ -1 +1,2 @@\n a\n+b\n"
    plan = {"valid": True, "generation": 9, "warnings": [],
            "changes": [{"service": "dnsmasq", "files": {"hosts": diff}},
                        {"service": "haproxy", "files": {"certs/web.pem": "<secret: changed>"}}]}  # fmt: skip
    router.answer("POST", "/v1/config/validate", (200, plan))
    router.answer("POST", "/v1/config/confirm", (200, {"confirmed": 9}))
    router.answer("GET", "/v1/config", (200, {"generation": 9, "agent": {"tokens": ["<redacted>"]}}))
    router.answer("GET", "/metrics", (200, "vr_up 1\n"))
    assert vr_main(remote(router, certs, tmp_path, "validate", str(payload))) == 0
    assert capsys.readouterr().out == diff + "secret file haproxy/certs/web.pem changed (content not shown)\n"
    assert vr_main(remote(router, certs, tmp_path, "confirm")) == 0
    assert capsys.readouterr().out == "confirmed generation 9\n"
    assert vr_main(remote(router, certs, tmp_path, "config")) == 0
    assert json.loads(capsys.readouterr().out)["agent"] == {"tokens": ["<redacted>"]}
    assert vr_main(remote(router, certs, tmp_path, "metrics")) == 0
    assert capsys.readouterr().out == "vr_up 1\n"


def test_remote_patch_apply_waits_for_the_patch_to_end(router, certs, tmp_path, capsys):
    """The router answers 202 at once and replaces its daemon meanwhile: the client polls
    GET /v1/patch, through a moment it does not answer, until the record is the new one."""
    bundle = tmp_path / "vr-0.1.1.tar.gz"
    bundle.write_bytes(b"bundle")
    old = {"txid": "a", "action": "patch", "from": "0.0.9", "to": "0.1.0", "outcome": "ok", "message": "",
           "duration_ms": 1.0}  # fmt: skip
    new = {"txid": "b", "action": "patch", "from": "0.1.0", "to": "0.1.1", "outcome": "ok", "duration_ms": 912.4,
           "message": "self-test passed; reconciled"}  # fmt: skip
    router.answer("POST", "/v1/patch", (202, {"started": True, "pid": 99, "action": "apply", "status": "/v1/patch"}))
    router.answer("GET", "/v1/patch", (200, {"current": "0.1.0", "last": old, "in_progress": False}),
                  (200, {"current": "0.1.0", "last": old, "in_progress": True}),
                  (503, {"error": {"path": "", "reason": "starting"}}, {"Retry-After": "0"}),
                  (200, {"current": "0.1.1", "last": new, "in_progress": False}))  # fmt: skip
    assert vr_main(remote(router, certs, tmp_path, "patch", "apply", str(bundle))) == 0
    assert capsys.readouterr().out == "patch 0.1.0 -> 0.1.1: ok in 912 ms; self-test passed; reconciled\n"
    assert router.count("POST", "/v1/patch") == 1
    # A bundle the router refused before it began leaves the record as it was: said, not hidden.
    router.answer("GET", "/v1/patch", (200, {"current": "0.1.1", "last": new, "in_progress": False}))
    assert vr_main(remote(router, certs, tmp_path, "patch", "apply", str(bundle))) == 1
    assert "refused the patch" in capsys.readouterr().err
