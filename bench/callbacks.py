"""Callback throughput, CPU and latency: the service against a floor, side by side in one run.

The floor (bench/floor.py) reads the same body and does one bare `put_object` to the same
local S3, with payload signing off as the service's client (botocore's default over https).
The load comes from this process (a separate one from the servers), bounded in count. For
each body size and concurrency it prints req/s, CPU seconds per callback of the server
process, p50/p99 latency, and the ratios. Three sides take turns in a row: the service, the
floor and the checked floor (floor.py's /checked: the floor plus the SHA-256 and the full
JSON validation no receiver can skip), up to eight turns each, in the order service, floor,
checked, then the reverse, so a drift of the shared machine's load weighs on all alike.
Each side first gets one untimed turn at the row's concurrency: the first burst of a size
grows a process's heap, which a replica under load has done long before.

A replica also runs its poller: a tick's LIST of `due/` every 10 s, housekeeping (listing
every open request for /metrics) every 100 s. Their CPU is not the callbacks', and in a
turn of a fraction of a second it can double a row's. The replica's own /metrics tell: a
service turn in which it listed anything (a callback never lists) is measured again with
fresh requests, up to five times; "turns again" counts those. The run sets
POLL_INTERVAL_SECONDS to an hour, so no visit of the benchmark's own requests (which would
build their packages) falls in it. What a LIST costs is measured apart (bench/listing.py).

The callbacks go to the `report` addresses the service gave Copernica when it filed the
requests, read back from the simulator: the production path
(`/callbacks/datarequest/{id}/{subject}/{token}`). Two replicas of the service run on the
same S3: "warm" rows send to the replica that filed the requests, "cold" rows to a second
one that neither filed nor polled them. "cold, earlier URL" rows send the address of the
previous release (`/callbacks/datarequest/{id}/{token}`, still valid) to the second
replica: its subject check reads the request record. "cold, repeat" rows deliver each
callback a second time, to the second replica, after the first replica archived it (200 to
Copernica, no second object): a body of one part streams again and its conditional write
ends in a 412; a larger one stops at its first part, whose HEAD finds the archive. The row
shows what that costs, and the notes how many of its S3 calls were 412s.

Bodies larger than one S3 part are also compared with a bare multipart upload of the same
bytes (floor.py's /multipart: same part size, two parts in flight, no checks): the service
must not hold such a body whole, so that is the least it can do.

Targets (issue 13): 2 KB warm and cold >= 0.9x the floor's throughput and <= 1.3x its CPU;
1 MB <= 1.3x its CPU. About 10 minutes on 2 cores (`--quick`: about 4); 13-16 on a slower machine.

    .venv/bin/python bench/callbacks.py [--quick] [--sizes "1 MB"] [--concurrency 16]
        [--s3 moto|seaweedfs]

`--s3 seaweedfs` (or BENCH_S3=seaweedfs) runs it all on SeaweedFS (deploy/seaweedfs.py, one
`weed mini`): the replicas and the floors on the same store, its table a section of its own
in bench/RESULTS.md ("... on SeaweedFS"). A run of some sizes or concurrencies only
(`--sizes`, `--concurrency`, for trying a change) prints its rows and records nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import (
    Stack,
    append_results,
    cpu_seconds,
    free_port,
    on_store,
    sized_body,
    store_argument,
    wait_for,
)
from service.config import Secret
from service.intake.urls import callback_url

SUBJECT = "bench@example.com"
SIZES = {"2 KB": (2_000, 480), "1 MB": (1_000_000, 256), "20 MB": (20_000_000, 16)}
SLICES = 8  # turns per side in a row at most (even: as many in first place as in last)
CONCURRENCY = (1, 16, 64)
WARM, COLD, EARLIER, REPEAT = "warm", "cold", "cold, earlier URL", "cold, repeat"
# The earlier URL form only where the previous release's README measured it; repeat
# deliveries at one concurrency per size.
EARLIER_AT = {("2 KB", 16), ("1 MB", 16)}
REPEAT_AT = {("2 KB", 16), ("1 MB", 16), ("20 MB", 16)}
PART_BYTES = 8 * 1024 * 1024  # the service's default S3_PART_BYTES
MEASURE_ATTEMPTS = 5  # a service turn disturbed by the poller is measured again, this often
TARGETS = {  # (size, replicas): (least throughput ratio, most CPU ratio)
    ("2 KB", WARM): (0.9, 1.3),
    ("2 KB", COLD): (0.9, 1.3),
    ("1 MB", WARM): (None, 1.3),
    ("1 MB", COLD): (None, 1.3),
}


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    admin_url: str


@dataclass
class Row:
    size: str
    replicas: str
    concurrency: int
    ratio: float
    cpu_ratio: float
    checked_ratio: float  # the checked floor's CPU over the bare floor's
    text: str
    calls: float = 0.0  # S3 calls per callback, LISTs aside
    refused: float = 0.0  # of them answered 412 (a repeat's conditional write)


PRECONDITION_FAILED = "precondition_failed"
Calls = dict[tuple[str, str], float]  # (operation, outcome): S3 calls so far


async def s3_calls(http: aiohttp.ClientSession, admin_url: str) -> Calls:
    """The replica's S3 calls so far, by operation and outcome (from its /metrics)."""
    async with http.get(f"{admin_url}/metrics") as answer:
        text = await answer.text()
    calls: Calls = {}
    for line in text.splitlines():
        if line.startswith("receiver_s3_request_duration_seconds_count{"):
            operation = line.split('operation="', 1)[1].split('"', 1)[0]
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            calls[operation, outcome] = float(line.rsplit(" ", 1)[1])
    return calls


