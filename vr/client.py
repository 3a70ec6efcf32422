"""The manager's side of the router's API: `LocalClient` over the daemon's unix socket (the
CLI's thin path), `RouterClient` over HTTPS with a bearer token (the manager, `vr remote`).

Only the standard library is imported here at module level: the CLI imports this module on
its fast path, and `requests` costs more than the whole thin client. `RouterClient` imports
it when it is built.

Retries. A request is retried, with capped exponential back-off, jitter and a bounded total
time, when the router did not answer (connection refused, reset, timed out) or answered 503
(recovering or starting; its Retry-After is honoured). Never on a 4xx or a 500: those are the
router's verdict, and asking again would change nothing or apply twice. A request that may
have reached the router before the connection broke is retried only when a second copy is
harmless: reads, dry runs, and pushes that carry their generation (or generation=next). A push
retried with an explicit generation that the first attempt did in fact apply comes back 409
stale (`Stale`): the caller compares the router's generation (`status()["generation"]`) with
its own and, when they are equal, takes it as already applied.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

CONNECT_TIMEOUT_S = 2.0
LOCAL_CONNECT_TIMEOUT_S = 0.5
LOCAL_TIMEOUT_S = 300.0  # a whole cold apply answers only once the router is healthy
MAX_PROBLEMS_SHOWN = 100
PATCH_WAIT_S = 900.0  # a patch runs its self-test and reconcile: minutes on a large router
PATCH_POLL_S = 0.5


# ------------------------------------------------------------------ errors


class ClientError(Exception):
    """What the router (or the way to it) refused: `status` is the HTTP status (None when no
    answer came back), `problems` the server's (path, reason) pairs, in its order."""

    exit_code = 1  # what `vr remote` returns, as the local commands would

    def __init__(self, status: int | None, problems: list[tuple[str, str]]):
        self.status = status
        self.problems = problems or [("", f"HTTP {status}")]
        super().__init__("; ".join(f"{path}: {reason}" if path else reason for path, reason in self.problems))

    @property
    def reason(self) -> str:
        return self.problems[0][1]


class BadRequest(ClientError):
    """400: the body did not read as JSON (or was too deep, or not UTF-8)."""

    exit_code = 2


class Unauthorized(ClientError):
    """401: no token, a wrong one, or a client certificate the router does not accept."""

    exit_code = 77


class NotFound(ClientError):
    """404: an unknown route, or nothing applied yet (GET /v1/config)."""


class Conflict(ClientError):
    """409: a stale generation, another apply holding the router's lock, or nothing to confirm."""

    exit_code = 2


class Stale(Conflict):
    """409 for a generation not newer than the router's: possibly a retried push that the first
    attempt applied (compare with status()["generation"])."""

    exit_code = 3


class Busy(Conflict):
    """409 because another apply holds the router's lock (a local `vr apply`, a patch)."""

    exit_code = 75


class DocumentUnreadable(Conflict):
    """409: the router's stored document does not load; only a whole document replaces it."""

    exit_code = 4


class TooLarge(ClientError):
    """413: the body is over the router's limit."""

    exit_code = 2


class Invalid(ClientError):
    """422: the document does not validate (or a daemon's own checker refused it); nothing
    was changed."""

    exit_code = 2


class CheckRefused(ClientError):
    """422 naming a service (`service:NAME`): the daemon's own checker refused the files the
    payload would make; nothing was changed. The local command's exit code for it: 4."""

    exit_code = 4


class ApplyFailed(ClientError):
    """500: the apply failed after validation and the router rolled back to last-known-good."""

    exit_code = 4


class Unavailable(ClientError):
    """503 after every retry, or no connection at all: the router did not take the request."""


class TlsFailed(Unavailable):
    """The agent's certificate did not verify (wrong CA, wrong name), or the client's own was
    refused during the handshake. Not retried: it would fail the same way."""


