"""The stored document: small payloads appended to a log, replayed on load, compacted."""

from __future__ import annotations

import json

import pytest

from vr.foundation import document as docmod
from vr.foundation.settings import Settings
from vr.transaction.store import COMPACT_AFTER, LOG_LIMIT, DocumentStore


def rule_payload(generation: int, port: int) -> docmod.Payload:
    rule = {"id": f"r{port}", "public_ip": "192.0.2.10", "protocol": "tcp", "ports": port}
    return docmod.parse_payload({"generation": generation, "ingress_rules": {"upsert": [rule]}})


def commit_rules(store: DocumentStore, doc: docmod.RouterDocument, count: int) -> docmod.RouterDocument:
    for n in range(count):
        payload = rule_payload(doc.generation + 1, 20000 + n)
        doc = docmod.merge(doc, payload)
        store.commit(doc, payload)
    return doc


def fresh(settings: Settings) -> DocumentStore:
    return DocumentStore(settings)  # a new process: nothing cached


@pytest.fixture
def stored(tmp_path, example) -> tuple[Settings, DocumentStore, docmod.RouterDocument]:
    """A store holding the example router, written whole."""
    settings = Settings.under_root(tmp_path)
    settings.ensure_dirs()
    store = DocumentStore(settings)
    doc = docmod.merge(None, docmod.parse_payload(example))
    store.commit(doc, None)
    return settings, store, doc


def test_a_rule_change_is_appended_and_a_new_process_reads_the_same_document(tmp_path, example):
    settings = Settings.under_root(tmp_path)
    settings.ensure_dirs()
    store = DocumentStore(settings)
    first = docmod.merge(None, docmod.parse_payload(example))
    store.commit(first, docmod.parse_payload(example))
    base = settings.document_path.read_bytes()
    doc = commit_rules(store, first, 3)
    assert settings.document_path.read_bytes() == base  # not rewritten
    assert len(settings.document_log_path.read_bytes().splitlines()) == 3
    loaded = fresh(settings).load()
    assert loaded == doc and loaded.generation == first.generation + 3
    assert [r.id for r in loaded.firewall.ingress][-3:] == ["r20000", "r20001", "r20002"]


def test_the_log_is_compacted_into_the_document_when_full_or_when_a_whole_document_comes(stored, example):
    settings, store, doc = stored
    doc = commit_rules(store, doc, LOG_LIMIT + 2)  # LOG_LIMIT appended, one compaction, one appended
    assert len(settings.document_log_path.read_bytes().splitlines()) == 1
    section = docmod.parse_payload({"generation": doc.generation + 1, "dns": example["dns"] | {"cache_size": 300}})
    doc = docmod.merge(doc, section)
    store.commit(doc, section)  # a small section change is appended too
    assert len(settings.document_log_path.read_bytes().splitlines()) == 2
    assert fresh(settings).load() == doc
    whole = docmod.parse_payload(example | {"generation": doc.generation + 1})
    doc = docmod.merge(doc, whole)
    store.commit(doc, whole)
    assert not settings.document_log_path.exists()
    assert json.loads(settings.document_path.read_bytes())["generation"] == doc.generation
    assert fresh(settings).load() == doc


def test_a_logged_agent_token_is_its_hash(stored):
    settings, store, doc = stored
    token = "a-bearer-token-of-at-least-32-characters"
    payload = docmod.parse_payload({"generation": doc.generation + 1, "agent": {"tokens": [token]}})
    doc = docmod.merge(doc, payload)
    store.commit(doc, payload)
    log = settings.document_log_path.read_text()
    assert token not in log and docmod.token_digest(token) in log
    assert fresh(settings).load() == doc


def test_the_daemon_compacts_a_long_log_when_idle_and_not_a_short_one(stored):
    settings, store, doc = stored
    doc = commit_rules(store, doc, COMPACT_AFTER - 1)
    assert store.compact_if_due() is False and settings.document_log_path.exists()
    doc = commit_rules(store, doc, 1)
    assert store.compact_if_due() is True
    assert not settings.document_log_path.exists()
    assert json.loads(settings.document_path.read_bytes())["generation"] == doc.generation
    assert fresh(settings).load() == doc


def test_a_torn_last_line_was_never_committed_and_is_not_appended_to(stored):
    settings, store, doc = stored
    doc = commit_rules(store, doc, 2)
    with settings.document_log_path.open("ab") as log:
        log.write(b'{"generation": 99, "ingress_rules": {"ups')  # a crash in the middle of an append
    assert fresh(settings).load() == doc
    doc = commit_rules(fresh(settings), doc, 1)  # the next commit rewrites the document instead
    assert not settings.document_log_path.exists()
    assert fresh(settings).load() == doc


def test_log_entries_the_document_already_holds_are_skipped(stored):
    """A crash between writing the compacted document and removing the log."""
    settings, store, doc = stored
    doc = commit_rules(store, doc, 2)
    log = settings.document_log_path.read_bytes()
    store.commit(doc, None)  # compaction
    settings.document_log_path.write_bytes(log)  # ... as if the crash came before the unlink
    assert fresh(settings).load() == doc


def test_only_root_reads_the_stored_document(stored):
    """It holds TLS keys, pre-shared keys and VPN passwords."""
    settings, store, doc = stored
    commit_rules(store, doc, 1)
    for path in (settings.document_path, settings.document_log_path):
        assert path.stat().st_mode & 0o777 == 0o600, path
