"""Crash-safe file writes: temp + fsync + rename, and exact-content comparison."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """A reader sees the old content or the new, never a torn file, even across a crash.
    A failed write (a full disk above all) leaves no temporary behind and names the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_new(tmp, data, mode, sync=sync)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int = 0o644, sync: bool = False) -> None:
    """A file that no reader sees yet (staged, or a temporary to be renamed in): written in
    place; fsynced only when asked (see vr.transaction.pipeline on durability). A failure
    names the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None


def write_json_atomic(path: Path, obj: object, mode: int = 0o644, sync: bool = True) -> None:
    """For small state files; large documents use pydantic's own (much faster) serializer."""
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), mode, sync=sync)


def stat_key(path: Path | str) -> tuple | None:
    """What changes whenever a file is replaced or rewritten (inode, mtime, size); None when absent."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_ino, status.st_mtime_ns, status.st_size)


class LiveContent:
    """Files' contents, read again only when a file's stat changes: a warm process compares
    every file it generates with the live one, and reading 260 small files on each apply
    cost 6 ms where stating them costs one."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple, bytes]] = {}

    def read(self, path: str) -> bytes | None:
        key = stat_key(path)
        if key is None:
            self._known.pop(path, None)
            return None
        known = self._known.get(path)
        if known is not None and known[0] == key:
            return known[1]
        content = read_bytes_or_none(path)  # replaced meanwhile: the next stat differs, and reads again
        if content is None:
            self._known.pop(path, None)
        else:
            self._known[path] = (key, content)
        return content

    def remember(self, path: str, content: bytes) -> None:
        """What the caller has just written there: kept as the very object it wrote (the
        render memo's), not read back as a second copy of every file."""
        key = stat_key(path)
        if key is None:
            self._known.pop(path, None)
        else:
            self._known[path] = (key, content)


def read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def read_report(path: Path, fields: dict[str, type | tuple[type, ...]]) -> dict | None:
    """A report another process wrote (health.json, last_apply.json, patch.json): None when it
    is missing or does not read as an object; a field of the wrong type is dropped. A reader
    reports what it can, and a damaged report never stops a command."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    return {key: item for key, item in value.items() if key not in fields or _fits(item, fields[key])}


def _fits(item: object, kinds: type | tuple[type, ...]) -> bool:
    """isinstance, except that true and false are not numbers."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return isinstance(item, kinds) and (bool in kinds or not isinstance(item, bool))


def read_bytes_or_none(path: Path | str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return None


def listed_files(directory: Path) -> list[str]:
    """A service directory's files, as paths relative to it, subdirectories included
    (dot-files are vr's temporaries)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            found += [f"{entry.name}/{name}" for name in listed_files(Path(entry.path))]
        elif entry.is_file():
            found.append(entry.name)
    return sorted(found)


def is_secret(relpath: str) -> bool:
    """Certificates with their private keys, pre-shared keys, passwords: mode 0600, never shown."""
    return relpath.endswith((".pem", ".secrets"))


def mode_for(relpath: str) -> int:
    return 0o600 if is_secret(relpath) else 0o644


def fault_point(step: str) -> None:
    """Crash-test hooks: VR_FAULT_AT=<step> kills this process right there (SIGKILL);
    VR_FAULT_ENOSPC=<step> fails there as a full disk would."""
    if os.environ.get("VR_FAULT_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("VR_FAULT_ENOSPC") == step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<fault point {step}>")
