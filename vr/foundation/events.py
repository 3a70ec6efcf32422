"""Structured events: one JSON object per line, searchable by resource, bounded in size."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

MAX_BYTES = 8 * 1024 * 1024  # then rotate once: at most twice this on disk
MAX_MESSAGE = 2048  # characters of one event's message: a refusal quoting a huge payload stays small


class EventLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, events: list[dict]) -> bool:
        """Events report what happened; they never decide it. A full disk loses the events
        (False), not the answer to the caller. A line is written whole or not at all."""
        if not events:
            return True
        data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in events).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                if self.path.stat().st_size > MAX_BYTES:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                written = os.write(fd, data)
                if written != len(data):  # a short write on a full disk: cut back to whole lines
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                    return False
            finally:
                os.close(fd)
        except OSError:
            return False
        return True

    def read(self, resource: str | None = None) -> Iterator[dict]:
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                lines = path.read_bytes().splitlines()
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                continue
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:  # torn by a crash or a full disk, or not text at all
                    continue
                if not isinstance(event, dict) or not isinstance(event.get("resource", ""), str):
                    continue  # not one of ours
                if (
                    resource is None
                    or event.get("resource") == resource
                    or event.get("resource", "").startswith(resource + ":")
                ):
                    yield event


def timestamp(at: float | None = None) -> str:
    """UTC, to the millisecond: what events and alerts carry as their time (now, or at)."""
    at = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


def event(type_: str, resource: str, outcome: str, message: str = "", generation: int | None = None) -> dict:
    return {
        "time": timestamp(),
        "type": type_,
        "resource": resource,
        "generation": generation,
        "outcome": outcome,
        "message": message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "... (cut)",
    }
