"""Shared fixtures. End-to-end tests build their own lab in namespaces with a unique prefix
and tear it down (namespaces deleted, daemons stopped by PID) whatever the outcome."""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from vr.lab import Lab

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"
_counter = itertools.count()


@pytest.fixture
def example() -> dict:
    return copy.deepcopy(json.loads((EXAMPLES / "router.json").read_text()))


@pytest.fixture
def lab():
    """A lab router with the example payload applied and both guests holding a lease."""
    # Not pytest's tmp_path: its 0700 parents would stop dnsmasq (unprivileged) reading its files.
    root = Path(tempfile.mkdtemp(prefix="vr-test-lab-"))
    root.chmod(0o755)
    lab = Lab(root, prefix=f"vrt{os.getpid() % 100000}x{next(_counter)}")
    lab.up()
    try:
        lab.vr("apply", str(EXAMPLES / "router.json"))
        for guest in ("g1", "g2"):
            lab.dhcp(guest)
        yield lab
    finally:
        lab.down()
        shutil.rmtree(root, ignore_errors=True)


def live_files(lab: Lab) -> dict[str, bytes]:
    """Every rendered file and the stored document, to prove a refused payload changed nothing."""
    config = lab.settings.config_dir
    files = {str(p.relative_to(config)): p.read_bytes() for p in config.rglob("*") if p.is_file()}
    for stored in (lab.settings.document_path, lab.settings.document_log_path):
        files[stored.name] = stored.read_bytes() if stored.exists() else None
    return files


def write_payload(tmp_path: Path, payload: dict, name: str = "payload.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return str(path)