def others(before: Calls, after: Calls) -> float:
    """LISTs in a turn: a callback never lists, the replica's poller does (a tick lists
    `due/`, housekeeping lists the open requests and uploads)."""
    return sum(n - before.get(k, 0.0) for k, n in after.items() if k[0].startswith("list_"))


def s3_calls_between(before: Calls, after: Calls) -> tuple[float, float]:
    """(S3 calls, LISTs aside; of them answered 412) between two readings."""
    delta = {key: n - before.get(key, 0.0) for key, n in after.items()}
    calls = sum(n for (op, _), n in delta.items() if not op.startswith("list_"))
    refused = sum(n for (_, outcome), n in delta.items() if outcome == PRECONDITION_FAILED)
    return calls, refused


async def drive(
    http: aiohttp.ClientSession, urls: list[str], body: bytes, concurrency: int
) -> tuple[float, list[float]]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(url: str) -> None:
        async with gate:
            started = time.perf_counter()
            async with http.post(url, data=body) as answer:
                await answer.read()
                assert answer.status == 200, (answer.status, url)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(url) for url in urls))
    return time.perf_counter() - started, latencies


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] * 1000
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def file_requests(http: aiohttp.ClientSession, stack: Stack, n: int) -> dict[str, str]:
    """File n requests; {request id: the `report` address}, checked to be the current form."""
    reports = await stack.file_requests(http, SUBJECT, n)
    for rid, report in reports.items():
        # The current form: id, subject digest (64 hex), token.
        prefix = f"{stack.url}/callbacks/datarequest/{rid}/"
        subject, _, token = report.removeprefix(prefix).partition("/")
        assert report.startswith(prefix) and len(subject) == 64 and token, report
    return reports


