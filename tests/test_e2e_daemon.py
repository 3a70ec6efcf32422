"""The resident daemon end to end, as its clients see it: 20 pushers coalesced into fewer
transactions with every answer truthful, refusals answered one by one inside a burst, and
the CLI as a thin client of the daemon's local socket - with the same output, the same
refusals and the same exit codes as the in-process fallback it takes when no daemon answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO_DIR, example_lab, live_files, write_payload
from vr.client import ClientError, LocalClient, RouterClient
from vr.control.agent import redact
from vr.foundation import document as docmod
from vr.foundation import netns
from vr.services.runtime import Runtime
from vr.transaction.store import DocumentStore

ROUTER = "router:r-101-vm"
AGENT_URL = "https://169.254.0.10:8443"  # the example's control address and agent port
AGENT_TOKEN = (REPO_DIR / "configs" / "lab" / "agent-token").read_text().strip()  # the example's token, in clear
CLIENTS = 20
PUSHES = 60  # in all, CLIENTS x 3
APPLIED_LINE = re.compile(r"applied generation (\d+) in \d+ ms; changed: ([a-z, ]+)\n")
VM_CHANGED = "nftables, dnsmasq, guestdata"  # a VM: its anti-spoofing elements, its DHCP and name, its guest data


@pytest.fixture(scope="module")
def router():
    """The example router, its daemon serving the local socket and the agent (the example's
    token) on the control address; no guests: nothing here needs a lease."""
    with example_lab(guests=()) as lab:
        wait_for_daemon(lab)
        manager = RouterClient(AGENT_URL, AGENT_TOKEN, ca=lab.settings.agent_tls_dir / "certificate.pem")
        with ThreadPoolExecutor(1, initializer=netns.enter, initargs=(lab.ns("mgmt"),)) as there:
            deadline = time.monotonic() + 60
            while not there.submit(manager.healthz).result(timeout=60):
                assert time.monotonic() < deadline, "the agent never answered on the control address"
                time.sleep(0.2)
        yield lab


def wait_for_daemon(lab, timeout: float = 30.0) -> None:
    client = LocalClient(lab.settings.daemon_socket)
    deadline = time.monotonic() + timeout
    while not client.available():
        assert time.monotonic() < deadline, "the daemon never answered on its local socket"
        time.sleep(0.1)


def api(lab, method: str, path: str, payload: object = None) -> tuple[int, dict]:
    """One request to the daemon's local socket, as the CLI makes it."""
    body = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
    return LocalClient(lab.settings.daemon_socket).request(method, path, body)


def get(lab, path: str) -> dict:
    status, body = api(lab, "GET", path)
    assert status == 200, body
    return body


def daemon_counts(lab) -> tuple[int, int]:
    daemon = get(lab, "/v1/status")["daemon"]
    return daemon["pushes"], daemon["transactions"]


def stored(lab) -> docmod.RouterDocument:
    return DocumentStore(lab.settings).load()


