"""Results kept per immutable object: the document's models are frozen and merge reuses
every unchanged one, so a pass over 10,000 rules recomputes only the rules that changed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import compress, filterfalse
from operator import itemgetter
from typing import Any

_result = itemgetter(1)


class Memo:
    def __init__(self) -> None:
        # slot -> (setting, {id(item): (item, result)}): what the previous pass computed.
        # Each entry holds its item, so no live object can share its id.
        self._slots: dict[str, tuple[Any, dict[int, tuple[object, Any]]]] = {}

    def map(self, slot: str, items: Sequence[object], compute: Callable[[Any, Any], Any], setting: Any = None) -> list:
        """compute(item, setting) for each item, reusing the previous pass's result for the
        same object when the setting is equal. Only the latest pass is kept, so memory
        follows the document, not its history. The loops run in C: a pass that finds
        nothing new costs well under a millisecond for 10,000 items."""
        keys = list(map(id, items))
        previous = self._slots.get(slot)
        if previous is not None and (previous[0] is setting or previous[0] == setting):
            known = previous[1]
            missing = set(filterfalse(known.__contains__, keys))
            fresh = compress(items, map(missing.__contains__, keys)) if missing else ()
        else:
            known, fresh = {}, items
        for item in fresh:
            known[id(item)] = (item, compute(item, setting))
        if len(known) != len(keys):  # items went away: keep only this pass's
            known = {key: known[key] for key in keys}
        self._slots[slot] = (setting, known)
        return list(map(_result, map(known.__getitem__, keys)))
