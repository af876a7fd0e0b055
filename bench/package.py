"""Access package: building `packages/{id}.zip` (service/package.py) from a big archive, against
a plain streamed copy of the same object to the same local S3, side by side in one run.

The archive is a Copernica-shaped payload of about `--mib` MiB, made deterministically: groups
of one sent message (a whole MIME message as a JSON string of about `--string-mib` MiB, most of
it a base64 attachment of random bytes, as a PDF or an image would be) with an open and a
click. Each case runs in a fresh interpreter set up as the service sets itself up (Settings
from the environment, `s3_client`, uvloop, glibc's malloc thresholds, logging), so its memory is
its own; its peak is read from VmHWM, reset once the client is made:

- copy: `ArchiveStore.open(archive)` -> chunks -> `ArchiveStore.upload(other key)` -> commit,
  hashing as it goes: what moving the bytes S3 -> process -> S3 costs at the least;
- build: `PackageBuilder(store, "Bench B.V.").ensure(record)`.

Targets (the issue): the build's peak RSS above idle <= 64 MiB, its time <= 2x the copy's.

    .venv/bin/python bench/package.py [--mib 512] [--string-mib 1] [--rounds 2]
        [--s3 moto|seaweedfs] [--no-results]

At the defaults a run takes about 2 minutes on 2 cores (15-20 s of it making and uploading
the archive, 5 s checking the first package); `--mib 64` takes about 20 s. `--s3 seaweedfs`
(or BENCH_S3=seaweedfs) runs both cases on SeaweedFS (deploy/seaweedfs.py) instead of moto;
the table's store CPU column is then `weed`'s, and the section in bench/RESULTS.md its own
("... on SeaweedFS").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.header import Header
from email.utils import format_datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import (
    CREDENTIALS,
    ROOT,
    STORES,
    Stack,
    append_results,
    cpu_seconds,
    on_store,
    store_argument,
)

MIB = 1024 * 1024
SEED = 20260601
SUBJECT = "bench@example.com"
CONTROLLER = "Bench B.V."
TARGET_PEAK_MIB = 64
TARGET_RATIO = 2.0
# One base64 line: 76 letters from 57 bytes, then CRLF, which JSON writes as `\r\n` (4 chars).
_LINE_BYTES, _LINE_JSON = 57, 76 + 4
_TEXT = (
    "uw bestelling is onderweg deze week korting op alles gratis verzending bij "
    "elke aankoop nieuw in de winkel bekijk onze aanbiedingen voor de zomer tot "
    "en met zondag your order has shipped new arrivals this week offers for you"
)
_WORDS = _TEXT.split()


# -- the archive ----------------------------------------------------------------------------


def subject_line(n: int) -> str:
    return f"Uw bestelling #{n} is onderweg — {10 + n % 40}% korting op álles €"


def group_count(mib: float, string_mib: float) -> int:
    return max(1, round(mib * MIB / (int(string_mib * MIB) + 200)))


def mime_message(rng: random.Random, n: int, json_chars: int) -> str:
    """Message `n`: headers (an RFC 2047 subject), a text/plain and a text/html part and a
    base64 attachment sized so the message is about `json_chars` long as a JSON string."""
    sent = datetime(2025, 7, 1, 8, tzinfo=UTC) + timedelta(hours=n * 17 + rng.randint(0, 9))
    boundary = f"=_mixed_{rng.getrandbits(64):016x}"
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(80, 240)))
    subject = subject_line(n)
    head = [
        f"Return-Path: <bounce-{n}@mail.shop.test>",
        f"Received: from mta1.shop.test (mta1.shop.test [192.0.2.25]) by mx.example.com "
        f"with ESMTPS; {format_datetime(sent)}",
        f"Message-ID: <{rng.getrandbits(64):016x}.{n}@mail.shop.test>",
        f"Date: {format_datetime(sent)}",
        'From: "Shop Nieuwsbrief" <news@shop.test>',
        f"To: <{SUBJECT}>",
        "Subject: " + Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n"),
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        "This is a multi-part message in MIME format.",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        *textwrap.wrap(f"Beste klant, {words}", 76),
        f"--{boundary}",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        *textwrap.wrap(
            "<html><head><style>p{margin:0;font-family:sans-serif}</style></head><body>"
            f'<p>Beste klant,</p><p>{words}</p><a href="https://shop.test/o/{n}">Bekijk</a>'
            "</body></html>",
            76,
            break_on_hyphens=False,
        ),
        f"--{boundary}",
        f'Content-Type: application/pdf; name="factuur-{n}.pdf"',
        f'Content-Disposition: attachment; filename="factuur-{n}.pdf"',
        "Content-Transfer-Encoding: base64",
        "",
    ]
    tail = ["", f"--{boundary}--", ""]
    fixed = len(json.dumps("\r\n".join(head + tail)))
    lines = max(1, (json_chars - fixed) // _LINE_JSON)
    letters = base64.b64encode(rng.randbytes(lines * _LINE_BYTES))
    attachment = [letters[i : i + 76].decode() for i in range(0, len(letters), 76)]
    return "\r\n".join(head + attachment + tail)


def group(rng: random.Random, n: int, json_chars: int) -> bytes:
    """One inner array of `data`: a message, an open and a click of it."""
    message = mime_message(rng, n, json_chars)
    sent = datetime(2025, 7, 1, 8) + timedelta(hours=n * 17 + 10)
    opened = {"type": "open", "time": f"{sent:%Y-%m-%d %H:%M:%S}", "ip": "192.0.2.1"}
    clicked = {
        "type": "click",
        "time": f"{sent + timedelta(minutes=3):%Y-%m-%d %H:%M:%S}",
        "ip": "192.0.2.1",
        "url": f"https://shop.test/o/{n}",
    }
    return json.dumps([message, opened, clicked], separators=(",", ":")).encode()


def payload(mib: float, string_mib: float) -> Iterator[bytes]:
    """The archive's bytes in pieces of about one message (never whole in memory)."""
    rng = random.Random(SEED)
    json_chars = int(string_mib * MIB)
    yield json.dumps({"info": {"type": "email", "id": SUBJECT}})[:-1].encode() + b',"data":['
    for n in range(group_count(mib, string_mib)):
        yield (b"," if n else b"") + group(rng, n, json_chars)
    yield b"]}"


