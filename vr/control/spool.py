"""The spool: payload files dropped in incoming/ are applied once, in name order.

Each ends in done/ or failed/ (with NAME.error holding the reason). History is kept
bounded by count and age so that processed payloads never fill a router's disk.
"""

from __future__ import annotations

import contextlib
import os
import queue
import stat
import time
from pathlib import Path

from vr.foundation import jsontext
from vr.foundation.errors import VrError
from vr.foundation.events import MAX_MESSAGE
from vr.transaction.pipeline import Pipeline

KEEP_COUNT = 200
KEEP_AGE_S = 7 * 24 * 3600


def _read_dropped(path: Path) -> bytes:
    """A dropped file is read only if it is a regular file of bounded size: a FIFO would hang
    the watcher, a link to /dev/zero would fill its memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise jsontext.JsonRefused("", "not a regular file (a link, FIFO or device is never read)")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(jsontext.MAX_BYTES + 1)
    finally:
        os.close(fd)
    return data


class Spool:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        root = pipeline.settings.spool_dir
        self.incoming, self.done, self.failed = root / "incoming", root / "done", root / "failed"
        for directory in (self.incoming, self.done, self.failed):
            directory.mkdir(parents=True, exist_ok=True)

    def pending(self) -> list[Path]:
        return sorted(p for p in self.incoming.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    def process(self, path: Path) -> bool:
        """Apply one file; True when it applied."""
        try:
            raw = jsontext.loads(_read_dropped(path))
            # Wait for a running apply (CLI or agent) rather than failing the file.
            self.pipeline.apply(raw, wait=True)
        except (VrError, ValueError, OSError) as error:
            reason = str(error)[:MAX_MESSAGE]
            target = self.failed / path.name
            os.replace(path, target)
            with contextlib.suppress(OSError):  # a full disk keeps the reason from being written, not the move
                (self.failed / (path.name + ".error")).write_text(reason + "\n")
            self._trim()
            return False
        os.replace(path, self.done / path.name)
        self._trim()
        return True

    def drain(self, only: set[str] | None = None) -> int:
        """Apply what is pending, in name order; only: just these names (files whose writer is
        known to be done with them)."""
        count = 0
        for path in self.pending():
            if only is not None and path.name not in only:
                continue
            self.process(path)
            count += 1
        return count

    def _trim(self) -> None:
        now = time.time()
        for directory in (self.done, self.failed):
            entries = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            payloads = [p for p in entries if p.suffix == ".json"]
            for n, path in enumerate(payloads):
                if n >= KEEP_COUNT or now - path.stat().st_mtime > KEEP_AGE_S:
                    path.unlink(missing_ok=True)
                    Path(str(path) + ".error").unlink(missing_ok=True)

    def watch(self, stop_after: float | None = None) -> None:
        """Apply what is there, then each new file as it lands (watchdog/inotify)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake: queue.Queue[None] = queue.Queue()

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # created, or moved in after a temp write
                if event.event_type in ("created", "moved", "closed"):
                    wake.put(None)

        observer = Observer()
        observer.schedule(Handler(), str(self.incoming), recursive=False)
        observer.start()
        deadline = None if stop_after is None else time.monotonic() + stop_after
        try:
            self.drain()
            while deadline is None or time.monotonic() < deadline:
                try:
                    wake.get(timeout=1.0)
                except queue.Empty:
                    continue
                # A burst of files becomes one drain: each file still applies once, in order.
                self.drain()
        finally:
            observer.stop()
            observer.join()
