"""Structured events: one JSON object per line, searchable by resource, bounded in size."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

MAX_BYTES = 8 * 1024 * 1024  # then rotate once: at most twice this on disk


class EventLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, events: list[dict]) -> None:
        if not events:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.path.stat().st_size > MAX_BYTES:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except FileNotFoundError:
            pass
        data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in events).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def read(self, resource: str | None = None) -> Iterator[dict]:
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                event = json.loads(line)
                if (
                    resource is None
                    or event.get("resource") == resource
                    or event.get("resource", "").startswith(resource + ":")
                ):
                    yield event


def timestamp() -> str:
    """UTC, to the millisecond: what events and alerts carry as their time."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def event(type_: str, resource: str, outcome: str, message: str = "", generation: int | None = None) -> dict:
    return {
        "time": timestamp(),
        "type": type_,
        "resource": resource,
        "generation": generation,
        "outcome": outcome,
        "message": message,
    }