def service_environment(stack: Stack) -> dict[str, str]:
    """The settings of both cases, as tests/conftest.py `make_settings` builds them."""
    return {
        **CREDENTIALS,
        "ARCHIVE_BUCKET": stack.bucket,
        "S3_ENDPOINT_URL": stack.endpoint,
        "API_TOKEN": "bench-api-token",
        "CALLBACK_SECRET": "bench-callback-secret",
        "COPERNICA_ACCESS_TOKEN": "bench-access-token",
        "REPORT_CONTROLLER_NAME": CONTROLLER,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "warning",
    }


async def seed(env: dict[str, str], mib: float, string_mib: float) -> dict[str, Any]:
    """Stream the archive into S3 through the service's own multipart upload and write its
    request record (status archived) beside it."""
    from ulid import ULID

    from service.clock import isoformat, utcnow
    from service.config import Settings
    from service.metrics import Metrics
    from service.requests.records import AccessRequest, Archive, DataRequest, Status
    from service.storage.s3 import ArchiveStore, s3_client

    settings = Settings.from_env(env, dotenv=None)
    request_id = str(ULID())
    async with s3_client(settings) as client:
        store = ArchiveStore(client, settings, Metrics())
        key = store.keys.archive(request_id)
        received_at = isoformat(utcnow())
        metadata = {"source": "callback", "request-id": request_id, "received-at": received_at}
        upload = store.upload(key, metadata)
        digest, size = hashlib.sha256(), 0
        try:
            for piece in payload(mib, string_mib):
                digest.update(piece)
                size += len(piece)
                await upload.write(piece)
            assert await upload.commit({"sha256": digest.hexdigest(), "size": str(size)})
        finally:
            await upload.abort()
        archive = Archive(store.bucket, key, digest.hexdigest(), size, "callback", received_at)
        first = DataRequest("email", SUBJECT, Status.ARCHIVED, copernica_id="1", archive=archive)
        record = AccessRequest.new(
            request_id,
            first,
            created_at=received_at,
            updated_at=received_at,
            received_on=utcnow().date().isoformat(),
        )
        await store.put(store.keys.record(request_id), record.to_bytes(), if_none_match=True)
    return {
        "id": request_id,
        "key": key,
        "sha256": digest.hexdigest(),
        "size": size,
        "messages": group_count(mib, string_mib),
        "received_on": record.received_on,
        "due_by": record.deadline.due_by.isoformat(),
        "first_subject": subject_line(0),
    }


