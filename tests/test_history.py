"""Histories stay bounded: processed payloads and events never fill a router's disk."""

from __future__ import annotations

import json
import os
import time

from vr.control import spool as spool_module
from vr.foundation import events as events_module
from vr.foundation.events import EventLog, event
from vr.foundation.settings import Settings
from vr.transaction.pipeline import Pipeline


def test_spool_keeps_a_bounded_number_of_processed_files(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "KEEP_COUNT", 5)
    spool = spool_module.Spool(Pipeline(Settings.under_root(tmp_path)))
    for n in range(12):  # invalid payloads: each is refused and lands in failed/ with its reason
        (spool.incoming / f"{n:03d}.json").write_text(json.dumps({"generation": n + 1}))
        os.utime(spool.incoming / f"{n:03d}.json", (time.time() + n, time.time() + n))
    assert spool.drain() == 12
    kept = sorted(p.name for p in spool.failed.iterdir() if p.suffix == ".json")
    assert kept == [f"{n:03d}.json" for n in range(7, 12)]  # the newest five
    errors = sorted(p.name for p in spool.failed.iterdir() if p.name.endswith(".error"))
    assert errors == [f"{n:03d}.json.error" for n in range(7, 12)]  # no orphaned reasons
    assert "the first payload must carry the whole router" in (spool.failed / "011.json.error").read_text()


def test_spool_drops_processed_files_older_than_the_age_bound(tmp_path):
    spool = spool_module.Spool(Pipeline(Settings.under_root(tmp_path)))
    old = spool.done / "old.json"
    old.write_text("{}")
    week_ago = time.time() - spool_module.KEEP_AGE_S - 60
    os.utime(old, (week_ago, week_ago))
    (spool.incoming / "new.json").write_text("{not json")
    spool.drain()
    assert not old.exists()
    assert (spool.failed / "new.json").exists()


def test_event_log_rotates_once_and_still_reads_both(tmp_path, monkeypatch):
    monkeypatch.setattr(events_module, "MAX_BYTES", 2000)
    log = EventLog(tmp_path / "events.jsonl")
    for n in range(100):
        log.write([event("dhcp", f"vm:02:00:00:00:00:{n:02x}", "added", "x" * 20, n)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1"]  # at most two files, however much is written
    assert all(p.stat().st_size < 2000 + 300 for p in tmp_path.iterdir())
    newest = list(log.read("vm:02:00:00:00:00:63"))
    assert len(newest) == 1 and newest[0]["generation"] == 99
    assert list(log.read("vm:02:00:00:00:00:00")) == []  # the oldest have been rotated away
