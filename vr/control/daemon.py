"""`vr daemon`: the router's one resident vr process, run by supervisord as its event listener.

It holds the pipeline warm (the stored document parsed once, the render and verify memos, the
supervisord client) and every way in goes through it:
- the local API on a unix socket (0600) that `vr apply`, `vr status`, `vr events`, `vr diff` use;
- the HTTPS agent on the control interface's addresses (vr/control/agent.py), when the
  document serves one;
- the spool directory, watched with watchdog's inotify observer;
- the monitor (vr/control/monitor.py), a thread reading supervisord's events on stdin.

The pipeline runs in one worker thread. Pushes are queued; those that arrive while an apply
runs go through together as one transaction (Pipeline.apply_batch), each answered on its own.
Other work (dry runs, spool files, a commit-confirm's rollback) takes its turn in the same
queue, so nothing applies beside anything else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vr.foundation.errors import ApplyFailed, Busy, InvalidPayload, StalePayload, VrError
from vr.foundation.events import EventLog, event, timestamp
from vr.foundation.files import read_json, write_json_atomic
from vr.foundation.settings import Settings
from vr.foundation.version import running_version
from vr.services.dnsmasq import lease_count
from vr.transaction.pipeline import Pipeline, Push, Result

MAX_BATCH = 1000  # pushes one transaction carries at most
LOCK_WAIT_S = 600.0  # a push waits this long for another process's apply or patch to end
IDLE_WORK_S = 1.0  # the worker does its own work (the store's compaction) after this long without a push
DRAIN_S = 8.0  # on SIGTERM, queued work still answered within this (supervisord kills at 10 s)
MONITOR_STALE_S = 10.0  # /healthz says not-ok when the monitor thread has not looped for this long


class ConfirmPending(VrError):
    exit_code = 75


class Restarting(VrError):
    """The daemon stops (SIGTERM, a patch's restart) before this push's turn came."""

    exit_code = 75
    http_status = 503


@dataclass
class Job:
    """One turn of the worker: a push (batched with its neighbours) or any other call."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    push: Push | None = None
    confirm_s: float | None = None
    call: Callable[[], Any] | None = None

    def answer(self, value: Any) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(settle)


@dataclass
class Confirm:
    """A commit-confirm in force: unless confirmed by the deadline, back to `document`."""

    generation: int
    rollback_to: int
    deadline: float
    document: dict = field(repr=False)


class Worker(threading.Thread):
    def __init__(self, daemon: Daemon) -> None:
        super().__init__(name="vr-pipeline", daemon=True)
        self.owner = daemon
        self.jobs: collections.deque[Job] = collections.deque()
        self.ready = threading.Condition()
        self.stopping = False
        self.busy = False
        self.transactions = 0  # batches that reached the pipeline (pushes / transactions: the coalescing)

    def submit(self, job: Job) -> None:
        with self.ready:
            self.jobs.append(job)
            self.ready.notify()

    def idle(self) -> bool:
        with self.ready:
            return not self.jobs and not self.busy

    def stop(self) -> None:
        with self.ready:
            self.stopping = True
            self.ready.notify()

    def run(self) -> None:
        compaction_due = False  # pushes were applied since the worker was last idle
        while True:
            with self.ready:
                while not self.jobs and not self.stopping:
                    if not self.ready.wait(IDLE_WORK_S if compaction_due else None):
                        break  # no push for a while: the store's compaction, which nobody waits for
                if self.stopping and not self.jobs:
                    return
                batch = self._next_batch()
                if batch and batch[0].push is not None:
                    compaction_due = True
                self.busy = True
            try:
                if not batch:
                    self.owner.pipeline.compact_store()
                    compaction_due = False
                elif batch[0].push is not None:
                    self._pushes(batch)
                else:
                    self._call(batch[0])
            finally:
                with self.ready:
                    self.busy = False

    def _next_batch(self) -> list[Job]:
        """The next job, or the pushes queued one after another (coalesced); [] when idle."""
        if not self.jobs:
            return []
        batch = [self.jobs.popleft()]
        while batch[0].push is not None and self.jobs and self.jobs[0].push is not None and len(batch) < MAX_BATCH:
            batch.append(self.jobs.popleft())
        return batch

    def _call(self, job: Job) -> None:
        try:
            job.answer(job.call())
        except Exception as error:  # noqa: BLE001 - the caller gets it, the worker goes on
            job.answer(error)

    def _apply_when_free(self, batch: list[Job]) -> list:
        """Another process holding the router's lock (a live patch, a fallback `vr apply`, a
        recovery) makes the pushes wait, not fail: they are queued, as every other push is,
        for up to LOCK_WAIT_S; if this daemon is replaced meanwhile (a patch restarts it) they
        are answered 503, so that the client asks the next one."""
        pipeline, deadline = self.owner.pipeline, time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return pipeline.apply_batch([job.push for job in batch], wait=False)
            except Busy:
                if time.monotonic() > deadline:
                    raise
            if self.owner.stopping_requested:
                raise Restarting("the router's vr daemon is being replaced (a live patch): send it again")
            time.sleep(0.02)

    def _pushes(self, batch: list[Job]) -> None:
        before = None  # what a commit-confirm would go back to
        if any(job.confirm_s is not None for job in batch):
            with contextlib.suppress(VrError):
                before = self.owner.pipeline.stored_document()
        try:
            outcomes = self._apply_when_free(batch)
        except Exception as error:  # noqa: BLE001 - the lock, the disk: every caller hears it
            outcomes = [error] * len(batch)
        self.transactions += 1
        if any(isinstance(o, Result) and "agent" in o.changed for o in outcomes):
            self.owner.serve_agent_now()  # the answer comes once the new token, port or certificate is served
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Result):
                self.owner.after_apply(outcome, job.confirm_s, before)
            self.owner.count_outcome(outcome)
            job.answer(outcome)
        release_free_memory()  # after the answers: no caller waits for it


