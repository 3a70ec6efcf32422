"""The daemon's HTTP API (aiohttp): the local unix socket and the manager's HTTPS agent.

One set of routes, two doors. The unix socket (0600 in the run dir) needs no token: only root
opens it. The agent listens on each address of the control interface (never 0.0.0.0), TLS
always (the document's certificate, else a self-signed pair kept in the state dir), and
asks for a bearer token (stored as its SHA-256, compared in constant time) and, with a
client CA in the document, a client certificate.

Every answer is JSON; an error is {"error": {"path", "reason"}} (a list when several) with its
status: 400 unreadable, 401, 404, 405, 409 stale/busy/nothing to confirm, 413 too large,
422 invalid, 500 failed and rolled back, 503 not ready. Nothing of Python's reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from vr.foundation import jsontext
from vr.foundation.document import token_digest
from vr.foundation.errors import (
    ApplyFailed,
    Busy,
    InvalidPayload,
    Problem,
    StalePayload,
    StoredDocumentUnreadable,
    VrError,
)
from vr.foundation.files import read_json, stat_key
from vr.services.agent import CLIENT_CA, CONFIG

MAX_CONFIG_BYTES = jsontext.MAX_BYTES
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
BODY_TIMEOUT_S = 60.0  # a client that sends its body slower than this is cut off
IDLE_TIMEOUT_S = 15.0  # a connection without a whole request's headers this long is closed (aiohttp's keep-alive)
REDACTED = "<redacted>"
SECRET_FIELDS = frozenset({"psk", "password", "key", "tokens", "user_data"})  # keys, PSKs, passwords, token hashes, user data


class RequestRefused(Exception):
    """An answer other than 200, raised anywhere in a handler."""

    def __init__(self, status: int, problems: list[Problem] | Problem, headers: dict | None = None):
        self.status, self.headers = status, headers or {}
        self.problems = problems if isinstance(problems, list) else [problems]


def error_body(problems: list[Problem]) -> dict:
    items = [{"path": p.path, "reason": p.reason} for p in problems[:1000]]
    return {"error": items[0] if len(items) == 1 else items}


def refusal(error: BaseException) -> RequestRefused:
    """What the pipeline raised, as the client hears it."""
    if isinstance(error, InvalidPayload):
        return RequestRefused(422, error.problems)
    if isinstance(error, jsontext.JsonRefused):
        return RequestRefused(400, Problem(error.path, error.reason))
    if isinstance(error, StalePayload):
        return RequestRefused(409, Problem("generation", str(error)))
    if isinstance(error, Busy):
        return RequestRefused(409, Problem("lock", str(error)), {"Retry-After": "1"})
    if isinstance(error, StoredDocumentUnreadable):
        return RequestRefused(409, Problem("document", str(error)))
    if isinstance(error, ApplyFailed):
        if error.step == "check":  # the daemon's own checker refused the files: nothing live was touched
            return RequestRefused(422, Problem(f"service:{error.service}", f"{error}; nothing was changed"))
        return RequestRefused(500, Problem(f"service:{error.service}", f"{error}; rolled back to last-known-good"))
    if isinstance(error, VrError):
        status = getattr(error, "http_status", 409)
        return RequestRefused(status, Problem("", str(error)), {"Retry-After": "1"} if status == 503 else None)
    return RequestRefused(500, Problem("", f"internal error ({type(error).__name__}); see the router's log"))


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestRefused as error:
        return web.json_response(error_body(error.problems), status=error.status, headers=error.headers)
    except web.HTTPException as error:  # aiohttp's own: 404, 405, 413 from client_max_size
        reason = {404: "no such route", 405: f"method {request.method} not allowed here",
                  413: "request body too large"}.get(error.status, error.reason)  # fmt: skip
        headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
        return web.json_response(error_body([Problem(request.path[:200], reason)]), status=error.status,
                                 headers=headers)  # fmt: skip
    except (VrError, jsontext.JsonRefused) as error:  # the pipeline's refusals, JSON the reader refused
        refused = refusal(error)
    except Exception as error:  # noqa: BLE001 - logged for the operator; the client gets no trace
        import traceback

        print(f"vr daemon: {request.method} {request.path[:200]}: {traceback.format_exc()}", file=sys.stderr)
        refused = refusal(error)
    return web.json_response(error_body(refused.problems), status=refused.status, headers=refused.headers)


def _authenticator(server: AgentServer) -> Any:
    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        tokens = server.tokens
        if tokens:
            header = request.headers.get("Authorization", "")
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not presented.strip():
                raise RequestRefused(401, Problem("Authorization", "a bearer token is required"),
                                     {"WWW-Authenticate": "Bearer"})  # fmt: skip
            digest = token_digest(presented.strip())
            matched = False
            for stored in tokens:  # every one compared: the time does not tell which matched
                matched |= hmac.compare_digest(digest, stored)
            if not matched:
                raise RequestRefused(401, Problem("Authorization", "the token is not valid for this router"),
                                     {"WWW-Authenticate": 'Bearer error="invalid_token"'})  # fmt: skip
        return await handler(request)

    return authenticate


# ------------------------------------------------------------------ reading requests
async def _body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise RequestRefused(413, Problem("", f"{request.content_length} bytes; a request has at most {limit}"))
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise RequestRefused(413, Problem("", f"more than {limit} bytes; a request has at most {limit}"))
                chunks.append(chunk)
    except TimeoutError:
        raise RequestRefused(408, Problem("", f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s")) from None
    return b"".join(chunks)


async def _json(request: web.Request) -> object:
    data = await _body(request, MAX_CONFIG_BYTES)
    if not data.strip():
        raise RequestRefused(400, Problem("", "the request has no body: send the payload as JSON"))
    return jsontext.loads(data)


def _number(request: web.Request, name: str, low: float, high: float) -> float | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise RequestRefused(400, Problem(name, f"a number from {low:g} to {high:g}"))
    return value


def _next_generation(request: web.Request) -> bool:
    value = request.query.get("generation")
    if value not in (None, "next"):
        raise RequestRefused(400, Problem("generation", "the only value the query takes is 'next'"))
    return value == "next"


def _daemon(request: web.Request) -> Any:
    return request.app["daemon"]


def _ready(request: web.Request) -> None:
    daemon = _daemon(request)
    if daemon.settings.journal_path.exists() and daemon.worker.idle():
        raise RequestRefused(503, Problem("", "an interrupted apply is being recovered"), {"Retry-After": "1"})


# ------------------------------------------------------------------ routes
async def healthz(request: web.Request) -> web.Response:
    reason = _daemon(request).healthy()
    if reason:
        return web.json_response({"ok": False, "reason": reason}, status=503)
    return web.json_response({"ok": True})


async def put_config(request: web.Request) -> web.Response:
    raw = await _json(request)
    from vr.foundation.document import SECTIONS, RouterDocument

    if not isinstance(raw, dict):
        raise RequestRefused(422, Problem("", "a document is a JSON object"))
    missing = [s for s in SECTIONS if s not in raw and RouterDocument.model_fields[s].is_required()]
    if missing:
        raise RequestRefused(422, [Problem(s, "required: PUT carries the whole document (PATCH a part)") for s in missing])
    # A whole document: a section it leaves out goes back to its default, not kept from before.
    defaults = {s: _default_section(s) for s in SECTIONS if s not in raw}
    return await _push(request, {**defaults, **raw})


async def patch_config(request: web.Request) -> web.Response:
    return await _push(request, await _json(request))


async def _push(request: web.Request, raw: object) -> web.Response:
    _ready(request)
    confirm_s = _number(request, "confirm_s", 1, 86400)
    next_generation = _next_generation(request)
    daemon = _daemon(request)
    result = await daemon.push(raw, next_generation=next_generation, confirm_s=confirm_s)
    body = {"outcome": "applied", "generation": result.generation, "changed": result.changed,
            "duration_ms": result.duration_ms, "timings_ms": result.timings_ms, "warnings": result.warnings,
            "batched": result.batched}  # fmt: skip
    if confirm_s is not None:
        body["confirm"] = daemon.confirm_report()
    return web.json_response(body)


def _default_section(name: str) -> Any:
    from vr.foundation.document import RouterDocument

    value = RouterDocument.model_fields[name].get_default(call_default_factory=True)
    if isinstance(value, list):
        return [item.model_dump(mode="json") for item in value]
    return value.model_dump(mode="json")


async def get_config(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    doc = await asyncio.get_running_loop().run_in_executor(None, daemon.pipeline.stored_document)
    if doc is None:
        raise RequestRefused(404, Problem("", "nothing applied yet"))
    return web.json_response(redact(doc.model_dump(mode="json")))


def redact(value: Any) -> Any:
    """The document without a secret: keys, pre-shared keys, passwords, token hashes, user data."""
    if isinstance(value, dict):
        return {k: (_hidden(v) if k in SECRET_FIELDS else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _hidden(value: Any) -> Any:
    if value is None:
        return None
    return [REDACTED for _ in value] if isinstance(value, list) else REDACTED


async def validate_config(request: web.Request) -> web.Response:
    raw = await _json(request)
    next_generation = _next_generation(request)
    daemon = _daemon(request)
    doc, warnings, files = await daemon.call(lambda: daemon.pipeline.preview(raw, next_generation))
    changes: dict[str, dict] = {}
    for item in files:
        shown = item["diff"] if item["diff"] is not None else f"<secret: {'removed' if item['removed'] else 'changed'}>"
        changes.setdefault(item["service"], {})[item["path"]] = shown
    return web.json_response({"valid": True, "generation": doc.generation, "warnings": warnings,
                              "changes": [{"service": s, "files": f} for s, f in changes.items()],
                              "files": files})  # fmt: skip


async def confirm_config(request: web.Request) -> web.Response:
    generation = _daemon(request).confirmed()
    return web.json_response({"confirmed": generation})


async def status(request: web.Request) -> web.Response:
    """Everything by default (the manager's poll); firewall=0, lb=0, vpn=0 leave a part out."""
    parts = {}
    for name in ("firewall", "lb", "vpn", "usage"):
        value = request.query.get(name, "1")
        if value not in ("0", "1", "true", "false"):
            raise RequestRefused(400, Problem(name, "0 or 1"))
        parts[name] = value in ("1", "true")
    return web.json_response(await _daemon(request).status(**parts))


async def events(request: web.Request) -> web.Response:
    resource = request.query.get("resource")
    if resource is not None and (not resource or len(resource) > 256 or any(ord(c) < 32 for c in resource)):
        raise RequestRefused(400, Problem("resource", "KIND or KIND:ID, printable, at most 256 characters"))
    since = _number(request, "since", 0, 1e11)
    limit = _number(request, "limit", 1, 100000)
    await _daemon(request).recover_first()  # the recovery's own events are then among those shown
    found = await asyncio.get_running_loop().run_in_executor(
        None, _daemon(request).read_events, resource, since, int(limit or 1000)
    )
    return web.json_response({"events": found})


async def metrics(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    from prometheus_client import CONTENT_TYPE_LATEST

    body = await asyncio.get_running_loop().run_in_executor(None, daemon.metrics.render)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


# The patch routes run the `vr patch` command in its own session: a patch restarts this very
# daemon, and the patch must outlive it. POST answers 202 at once; GET /v1/patch tells the end.
async def post_patch(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    downgrade = request.query.get("allow_downgrade") in ("1", "true")
    upload_dir = daemon.settings.state_dir / "patch-upload"
    upload_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = await _body(request, MAX_BUNDLE_BYTES)
    if not data:
        raise RequestRefused(400, Problem("", "the request has no body: send the bundle (application/octet-stream)"))
    with tempfile.NamedTemporaryFile(dir=upload_dir, suffix=".vrpatch", delete=False) as file:
        file.write(data)
    return _start_patch(daemon, ["apply", file.name, "--json", *(["--allow-downgrade"] if downgrade else [])])


async def rollback_patch(request: web.Request) -> web.Response:
    return _start_patch(_daemon(request), ["rollback", "--json"])


def _start_patch(daemon: Any, arguments: list[str]) -> web.Response:
    running = daemon.patch_process
    if running is not None and running.poll() is None:
        raise RequestRefused(409, Problem("", f"a patch is in progress (pid {running.pid})"), {"Retry-After": "5"})
    log = daemon.settings.log_dir / "patch-api.log"
    with open(log, "ab") as output:
        daemon.patch_started = (arguments[0], output.tell())  # what it says is read back from here
        daemon.patch_process = subprocess.Popen([sys.executable, "-m", "vr", "patch", *arguments],
                                                env={**os.environ, **daemon.settings.environment()},
                                                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                                start_new_session=True)  # fmt: skip
    return web.json_response({"started": True, "pid": daemon.patch_process.pid, "action": arguments[0],
                              "status": "/v1/patch"}, status=202)  # fmt: skip


async def get_patch(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "vr", "patch", "status", "--json",
                                                   env={**os.environ, **daemon.settings.environment()},
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RequestRefused(500, Problem("", err.decode(errors="replace").strip()[:500] or "vr patch status failed"))
    report = jsontext.loads(out)
    running = daemon.patch_process
    report["in_progress"] = running is not None and running.poll() is None
    report["last_request"] = _last_patch_request(daemon)
    return web.json_response(report)


def _last_patch_request(daemon: Any) -> dict | None:
    """The last patch this daemon ran for a client: its exit code and, when it refused before
    it began (a bad signature: patch.json then says nothing), its own last words."""
    running = daemon.patch_process
    if running is None or running.poll() is None:
        return None
    action, offset = daemon.patch_started
    said = ""
    try:
        with open(daemon.settings.log_dir / "patch-api.log", "rb") as log:
            log.seek(offset)
            said = log.read(4096).decode(errors="replace").strip()
    except OSError:
        pass
    if running.returncode == 0:
        said = ""
    return {"action": action, "exit_code": running.returncode, "message": said.splitlines()[-1][:500] if said else ""}


def make_app(daemon: Any, server: AgentServer | None) -> web.Application:
    """server None: the local socket (no token); else the agent, which authenticates."""
    middlewares = [_errors] if server is None else [_errors, _authenticator(server)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BUNDLE_BYTES)
    app["daemon"] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_put("/v1/config", put_config)
    app.router.add_patch("/v1/config", patch_config)
    app.router.add_get("/v1/config", get_config)
    app.router.add_post("/v1/config/validate", validate_config)
    app.router.add_post("/v1/config/confirm", confirm_config)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/events", events)
    app.router.add_post("/v1/patch", post_patch)
    app.router.add_get("/v1/patch", get_patch)
    app.router.add_post("/v1/patch/rollback", rollback_patch)
    app.router.add_get("/metrics", metrics)
    return app


class AgentServer:
    """The daemon's listeners: the local socket always, the agent as agent.json says."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.tokens: list[str] = []
        self.local_runner: web.AppRunner | None = None
        self.remote_runner: web.AppRunner | None = None
        self.sites: list[web.TCPSite] = []
        self.serving: tuple | None = None  # what the sites were made from
        # name -> keeper.Listener: every socket this daemon serves (the guest data server's too),
        # handed over to the keeper whole whenever it changes.
        self.listeners: dict[str, Any] = {}
        self.held: dict[str, Any] = {}  # the previous daemon's, from the keeper, not taken back yet
        self.agent_names: set[str] = set()  # the listeners the agent serves
        daemon.patch_process = None
        daemon.patch_started = ("", 0)

    async def start_local(self) -> None:
        """The local socket: the one the keeper held for the daemon before this one (so the
        connections queued while no daemon ran are answered now), else bound anew."""
        from vr.control import keeper
        from vr.control.daemon import DRAIN_S

        self.held = keeper.take_listeners(self.settings)  # the previous daemon's, by name
        self.local_runner = web.AppRunner(make_app(self.daemon, None), access_log=None, handle_signals=False,
                                          keepalive_timeout=IDLE_TIMEOUT_S, shutdown_timeout=DRAIN_S)  # fmt: skip
        await self.local_runner.setup()
        path = self.settings.daemon_socket
        name = keeper.unix_name(path)
        listener = self.held.pop(name, None)
        if listener is not None and not keeper.still_bound(listener[0], path):
            listener[1].close()  # someone bound a new socket there: that one is what clients reach
            listener = None
        self.listeners[name] = listener or keeper.bind_unix(path)
        await web.SockSite(self.local_runner, self.listeners[name][1].dup()).start()
        keeper.hand_over(self.settings, [*self.listeners.values(), *self.held.values()])

    async def reload(self) -> None:
        """Serve what agent.json says now. A listening socket is kept (or taken over from the
        keeper) for as long as its address and port are wanted; new sites on it start before
        the old ones stop, so a token or certificate change refuses no connection."""
        from vr.control import keeper
        from vr.control.daemon import DRAIN_S

        config = read_json(self.settings.service_dir("agent") / CONFIG)
        self.tokens = list(config.get("tokens", [])) if config else []
        wanted = self._wanted(config)
        held = self.held
        if wanted == self.serving:
            return
        listeners = self.listeners
        if self.remote_runner is None and wanted is not None:
            self.remote_runner = web.AppRunner(make_app(self.daemon, self), access_log=None, handle_signals=False,
                                               keepalive_timeout=IDLE_TIMEOUT_S, shutdown_timeout=DRAIN_S)  # fmt: skip
            await self.remote_runner.setup()
        old, self.sites = self.sites, []
        names: set[str] = set()
        if wanted is not None and wanted != self.serving:
            addresses, port = wanted[0], wanted[1]
            context = self._tls_context(config, addresses)
            for address in addresses:
                name = keeper.tcp_name(address, port)
                try:
                    if name not in listeners:
                        listeners[name] = held.pop(name, None) or keeper.bind_tcp(address, port)
                    site = web.SockSite(self.remote_runner, listeners[name][1].dup(), ssl_context=context,
                                        backlog=512)  # fmt: skip
                    await site.start()
                except OSError as error:
                    print(f"vr daemon: agent cannot listen on {address} port {port}: {error.strerror}", file=sys.stderr)
                    continue
                names.add(name)
                self.sites.append(site)
        for site in old:
            await site.stop()
        for name in self.agent_names - names:
            listeners.pop(name)[1].close()
        self.agent_names = names
        self.serving = wanted
        keeper.hand_over(self.settings, list(listeners.values()))

    def release_held(self) -> None:
        """Once every server has taken back what it serves: the previous daemon's sockets that
        this document no longer serves are let go."""
        from vr.control import keeper

        if not self.held:
            return
        for _, sock in self.held.values():
            sock.close()
        self.held.clear()
        keeper.hand_over(self.settings, list(self.listeners.values()))

    def _wanted(self, config: dict | None) -> tuple | None:
        if not config or not config.get("listen"):
            return None
        files = []
        for name in (config.get("tls"), config.get("client_ca")):
            path = self.settings.service_dir("agent") / name if name else None
            files.append(stat_key(path) if path else None)
        return (tuple(config["listen"]), int(config["port"]), tuple(files), bool(config.get("client_ca")))

    def _tls_context(self, config: dict, addresses: tuple) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if config.get("tls"):
            context.load_cert_chain(self.settings.service_dir("agent") / config["tls"])
        else:
            context.load_cert_chain(self_signed(self.settings.agent_tls_dir, list(addresses)))
        if config.get("client_ca"):
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.settings.service_dir("agent") / CLIENT_CA)
        return context

    async def stop(self) -> None:
        """Stop accepting on every site first (the keeper's copies of the sockets keep queueing
        connections for the next daemon), then let the requests in progress finish."""
        runners = [r for r in (self.remote_runner, self.local_runner) if r is not None]
        for runner in runners:
            for site in list(runner.sites):
                await site.stop()
        await asyncio.gather(*(runner.cleanup() for runner in runners))
        for _, sock in self.listeners.values():
            sock.close()


def self_signed(directory: Path, addresses: list[str]) -> Path:
    """The agent's own certificate when the document brings none: made once, kept (0600),
    made again only when it no longer names every address the agent listens on, or expires.
    What it names is kept beside it (tls.json): checking costs no `cryptography` import
    (8 MB the daemon would hold for as long as it lives)."""
    path, about = directory / "tls.pem", directory / "tls.json"
    known = read_json(about) if about.exists() and path.exists() else None
    if isinstance(known, dict) and set(addresses) <= set(known.get("addresses", [])) \
            and known.get("not_after", 0) > time.time() + 86400:  # fmt: skip
        return path
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from vr.foundation.files import write_atomic, write_json_atomic

    wanted = sorted({ipaddress.ip_address(a) for a in addresses}, key=str)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vr agent")])
    not_after = now + datetime.timedelta(days=3650)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(a) for a in wanted]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public = certificate.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    write_atomic(path, public + private, mode=0o600)
    write_atomic(directory / "certificate.pem", public)  # the CA a client trusts
    write_json_atomic(about, {"addresses": [str(a) for a in wanted], "not_after": not_after.timestamp()})
    return path


__all__ = ["AgentServer", "make_app", "redact"]
