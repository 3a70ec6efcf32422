"""The apply transaction. Services own their daemon; this module owns everything between.

validate -> merge -> plan -> stage -> check -> journal -> switch -> apply -> health -> commit

The journal is written before the first live file changes. Any failure after that, or a
crash noticed at the next start, restores every touched file from its backup and
re-applies the affected services, so the router is never left half old, half new.

Only the stored document is made durable (fsync) on the way: it is what an answered push
must never lose. Staged files, backups, the journal and the switched-in files live in the
page cache, which a killed process does not lose; a power loss loses the page cache and
reboots the router, and `vr start` then renders every live file again from the stored
document (Pipeline.start) before any daemon runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import operator
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vr.foundation import document as docmod
from vr.foundation.document import RouterDocument
from vr.foundation.errors import (
    ApplyFailed,
    Busy,
    InvalidPayload,
    Problem,
    StalePayload,
    StoredDocumentUnreadable,
    VrError,
    os_error_reason,
)
from vr.foundation.events import MAX_MESSAGE, EventLog, event
from vr.foundation.files import (
    LiveContent,
    fault_point,
    listed_files,
    mode_for,
    read_bytes_or_none,
    read_json,
    write_atomic,
    write_json_atomic,
    write_new,
)
from vr.foundation.lock import router_lock
from vr.foundation.settings import Settings
from vr.services import SERVICES, by_name
from vr.services.base import Change, CheckFailed
from vr.services.runtime import Runtime
from vr.transaction.store import DocumentStore

HEALTH_DEADLINE_S = 10.0
STAGING, BACKUP = ".staging", ".backup"


@dataclass
class Result:
    generation: int
    changed: list[str] = field(default_factory=list)
    duration_ms: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # accepted, but the operator should know
    batched: int = 1  # pushes this transaction carried (a coalesced burst: more than one)
    service_ms: dict[str, float] = field(default_factory=dict)  # each changed service's apply (reload) time


@dataclass(frozen=True)
class Push:
    """One payload to apply. next_generation: it carries no generation and takes the next
    one (pushers that do not coordinate generations: the daemon's PATCH ?generation=next)."""

    raw: object
    next_generation: bool = False

    def filled(self, current: RouterDocument | None, unreadable: StoredDocumentUnreadable | None = None) -> object:
        if not (self.next_generation and isinstance(self.raw, dict) and "generation" not in self.raw):
            return self.raw
        base = current.generation if current is not None else (unreadable.generation if unreadable else None)
        return {**self.raw, "generation": (base or 0) + 1}


class Pipeline:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.runtime = Runtime(settings)
        self.events = EventLog(settings.events_path)
        self.store = DocumentStore(settings)
        self.live = LiveContent()
        settings.ensure_dirs()

    # ---------------------------------------------------------------- reading state
    def stored_document(self) -> RouterDocument | None:
        return self.store.load()

    def validate(self, raw: object, stored: RouterDocument | None) -> RouterDocument:
        """Payload -> merged, fully validated document. Raises before anything is touched."""
        return self._validated(raw, stored)[1]

    def _validated(
        self, raw: object, stored: RouterDocument | None, unreadable: StoredDocumentUnreadable | None = None
    ) -> tuple[docmod.Payload, RouterDocument, list[Problem]]:
        """(payload, merged document, warnings); raises on any problem that is not a warning.
        unreadable: the stored document exists but does not load; a whole document replaces it."""
        payload, doc = self._merged(raw, stored, unreadable)
        return payload, doc, self._verified(doc, stored, payload)

    def _merged(
        self, raw: object, stored: RouterDocument | None, unreadable: StoredDocumentUnreadable | None = None
    ) -> tuple[docmod.Payload, RouterDocument]:
        """The payload read (schema, limits) and merged into stored: not yet verified."""
        payload = docmod.parse_payload(raw)
        if unreadable is not None:
            if unreadable.generation is not None and payload.generation <= unreadable.generation:
                raise StalePayload(f"generation {payload.generation} is not newer than the stored generation "
                                   f"{unreadable.generation}: payload refused as stale")  # fmt: skip
            missing = [s for s in docmod.SECTIONS if getattr(payload, s) is None
                       and RouterDocument.model_fields[s].is_required()]  # fmt: skip
            if missing:
                raise unreadable
        return payload, docmod.merge(stored, payload)

    def _verified(self, doc: RouterDocument, stored: RouterDocument | None, payload: Any) -> list[Problem]:
        """The services' own checks of a merged document; its warnings, or InvalidPayload.
        A service whose inputs are those of the stored document was verified with it. The
        network's problems stop the rest: the others read interfaces it found broken."""
        found: list[Problem] = []
        for service in SERVICES:
            if stored is None or service.read(doc) != service.read(stored):
                found += service.verify(doc)
            if service.name == "network" and any(not p.warning for p in found):
                break
        problems = [p for p in found if not p.warning]
        if problems:
            raise InvalidPayload(docmod.in_payload_terms(problems, payload, doc))
        return [p for p in found if p.warning]

    # ---------------------------------------------------------------- entry points
    def apply(self, raw: object, wait: bool = False) -> Result:
        outcome = self.apply_batch([Push(raw)], wait)[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def apply_batch(self, pushes: Sequence[Push], wait: bool = False) -> list[Result | VrError]:
        """Several pushes as one transaction (a burst the daemon queued while an apply ran):
        each is validated in order against the running result, the valid ones are applied
        together (one render per service, one reload per daemon), and each push gets its
        own outcome: the Result that carried it, or the error that refused it. If the joint
        transaction fails, they are applied one by one, so only a bad one is refused."""
        started = time.perf_counter()
        outcomes: list[Result | VrError | None] = [None] * len(pushes)
        with self.lock(wait), _collector_paused():
            self._recover_locked()
            stored, unreadable = self._stored_or_unreadable()
            current, accepted = self._verified_together(pushes, stored, unreadable, outcomes, started)
            if accepted is None:  # the burst as a whole did not verify cleanly: each push on its own
                current, accepted = self._chain(pushes, stored, unreadable, outcomes, started, self._validated)
            if len(accepted) == 1:
                n, payload, warnings = accepted[0]
                outcomes[n] = self._carried(current, stored, started, [payload], warnings)
            elif accepted:
                try:
                    result = self._transaction(current, stored, started, {"validate": _ms(started)},
                                               payload=[p for _, p, _ in accepted],
                                               warnings=[w for _, _, found in accepted for w in found])  # fmt: skip
                except VrError:
                    for n, _, _ in accepted:  # the joint transaction was rolled back: one by one
                        outcomes[n] = self._one_more(pushes[n])
                else:
                    for n, _, warnings in accepted:
                        outcomes[n] = dataclasses.replace(result, warnings=[str(w) for w in warnings],
                                                          batched=len(accepted))  # fmt: skip
        return outcomes  # type: ignore[return-value]

    def _verified_together(self, pushes, stored, unreadable, outcomes, started) -> tuple[Any, list | None]:
        """A burst read and merged push by push (a push its schema or generation refuses is
        answered at once), then the services' checks run once, on the result: a burst of
        one-VM pushes costs one pass over 4,000 VMs, not one per push. (current, accepted), or
        (None, None) when the result has a problem or a warning: which push brought it is
        then found by verifying each on its own."""
        if len(pushes) == 1:
            return None, None
        current, merged = self._chain(pushes, stored, unreadable, outcomes, started,
                                      lambda raw, doc, unread: (*self._merged(raw, doc, unread), []))  # fmt: skip
        if not merged:
            return current, []
        try:
            if self._verified(current, stored, merged[-1][1]):
                return None, None  # a warning: to be told to the push that brought it
        except InvalidPayload:
            return None, None
        return current, merged

    def _chain(self, pushes, stored, unreadable, outcomes, started, read) -> tuple[Any, list]:
        """Each push not answered yet, read (read: merge only, or merge and verify) against the
        result of the ones before it; one that is refused is answered with its own reason and
        the next reads against what came before it. (the result, [(n, payload, warnings)])."""
        current, accepted = stored, []
        for n, push in enumerate(pushes):
            if outcomes[n] is not None:
                continue  # refused already, by its schema or generation
            try:
                payload, doc, warnings = read(push.filled(current, unreadable), current,
                                              unreadable if current is None else None)  # fmt: skip
            except VrError as error:
                self._rejected(push.raw, current, error, started)
                outcomes[n] = error
                continue
            current = doc
            accepted.append((n, payload, warnings))
        return current, accepted

    def _carried(self, doc, stored, started, payloads, warnings) -> Result | VrError:
        try:
            return self._transaction(doc, stored, started, {"validate": _ms(started)}, payload=payloads,
                                     warnings=warnings)  # fmt: skip
        except VrError as error:
            return error

    def _one_more(self, push: Push) -> Result | VrError:
        """One push on its own, the lock already held: validated against what is stored now."""
        started = time.perf_counter()
        stored, unreadable = self._stored_or_unreadable()
        try:
            payload, doc, warnings = self._validated(push.filled(stored, unreadable), stored, unreadable)
        except VrError as error:
            self._rejected(push.raw, stored, error, started)
            return error
        return self._carried(doc, stored, started, [payload], warnings)

    def _stored_or_unreadable(self) -> tuple[RouterDocument | None, StoredDocumentUnreadable | None]:
        try:
            return self.stored_document(), None
        except StoredDocumentUnreadable as error:
            return None, error

    def _rejected(self, raw: object, stored: RouterDocument | None, error: VrError, started: float) -> None:
        generation = raw.get("generation") if isinstance(raw, dict) else None
        generation = docmod.json_safe_generation(generation)  # whatever else arrived is not logged
        name = stored.router.name if stored else "unknown"
        self.events.write([event("apply", f"router:{name}", "rejected", str(error), generation)])
        self._record(generation, "rejected", str(error), started, [])

    def start(self) -> Result | None:
        """At boot: bring every service up from last-known-good (re-rendered, checked)."""
        return self._reapply_stored(force=True)

    def recover(self) -> bool:
        with self.lock():
            return self._recover_locked()

    def _stop_strays(self, doc: RouterDocument) -> None:
        """Before a start: this router's daemons that no live supervisord runs (orphans of a
        supervisord that died, a duplicate started by hand) are stopped, so that every daemon
        runs once, under supervisord, from the files vr wrote."""
        from vr.services.supervisor_rpc import router_processes, stop_processes

        supervisor = self.runtime.supervisor
        keep = set()
        if supervisor.is_running():
            pid_text = read_bytes_or_none(self.settings.run_dir / "supervisord.pid") or b""
            keep = {int(pid_text)} if pid_text.strip().isdigit() else set()
        strays = router_processes(self.settings, keep) if keep or not supervisor.is_running() else []
        if not strays:
            return
        names = ", ".join(f"{pid} ({_command_name(pid)})" for pid in strays)
        stop_processes(strays)
        self.events.write([event("start", f"router:{doc.router.name}", "stopped-orphans",
                                 f"processes of this router that no supervisord ran: {names}")])  # fmt: skip

    def reconcile(self) -> Result | None:
        """After a release switch: re-render the stored document with this release's code and
        templates, and reload (hitlessly, as each service does) only the services whose files
        came out different. The usual transaction: checked, health-gated, rolled back."""
        return self._reapply_stored(rerender=True)

    def _reapply_stored(self, force: bool = False, rerender: bool = False) -> Result | None:
        started = time.perf_counter()
        with self.lock(), _collector_paused():
            self._recover_locked()
            stored = self.stored_document()
            if stored is None:
                return None
            if force:
                self._stop_strays(stored)
            return self._transaction(stored, stored, started, {}, payload=None, force=force, rerender=rerender)

    def selftest(self) -> dict[str, list[str]]:
        """A release's test against the live document before it is switched in: every service
        rendered, the changed ones staged and passed through their daemon's checker. Nothing
        live is touched. Returns each changed service's changed files."""
        stored = self.stored_document()
        if stored is None:
            return {}
        changes = [c for c in self.plan(stored, stored, rerender=True) if c.paths]
        staging = self.settings.config_dir / STAGING / f"selftest-{uuid.uuid4().hex[:12]}"
        try:
            self._stage_and_check(changes, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {c.service: sorted(c.paths) for c in changes}

    def render(self, raw: object, out_dir: Path) -> dict[str, list[str]]:
        """Dry run: every service's files for the merged document, written under out_dir."""
        doc = self.validate(raw, self.stored_document())
        written: dict[str, list[str]] = {}
        for service in SERVICES:
            files = service.generate(doc, self.runtime)
            for relpath, content in files.items():
                write_atomic(out_dir / service.name / relpath, content, mode=mode_for(relpath), sync=False)
            written[service.name] = sorted(files)
        return written

    def preview(self, raw: object, next_generation: bool = False) -> tuple[RouterDocument, list[str], list[dict]]:
        """What a payload would do, nothing touched: (merged document, warnings, one item per
        changed file: service, path, and its unified diff - or None for a secret file, whose
        content is never shown)."""
        import difflib

        from vr.foundation.files import is_secret

        stored, unreadable = self._stored_or_unreadable()
        _, doc, warnings = self._validated(Push(raw, next_generation).filled(stored, unreadable), stored, unreadable)
        files = []
        for change in self.plan(doc, stored):
            for relpath in change.paths:
                item = {"service": change.service, "path": relpath, "removed": relpath in change.removed, "diff": None}
                if not is_secret(relpath):
                    before = (change.previous.get(relpath) or b"").decode().splitlines(keepends=True)
                    after = change.written.get(relpath, b"").decode().splitlines(keepends=True)
                    name = f"{change.service}/{relpath}"
                    item["diff"] = "".join(difflib.unified_diff(before, after, f"live/{name}", f"new/{name}"))
                files.append(item)
        return doc, [str(w) for w in warnings], files

    def plan(
        self, doc: RouterDocument, old: RouterDocument | None, force: bool = False, rerender: bool = False
    ) -> list[Change]:
        """force: every service gets a change, even with no file changed (start at boot).
        rerender: every service is rendered, even if its inputs did not change (a new release)."""
        changes = []
        for service in SERVICES:
            inputs = service.read(doc)
            if not (force or rerender) and old is not None and inputs is not None and inputs == service.read(old):
                continue
            files = service.generate(doc, self.runtime)
            live_dir = self.settings.service_dir(service.name)
            change = Change(service.name, generated=files)
            live_prefix = f"{live_dir}/"  # a string join: pathlib costs more than the read
            for relpath, content in files.items():
                current = self.live.read(live_prefix + relpath)
                if current != content:
                    change.written[relpath] = content
                    change.previous[relpath] = current
            for relpath in listed_files(live_dir):
                if relpath not in files:
                    change.removed.append(relpath)
                    change.previous[relpath] = (live_dir / relpath).read_bytes()
            if change.paths or force:
                changes.append(change)
        return changes

    # ---------------------------------------------------------------- the transaction
    def _transaction(
        self,
        doc: RouterDocument,
        old: RouterDocument | None,
        started: float,
        timings: dict,
        payload: Sequence[docmod.Payload] | None,
        force: bool = False,
        warnings: Sequence[Problem] = (),
        rerender: bool = False,
    ) -> Result:
        mark = time.perf_counter()
        changes = self.plan(doc, old, force=force, rerender=rerender)
        timings["render"] = _ms(mark)
        txid = uuid.uuid4().hex[:12]
        staging = self.settings.config_dir / STAGING / txid
        backup = self.settings.config_dir / BACKUP / txid
        resource = f"router:{doc.router.name}"
        try:
            mark = time.perf_counter()
            self._stage_and_check(changes, staging)
            timings["check"] = _ms(mark)
            fault_point("checked")
            mark = time.perf_counter()
            self._backup(changes, backup)
            write_json_atomic(
                self.settings.journal_path,
                {"txid": txid, "generation": doc.generation, "changes": {c.service: c.paths for c in changes}},
                sync=False,
            )
        except BaseException as error:
            # Nothing live was touched yet: staging, backup links and a torn journal go.
            for area in (staging, backup):
                shutil.rmtree(area, ignore_errors=True)
            self.settings.journal_path.unlink(missing_ok=True)
            if isinstance(error, OSError):
                error = _os_failure("stage", error)
            self._fail(doc, resource, error, started, rolled_back=False)
            raise error from None
        fault_point("journaled")
        step, current = "switch", ""
        service_ms: dict[str, float] = {}  # each service's apply step (its daemon's reload)
        try:
            self._switch(changes, staging)
            timings["switch"] = _ms(mark)
            fault_point("switched")
            step = "apply"
            mark = time.perf_counter()
            for change in changes:
                current, applying = change.service, time.perf_counter()
                by_name(current).apply(change, doc, self.runtime)
                service_ms[current] = _ms(applying)
            current = ""
            self._start_stopped(doc, {c.service for c in changes})
            timings["reload"] = _ms(mark)
            fault_point("applied")
            step, current = "health", ""
            mark = time.perf_counter()
            failure = self._health(doc, {c.service for c in changes}, everything=force or rerender)
            timings["health"] = _ms(mark)
            if failure:
                current, reason = failure
                raise ApplyFailed("health", current, reason)
            step, current = "commit", "router"
            fault_point("commit")
            if doc is not old:  # at start the stored document is re-applied: already there
                self.store.commit(doc, payload)
        except BaseException as error:
            self._rollback(changes, old, txid)
            if not isinstance(error, Exception):  # Ctrl-C, SIGTERM: rolled back, reported as what it was
                self._fail(doc, resource, error, started, rolled_back=True)
                raise
            if isinstance(error, OSError):
                error = _os_failure(step, error, current or "router")
            elif not isinstance(error, ApplyFailed):
                error = ApplyFailed(step, current or "router", f"{type(error).__name__}: {error}")
            self._fail(doc, resource, error, started, rolled_back=True)
            raise error from None
        fault_point("committed")
        self._finish(txid, changes)
        changed = [c.service for c in changes if c.paths]
        result = Result(doc.generation, changed, _ms(started), timings, service_ms=service_ms)
        self.events.write(
            [event("apply", resource, "ok", f"services changed: {', '.join(changed) or 'none'}", doc.generation)]
            + [event("service", f"service:{name}", "applied", "", doc.generation) for name in changed]
            + _vm_events(doc, old)
            + [event("warning", resource, "warning", str(w), doc.generation) for w in warnings]
        )
        self._record(doc.generation, "ok", "", started, changed, timings)
        result.warnings = [str(w) for w in warnings]
        return result

    def _stage_and_check(self, changes: list[Change], staging: Path) -> None:
        self._stage(changes, staging)
        fault_point("staged")
        for change in changes:
            try:
                by_name(change.service).check(staging / change.service, change, self.runtime)
            except CheckFailed as error:
                raise ApplyFailed("check", change.service, str(error)) from None

    def _stage(self, changes: list[Change], staging: Path) -> None:
        """Stage each changed service's whole file set, so its checker sees a complete config.
        Only the changed files are written (only they will be switched in); the unchanged
        ones are hard links to the live files, which plan found identical, and only for a
        checker that reads them."""
        for change in changes:
            live_dir, staged_dir = self.settings.service_dir(change.service), staging / change.service
            staged_dir.mkdir(parents=True, exist_ok=True)
            made = {staged_dir}
            link_unchanged = by_name(change.service).checker_reads_unchanged
            for relpath, content in change.generated.items():
                written = relpath in change.written
                if not written and not link_unchanged:
                    continue
                target = staged_dir / relpath
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                if not written:
                    try:
                        os.link(live_dir / relpath, target)
                        continue
                    except OSError:
                        pass  # gone meanwhile, or another filesystem: write it
                write_new(target, content, mode=mode_for(relpath))

    def _backup(self, changes: list[Change], backup: Path) -> None:
        """Hard links keep the old inodes alive for the price of a directory entry."""
        for change in changes:
            live_dir = self.settings.service_dir(change.service)
            for relpath in change.paths:
                if change.previous.get(relpath) is not None:
                    target = backup / change.service / relpath
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(live_dir / relpath, target)

    def _switch(self, changes: list[Change], staging: Path) -> None:
        for change in changes:
            live_dir = self.settings.service_dir(change.service)
            live_dir.mkdir(parents=True, exist_ok=True)
            directories = {live_dir}
            for relpath in change.written:
                target = live_dir / relpath
                if target.parent not in directories:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    directories.add(target.parent)
                os.replace(staging / change.service / relpath, target)
                self.live.remember(f"{live_dir}/{relpath}", change.written[relpath])
                fault_point("switching")
            for relpath in change.removed:
                (live_dir / relpath).unlink(missing_ok=True)

    def _start_stopped(self, doc: RouterDocument, applied: set[str]) -> None:
        """The router runs what the document says: a daemon of an unchanged service that is
        down (died while its monitoring was off, or stopped by hand) is started again."""
        wanted = [p.name for s in SERVICES if s.name not in applied for p in s.programs(doc, self.runtime)]
        if not wanted or not self.runtime.supervisor.is_running():
            return
        states = self.runtime.supervisor.states(wanted)
        for name in wanted:
            if states.get(name) in ("STOPPED", "EXITED", "FATAL", "BACKOFF"):
                self.runtime.supervisor.start(name)

    def _health(self, doc: RouterDocument, changed: set[str], everything: bool = False) -> tuple[str, str] | None:
        """The services this transaction changed must come out healthy; the rest were before it
        and the monitor watches them. A network change (addresses, routes: what every daemon
        stands on), a start or a new release's re-render gates on every service."""
        deadline = time.monotonic() + HEALTH_DEADLINE_S
        everything = everything or "network" in changed
        for service in SERVICES:
            if not everything and service.name not in changed:
                continue
            while (reason := service.probe(doc, self.runtime)) is not None:
                if time.monotonic() > deadline:
                    return service.name, reason
                time.sleep(0.01)
        return None

    def _rollback(self, changes: list[Change], old: RouterDocument | None, txid: str) -> None:
        """Put back every file the transaction touched, then re-apply those services."""
        reverse = []
        for change in changes:
            live_dir = self.settings.service_dir(change.service)
            undo = Change(change.service, restore=True)
            for relpath in change.paths:
                previous = change.previous.get(relpath)
                now = read_bytes_or_none(live_dir / relpath)
                undo.previous[relpath] = now
                if previous is None:
                    (live_dir / relpath).unlink(missing_ok=True)
                    undo.removed.append(relpath)
                else:
                    write_atomic(live_dir / relpath, previous, mode=mode_for(relpath))
                    undo.written[relpath] = previous
            # The whole restored file set, not only what was put back: a service's apply makes
            # its daemon match desired(), and a file this change left alone (a forced start
            # changes none) must read as kept, never as removed (routes, the nft table).
            undo.generated = {p: (live_dir / p).read_bytes() for p in listed_files(live_dir)}
            reverse.append(undo)
        for undo in reverse:  # with old None (first apply), each service removes what it made
            service = by_name(undo.service)
            if old is not None and service.programs(old, self.runtime) and not self.runtime.supervisor.is_running():
                continue  # its daemons run under supervisord, which is down (a boot): they start from these files
            service.apply(undo, old, self.runtime)
        self._finish(txid)

    def _finish(self, txid: str, committed: list[Change] | None = None) -> None:
        """The journal goes before the backups: a journal that outlived its backups would
        restore nothing. committed: the changes of a transaction that committed, whose
        staging and backup files are known and removed one by one (a tree walk costs ~2 ms)."""
        self.settings.journal_path.unlink(missing_ok=True)
        for area, made in ((STAGING, self._staged_paths), (BACKUP, _backed_up_paths)):
            root = self.settings.config_dir / area / txid
            if committed is None or not _removed(root, committed, made):
                shutil.rmtree(root, ignore_errors=True)

    def compact_store(self) -> None:
        """The stored document's log folded in, if it is due and no transaction runs (the
        daemon, once no push waits); see vr.transaction.store."""
        try:
            with self.lock():
                self.store.compact_if_due()
        except (Busy, StoredDocumentUnreadable, OSError):
            pass  # a transaction runs, the disk is full (the log stays, and is read), nothing to fold into

    def _tidy_locked(self) -> None:
        """What a transaction cut off left in the staging and backup areas (no journal names it)."""
        for area in (STAGING, BACKUP):
            try:
                os.rmdir(self.settings.config_dir / area)  # empty, as a committed transaction leaves it
            except FileNotFoundError:
                pass
            except OSError:
                shutil.rmtree(self.settings.config_dir / area, ignore_errors=True)

    def _staged_paths(self, change: Change) -> list[str]:
        return list(change.generated if by_name(change.service).checker_reads_unchanged else change.written)

    # ---------------------------------------------------------------- crash recovery
    def _recover_locked(self) -> bool:
        """An apply killed half-way is rolled back to last-known-good, never left mixed."""
        if not self.settings.journal_path.exists():
            self._tidy_locked()
            return False
        journal = _read_journal(self.settings.journal_path)
        if journal is None:
            return self._recover_without_journal()
        txid = journal["txid"]
        stored = self.stored_document()
        resource = f"router:{stored.router.name}" if stored else "router:unknown"
        if stored is not None and stored.generation == journal["generation"]:
            self._finish(txid)  # killed after commit: only the clean-up was missing
            self.events.write([event("recover", resource, "committed", f"transaction {txid} had committed")])
            return True
        backup = self.settings.config_dir / BACKUP / txid
        changes = []
        for service, paths in journal["changes"].items():
            change = Change(service)
            for relpath in paths:
                change.written[relpath] = b""
                change.previous[relpath] = read_bytes_or_none(backup / service / relpath)
            changes.append(change)
        self._rollback(changes, stored, txid)
        self.events.write(
            [
                event(
                    "recover",
                    resource,
                    "rolled-back",
                    f"transaction {txid} for generation "
                    f"{journal['generation']} was interrupted; restored last-known-good",
                )
            ]
        )
        return True

    def _recover_without_journal(self) -> bool:
        """A journal that does not read (damaged, tampered): what it named is unknown, so every
        service is re-rendered from last-known-good and whatever differs is put back and
        reloaded, as after a release switch. The unreadable journal is kept aside for a look."""
        aside = self.settings.journal_path.with_name(f"journal.unreadable.{int(time.time())}.json")
        os.replace(self.settings.journal_path, aside)
        for area in (STAGING, BACKUP):
            shutil.rmtree(self.settings.config_dir / area, ignore_errors=True)
        stored = self.stored_document()
        resource = f"router:{stored.router.name}" if stored else "router:unknown"
        self.events.write([event("recover", resource, "unreadable-journal",
                                 f"the journal did not read (kept as {aside.name}); re-applying last-known-good")])  # fmt: skip
        if stored is not None:
            self._transaction(stored, stored, time.perf_counter(), {}, payload=None, rerender=True)
        return True

    # ---------------------------------------------------------------- bookkeeping
    @contextlib.contextmanager
    def lock(self, wait: bool = False) -> Iterator[None]:
        with router_lock(self.settings, wait):
            yield

    def _fail(
        self, doc: RouterDocument, resource: str, error: BaseException, started: float, rolled_back: bool
    ) -> None:
        outcome = "rolled-back" if rolled_back else "failed"
        self.events.write([event("apply", resource, outcome, str(error), doc.generation)])
        self._record(doc.generation, outcome, str(error), started, [])

    def _record(self, generation, outcome, message, started, changed, timings=None) -> None:
        """A report, not state: atomic, but not worth an fsync on the hot path, and lost
        (not fatal) when the disk is full."""
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.settings.last_apply_path,
                {
                    "time": time.time(),
                    "generation": generation,
                    "outcome": outcome,
                    "message": message[:MAX_MESSAGE],
                    "duration_ms": _ms(started),
                    "changed": changed,
                    "timings_ms": timings or {},
                },
                sync=False,
            )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """An apply allocates a whole document's models at once and keeps them: the cyclic
    collector would walk them several times over (~25 ms for 10,000 rules) and free nothing.
    Reference counting still frees everything dropped meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_journal(path: Path) -> dict | None:
    """The journal as the transaction wrote it, or None: anything else (garbage, a torn or
    tampered file, a service vr does not have, a path that leaves its service's directory)."""
    try:
        journal = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or not isinstance(journal.get("txid"), str) or not journal["txid"].isalnum():
        return None
    changes = journal.get("changes")
    if not isinstance(journal.get("generation"), int) or not isinstance(changes, dict):
        return None
    names = {service.name for service in SERVICES}
    for service, paths in changes.items():
        if service not in names or not isinstance(paths, list):
            return None
        for relpath in paths:
            parts = relpath.split("/") if isinstance(relpath, str) else [".."]
            if relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
                return None
    return journal


def _os_failure(step: str, error: OSError, service: str = "router") -> ApplyFailed:
    return ApplyFailed(step, service, os_error_reason(error))


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


def _backed_up_paths(change: Change) -> list[str]:
    return [relpath for relpath in change.paths if change.previous.get(relpath) is not None]


def _removed(root: Path, changes: list[Change], paths_of) -> bool:
    """A transaction's own directory under root, made of each change's paths_of(change)
    (relative to root/service) and their directories: those files unlinked, the directories
    removed deepest first. False when something else is there (rmtree it then)."""
    directories = {root}
    try:
        for change in changes:
            base = root / change.service
            directories.add(base)
            for relpath in paths_of(change):
                with contextlib.suppress(FileNotFoundError):  # a staged file was renamed in
                    os.unlink(base / relpath)
                directories.update(base / parent for parent in Path(relpath).parents if parent != Path("."))
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            if os.path.lexists(directory):
                os.rmdir(directory)
    except OSError:
        return False
    return True


_mac = operator.attrgetter("mac")


def _vm_events(doc: RouterDocument, old: RouterDocument | None) -> list[dict]:
    """One event per VM whose DHCP entry was added, changed or removed."""
    if old is not None and old.dhcp.entries is doc.dhcp.entries:
        return []
    # Entries are immutable and reused across merges: only objects not in both lists changed.
    # The set operations run in C: a Python loop over 4,000 entries cost 3 ms a change.
    old_entries = old.dhcp.entries if old else []
    old_by_id, new_by_id = dict(zip(map(id, old_entries), old_entries)), dict(zip(map(id, doc.dhcp.entries), doc.dhcp.entries))
    before = {e.mac: e for e in sorted(map(old_by_id.__getitem__, old_by_id.keys() - new_by_id.keys()), key=_mac)}
    after = {e.mac: e for e in sorted(map(new_by_id.__getitem__, new_by_id.keys() - old_by_id.keys()), key=_mac)}
    out = []
    for mac, entry in after.items():
        if mac not in before:
            out.append(event("dhcp", f"vm:{mac}", "added", f"{entry.ip} {entry.hostname}", doc.generation))
        elif before[mac] != entry:
            out.append(event("dhcp", f"vm:{mac}", "changed", f"{entry.ip} {entry.hostname}", doc.generation))
    for mac, entry in before.items():
        if mac not in after:
            out.append(event("dhcp", f"vm:{mac}", "removed", f"{entry.ip} {entry.hostname}", doc.generation))
    return out


__all__ = ["Pipeline", "Problem", "Push", "Result"]
