"""Housekeeping by one replica at a time: the replica holding the lease in S3
(`leases/housekeeping.json`) runs census, janitor, backfill and retention; the others read the
lease once a round and do nothing else. A killed holder is replaced once its lease runs out, a
stopped one at once; the lease is only ever written conditionally."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from service.clock import FixedClock, parse_isoformat, utcnow
from service.collect.housekeeping import Lease
from service.metrics import Metrics
from service.storage.s3 import ArchiveStore, s3_client
from tests.conftest import (
    API_TOKEN,
    Bucket,
    ServiceFactory,
    ServiceProcess,
    Simulator,
    TcpProxy,
    make_settings,
)
from tests.support import eventually, filed, scrape

# On moto and on SeaweedFS (tests/conftest.py): the test ids say which.
# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

LEASE_KEY = "copernica/leases/housekeeping.json"
# A tick of 0.05 s, so a housekeeping round every 0.5 s and a lease of 1.5 s.
FAST = {"POLL_INTERVAL_SECONDS": "0.25", "POLL_LEASE_SECONDS": "5"}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def readings(http: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """What one replica's /metrics says about its S3 calls, ticks and housekeeping."""
    found: dict[str, float] = {}
    for name, labels, value in await scrape(http, admin_url):
        if name == "receiver_s3_request_duration_seconds_count":
            key = f"s3:{labels['operation']}"
        elif name == "receiver_housekeeping_s3_requests_total":
            key = f"housekeeping:{labels['part']}:{labels['operation']}"
        elif name.startswith(("receiver_poll_ticks", "receiver_housekeeping", "receiver_pend")):
            key = name
        else:
            continue
        found[key] = found.get(key, 0) + value
    return found


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def held(http: aiohttp.ClientSession, urls: Sequence[str]) -> list[float]:
    return [(await readings(http, url)).get("receiver_housekeeping_lease_held", -1) for url in urls]


