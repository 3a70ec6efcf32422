"""Which version of vr's code runs: the foundation every layer may ask (status, the monitor,
the patcher). A release's manifest says its version; the source tree says the package's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vr import __version__

MANIFEST = "manifest.json"
SEMVER = re.compile(
    r"(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})"
    r"(?:-([0-9A-Za-z-]{1,32}(?:\.[0-9A-Za-z-]{1,32}){0,7}))?"
    r"(?:\+[0-9A-Za-z-]{1,32}(?:\.[0-9A-Za-z-]{1,32}){0,7})?"
)


def is_version(text: object) -> bool:
    return isinstance(text, str) and SEMVER.fullmatch(text) is not None


def version_key(version: str) -> tuple:
    """Semantic-version order: numbers numerically; a pre-release sorts before its release."""
    match = SEMVER.fullmatch(version)
    if match is None:
        return (-1,)
    major, minor, patch, pre = match.groups()
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in (pre or "").split(".") if p)
    return (int(major), int(minor), int(patch), 0 if pre else 1, parts)


def code_dir() -> Path:
    """The directory holding the running `vr` package (a release dir, or the source tree)."""
    return Path(__file__).resolve().parents[2]


def running_version() -> str:
    """The version of the code that runs: its release manifest's, else the package's own."""
    try:
        version = json.loads((code_dir() / MANIFEST).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return __version__
    return version if is_version(version) else __version__