def vm(n: int) -> dict:
    """VM n (below 295): its own MAC and address, clear of tier1's dynamic range (.100-.150)."""
    tier, host = (1 + n % 2, 20 + n // 2) if n < 120 else (2, n - 40)
    return {"tier": f"tier{tier}", "mac": f"02:00:00:0a:{n >> 8:02x}:{n & 255:02x}", "ip": f"10.1.{tier}.{host}",
            "hostname": f"vm{n}"}  # fmt: skip


def ingress(n: int) -> dict:
    return {"id": f"in{n}", "public_ip": "192.0.2.10", "protocol": "tcp", "ports": 10000 + n}


def forward(n: int) -> dict:
    return {"id": f"pf{n}", "public_ip": "192.0.2.10", "protocol": "tcp", "public_ports": 20000 + n,
            "private_ip": "10.1.1.10", "private_ports": 80}  # fmt: skip


def one_item(n: int) -> dict:
    """Push n of the burst: a VM, an ingress rule or a port-forwarding rule, interleaved."""
    kind = ("dhcp_entries", "ingress_rules", "port_forwarding_rules")[n % 3]
    item = {"dhcp_entries": vm, "ingress_rules": ingress, "port_forwarding_rules": forward}[kind](n)
    return {kind: {"upsert": [item]}}


def normalized(document: dict) -> dict:
    """A document with its item lists in key order and no generation: the order in which
    concurrent pushes were taken is the daemon's, not the test's."""
    document = json.loads(json.dumps(document))
    document.pop("generation", None)
    document["dhcp"]["entries"].sort(key=lambda e: e["mac"])
    document["nat"]["port_forwarding"].sort(key=lambda r: r["id"])
    document["firewall"]["ingress"].sort(key=lambda r: r["id"])
    return document


def sequential(start: docmod.RouterDocument, payloads: list[dict]) -> docmod.RouterDocument:
    """What the payloads make of the document applied one after the other."""
    doc = start
    for payload in payloads:
        doc = docmod.merge(doc, docmod.parse_payload({**payload, "generation": doc.generation + 1}))
    return doc


def applied_generations(lab) -> set[int]:
    """Every generation the router reached: its apply events that say ok."""
    found = get(lab, f"/v1/events?resource={ROUTER}&limit=100000")["events"]
    return {e["generation"] for e in found if e["type"] == "apply" and e["outcome"] == "ok"}


def items_of(doc: dict) -> dict[str, dict]:
    """Every VM (by MAC) and rule (by id) of a document, with its values."""
    out = {f"vm:{e['mac']}": e for e in doc["dhcp"]["entries"]}
    out.update({f"pf:{r['id']}": r for r in doc["nat"]["port_forwarding"]})
    out.update({f"in:{r['id']}": r for r in doc["firewall"]["ingress"]})
    return out


def key_of(payload: dict) -> str:
    kind, changes = next((k, v) for k, v in payload.items() if k != "generation")
    item = changes["upsert"][0]
    return {"dhcp_entries": f"vm:{item.get('mac')}", "port_forwarding_rules": f"pf:{item.get('id')}",
            "ingress_rules": f"in:{item.get('id')}"}[kind]  # fmt: skip


def burst(lab, pushes: list[tuple[str, object]], clients: int, door: str = "socket") -> list[tuple[int, dict]]:
    """Each (query, payload) PATCHed by one of `clients` threads, all started together, through
    the daemon's local socket or (door "agent") as the manager does: RouterClient over HTTPS
    with the token, from the manager's namespace. The answers in the pushes' order; a client
    sends its next push when its last one answered."""
    answers: list[tuple[int, dict] | None] = [None] * len(pushes)
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        manager = RouterClient(AGENT_URL, AGENT_TOKEN, ca=lab.settings.agent_tls_dir / "certificate.pem", retries=0)
        start.wait(timeout=60)
        for n in range(k, len(pushes), clients):
            query, payload = pushes[n]
            if door == "socket":
                answers[n] = api(lab, "PATCH", f"/v1/config{query}", payload)
                continue
            try:
                answers[n] = (200, manager.push(payload, next_generation=query == "?generation=next"))
            except ClientError as error:
                answers[n] = (error.status, {"error": [{"path": p, "reason": r} for p, r in error.problems]})

    initializer = (netns.enter, (lab.ns("mgmt"),)) if door == "agent" else (None, ())
    with ThreadPoolExecutor(clients, initializer=initializer[0], initargs=initializer[1]) as pool:
        for done in [pool.submit(client, k) for k in range(clients)]:
            done.result(timeout=300)
    return answers  # type: ignore[return-value]


# ------------------------------------------------------------------ coalescing


@pytest.mark.parametrize("door, first", [("socket", 0), ("agent", 200)])
def test_twenty_clients_are_coalesced_and_every_answer_is_true(router, door, first):
    lab = router
    start = stored(lab)
    pushes_before, transactions_before = daemon_counts(lab)
    payloads = [one_item(first + n) for n in range(PUSHES)]

    answers = burst(lab, [("?generation=next", p) for p in payloads], CLIENTS, door)

    assert [status for status, _ in answers] == [200] * PUSHES, [b for s, b in answers if s != 200][:3]
    assert {body["outcome"] for _, body in answers} == {"applied"}
    # The final document is the sequential result: every VM and rule there, with its values.
    final = get(lab, "/v1/config")
    expected = normalized(redact(sequential(start, payloads).model_dump(mode="json")))
    assert normalized(final) == expected
    assert stored(lab).generation == final["generation"]
    # Every answer is true: its generation is one the router reached, carrying its item.
    reached = applied_generations(lab)
    generations = [body["generation"] for _, body in answers]
    assert set(generations) <= reached
    assert min(generations) > start.generation and max(generations) == final["generation"]
    final_items, expected_items = items_of(final), items_of(expected)
    for payload in payloads:
        assert final_items[key_of(payload)] == expected_items[key_of(payload)]
    for n, (payload, (_, body)) in enumerate(zip(payloads, answers, strict=True)):
        if "dhcp_entries" in payload:  # the VM's own event names the generation its answer gave
            mac = payload["dhcp_entries"]["upsert"][0]["mac"]
            events = get(lab, f"/v1/events?resource=vm:{mac}")["events"]
            assert [(e["outcome"], e["generation"]) for e in events] == [("added", body["generation"])], n
    # Coalesced: fewer transactions than pushes, and "batched" says how many each carried.
    pushes_after, transactions_after = daemon_counts(lab)
    assert pushes_after - pushes_before == PUSHES
    transactions = transactions_after - transactions_before
    assert transactions < PUSHES
    by_generation: dict[int, list[int]] = {}
    for _, body in answers:
        by_generation.setdefault(body["generation"], []).append(body["batched"])
    assert len(by_generation) == transactions
    for generation, batched in by_generation.items():
        assert batched == [len(batched)] * len(batched), (generation, batched)
    assert max(len(b) for b in by_generation.values()) > 1


def test_a_burst_answers_each_refusal_on_its_own_and_applies_the_rest(router):
    lab = router
    start = stored(lab)
    g = start.generation
    valid = [one_item(60 + n) for n in range(12)]
    invalid = {  # each payload's own bad place
        "dhcp_entries.upsert[1].mac": {"dhcp_entries": {"upsert": [vm(72), {**vm(73), "mac": "02:00:00:0a"}]}},
        "dhcp_entries.upsert[0].ip": {"dhcp_entries": {"upsert": [{**vm(74), "ip": "10.9.9.9"}]}},
        "ingress_rules.upsert[0].ports": {"ingress_rules": {"upsert": [{**ingress(75), "ports": 70000}]}},
        "port_forwarding_rules.upsert[0].protocol": {
            "port_forwarding_rules": {"upsert": [{**forward(76), "protocol": "sctp-ish"}]}},
        "colour": {"colour": "blue", "dhcp_entries": {"upsert": [vm(77)]}},
    }  # fmt: skip
    stale = {"generation": g, "dhcp_entries": {"upsert": [vm(79)]}}
    # Two VMs with one address: validated in order against the running result, one is refused.
    rivals = [{"dhcp_entries": {"upsert": [{**vm(78), "ip": "10.1.1.99"}]}},
              {"dhcp_entries": {"upsert": [{**vm(80), "ip": "10.1.1.99"}]}}]  # fmt: skip
    pushes = [("?generation=next", p) for p in valid]
    for n, payload in enumerate([*invalid.values(), *rivals]):
        pushes.insert(2 * n + 1, ("?generation=next", payload))
    pushes.insert(6, ("", stale))

    answers = burst(lab, pushes, len(pushes))

    outcome = {json.dumps(p, sort_keys=True): answer for (_, p), answer in zip(pushes, answers, strict=True)}
    final = get(lab, "/v1/config")
    present = items_of(final)
    for payload in valid:
        status, body = outcome[json.dumps(payload, sort_keys=True)]
        assert status == 200 and body["outcome"] == "applied", body
        assert key_of(payload) in present
    for path, payload in invalid.items():
        status, body = outcome[json.dumps(payload, sort_keys=True)]
        assert status == 422, body
        problems = body["error"] if isinstance(body["error"], list) else [body["error"]]
        paths = [p["path"] for p in problems]
        assert any(p == path or p.startswith(path + ".") for p in paths), (path, problems)
        others = set(invalid) - {path}  # its own place, no neighbour's
        assert not [p for p in paths for other in others if p == other or p.startswith(other + ".")], problems
        for kind in (k for k in payload if k.endswith(("entries", "rules"))):
            for item in payload[kind]["upsert"]:  # nothing of a refused payload is applied
                assert key_of({kind: {"upsert": [item]}}) not in present, item
    status, body = outcome[json.dumps(stale, sort_keys=True)]
    assert status == 409 and body["error"]["path"] == "generation" and "not newer" in body["error"]["reason"]
    assert f"vm:{vm(79)['mac']}" not in present
    rival_answers = [outcome[json.dumps(p, sort_keys=True)] for p in rivals]
    assert sorted(status for status, _ in rival_answers) == [200, 422], rival_answers
    winner = rivals[[s for s, _ in rival_answers].index(200)]
    assert [e["mac"] for e in final["dhcp"]["entries"] if e["ip"] == "10.1.1.99"] == [
        winner["dhcp_entries"]["upsert"][0]["mac"]]  # fmt: skip
    refused = next(body for status, body in rival_answers if status == 422)
    assert "dhcp_entries.upsert[0]" in json.dumps(refused["error"]), refused
    # The refusals did not stop the valid pushes going through together.
    assert max(body["batched"] for status, body in answers if status == 200) > 1
    assert final["generation"] > g


def test_a_push_the_checker_refuses_is_taken_out_of_its_burst(router):
    """A payload vr's validation accepts but dnsmasq's own checker refuses (an option dnsmasq
    does not know): the joint transaction fails, the pushes are applied one by one, and only
    that one is refused - the others are all applied."""
    lab = router
    valid = [one_item(84 + n) for n in range(10)]
    odd = [{"dhcp_entries": {"upsert": [{**vm(n), "options": [{"name": "zzz-no-such-option", "values": ["1"]}]}]}}
           for n in (100, 101)]  # fmt: skip
    payloads = [*valid[:4], odd[0], *valid[4:7], odd[1], *valid[7:]]

    answers = burst(lab, [("?generation=next", p) for p in payloads], len(payloads))

    present = items_of(get(lab, "/v1/config"))
    for payload, (status, body) in zip(payloads, answers, strict=True):
        if payload in odd:
            assert status == 422, body
            assert body["error"]["path"] == "service:dnsmasq" and "nothing was changed" in body["error"]["reason"]
            assert key_of(payload) not in present
        else:
            assert status == 200 and body["outcome"] == "applied", body
            assert key_of(payload) in present
    assert get(lab, "/v1/status")["healthy"] is True


# ------------------------------------------------------------------ the CLI, thin and fallback


def generation_of(lab) -> int:
    return stored(lab).generation


def test_vr_apply_goes_through_the_daemon_and_prints_what_it_printed_in_process(router, tmp_path):
    lab = router
    g = generation_of(lab)
    pushes_before, _ = daemon_counts(lab)
    printed = lab.vr("apply", write_payload(tmp_path, {"generation": g + 1, "dhcp_entries": {"upsert": [vm(102)]}}))
    thin = APPLIED_LINE.fullmatch(printed.stdout)
    assert thin and int(thin[1]) == g + 1 and thin[2] == VM_CHANGED, printed.stdout
    assert printed.stderr == ""
    status = get(lab, "/v1/status")
    assert status["daemon"]["pushes"] == pushes_before + 1  # the daemon carried it
    assert status["last_apply"]["generation"] == g + 1 and status["last_apply"]["outcome"] == "ok"
    assert status["generation"] == g + 1

    # The same kind of change in-process (no daemon asked): the same line.
    in_process = lab.vr("apply", write_payload(tmp_path, {"generation": g + 2, "dhcp_entries": {"upsert": [vm(103)]}}),
                        env={"VR_NO_DAEMON": "1"})  # fmt: skip
    fallback = APPLIED_LINE.fullmatch(in_process.stdout)
    assert fallback and int(fallback[1]) == g + 2 and fallback[2] == thin[2], in_process.stdout
    assert in_process.stderr == ""
    assert get(lab, "/v1/config")["generation"] == g + 2  # the warm daemon sees what the other process applied
    deadline = time.monotonic() + 10
    while (status := get(lab, "/v1/status"))["generation"] != g + 2:  # the report is cached for up to a second
        assert time.monotonic() < deadline, status["generation"]
        time.sleep(0.2)
    assert status["daemon"]["pushes"] == pushes_before + 1  # not through the daemon
    assert f"vm:{vm(103)['mac']}" in items_of(get(lab, "/v1/config"))

    # From stdin, as a script pipes it: through the daemon too.
    piped = lab.vr("apply", "-", input=json.dumps({"generation": g + 3, "dhcp_entries": {"upsert": [vm(112)]}}))
    line = APPLIED_LINE.fullmatch(piped.stdout)
    assert line and int(line[1]) == g + 3 and line[2] == VM_CHANGED, piped.stdout
    assert get(lab, "/v1/config")["generation"] == g + 3
    assert daemon_counts(lab)[0] == pushes_before + 2


REFUSALS = {  # what an operator may get wrong, with the exit code vr gives it
    "schema": 2, "semantic": 2, "unknown section": 2, "not an object": 2, "unreadable": 2, "missing file": 2,
    "too large": 2, "stale": 3,
}  # fmt: skip


def refused_payload(name: str, g: int, tmp_path: Path) -> str:
    """The file of one refusal in REFUSALS, the router being at generation g."""
    path = tmp_path / "payload.json"
    if name == "schema":
        path.write_text(
            json.dumps({"generation": g + 1, "dhcp_entries": {"upsert": [{**vm(104), "mac": "02:00:00:0a"}]}})
        )
    elif name == "semantic":  # two problems the document check finds, named as the payload sent them
        path.write_text(json.dumps({"generation": g + 1, "dhcp_entries": {"upsert": [{**vm(105), "ip": "10.9.9.9"}]},
                                    "ingress_rules": {"upsert": [{**ingress(105), "ports": 0}]}}))  # fmt: skip
    elif name == "unknown section":
        path.write_text(json.dumps({"generation": g + 1, "colour": "blue"}))
    elif name == "not an object":
        path.write_text("[1, 2]")
    elif name == "unreadable":
        path.write_text('{"generation": ')
    elif name == "missing file":
        path = tmp_path / "no-such.json"
    elif name == "too large":  # over the 64 MiB a payload may be
        with open(path, "wb") as huge:
            huge.write(b'{"generation": %d, "dns": {"padding": "' % (g + 1) + b"a" * (64 * 1024 * 1024) + b'"}}')
    elif name == "stale":
        path.write_text(json.dumps({"generation": g, "dhcp_entries": {"upsert": [vm(106)]}}))
    return str(path)


@pytest.mark.parametrize("name", REFUSALS)
def test_vr_apply_refuses_as_it_did_in_process(router, tmp_path, name):
    lab = router
    g = generation_of(lab)
    before = live_files(lab)
    pushes_before, _ = daemon_counts(lab)
    source = refused_payload(name, g, tmp_path)
    thin = lab.vr("apply", source, check=False)
    in_process = lab.vr("apply", source, check=False, env={"VR_NO_DAEMON": "1"})
    assert (thin.returncode, thin.stdout, thin.stderr) == (in_process.returncode, in_process.stdout, in_process.stderr)
    assert thin.returncode == REFUSALS[name], thin.stderr
    assert thin.stdout == "" and thin.stderr.startswith("vr: ") and "Traceback" not in thin.stderr
    assert live_files(lab) == before
    assert generation_of(lab) == g
    if name not in ("missing file", "unreadable", "too large"):  # refused before the daemon's queue
        assert daemon_counts(lab)[0] == pushes_before + 1  # the thin client did ask the daemon
    thin, in_process = (
        lab.vr("diff", source, check=False),
        lab.vr("diff", source, check=False, env={"VR_NO_DAEMON": "1"}),
    )
    assert (thin.returncode, thin.stdout, thin.stderr) == (in_process.returncode, in_process.stdout, in_process.stderr)
    assert thin.returncode == REFUSALS[name]


def keeper_holds_the_socket(lab) -> bool:
    """Whether the keeper (vr/control/keeper.py) holds a copy of the daemon's listening local
    socket, as it does once the daemon has settled (to bridge a restart)."""
    keeper = lab.settings.keeper_pid_path.read_text().strip()
    listening = subprocess.run(["ip", "netns", "exec", lab.settings.netns, "ss", "-xlp"], capture_output=True,
                               text=True, timeout=30, check=True).stdout  # fmt: skip
    return any(str(lab.settings.daemon_socket) in line and f"pid={keeper}," in line for line in listening.splitlines())


def test_vr_apply_falls_back_to_in_process_when_the_daemon_is_stopped(router, tmp_path):
    lab = router
    supervisor = Runtime(lab.settings).supervisor
    g = generation_of(lab)
    deadline = time.monotonic() + 30
    while not keeper_holds_the_socket(lab):  # the daemon as it runs for days, not one just started
        assert time.monotonic() < deadline, "the keeper never took the daemon's listening socket"
        time.sleep(0.2)
    supervisor.stop("monitor")  # the daemon is supervisord's program `monitor`
    try:
        # The keeper may still hold the daemon's listening socket (for a daemon about to come
        # back); a daemon stopped for good must not make `vr apply` fail: it applies in-process.
        printed = lab.vr("apply", write_payload(tmp_path, {"generation": g + 1, "dhcp_entries": {"upsert": [vm(107)]}}))
        line = APPLIED_LINE.fullmatch(printed.stdout)
        assert line and int(line[1]) == g + 1 and line[2] == VM_CHANGED, printed.stdout
        assert printed.stderr == ""
        assert generation_of(lab) == g + 1
        assert f"vm:{vm(107)['mac']}" in items_of(stored(lab).model_dump(mode="json"))
    finally:
        if supervisor.state("monitor") != "RUNNING":
            supervisor.start("monitor")
        wait_for_daemon(lab)
    assert get(lab, "/v1/status")["generation"] == g + 1


def status_rows(text: str) -> tuple[list[str], list[tuple]]:
    """`vr status` text: the header lines as they are; each service row without its uptime
    and probe latency, which move on between two calls."""
    head, _, table = text.partition("\n\n")
    rows = []
    for line in table.splitlines()[1:]:
        rows.append((*line.split()[:3], line.split("  ")[-1]))
    return head.splitlines(), rows


def test_status_events_and_diff_say_the_same_both_ways(router, tmp_path):
    lab = router
    assert api(lab, "PATCH", "/v1/config?generation=next", {"dhcp_entries": {"upsert": [vm(108)]}})[0] == 200
    g = generation_of(lab)
    thin, in_process = lab.vr("status", check=False), lab.vr("status", check=False, env={"VR_NO_DAEMON": "1"})
    assert thin.returncode == in_process.returncode == 0, (thin.stderr, in_process.stderr)
    assert status_rows(thin.stdout) == status_rows(in_process.stdout)
    thin_json = json.loads(lab.vr("status", "--json").stdout)
    own_json = json.loads(lab.vr("status", "--json", env={"VR_NO_DAEMON": "1"}).stdout)
    assert set(own_json) <= set(thin_json)
    for key in ("router", "release", "generation", "healthy", "last_apply"):
        assert thin_json[key] == own_json[key], key
    assert [(s["name"], s.get("state"), s.get("pid"), s["healthy"]) for s in thin_json["services"]] == [
        (s["name"], s.get("state"), s.get("pid"), s["healthy"]) for s in own_json["services"]]  # fmt: skip

    for resource in (ROUTER, f"vm:{vm(108)['mac']}", "service:dnsmasq"):
        thin = lab.vr("events", "--resource", resource)
        in_process = lab.vr("events", "--resource", resource, env={"VR_NO_DAEMON": "1"})
        assert thin.stdout == in_process.stdout and thin.stdout, resource
    everything = lab.vr("events").stdout
    assert lab.vr("events", env={"VR_NO_DAEMON": "1"}).stdout.startswith(everything)  # the monitor may add one

    change = write_payload(tmp_path, {"generation": g + 1, "dhcp_entries": {"upsert": [vm(109)], "delete": [vm(108)["mac"]]},
                                      "ingress_rules": {"upsert": [ingress(109)]}})  # fmt: skip
    thin, in_process = (
        lab.vr("diff", change, check=False),
        lab.vr("diff", change, check=False, env={"VR_NO_DAEMON": "1"}),
    )
    assert (thin.returncode, thin.stdout, thin.stderr) == (in_process.returncode, in_process.stdout, in_process.stderr)
    assert thin.returncode == 0 and "vm109" in thin.stdout and "+" in thin.stdout
    bad = write_payload(tmp_path, {"generation": g + 1, "dhcp_entries": {"upsert": [{**vm(110), "ip": "10.9.9.9"}]}})
    thin, in_process = lab.vr("diff", bad, check=False), lab.vr("diff", bad, check=False, env={"VR_NO_DAEMON": "1"})
    assert (thin.returncode, thin.stdout, thin.stderr) == (in_process.returncode, in_process.stdout, in_process.stderr)
    assert thin.returncode == 2
    assert generation_of(lab) == g  # a diff changes nothing


THIN_PROBE = """
import sys
from vr import cli
code = cli.main(sys.argv[1:])
heavy = sorted(m for m in ("pydantic", "pyroute2", "vr.transaction.pipeline", "jinja2") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


@pytest.mark.parametrize("command", [["status"], ["events", "--resource", ROUTER], ["apply", "PAYLOAD"]])
def test_the_thin_path_does_not_load_the_pipeline(router, tmp_path, command):
    lab = router
    payload = write_payload(tmp_path, {"generation": generation_of(lab) + 1, "dhcp_entries": {"upsert": [vm(111)]}})
    args = [payload if a == "PAYLOAD" else a for a in command]
    probe = subprocess.run([sys.executable, "-c", THIN_PROBE, "--root", str(lab.settings.state_dir.parent),
                            "--netns", lab.settings.netns, *args], capture_output=True, text=True, timeout=120,
                           check=False)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[-1] == "HEAVY ", probe.stdout
