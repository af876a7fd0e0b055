"""Events fetched window by window and written as JSON Lines: to S3 beside a data request's
archive, or for the `events` command to a file (resumable), to stdout, or to S3.

A window is written whole or not at all: an S3 object per window with `If-None-Match: *`
(a window already stored is never overwritten), or, in a file, lines appended and the
file's length after them recorded in a progress file; a rerun cuts the file back to the
last recorded length and goes on with the next window, so no event is written twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Any, Protocol

import aiohttp

from service.config import Settings
from service.copernica.client import CopernicaClient
from service.copernica.events import Source, Window, plan
from service.metrics import Metrics
from service.storage.s3 import ArchiveStore, PreconditionFailed, s3_client


def jsonl(events: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(
        json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for e in events
    )


class Sink(Protocol):
    async def done(self, window: Window) -> bool: ...

    async def write(self, window: Window, body: bytes, count: int) -> None: ...


@dataclass
class S3Sink:
    """One object per window under `prefix`, created once."""

    store: ArchiveStore
    key: Callable[[Window], str]

    async def done(self, window: Window) -> bool:
        return await self.store.head(self.key(window)) is not None

    async def write(self, window: Window, body: bytes, count: int) -> None:
        # If another replica stored this window first, it is complete either way.
        with contextlib.suppress(PreconditionFailed):
            await self.store.put(
                self.key(window),
                body,
                if_none_match=True,
                metadata={"events": str(count), "window-end": window.end.isoformat()},
                content_type="application/x-ndjson",
            )


class FileSink:
    """Appends to a file; `<file>.progress` remembers finished windows and the file length."""

    def __init__(self, path: Path, identity: dict[str, str]) -> None:
        self.path = path
        self.progress_path = path.with_name(path.name + ".progress")
        self.identity = identity
        self.finished: dict[str, int] = {}
        if self.progress_path.exists():
            saved = json.loads(self.progress_path.read_text())
            if saved.get("identity") != identity:
                raise ValueError(
                    f"{self.progress_path} belongs to another export; remove it or choose "
                    "another --out"
                )
            self.finished = saved["windows"]
        length = max(self.finished.values(), default=0)
        # Cut off whatever a crash left after the last finished window.
        with open(self.path, "ab") as handle:
            handle.truncate(length)

    async def done(self, window: Window) -> bool:
        return window.name in self.finished

    async def write(self, window: Window, body: bytes, count: int) -> None:
        # The command line's own file, written between two fetches: blocking is fine here.
        with open(self.path, "ab") as handle:  # noqa: ASYNC230
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
            self.finished[window.name] = handle.tell()
        temporary = self.progress_path.with_name(self.progress_path.name + ".tmp")
        temporary.write_text(json.dumps({"identity": self.identity, "windows": self.finished}))
        temporary.replace(self.progress_path)


class StreamSink:
    """Standard output: written as it comes, not resumable."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self.stream = stream or sys.stdout.buffer

    async def done(self, window: Window) -> bool:
        return False

    async def write(self, window: Window, body: bytes, count: int) -> None:
        self.stream.write(body)
        self.stream.flush()


@dataclass
class Progress:
    windows: int = 0
    skipped: int = 0
    events: int = 0


async def fetch_events(
    client: CopernicaClient,
    source: Source,
    windows: Sequence[Window],
    sink: Sink,
    *,
    tags: str | None = None,
    report: Callable[[int, int, Window, int], None] | None = None,
    progress: Progress | None = None,
) -> Progress:
    """Fetch every window not yet done into the sink, in order; `progress` (if given) shows
    how far it got even when a fetch fails."""
    progress = progress or Progress()
    for index, window in enumerate(windows, 1):
        if await sink.done(window):
            progress.skipped += 1
        else:
            found = await client.events(source, window, tags)
            await sink.write(window, jsonl(found), len(found))
            progress.windows += 1
            progress.events += len(found)
        if report is not None:
            report(index, len(windows), window, progress.events)
    return progress


def request_windows(events: dict[str, Any]) -> list[Window]:
    return plan(date.fromisoformat(events["since"]), date.fromisoformat(events["until"]))


def lookback(created: date, days: int) -> dict[str, str]:
    """The events range of a data request filed on `created` with EVENTS_LOOKBACK_DAYS."""
    return {
        "since": (created - timedelta(days=days)).isoformat(),
        "until": (created + timedelta(days=1)).isoformat(),
    }


async def export(
    settings: Settings,
    source: Source,
    windows: Sequence[Window],
    out: str,
    *,
    tags: str | None = None,
    progress_stream: IO[str] | None = None,
) -> Progress:
    """The `events` command: windows into a file (resumable), stdout (`-`) or S3 (`s3`)."""
    identity = {
        "kind": source.kind,
        "id": source.id,
        "since": windows[0].start.isoformat(),
        "until": windows[-1].end.isoformat(),
        "tags": tags or "",
    }
    report = _bar(progress_stream) if progress_stream is not None else None
    async with aiohttp.ClientSession() as http:
        client = CopernicaClient(http, settings, Metrics(), base_url=settings.copernica_events_url)
        if out == "s3":
            async with s3_client(settings) as s3:
                store = ArchiveStore(s3, settings, Metrics())
                digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
                folder = f"{source.kind.replace('/', '-')}-{digest.hexdigest()[:24]}"
                sink: Sink = S3Sink(store, lambda w: store.keys.export(folder, w.name))
                return await fetch_events(client, source, windows, sink, tags=tags, report=report)
        sink = StreamSink() if out == "-" else FileSink(Path(out), identity)
        return await fetch_events(client, source, windows, sink, tags=tags, report=report)


def _bar(stream: IO[str]) -> Callable[[int, int, Window, int], None]:
    def report(done: int, total: int, window: Window, events: int) -> None:
        filled = int(30 * done / total)
        stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} windows "
            f"(to {window.end}) {events} events"
        )
        if done == total:
            stream.write("\n")
        stream.flush()

    return report