# -- one case, in a fresh interpreter -------------------------------------------------------


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _reset_peak() -> tuple[int, int]:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5); (peak before, peak after)."""
    before = _status_kib("VmHWM")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return before, _status_kib("VmHWM")


def child(case: str, request_id: str, target: str) -> None:
    from service.cli.main import tune_malloc

    tune_malloc()  # as the service does at start
    from service.answer.package import PackageBuilder
    from service.config import Settings
    from service.logs import configure_logging
    from service.metrics import Metrics
    from service.requests.records import AccessRequest
    from service.storage.s3 import ArchiveStore, s3_client

    settings = Settings.from_env(dotenv=None)
    configure_logging(settings, sys.stderr)  # stdout carries the result

    async def run() -> dict[str, Any]:
        async with s3_client(settings) as client:
            store = ArchiveStore(client, settings, Metrics())
            # The record read loads botocore's models and opens the connection pool: the
            # service has done all that long before it builds a package.
            stored = await store.get(store.keys.record(request_id))
            assert stored is not None, "no request record"
            record = AccessRequest.from_bytes(stored.body)
            await asyncio.sleep(0)
            gc.collect()
            idle = _status_kib("VmRSS")
            reset = _reset_peak()
            assert reset[1] <= idle + 1024, f"VmHWM was not reset: {reset}"
            usage = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            if case == "build":
                built = await PackageBuilder(store, CONTROLLER).ensure(record)
                result = built.package.to_json()
            else:
                result = await copy(store, store.keys.archive(request_id), target)
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            peak = _status_kib("VmHWM")
        cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        return {
            "case": case,
            "seconds": seconds,
            "cpu": cpu,
            "idle_kib": idle,
            "peak_kib": peak,
            "reset_kib": reset,
            "result": result,
        }

    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        print(json.dumps(runner.run(run())), flush=True)


async def copy(store: Any, source: str, target: str) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    upload = store.upload(target, {"source": "bench-copy"})
    try:
        async with store.open(source) as reading:
            async for chunk in reading.chunks():
                digest.update(chunk)
                size += len(chunk)
                await upload.write(chunk)
        assert await upload.commit({"sha256": digest.hexdigest(), "size": str(size)})
    finally:
        await upload.abort()
    return {"key": target, "sha256": digest.hexdigest(), "size": size}


def measure(
    env: dict[str, str], store: int, case: str, archive: dict[str, Any], target: str
) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its result, with the S3 server's (process
    `store`) CPU meanwhile."""
    store_cpu = cpu_seconds(store)
    done = subprocess.run(
        [sys.executable, __file__, "--child", case, archive["id"], target],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr.decode(errors="replace")[-4000:])
        raise RuntimeError(f"{case} failed with exit code {done.returncode}")
    result = dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))
    result["store_cpu"] = cpu_seconds(store) - store_cpu
    return result


# -- checking the package -------------------------------------------------------------------


