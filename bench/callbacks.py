"""Callback throughput, CPU and latency: the service against a floor, side by side in one run.

The floor (bench/floor.py) reads the same body and does one bare `put_object` to the same
local S3. The load comes from this process (a separate one from both servers), bounded in
count. For each body size and concurrency it prints req/s, CPU seconds per callback of the
server process, p50/p99 latency and S3 calls per callback, and the service/floor ratios.

Rows marked "cold" send the callbacks to a replica that did not file the requests (the
service is restarted between filing and load, so it remembers none): one record read more.
Bodies larger than one S3 part are also compared with a bare multipart upload of the same
bytes (floor.py's /multipart: same part size, two parts in flight, no checks): the service
must not hold such a body whole, so that is the least it can do.

    .venv/bin/python bench/callbacks.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Stack, append_results, cpu_seconds, free_port, sized_body
from service.callbacks import callback_url
from service.config import Secret

SIZES = {"2 KB": (2_000, 240), "1 MB": (1_000_000, 64), "20 MB": (20_000_000, 12)}
CONCURRENCY = (1, 16, 64)
COLD = {("2 KB", 16), ("1 MB", 16)}  # also measured on a replica that did not file them
PART_BYTES = 8 * 1024 * 1024  # the service's default S3_PART_BYTES


async def s3_calls(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as answer:
        text = await answer.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("receiver_s3_request_duration_seconds_count{")
        and "list_objects_v2" not in line
    )


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
                assert answer.status == 200, answer.status
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(url) for url in urls))
    return time.perf_counter() - started, latencies


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] * 1000
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def measure(
    stack: Stack,
    http: aiohttp.ClientSession,
    floor: subprocess.Popen[bytes],
    floor_port: int,
    body: bytes,
    n: int,
    concurrency: int,
    cold: bool,
) -> str:
    """One row: n callbacks to the service, then n bodies to each floor, same concurrency."""
    ids = []
    for _ in range(n):
        async with http.post(
            f"{stack.admin_url}/v1/data-requests",
            json={"email": "bench@example.com"},
            headers={"Authorization": f"Bearer {stack.api}"},
        ) as answer:
            ids.append((await answer.json())["id"])
    if cold:
        stack.restart_service()  # forgets every request it filed
    urls = [callback_url(stack.url, Secret(stack.secret), i) for i in ids]
    calls_before = await s3_calls(http, stack.admin_url)
    cpu_before = cpu_seconds(stack.service.pid)
    took, lat = await drive(http, urls, body, concurrency)
    service_cpu = (cpu_seconds(stack.service.pid) - cpu_before) / n
    calls = (await s3_calls(http, stack.admin_url) - calls_before) / n
    base = f"http://127.0.0.1:{floor_port}"
    floor_urls = [f"{base}/put/f{time.time_ns()}-{k}" for k in range(n)]
    cpu_before = cpu_seconds(floor.pid)
    floor_took, floor_lat = await drive(http, floor_urls, body, concurrency)
    floor_cpu = (cpu_seconds(floor.pid) - cpu_before) / n
    multipart = "— | —"
    if len(body) > PART_BYTES:
        parts_urls = [f"{base}/multipart/m{time.time_ns()}-{k}" for k in range(n)]
        parts_took, _ = await drive(http, parts_urls, body, concurrency)
        multipart = f"{n / parts_took:.1f} | {parts_took / took:.2f}"
    return (
        f"{n / took:.1f} | {n / floor_took:.1f} | {floor_took / took:.2f} | "
        f"{service_cpu * 1000:.1f} | {floor_cpu * 1000:.1f} | "
        f"{service_cpu / max(floor_cpu, 1e-9):.2f} | {pct(lat, 50):.0f}/{pct(lat, 99):.0f} | "
        f"{pct(floor_lat, 50):.0f}/{pct(floor_lat, 99):.0f} | {calls:.1f} | {multipart} |"
    )


async def run(quick: bool) -> None:
    stack = Stack(service_env={"SHUTDOWN_DRAIN_SECONDS": "0"}).start()
    floor_port = free_port()
    floor = stack.spawn(
        ["bench/floor.py", str(floor_port), stack.endpoint, stack.bucket], port=floor_port
    )
    rows = [
        "| size | conc | service req/s | floor req/s | ratio | service CPU ms/cb | "
        "floor CPU ms/cb | CPU ratio | service p50/p99 ms | floor p50/p99 ms | "
        "S3 calls/cb | bare multipart req/s | ratio to it |",
        "|" + " --- |" * 13,
    ]
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600),
            connector=aiohttp.TCPConnector(limit=200),
        ) as http:
            for name, (size, count) in SIZES.items():
                if quick:
                    count = max(4, count // 4)
                body = sized_body("bench@example.com", size)
                for concurrency in CONCURRENCY:
                    for cold in (False, True) if (name, concurrency) in COLD else (False,):
                        row = await measure(
                            stack,
                            http,
                            floor,
                            floor_port,
                            body,
                            max(count, concurrency),
                            concurrency,
                            cold,
                        )
                        rows.append(f"| {name}{' cold' if cold else ''} | {concurrency} | {row}")
                        print(rows[-1], flush=True)
    finally:
        stack.stop()
    print("\n".join(rows))
    title = "Callback throughput: service vs floor" + (" (quick run)" if quick else "")
    append_results(title, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests")
    asyncio.run(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