async def measure(
    stack: Stack,
    http: aiohttp.ClientSession,
    replica: Replica,
    how: str,
    floor: subprocess.Popen[bytes],
    floor_port: int,
    body: bytes,
    n: int,
    concurrency: int,
    first_to: Replica | None = None,
) -> tuple[Row, int]:
    """One row: n callbacks each to the replica, the floor and the checked floor, in turns;
    and how many service turns were measured again because the replica's poller made S3
    calls during them (their CPU is not the callbacks'). With `first_to`, every callback
    was delivered and archived there first, untimed: the row measures the repeats."""

    async def addresses(count: int) -> list[str]:
        reports = await file_requests(http, stack, count)
        if first_to is not None:
            firsts = [report.replace(stack.url, first_to.url, 1) for report in reports.values()]
            await drive(http, firsts, body, concurrency)
        if how == EARLIER:
            return [callback_url(replica.url, Secret(stack.secret), rid) for rid in reports]
        return [report.replace(stack.url, replica.url, 1) for report in reports.values()]

    async def service_turn(
        urls: list[str],
    ) -> tuple[float, float, list[float], int, tuple[float, float]]:
        """(seconds, CPU, latencies, turns discarded, (S3 calls, 412s)) of one undisturbed
        turn."""
        for attempt in range(MEASURE_ATTEMPTS):
            before = await s3_calls(http, replica.admin_url)
            cpu_before = cpu_seconds(replica.proc.pid)
            seconds, latencies = await drive(http, urls, body, concurrency)
            cpu = cpu_seconds(replica.proc.pid) - cpu_before
            after = await s3_calls(http, replica.admin_url)
            if not others(before, after) or attempt == MEASURE_ATTEMPTS - 1:
                return seconds, cpu, latencies, attempt, s3_calls_between(before, after)
            urls = await addresses(len(urls))
        raise AssertionError("unreachable")

    base = f"http://127.0.0.1:{floor_port}"
    # One untimed turn per side at the row's concurrency first: a process meeting its first
    # burst of this size grows its heap, which a replica under load has done long before.
    # (A body of several parts is buffered a part at a time: one callback does.)
    burst = concurrency if len(body) <= PART_BYTES else 1
    warm_up = [
        *await addresses(burst),
        *(f"{base}/put/w{time.time_ns()}-{k}" for k in range(burst)),
        *(f"{base}/checked/w{time.time_ns()}-{k}" for k in range(burst)),
    ]
    for k in range(0, len(warm_up), burst):
        await drive(http, warm_up[k : k + burst], body, concurrency)
    urls = await addresses(n)
    floor_urls = [f"{base}/put/f{time.time_ns()}-{k}" for k in range(n)]
    checked_urls = [f"{base}/checked/c{time.time_ns()}-{k}" for k in range(n)]
    took = service_cpu = s3 = refused = 0.0
    lat: list[float] = []
    floors = {"f": [0.0, 0.0, []], "c": [0.0, 0.0, []]}  # seconds, CPU, latencies
    discarded = 0
    # Slices in the order service, floor, checked floor, then the reverse, and so on: each
    # side runs as often first as last, and many short turns average out the machine's drift.
    slices = max(2, min(SLICES, n // concurrency) // 2 * 2)  # each turn at full concurrency
    step = n // slices
    sliced = {"s": urls, "f": floor_urls, "c": checked_urls}
    turns = [
        (side, sliced[side][i * step : (i + 1) * step])
        for i in range(slices)
        for side in ("s", "f", "c")[:: 1 if i % 2 == 0 else -1]
    ]
    for side, part in turns:
        if side == "s":
            seconds, cpu, latencies, again, (calls, refusals) = await service_turn(part)
            took, service_cpu, lat = took + seconds, service_cpu + cpu, lat + latencies
            discarded += again
            s3, refused = s3 + calls, refused + refusals
        else:
            cpu_before = cpu_seconds(floor.pid)
            seconds, latencies = await drive(http, part, body, concurrency)
            totals = floors[side]
            totals[0] += seconds
            totals[1] += cpu_seconds(floor.pid) - cpu_before
            totals[2] += latencies
    floor_took, floor_cpu, floor_lat = floors["f"]
    checked_cpu = floors["c"][1] / n
    service_cpu, floor_cpu = service_cpu / n, floor_cpu / n
    multipart = "— | —"
    if len(body) > PART_BYTES:
        parts_urls = [f"{base}/multipart/m{time.time_ns()}-{k}" for k in range(n)]
        parts_took, _ = await drive(http, parts_urls, body, concurrency)
        multipart = f"{n / parts_took:.1f} | {parts_took / took:.2f}"
    ratio, cpu_ratio = floor_took / took, service_cpu / max(floor_cpu, 1e-9)
    checked_ratio = checked_cpu / max(floor_cpu, 1e-9)
    text = (
        f"{n / took:.1f} | {n / floor_took:.1f} | {ratio:.2f} | "
        f"{service_cpu * 1000:.1f} | {floor_cpu * 1000:.1f} | {cpu_ratio:.2f} | "
        f"{checked_cpu * 1000:.1f} | {checked_ratio:.2f} | "
        f"{service_cpu / max(checked_cpu, 1e-9):.2f} | "
        f"{pct(lat, 50):.0f}/{pct(lat, 99):.0f} | "
        f"{pct(floor_lat, 50):.0f}/{pct(floor_lat, 99):.0f} | {s3 / n:.1f} | {discarded} | "
        f"{multipart} |"
    )
    row = Row("", "", concurrency, ratio, cpu_ratio, checked_ratio, text, s3 / n, refused / n)
    return row, discarded


def repeat_reading(row: Row) -> str:
    """What a repeat row's S3 calls say, where they say it plainly."""
    if row.calls and abs(row.refused - row.calls) < 0.05:
        return " (the body was taken whole, then its one write refused)"
    if abs(row.calls - 1) < 0.05 and row.refused < 0.05:
        return " (no write: the HEAD before the first part found the archive)"
    return ""


def verdicts(rows: list[Row]) -> list[str]:
    """One line per target: the rows it covers, worst first."""
    lines = []
    for (size, replicas), (least, most) in TARGETS.items():
        covered = [r for r in rows if r.size == size and r.replicas == replicas]
        if not covered:
            continue
        parts = []
        ok = True
        if least is not None:
            ratios = [r.ratio for r in covered]
            ok &= min(ratios) >= least
            parts.append(
                f"throughput {' / '.join(f'{x:.2f}' for x in ratios)}x (target >= {least})"
            )
        cpus = [r.cpu_ratio for r in covered]
        ok &= max(cpus) <= most
        parts.append(f"CPU {' / '.join(f'{x:.2f}' for x in cpus)}x (target <= {most})")
        checked = " / ".join(f"{r.checked_ratio:.2f}" for r in covered)
        parts.append(f"the checked floor's CPU {checked}x")
        if max(r.checked_ratio for r in covered) > most:
            parts.append(
                f"the required work alone (the checked floor) is over {most}x here; "
                f"the service against it: "
                + " / ".join(f"{r.cpu_ratio / r.checked_ratio:.2f}" for r in covered)
                + "x"
            )
        conc = "/".join(str(r.concurrency) for r in covered)
        lines.append(
            f"- {size} {replicas}, concurrency {conc}: {'; '.join(parts)}: "
            f"{'holds' if ok else 'MISSED'}"
        )
    return lines


async def run(quick: bool, sizes: list[str], concurrencies: list[int], store: str) -> None:
    # No poller visit (a package build) of the benchmark's requests falls within the run.
    stack = Stack(
        service_env={"SHUTDOWN_DRAIN_SECONDS": "0", "POLL_INTERVAL_SECONDS": "3600"},
        store=store,
    ).start()
    floor_port = free_port()
    floor = stack.spawn(
        ["bench/floor.py", str(floor_port), stack.endpoint, stack.bucket], port=floor_port
    )
    # A second replica: same secret, bucket and public base URL, its own listeners.
    port, admin_port = free_port(), free_port()
    second = stack.spawn(
        ["-m", "service", "serve"],
        env=stack.service_environment({"PORT": str(port), "ADMIN_PORT": str(admin_port)}),
        port=port,
    )
    wait_for(admin_port)
    replicas = {
        WARM: Replica(stack.service, stack.url, stack.admin_url),
        COLD: Replica(second, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"),
    }
    replicas[EARLIER] = replicas[REPEAT] = replicas[COLD]
    rows = [
        "| size | replica | conc | service req/s | floor req/s | ratio | service CPU ms/cb | "
        "floor CPU ms/cb | CPU ratio | checked floor CPU ms/cb | checked/floor | "
        "service/checked | service p50/p99 ms | floor p50/p99 ms | "
        "S3 calls/cb | turns again | bare multipart req/s | ratio to it |",
        "|" + " --- |" * 18,
    ]
    measured: list[Row] = []
    discarded = 0
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600),
            connector=aiohttp.TCPConnector(limit=200),
        ) as http:
            for name in sizes:
                size, count = SIZES[name]
                if quick:
                    count = max(4, count // 4)
                body = sized_body(SUBJECT, size)
                for concurrency in concurrencies:
                    ways = [WARM, COLD] + ([EARLIER] if (name, concurrency) in EARLIER_AT else [])
                    ways += [REPEAT] if (name, concurrency) in REPEAT_AT else []
                    for how in ways:
                        row, again = await measure(
                            stack,
                            http,
                            replicas[how],
                            how,
                            floor,
                            floor_port,
                            body,
                            max(count, concurrency),
                            concurrency,
                            first_to=replicas[WARM] if how == REPEAT else None,
                        )
                        row.size, row.replicas = name, how
                        measured.append(row)
                        text = row.text
                        discarded += again
                        rows.append(f"| {name} | {how} | {concurrency} | {text}")
                        print(rows[-1], flush=True)
    finally:
        stack.stop()
    notes = [
        "",
        f"Targets (issue 13), ratios to the floor by concurrency (S3: {stack.store_name}, "
        "the service's and the floors' one store):",
        *verdicts(measured),
        *(
            f"- {r.size} {r.replicas}, concurrency {r.concurrency}: {r.calls:.1f} S3 calls "
            f"per callback, {r.refused:.1f} of them answered 412{repeat_reading(r)}"
            for r in measured
            if r.replicas == REPEAT
        ),
        f"- {discarded} service turns measured again: the replica's poller listed during "
        "them (a tick, housekeeping); S3 calls/cb counts the kept turns' calls, LISTs aside",
        f"- whole run {time.perf_counter() - started:.0f} s",
    ]
    print("\n".join(rows + notes))
    if sizes != list(SIZES) or concurrencies != list(CONCURRENCY):
        return
    title = on_store("Callback throughput: service vs floor", store)
    title += " (quick run)" if quick else ""
    # A full run's table supersedes a quick one's.
    append_results(title, rows + notes, replaces=() if quick else (f"{title} (quick run)",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests")
    parser.add_argument(
        "--sizes",
        default=",".join(SIZES),
        help="comma-separated, of %(default)s; not all: nothing is recorded",
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="comma-separated, of %(default)s; not all: nothing is recorded",
    )
    store_argument(parser)
    args = parser.parse_args()
    sizes = [name.strip() for name in args.sizes.split(",")]
    if unknown := set(sizes) - set(SIZES):
        parser.error(f"unknown sizes: {', '.join(sorted(unknown))}")
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: whole numbers, of {', '.join(map(str, CONCURRENCY))}")
    if unknown_c := set(concurrencies) - set(CONCURRENCY):
        parser.error(f"unknown concurrency: {', '.join(map(str, sorted(unknown_c)))}")
    asyncio.run(run(args.quick, sizes, concurrencies, args.s3))


if __name__ == "__main__":
    main()
