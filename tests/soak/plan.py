"""What a soak run does, drawn up front from its seed: the requests and the faults.

Everything here depends only on (seconds, seed), so a failing run is reproduced by running
the same two again (timing on a shared machine still varies; the schedule does not).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

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
# Discovery: a share of the requests is filed with `"discover": true` (DISCOVERY is off);
# each costs a listing and three queries, and two calls per place found.
DISCOVER_SHARE = 0.35
OTHERS = 30  # other people in each database (and their orders)
_EMAIL = {"name": "Email", "type": "email"}
DATABASES: list[dict[str, Any]] = [
    {"id": "1", "name": "Newsletter", "fields": [_EMAIL, {"name": "Name"}]},
    {
        "id": "2",
        "name": "Shop",
        "fields": [_EMAIL, {"name": "Name"}],
        "collections": [{"id": "21", "name": "Orders", "fields": [_EMAIL, {"name": "Order"}]}],
    },
]
# Where a subject can be: (kind, database) by place name; ids are made per request.
PLACES = {"newsletter": ("profile", "1"), "shop": ("profile", "2"), "order": ("subprofile", "2")}


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
    # Discovery: filed with `"discover": true`; the subject is in these places of the account
    # (sources, "profile:10071"); Copernica answers its e-mail data request "Invalid method";
    # these places are switched gone (`gone_sources`) `gone_after` seconds after the filing.
    discover: bool = False
    places: tuple[str, ...] = ()
    invalid_method: bool = False
    gone: tuple[str, ...] = ()
    gone_after: float = 0.0

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
    def discovering(self) -> list[PlannedRequest]:
        return [r for r in self.requests if r.discover]

    def account(self) -> dict[str, Any]:
        """The simulator's account (POST /_sim/account's JSON): Newsletter (database 1) and
        Shop (database 2, its collection Orders, 21), some other people in each, and each
        discovering request's subject in its places."""
        profiles: list[dict[str, Any]] = []
        subprofiles: list[dict[str, Any]] = []
        for n in range(OTHERS):
            for database in ("1", "2"):
                pid = f"{database}{n:03d}"
                fields = {"Email": f"other{pid}@example.net", "Name": f"Other {pid}"}
                profiles.append({"id": pid, "database": database, "fields": fields})
            subprofiles.append(
                {"id": f"3{n:03d}", "profile": f"2{n:03d}", "collection": "21",
                 "fields": {"Email": f"buyer{n}@example.net", "Order": f"ORD-{n}"}}
            )  # fmt: skip
        for request in self.discovering:
            shop = next((p for p in request.places if p.startswith("profile:2")), "profile:2000")
            for place in request.places:
                kind, number = place.split(":")
                if kind == "profile":
                    fields = {"Email": request.email, "Name": f"Soak {request.n}"}
                    profiles.append({"id": number, "database": _database(place), "fields": fields})
                else:
                    fields = {"Email": request.email, "Order": f"ORD-{number}"}
                    parent = shop.split(":")[1]
                    subprofiles.append(
                        {"id": number, "profile": parent, "collection": "21", "fields": fields}
                    )
        return {"databases": DATABASES, "profiles": profiles, "subprofiles": subprofiles}

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


def _database(place: str) -> str:
    """The database of a planned place: profile:1nnnn in Newsletter, the rest in Shop."""
    return "1" if place.startswith("profile:1") else "2"


def _discovery(rng: random.Random, request: PlannedRequest) -> PlannedRequest:
    """Maybe make `request` discovering: 0-3 places (one order at most per shop profile),
    perhaps its e-mail data request refused "Invalid method" (only when a place can answer),
    perhaps some places removed while it runs (never all of them when the address cannot
    answer)."""
    if request.never_ready or rng.random() >= DISCOVER_SHARE:
        return request
    names = rng.sample(sorted(PLACES), rng.choice((0, 1, 2, 2, 3, 3)))
    base = {"newsletter": 10000, "shop": 20000, "order": 50000}
    places = tuple(f"{PLACES[name][0]}:{base[name] + request.n}" for name in sorted(names))
    invalid = bool(places) and rng.random() < 0.3
    gone = tuple(p for p in places if rng.random() < 0.25)
    if invalid and len(gone) == len(places):
        gone = gone[1:]
    if invalid:  # the address's own events are not what this case is about
        request = replace(request, events=None, events_per_day=0)
    return replace(
        request,
        discover=True,
        places=places,
        invalid_method=invalid,
        gone=gone,
        gone_after=rng.uniform(0.0, 6.0),
    )


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
    # Discovery drawn from a generator of its own: the requests and faults above stay what
    # they were for a seed.
    choices = random.Random(seed + 1)
    plan.requests = [_discovery(choices, r) for r in plan.requests]
    return plan
