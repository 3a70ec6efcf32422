"""Errors that carry what an operator needs: the JSON path, the step, the reason."""

from __future__ import annotations


class Problem:
    """One thing wrong with a payload: its JSON path and the reason. Immutable and compared
    by value. A plain class, not a dataclass: `dataclasses` loads `inspect`, 15 ms of every
    thin `vr` command's start."""

    __slots__ = ("path", "reason", "warning")

    def __init__(self, path: str, reason: str, warning: bool = False) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "warning", warning)  # reported in the event log; does not refuse the payload

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a Problem is immutable: cannot set {name}")

    def _key(self) -> tuple[str, str, bool]:
        return (self.path, self.reason, self.warning)

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, Problem) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple:
        return (Problem, self._key())

    def __repr__(self) -> str:
        return f"Problem(path={self.path!r}, reason={self.reason!r}, warning={self.warning!r})"

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class VrError(Exception):
    """Base for failures reported to the operator; exit_code is what the CLI returns."""

    exit_code = 1


MAX_LISTED = 20  # problems a one-line message names; the rest are counted


class InvalidPayload(VrError):
    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        listed = "; ".join(str(p) for p in problems[:MAX_LISTED])
        more = len(problems) - MAX_LISTED
        super().__init__(listed + (f"; and {more} more problem(s)" if more > 0 else ""))


class StalePayload(VrError):
    exit_code = 3


class ApplyFailed(VrError):
    """A step failed after validation; the router was rolled back to last-known-good."""

    exit_code = 4

    def __init__(self, step: str, service: str, reason: str):
        self.step, self.service, self.reason = step, service, reason
        super().__init__(f"{step} failed for {service}: {reason}")


def os_error_reason(error: OSError) -> str:
    """A failed read or write as an operator needs it: which file, and a full disk said plainly."""
    import errno

    where = error.filename or "the router's disk"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {where}"
    return f"{error.strerror or error} ({where})"


class StoredDocumentUnreadable(VrError):
    """The stored document does not load (a release with tighter limits, a damaged disk).
    Nothing is applied over it but a whole document, which replaces it."""

    exit_code = 4

    def __init__(self, reason: str, generation: int | None):
        self.reason, self.generation = reason, generation
        super().__init__(f"the stored document cannot be loaded ({reason}); push a whole document to replace it")


class Busy(VrError):
    exit_code = 75
