"""Poller drain: N requests pending at the service and at Copernica become ready over time;
no callback comes, so the service's own poller alone archives them. How close does it get to
the rate limit (COPERNICA_MAX_RPS), and does it ever exceed it?

1. **Seed.** The requests are filed through the service's own API (`POST /v1/data-requests`)
   of an in-process instance of the service's app whose poller is stopped, with a high rate
   limit and no `PUBLIC_BASE_URL` (so Copernica gets no `report` address and sends no
   callback). Each filing leaves what it always leaves: a schedule marker, the record
   (`pending`) and a request at the simulator (not ready for an hour).
2. **Drain.** The real service (`python -m service serve`, its own process) starts with the
   limit under test and `POLL_INTERVAL_SECONDS=1`, so the interval never holds the poller
   back: every pending request is due all the time. From then on ("first readiness") the
   benchmark makes the requests ready at the simulator (`/_sim/requests/{id}/ready`), oldest
   first, evenly over the first `--spread` of the ideal time. It stops the clock when the
   service's `receiver_poll_visits_total` shows all of them archived.

Ideal time: the simulator answers all three readiness forms, so the client asks
`datarequest/{id}/status` (`pending` or `available`) and, once available, GETs
`datarequest/{id}/data`: a ready request needs two Copernica calls, and a visit that finds
it still pending costs one. (`--form data` or `--form old` leaves only that form: one call
per visit.) A perfect poller spending exactly COPERNICA_MAX_RPS calls per second, never
asking too early, finishes at the `ideal` below: N x calls-per-request / rate, or later if the
requests become ready later than it could fetch them. The calls per second and the most
calls in any one second are read from the arrival times the simulator records
(bench/simulator.py); S3 calls, ticks and visits from the service's /metrics; CPU from /proc.

    .venv/bin/python bench/poller.py [--count N] [--rps R] [--spread F] [--form status]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Stack, append_results, cpu_seconds, free_port
from service.app import POLLER, create_app
from service.config import SERVE_REQUIRES, Settings
from service.logs import configure_logging

DEFAULT_COUNT = 1000
DEFAULT_RPS = 20.0
POLL_INTERVAL = "1"
TICK_PAUSE = 0.2  # the poller's pause between ticks: POLL_INTERVAL_SECONDS / 5
SEED_CONCURRENCY = 32
FORMS = {"status": ["status", "data", "old"], "data": ["data"], "old": ["old"]}
CALLS_PER_REQUEST = {"status": 2, "data": 1, "old": 1}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- reading the service's /metrics -----------------------------------------------------------


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found and not line.startswith("#"):
            labels = dict(_LABEL.findall(found.group(2) or ""))
            samples.append((found.group(1), labels, float(found.group(3))))
    return samples


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **match: str) -> float:
    return sum(
        value
        for sample, labels, value in samples
        if sample == name and all(labels.get(k) == v for k, v in match.items())
    )


def by_label(
    samples: list[tuple[str, dict[str, str], float]], name: str, label: str
) -> dict[str, float]:
    found: dict[str, float] = {}
    for sample, labels, value in samples:
        if sample == name:
            key = labels.get(label, "")
            found[key] = found.get(key, 0.0) + value
    return dict(found)


def archived_count(samples: list[tuple[str, dict[str, str], float]]) -> int:
    visits = by_label(samples, "receiver_poll_visits_total", "outcome")
    return int(visits.get("archived", 0) + visits.get("duplicate", 0))


async def metrics(http: aiohttp.ClientSession, url: str) -> list[tuple[str, dict[str, str], float]]:
    async with http.get(f"{url}/metrics") as answer:
        return parse_metrics(await answer.text())


# -- the phases -------------------------------------------------------------------------------


async def seed(stack: Stack, count: int) -> list[str]:
    """File `count` requests through the service's API (the app in this process, poller
    stopped, no report address); returns Copernica's ids in filing order."""
    port = free_port()
    settings = Settings.from_env(
        stack.service_environment(
            {
                "PORT": str(port),
                "COPERNICA_MAX_RPS": "100000",
                "POLL_INTERVAL_SECONDS": POLL_INTERVAL,
                "PUBLIC_BASE_URL": "",
            }
        ),
        dotenv=None,
        require=SERVE_REQUIRES,
    )
    configure_logging(settings)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    app[POLLER].stop()  # this instance only files; the service under test polls
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ids: list[str] = []
    gate = asyncio.Semaphore(SEED_CONCURRENCY)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=SEED_CONCURRENCY),
            headers={"Authorization": f"Bearer {stack.api}"},
        ) as http:

            async def one(i: int) -> None:
                async with (
                    gate,
                    http.post(
                        f"http://127.0.0.1:{port}/v1/data-requests",
                        json={"email": f"subject-{i}@example.com"},
                    ) as answer,
                ):
                    body = await answer.json()
                    assert answer.status == 202 and body["status"] == "pending", body
                    ids.append(body["copernica_id"])

            await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await runner.cleanup()
    return sorted(ids, key=int)


