"""CPU of one S3 LIST of a thousand keys: botocore's default client against the service's.

The poller lists its markers (`due/`, `deadlines/`) every tick and every housekeeping round,
and the console lists to show a page: a LIST's cost is botocore parsing the XML answer. Its
default timestamp parser (dateutil) took more than half of it; the service's client parses
S3's two timestamp formats with the standard library (`service.storage.s3.s3_timestamp`).
Both clients read the same listing from the same moto, alternately, in one process.

    .venv/bin/python bench/listing.py [--keys 1000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiobotocore.session import get_session

from bench.stack import Stack, append_results
from service.config import Settings
from service.storage.s3 import s3_client


async def cpu_per_list(client: Any, bucket: str, keys: int, rounds: int) -> float:
    started = time.process_time()
    for _ in range(rounds):
        answer = await client.list_objects_v2(Bucket=bucket, Prefix="due/", MaxKeys=keys)
        assert len(answer["Contents"]) == keys
    return (time.process_time() - started) / rounds


async def run(keys: int, rounds: int) -> None:
    local = Stack().start(service=False)  # moto, with the bucket made, and the simulator
    endpoint, bucket = local.endpoint, local.bucket
    try:
        async with AsyncExitStack() as stack:
            default = await stack.enter_async_context(
                get_session().create_client("s3", endpoint_url=endpoint)
            )
            settings = Settings.from_env(
                {
                    "ARCHIVE_BUCKET": bucket,
                    "S3_ENDPOINT_URL": endpoint,
                    "COPERNICA_ACCESS_TOKEN": "x",
                    "CALLBACK_SECRET": "x" * 32,
                    "API_TOKEN": "x" * 16,
                }
            )
            ours = await stack.enter_async_context(s3_client(settings))
            gate = asyncio.Semaphore(32)

            async def put(k: int) -> None:
                async with gate:
                    key = f"due/2026-11-25T00:00:{k % 60:02d}Z/01JDCK{k:020d}"
                    await default.put_object(Bucket=bucket, Key=key, Body=b"")

            await asyncio.gather(*(put(k) for k in range(keys)))
            # Alternate, so a drift of the machine's load weighs on both alike.
            totals = {"botocore default": 0.0, "service client": 0.0}
            for _ in range(2):
                for name, client in (("botocore default", default), ("service client", ours)):
                    totals[name] += await cpu_per_list(client, bucket, keys, rounds) / 2
    finally:
        local.stop()
    base, new = totals["botocore default"], totals["service client"]
    lines = [
        f"| client | CPU ms per LIST of {keys} keys |",
        "| --- | --- |",
        f"| botocore default (dateutil timestamps) | {base * 1000:.1f} |",
        f"| service (`s3_timestamp`) | {new * 1000:.1f} |",
        "",
        f"The service's client: {new / base:.2f}x the CPU ({rounds * 2} LISTs each, alternated).",
    ]
    print("\n".join(lines))
    append_results("S3 LIST", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(run(args.keys, args.rounds))


if __name__ == "__main__":
    main()
