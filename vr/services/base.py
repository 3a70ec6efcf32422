"""The contract every service module follows, so that a reader who learns one knows all.

read (its part of the document) -> verify (problems with JSON paths) -> generate (files)
-> check (the daemon's own checker, on the staged files) -> apply (hitless) -> probe.
The pipeline owns ordering, staging, rollback and events; a service owns only its daemon.
"""

from __future__ import annotations

import subprocess
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vr.foundation.document import RouterDocument
    from vr.foundation.errors import Problem
    from vr.services.probes import ProbeSpec
    from vr.services.runtime import Runtime


def repeats(values: Iterable[Hashable]) -> Iterator[tuple[int, int]]:
    """(index, index of its first occurrence) for every value already seen: a list's duplicates."""
    first: dict[Hashable, int] = {}
    for n, value in enumerate(values):
        earlier = first.setdefault(value, n)
        if earlier != n:
            yield n, earlier


class CheckFailed(Exception):
    """The daemon's checker refused a staged file; the message is the checker's own."""


def run_checker(label: str, command: list[str], staged_dir: Path) -> None:
    """Run a daemon's own config checker; its complaint, with staging paths made relative
    (they mean nothing to an operator), becomes CheckFailed."""
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().replace(str(staged_dir) + "/", "")
        raise CheckFailed(f"{label}: {message}")


@dataclass(frozen=True)
class Program:
    """A foreground daemon that supervisord runs for a service."""

    name: str
    command: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    stop_signal: str = "TERM"
    events: tuple[str, ...] = ()  # supervisord events it listens to (an event listener)
    # Restarted by supervisord itself when it dies. Off for the daemons the monitor probes:
    # the monitor restarts those, with back-off, and not while their monitoring is off.
    autorestart: bool = False


@dataclass
class Change:
    """What an apply does to one service's files; `previous` is kept to undo it."""

    service: str
    generated: dict[str, bytes] = field(default_factory=dict)  # the full set, staged for the checker
    written: dict[str, bytes] = field(default_factory=dict)  # the subset that differs from live
    removed: list[str] = field(default_factory=list)
    previous: dict[str, bytes | None] = field(default_factory=dict)
    # Rolling back: the daemon may run either version (the failed apply may have half
    # happened, or not at all), so apply must make it match desired() whole, not by difference.
    restore: bool = False

    @property
    def paths(self) -> list[str]:
        return sorted([*self.written, *self.removed])

    def desired(self, relpath: str) -> bytes | None:
        """What the file should hold after this change (None: it should not exist)."""
        if relpath in self.written:
            return self.written[relpath]
        return None if relpath in self.removed else self.generated.get(relpath)

    def touches(self, *relpaths: str) -> bool:
        return any(p in self.written or p in self.removed for p in relpaths)


class Service:
    name: str = ""
    # Whether check() reads the service's unchanged files too; they are then staged beside
    # the changed ones (as hard links). A service with hundreds of small files that its
    # checker never reads says False, and an apply does not pay a link per file.
    checker_reads_unchanged: bool = True

    def read(self, doc: RouterDocument) -> Any:
        """Every part of the document that verify and generate use: an apply whose read()
        equals the stored document's skips this service's verify and generate."""
        raise NotImplementedError

    def configured(self, doc: RouterDocument) -> bool:
        """Whether this router needs the service at all (probes and status skip it if not)."""
        return True

    def verify(self, doc: RouterDocument) -> list[Problem]:
        return []

    def generate(self, doc: RouterDocument, runtime: Runtime) -> dict[str, bytes]:
        return {}

    def check(self, staged_dir: Path, change: Change, runtime: Runtime) -> None:
        """Run the daemon's own checker against staged files; raise CheckFailed."""

    def apply(self, change: Change, doc: RouterDocument | None, runtime: Runtime) -> None:
        """Make the running daemon match the switched-in files, hitlessly. doc is None when
        rolling back the very first apply: nothing of this service should remain."""

    def probe_spec(self, doc: RouterDocument, runtime: Runtime) -> ProbeSpec | None:
        """What proves the service does its job, as data for vr.services.probes: {"program": the
        supervisord program that must run (or None), "check": a vr.services.probes check, "args": its
        arguments}. The pipeline's health gate and the monitor run the same spec. None: the
        router does not need the service, nothing to probe."""
        return None

    def probe(self, doc: RouterDocument, runtime: Runtime) -> str | None:
        """None when the service does its job; otherwise why not."""
        spec = self.probe_spec(doc, runtime)
        if spec is None:
            return None
        if spec["program"] and (reason := runtime.supervisor.not_running(spec["program"])):
            return reason
        from vr.services import probes

        return probes.run(spec)

    def programs(self, doc: RouterDocument, runtime: Runtime) -> list[Program]:
        return []
