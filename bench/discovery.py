"""Discovery in a large account: one access request for an address held in 5 places of an
account of 50 databases x 4 collections. How many Copernica calls does the service make to
find the person, against the fewest SPEC's cost rule allows, how long does it take against
calls / COPERNICA_MAX_RPS, and does it ever go above the limit?

1. **The account** (seeded, the same every run): 50 databases, each with 4 collections; every
   database and collection has its `email`-typed field; every 5th database and a few
   collections also have the text field `Contact` (named in DISCOVERY_FIELDS); every 10th
   database has 24 fields and one collection of every 12th database 22, more than the 20 a
   database object's nested list holds, so those are read from their own endpoints. 200-400
   profiles a database, 60-160 subprofiles a collection, a few of them removed. The subject
   is in 5 places: two profiles by their e-mail field (one in other letter case), one profile
   by its `Contact` field, two subprofiles; a removed profile holds the address too (Copernica
   leaves it out of lists: no match).
2. **The request.** The service (its own process, `COPERNICA_MAX_RPS` = `--rps`, default 5)
   gets one access request through its API (`"discover": true`). The benchmark reads the
   request every 0.1 s until its package is built: the moment discovery is `done`, the moment
   every source is filed, the moment it is packaged. The simulator answers each data request
   2 s after it is filed, by callback.

The minimum (SPEC "Sources and discovery", cost): the pages of the database list (1000 a page)
+ each nested list that did not fit (read from its endpoint, 1000 a page) + one query per
(place, address field) + the extra pages of a query (none here) + two calls per match (its
details, its filing). Counted twice: the request's own `discovery.calls`, and the simulator's
`account_calls` (every list and GET profile/subprofile) + the profile and subprofile data
requests it was asked for. The most calls in any one second counts every call the service
made (the e-mail source's filing and polling too), from the arrival times the simulator
records (bench/simulator.py).

    .venv/bin/python bench/discovery.py [--rps 5] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.poller import most_in_window
from bench.stack import Stack, append_results, cpu_seconds

DATABASES, COLLECTIONS = 50, 4
NESTED_LIMIT = 20  # items in a database object's nested fields/collections (the simulator's)
PAGE = 1000  # the service's page size for every list
DISCOVERY_FIELD = "Contact"
SUBJECT = "alice.bench@example.com"
READY_AFTER = 2.0  # seconds from a data request's filing to its callback
SEED = 22


@dataclass
class Account:
    """The account as posted to the simulator, and what the benchmark knows about it."""

    document: dict[str, Any]
    places: dict[str, str] = field(default_factory=dict)  # source -> where it is
    profiles: int = 0
    subprofiles: int = 0

    def minimum(self) -> dict[str, int]:
        """The fewest calls SPEC's cost rule allows for finding and filing the places."""
        databases = self.document["databases"]
        nested = 0
        queries = 0
        for database in databases:
            nested += _pages_beyond(len(database["fields"]))
            nested += _pages_beyond(len(database["collections"]))
            queries += len(_address_fields(database["fields"]))
            for collection in database["collections"]:
                nested += _pages_beyond(len(collection["fields"]))
                queries += len(_address_fields(collection["fields"]))
        return {
            "listing pages": max(1, math.ceil(len(databases) / PAGE)),
            "nested lists that did not fit": nested,
            "queries (place, field)": queries,
            "extra pages": 0,  # no query here matches more than one page of records
            "2 per match": 2 * len(self.places),
        }


def _pages_beyond(items: int) -> int:
    """Calls to read a nested list of `items` from its endpoint (0 when it fit)."""
    return 0 if items <= NESTED_LIMIT else math.ceil(items / PAGE)


def _address_fields(fields: list[dict[str, str]]) -> list[str]:
    return [f["name"] for f in fields if f["type"] == "email" or f["name"] == DISCOVERY_FIELD]


def _fields(kind: str, count: int, contact: bool) -> list[dict[str, str]]:
    base = ["Name", "City", "Phone"] if kind == "database" else ["Order", "Total", "Date"]
    names = ["Email", *base]
    names += [f"Extra{n}" for n in range(count - len(names) - contact)]
    names += [DISCOVERY_FIELD] if contact else []
    return [{"name": n, "type": "email" if n == "Email" else "text"} for n in names]


