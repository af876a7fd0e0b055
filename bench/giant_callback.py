"""Giant callbacks: the service's peak RSS above idle while it archives huge bodies, and its
time against bare multipart uploads of the same bytes to the same local S3, in the same run.

Cases, each in a freshly started service (so its idle and its peak are its own):

- `mime`: one callback of `--mime-mib` MiB (512) shaped like real ones: a Copernica payload
  whose groups each hold one sent message (a whole MIME message as a JSON string of about
  1 MiB, mostly a base64 attachment, bench/package.py's `group`) with an open and a click.
  Target: peak <= 64 MiB above idle.
- `mime-4`: `--concurrent` (4) such callbacks of `--each-mib` MiB (128) at once, to four
  requests. Target: peak <= 160 MiB above idle.
- `sim`: one callback of `--mib` MiB (1024) of the simulator's payload (mailings of about
  10 KB): the comparison kept from the previous release, time <= 1.3x the bare upload's.

Bodies are generated as they are sent, never whole in memory: eight distinct groups are
made once and repeated, so the load generator spends its time sending, not making random
bytes. Idle is VmRSS once the service listens and the requests are filed; VmHWM is then reset
to it (/proc/PID/clear_refs "5") and read after the last answer; VmRSS is also sampled every
10 ms as a cross-check. The baseline is a bare multipart upload (same part size, two parts in
flight, no checks, the service's S3 client settings) of the same bytes, as many at once as
the case sends callbacks. The callbacks go to the `report` addresses the service gave
Copernica, read back from the simulator. CPU seconds of the service, of moto and of this
process (the load; in the bare case it uploads too) show who used the two cores.

About 1.5 minutes on 2 cores.

    .venv/bin/python bench/giant_callback.py [--mib 1024] [--cases mime,mime-4,sim]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.floor import UNSIGNED
from bench.package import SEED, SUBJECT, group, group_count
from bench.stack import Stack, append_results, cpu_seconds, memory_kib, wait_for
from service.simulator.payloads import PayloadSpec, payload_chunks

PART = 8 * 1024 * 1024
MIB = 1024 * 1024
POOL = 8  # distinct groups per MIME body, repeated
TARGET_RATIO = 1.3  # sim: service time / bare multipart time


@dataclass
class Case:
    name: str
    body: str  # what the bodies are, for the table
    callbacks: int
    chunks: Callable[[], Iterator[bytes]]  # one body, made as it is sent
    target_mib: float | None  # peak above idle
    target_ratio: float | None = None


def mime_chunks(mib: float, string_mib: float = 1.0) -> Callable[[], Iterator[bytes]]:
    """A Copernica-shaped body of about `mib` MiB, one group (~`string_mib` MiB) a chunk."""
    rng = random.Random(SEED)
    json_chars = int(string_mib * MIB)
    pool = [group(rng, n, json_chars) for n in range(POOL)]
    head = json.dumps({"info": {"type": "email", "id": SUBJECT}})[:-1].encode() + b',"data":['

    def chunks() -> Iterator[bytes]:
        yield head
        for n in range(group_count(mib, string_mib)):
            yield (b"," if n else b"") + pool[n % POOL]
        yield b"]}"

    return chunks


def simulator_chunks(mib: int, copernica_id: str = "1") -> Callable[[], Iterator[bytes]]:
    spec = PayloadSpec("email", SUBJECT, copernica_id, mib * MIB)
    return lambda: payload_chunks(spec)


async def bare_multipart(
    endpoint: str, bucket: str, key: str, chunks: Callable[[], Iterator[bytes]]
) -> float:
    """The floor: the same bytes, the same part size, two parts in flight, no checks, the
    service's S3 client settings."""
    async with get_session().create_client("s3", endpoint_url=endpoint, config=UNSIGNED) as s3:
        started = time.perf_counter()
        upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        parts: list[dict[str, Any]] = []
        tasks: list[asyncio.Task[None]] = []
        gate = asyncio.Semaphore(2)
        buffer = bytearray()

        async def send(number: int, body: bytes) -> None:
            try:
                answer = await s3.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload["UploadId"],
                    PartNumber=number,
                    Body=body,
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            finally:
                gate.release()

        async def flush() -> None:
            await gate.acquire()
            tasks.append(asyncio.create_task(send(len(tasks) + 1, bytes(buffer))))
            buffer.clear()

        for chunk in chunks():
            buffer += chunk
            if len(buffer) >= PART:
                await flush()
            await asyncio.sleep(0)  # let the other uploads of a concurrent case send too
        if buffer:
            await flush()
        await asyncio.gather(*tasks)
        parts.sort(key=lambda p: p["PartNumber"])
        await s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        return time.perf_counter() - started