class Daemon:
    def __init__(self, settings: Settings, supervised: bool = True) -> None:
        self.settings = settings
        self.pipeline = Pipeline(settings)
        self.events = EventLog(settings.events_path)
        self.worker = Worker(self)
        self.started_at = time.time()
        self.supervised = supervised
        self.monitor = None
        self.monitor_thread: threading.Thread | None = None
        self.stopping: asyncio.Event | None = None
        self.stopping_requested = False  # read by the worker thread
        self.loop: asyncio.AbstractEventLoop | None = None
        self.confirm_lock = threading.Lock()
        self.confirm: Confirm | None = self._load_confirm()
        self.confirm_task: asyncio.Task | None = None
        self.agent = None  # vr.control.agent.AgentServer
        self.guest = None  # vr.control.guestdata.GuestDataServer
        self.metrics = None
        self.pushes = 0
        self._collecting: dict[tuple, asyncio.Future] = {}  # status reports being collected, by parts

    # ------------------------------------------------------------ the process
    async def run(self) -> None:
        from vr.control.agent import AgentServer
        from vr.control.guestdata import GuestDataServer
        from vr.control.metrics import RouterMetrics
        from vr.services.guestdata import HOOK as GUEST_DATA_HOOK
        from vr.services.guestdata import LISTENING_HOOK as GUEST_DATA_LISTENING

        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._stop_requested)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_servers()))
        self.metrics = RouterMetrics(self.settings, pipeline=self.pipeline)
        self.worker.start()
        if self.settings.journal_path.exists():  # the daemon before this one was killed mid-apply
            asyncio.ensure_future(self.recover_first())
        self._start_monitor()
        self.agent = AgentServer(self)
        self.guest = GuestDataServer(self, self.agent)
        self.pipeline.runtime.hooks[GUEST_DATA_HOOK] = self.serve_guest_data_now
        self.pipeline.runtime.hooks[GUEST_DATA_LISTENING] = self.guest.not_listening
        await self.agent.start_local()
        await self._reload_servers()
        self.agent.release_held()
        observer = self._watch_spool()
        self._arm_confirm()
        self.events.write([event("daemon", "service:daemon", "started", f"pid {os.getpid()}, release "
                                 f"{running_version()}")])  # fmt: skip
        try:
            await self.stopping.wait()
        finally:
            await self._shutdown(observer)

    async def _reload_servers(self) -> None:
        """What the services' files say now (SIGHUP: an apply made outside the daemon)."""
        await self.guest.reload()
        await self.agent.reload()

    def _stop_requested(self) -> None:
        self.stopping_requested = True
        self.stopping.set()

    async def _shutdown(self, observer: Any) -> None:
        """Queued pushes are answered before the daemon goes (a patch restarts it). It stops
        accepting first: connections that come meanwhile wait in the backlog of the sockets
        the keeper holds, for the next daemon; the keeper's watchdog leaves a stopping one be."""
        from vr.control import keeper

        deadline = time.monotonic() + DRAIN_S
        await asyncio.get_running_loop().run_in_executor(None, keeper.leaving, self.settings)
        await self.agent.stop()  # in-flight requests end as the worker answers them
        await self.guest.stop()
        while not self.worker.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if observer is not None:
            observer.stop()
        self.worker.stop()
        if self.monitor is not None:
            self.monitor.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.monitor_thread.join, 5.0)

    def _start_monitor(self) -> None:
        """Supervisord's events arrive on stdin: only under supervisord is there a monitor."""
        if not self.supervised:
            return
        from vr.control.monitor import Monitor
        from vr.services.supervisor_rpc import ObservedStates

        observed = ObservedStates()  # the pipeline's health gate and restarts read supervisord's events
        self.pipeline.runtime.supervisor.observed = observed
        self.monitor = Monitor(self.settings, observed=observed, repairs={"guestdata": self._repair_guest_data})
        self.monitor_thread = threading.Thread(target=self._run_monitor, name="vr-monitor", daemon=True)
        self.monitor_thread.start()

    def _run_monitor(self) -> None:
        try:
            self.monitor.run()
        finally:  # supervisord went away (stdin closed): the daemon goes with it
            if self.loop is not None and self.stopping is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.stopping.set)

    def healthy(self) -> str | None:
        """None when the daemon does its job; otherwise why not (what /healthz answers)."""
        if not self.worker.is_alive():
            return "the pipeline worker is not running"
        if self.monitor is not None:
            if not self.monitor_thread.is_alive():
                return "the monitor thread is not running"
            beat = getattr(self.monitor, "heartbeat", None)
            if beat is not None and time.monotonic() - beat > MONITOR_STALE_S:
                return f"the monitor has not checked for {time.monotonic() - beat:.0f} s"
        return None

    # ------------------------------------------------------------ the ways in
    async def push(self, raw: object, next_generation: bool = False, confirm_s: float | None = None) -> Result:
        if confirm_s is not None and not self.pipeline.store.path.exists():
            raise ConfirmPending("confirm_s needs an applied document to return to: the first push cannot be "
                                 "confirmed")  # fmt: skip
        future = self.loop.create_future()
        self.pushes += 1
        self.worker.submit(Job(future, self.loop, push=Push(raw, next_generation), confirm_s=confirm_s))
        return await future

    async def call(self, function: Callable[[], Any]) -> Any:
        """Anything that must not run beside an apply (a dry run, a spool file): the worker's turn."""
        future = self.loop.create_future()
        self.worker.submit(Job(future, self.loop, call=function))
        return await future

    async def status(self, firewall: bool = True, lb: bool = True, vpn: bool = True, usage: bool = True) -> dict:
        """The report a manager polls: `vr status --json` and the daemon's own figures, collected
        beside the worker (it only reads). Never cached (counters move with every packet);
        polls that arrive while one is collected share it, so a polling storm costs one."""
        await self.recover_first()
        key = (firewall, lb, vpn, usage)
        running = self._collecting.get(key)
        if running is None:
            running = asyncio.get_running_loop().run_in_executor(None, self._collect, *key)
            self._collecting[key] = running
            running.add_done_callback(lambda _: self._collecting.pop(key, None))
        return await asyncio.shield(running)

    def serve_agent_now(self) -> None:
        """From the worker: the agent serves what the transaction wrote before the push is
        answered (the service's SIGHUP does it for an apply made outside the daemon)."""
        if self.agent is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.agent.reload(), self.loop).result(timeout=30)

    def serve_guest_data_now(self, paths: list[str] | None) -> None:
        """From the worker, in the guest data service's apply: the next request is answered
        from what this transaction wrote (paths: the files it changed; None: read them all)."""
        if self.guest is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.guest.reload(paths), self.loop).result(timeout=30)

    def _repair_guest_data(self) -> str | None:
        """From the monitor thread: guest data that does not answer is listened for anew."""
        try:
            asyncio.run_coroutine_threadsafe(self.guest.rebind(), self.loop).result(timeout=30)
        except Exception as error:  # noqa: BLE001 - the monitor records it and tries again later
            return f"{type(error).__name__}: {error}"
        return None

    def _collect(self, firewall: bool, lb: bool, vpn: bool, usage: bool) -> dict:
        from vr.control.status import collect

        report = collect(self.settings, firewall=firewall, lb=lb, vpn=vpn, pipeline=self.pipeline, usage=usage)
        report["daemon"] = {"pid": os.getpid(), "release": running_version(), "uptime_s": round(time.time() - self.started_at, 1),
                            "pushes": self.pushes, "transactions": self.worker.transactions,
                            "confirm_pending": self.confirm_report()}  # fmt: skip
        report["system"] = system_report(self.settings)
        report["dhcp_leases"] = lease_count(self.settings)
        report["vpn_sas"] = sum(1 for c in report.get("vpn") or [] if c.get("state") == "ESTABLISHED")
        report["lb_members_up"] = sum(1 for m in report.get("lb") or [] if str(m.get("state", "")).startswith("UP"))
        return report

    async def recover_first(self) -> None:
        """As every command that reads state: an apply a crash interrupted (a fallback `vr apply`
        killed) is rolled back before it is reported on; one still running is left to finish."""
        if not self.settings.journal_path.exists():
            return
        try:
            await self.call(self.pipeline.recover)
        except Busy:
            pass

    def read_events(self, resource: str | None, since: float | None, limit: int) -> list[dict]:
        start = None if since is None else timestamp(since)  # one format, to the millisecond: sorts as time
        found: collections.deque = collections.deque(maxlen=limit)
        for item in self.events.read(resource):
            if start is None or str(item.get("time", "")) >= start:
                found.append(item)
        return list(found)

    def _watch_spool(self) -> Any:
        """Files dropped in the spool are applied in the worker's turn, each on its own (a file
        is an operator's one change, with its own done/ or failed/). A file is taken once its
        writer is done with it: renamed in (the documented way) or closed after writing; never
        when it is merely created, half written."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        from vr.control.spool import Spool

        spool = Spool(self.pipeline)
        ready: set[str] = {path.name for path in spool.pending()}  # what landed while no daemon ran
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, change: Any) -> None:
                if change.event_type == "moved":
                    name = os.path.basename(change.dest_path)
                elif change.event_type == "closed":
                    name = os.path.basename(change.src_path)
                else:
                    return
                daemon.loop.call_soon_threadsafe(daemon._spool_ready, spool, ready, name)

        observer = Observer()
        observer.schedule(Handler(), str(spool.incoming), recursive=False)
        observer.start()
        if ready:
            self._drain_spool(spool, ready)
        return observer

    def _spool_ready(self, spool: Any, ready: set[str], name: str) -> None:
        ready.add(name)
        self._drain_spool(spool, ready)

    def _drain_spool(self, spool: Any, ready: set[str]) -> None:
        if getattr(spool, "queued", False):
            return  # one drain waits for its turn already: it takes every ready file there is

        def drain() -> int:
            spool.queued = False
            names = set(ready)
            ready.difference_update(names)
            return spool.drain(only=names)

        spool.queued = True
        asyncio.ensure_future(self.call(drain))

    # ------------------------------------------------------------ commit-confirm
    def after_apply(self, result: Result, confirm_s: float | None, before: Any) -> None:
        """In the worker, after a push applied: a confirm_s push arms (or extends) the
        rollback to the document from before it."""
        if confirm_s is None or before is None:
            return
        with self.confirm_lock:
            if self.confirm is None:
                self.confirm = Confirm(result.generation, before.generation, time.time() + confirm_s,
                                       before.model_dump(mode="json"))  # fmt: skip
            else:
                self.confirm.generation = result.generation
                self.confirm.deadline = time.time() + confirm_s
            self._save_confirm()
        self.loop.call_soon_threadsafe(self._arm_confirm)

    def confirm_report(self) -> dict | None:
        confirm = self.confirm
        if confirm is None:
            return None
        return {"generation": confirm.generation, "rollback_to": confirm.rollback_to, "deadline": confirm.deadline}

    def confirmed(self) -> int:
        with self.confirm_lock:
            if self.confirm is None:
                raise ConfirmPending("no commit-confirm is pending")
            generation = self.confirm.generation
            self.confirm = None
            self.settings.confirm_path.unlink(missing_ok=True)
        if self.confirm_task is not None:
            self.confirm_task.cancel()
        self.events.write([event("confirm", self._resource(), "confirmed", f"generation {generation} confirmed",
                                 generation)])  # fmt: skip
        return generation

    def _arm_confirm(self) -> None:
        if self.confirm_task is not None:
            self.confirm_task.cancel()
        self.confirm_task = asyncio.ensure_future(self._roll_back_unconfirmed()) if self.confirm else None

    async def _roll_back_unconfirmed(self) -> None:
        while self.confirm is not None and time.time() < self.confirm.deadline:
            await asyncio.sleep(min(1.0, max(0.0, self.confirm.deadline - time.time())))
        with self.confirm_lock:
            confirm, self.confirm = self.confirm, None
            self.settings.confirm_path.unlink(missing_ok=True)
        if confirm is None:
            return
        document = {k: v for k, v in confirm.document.items() if k != "generation"}
        self.events.write([event("confirm", self._resource(), "expired", f"generation {confirm.generation} was not "
                                 f"confirmed in time: rolling back to the document of generation "
                                 f"{confirm.rollback_to}", confirm.generation)])  # fmt: skip
        try:
            result = await self.push(document, next_generation=True)
        except VrError as error:
            self.events.write([event("confirm", self._resource(), "rollback-failed", str(error))])
            return
        self.events.write([event("confirm", self._resource(), "rolled-back", f"the document of generation "
                                 f"{confirm.rollback_to} is live again as generation {result.generation}",
                                 result.generation)])  # fmt: skip

    def _load_confirm(self) -> Confirm | None:
        try:
            data = read_json(self.settings.confirm_path)
            return Confirm(int(data["generation"]), int(data["rollback_to"]), float(data["deadline"]),
                           dict(data["document"])) if data else None  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: no rollback armed, and the event log says nothing happened

    def _save_confirm(self) -> None:
        confirm = self.confirm
        write_json_atomic(self.settings.confirm_path, {"generation": confirm.generation, "rollback_to":
                          confirm.rollback_to, "deadline": confirm.deadline, "document": confirm.document},
                          mode=0o600)  # fmt: skip

    def _resource(self) -> str:
        try:
            doc = self.pipeline.stored_document()
        except VrError:
            doc = None
        return f"router:{doc.router.name if doc else 'unknown'}"

    # ------------------------------------------------------------ figures
    def count_outcome(self, outcome: Any) -> None:
        if self.metrics is None:
            return
        if isinstance(outcome, Result):
            self.metrics.observe_apply("applied", outcome.timings_ms, outcome.duration_ms, outcome.service_ms)
        elif isinstance(outcome, StalePayload):
            self.metrics.observe_apply("stale", {})
        elif isinstance(outcome, InvalidPayload):
            self.metrics.observe_apply("rejected", {})
        elif isinstance(outcome, ApplyFailed):
            self.metrics.observe_apply("rolled-back", {})
        else:
            self.metrics.observe_apply("failed", {})


def release_free_memory() -> None:
    """After a transaction, the heap pages its garbage left free go back to the system
    (glibc's malloc_trim: ~1 ms): a cold push's parsed payload would otherwise stay in the
    resident set of a process that lives for months."""
    global _libc
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def system_report(settings: Settings) -> dict:
    """Load, memory, disk and conntrack as the router sees them (the daemon runs in its namespace)."""
    memory = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                memory[name] = int(value.split()[0]) * 1024
    disk = shutil.disk_usage(settings.state_dir)
    return {
        "time": timestamp(),
        "load": list(os.getloadavg()),
        "memory_total_bytes": memory.get("MemTotal"),
        "memory_available_bytes": memory.get("MemAvailable"),
        "disk_total_bytes": disk.total,
        "disk_free_bytes": disk.free,
        "conntrack_count": _read_int("/proc/sys/net/netfilter/nf_conntrack_count"),
        "conntrack_limit": _read_int("/proc/sys/net/netfilter/nf_conntrack_max"),
    }


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def main(settings: Settings) -> int:
    import fcntl
    import sys

    # The agent service's SIGHUP ("re-read agent.json") may come before the loop handles it:
    # the daemon reads the file when it starts anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    supervised = not os.isatty(0) and os.environ.get("SUPERVISOR_PROCESS_NAME") is not None
    settings.ensure_dirs()
    # Held for as long as this process lives (a lock dies with it): whether a daemon runs,
    # for the CLI, without a connection that the keeper's socket store would let wait.
    pid_fd = os.open(settings.daemon_pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("vr daemon: another daemon runs for this router", file=sys.stderr)
        return 1
    os.ftruncate(pid_fd, 0)
    os.pwrite(pid_fd, str(os.getpid()).encode(), 0)
    try:
        asyncio.run(Daemon(settings, supervised=supervised).run())
    except OSError as error:
        from vr.foundation.errors import os_error_reason

        print(f"vr daemon: {os_error_reason(error)}", file=sys.stderr)
        return 4
    return 0


__all__ = ["Daemon", "main"]
