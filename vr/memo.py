"""Results kept per immutable object: the document's models are frozen and merge reuses
every unchanged one, so a pass over 10,000 rules recomputes only the rules that changed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class Memo:
    def __init__(self) -> None:
        # slot -> {id(item): (item, setting, result)}: what the previous pass computed
        self._slots: dict[str, dict[int, tuple[object, Any, Any]]] = {}

    def map(self, slot: str, items: Iterable[tuple[object, Any]], compute: Callable[[Any, Any], Any]) -> list:
        """compute(item, setting) for each pair, reusing the previous pass's result for the
        same object with an equal setting. Only the latest pass is kept, so memory follows
        the document, not its history."""
        previous = self._slots.get(slot, {})
        current: dict[int, tuple[object, Any, Any]] = {}
        results = []
        append = results.append  # the loop runs once per rule or VM: keep it tight
        for item, setting in items:
            key = id(item)
            hit = previous.get(key)
            if hit is None or hit[0] is not item or (hit[1] is not setting and hit[1] != setting):
                hit = (item, setting, compute(item, setting))
            current[key] = hit
            append(hit[2])
        self._slots[slot] = current
        return results