def _hash_member(archive: zipfile.ZipFile, name: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with archive.open(name) as member:
        while chunk := member.read(MIB):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


async def check_package(
    env: dict[str, str], archive: dict[str, Any], built: dict[str, Any]
) -> list[str]:
    """Download the package (streamed to a file), then check it member by member; the
    problems found (none: an empty list)."""
    from service.config import Settings
    from service.metrics import Metrics
    from service.storage.s3 import ArchiveStore, s3_client

    settings = Settings.from_env(env, dotenv=None)
    problems: list[str] = []
    with tempfile.TemporaryFile() as file:
        digest, size = hashlib.sha256(), 0
        async with s3_client(settings) as client:
            store = ArchiveStore(client, settings, Metrics())
            async with store.open(built["key"]) as reading:
                async for chunk in reading.chunks():
                    digest.update(chunk)
                    size += len(chunk)
                    file.write(chunk)
        if (size, digest.hexdigest()) != (built["size"], built["sha256"]):
            problems.append("the stored package is not the one ensure() reported")
        file.seek(0)
        with zipfile.ZipFile(file) as zipped:
            names = zipped.namelist()
            if names != ["data.json", "report.html", "manifest.json"]:
                problems.append(f"members {names}")
            files = {name: _hash_member(zipped, name) for name in names}
            if files.get("data.json") != (archive["size"], archive["sha256"]):
                problems.append("data.json is not the archive's exact bytes")
            manifest = json.loads(zipped.read("manifest.json"))
            report = zipped.read("report.html").decode()
    expected = {
        "request_id": archive["id"],
        "subject_type": "email",
        "received_on": archive["received_on"],
        "due_by": archive["due_by"],
    }
    for name, value in expected.items():
        if manifest.get(name) != value:
            problems.append(f"manifest {name} = {manifest.get(name)!r}, expected {value!r}")
    entries = [(f["name"], f["size"], f["sha256"]) for f in manifest.get("files", [])]
    wanted = [(n, *files[n]) for n in ("data.json", "report.html") if n in files]
    if entries != wanted:
        problems.append(f"manifest files {entries} != {wanted}")
    if CONTROLLER not in report or archive["first_subject"] not in report:
        problems.append("report.html lacks the controller or the first (decoded) subject")
    if f"{archive['messages']:,}" not in report:
        problems.append(f"report.html does not count {archive['messages']:,} messages")
    return problems


# -- the run --------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], archive_mib: float, store: str) -> list[str]:
    lines = [
        f"| case | round | seconds | MiB/s | CPU s | {store} CPU s | RSS idle MiB "
        "| peak above idle MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['round']} | {row['seconds']:.2f} "
            f"| {archive_mib / row['seconds']:.1f} | {row['cpu']:.2f} | {row['store_cpu']:.2f} "
            f"| {row['idle_kib'] / 1024:.1f} | {(row['peak_kib'] - row['idle_kib']) / 1024:.1f} |"
        )
    return lines


def run(mib: float, string_mib: float, rounds: int, record: bool, store: str) -> None:
    started, load = time.perf_counter(), os.getloadavg()[0]
    stack = Stack(store=store)
    try:
        store_pid = stack.start_store()
        import botocore.session

        s3 = botocore.session.get_session().create_client(
            "s3", endpoint_url=stack.endpoint, region_name="us-east-1"
        )
        env = service_environment(stack)
        archive = asyncio.run(seed(env, mib, string_mib))
        seeded = time.perf_counter() - started
        archive_mib = archive["size"] / MIB
        print(
            f"archive: {archive_mib:.1f} MiB, {archive['messages']} messages of "
            f"~{string_mib} MiB, made and uploaded in {seeded:.1f} s",
            flush=True,
        )
        rows: list[dict[str, Any]] = []
        problems: list[str] | None = None
        package: dict[str, Any] = {}
        for n in range(1, rounds + 1):
            for case in ("copy", "build"):
                target = f"bench/copy-{n}.json"
                row = measure(env, store_pid, case, archive, target)
                row["round"] = n
                rows.append(row)
                print(
                    f"  {case} #{n}: {row['seconds']:.2f} s, peak above idle "
                    f"{(row['peak_kib'] - row['idle_kib']) / 1024:.1f} MiB",
                    flush=True,
                )
                if case == "build" and problems is None:
                    package = row["result"]
                    checked = time.perf_counter()
                    problems = asyncio.run(check_package(env, archive, package))
                    print(f"  package checked in {time.perf_counter() - checked:.1f} s")
                # The next round writes the same keys again (If-None-Match: *).
                s3.delete_object(Bucket=stack.bucket, Key=row["result"]["key"])
    finally:
        stack.stop()
    copies = [r for r in rows if r["case"] == "copy"]
    builds = [r for r in rows if r["case"] == "build"]
    ratio = statistics.median(r["seconds"] for r in builds) / statistics.median(
        r["seconds"] for r in copies
    )
    peak = max(r["peak_kib"] - r["idle_kib"] for r in builds) / 1024
    copy_peak = max(r["peak_kib"] - r["idle_kib"] for r in copies) / 1024
    cpu_ratio = statistics.median(r["cpu"] for r in builds) / statistics.median(
        r["cpu"] for r in copies
    )

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = [
        f"archive: {archive_mib:.1f} MiB, {archive['messages']} groups of one MIME message "
        f"(~{string_mib} MiB as a JSON string, mostly a base64 attachment of random bytes), "
        "an open and a click; each case in a fresh interpreter, as the service runs (uvloop, "
        "mmap threshold 1 MiB, default S3_PART_BYTES); peak = VmHWM reset after start-up; "
        f"CPU s = the case's process (all threads), {STORES[store]} CPU s = the S3 server's "
        f"({STORES[store]}'s one process) meanwhile",
        "",
        *_table(rows, archive_mib, STORES[store]),
        "",
        f"- build/copy time (medians): {ratio:.2f} (target <= {TARGET_RATIO:.0f}): "
        f"{verdict(ratio <= TARGET_RATIO)}; CPU build/copy {cpu_ratio:.2f}",
        f"- build peak RSS above idle (worst of {len(builds)}): {peak:.1f} MiB "
        f"(target <= {TARGET_PEAK_MIB}): {verdict(peak <= TARGET_PEAK_MIB)}; "
        f"the copy's: {copy_peak:.1f} MiB",
        f"- package: {package['size'] / MIB:.1f} MiB for {archive_mib:.1f} MiB of data, "
        f"compression {archive['size'] / package['size']:.2f}x (deflate level 1; random "
        "attachments do not shrink below 3/4 of their base64)",
        "- check of the first package (downloaded, unzipped member by member): "
        + (
            "data.json is the archive's exact bytes, manifest and report right: ok"
            if not problems
            else "FAILED: " + "; ".join(problems or [])
        ),
        f"- whole run {time.perf_counter() - started:.0f} s, {seeded:.0f} s of it making "
        f"the archive; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(times move with it; CPU seconds much less)",
    ]
    print("\n".join(lines))
    if record:
        append_results(on_store(f"Access package ({mib:g} MiB archive)", store), lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=float, default=512, help="archive size (about)")
    parser.add_argument("--string-mib", type=float, default=1, help="one MIME message (about)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each case")
    parser.add_argument(
        "--no-results", action="store_true", help="print only, leave bench/RESULTS.md alone"
    )
    store_argument(parser)
    args = parser.parse_args()
    run(args.mib, args.string_mib, args.rounds, not args.no_results, args.s3)


if __name__ == "__main__":
    main()
