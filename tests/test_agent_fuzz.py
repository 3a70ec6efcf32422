"""Property-based fuzzing (hypothesis) of the running daemon's API: random JSON shapes, random
bytes, deep nesting, huge numbers, wrong types in real fields, mutated real payloads (from
configs/examples and configs/lab), wrong methods, paths and query strings - on the local
socket and over the HTTPS agent with its token. Whatever arrives: never a 5xx, a non-2xx
always answers JSON {"error": ...} naming a path and a reason, and a refused request leaves
the router as it was (the stored document, its log and every rendered file)."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from tests.conftest import EXAMPLES, REPO_DIR, example_lab, live_files
from vr.client import LocalClient
from vr.foundation import netns
from vr.transaction.store import DocumentStore

AGENT_URL = "https://169.254.0.10:8443"
TOKEN = (REPO_DIR / "configs" / "lab" / "agent-token").read_text().strip()
# Sections whose change would cut the test off its router (the control address, the agent's
# token) or rename it: kept out of the payloads that may apply.
PROTECTED = ("router", "interfaces", "routes", "agent")
SOURCES = [EXAMPLES / "router.json", EXAMPLES / "add-vm.json",
           *sorted((REPO_DIR / "configs" / "lab").glob("*.json"))]  # fmt: skip
ROUTES = ["/healthz", "/v1/config", "/v1/config/validate", "/v1/config/confirm", "/v1/status", "/v1/events",
          "/v1/patch", "/metrics"]  # fmt: skip
# POST /v1/patch and /v1/patch/rollback start a patch process: never fuzzed with a method that runs them.
SIDE_EFFECTS = {("POST", "/v1/patch"), ("POST", "/v1/patch/rollback")}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE"]
QUERY_KEYS = ["generation", "confirm_s", "limit", "since", "resource", "firewall", "lb", "vpn", "allow_downgrade", "x"]
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # fmt: skip


class InNamespace:
    """Calls in one thread that entered a network namespace (setns moves only that thread)."""

    def __init__(self, name: str) -> None:
        self.pool = ThreadPoolExecutor(1, initializer=netns.enter, initargs=(name,))

    def __call__(self, fn, *args, **kw):
        return self.pool.submit(fn, *args, **kw).result(timeout=120)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class Router:
    """The running router as the fuzzer sees it: the daemon's two doors and the router's state
    before each request (moved on only by a request that was answered 2xx)."""

    def __init__(self, lab, manager: InNamespace, ca: Path) -> None:
        import requests

        self.lab, self.manager = lab, manager
        self.local = LocalClient(lab.settings.daemon_socket, timeout=120)
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = str(ca)
        self.state = live_files(lab)
        self.applied = 0
        self.daemon_pid = self.via_socket("GET", "/v1/status", None)[1]["daemon"]["pid"]

    def generation(self) -> int:
        return DocumentStore(self.lab.settings).load().generation  # document.json and its log

    def via_socket(self, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
        return self.local.request(method, path, body)

    def via_agent(self, method: str, path: str, body: bytes | None, token: str | None = TOKEN) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"

        def send():
            response = self.session.request(method, AGENT_URL + path, data=body, headers=headers, timeout=60,
                                            allow_redirects=False)  # fmt: skip
            try:
                decoded = response.json() if "json" in response.headers.get("Content-Type", "") else None
            except ValueError:
                decoded = None
            return response.status_code, decoded if isinstance(decoded, dict) else {"text": response.text[:300]}

        return self.manager(send)

    def check(self, method: str, status: int, body: dict, what: object) -> None:
        """The API's promise for one answer."""
        with contextlib.suppress(InvalidArgument):  # outside a hypothesis test there are no statistics
            event(f"{method} answered {status}")  # hypothesis' statistics: what the fuzzing reached
        assert status < 500, (status, body, what)
        if status >= 300:
            if method != "HEAD":  # a HEAD answer has no body, by HTTP
                assert "error" in body, (status, body, what)
                problems = body["error"] if isinstance(body["error"], list) else [body["error"]]
                assert problems and all(isinstance(p, dict) and isinstance(p.get("path"), str)
                                        and isinstance(p.get("reason"), str) and p["reason"] for p in problems), body  # fmt: skip
                assert "Traceback" not in json.dumps(body), body
            assert live_files(self.lab) == self.state, ("a refused request changed the router", status, body, what)
        else:
            self.state = live_files(self.lab)
            self.applied += 1


