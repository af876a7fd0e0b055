"""S3 calls per minute of an idle deployment: 1 and 3 replicas, 0 and 100,000 pending requests.

An idle replica makes two kinds of S3 calls: its poll ticks (one LIST each, however many
requests are pending: nothing is due) and housekeeping (census, janitor, backfill, retention:
listings that grow with the pending requests). Housekeeping runs on the one replica holding
its lease (`service/collect/housekeeping.py`); the others read the lease once a round. So with
3 replicas the census/janitor share must equal one replica's, and only the ticks and the lease
reads grow with replicas.

Runs on SeaweedFS (`deploy/seaweedfs.py`): a census of 100,000 markers is 100 LISTs of a
thousand keys, a few tenths of a second each there; on moto each such page costs seconds
(it renders every page through its templates), which makes the 100k case impractical. The
simulator and the replicas are started as `bench/stack.py` starts them. The 100,000
pending requests are their schedule markers (`due/{time}/{id}`, empty objects, due in 30 days,
ids created over the last days), written through SeaweedFS's filer, many at a time (the
seeding time is printed); nothing else of a pending request takes part in an idle round (its
deadline marker costs the census one LIST either way, as long as it is not overdue).

Time is compressed: the replicas run with POLL_INTERVAL_SECONDS=10 (a tick every 2 s, a
round every 20 s); the calls of each replica's rounds and ticks are counted on its /metrics
(`receiver_housekeeping_s3_requests_total`, `receiver_s3_request_duration_seconds`,
`receiver_housekeeping_rounds_total`, `receiver_poll_ticks_total`) and reported per minute at
the default POLL_INTERVAL_SECONDS=300: a tick every 10 s, a round every 100 s (a round's calls
do not depend on the interval).

    .venv/bin/python bench/idle.py [--pending 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import botocore.session
from ulid import ULID

from bench.stack import Stack, append_results, free_port, wait_for
from deploy.seaweedfs import SeaweedFS
from service.collect.housekeeping import JANITOR_EVERY_TICKS
from service.collect.visits import tick_seconds
from service.requests.schedule import stamp

BENCH_INTERVAL = 10.0
DEFAULT_TICK = tick_seconds(300)  # seconds, at the default POLL_INTERVAL_SECONDS
DEFAULT_ROUND = JANITOR_EVERY_TICKS * DEFAULT_TICK
WORK_PARTS = ("census", "janitor", "backfill", "retention")


async def seed(filer: str, bucket: str, count: int, concurrency: int = 64) -> float:
    """`count` schedule markers through the filer's HTTP API; returns the seconds it took."""
    now = datetime.now(UTC)
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def put(n: int) -> None:
            created = (now - timedelta(seconds=n * 3)).timestamp()
            when = stamp(now + timedelta(days=30, milliseconds=n))
            key = f"copernica/due/{when}/{ULID.from_timestamp(created)}"
            async with gate, http.put(f"{filer}/buckets/{bucket}/{key}", data=b"") as answer:
                assert answer.status < 300, await answer.text()

        await asyncio.gather(*(put(n) for n in range(count)))
    return time.perf_counter() - started


