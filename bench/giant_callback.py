"""Giant callback: peak RSS of the service while it archives one huge body, and its time
against a bare multipart upload of the same bytes to the same local S3, in the same run.

    .venv/bin/python bench/giant_callback.py --mib 200
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.floor import UNSIGNED
from bench.stack import Stack, append_results, memory_kib
from service.callbacks import callback_url
from service.config import Secret
from service.simulator import PayloadSpec, payload_chunks

PART = 8 * 1024 * 1024


async def bare_multipart(endpoint: str, bucket: str, spec: PayloadSpec) -> float:
    """The floor: the same bytes, the same part size, two parts in flight, no checks, the
    service's S3 client settings."""
    async with get_session().create_client("s3", endpoint_url=endpoint, config=UNSIGNED) as s3:
        started = time.perf_counter()
        upload = await s3.create_multipart_upload(Bucket=bucket, Key="bare/giant.json")
        parts: list[dict[str, Any]] = []
        inflight: set[asyncio.Task[None]] = set()
        gate = asyncio.Semaphore(2)
        buffer = bytearray()

        async def send(number: int, body: bytes) -> None:
            try:
                answer = await s3.upload_part(
                    Bucket=bucket,
                    Key="bare/giant.json",
                    UploadId=upload["UploadId"],
                    PartNumber=number,
                    Body=body,
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            finally:
                gate.release()

        async def flush() -> None:
            await gate.acquire()
            task = asyncio.create_task(send(len(inflight_all) + 1, bytes(buffer)))
            inflight_all.append(task)
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            buffer.clear()

        inflight_all: list[asyncio.Task[None]] = []
        for chunk in payload_chunks(spec):
            buffer += chunk
            if len(buffer) >= PART:
                await flush()
        if buffer:
            await flush()
        await asyncio.gather(*inflight_all)
        parts.sort(key=lambda p: p["PartNumber"])
        await s3.complete_multipart_upload(
            Bucket=bucket,
            Key="bare/giant.json",
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": parts},
        )
        return time.perf_counter() - started


async def run(mib: int) -> None:
    stack = Stack().start()
    try:
        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(
                f"{stack.admin_url}/v1/data-requests",
                json={"email": "big@example.com"},
                headers={"Authorization": f"Bearer {stack.api}"},
            ) as answer:
                created = await answer.json()
            idle = memory_kib(stack.service.pid, "VmRSS")
            spec = PayloadSpec(
                "email", "big@example.com", created["copernica_id"], mib * 1024 * 1024
            )

            async def body() -> Any:
                for chunk in payload_chunks(spec):
                    yield chunk

            started = time.perf_counter()
            async with http.post(
                callback_url(stack.url, Secret(stack.secret), created["id"]), data=body()
            ) as answer:
                result = await answer.json()
                status = answer.status
            took = time.perf_counter() - started
        peak = memory_kib(stack.service.pid, "VmHWM")
        floor = await bare_multipart(stack.endpoint, stack.bucket, spec)
    finally:
        stack.stop()
    size = result.get("size", 0)
    lines = [
        f"giant callback {size / 1024**2:.0f} MiB: status {status}, {took:.2f} s, "
        f"service RSS idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB",
        f"bare multipart of the same bytes: {floor:.2f} s; ratio service/bare = {took / floor:.2f}",
    ]
    print("\n".join(lines))
    append_results(f"Giant callback ({mib} MiB)", [f"- {line}" for line in lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=200)
    asyncio.run(run(parser.parse_args().mib))


if __name__ == "__main__":
    main()