def make_account(seed: int = SEED) -> Account:
    """50 databases x 4 collections, the subject in 5 places (see the module's docstring)."""
    rng = random.Random(seed)
    account = Account({"databases": [], "profiles": [], "subprofiles": []})
    doc = account.document
    owners: dict[str, list[str]] = {}  # database -> its live profile ids
    next_profile, next_subprofile = 100_000, 500_000
    for d in range(1, DATABASES + 1):
        db = str(d)
        contact = d % 5 == 0
        collections = [
            {
                "id": f"{d}{c:02d}",
                "name": f"Collection {c} of {d}",
                "fields": _fields("collection", 22 if d % 12 == 0 and c == 1 else 5, d % 7 == c),
            }
            for c in range(1, COLLECTIONS + 1)
        ]
        doc["databases"].append(
            {
                "id": db,
                "name": f"Database {d}",
                "fields": _fields("database", 24 if d % 10 == 0 else 6, contact),
                "collections": collections,
            }
        )
        owners[db] = []
        for _ in range(rng.randint(200, 400)):
            next_profile += 1
            pid = str(next_profile)
            values = {"Email": f"person{pid}@example.net", "Name": f"Person {pid}"}
            if contact:
                values[DISCOVERY_FIELD] = f"contact{pid}@example.org"
            removed = rng.random() < 0.02
            doc["profiles"].append(
                {"id": pid, "database": db, "fields": values, "removed": removed}
            )
            if not removed:
                owners[db].append(pid)
        for collection in collections:
            for _ in range(rng.randint(60, 160)):
                next_subprofile += 1
                sid = str(next_subprofile)
                doc["subprofiles"].append(
                    {
                        "id": sid,
                        "profile": rng.choice(owners[db]),
                        "collection": collection["id"],
                        "fields": {"Email": f"buyer{sid}@example.net", "Order": f"ORD-{sid}"},
                    }
                )
    _place_subject(account, rng)
    account.profiles, account.subprofiles = len(doc["profiles"]), len(doc["subprofiles"])
    return account


def _place_subject(account: Account, rng: random.Random) -> None:
    """Put SUBJECT in 5 places (and in one removed profile, which lists leave out)."""
    doc = account.document
    profiles = {p["id"]: p for p in doc["profiles"]}

    def profile_in(db: str) -> dict[str, Any]:
        return rng.choice([p for p in doc["profiles"] if p["database"] == db and not p["removed"]])

    def subprofile_in(collection: str) -> dict[str, Any]:
        live = [
            s
            for s in doc["subprofiles"]
            if s["collection"] == collection and not profiles[s["profile"]]["removed"]
        ]
        return rng.choice(live)

    for db, name, value in (
        ("3", "Email", SUBJECT),
        ("27", "Email", SUBJECT.upper()),  # Copernica compares without regard to case
        ("10", DISCOVERY_FIELD, SUBJECT),  # database 10 has the Contact field
    ):
        found = profile_in(db)
        found["fields"][name] = value
        account.places[f"profile:{found['id']}"] = f"database {db} by {name}"
    for collection in ("302", "4104"):
        found = subprofile_in(collection)
        found["fields"]["Email"] = SUBJECT
        account.places[f"subprofile:{found['id']}"] = f"collection {collection} by Email"
    removed = profile_in("15")
    removed["fields"]["Email"], removed["removed"] = SUBJECT, True


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Moments:
    """Seconds from filing (the POST) to each moment, as the request's JSON showed them."""

    filed: float = 0.0
    discovered: float | None = None
    sources_filed: float | None = None
    packaged: float | None = None
    shown: dict[str, Any] = field(default_factory=dict)


def sources_filed(shown: dict[str, Any]) -> bool:
    return all(s["status"] != "submitting" for s in shown["data_requests"])


Reader = Callable[[], Awaitable[dict[str, Any]]]