async def make_ready(
    http: aiohttp.ClientSession, sim: str, ids: list[str], spread: float
) -> list[float]:
    """Make the requests ready oldest first, evenly over `spread` seconds from now; returns
    when each became ready (monotonic clock)."""
    started = time.monotonic()
    times: list[float] = []

    async def ready(cid: str) -> None:
        async with http.post(f"{sim}/_sim/requests/{cid}/ready") as answer:
            assert answer.status == 200, answer.status

    while len(times) < len(ids):
        elapsed = time.monotonic() - started
        due = len(ids) if elapsed >= spread else min(len(ids), int(len(ids) * elapsed / spread) + 1)
        batch = ids[len(times) : due]
        for start in range(0, len(batch), 100):
            await asyncio.gather(*(ready(cid) for cid in batch[start : start + 100]))
        times += [time.monotonic()] * len(batch)
        await asyncio.sleep(0.05)
    return times


async def until_archived(
    http: aiohttp.ClientSession, url: str, count: int, started: float, timeout: float
) -> float | None:
    """Watch /metrics until `count` requests are archived; the time then, or None."""
    shown = started
    while time.monotonic() - started < timeout:
        done = archived_count(await metrics(http, url))
        now = time.monotonic()
        if done >= count:
            return now
        if now - shown >= 15:
            log(f"  {now - started:6.1f} s: {done}/{count} archived")
            shown = now
        await asyncio.sleep(0.1)
    return None


def ideal_seconds(ready: list[float], start: float, calls: int, rps: float) -> float:
    """A poller spending exactly `rps` calls per second, each request once it is ready."""
    clock = start
    for moment in sorted(ready):
        clock = max(clock, moment) + calls / rps
    return clock - start


def most_in_window(times: list[float], width: float = 1.0) -> int:
    """The most calls in any window of `width` seconds (same rule as the simulator)."""
    times = sorted(times)
    return max(
        (i - bisect.bisect_right(times, t - width) + 1 for i, t in enumerate(times)), default=0
    )


def s3_objects(stack: Stack, prefix: str) -> int:
    import botocore.session

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=stack.endpoint, region_name="us-east-1"
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
    return sum(page.get("KeyCount", 0) for page in pages)


# -- the run ----------------------------------------------------------------------------------


