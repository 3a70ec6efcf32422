"""Alerts to the manager: appended to an on-disk queue, POSTed in order, kept until delivered.

The queue is bounded: past LIMIT alerts the oldest are dropped, and the next alert delivered
says how many (`dropped`), so the manager knows it missed some. A manager that is down or
slow never blocks the monitor: delivery runs in its own thread, with back-off between tries.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from vr.foundation.events import timestamp
from vr.foundation.files import write_atomic

LIMIT = 1000
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
TIMEOUT_S = 2.0


def make_alert(router: str, service: str, severity: str, message: str, count: int = 1) -> dict:
    return {
        "router": router,
        "service": service,
        "severity": severity,
        "message": message,
        "time": timestamp(),
        "count": count,
    }


class AlertQueue:
    """Alerts not yet delivered, one JSON object per line, rewritten atomically on change."""

    def __init__(self, path: Path, limit: int = LIMIT):
        self.path = path
        self.limit = limit
        self._lock = threading.Lock()

    def put(self, alert: dict) -> None:
        with self._lock:
            queued = self._read()
            queued.append(alert)
            if len(queued) > self.limit:
                gone, queued = queued[: len(queued) - self.limit], queued[len(queued) - self.limit :]
                dropped = len(gone) + sum(a.get("dropped", 0) for a in gone) + queued[0].get("dropped", 0)
                queued[0] = {**queued[0], "dropped": dropped}
            self._write(queued)

    def pending(self) -> list[dict]:
        with self._lock:
            return self._read()

    def deliver(self, url: str, timeout: float = TIMEOUT_S) -> tuple[int, str | None]:
        """POST the queued alerts in order; stop at the first failure. (delivered, error)."""
        import requests

        delivered, error = 0, None
        for alert in self.pending():
            try:
                response = requests.post(url, json=alert, timeout=timeout)
                if response.status_code >= 300:
                    error = f"{url} answered {response.status_code}"
            except requests.RequestException as failure:
                error = f"{url}: {type(failure).__name__}"
            if error:
                break
            with self._lock:
                queued = self._read()
                if queued and queued[0] == alert:
                    self._write(queued[1:])
            delivered += 1
        return delivered, error

    def _read(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def _write(self, alerts: list[dict]) -> None:
        write_atomic(self.path, "".join(json.dumps(a, sort_keys=True) + "\n" for a in alerts).encode(), mode=0o640)


class AlertSender(threading.Thread):
    """Delivers the queue whenever an alert is put, and retries with back-off while the
    manager does not take them."""

    def __init__(self, queue: AlertQueue, url: str | None):
        super().__init__(name="alert-sender", daemon=True)
        self.queue = queue
        self.url = url
        self.last_error: str | None = None
        self._wake = threading.Event()

    def notify(self) -> None:
        self._wake.set()

    def run(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            self._wake.wait(timeout=delay if self.queue.pending() else None)
            self._wake.clear()
            if not self.url:
                continue
            _, error = self.queue.deliver(self.url)
            self.last_error = error
            delay = min(delay * 2, RETRY_MAX_S) if error else RETRY_INITIAL_S
