"""The last-known-good document on disk: document.json plus a short log of small payloads.

Rewriting a large router's document after a one-rule change costs ~100 ms; appending that
payload (a few hundred bytes, fsynced) costs well under one. A payload (item changes, or
sections: a load balancer's 200 rules, 50 tunnels) is appended to document.log as parsed
(secrets as the document keeps them: tokens hashed) when it is under MAX_ENTRY_BYTES; a
bigger one, or a log at LOG_LIMIT entries or LOG_BYTES, rewrites document.json and empties
the log. Loading replays the log over document.json through the same merge.
The daemon compacts a log of COMPACT_AFTER entries or more once no push waits
(compact_if_due): a 4,000-VM rewrite costs ~100 ms, which no caller should wait for.

Crash safety: an append is committed once fsynced; a torn last line was never committed
and is ignored (the next commit rewrites document.json rather than append after it).
Compaction writes document.json (temp + fsync + rename) before removing the log, and
replay skips log entries the document already holds, so a crash between the two is safe.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence

from pydantic import ValidationError

from vr.foundation import document as docmod
from vr.foundation.document import Payload, RouterDocument
from vr.foundation.errors import StoredDocumentUnreadable, VrError
from vr.foundation.files import fsync_dir, stat_key, write_atomic
from vr.foundation.settings import Settings

SECRET_MODE = 0o600  # the document holds TLS keys, pre-shared keys and VPN passwords
LOG_LIMIT = 512  # entries: bounds the replay a fresh process does (~0.3 ms an entry on a large router)
COMPACT_AFTER = 32  # entries: what the daemon compacts when idle
MAX_ENTRY_BYTES = 256 * 1024  # a payload appended to the log: at most this, serialized
APPENDED_SECTIONS = 3  # and of at most this many sections (a whole document is not serialized twice)
LOG_BYTES = 4 * 1024 * 1024  # the log's size that a commit compacts at


class DocumentStore:
    def __init__(self, settings: Settings) -> None:
        self.path = settings.document_path
        self.log_path = settings.document_log_path
        self._cached: tuple[tuple, RouterDocument] | None = None

    def load(self) -> RouterDocument | None:
        """Last-known-good. A resident process (watcher, agent) parses it once, not per push."""
        key = self._key()
        if key[0] is None:
            return None
        if self._cached is None or self._cached[0] != key:
            data = self.path.read_bytes()
            try:
                doc = RouterDocument.model_validate_json(data)
                for line in self._log_lines():
                    payload = Payload.model_validate_json(line)
                    if payload.generation > doc.generation:  # older ones predate a compaction
                        doc = docmod.merge(doc, payload)
            except (ValidationError, VrError) as error:
                raise StoredDocumentUnreadable(_first_problem(error), _raw_generation(data)) from None
            self._cached = (key, doc)
            settle_garbage_collector()
        return self._cached[1]

    def commit(self, doc: RouterDocument, payload: Payload | Sequence[Payload] | None) -> None:
        """Make doc the last-known-good, durably. payload is what merge applied to the
        stored document to make doc: one payload, or several merged in order (a coalesced
        burst); None: doc is written whole."""
        payloads = [] if payload is None else [payload] if isinstance(payload, Payload) else list(payload)
        log = self._read_log()
        entries = log or b""
        torn = bool(entries) and not entries.endswith(b"\n")  # never append after a torn line
        appendable = not torn and entries.count(b"\n") + len(payloads) <= LOG_LIMIT and len(entries) < LOG_BYTES
        few = all(len(p.model_fields_set - {"generation"}) <= APPENDED_SECTIONS for p in payloads)
        lines = b"".join(p.model_dump_json(exclude_unset=True).encode() + b"\n" for p in payloads) \
            if payloads and few and appendable and self.path.exists() else b""  # fmt: skip
        if lines and len(lines) <= MAX_ENTRY_BYTES * len(payloads):
            self._append(lines, created=log is None)
        else:
            write_atomic(self.path, doc.model_dump_json().encode(), mode=SECRET_MODE)
            if log is not None:
                self.log_path.unlink(missing_ok=True)
                fsync_dir(self.log_path.parent)
        self._cached = (self._key(), doc)
        settle_garbage_collector()

    def compact_if_due(self) -> bool:
        """The log folded into document.json when it holds COMPACT_AFTER entries or more
        (the caller holds the router's lock). Whether it was."""
        log = self._read_log()
        if log is None or log.count(b"\n") < COMPACT_AFTER:
            return False
        doc = self.load()
        if doc is None:
            return False
        self.commit(doc, None)
        return True

    def _append(self, line: bytes, created: bool) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, SECRET_MODE)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.log_path.parent)

    def _read_log(self) -> bytes | None:
        try:
            return self.log_path.read_bytes()
        except FileNotFoundError:
            return None

    def _log_lines(self) -> list[bytes]:
        # Whatever follows the last newline was never committed.
        return (self._read_log() or b"").split(b"\n")[:-1]

    def version(self) -> tuple:
        """Changes whenever the stored document does (whoever committed it)."""
        return self._key()

    def _key(self) -> tuple:
        return (stat_key(self.path), stat_key(self.log_path))


def _first_problem(error: Exception) -> str:
    if isinstance(error, ValidationError):
        problems = docmod.problems_from(error)
        more = f" and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
        return f"{problems[0]}{more}" if problems else "does not validate"
    return str(error)[:300]


def _raw_generation(data: bytes) -> int | None:
    """The generation the unreadable document was at, if that much can still be read: a
    replacement must still be newer (unless it was out of range, as in the case it wedged)."""
    try:
        generation = json.loads(data).get("generation")
    except (ValueError, AttributeError):
        return None
    return docmod.json_safe_generation(generation)


def settle_garbage_collector() -> None:
    """A large router is ~100k long-lived objects; a full GC pass over them costs ~50 ms.
    Freeze what is loaded (it lives as long as the process) and collect less eagerly. The
    garbage an apply left (the collector is paused meanwhile) is collected first: frozen, a
    cycle would never be freed, and a resident daemon would grow with every push. The pass
    walks only what is not frozen yet: what this apply made."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
