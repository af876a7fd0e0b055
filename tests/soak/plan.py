"""What a soak run does, drawn up front from its seed: the requests and the faults.

Everything here depends only on (seconds, seed), so a failing run is reproduced by running
the same two again (timing on a shared machine still varies; the schedule does not).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date, timedelta

KIB, MIB = 1024, 1024 * 1024
REPLICAS = 3
RATE = 5.0  # COPERNICA_MAX_RPS per replica
POLL_INTERVAL = 2.0
# A lease must outlast a visit's worst case (Copernica timing out on every try, with the
# pauses between): 5 x 2 s + backoff. A killed replica's leases run out after it.
LEASE = 30.0
COPERNICA_TIMEOUT = 2.0
DRAIN, GRACE = 1.0, 4.0  # SHUTDOWN_DRAIN_SECONDS, SHUTDOWN_GRACE_SECONDS
PART = 5 * MIB  # S3_PART_BYTES: bodies above it go up as multipart uploads


@dataclass(frozen=True)
class PlannedRequest:
    n: int
    at: float  # seconds into the run when it is filed
    email: str
    size: int  # payload bytes, at least
    ready_after: float  # seconds from filing until Copernica has the data
    lose: bool = False  # Copernica never POSTs the callback: only the poller can get it
    duplicates: int = 0  # extra deliveries of the same body
    concurrent: bool = False  # ... sent at once
    events: tuple[date, date] | None = None  # [since, until) asked for
    events_per_day: int = 0

    @property
    def never_ready(self) -> bool:
        return self.ready_after > 10_000

    @property
    def kind(self) -> str:
        if self.never_ready:
            return "never ready (expires)"
        if self.size >= 20 * MIB:
            return "big"
        if self.size > PART:
            return "multipart"
        return "small"


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    duration: float
    target: int = 0  # replica number, for kill and term
    amount: float = 0.0  # latency seconds, error rate, bytes before a cut

    def describe(self) -> str:
        what = {
            "s3_outage": "S3 unreachable",
            "s3_latency": f"S3 answers {self.amount * 1000:.0f} ms late",
            "s3_cut": f"S3 connections cut after {self.amount / MIB:.1f} MiB more",
            "kill": f"replica {self.target} SIGKILLed",
            "term": f"replica {self.target} SIGTERMed",
            "copernica_errors": f"Copernica answers {self.amount:.0%} 503/429",
            "copernica_slow": f"Copernica answers {self.amount:.1f} s late",
            "copernica_silent": "Copernica silent (past the client's timeout)",
        }[self.kind]
        return f"{self.at:6.1f} s  {what} for {self.duration:.1f} s"


@dataclass
class Plan:
    seconds: float
    seed: int
    retention: float  # seconds: RETENTION_DAYS of the run
    expiry: float  # seconds: REQUEST_EXPIRY_HOURS of the run (never-ready ones come first)
    requests: list[PlannedRequest] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    @property
    def load_seconds(self) -> float:
        """Filing stops here; faults go on until `seconds`."""
        return 0.8 * self.seconds


def _size(rng: random.Random, seconds: float) -> int:
    roll = rng.random()
    if roll < 0.6:
        return rng.randint(2 * KIB, 20 * KIB)
    if roll < 0.88:
        return rng.randint(50 * KIB, MIB)
    if roll < 0.99:
        return rng.randint(PART + MIB, 12 * MIB)
    # Big ones up to 200 MB in a full run; the 60-second run keeps them to 40 MB.
    return rng.randint(20 * MIB, int(max(40, 200 * min(1.0, seconds / 300)) * MIB))


def make_plan(seconds: float, seed: int) -> Plan:
    rng = random.Random(seed)
    # Never-ready requests are filed first and expire 30 s after the run; by then packages
    # built in the first half are due for purging, those built later are still there to check.
    plan = Plan(seconds, seed, retention=0.5 * seconds + 35, expiry=seconds + 30)
    count = int(2 * seconds)
    never_ready = max(2, int(seconds / 20))
    for n in range(count):
        at = plan.load_seconds * n / count
        email = f"soak{seed}.{n}@example.com"
        if n in range(1, 3 * never_ready, 3):
            plan.requests.append(PlannedRequest(n, at, email, 4 * KIB, 10**6, lose=True))
            continue
        roll = rng.random()
        late = rng.random() < 0.1
        events = None
        per_day = 0
        if rng.random() < 0.25:
            since = date(2026, rng.randint(1, 9), rng.randint(1, 28))
            events = (since, since + timedelta(days=rng.randint(10, 75)))
            per_day = rng.randint(1, 3)
        plan.requests.append(
            PlannedRequest(
                n,
                at,
                email,
                _size(rng, seconds),
                rng.uniform(5, 15) if late else rng.uniform(0.3, 2.0),
                lose=roll < 0.15,
                duplicates=1 if 0.15 <= roll < 0.3 else 0,
                concurrent=0.2 <= roll < 0.3,
                events=events,
                events_per_day=per_day,
            )
        )
    # Three lanes of faults, each its own sequence; the lanes overlap, so faults combine.
    lanes = {
        "s3": ("s3_outage", "s3_latency", "s3_cut"),
        "replicas": ("kill", "kill", "term"),
        "copernica": ("copernica_errors", "copernica_slow", "copernica_silent"),
    }
    for kinds in lanes.values():
        moment = rng.uniform(2, 6)
        while moment < seconds - 3:
            kind = rng.choice(kinds)
            duration = {
                "s3_outage": rng.uniform(1, 4),
                "s3_latency": rng.uniform(3, 8),
                "s3_cut": 1.0,
                "kill": rng.uniform(1.5, 4),
                "term": 0.0,
                "copernica_errors": rng.uniform(3, 8),
                "copernica_slow": rng.uniform(3, 6),
                "copernica_silent": rng.uniform(3, 6),
            }[kind]
            amount = {
                "s3_latency": rng.uniform(0.05, 0.3),
                "s3_cut": rng.uniform(0.25, 8) * MIB,
                "copernica_errors": rng.uniform(0.1, 0.4),
                "copernica_slow": rng.uniform(0.5, 1.5),
            }.get(kind, 0.0)
            target = rng.randrange(REPLICAS)
            plan.faults.append(Fault(moment, kind, duration, target, amount))
            moment += duration + rng.uniform(2, 7)
    plan.faults.sort(key=lambda f: f.at)
    return plan
