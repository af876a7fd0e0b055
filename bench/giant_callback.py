"""Giant callback: peak RSS of the service while it archives one huge body, and its time
against a bare multipart upload of the same bytes to the same local S3, in the same run.

    .venv/bin/python bench/giant_callback.py --mib 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.callbacks import callback_url
from service.config import Secret
from service.simulator import PayloadSpec, payload_chunks

PART = 8 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(port: int) -> None:
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def bare_multipart(endpoint: str, bucket: str, spec: PayloadSpec) -> float:
    """The floor: the same bytes, the same part size, two parts in flight, no checks."""
    async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
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
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(
        {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    )
    s3_port, sim_port, port = free_port(), free_port(), free_port()
    token, secret, api = secrets.token_hex(8), secrets.token_hex(16), secrets.token_hex(8)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        wait_for(s3_port)
        endpoint = f"http://127.0.0.1:{s3_port}"
        async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
            await s3.create_bucket(Bucket="bench")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "simulate",
                    "--port",
                    str(sim_port),
                    "--access-token",
                    token,
                    "--ready-after",
                    "3600",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
            )
        )
        wait_for(sim_port)
        service = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env={
                **env,
                "COPERNICA_ACCESS_TOKEN": token,
                "CALLBACK_SECRET": secret,
                "API_TOKEN": api,
                "ARCHIVE_BUCKET": "bench",
                "S3_ENDPOINT_URL": endpoint,
                "COPERNICA_API_URL": f"http://127.0.0.1:{sim_port}/v2",
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
                "MAX_CALLBACK_BYTES": str(4 * 1024**3),
                "LOG_LEVEL": "warning",
            },
        )
        procs.append(service)
        wait_for(port)
        base = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(
                f"{base}/v1/data-requests",
                json={"email": "big@example.com"},
                headers={"Authorization": f"Bearer {api}"},
            ) as answer:
                created = await answer.json()
            idle = rss_kib(service.pid, "VmRSS")
            spec = PayloadSpec(
                "email", "big@example.com", created["copernica_id"], mib * 1024 * 1024
            )

            async def body() -> Any:
                for chunk in payload_chunks(spec):
                    yield chunk

            started = time.perf_counter()
            async with http.post(
                callback_url(base, Secret(secret), created["id"]), data=body()
            ) as answer:
                result = await answer.json()
                status = answer.status
            took = time.perf_counter() - started
        peak = rss_kib(service.pid, "VmHWM")
        floor = await bare_multipart(endpoint, "bench", spec)
        size = result.get("size", 0)
        print(
            f"giant callback {size / 1024**2:.0f} MiB: status {status}, "
            f"{took:.2f} s, service RSS idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB"
        )
        print(
            f"bare multipart of the same bytes: {floor:.2f} s; "
            f"ratio service/bare = {took / floor:.2f}"
        )
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=200)
    asyncio.run(run(parser.parse_args().mib))


if __name__ == "__main__":
    main()