async def readings(http: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """A replica's S3 calls (all, and housekeeping's by part), rounds and ticks."""
    async with http.get(f"{admin_url}/metrics") as answer:
        text = await answer.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        name, _, labels = sample.partition("{")
        label = dict(
            part.split("=", 1) for part in labels.rstrip("}").replace('"', "").split(",") if part
        )
        if name == "receiver_s3_request_duration_seconds_count":
            key = "s3"
        elif name == "receiver_housekeeping_s3_requests_total":
            key = f"hk:{label['part']}"
        elif name == "receiver_housekeeping_rounds_total":
            key = f"rounds:{label['role']}"
        elif name == "receiver_poll_ticks_total":
            key = "ticks"
        else:
            continue
        found[key] = found.get(key, 0.0) + float(value)
    return found


@dataclass
class Share:
    """S3 calls per minute at the default settings, by share."""

    work: float  # census, janitor, backfill, retention
    lease: float
    ticks: float

    @property
    def total(self) -> float:
        return self.work + self.lease + self.ticks


def per_minute(spent: list[dict[str, float]]) -> Share:
    """Each replica's calls per round and per tick, at a round every 100 s and a tick every
    10 s."""
    share = Share(0.0, 0.0, 0.0)
    for moved in spent:
        rounds = moved.get("rounds:holder", 0) + moved.get("rounds:standby", 0)
        work = sum(moved.get(f"hk:{part}", 0) for part in WORK_PARTS)
        lease = moved.get("hk:lease", 0)
        housekeeping = sum(v for k, v in moved.items() if k.startswith("hk:"))
        share.work += work / rounds * 60 / DEFAULT_ROUND
        share.lease += lease / rounds * 60 / DEFAULT_ROUND
        share.ticks += (moved.get("s3", 0) - housekeeping) / moved["ticks"] * 60 / DEFAULT_TICK
    return share


async def measure(stack: Stack, endpoint: str, bucket: str, replicas: int, rounds: int) -> Share:
    """Start `replicas` on `bucket`, let the holder do a round, count `rounds` more of its
    rounds, stop them (their lease released)."""
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    for _ in range(replicas):
        port, admin = free_port(), free_port()
        env = stack.service_environment(
            {
                "ARCHIVE_BUCKET": bucket,
                "S3_ENDPOINT_URL": endpoint,
                "PORT": str(port),
                "ADMIN_PORT": str(admin),
                "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
                "POLL_INTERVAL_SECONDS": str(BENCH_INTERVAL),
                "SHUTDOWN_DRAIN_SECONDS": "0.1",
            }
        )
        procs.append(stack.spawn(["-m", "service", "serve"], env=env, port=port))
        wait_for(admin)
        urls.append(f"http://127.0.0.1:{admin}")
    try:
        async with aiohttp.ClientSession() as http:

            async def everyone() -> list[dict[str, float]]:
                return [await readings(http, url) for url in urls]

            def holder_rounds(now: list[dict[str, float]]) -> float:
                return sum(r.get("rounds:holder", 0) for r in now)

            def holder_work(now: list[dict[str, float]]) -> dict[str, float]:
                return {
                    k: v
                    for r in now
                    if r.get("rounds:holder", 0)
                    for k, v in r.items()
                    if k.startswith("hk:")
                }

            async def until(done: float) -> list[dict[str, float]]:
                """Readings once the holder has begun `done` rounds and finished the last
                (its housekeeping calls still for a second: it pauses 16 s or more), every
                replica having ticked and had a round."""
                deadline = time.monotonic() + 900
                last: list[dict[str, float]] = []
                while time.monotonic() < deadline:
                    now = await everyone()
                    if (
                        holder_rounds(now) >= done
                        and last
                        and holder_work(now) == holder_work(last)
                        and all(r.get("ticks") for r in now)
                        and all(r.get("rounds:holder", 0) + r.get("rounds:standby", 0) for r in now)
                    ):
                        return now
                    last = now
                    await asyncio.sleep(1)
                raise RuntimeError(f"{done} holder rounds not reached in 900 s")

            first = await until(1)  # the census of the first round is not measured
            before = await until(holder_rounds(first) + 1)
            after = await until(holder_rounds(before) + rounds)
        spent = [{k: a[k] - b.get(k, 0) for k in a} for b, a in zip(before, after, strict=True)]
        holders = [n for n, moved in enumerate(spent) if moved.get("rounds:holder", 0)]
        assert len(holders) == 1, f"the lease changed hands during the window: {spent}"
        return per_minute(spent)
    finally:
        for proc in procs:
            stack.stop_process(proc)


async def run(pending: int, rounds: int) -> None:
    began = time.perf_counter()
    stack = Stack().start(service=False)  # the simulator (and a moto, unused here)
    directory = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    store = SeaweedFS(directory / "seaweedfs", bucket="idle-empty").start()
    try:
        botocore.session.get_session().create_client(
            "s3", endpoint_url=store.endpoint, region_name="us-east-1"
        ).create_bucket(Bucket="idle-pending")
        seeding = await seed(
            f"http://127.0.0.1:{store.ports['filer.port']}", "idle-pending", pending
        )
        print(f"seeded {pending:,} markers in {seeding:.0f} s", flush=True)
        results: dict[tuple[int, int], Share] = {}
        for count, bucket in ((0, "idle-empty"), (pending, "idle-pending")):
            for replicas in (1, 3):
                results[(replicas, count)] = await measure(
                    stack, store.endpoint, bucket, replicas, rounds
                )
                print(f"{replicas} replica(s), {count:,} pending: {results[(replicas, count)]}")
    finally:
        store.stop()
        stack.stop()
    lines = [
        "| replicas | pending | census/janitor | lease | poll ticks | total |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (replicas, count), share in results.items():
        lines.append(
            f"| {replicas} | {count:,} | {share.work:.1f} | {share.lease:.1f} | "
            f"{share.ticks:.1f} | {share.total:.1f} |"
        )
    one, three = results[(1, pending)], results[(3, pending)]
    lines += [
        "",
        f"S3 calls per minute at the default POLL_INTERVAL_SECONDS=300 (a tick every "
        f"{DEFAULT_TICK:g} s, a round every {DEFAULT_ROUND:g} s), from {rounds} holder rounds "
        f"per row measured with POLL_INTERVAL_SECONDS={BENCH_INTERVAL:g}, on SeaweedFS. "
        "census/janitor: census, janitor, backfill and retention's sweep (only the lease holder "
        "runs them); lease: the holder's renewal and the other replicas' reads, one a round "
        "each; poll ticks: one LIST per tick per replica.",
        "",
        f"With {pending:,} pending, 3 replicas' census/janitor share is "
        f"{three.work / one.work:.2f}x one replica's (before the lease every replica ran it: "
        f"3x). Seeding {pending:,} markers took {seeding:.0f} s; the whole run "
        f"{(time.perf_counter() - began) / 60:.0f} min.",
    ]
    print("\n".join(lines))
    append_results("Idle S3 calls", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.pending, args.rounds))


if __name__ == "__main__":
    main()