async def follow(read: Reader, started: float, timeout: float) -> Moments:
    """Read the request's record every 0.1 s until it is packaged (or `timeout` seconds)."""
    moments = Moments()
    shown_at = started
    while time.monotonic() - started < timeout:
        shown = await read()
        now = time.monotonic() - started
        moments.shown = shown
        if moments.discovered is None and shown["discovery"]["status"] == "done":
            moments.discovered = now
        if (
            moments.discovered is not None
            and moments.sources_filed is None
            and sources_filed(shown)
        ):
            moments.sources_filed = now
        if shown.get("package") is not None:
            moments.packaged = now
            return moments
        if now - shown_at >= 15:
            d = shown["discovery"]
            print(
                f"  {now:5.1f} s: discovery {d['status']}, {d['calls']} calls, "
                f"{d['queries']} queries, {d['matches']} matches",
                file=sys.stderr,
                flush=True,
            )
            shown_at = now
        await asyncio.sleep(0.1)
    return moments


def record_reader(stack: Stack, request_id: str) -> Reader:
    """The record, straight from S3: what the service wrote, with no read through its API
    (an API read folds a callback's archive into the record: a write of its own)."""
    import botocore.session

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=stack.endpoint, region_name="us-east-1"
    )

    def get() -> dict[str, Any]:
        answer = s3.get_object(Bucket=stack.bucket, Key=f"copernica/requests/{request_id}.json")
        return dict(json.loads(answer["Body"].read()))

    async def read() -> dict[str, Any]:
        return await asyncio.to_thread(get)

    return read


