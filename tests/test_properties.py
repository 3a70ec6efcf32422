"""Property tests (hypothesis): payloads made from the example document and mutated in
type, size, depth, encoding and keys. Whatever arrives: never a traceback, never exit 1,
and a refused payload leaves the stored document, every rendered file and the live
nftables table byte-identical; an accepted one leaves a document the next command loads."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EXAMPLES, example_lab, live_files
from vr.foundation import document as docmod
from vr.foundation import jsontext
from vr.foundation.errors import InvalidPayload, StalePayload

EXAMPLE = json.loads((EXAMPLES / "router.json").read_text())
STORED = docmod.merge(None, docmod.parse_payload(EXAMPLE))


def _at(value: object, path: tuple) -> object:
    for part in path:
        value = value[part]
    return value


def _paths(value: object, path: tuple = ()) -> list[tuple]:
    """Every place in the example a mutation can hit: objects' keys and lists' items."""
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*path, key))
    elif isinstance(value, list):
        for n, child in enumerate(value):
            found += _paths(child, (*path, n))
    return found


PATHS = [p for p in _paths(EXAMPLE) if p]
LIST_PATHS = [p for p in PATHS if isinstance(_at(EXAMPLE, p), list) and _at(EXAMPLE, p)]

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8).map(lambda t: t * 2000),
    st.sampled_from(["0", "13", "yes", "0.0.0.0/0", "::", "10.1.1.1%eth0", "a\nb", "-----BEGIN X-----", "${x}",
                     '"; drop', "1e999", "8000-7000", "２２"]),
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=10), st.integers(), max_size=3),
)


@st.composite
def mutated(draw) -> dict:
    doc = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        grow_a_list = draw(st.integers(0, 3)) == 0
        path = draw(st.sampled_from(LIST_PATHS if grow_a_list else PATHS))
        parent = doc
        try:
            for part in path[:-1]:
                parent = parent[part]
            key = path[-1]
            parent[key]  # the path may be gone after an earlier mutation
        except (KeyError, IndexError, TypeError):
            continue
        action = "grow" if grow_a_list else draw(st.sampled_from(["replace", "delete", "unknown", "deep", "grow"]))
        if action == "replace":
            parent[key] = draw(hostile)
        elif action == "delete":
            del parent[key]
        elif action == "unknown" and isinstance(parent[key], dict):
            parent[key][draw(st.text(min_size=1, max_size=20))] = draw(hostile)
        elif action == "deep":
            nested = parent[key]
            for _ in range(draw(st.integers(min_value=1, max_value=200))):
                nested = [nested]
            parent[key] = nested
        elif action == "grow" and isinstance(parent[key], list) and parent[key]:
            # x5000 (past every bound) is test_a_list_grown_past_any_bound_is_refused_or_loads_again's
            parent[key] = parent[key] * draw(st.sampled_from([2, 10, 100]))
    return doc


def encode(doc: dict, how: str, generation: int) -> bytes:
    if isinstance(doc, dict) and "generation" in doc and isinstance(doc["generation"], int):
        doc = {**doc, "generation": generation}
    text = json.dumps(doc)
    if how == "utf-16":
        return text.encode("utf-16")
    if how == "duplicate-key":
        return (f'{{"generation": {generation}, ' + text[1:]).encode()
    if how == "bad-byte":
        data = bytearray(text.encode())
        data[len(data) // 2] = 0xFF
        return bytes(data)
    if how == "truncated":
        return text.encode()[: len(text) // 2]
    return text.encode()


ENCODINGS = st.sampled_from(["utf-8"] * 6 + ["utf-16", "duplicate-key", "bad-byte", "truncated"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=mutated(), how=ENCODINGS)
def test_parse_and_merge_refuse_cleanly_and_what_they_accept_loads_again(doc, how):
    try:
        raw = jsontext.loads(encode(doc, how, 2))
        merged = docmod.merge(STORED, docmod.parse_payload(raw))
    except (jsontext.JsonRefused, InvalidPayload, StalePayload) as error:
        assert str(error)  # a reason, and short whatever the value was
        assert len(str(error)) < 8000
        return
    assert docmod.RouterDocument.model_validate_json(merged.model_dump_json()) == merged


@pytest.mark.parametrize("path", LIST_PATHS, ids=[".".join(map(str, p)) for p in LIST_PATHS])
def test_a_list_grown_past_any_bound_is_refused_or_loads_again(path):
    """Every list of the example, 5,000 times over: past every bound but dhcp.entries'."""
    doc = copy.deepcopy(EXAMPLE)
    parent = _at(doc, path[:-1])
    parent[path[-1]] = parent[path[-1]] * 5000
    try:
        merged = docmod.merge(STORED, docmod.parse_payload({**doc, "generation": 2}))
    except InvalidPayload:
        return
    assert docmod.RouterDocument.model_validate_json(merged.model_dump_json()) == merged


def nft_table(lab) -> str:
    """The live table without counters (traffic moves those)."""
    return subprocess.run(["ip", "netns", "exec", lab.router_ns, "nft", "-s", "list", "table", "inet", "vr"],
                          capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip


def router_state(lab) -> tuple:
    return live_files(lab), nft_table(lab)


def generation(lab) -> int:
    return json.loads(lab.vr("status", "--json", check=False).stdout)["generation"]


def test_hostile_payloads_through_the_cli_change_nothing_when_refused(tmp_path_factory):
    payloads: Path = tmp_path_factory.mktemp("payloads")
    with example_lab(guests=("g1",)) as lab:
        seen = {"applied": 0, "refused": 0}

        @settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
        @given(doc=mutated(), how=ENCODINGS)
        def push(doc, how):
            current = generation(lab)
            before = router_state(lab)
            payload = payloads / "payload.json"
            payload.write_bytes(encode(doc, how, current + 1))
            result = lab.vr("apply", str(payload), check=False)
            assert "Traceback" not in result.stderr, result.stderr
            assert result.returncode in (0, 2, 3, 4), (result.returncode, result.stderr[-2000:])
            assert len(result.stderr) < 20_000
            if result.returncode == 0:
                seen["applied"] += 1
                assert generation(lab) == current + 1  # the stored document loads again
                lab.vr("apply", "-", input=json.dumps({**EXAMPLE, "generation": current + 2}))  # back to the example
            else:
                seen["refused"] += 1
                assert router_state(lab) == before, result.stderr[-2000:]
                assert generation(lab) == current

        push()
        assert seen["refused"] > 0
        assert lab.resolve(lab.ns("g1"), "db1.cloud.internal", "10.1.1.1") == ["10.1.2.10"]
