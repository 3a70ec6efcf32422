"""One change at a time: an apply, a patch or a recovery holds the router's lock.

A patch runs the new release's `vr` as a child to re-render; the child inherits the
parent's locked descriptor (VR_LOCK_FD) instead of waiting for a lock its parent holds."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from vr.foundation.errors import Busy
from vr.foundation.settings import Settings

INHERITED = "VR_LOCK_FD"


@contextlib.contextmanager
def router_lock(settings: Settings, wait: bool = False) -> Iterator[int]:
    """Yields the locked descriptor (pass it to a child with inheritable_lock_env)."""
    inherited = _inherited_fd(settings)
    if inherited is not None:
        yield inherited  # the parent holds it and releases it; closing ours would not matter
        return
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode().strip() or "?"
            raise Busy(f"another apply or patch is running (pid {holder}); try again when it ends") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield fd
    finally:
        os.close(fd)


def inheritable_lock_env(fd: int) -> dict[str, str]:
    return {INHERITED: str(fd)}


def _inherited_fd(settings: Settings) -> int | None:
    """The descriptor named by VR_LOCK_FD, if it really is this router's lock file and locked
    by our parent (flock on the same open file succeeds at once)."""
    value = os.environ.get(INHERITED, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        held, expected = os.fstat(fd), os.stat(settings.lock_path)
        if (held.st_dev, held.st_ino) != (expected.st_dev, expected.st_ino):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None
    return fd


def holder(settings: Settings) -> int | None:
    """The PID holding the router's lock (an apply, patch or recovery in progress), or None
    when nobody does: then a journal left behind belongs to a process that is gone."""
    return flock_holder(settings.lock_path)


def flock_holder(path: Path) -> int | None:
    """Who holds an exclusive flock on a PID file: its PID (-1 if the file does not say), or
    None when the lock is free. A lock dies with its process: no stale PID file can lie."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None