async def run(count: int, rps: float, spread: float, form: str, payload: int, record: bool) -> int:
    began = time.monotonic()
    stack = Stack(
        simulator=["bench/simulator.py"], simulator_args=["--payload-size", str(payload)]
    ).start(service=False)
    sim = f"http://127.0.0.1:{stack.sim_port}"
    moto, simulator = stack.procs[0], stack.sim
    calls = CALLS_PER_REQUEST[form]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            async with http.post(
                f"{sim}/_sim/config", json={"readiness_forms": FORMS[form]}
            ) as answer:
                assert answer.status == 200, await answer.text()

            log(f"seeding {count} pending requests ...")
            seeded = time.monotonic()
            ids = await seed(stack, count)
            seed_s = time.monotonic() - seeded
            log(f"  {count} filed in {seed_s:.1f} s ({count / seed_s:.0f}/s)")
            assert len(ids) == count
            assert await asyncio.to_thread(s3_objects, stack, "copernica/due/") == count

            async with http.post(f"{sim}/_sim/bench/reset") as answer:
                assert answer.status == 200
            env = {
                "COPERNICA_MAX_RPS": f"{rps:g}",
                "POLL_INTERVAL_SECONDS": POLL_INTERVAL,
                "PUBLIC_BASE_URL": "",
                "SHUTDOWN_DRAIN_SECONDS": "0",
            }
            service = stack.start_service(env)
            expected = count * calls / rps
            log(f"draining at {rps:g} calls/s (ideal ~{expected:.0f} s) ...")
            cpu = {
                name: cpu_seconds(proc.pid)
                for name, proc in (("service", service), ("moto", moto), ("sim", simulator))
            }
            start = time.monotonic()  # the first request becomes ready now
            readiness = asyncio.create_task(make_ready(http, sim, ids, spread * expected))
            end = await until_archived(http, stack.admin_url, count, start, 3 * expected + 60)
            cpu = {
                name: cpu_seconds(proc.pid) - cpu[name]
                for name, proc in (("service", service), ("moto", moto), ("sim", simulator))
            }
            ready = await readiness
            final = await metrics(http, stack.admin_url)
            async with http.get(f"{sim}/_sim/bench/calls") as answer:
                seen = await answer.json()
            archives = await asyncio.to_thread(s3_objects, stack, "copernica/archive/")
            markers = await asyncio.to_thread(s3_objects, stack, "copernica/due/")
    finally:
        stack.stop()
    took = time.monotonic() - began
    if end is None:
        log(f"FAILED: not all {count} archived within {3 * expected + 60:.0f} s")
        return 1

    drain = end - start
    ideal = ideal_seconds(ready, start, calls, rps)
    times: list[float] = seen["times"]
    window = sorted(t for t in times if start <= t <= end)
    before = sum(1 for t in times if t < start)
    s3 = by_label(final, "receiver_s3_request_duration_seconds_count", "operation")
    s3_total = sum(s3.values())
    ticks = total(final, "receiver_poll_ticks_total")
    visits = by_label(final, "receiver_poll_visits_total", "outcome")
    copernica = {
        f"{labels['endpoint']} {labels['status']}": int(value)
        for sample, labels, value in final
        if sample == "receiver_copernica_requests_total"
    }
    rate = len(window) / drain
    # Calls in each whole second of the drain: where the poller left the budget unused.
    per_second = Counter(int(t - start) for t in window)
    bins = [per_second.get(i, 0) for i in range(int(drain))]
    short = [i for i, n in enumerate(bins) if n < 0.9 * rps]
    seconds = by_label(final, "receiver_s3_request_duration_seconds_sum", "operation")
    latency = {op: seconds.get(op, 0.0) / n * 1000 for op, n in s3.items() if n}
    ok = archives == count and markers == 0 and seen["deliveries"] == 0
    row = (
        f"| {count:,} | {rps:g} | {form} | {drain:.1f} | {ideal:.1f} | {ideal / drain:.2f} | "
        f"{rate:.1f} | {rate / rps:.2f} | {seen['max_rps']} | {s3_total / ticks:.0f} | "
        f"{s3.get('list_objects_v2', 0) / ticks:.2f} | {s3_total / count:.1f} | "
        f"{cpu['service'] / drain:.0%} / {cpu['moto'] / drain:.0%} | "
        f"{cpu['service'] / count * 1000:.1f} |"
    )
    lines = [
        "| pending | limit (calls/s) | readiness form | drain s | ideal s | ideal/drain | "
        "Copernica calls/s | ÷ limit | max calls in any 1 s | S3 calls/tick | LISTs/tick | "
        "S3 calls/archived | CPU service / moto (of one core) | service CPU ms/archived |",
        "|" + " --- |" * 14,
        row,
        "",
        f"- readiness spread evenly over the first {spread * expected:.1f} s "
        f"({spread:.0%} of N x {calls} / limit); drain = first readiness to last archived; "
        f"ideal = a poller spending exactly the limit, {calls} call(s) per ready request",
        f"- checks: {archives} archive objects for {count} requests, {markers} schedule "
        f"markers left, {seen['deliveries']} callbacks sent: {'ok' if ok else 'FAILED'}",
        f"- Copernica calls seen by the simulator: {len(window)} in the drain, {before} before "
        f"the first readiness; most in any 1 s: {seen['max_rps']} (simulator), "
        f"{most_in_window(window)} (drain only); by the service: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(copernica.items())),
        "- poll visits: "
        + ", ".join(f"{k} {int(v)}" for k, v in sorted(visits.items()))
        + f"; ticks {int(ticks)}",
        "- S3 calls per archived request: "
        + ", ".join(f"{op} {n / count:.2f}" for op, n in sorted(s3.items()))
        + "; mean latency ms: "
        + ", ".join(f"{op} {ms:.1f}" for op, ms in sorted(latency.items())),
        f"- Copernica calls per whole second of the drain: median {statistics.median(bins):g}, "
        f"min {min(bins)}; {len(short)} of {len(bins)} seconds below 90% of the limit"
        + (
            f" (at s {', '.join(map(str, short[:12]))}{' ...' if len(short) > 12 else ''})"
            if short
            else ""
        ),
        f"- ticks: {int(ticks)} (a pause of ~{TICK_PAUSE:g} s only after a tick that was not a "
        f"full batch); {seconds.get('list_objects_v2', 0):.1f} s in "
        f"{int(s3.get('list_objects_v2', 0))} LISTs (the schedule, and every 10th tick, beside "
        f"the visits, a census of all markers)",
        f"- CPU seconds in the drain: service {cpu['service']:.1f}, moto {cpu['moto']:.1f}, "
        f"simulator {cpu['sim']:.1f}; seeding {seed_s:.1f} s ({count / seed_s:.0f} filings/s); "
        f"whole run {took:.0f} s",
    ]
    print("\n".join(lines), flush=True)
    parts = [f"{count:,} pending"] if count != DEFAULT_COUNT else []
    parts += [f"{rps:g} calls/s"] if rps != DEFAULT_RPS else []
    parts += [f"{form} form"] if form != "status" else []
    title = "Poller drain" + (f" ({', '.join(parts)})" if parts else "")
    if record:
        append_results(title, lines)
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="pending requests")
    parser.add_argument(
        "--rps", type=float, default=DEFAULT_RPS, help="COPERNICA_MAX_RPS of the service"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=0.5,
        help="readiness spread over this fraction of the ideal time (default 0.5)",
    )
    parser.add_argument("--form", choices=sorted(FORMS), default="status")
    parser.add_argument("--payload-size", type=int, default=20_000, help="bytes per result")
    parser.add_argument("--no-record", action="store_true", help="leave bench/RESULTS.md alone")
    args = parser.parse_args()
    sys.exit(
        asyncio.run(
            run(args.count, args.rps, args.spread, args.form, args.payload_size, not args.no_record)
        )
    )


if __name__ == "__main__":
    main()
