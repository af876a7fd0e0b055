"""Prometheus metrics of one process. Labels are outcomes and operations, never ids or addresses."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
        self.pending = Gauge(
            "receiver_pending_requests",
            "Requests not yet final (from the poll schedule).",
            registry=r,
        )
        self.oldest_pending = Gauge(
            "receiver_oldest_pending_age_seconds",
            "Age of the oldest request not yet final.",
            registry=r,
        )
        self.overdue = Gauge(
            "receiver_requests_overdue",
            "Requests past their due_by whose package was not handed out (at the last census).",
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
        self.draining = Gauge(
            "receiver_draining",
            "1 while the process is shutting down.",
            registry=r,
        )