def api_reader(http: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> Reader:
    """The request as the operator API shows it (`--watch api`)."""

    async def read() -> dict[str, Any]:
        async with http.get(url, headers=auth) as answer:
            assert answer.status == 200, await answer.text()
            shown = dict(await answer.json())
        shown["data_requests"] = shown["sources"]
        return shown

    return read


async def run(rps: float, watch: str, record: bool) -> int:
    began = time.monotonic()
    account = make_account()
    minimum = account.minimum()
    least = sum(minimum.values())
    stack = Stack(simulator=["bench/simulator.py"], simulator_args=["--payload-size", "20000"])
    stack.start(service=False)
    sim = f"http://127.0.0.1:{stack.sim_port}"
    auth = {"Authorization": f"Bearer {stack.api}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            for path, body in (
                ("config", {"ready_after": READY_AFTER}),
                ("account", account.document),
            ):
                async with http.post(f"{sim}/_sim/{path}", json=body) as answer:
                    assert answer.status == 200, await answer.text()
            service = stack.start_service(
                {
                    "COPERNICA_MAX_RPS": f"{rps:g}",
                    "DISCOVERY": "on",
                    "DISCOVERY_FIELDS": DISCOVERY_FIELD,
                    "POLL_INTERVAL_SECONDS": "5",
                    "SHUTDOWN_DRAIN_SECONDS": "0",
                }
            )
            async with http.post(f"{sim}/_sim/bench/reset") as answer:
                assert answer.status == 200
            cpu = cpu_seconds(service.pid)
            print(
                f"discovery over {DATABASES} databases x {COLLECTIONS} collections at {rps:g} "
                f"calls/s (minimum {least} calls, ~{least / rps:.0f} s) ...",
                file=sys.stderr,
                flush=True,
            )
            start = time.monotonic()
            async with http.post(
                f"{stack.admin_url}/v1/data-requests",
                json={"email": SUBJECT, "discover": True},
                headers=auth,
            ) as answer:
                assert answer.status == 202, await answer.text()
                request_id = (await answer.json())["id"]
            url = f"{stack.admin_url}/v1/data-requests/{request_id}"
            read = (
                api_reader(http, url, auth) if watch == "api" else record_reader(stack, request_id)
            )
            moments = await follow(read, start, timeout=20 * least / rps + 120)
            async with http.get(url, headers=auth) as answer:
                moments.shown = await answer.json()  # what the API shows once packaged
            cpu = cpu_seconds(service.pid) - cpu
            async with http.get(f"{sim}/_sim/state") as answer:
                state = await answer.json()
            async with http.get(f"{sim}/_sim/bench/calls") as answer:
                seen = await answer.json()
    finally:
        stack.stop()
    took = time.monotonic() - began
    return report(account, rps, watch, moments, state, seen, start, cpu, took, record)


def report(
    account: Account,
    rps: float,
    watch: str,
    moments: Moments,
    state: dict[str, Any],
    seen: dict[str, Any],
    start: float,
    cpu: float,
    took: float,
    record: bool,
) -> int:
    shown = moments.shown
    discovery = shown.get("discovery", {})
    minimum = account.minimum()
    least = sum(minimum.values())
    sources = {s["source"]: s for s in shown.get("sources", [])}
    account_calls: dict[str, int] = state["account_calls"]
    filings: dict[str, int] = {}
    for request in state["requests"].values():
        if request["subject_type"] in ("profile", "subprofile"):
            filings[request["subject"]] = filings.get(request["subject"], 0) + 1
    simulator_count = sum(account_calls.values()) + sum(filings.values())
    times = sorted(t for t in seen["times"] if t >= start)
    most = most_in_window(times)
    wanted = {"email", *account.places}
    checks = {
        "packaged": moments.packaged is not None,
        "sources = the 5 places + the address": set(sources) == wanted,
        "every source archived": all(s["status"] == "archived" for s in sources.values()),
        "each place filed once": sorted(filings.values()) == [1] * len(account.places),
        "calls = the minimum": discovery.get("calls") == least == simulator_count,
        "never above the limit": most <= rps,
    }
    ok = all(checks.values())
    discovered = moments.discovered or float("nan")
    packaged = moments.packaged or float("nan")
    filed = moments.sources_filed or float("nan")
    ideal = least / rps
    rows = [
        "| account | limit (calls/s) | minimum calls | discovery.calls | simulator's count | "
        "discovery done s | all sources filed s | packaged s | calls ÷ limit s | "
        "ideal ÷ discovery done | most calls in any 1 s |",
        "|" + " --- |" * 11,
        f"| {DATABASES} db x {COLLECTIONS} coll, {account.profiles:,} profiles, "
        f"{account.subprofiles:,} subprofiles | {rps:g} | {least} | {discovery.get('calls')} | "
        f"{simulator_count} | {discovered:.1f} | {filed:.1f} | {packaged:.1f} | {ideal:.1f} | "
        f"{ideal / discovered:.2f} | {most} |",
        "",
        "- minimum = " + " + ".join(f"{v} {k}" for k, v in minimum.items()) + f" = {least}",
        "- simulator's count = account calls "
        + ", ".join(f"{k} {v}" for k, v in sorted(account_calls.items()))
        + f" + {sum(filings.values())} profile/subprofile data requests",
        f"- discovery: {discovery.get('databases')} databases, {discovery.get('collections')} "
        f"collections, {discovery.get('queries')} queries, {discovery.get('matches')} matches "
        f"(the address in {len(account.places)} places: "
        + "; ".join(sorted(account.places.values()))
        + "; and in one removed profile, left out)",
        f"- wall time from the filing (POST) to discovery done, to every source filed (after its "
        f"details), to the package built (each source answered by callback {READY_AFTER:g} s "
        f"after its filing), the request followed every 0.1 s "
        + ("through the operator API" if watch == "api" else "by its record in S3")
        + "; calls ÷ limit = minimum ÷ COPERNICA_MAX_RPS",
        f"- every Copernica call of the run (the e-mail source's filing and polling too): "
        f"{len(times)}, most in any 1 s {most} (limit {rps:g}); service CPU {cpu:.1f} s; "
        f"whole run {took:.0f} s",
        "- checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()),
    ]
    print("\n".join(rows), flush=True)
    if record:
        parts = [f"{rps:g} calls/s"] if rps != 5 else []
        parts += ["watched through the API"] if watch == "api" else []
        title = "Discovery" + (f" ({', '.join(parts)})" if parts else "")
        append_results(title, rows)
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rps", type=float, default=5.0, help="COPERNICA_MAX_RPS of the service")
    parser.add_argument(
        "--watch",
        choices=("s3", "api"),
        default="s3",
        help="follow the request by its record in S3 (default) or through the operator API",
    )
    parser.add_argument("--no-record", action="store_true", help="leave bench/RESULTS.md alone")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.rps, args.watch, not args.no_record)))


if __name__ == "__main__":
    main()
