"""Errors that carry what an operator needs: the JSON path, the step, the reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    warning: bool = False  # reported in the event log; does not refuse the payload

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class VrError(Exception):
    """Base for failures reported to the operator; exit_code is what the CLI returns."""

    exit_code = 1


class InvalidPayload(VrError):
    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class StalePayload(VrError):
    exit_code = 3


class ApplyFailed(VrError):
    """A step failed after validation; the router was rolled back to last-known-good."""

    exit_code = 4

    def __init__(self, step: str, service: str, reason: str):
        self.step, self.service, self.reason = step, service, reason
        super().__init__(f"{step} failed for {service}: {reason}")


class Busy(VrError):
    exit_code = 75