class RssSampler:
    """VmRSS of a process every 10 ms in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self._pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, memory_kib(self._pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def reset_peak(pid: int) -> bool:
    """VmHWM := current RSS (Linux, clear_refs 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def file_requests(http: aiohttp.ClientSession, stack: Stack, n: int) -> list[str]:
    """File n requests through the API; the `report` addresses the simulator was given."""
    return list((await stack.file_requests(http, SUBJECT, n)).values())


async def post(http: aiohttp.ClientSession, url: str, chunks: Iterator[bytes]) -> dict[str, Any]:
    async def body() -> Any:
        for chunk in chunks:
            yield chunk

    async with http.post(url, data=body()) as answer:
        result = await answer.json()
        return {**result, "http": answer.status}


def spent(pids: tuple[int, ...], before: list[float]) -> list[float]:
    """CPU seconds each process spent since `before` was read."""
    return [cpu_seconds(pid) - then for pid, then in zip(pids, before, strict=True)]


async def measure(stack: Stack, http: aiohttp.ClientSession, case: Case) -> dict[str, Any]:
    """The case's callbacks at once to a fresh service, then the bare uploads at once."""
    stack.restart_service()
    wait_for(stack.admin_port)
    pid = stack.service.pid
    reports = await file_requests(http, stack, case.callbacks)
    await asyncio.sleep(0.5)
    idle = memory_kib(pid, "VmRSS")
    reset = reset_peak(pid)
    # The S3 server (the stack's first process) and the load generator (this one).
    moto, here = stack.procs[0].pid, os.getpid()
    cpu_before = [cpu_seconds(p) for p in (pid, moto, here)]
    with RssSampler(pid) as sampler:
        started = time.perf_counter()
        answers = await asyncio.gather(*(post(http, url, case.chunks()) for url in reports))
        took = time.perf_counter() - started
    cpu = spent((pid, moto, here), cpu_before)
    peak = memory_kib(pid, "VmHWM") if reset else sampler.peak
    cpu_before = [cpu_seconds(p) for p in (moto, here)]
    floor = await asyncio.gather(
        *(
            bare_multipart(stack.endpoint, stack.bucket, f"bare/{case.name}-{k}", case.chunks)
            for k in range(case.callbacks)
        )
    )
    floor_took = max(floor)
    floor_cpu = spent((moto, here), cpu_before)
    size = sum(answer.get("size", 0) for answer in answers)
    statuses = sorted({answer["http"] for answer in answers})
    above = (peak - idle) / 1024
    ok_memory = case.target_mib is None or above <= case.target_mib
    ok_time = case.target_ratio is None or took / floor_took <= case.target_ratio
    return {
        "case": case,
        "statuses": statuses,
        "mib": size / MIB,
        "took": took,
        "floor": floor_took,
        "cpu": cpu,
        "floor_cpu": floor_cpu,
        "idle": idle / 1024,
        "above": above,
        "sampled": (sampler.peak - idle) / 1024,
        "how": "VmHWM" if reset else "sampled",
        "ok": statuses == [200] and ok_memory and ok_time,
    }


def table(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| case | body | status | MiB in all | seconds | bare multipart s | ratio | CPU s: "
        "service / moto / load | bare: moto / load | RSS idle MiB | peak above idle MiB "
        "| sampled max above idle MiB | target | verdict |",
        "|" + " --- |" * 14,
    ]
    for r in results:
        case = r["case"]
        targets = []
        if case.target_mib is not None:
            targets.append(f"<= {case.target_mib:g} MiB above idle")
        if case.target_ratio is not None:
            targets.append(f"<= {case.target_ratio:g}x time")
        rows.append(
            f"| {case.name} | {case.body} | {'/'.join(map(str, r['statuses']))} | "
            f"{r['mib']:.0f} | {r['took']:.2f} | {r['floor']:.2f} | "
            f"{r['took'] / r['floor']:.2f} | {' / '.join(f'{x:.1f}' for x in r['cpu'])} | "
            f"{' / '.join(f'{x:.1f}' for x in r['floor_cpu'])} | {r['idle']:.0f} | "
            f"{r['above']:.0f}{'' if r['how'] == 'VmHWM' else ' (sampled)'} | "
            f"{r['sampled']:.0f} | {', '.join(targets) or '(report)'} | "
            f"{'holds' if r['ok'] else 'MISSED'} |"
        )
    return rows


async def run(cases: list[Case], sim_mib: int) -> None:
    stack = Stack(service_env={"SHUTDOWN_DRAIN_SECONDS": "0"}).start()
    results = []
    started = time.perf_counter()
    try:
        for case in cases:
            # A session per case: pooled connections to the previous service would be dead.
            timeout = aiohttp.ClientTimeout(total=3600)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                results.append(await measure(stack, http, case))
            print(table(results)[-1], flush=True)
    finally:
        stack.stop()
    lines = table(results)
    lines += [
        "",
        f"- peak = VmHWM of the service process, reset to its RSS once idle (after start and "
        f"filing); the sampled column is VmRSS read every 10 ms; bare multipart s = the "
        f"slowest of the case's concurrent bare uploads; CPU s from /proc/PID/stat (load = "
        f"this process, sending the bodies; in the bare case also uploading); whole run "
        f"{time.perf_counter() - started:.0f} s",
    ]
    print("\n".join(lines))
    # This section replaces the previous release's "Giant callback (N MiB)".
    append_results("Giant callbacks", lines, replaces=(f"Giant callback ({sim_mib} MiB)",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024, help="the simulator-payload case")
    parser.add_argument("--mime-mib", type=int, default=512, help="the one MIME-shaped body")
    parser.add_argument("--each-mib", type=int, default=128, help="each concurrent body")
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--cases", default="mime,mime-4,sim")
    args = parser.parse_args()
    shaped = "groups of a ~1 MiB MIME message (JSON string), an open, a click"
    known = {
        "mime": Case(
            "mime", f"1 x {args.mime_mib} MiB, {shaped}", 1, mime_chunks(args.mime_mib), 64
        ),
        "mime-4": Case(
            f"mime-{args.concurrent}",
            f"{args.concurrent} x {args.each_mib} MiB at once, {shaped}",
            args.concurrent,
            mime_chunks(args.each_mib),
            160,
        ),
        "sim": Case(
            "sim",
            f"1 x {args.mib} MiB, the simulator's payload (mailings of ~10 KB)",
            1,
            simulator_chunks(args.mib),
            None,
            TARGET_RATIO,
        ),
    }
    asyncio.run(run([known[name] for name in args.cases.split(",")], args.mib))


if __name__ == "__main__":
    main()
