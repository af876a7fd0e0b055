"""Prometheus metrics of one process. Labels are outcomes and operations, never ids or addresses."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Census(Collector):
    """The deployment's census (from the poll schedule and the deadline index), counted by
    the replica holding the housekeeping lease (`service.collect.housekeeping`).

    Every replica knows it (the holder from its own count, the others from the lease object,
    for the console's totals), but only the holder exports it: Prometheus scrapes every
    replica, and a sum across replicas must count each request once. Elsewhere the three
    series are absent, not 0: those replicas did not count.
    """

    _HELP = {
        "receiver_pending_requests": "Requests not yet final (from the poll schedule).",
        "receiver_oldest_pending_age_seconds": "Age of the oldest request not yet final.",
        "receiver_requests_overdue": (
            "Requests past their due_by whose package was not handed out (at the last census)."
        ),
    }

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pending = 0
        self.oldest_pending_age = 0.0
        self.overdue = 0
        self.exported = False  # True while this replica holds the housekeeping lease
        registry.register(self)

    def set(self, pending: int, oldest_pending_age: float, overdue: int) -> None:
        self.pending, self.oldest_pending_age, self.overdue = pending, oldest_pending_age, overdue

    def _families(self) -> Iterator[GaugeMetricFamily]:
        values = (self.pending, self.oldest_pending_age, self.overdue)
        for (name, text), value in zip(self._HELP.items(), values, strict=True):
            yield GaugeMetricFamily(name, text, value=value)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.exported:
            yield from self._families()


class Metrics:
    """One registry per application, so tests can build many apps in one process."""

    def __init__(self) -> None:
        """Every metric of the process, declared in one place; it stays one function because
        it is a list of declarations, read top to bottom beside /metrics' output."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.callbacks = Counter(
            "receiver_callbacks_total",
            "Callbacks answered, by outcome and status code.",
            ["outcome", "code"],
            registry=r,
        )
        self.callback_seconds = Histogram(
            "receiver_callback_duration_seconds",
            "Time from request to answer of a callback.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.archived_bytes = Counter(
            "receiver_archived_bytes_total",
            "Bytes written to archive objects, by source.",
            ["source"],
            registry=r,
        )
        self.s3_seconds = Histogram(
            "receiver_s3_request_duration_seconds",
            "S3 call latency, by operation and outcome.",
            ["operation", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.copernica_calls = Counter(
            "receiver_copernica_requests_total",
            "Calls to Copernica, by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.requests_filed = Counter(
            "receiver_data_requests_filed_total",
            "Data requests filed, by final outcome.",
            ["outcome"],
            registry=r,
        )
        self.poll_ticks = Counter(
            "receiver_poll_ticks_total",
            "Poller ticks (one schedule listing each).",
            registry=r,
        )
        self.poll_visits = Counter(
            "receiver_poll_visits_total",
            "Requests visited by the poller, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.poll_due = Gauge(
            "receiver_poll_due",
            "Requests found due at the last tick.",
            registry=r,
        )
        self.poll_lag = Gauge(
            "receiver_poll_lag_seconds",
            "How late the most overdue poll was at the last tick.",
            registry=r,
        )
        self.poll_leases = Gauge(
            "receiver_poll_leases_held",
            "Requests this replica is working on now.",
            registry=r,
        )
        self.census = Census(r)
        self.housekeeping_holder = Gauge(
            "receiver_housekeeping_lease_held",
            "1 while this replica holds the housekeeping lease (runs census, janitor, "
            "backfill and retention), else 0.",
            registry=r,
        )
        self.housekeeping_rounds = Counter(
            "receiver_housekeeping_rounds_total",
            "Housekeeping rounds, by role: holder (held the lease and did the work) or "
            "standby (read the lease, another replica holds it).",
            ["role"],
            registry=r,
        )
        self.housekeeping_s3 = Counter(
            "receiver_housekeeping_s3_requests_total",
            "S3 calls made by housekeeping, by part (lease, janitor, census, backfill, "
            "retention) and operation; also counted in receiver_s3_request_duration_seconds.",
            ["part", "operation"],
            registry=r,
        )
        self.packages_built = Counter(
            "receiver_packages_built_total",
            "Access packages built (or adopted after a crash), by outcome.",
            ["outcome"],
            registry=r,
        )
        self.packages_handed_out = Counter(
            "receiver_packages_handed_out_total",
            "Access packages handed out, by way (download or link).",
            ["way"],
            registry=r,
        )
        self.purged = Counter(
            "receiver_purged_total",
            "Requests whose stored data was deleted after RETENTION_DAYS.",
            registry=r,
        )
        self.purged_versions = Counter(
            "receiver_purged_versions_total",
            "Object versions retention deleted by version id in a bucket that keeps versions "
            "(noncurrent versions and delete markers included).",
            registry=r,
        )
        self.bucket_versioning = Enum(
            "receiver_bucket_versioning",
            "The bucket's versioning state at the last look (start-up, then retention's sweeps): "
            "off (never enabled), enabled, suspended, or unknown (the look failed).",
            states=["off", "enabled", "suspended", "unknown"],
            registry=r,
        )
        self.draining = Gauge(
            "receiver_draining",
            "1 while the process is shutting down.",
            registry=r,
        )