@pytest.fixture(scope="module")
def router():
    """The example router, its daemon on the local socket and its agent (the example's token)
    on the control address, reached from the manager's namespace."""
    with example_lab(guests=()) as lab:
        manager = InNamespace(lab.ns("mgmt"))
        try:
            local = LocalClient(lab.settings.daemon_socket)
            ca = lab.settings.state_dir / "agent-tls" / "certificate.pem"
            deadline = time.monotonic() + 60
            while not (local.available() and ca.exists()):
                assert time.monotonic() < deadline, "the daemon or its agent never came up"
                time.sleep(0.2)
            fuzz = Router(lab, manager, ca)
            while True:
                try:
                    if fuzz.via_agent("GET", "/healthz", None)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the agent never answered on the control address"
                time.sleep(0.2)
            yield fuzz
        finally:
            manager.close()


# ------------------------------------------------------------------ what to send

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))  # fmt: skip
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                    max_size=4), max_leaves=20)  # fmt: skip
NESTING = st.integers(min_value=1, max_value=3000)
RAW = st.one_of(
    st.binary(max_size=512),
    NESTING.map(lambda n: b"[" * n + b"]" * n),
    NESTING.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    NESTING.map(lambda n: b'{"generation": 9, "dhcp": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(min_value=1, max_value=20000).map(lambda n: b'{"generation": 1' + b"9" * n + b"}"),
    st.sampled_from([b"", b" ", b"null", b"NaN", b'{"generation": NaN}', b'{"generation": Infinity}',
                     b'{"generation": 1e999}', b'{"generation": -1}', b'{"generation": 2, "generation": 3}',
                     b"\xef\xbb\xbf{}", b'{"a": "\\ud800"}', b"\xff\xfe{\x00}\x00", b'{"generation": 2}garbage']),
)  # fmt: skip
BODIES = st.one_of(JSON.map(lambda v: json.dumps(v).encode()), RAW,
                   st.dictionaries(st.sampled_from(["dhcp_entries", "ingress_rules", "port_forwarding_rules", "dns",
                                                    "nat", "firewall", "colour", "generation"]), JSON, max_size=3)
                   .map(lambda v: json.dumps(v).encode()))  # fmt: skip


def real_payloads(protected: bool) -> list[dict]:
    """The repository's payloads; protected: without the sections that would cut the test off."""
    out = []
    for path in SOURCES:
        document = json.loads(path.read_text())
        if protected:
            document = {k: v for k, v in document.items() if k not in PROTECTED}
        out.append(document)
    return out


def places(value: object, where: tuple = ()) -> list[tuple]:
    """Every place in a JSON value, as a path of keys and indexes."""
    found = [where]
    if isinstance(value, dict):
        for key, item in value.items():
            found += places(item, (*where, key))
    elif isinstance(value, list):
        for n, item in enumerate(value):
            found += places(item, (*where, n))
    return found


def wrong_types(value: object) -> st.SearchStrategy:
    """A value of another JSON type than `value` (a string where a number goes, ...)."""
    kinds = {bool: st.booleans(), int: st.integers(min_value=-(10**30), max_value=10**30), float: st.floats(),
             str: st.text(max_size=40), list: st.lists(SCALARS, max_size=3), dict: st.dictionaries(st.text(max_size=8),
             SCALARS, max_size=3), type(None): st.none()}  # fmt: skip
    return st.one_of([strategy for kind, strategy in kinds.items() if type(value) is not kind])


@st.composite
def mutated(draw, protected: bool = False) -> dict:
    """A real payload with one to three places changed: a wrong type, a random value, a huge
    number, a key removed, an item doubled, an unknown key added."""
    document = copy.deepcopy(draw(st.sampled_from(real_payloads(protected))))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.sampled_from(places(document)[1:] or [()]))
        if not where:
            break
        parent = document
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        action = draw(st.sampled_from(["type", "value", "huge", "drop", "double", "unknown"]))
        if action == "type":
            parent[last] = draw(wrong_types(parent[last]))
        elif action == "value":
            parent[last] = draw(JSON)
        elif action == "huge":
            parent[last] = draw(st.sampled_from([10**19, -(10**19), 2**64, 10**300, 1e308, -1e308, 2**63 - 1]))
        elif action == "drop":
            del parent[last]
        elif action == "double" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        elif isinstance(parent[last], dict):
            parent[last][draw(st.text(min_size=1, max_size=12))] = draw(SCALARS)
    return document


def encode(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# ------------------------------------------------------------------ the properties


@FUZZ
@given(body=BODIES, route=st.sampled_from([("PATCH", "/v1/config?generation=next"), ("PATCH", "/v1/config"),
                                           ("PUT", "/v1/config"), ("POST", "/v1/config/validate"),
                                           ("POST", "/v1/config/validate?generation=next")]))  # fmt: skip
def test_random_bodies(router, body, route):
    if route[0] in ("PATCH", "PUT") and _may_reach_protected(body):
        body = b'{"generation": 1, "interfaces": "protected"}'  # refused, never applied
    status, answer = router.via_socket(route[0], route[1], body)
    router.check(route[0], status, answer, (route, body[:200]))


def _may_reach_protected(body: bytes) -> bool:
    """A random body that might apply and change a protected section (astronomically unlikely,
    but the fuzzer must not cut itself off its router)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and any(k in value for k in PROTECTED)


@FUZZ
@given(payload=mutated(protected=True), dry_run=st.booleans())
def test_mutated_real_payloads(router, payload, dry_run):
    """Pushed with the next generation (it may apply: then the router moves on) or as a dry run."""
    payload.pop("generation", None)
    path = "/v1/config/validate?generation=next" if dry_run else "/v1/config?generation=next"
    method = "POST" if dry_run else "PATCH"
    status, answer = router.via_socket(method, path, encode(payload))
    router.check(method, status, answer, payload)
    if dry_run and status == 200:
        assert answer["valid"] is True


@FUZZ
@given(payload=mutated(protected=False))
def test_mutated_whole_documents_with_a_stale_generation(router, payload):
    """Whole documents, every section mutable: validated in full, then refused (as stale when
    valid), so the router never changes whatever the mutation touched."""
    payload["generation"] = router.generation()
    for method in ("PUT", "PATCH"):
        status, answer = router.via_socket(method, "/v1/config", encode(payload))
        assert status >= 400, (method, answer)
        router.check(method, status, answer, payload)
    dry = {k: v for k, v in payload.items() if k != "generation"}
    status, answer = router.via_socket("POST", "/v1/config/validate?generation=next", encode(dry))
    router.check("POST", status, answer, dry)


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    path=st.one_of(st.sampled_from(ROUTES), st.sampled_from(ROUTES).map(lambda r: r + "/x"),
                   st.text(max_size=30).map(lambda t: "/" + quote(t, safe="/")),
                   st.sampled_from(["/v1", "/v1/", "//v1/config", "/v1/config/", "/V1/CONFIG", "/v1/../v1/status",
                                    "/v1/events%00", "/v2/config", "/v1/config/validate/confirm"])),
    query=st.dictionaries(st.sampled_from(QUERY_KEYS), st.one_of(st.text(max_size=20), st.integers().map(str),
                          st.sampled_from(["next", "1e999", "nan", "-1", "0", "1", "true", "inf"])), max_size=4),
)  # fmt: skip
def test_methods_paths_and_queries(router, method, path, query):
    if (method, path.rstrip("/")) in SIDE_EFFECTS or (method, path) in SIDE_EFFECTS:
        method = "DELETE"
    body = None if method in ("GET", "HEAD", "DELETE", "OPTIONS") else encode({"generation": 1, "dns": {}})  # stale
    target = path + ("?" + urlencode(query) if query else "")
    status, answer = router.via_socket(method, target, body)
    router.check(method, status, answer, (method, target))


@settings(FUZZ, max_examples=60)
@given(request=st.one_of(
    st.binary(min_size=1, max_size=300),
    st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=40)).map(
        lambda m: f"{m[0]} /{m[1]} HTTP/1.1\r\nHost: vr\r\n\r\n".encode("utf-8", "replace")),
    st.sampled_from([b"GET / HTTP/9.9\r\n\r\n", b"GET /v1/status\r\n\r\n", b"\r\n\r\n",
                     b"PATCH /v1/config HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}",
                     b"PATCH /v1/config HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
                     b"PATCH /v1/config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                     b"GET /v1/status HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"]),
))  # fmt: skip
def test_requests_that_are_not_http(router, request):
    """Bytes that are not a well-formed HTTP request on the local socket: refused at the
    protocol (4xx) or the connection closed; never a 5xx, never a change."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(30)
        connection.connect(str(router.lab.settings.daemon_socket))
        try:
            connection.sendall(request + b"\r\n\r\n")
            connection.shutdown(socket.SHUT_WR)
            answer = connection.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 200 <= status < 500, answer[:300]
    assert live_files(router.lab) == router.state, ("a request that is not HTTP changed the router", request)


@settings(FUZZ, max_examples=60)
@given(request=st.one_of(
    st.tuples(st.just("PATCH"), st.just("/v1/config?generation=next"), mutated(protected=True).map(encode)),
    st.tuples(st.just("POST"), st.just("/v1/config/validate?generation=next"), BODIES),
    st.tuples(st.sampled_from(["GET", "DELETE", "PUT"]), st.sampled_from(ROUTES), st.none()),
), token=st.sampled_from([TOKEN, None, "x" * 40, TOKEN + "x", "sha256:" + "0" * 64]))  # fmt: skip
def test_over_the_agent(router, request, token):
    """The same promises over HTTPS from the manager's namespace; without the right token,
    401 whatever the request."""
    method, path, body = request
    if method == "PATCH" and body is not None and _may_reach_protected(body):
        body = b'{"generation": 1}'
    status, answer = router.via_agent(method, path, body, token=token)
    router.check(method, status, answer, (method, path, token, (body or b"")[:200]))
    if token != TOKEN and path != "/healthz":
        assert status == 401 and answer["error"]["path"] == "Authorization", answer


@pytest.mark.parametrize("method, path", [("POST", "/v1/config/validate?generation=next"),
                                          ("PATCH", "/v1/config?generation=next"), ("PUT", "/v1/config")])  # fmt: skip
def test_a_guest_tier_without_an_address_is_refused_not_crashed(router, method, path):
    """Found by the fuzzer: a guest interface with no IPv4 address is a problem the network
    service reports (interfaces[2].addresses), but the services verified after it assumed the
    address was there (AttributeError in nftables, dnsmasq, haproxy: a 500 here, a traceback
    from `vr apply`)."""
    document = json.loads((EXAMPLES / "router.json").read_text())
    del document["interfaces"][2]["addresses"]
    if method == "PUT":
        document["generation"] = router.generation() + 1
    else:
        document.pop("generation")
    status, answer = router.via_socket(method, path, encode(document))
    router.check(method, status, answer, document)
    assert status == 422, answer
    problems = answer["error"] if isinstance(answer["error"], list) else [answer["error"]]
    assert "interfaces[2].addresses" in [p["path"] for p in problems], problems


def test_the_router_still_works_after_the_fuzzing(router):
    """The fuzzed daemon still applies a plain push and answers its status; it is the same
    process as before (none of the requests killed it, to be restarted unseen)."""
    g = router.generation()
    vm = {"tier": "tier1", "mac": "02:00:00:0f:00:01", "ip": "10.1.1.77", "hostname": "after-fuzz"}
    status, answer = router.via_socket("PATCH", "/v1/config", encode({"generation": g + 1,
                                       "dhcp_entries": {"upsert": [vm]}}))  # fmt: skip
    assert status == 200 and answer["generation"] == g + 1, answer
    status, report = router.via_socket("GET", "/v1/status", None)
    assert status == 200 and report["generation"] == g + 1 and report["healthy"] is True, report
    assert report["daemon"]["pid"] == router.daemon_pid