BY_STATUS: dict[int, type[ClientError]] = {400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict,
                                           413: TooLarge, 422: Invalid, 500: ApplyFailed, 503: Unavailable}  # fmt: skip


def problems_of(body: object) -> list[tuple[str, str]]:
    """The server's `{"error": {...}}` or `{"error": [{...}, ...]}` as (path, reason) pairs."""
    error = body.get("error") if isinstance(body, dict) else None
    items = error if isinstance(error, list) else [error] if error is not None else []
    problems = []
    for item in items:
        if isinstance(item, dict):
            problems.append((str(item.get("path") or ""), str(item.get("reason") or "")))
        else:
            problems.append(("", str(item)))
    return problems


def error_for(status: int, body: object) -> ClientError:
    """The typed error for a non-2xx answer. A 409 is told apart by the path the router names:
    `lock` (another apply or a patch holds the router: busy), `generation` (stale), `document`
    (the stored document does not load: send a whole one), anything else a plain Conflict."""
    problems = problems_of(body)
    if not problems and isinstance(body, dict) and body.get("text"):
        problems = [("", f"HTTP {status}: {str(body['text'])[:200]}")]
    kind = BY_STATUS.get(status, ClientError)
    if status == 409:
        kind = {"lock": Busy, "generation": Stale, "document": DocumentUnreadable}.get(problems[0][0], Conflict)
    elif status == 422 and problems[0][0].startswith("service:"):
        kind = CheckRefused
    return kind(status, problems)


def _decode(data: bytes, content_type: str) -> dict:
    """A JSON answer as a dict; anything else (a proxy's HTML page, metrics text) as {"text": ...}."""
    if "json" in (content_type or ""):
        try:
            value = json.loads(data)
        except ValueError:
            return {"text": data.decode(errors="replace")}
        return value if isinstance(value, dict) else {"value": value}
    return {"text": data.decode(errors="replace")}


# ------------------------------------------------------------------ the local socket


MAX_LOCAL_ANSWER = 64 * 1024 * 1024  # bytes: the biggest answer the local socket reads (a whole document)
CUT_OFF = "the daemon closed the connection before its answer was complete"
NOT_HTTP = "the daemon's answer is not HTTP"


def _exchange(sock: socket.socket, method: str, path: str, body: bytes | None, content_type: str) -> tuple[int, dict]:
    """One HTTP/1.1 request on a connected socket to the daemon's own server, read to the end
    (Connection: close). Not http.client: it loads the email package and ssl, a third of the
    thin CLI's start-up, for a request whose server is known."""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    sock.sendall(head.encode() + b"\r\n" + (body or b""))
    received = bytearray()
    while chunk := sock.recv(262144):
        received += chunk
        if len(received) > MAX_LOCAL_ANSWER:
            raise ConnectionError("the daemon's answer is larger than a vr client reads")
    header, separator, data = bytes(received).partition(b"\r\n\r\n")
    if not separator:  # a daemon killed before or while it answered: as http.client's RemoteDisconnected
        raise ConnectionResetError(CUT_OFF)
    lines = header.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/") or not status_line[1].isdigit():
        raise ConnectionError(NOT_HTTP)
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if method == "HEAD" or status_line[1] in ("204", "304"):  # no body, whatever Content-Length says
        data = b""
    elif "chunked" in headers.get("transfer-encoding", ""):
        data = _unchunked(data)
    elif headers.get("content-length", "").isdigit():
        if len(data) < int(headers["content-length"]):
            raise ConnectionResetError(CUT_OFF)
        data = data[: int(headers["content-length"])]
    return int(status_line[1]), _decode(data, headers.get("content-type", ""))