async def console_in_progress(admin_url: str) -> str:
    """The console's "in progress" total, as an operator signed in to this replica sees it."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{admin_url}/ui/login") as answer:
            found = CSRF.search(await answer.text())
        assert found is not None
        form = {"csrf": found.group(1), "token": API_TOKEN, "next": "/ui/"}
        async with http.post(f"{admin_url}/ui/login", data=form, allow_redirects=False):
            pass
        async with http.get(f"{admin_url}/ui/") as answer:
            page = await answer.text()
    tile = re.search(r'tile-number">(\d+)</span>\s*<span class="tile-label">in progress', page)
    assert tile is not None, "no in-progress total on the console"
    return tile.group(1)


async def lease_in(store: Bucket) -> dict[str, Any]:
    return dict(json.loads(await store.read(LEASE_KEY)))


async def test_one_replica_of_three_lists_and_every_replica_shows_its_census(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.config.ready_after = 3600  # the three requests stay pending
    # A round every second and a lease of 3 s: a loaded machine (two test workers) may stall
    # a replica for longer than FAST's 1.5 s lease, and then another rightly takes it over.
    steady = {**FAST, "POLL_INTERVAL_SECONDS": "0.5"}
    replicas = [await make_service(**steady) for _ in range(3)]
    for n, replica in enumerate(replicas):
        await filed(replica, {"profile": n + 1})
    http, urls = replicas[0].http, [r.admin_url for r in replicas]
    flags = await eventually(
        lambda: held(http, urls), lambda f: sorted(f) == [0, 0, 1], what="one holder"
    )
    holder = flags.index(1)
    # Its census counted the three (written into its lease too).
    await eventually(
        lambda: lease_in(store), lambda lease: (lease["census"] or {}).get("pending") == 3
    )

    before = [await readings(http, url) for url in urls]
    rounds = "receiver_housekeeping_rounds_total"  # holder's or standby's, one a round
    await eventually(
        lambda: readings(http, urls[holder]),
        lambda now: now.get(rounds, 0) >= before[holder].get(rounds, 0) + 5,
        what="five housekeeping rounds",
    )
    after = [await readings(http, url) for url in urls]
    assert await held(http, urls) == flags  # nobody took it over meanwhile

    for n, (then, now) in enumerate(zip(before, after, strict=True)):
        moved = spent(then, now)
        ticks = moved.get("receiver_poll_ticks_total", 0)
        lists = moved.get("s3:list_objects_v2", 0)
        work = {k: v for k, v in moved.items() if k.startswith("housekeeping:")}
        if n == holder:
            # Each round: the census lists due/ and deadlines/, the janitor the uploads (of
            # the prefix, and of the start-up probes); LISTs beside the ticks' one each. (The
            # window may cut a round in two.)
            began = moved[rounds]
            census = work["housekeeping:census:list_objects_v2"]
            assert 2 * (began - 1) <= census <= 2 * (began + 1), work
            assert work["housekeeping:janitor:list_multipart_uploads"] >= 2 * (began - 1)
            assert work["housekeeping:lease:put_object"] >= began
            assert lists >= ticks + census - 1, sorted(moved.items())
        else:
            # Only the ticks list (one LIST each: nothing is due for an hour); housekeeping
            # read the lease, one GET a round, and did nothing else.
            assert abs(lists - ticks) <= 1, sorted(moved.items())
            assert "s3:list_multipart_uploads" not in moved
            assert set(work) == {"housekeeping:lease:get_object"}, work
            assert (
                moved[rounds] >= 3
                and abs(work["housekeeping:lease:get_object"] - moved[rounds]) <= 1
            )

    # /metrics: the census on the holder only (a sum across replicas counts each request
    # once); the console: the census on every replica (the others read it from the lease).
    assert [r.get("receiver_pending_requests") for r in after] == [
        3.0 if n == holder else None for n in range(3)
    ]
    assert [await console_in_progress(url) for url in urls] == ["3", "3", "3"]


async def test_a_killed_holder_is_replaced_within_a_lease_a_stopped_one_at_once(
    service_processes: Callable[..., ServiceProcess], store: Bucket, simulator: Simulator
) -> None:
    # A round every 2 s (ticks of 0.2 s), a lease of 6 s.
    settings = {"POLL_INTERVAL_SECONDS": "1", "SHUTDOWN_DRAIN_SECONDS": "0.1"}
    lease_seconds, round_seconds = 6.0, 2.0
    replicas = [service_processes(**settings) for _ in range(3)]

    def holding(lease: dict[str, Any], among: Sequence[ServiceProcess]) -> ServiceProcess | None:
        for replica in among:
            assert replica.proc is not None
            if lease["holder"].split("/")[1] == str(replica.proc.pid):
                return replica
        return None

    async with aiohttp.ClientSession() as http:
        flags = await eventually(
            lambda: held(http, [r.admin_url for r in replicas]),
            lambda f: sorted(f) == [0, 0, 1],
            what="one holder",
        )
        first = replicas[flags.index(1)]
        assert holding(await lease_in(store), replicas) is first

        first.kill()  # SIGKILL: its lease stays as it was until it runs out
        killed = await lease_in(store)
        ran_out = parse_isoformat(killed["until"])
        rest = [r for r in replicas if r is not first]
        taken = await eventually(
            lambda: lease_in(store),
            lambda lease: holding(lease, rest) is not None,
            timeout=lease_seconds * 3,
            what="a survivor holding the lease",
        )
        taken_at = parse_isoformat(taken["until"]) - timedelta(seconds=lease_seconds)
        # Not before the dead holder's lease ran out; then at its successor's next look.
        assert ran_out <= taken_at <= ran_out + timedelta(seconds=lease_seconds)
        second = holding(taken, rest)
        assert second is not None
        await eventually(
            lambda: held(http, [r.admin_url for r in rest]),
            lambda f: f == [1 if r is second else 0 for r in rest],
        )

        # A stopped holder writes its lease expired: the third takes over at its next round,
        # long before the stopped one's lease would have run out.
        third = next(r for r in rest if r is not second)
        before_stop = parse_isoformat((await lease_in(store))["until"])
        assert second.stop() == 0
        taken = await eventually(
            lambda: lease_in(store),
            lambda lease: holding(lease, [third]) is third,
            timeout=round_seconds * 3,
            what="the third replica holding the lease",
        )
        taken_at = parse_isoformat(taken["until"]) - timedelta(seconds=lease_seconds)
        assert taken_at < before_stop
        assert await held(http, [third.admin_url]) == [1]


async def test_the_lease_is_taken_conditionally_one_of_two_racing_wins(
    s3_endpoint: str, bucket: str, s3_proxy: TcpProxy, store: Bucket
) -> None:
    """Two replicas look at the lease at the same moment; the slower one's write is refused
    by its condition (`If-None-Match: *` when absent, `If-Match` when expired), whatever the
    order its S3 answers come in. Then eight at once: one winner."""
    clock = FixedClock(utcnow())
    fast_settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    slow_settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_proxy.url)
    s3_proxy.latency = 0.5  # the slow replica's answers (its GET, too) come late
    async with s3_client(fast_settings) as fast_s3, s3_client(slow_settings) as slow_s3:
        slow_metrics = Metrics()
        fast = Lease(ArchiveStore(fast_s3, fast_settings, Metrics()), 60, clock, "h/1/fast")
        slow = Lease(ArchiveStore(slow_s3, slow_settings, slow_metrics), 60, clock, "h/2/slow")

        async def race() -> list[bool]:
            sent = s3_proxy.bytes_to_target
            slow_take = asyncio.create_task(slow.take())
            # Its GET has reached S3 (the answer, the lease as it is now, comes late).
            await eventually(lambda: s3_proxy.bytes_to_target, lambda n: n > sent)
            return [await fast.take(), await slow_take]

        def refused() -> float:
            return (
                slow_metrics.registry.get_sample_value(
                    "receiver_s3_request_duration_seconds_count",
                    {"operation": "put_object", "outcome": "precondition_failed"},
                )
                or 0.0
            )

        assert await race() == [True, False]  # absent: If-None-Match refuses the slow one
        assert refused() == 1 and (await lease_in(store))["holder"] == "h/1/fast"

        clock.advance(timedelta(seconds=61))  # the fast one's lease has run out
        assert await race() == [True, False]  # expired: If-Match refuses the slow one
        assert refused() == 2 and (await lease_in(store))["holder"] == "h/1/fast"

        clock.advance(timedelta(seconds=61))
        stores = [ArchiveStore(fast_s3, fast_settings, Metrics()) for _ in range(8)]
        many = [Lease(s, 60, clock, f"h/{n}/many") for n, s in enumerate(stores)]
        won = await asyncio.gather(*(lease.take() for lease in many))
        assert won.count(True) == 1
        assert (await lease_in(store))["holder"] == many[won.index(True)].holder
