"""What the warm daemon keeps between applies, so that a one-VM change does not redo the
whole router: each kept result must equal what a fresh process computes, whatever changed."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from vr.foundation.files import LiveContent
from vr.foundation.memo import Memo
from vr.services.supervisor_rpc import ObservedStates, SupervisorClient


class Item:
    """A document model stand-in: compared by identity, as merge's reused models are."""

    def __init__(self, group: int, text: str) -> None:
        self.group, self.text = group, text


def pairs(item: Item, setting: str) -> list[tuple[int, str]]:
    return [(item.group, f"{setting}{item.text}"), (item.group + 100, item.text)]


def fresh(items: list[Item], setting: str) -> dict:
    groups: dict[int, list[str]] = {}
    for item in items:
        for group, text in pairs(item, setting):
            groups.setdefault(group, []).append(text)
    return {group: ",".join(sorted(texts)) for group, texts in groups.items()}


edits = st.lists(st.tuples(st.sampled_from(["add", "remove", "replace", "reverse", "setting"]),
                           st.integers(0, 5), st.text("abc", max_size=3)), max_size=30)  # fmt: skip


def edited(items: list[Item], setting: str, action: str, number: int, text: str) -> tuple[list[Item], str]:
    """The items (a new list, as merge makes) and the setting after one edit."""
    items = list(items)
    if action == "add":
        items.insert(number % (len(items) + 1), Item(number, text))
    elif action == "remove" and items:
        del items[number % len(items)]
    elif action == "replace" and items:
        items[number % len(items)] = Item(number, text)
    elif action == "reverse":
        items.reverse()
    elif action == "setting":
        setting = text
    return items, setting


@settings(max_examples=200, deadline=None)
@given(edits)
def test_grouped_equals_a_fresh_pass_after_any_changes(changes):
    memo, items, setting = Memo(), [Item(n % 3, str(n)) for n in range(6)], "s"
    assert memo.grouped("slot", items, pairs, setting, ",") == fresh(items, setting)
    for action, number, text in changes:
        items, setting = edited(items, setting, action, number, text)
        assert memo.grouped("slot", items, pairs, setting, ",") == fresh(items, setting)


@settings(max_examples=200, deadline=None)
@given(edits)
def test_map_equals_a_fresh_pass_and_computes_only_new_objects(changes):
    memo, items, setting = Memo(), [Item(n % 3, str(n)) for n in range(6)], "s"
    computed: list[Item] = []

    def text(item: Item, setting: str) -> str:
        computed.append(item)
        return f"{setting}{item.text}"

    assert memo.map("slot", items, text, setting) == [f"s{i.text}" for i in items]
    for action, number, value in changes:
        known, computed[:] = set(map(id, items)) if value == setting or action != "setting" else set(), []
        items, setting = edited(items, setting, action, number, value)  # a new setting: all computed again
        assert memo.map("slot", items, text, setting) == [f"{setting}{i.text}" for i in items]
        assert {id(i) for i in computed} == {id(i) for i in items} - known  # the kept ones were not computed


def keys_of(item: Item, setting: str) -> tuple[bool, list]:
    return "c" not in item.text, [("group", item.group), ("text", setting + item.text)]


def fresh_tally(items: list[Item], setting: str) -> tuple[int, int]:
    """(items that do not pass, keys held by more than one listed item), counted from scratch."""
    holders: dict = {}
    for item in items:
        for key in dict.fromkeys(keys_of(item, setting)[1]):
            holders[key] = holders.get(key, 0) + 1
    return sum(not keys_of(i, setting)[0] for i in items), sum(n > 1 for n in holders.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "replace", "reverse", "setting", "twice"]),
                          st.integers(0, 5), st.text("abc", max_size=2)), max_size=30))  # fmt: skip
def test_tally_finds_what_a_fresh_count_finds_after_any_changes(changes):
    """Memo.tally (dnsmasq's uniqueness of MACs, addresses and names): a problem exactly when a
    fresh count finds one, and the same counts while no object is listed twice."""
    memo, items, setting = Memo(), [Item(n, str(n)) for n in range(6)], "s"
    for action, number, text in [("setting", 0, "s"), *changes]:
        if action == "twice" and items:
            items = [*items, items[number % len(items)]]  # merge may reuse one equal model for two items
        else:
            items, setting = edited(items, setting, action, number, text)
        counted, expected = memo.tally("slot", items, keys_of, setting), fresh_tally(items, setting)
        assert (counted == (0, 0)) == (expected == (0, 0))
        if len(set(map(id, items))) == len(items):
            assert counted == expected


def test_grouped_joins_again_only_the_groups_a_change_touches():
    computed = []

    def counting(item: Item, setting: None) -> list[tuple[int, str]]:
        computed.append(item)
        return [(item.group, item.text)]

    memo, items = Memo(), [Item(n % 4, f"{n}\n") for n in range(400)]
    first = memo.grouped("names", items, counting)
    added = Item(2, "new\n")
    second = memo.grouped("names", [*items[1:], added], counting)
    assert computed[400:] == [added]  # one new item computed, none of the 399 kept ones
    assert {g for g in first if first[g] != second[g]} == {0, 2}  # the removed item's group and the added one's


def test_live_content_reads_again_a_file_changed_behind_its_back(tmp_path):
    path = tmp_path / "dhcp-hosts"
    path.write_bytes(b"one\n")
    live = LiveContent()
    assert live.read(str(path)) == b"one\n"
    path.write_bytes(b"two, longer\n")  # an operator's edit: size and mtime change
    assert live.read(str(path)) == b"two, longer\n"
    replaced = tmp_path / "new"
    replaced.write_bytes(b"same\n")
    os.replace(replaced, path)  # a rename: a new inode
    assert live.read(str(path)) == b"same\n"
    path.unlink()
    assert live.read(str(path)) is None


class CountingClient(SupervisorClient):
    """Answers getProcessInfo itself, counting the calls (the events view is under test)."""

    def __init__(self, observed: ObservedStates) -> None:
        super().__init__(settings=None, observed=observed)  # type: ignore[arg-type]
        self.asked: list[str] = []

    def info(self, name: str) -> dict | None:
        self.asked.append(name)
        return {"name": name, "statename": "STARTING", "pid": 0}


def test_states_come_from_the_events_and_an_action_asks_again():
    observed = ObservedStates()
    client = CountingClient(observed)
    assert client.state("dnsmasq") == "STARTING" and client.asked == ["dnsmasq"]  # no events read yet
    observed.reset([{"name": "dnsmasq", "statename": "RUNNING", "pid": 42}])
    assert client.not_running("dnsmasq") is None and client.asked == ["dnsmasq"]  # from the list
    with client._acting("dnsmasq"):  # a start or stop: the view's state may be older than it
        pass
    assert client.state("dnsmasq") == "STARTING" and client.asked == ["dnsmasq", "dnsmasq"]
    observed.saw("dnsmasq", "EXITED", 42)  # the event after the action
    assert client.not_running("dnsmasq") == "dnsmasq is EXITED" and len(client.asked) == 2
    observed.stop()  # the listener stopped reading: nothing it saw is trusted
    assert client.state("dnsmasq") == "STARTING" and len(client.asked) == 3