def _unchunked(data: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:  # no last chunk: the daemon went away mid-answer
            raise ConnectionResetError(CUT_OFF)
        try:
            size = int(data[at:line_end].split(b";")[0], 16)
        except ValueError:
            raise ConnectionError(NOT_HTTP) from None
        if size == 0:
            return bytes(out)
        if len(data) < line_end + 2 + size:
            raise ConnectionResetError(CUT_OFF)
        out += data[line_end + 2 : line_end + 2 + size]
        at = line_end + 2 + size + 2


class LocalClient:
    """The daemon's routes over `<run_dir>/vr.sock` (root only, by the file's mode; no token)."""

    def __init__(self, socket_path: str | Path, timeout: float = LOCAL_TIMEOUT_S,
                 connect_timeout: float = LOCAL_CONNECT_TIMEOUT_S):  # fmt: skip
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def available(self) -> bool:
        """Whether a daemon answers: the socket exists and takes a connection (a socket file a
        dead daemon left behind refuses it)."""
        try:
            if not stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                return False
        except OSError:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.socket_path)
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, dict]:  # fmt: skip
        """One request; (status, decoded body). OSError when the daemon is not there or the
        connection broke (the caller falls back to applying in-process only when it did not
        connect at all: ConnectionRefusedError / FileNotFoundError)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)  # a daemon that does not answer at once is not there
            sock.connect(self.socket_path)
            sock.settimeout(self.timeout)  # an apply answers when the router is healthy
            return _exchange(sock, method, path, body, content_type)
        finally:
            sock.close()


# ------------------------------------------------------------------ the HTTPS client


def read_token_file(path: str | Path) -> str:
    """The bearer token from a file the manager keeps private. Refused (ValueError, saying
    why) when the file is group- or world-accessible, empty, or holds more than one word."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8", errors="strict")
    except OSError as error:
        raise ValueError(f"--token-file {path}: cannot read it: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--token-file {path}: not UTF-8 text") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"--token-file {path}: not a regular file")
    if mode & 0o077:
        raise ValueError(f"--token-file {path}: mode {stat.S_IMODE(mode):04o} lets group or others read or change "
                         "the token; chmod 600 it")  # fmt: skip
    token = text.strip()
    if not token:
        raise ValueError(f"--token-file {path}: the file is empty")
    if any(c.isspace() for c in token) or any(ord(c) < 33 or ord(c) > 126 for c in token):
        raise ValueError(f"--token-file {path}: a token is one word of printable ASCII")
    return token


