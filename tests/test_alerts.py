"""The alert queue: bounded on disk, delivered in order, kept while the manager is away."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from vr.control.alerts import AlertQueue, make_alert


@pytest.fixture
def manager():
    """An alert endpoint on loopback that records what it gets; status 503 while `down`."""
    received, state = [], {"down": False}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if state["down"]:
                self.send_response(503)
            else:
                received.append(body)
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received, state
    finally:
        server.shutdown()
        server.server_close()


def test_queue_is_bounded_and_says_how_many_were_dropped(tmp_path):
    queue = AlertQueue(tmp_path / "alerts.jsonl", limit=3)
    for n in range(5):
        queue.put(make_alert("r1", "dnsmasq", "critical", f"alert {n}"))
    pending = queue.pending()
    assert [a["message"] for a in pending] == ["alert 2", "alert 3", "alert 4"]
    assert pending[0]["dropped"] == 2


def test_delivered_in_order_and_kept_while_the_manager_refuses(tmp_path, manager):
    url, received, state = manager
    queue = AlertQueue(tmp_path / "alerts.jsonl")
    state["down"] = True
    for n in range(3):
        queue.put(make_alert("r1", "haproxy", "critical", f"alert {n}", count=n))
    delivered, error = queue.deliver(url)
    assert delivered == 0 and "503" in error and len(queue.pending()) == 3
    state["down"] = False
    assert queue.deliver(url) == (3, None)
    assert [a["message"] for a in received] == ["alert 0", "alert 1", "alert 2"]
    assert set(received[0]) == {"router", "service", "severity", "message", "time", "count"}
    assert queue.pending() == []


def test_unreachable_manager_is_an_error_not_a_crash(tmp_path):
    queue = AlertQueue(tmp_path / "alerts.jsonl")
    queue.put(make_alert("r1", "radvd", "critical", "down"))
    delivered, error = queue.deliver("http://127.0.0.1:9/alerts", timeout=0.5)
    assert delivered == 0 and error and len(queue.pending()) == 1
