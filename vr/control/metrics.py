"""`GET /metrics`: the router's figures in Prometheus' text format (prometheus-client).

One RouterMetrics per daemon, with its own CollectorRegistry (never the global one, so that
nothing imported by accident shows up and two routers in one test process stay apart):

- Fed by the daemon after each transaction (observe_apply):
    vr_applies_total{outcome}                 applied, rejected, stale, rolled-back, failed
    vr_apply_duration_seconds{step}           histogram, 1 ms .. 10 s; step is a key of
                                              Result.timings_ms (validate, render, check, switch,
                                              reload, health) or "total"; only transactions that
                                              ran (applied, rolled-back, failed) are timed
    vr_service_apply_duration_seconds{service}  histogram: each changed service's apply step
                                              (its daemon's reload), Result.service_ms
- Gathered at scrape time from vr.control.status.collect (the report `vr status --json
  --firewall --lb --vpn` prints), the dnsmasq lease file and the kernel:
    vr_info{router,release}                   1
    vr_generation                             the stored document's generation
    vr_healthy                                1 when every service is healthy
    vr_service_up{service}                    1 healthy, 0 not
    vr_service_restarts_total{service}        restarts by vr's monitor
    vr_probe_latency_seconds{service}         the monitor's last function probe (the status
                                              report's own probe when the monitor has none)
    vr_rule_packets_total{rule}, vr_rule_bytes_total{rule}
                                              nftables counters by rule comment (summed over chains)
    vr_lb_member_up{rule,member}              1 when haproxy sends it traffic (UP, or not checked)
    vr_lb_members{state}                      every member, counted by haproxy's state
    vr_vpn_sas{connection}                    established IKE SAs (site-to-site: 0 or 1;
                                              remote access: one per user)
    vr_vpn_bytes_total{connection,direction}  direction: in, out (its CHILD_SAs' counters)
    vr_dhcp_leases                            leases in dnsmasq's lease file (IPv4 and IPv6)
    vr_conntrack_entries, vr_conntrack_limit  /proc/sys/net/netfilter/nf_conntrack_count|max
                                              of the namespace the daemon runs in
    vr_collection_ok{part}                    0 when a part (status, firewall, lb, vpn, dhcp,
                                              conntrack) could not be read this time
    process_*                                 the daemon's own memory, CPU, file descriptors

Bounded cardinality: at most MAX_RULE_SERIES rules get their own series, the busiest (by
packets, then bytes) first; the rest are summed into rule="_other". So a rule may move
between its own series and _other as traffic shifts, and _other is not monotonic then
(rate() reads a drop as a counter reset). Load-balancer members are capped the same way at
MAX_LB_SERIES series, the members not up first (the ones an operator looks for); vr_lb_members
counts all of them. nftables' counters restart at zero when a ruleset is replaced whole.

A scrape never fails because a part does: a daemon that does not answer leaves its series
out and sets vr_collection_ok{part} to 0. The status collection probes every service (tens
of ms on a large router), so its result is kept CACHE_S seconds, or until the next
transaction: Prometheus servers scraping at once cost one collection. render() blocks for
that long: call it off the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vr.foundation.settings import Settings
from vr.services.dnsmasq import lease_count

log = logging.getLogger(__name__)

OUTCOMES = ("applied", "rejected", "stale", "rolled-back", "failed")
TIMED_OUTCOMES = ("applied", "rolled-back", "failed")  # a refused push ran no transaction
STEPS = ("validate", "render", "check", "switch", "reload", "health", "total")
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_RULE_SERIES = 500
MAX_LB_SERIES = 500
OTHER = "_other"
CACHE_S = 1.0
LB_STATES = ("UP", "DOWN", "MAINT", "DRAIN", "NOLB", "no check")
CONNTRACK = Path("/proc/sys/net/netfilter")
PARTS = ("status", "firewall", "lb", "vpn", "dhcp", "conntrack")

__all__ = ["CONTENT_TYPE_LATEST", "RouterMetrics"]


class RouterMetrics:
    """The daemon's metrics: counters it feeds, and a collector that reads the router when scraped."""

    def __init__(self, settings: Settings, pipeline=None, cache_s: float = CACHE_S):
        """pipeline: the daemon's warm Pipeline: the status collection reuses its parsed document,
        which also gives vr_generation when the status report cannot be collected at all."""
        self.settings = settings
        self.pipeline = pipeline
        self.cache_s = cache_s
        disable_created_metrics()  # no *_created series: they would double the count for nothing
        self.registry = CollectorRegistry()
        self.applies = Counter("vr_applies", "Pushes by outcome.", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.applies.labels(outcome)  # every outcome shows, at 0, from the first scrape
        self.durations = Histogram(
            "vr_apply_duration_seconds",
            "Time of an apply transaction, by step (and the total).",
            ["step"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self.service_durations = Histogram(
            "vr_service_apply_duration_seconds",
            "Time of one service's apply step (its daemon's hitless reload), by service.",
            ["service"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self.registry.register(_RouterCollector(self))
        self._lock = threading.Lock()
        self._snapshot: dict | None = None
        self._taken = 0.0
        self._expired = False  # a transaction ran since the snapshot: the next scrape reads afresh

    # ------------------------------------------------------------ fed by the daemon
    def observe_apply(self, outcome: str, timings_ms: Mapping[str, float], duration_ms: float | None = None,
                      service_ms: Mapping[str, float] | None = None) -> None:  # fmt: skip
        """One push's outcome and, for a transaction that ran, its steps' times (Result.timings_ms).
        duration_ms: the whole apply (Result.duration_ms); the sum of the steps when not given."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
        self.applies.labels(outcome).inc()
        if outcome not in TIMED_OUTCOMES:
            return
        self._expired = True  # not under the lock: the pipeline's worker never waits for a scrape
        steps = {step: float(ms) for step, ms in timings_ms.items() if step in STEPS and step != "total"}
        for step, ms in steps.items():
            self.durations.labels(step).observe(ms / 1000)
        for service, ms in (service_ms or {}).items():
            self.service_durations.labels(service).observe(float(ms) / 1000)
        total = duration_ms if duration_ms is not None else sum(steps.values())
        if total or steps:
            self.durations.labels("total").observe(total / 1000)

    # ------------------------------------------------------------ served
    def render(self) -> bytes:
        """The exposition text (CONTENT_TYPE_LATEST). Never raises: a part that fails is left out."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """What the router reports now, at most cache_s old: {"status", "leases", "conntrack", "errors"}."""
        with self._lock:
            now = time.monotonic()
            if self._snapshot is None or self._expired or now - self._taken >= self.cache_s:
                self._expired = False  # before: a transaction during the collection expires it again
                self._snapshot = self._gather()
                self._taken = time.monotonic()
            return self._snapshot

    def _gather(self) -> dict:
        from vr.control.status import collect

        errors: dict[str, str] = {}
        status = None
        try:
            status = collect(self.settings, firewall=True, lb=True, vpn=True, pipeline=self.pipeline, usage=True)
        except Exception as error:  # noqa: BLE001 - a scrape answers with what it has, whatever broke
            errors["status"] = _why(error)
            log.warning("metrics: the status collection failed: %s", errors["status"])
        leases = None
        try:
            leases = lease_count(self.settings)
        except OSError as error:
            errors["dhcp"] = _why(error)
        conntrack = {}
        for name in ("count", "max"):
            try:
                conntrack[name] = int((CONNTRACK / f"nf_conntrack_{name}").read_text())
            except (OSError, ValueError) as error:
                errors["conntrack"] = _why(error)
        return {"status": status, "leases": leases, "conntrack": conntrack, "errors": errors}

    def stored_generation(self) -> int | None:
        if self.pipeline is None:
            return None
        from vr.foundation.errors import StoredDocumentUnreadable

        try:
            doc = self.pipeline.stored_document()
        except (StoredDocumentUnreadable, OSError):  # no generation to tell
            return None
        return doc.generation if doc is not None else None


class _RouterCollector:
    """The scrape-time series, built from RouterMetrics.snapshot()."""

    def __init__(self, metrics: RouterMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot()  # never raises: each part caught its own failure
        errors = dict(snap["errors"])
        status = snap["status"]
        families: list[Metric] = []
        builders = [("status", _router_families), ("firewall", _rule_families), ("lb", _lb_families),
                    ("vpn", _vpn_families), ("usage", _usage_families)]  # fmt: skip
        for part, build in builders:
            if status is None:
                break
            try:
                built, problem = build(status)
            except Exception as error:  # noqa: BLE001 - an odd report: that part is left out, not the scrape
                built, problem = [], _why(error)
            families += built
            if problem:
                errors.setdefault(part, problem)
        if status is None and (generation := self.metrics.stored_generation()) is not None:
            families.append(GaugeMetricFamily("vr_generation", "The stored document's generation.", generation))
        if snap["leases"] is not None:
            families.append(GaugeMetricFamily("vr_dhcp_leases", "Leases in dnsmasq's lease file.", snap["leases"]))
        conntrack = snap["conntrack"]
        if "count" in conntrack:
            families.append(
                GaugeMetricFamily("vr_conntrack_entries", "Connection tracking entries.", conntrack["count"])
            )
        if "max" in conntrack:
            families.append(GaugeMetricFamily("vr_conntrack_limit", "nf_conntrack_max.", conntrack["max"]))
        ok = GaugeMetricFamily("vr_collection_ok", "1 when this part of the router could be read.", labels=["part"])
        for part in PARTS:
            ok.add_metric([part], 0 if part in errors or (status is None and part in ("firewall", "lb", "vpn")) else 1)
        families.append(ok)
        yield from families


def _router_families(status: dict) -> tuple[list[Metric], str | None]:
    families: list[Metric] = []
    info = GaugeMetricFamily("vr_info", "The router and the vr release it runs.", labels=["router", "release"])
    info.add_metric([status.get("router") or "", str(status.get("release") or "")], 1)
    families.append(info)
    if status.get("generation") is not None:
        families.append(GaugeMetricFamily("vr_generation", "The stored document's generation.", status["generation"]))
    families.append(GaugeMetricFamily("vr_healthy", "1 when every service is healthy.", 1 if status["healthy"] else 0))
    up = GaugeMetricFamily("vr_service_up", "1 when the service answers its health probe.", labels=["service"])
    restarts = CounterMetricFamily("vr_service_restarts", "Restarts by vr's monitor.", labels=["service"])
    latency = GaugeMetricFamily("vr_probe_latency_seconds", "The last health probe's time.", labels=["service"])
    for service in status["services"]:
        name = service["name"]
        up.add_metric([name], 1 if service["healthy"] else 0)
        watched = service.get("monitor") or {}
        if watched.get("restarts") is not None:
            restarts.add_metric([name], watched["restarts"])
        probe_ms = watched.get("last_probe_ms")
        if probe_ms is None:
            probe_ms = service.get("probe_ms")
        if probe_ms is not None:
            latency.add_metric([name], probe_ms / 1000)
    families += [up, restarts, latency]
    return families, status.get("document_error")


def _rule_families(status: dict) -> tuple[list[Metric], str | None]:
    rows = status.get("firewall")
    if rows is None:  # no document yet: nothing to count
        return [], None
    if len(rows) == 1 and rows[0]["chain"] == "-":  # status.collect's way of saying nft failed
        return [], rows[0]["rule"]
    totals: dict[str, list[int]] = {}
    for row in rows:
        total = totals.setdefault(str(row["rule"]), [0, 0])
        total[0] += int(row.get("packets", 0))
        total[1] += int(row.get("bytes", 0))
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    kept, rest = ranked[:MAX_RULE_SERIES], ranked[MAX_RULE_SERIES:]
    if rest:
        kept.append((OTHER, [sum(c[0] for _, c in rest), sum(c[1] for _, c in rest)]))
    packets = CounterMetricFamily("vr_rule_packets", "Packets matched by a firewall/NAT rule.", labels=["rule"])
    volume = CounterMetricFamily("vr_rule_bytes", "Bytes matched by a firewall/NAT rule.", labels=["rule"])
    for rule, (count, size) in kept:
        packets.add_metric([rule], count)
        volume.add_metric([rule], size)
    return [packets, volume], None


def _usage_families(status: dict) -> tuple[list[Metric], str | None]:
    """Billing usage: per public IP and per tier (bounded by the document: at most 1,024
    public IPs and 64 tiers), in and out."""
    rows = status.get("usage") or []
    labels = ["kind", "id", "direction"]  # id: the public IP or the tier id
    volume = CounterMetricFamily("vr_usage_bytes", "Bytes through a public IP or a tier, for billing.", labels=labels)
    packets = CounterMetricFamily("vr_usage_packets", "Packets through a public IP or a tier.", labels=labels)
    for row in rows:
        for direction in ("in", "out"):
            volume.add_metric([row["kind"], row["name"], direction], row[f"{direction}_bytes"])
            packets.add_metric([row["kind"], row["name"], direction], row[f"{direction}_packets"])
    return [volume, packets], None


def _lb_families(status: dict) -> tuple[list[Metric], str | None]:
    rows = status.get("lb")
    if rows is None:
        return [], None
    up = GaugeMetricFamily("vr_lb_member_up", "1 when haproxy sends the member traffic (UP or not checked).",
                           labels=["rule", "member"])  # fmt: skip
    counts = dict.fromkeys((*LB_STATES, "unknown"), 0)
    problem = None
    members = []  # (serving, rule, member)
    for row in rows:
        kind = _lb_state(row["state"])
        counts[kind] += 1
        if kind == "unknown" and row["state"] != "unknown":  # status.collect's words for a failure
            problem = row["state"]
        members.append((kind in ("UP", "no check"), row["rule"], row["member"]))
    for serving, rule, member in sorted(members)[:MAX_LB_SERIES]:
        up.add_metric([rule, member], 1 if serving else 0)
    by_state = GaugeMetricFamily("vr_lb_members", "Load-balancer members by haproxy's state.", labels=["state"])
    for state, count in counts.items():
        by_state.add_metric([state], count)
    return [up, by_state], problem


def _lb_state(state: str) -> str:
    """haproxy's status, its transitions folded ("UP 1/2" is UP, one check failed)."""
    if state in LB_STATES:
        return state
    first = state.split(" ", 1)[0]
    return first if first in LB_STATES else "unknown"


def _vpn_families(status: dict) -> tuple[list[Metric], str | None]:
    rows = status.get("vpn")
    if rows is None:
        return [], None
    if len(rows) == 1 and rows[0]["connection"] == "-":  # charon's VICI socket did not answer
        return [], rows[0]["state"]
    sas = GaugeMetricFamily("vr_vpn_sas", "Established IKE SAs of a connection.", labels=["connection"])
    volume = CounterMetricFamily("vr_vpn_bytes", "Bytes through a connection's CHILD_SAs.",
                                 labels=["connection", "direction"])  # fmt: skip
    for row in rows:
        established = row["state"] == "ESTABLISHED"
        sas.add_metric([row["connection"]], len(row.get("users") or []) or (1 if established else 0))
        volume.add_metric([row["connection"], "in"], row.get("bytes_in", 0))
        volume.add_metric([row["connection"], "out"], row.get("bytes_out", 0))
    return [sas, volume], None


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