class RouterClient:
    """The router's HTTPS API as a manager uses it.

    `ca`: the file that verifies the agent's certificate (the router's self-signed certificate
    is its own CA; None: the system's CAs). `cert`: (certfile, keyfile) for client-certificate
    authentication (or one file holding both). The environment is not consulted (no proxy
    variables, no .netrc that would replace the token)."""

    def __init__(self, url: str, token: str | None, ca: str | Path | None = None,
                 cert: tuple[str, str] | str | None = None, timeout: float = 30, retries: int = 5,
                 backoff_s: float = 0.25, max_backoff_s: float = 5.0, max_total_s: float = 60.0):  # fmt: skip
        import requests

        if token is not None and (not token or any(ord(c) < 33 or ord(c) > 126 for c in token)):
            raise ValueError("token: one word of printable ASCII")
        if not url.startswith("https://"):
            raise ValueError(f"url {url[:80]!r}: the agent speaks HTTPS only (a token never crosses in clear)")
        cert_files = [cert] if isinstance(cert, str) else list(cert or [])
        for name, path in [("ca", ca), *(("cert", c) for c in cert_files)]:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path}: no such file")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff_s, self.max_backoff_s, self.max_total_s = backoff_s, max_backoff_s, max_total_s
        self._requests = requests
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = str(ca) if ca is not None else True
        if cert is not None:
            self.session.cert = cert if isinstance(cert, str) else (str(cert[0]), str(cert[1]))
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["Accept"] = "application/json"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- the routes
    def push(self, payload: dict | bytes, confirm_s: float | None = None, next_generation: bool = False) -> dict:
        """PATCH /v1/config: a partial payload (sections, per-item changes) as `vr apply` takes.
        Answers {"outcome": "applied", "generation", "changed", "duration_ms", ...}."""
        params = {"confirm_s": _seconds(confirm_s)} if confirm_s is not None else {}
        if next_generation:
            params["generation"] = "next"
        body = _json_body(payload)
        safe = next_generation or _carries_generation(body)
        return self._json("PATCH", "/v1/config", params=params, body=body, resend_safe=safe)

    def put(self, document: dict | bytes, confirm_s: float | None = None) -> dict:
        """PUT /v1/config: a whole document (it carries its generation, so a retry is safe)."""
        params = {"confirm_s": _seconds(confirm_s)} if confirm_s is not None else {}
        body = _json_body(document)
        return self._json("PUT", "/v1/config", params=params, body=body, resend_safe=_carries_generation(body))

    def validate(self, payload: dict | bytes, next_generation: bool = False) -> dict:
        """POST /v1/config/validate: the dry run (valid, generation, warnings, changes with diffs)."""
        params = {"generation": "next"} if next_generation else {}
        return self._json("POST", "/v1/config/validate", params=params, body=_json_body(payload), resend_safe=True)

    def confirm(self) -> dict:
        """POST /v1/config/confirm: keep a commit-confirmed push. Not resent after the request
        may have arrived (a second confirm would answer 409 for a confirm that worked)."""
        return self._json("POST", "/v1/config/confirm", body=b"{}", resend_safe=False)

    def config(self) -> dict:
        """GET /v1/config: the current document, secrets redacted."""
        return self._json("GET", "/v1/config")

    def status(self, firewall: bool = True, lb: bool = True, vpn: bool = True, usage: bool = True) -> dict:
        """GET /v1/status: the `vr status --json` report and the daemon's, system's figures;
        with every part by default (the manager's poll), fewer as `vr status` asks."""
        params = {name: int(value) for name, value in (("firewall", firewall), ("lb", lb), ("vpn", vpn), ("usage", usage))
                  if not value}  # fmt: skip
        return self._json("GET", "/v1/status", params=params)

    def events(self, resource: str | None = None, since: float | None = None, limit: int | None = None) -> list[dict]:
        """GET /v1/events: events oldest first, filtered by KIND or KIND:ID."""
        params = {k: v for k, v in (("resource", resource), ("since", since), ("limit", limit)) if v is not None}
        return self._json("GET", "/v1/events", params=params).get("events", [])

    def upload_patch(self, bundle: str | Path | bytes, allow_downgrade: bool = False) -> dict:
        """POST /v1/patch: the bundle's bytes; the router answers 202 {"started": true, "pid"}
        at once and runs the patch (apply_patch waits for it). Not resent once it may have
        arrived (the patch may be underway)."""
        params = {"allow_downgrade": "1"} if allow_downgrade else {}
        if isinstance(bundle, bytes):
            body: bytes | Callable = bundle
        else:
            where = Path(bundle)
            if not where.is_file():
                raise ValueError(f"bundle {where}: no such file")
            body = lambda: where.open("rb")  # reopened for each attempt
        return self._json("POST", "/v1/patch", params=params, body=body, content_type="application/octet-stream",
                          resend_safe=False)  # fmt: skip

    def apply_patch(self, bundle: str | Path | bytes, allow_downgrade: bool = False,
                    wait_s: float = PATCH_WAIT_S) -> dict:  # fmt: skip
        """Upload a bundle and wait for the patch to end (the router answers 202 at once and
        replaces its own daemon meanwhile): the patch's record, as `vr patch apply --json`."""
        before = self.patch_status().get("last")
        self.upload_patch(bundle, allow_downgrade=allow_downgrade)
        return self.wait_patch(before, wait_s)

    def wait_patch(self, before: dict | None, wait_s: float = PATCH_WAIT_S) -> dict:
        """Poll GET /v1/patch until no patch is in progress; the new record. While the daemon
        is being replaced it may not answer for a moment: asked again until wait_s is up."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                report = self.patch_status()
                if not report.get("in_progress"):
                    last = report.get("last")
                    if last and last != before:
                        return last
                    said = (report.get("last_request") or {}).get("message")
                    why = f"the router refused the patch before it began: {said}" if said else \
                        "the router refused the patch before it began (its log dir's patch-api.log says why)"  # fmt: skip
                    raise ClientError(None, [("patch", why)])
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise Unavailable(None, [("patch", f"still in progress after {wait_s:.0f} s")])
            time.sleep(PATCH_POLL_S)

    def patch_status(self) -> dict:
        """GET /v1/patch: `vr patch status --json`."""
        return self._json("GET", "/v1/patch")

    def rollback_patch(self) -> dict:
        """POST /v1/patch/rollback: back to the previous release; 202 at once, as upload_patch
        (wait_patch waits for it). Not resent once it may have arrived."""
        return self._json("POST", "/v1/patch/rollback", body=b"{}", resend_safe=False)

    def metrics(self) -> str:
        """GET /metrics: Prometheus text."""
        response = self._request("GET", "/metrics", headers={"Accept": "text/plain"})
        return response.text

    def healthz(self) -> bool:
        """GET /healthz (no token needed): one attempt, True only for a 200 that says ok."""
        try:
            response = self.session.get(self.url + "/healthz", timeout=(CONNECT_TIMEOUT_S, self.timeout),
                                        allow_redirects=False)  # fmt: skip
        except self._requests.RequestException:
            return False
        try:
            return response.status_code == 200 and response.json().get("ok") is True
        except (ValueError, AttributeError):
            return False

    # -------------------------------------------------------------- the machinery
    def _json(self, method: str, path: str, **kw) -> dict:
        response = self._request(method, path, **kw)
        return _decode(response.content, response.headers.get("Content-Type", ""))

    def _request(self, method: str, path: str, params: dict | None = None, body: bytes | Callable | None = None,
                 content_type: str = "application/json", resend_safe: bool | None = None,
                 headers: dict | None = None):  # fmt: skip
        """Send with retries (see the module's docstring); the response of a 2xx, or the typed error."""
        requests = self._requests
        if resend_safe is None:
            resend_safe = method in ("GET", "HEAD")
        started = time.monotonic()
        headers = dict(headers or {})
        if body is not None:
            headers["Content-Type"] = content_type
        attempt = 0
        while True:
            data = body() if callable(body) else body
            try:
                response = self.session.request(method, self.url + path, params=params, data=data, headers=headers,
                                                timeout=(min(CONNECT_TIMEOUT_S, self.timeout), self.timeout),
                                                allow_redirects=False)  # fmt: skip
            except (requests.ConnectionError, requests.Timeout) as error:
                if isinstance(error, requests.exceptions.SSLError):
                    reason = _ssl_reason(error)
                    if not reason.startswith("TLS failed"):  # a certificate refused: the same next time
                        raise TlsFailed(None, [("tls", f"{self.url}: {reason}")]) from None
                    retry = resend_safe  # broken off (a daemon being replaced): perhaps after the request went out
                else:
                    reason = _connection_reason(error)
                    retry = _before_sending(error) or resend_safe
                wait = self._backoff(attempt)
                if not retry or not self._may_wait(attempt, started, wait):
                    raise Unavailable(None, [("", f"{self.url}: {reason}")]) from None
                time.sleep(wait)
                attempt += 1
                continue
            except (requests.RequestException, OSError) as error:  # a bad URL, an unreadable cert file
                raise ClientError(None, [("", f"{self.url}: {error}")]) from None
            finally:
                if hasattr(data, "close"):
                    data.close()
            if response.status_code < 300:
                return response
            error = error_for(response.status_code, _decode(response.content, response.headers.get("Content-Type", "")))
            if response.status_code == 503:
                wait = _retry_after(response.headers.get("Retry-After"), self._backoff(attempt), self.max_backoff_s)
                if self._may_wait(attempt, started, wait):
                    time.sleep(wait)
                    attempt += 1
                    continue
            raise error

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (half to all of it: many managers retrying do not march in step)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        import random  # here: the thin CLI never backs off, and never pays for the import

        return random.uniform(ceiling / 2, ceiling)

    def _may_wait(self, attempt: int, started: float, wait: float) -> bool:
        return attempt < self.retries and time.monotonic() - started + wait <= self.max_total_s


def _seconds(value: float) -> str:
    return f"{value:g}"


def _json_body(payload: object) -> bytes:
    """A payload as the bytes sent: bytes as they are (a file read verbatim, so the router
    judges exactly what the operator wrote), anything else as JSON."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return json.dumps(payload).encode()


def _carries_generation(body: bytes) -> bool:
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("generation"), int)


def _before_sending(error: Exception) -> bool:
    """Whether the connection failed before the request went out (refused, no route, connect
    timeout): then resending cannot apply anything twice."""
    import requests
    import urllib3.exceptions

    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    seen = set()
    cause: object = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError):
            return True
        if isinstance(cause, ConnectionRefusedError):
            return True
        nxt = getattr(cause, "reason", None)
        if nxt is None and isinstance(cause, BaseException) and cause.args:
            nxt = cause.args[0] if isinstance(cause.args[0], BaseException) else None
        cause = nxt or getattr(cause, "__cause__", None) or getattr(cause, "__context__", None)
    return False


def _connection_reason(error: Exception) -> str:
    import requests

    if isinstance(error, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(error, requests.exceptions.ReadTimeout):
        return "no answer in time (the request may have been carried out: check status)"
    text = str(error)
    if "CERTIFICATE_REQUIRED" in text or "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
        return _ssl_reason(error)
    for words, reason in (("Connection refused", "connection refused"), ("No route to host", "no route to host"),
                          ("Network is unreachable", "network unreachable"), ("Name or service not known",
                          "unknown host"), ("timed out", "connection timed out")):  # fmt: skip
        if words in text:
            return reason
    return "the connection broke (the request may have been carried out: check status)"


def _ssl_reason(error: Exception) -> str:
    text = str(error)
    for words, reason in (("CERTIFICATE_VERIFY_FAILED", "the agent's certificate does not verify against the CA"),
                          ("CERTIFICATE_REQUIRED", "the router asks for a client certificate (--cert, --key)"),
                          ("UNKNOWN_CA", "the router does not accept this client certificate"),
                          ("BAD_CERTIFICATE", "the router does not accept this client certificate"),
                          ("doesn't match", "the agent's certificate is not for this address"),
                          ("IP address mismatch", "the agent's certificate is not for this address"),
                          ("Hostname mismatch", "the agent's certificate is not for this address")):  # fmt: skip
        if words in text:
            return reason
    return f"TLS failed: {text[:200]}"


def _retry_after(header: str | None, default: float, cap: float) -> float:
    """Retry-After in seconds (a number or an HTTP date), capped; the back-off when absent."""
    if not header:
        return default
    try:
        seconds = float(header)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), cap)


# ------------------------------------------------------------------ what the CLI prints


def applied_text(answer: dict) -> str:
    """The line `vr apply` prints, for an answer of PUT/PATCH /v1/config."""
    changed = ", ".join(answer.get("changed") or []) or "nothing"
    line = f"applied generation {answer.get('generation')} in {float(answer.get('duration_ms') or 0):.0f} ms; " \
           f"changed: {changed}"  # fmt: skip
    confirm = answer.get("confirm")
    if confirm:
        when = time.strftime("%H:%M:%S", time.localtime(confirm.get("deadline", 0)))
        line += f"\nconfirm by {when} (vr remote confirm), or it rolls back to generation {confirm.get('rollback_to')}"
    return line


def plan_text(answer: dict) -> str:
    """What `vr diff` prints, for an answer of POST /v1/config/validate."""
    out = []
    for change in answer.get("changes") or []:
        service = change.get("service")
        for relpath, diff in sorted((change.get("files") or {}).items()):
            if isinstance(diff, str) and diff.startswith("<secret: "):
                what = "removed" if "removed" in diff else "changed"
                out.append(f"secret file {service}/{relpath} {what} (content not shown)\n")
            else:
                out.append(diff if diff.endswith("\n") else diff + "\n")
    return "".join(out) if out else "no change\n"


def patch_text(result: dict) -> str:
    """What `vr patch apply|rollback` prints."""
    if result.get("outcome") == "unchanged":
        return str(result.get("message", ""))
    return (f"{result.get('action')} {result.get('from')} -> {result.get('to')}: {result.get('outcome')} in "
            f"{float(result.get('duration_ms') or 0):.0f} ms; {result.get('message', '')}")  # fmt: skip


def patch_status_text(report: dict) -> str:
    """What `vr patch status` prints."""
    last = report.get("last") or {}
    lines = [f"current   {report.get('current')}", f"previous  {report.get('previous') or '-'}",
             f"last      {last.get('action', '-')} {last.get('from', '')} -> {last.get('to', '')}: "
             f"{last.get('outcome', '-')} {last.get('message', '')}".rstrip()]  # fmt: skip
    if report.get("interrupted"):
        lines.append("an interrupted patch waits to be rolled back (vr recover)")
    return "\n".join(lines)


def print_refused(problems: list[tuple[str, str]]) -> None:
    """How every vr command says a payload was refused: its problems, one a line, at most
    MAX_PROBLEMS_SHOWN of them."""
    print(f"vr: payload refused, nothing was changed ({len(problems)} problem(s)):", file=sys.stderr)
    for path, reason in problems[:MAX_PROBLEMS_SHOWN]:
        print(f"  {path}: {reason}" if path else f"  {reason}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more", file=sys.stderr)


def print_error(error: ClientError) -> None:
    """As the local commands word it: an invalid payload lists its problems, one a line."""
    if isinstance(error, Invalid):
        print_refused(error.problems)
        return
    status = f" (HTTP {error.status})" if error.status else ""
    print(f"vr: {error}{status}", file=sys.stderr)


# ------------------------------------------------------------------ `vr remote`


def add_remote_arguments(parser) -> None:
    """`vr remote --url URL --token-file F [--ca F] [--cert F --key F] ACTION ...`"""
    parser.add_argument("--url", required=True, help="the agent, e.g. https://169.254.0.10:8443")
    parser.add_argument("--token-file", help="a file (mode 0600) holding the bearer token")
    parser.add_argument("--ca", help="the CA (or the router's self-signed certificate) that verifies the agent")
    parser.add_argument("--cert", help="a client certificate (PEM), for client-certificate authentication")
    parser.add_argument("--key", help="the client certificate's key (PEM)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer (default 120)")
    parser.add_argument("--retries", type=int, default=5, help="retries when the router is away or 503 (default 5)")
    actions = parser.add_subparsers(dest="remote_action", required=True, metavar="ACTION")
    for name, text in (("apply", "PATCH a partial payload (FILE or - for stdin)"), ("put", "PUT a whole document"),
                       ("validate", "dry run: what the payload would change")):  # fmt: skip
        p = actions.add_parser(name, help=text)
        p.add_argument("file")
        if name != "validate":
            p.add_argument("--confirm", type=float, metavar="S", help="roll back unless confirmed within S seconds")
        if name != "put":
            p.add_argument("--next-generation", action="store_true", help="the router numbers the payload")
    actions.add_parser("confirm", help="keep a commit-confirmed push")
    actions.add_parser("config", help="the current document, secrets redacted")
    p = actions.add_parser("status", help="generation, last apply, each service's health")
    p.add_argument("--json", action="store_true")
    p.add_argument("--firewall", action="store_true", help="also each firewall/NAT rule's hit counters")
    p.add_argument("--lb", action="store_true", help="also each load-balancer rule's members, up or down")
    p.add_argument("--vpn", action="store_true", help="also each VPN connection: state, bytes, users connected")
    p.add_argument("--usage", action="store_true", help="also bytes and packets per public IP and tier (billing)")
    p = actions.add_parser("events", help="print events (JSON lines)")
    p.add_argument("--resource", help="KIND or KIND:ID")
    p.add_argument("--since", type=float, metavar="T", help="unix time")
    p.add_argument("--limit", type=int, metavar="N", help="the last N")
    p = actions.add_parser("patch", help="live patches: apply FILE, status, rollback")
    p.add_argument("patch_action", choices=["apply", "status", "rollback"])
    p.add_argument("target", nargs="?", help="apply: the bundle file")
    p.add_argument("--allow-downgrade", action="store_true")
    p.add_argument("--json", action="store_true")
    actions.add_parser("metrics", help="Prometheus text")
    parser.set_defaults(func=run_remote)


def _read_source(source: str) -> bytes:
    try:
        if source == "-":
            return sys.stdin.buffer.read()
        with open(source, "rb") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"cannot read {source}: {error.strerror or error}") from None


def run_remote(args) -> int:
    """One `vr remote` action; errors on stderr as `vr: path: reason`, with the CLI's exit codes."""
    try:
        if args.key and not args.cert:
            raise ValueError("--key needs --cert")
        if not args.token_file and not args.cert:
            raise ValueError("--token-file (or --cert and --key) is needed to authenticate")
        token = read_token_file(args.token_file) if args.token_file else None
        cert = (args.cert, args.key) if args.key else args.cert
        if args.remote_action == "patch" and args.patch_action == "apply" and not args.target:
            raise ValueError("patch apply needs the bundle FILE")
        with RouterClient(args.url, token, ca=args.ca, cert=cert, timeout=args.timeout, retries=args.retries) as client:
            return _remote_action(client, args)
    except ValueError as error:
        print(f"vr: {error}", file=sys.stderr)
        return 2
    except ClientError as error:
        print_error(error)
        return error.exit_code


def _remote_action(client: RouterClient, args) -> int:
    action = args.remote_action
    if action in ("apply", "put"):
        body = _read_source(args.file)
        if action == "apply":
            answer = client.push(body, confirm_s=args.confirm, next_generation=args.next_generation)
        else:
            answer = client.put(body, confirm_s=args.confirm)
        print(applied_text(answer))
        for warning in answer.get("warnings") or []:
            print(f"vr: warning: {warning}", file=sys.stderr)
    elif action == "validate":
        answer = client.validate(_read_source(args.file), next_generation=args.next_generation)
        sys.stdout.write(plan_text(answer))
        for warning in answer.get("warnings") or []:
            print(f"vr: warning: {warning}", file=sys.stderr)
    elif action == "confirm":
        print(f"confirmed generation {client.confirm().get('confirmed')}")
    elif action == "config":
        print(json.dumps(client.config(), indent=2))
    elif action == "status":
        from vr.control.status import render_text

        report = client.status(firewall=args.firewall, lb=args.lb, vpn=args.vpn, usage=args.usage)
        print(json.dumps(report, indent=2) if args.json else render_text(report))
        return 0 if report.get("healthy") else 1
    elif action == "events":
        for item in client.events(args.resource, args.since, args.limit):
            print(json.dumps(item, sort_keys=True))
    elif action == "patch":
        if args.patch_action == "apply":
            result = client.apply_patch(args.target, allow_downgrade=args.allow_downgrade)
        elif args.patch_action == "rollback":
            before = client.patch_status().get("last")
            client.rollback_patch()
            result = client.wait_patch(before)
        else:
            result = client.patch_status()
            print(json.dumps(result, indent=2) if args.json else patch_status_text(result))
            return 0
        print(json.dumps(result) if args.json else patch_text(result))
    elif action == "metrics":
        sys.stdout.write(client.metrics())
    return 0
