"""The access package: report, exact data, events and manifest in one ZIP, streamed into S3.

`packages/{id}.zip` holds `data.json` (the first source's archive, exact bytes),
`details.json` (the first source's own record, when it is a profile or subprofile),
`sources/{kind}-{id}/data.json` and `sources/{kind}-{id}/details.json` for each source found by
discovery (`sources/email/` for the address when it is not the first), `events.jsonl` (every
source's events, each event once), `report.html` (for the data subject, see `report/`) and
`manifest.json` (each file's name, size and sha256, and each source with its status and
files). Only archived sources have files; the others are listed in the manifest alone.
It is built in one pass and in bounded memory whatever the number and size of the sources:
each object streams from S3 in turn through a streamed ZIP writer (stream-zip) into a
multipart upload, while the same bytes feed the report's incremental parser. The upload is
created with `If-None-Match: *`, so a package is written once: a replica that finds one
already there (it crashed after the upload, or lost a race) adopts it instead of building a
second, and reads back its sha256 when S3's metadata does not carry it (multipart).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import structlog
from isal import isal_zlib
from stream_zip import ZIP_32, ZIP_64, stream_zip

from service.answer.report.builder import ReportBuilder
from service.answer.report.context import ReportContext, SourceFact
from service.answer.report.people import DETAILS_BYTES
from service.answer.statement import DEFAULT_STATEMENT, Statement
from service.clock import isoformat, utcnow
from service.logs import subject_digest
from service.requests.records import AccessRequest, DataRequest, Package, Status
from service.storage.s3 import AlreadyArchived, ArchiveStore, NotFound

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/zip"
# Deflate by ISA-L (isal) at its level 1: standard deflate streams, about 150 MiB/s on
# MIME-heavy JSON where zlib's level 1 does 21-28 MiB/s (bench/package.py); base64
# attachments of compressed files barely shrink whatever the level.
COMPRESS_LEVEL = 1
ZIP_CHUNK_BYTES = 1024 * 1024
# Beyond this the ZIP needs its 64-bit form (sizes and offsets of the classic form are 32-bit).
ZIP32_LIMIT = 4_000_000_000
_MODE = stat.S_IFREG | 0o644


@dataclass(frozen=True, slots=True)
class Built:
    """What building (or adopting) a package gives: the package, and the sha256 of the data
    the build read whole (None for an adopted package, which read nothing)."""

    package: Package
    data_sha256: str | None = None


class PackageError(Exception):
    """The package cannot be built from what is stored (e.g. the archive does not match its
    recorded sha256); nothing was written."""


@dataclass
class _Member:
    """One file of the package, hashed as it streams past."""

    name: str
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def add(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        self.digest.update(chunk)
        return chunk

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.digest.hexdigest()}


def package_filename(request_id: str) -> str:
    return f"access-package-{request_id}.zip"


def source_folder(data_request: DataRequest) -> str:
    """A discovered source's folder in the package: `sources/{kind}-{id}/`, or
    `sources/email/` for the address (never the address itself in a name)."""
    if data_request.subject_type == "email":
        return "sources/email/"
    return f"sources/{data_request.subject_type}-{data_request.subject_id}/"


@dataclass(frozen=True, slots=True)
class _Input:
    """One file of the package read from S3: its name in the ZIP, the objects it is made of
    (in order), what it is (data | details | events), whose it is, the sha256 it must have."""

    name: str
    keys: tuple[str, ...]
    role: str
    source: str = ""
    sha256: str | None = None
    size: int = 0


@dataclass
class _Plan:
    """What the package will hold, found before the first byte is read: the inputs in the
    order they are fed and written, and each source as the manifest lists it."""

    inputs: list[_Input] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    event_sources: int = 0  # sources with stored events windows (>1: events are deduped)

    @property
    def size(self) -> int:
        return sum(i.size for i in self.inputs)

    @property
    def data_files(self) -> int:
        return sum(1 for i in self.inputs if i.role == "data")


class PackageBuilder:
    """Builds (or adopts) the access package of one archived request."""

    def __init__(
        self,
        store: ArchiveStore,
        controller: str | None,
        *,
        hash_key: bytes | None = None,
        statement: Statement = DEFAULT_STATEMENT,
    ) -> None:
        self._store = store
        self._controller = controller
        self._hash_key = hash_key  # finds a discovered source's objects (its keyed digest)
        self._statement = statement

    async def ensure(self, record: AccessRequest) -> Built:
        """The package: built now, or the one found. A package built now also says its
        data.json's sha256 (`Built.data_sha256`)."""
        key = self._store.keys.package(record.id)
        if await self._store.head(key) is None:
            try:
                built = await self._build(record, key)
            except AlreadyArchived:
                built = None
            if built is not None:
                return built
        return await self.adopt(key)

    async def adopt(self, key: str) -> Built:
        """Facts of a package already in S3, its sha256 read back if S3 does not keep it."""
        head = await self._store.head(key)
        if head is None:
            raise NotFound(key)
        sha256 = head.get("Metadata", {}).get("sha256")
        size = int(head["ContentLength"])
        if not sha256:
            digest = hashlib.sha256()
            async with self._store.open(key) as reading:
                async for chunk in reading.chunks():
                    digest.update(chunk)
            sha256 = digest.hexdigest()
        log.info("package_adopted", key=key, size=size)
        return Built(Package(key, sha256, size, isoformat(head["LastModified"])))

    async def _build(self, record: AccessRequest, key: str) -> Built | None:
        """Stream the ZIP into S3; None if another writer's package won the race. It stays
        one function: the pipe, the thread and the upload are set up and torn down together.

        The loop does the I/O: `_feed` reads the archive and the events windows from S3
        into a small queue, and the upload takes the ZIP's chunks. The CPU work (deflate,
        hashes, the report's parser, rendering) runs on a thread of the build's own: the
        sync `stream_zip` pulls from the queue. (stream-zip's own async wrapper would hold a
        thread of the loop's shared default executor per build, blocked on the loop; a few
        builds at once then starve everything else that needs that executor.)
        """
        built_at = utcnow()
        plan = await self._plan(record)
        loop = asyncio.get_running_loop()
        pipe = _Pipe(loop)
        contents = _Contents(
            record, ReportBuilder(self._context(record, built_at)), built_at, pipe, plan
        )
        upload = self._store.upload(
            key, {"request-id": record.id, "built-at": isoformat(built_at)}, CONTENT_TYPE
        )
        whole = _Member("package")
        feeder = asyncio.create_task(self._feed(plan.inputs, pipe))
        pool = ThreadPoolExecutor(1, thread_name_prefix="package")
        try:
            chunks = iter(
                stream_zip(
                    contents.members(),
                    chunk_size=ZIP_CHUNK_BYTES,
                    get_compressobj=_deflater,
                )
            )
            while (chunk := await loop.run_in_executor(pool, _next, chunks)) is not None:
                await upload.write(whole.add(chunk))
            await feeder
            created = await upload.commit(
                {"sha256": whole.digest.hexdigest(), "size": str(whole.size)}
            )
        finally:
            feeder.cancel()
            pipe.close()  # a writer thread still waiting for bytes stops
            pool.shutdown(wait=False)
            await upload.abort()
        if not created:
            return None
        log.info(
            "package_built",
            request_id=record.id,
            size=whole.size,
            sha256=whole.digest.hexdigest()[:12],
            files=len(contents.files),
        )
        data = next((f for f in contents.files if f.name == "data.json"), None)
        package = Package(key, whole.digest.hexdigest(), whole.size, isoformat(built_at))
        # data.json's sha256: the build read the first source's archive whole
        return Built(package, data_sha256=data.digest.hexdigest() if data else None)

    async def _plan(self, record: AccessRequest) -> _Plan:
        """Each source's objects, checked to be there (HEAD) and sized, and its events
        windows (LIST), in the order the package holds them: the first source, then each
        discovered one, then the events of all."""
        keys, plan, windows = self._store.keys, _Plan(), []
        for n, source in enumerate(record.data_requests):
            folder = "" if n == 0 else source_folder(source)
            digest = self._digest(source) if n or source.details is not None else ""
            files = []
            if source.status is Status.ARCHIVED:
                data_key = (
                    keys.archive(record.id) if n == 0 else keys.source_data(record.id, digest)
                )
                expected = source.archive.sha256 if source.archive is not None else None
                files.append(
                    await self._input(folder + "data.json", data_key, "data", source, expected)
                )
                if source.details is not None and source.subject_type != "email":
                    details_key = keys.source_details(record.id, digest)
                    sha = source.details.sha256
                    files.append(
                        await self._input(
                            folder + "details.json", details_key, "details", source, sha
                        )
                    )
            plan.inputs += files
            if source.events is not None:
                events_folder = (
                    keys.events_folder(record.id)
                    if n == 0
                    else keys.source_events_folder(record.id, digest)
                )
                found = [item async for item in self._store.objects(events_folder)]
                plan.event_sources += bool(found)
                windows += found
            plan.sources.append(_manifest_source(source, [f.name for f in files]))
        if any(source.events is not None for source in record.data_requests):
            keys_ = tuple(w.key for w in windows)
            plan.inputs.append(
                _Input("events.jsonl", keys_, "events", size=sum(w.size for w in windows))
            )
        return plan

    async def _input(
        self, name: str, key: str, role: str, source: DataRequest, sha256: str | None
    ) -> _Input:
        head = await self._store.head(key)
        if head is None:
            what = "archive object" if role == "data" else "details object"
            raise PackageError(f"no {what} for source {source.source} at {key}")
        return _Input(name, (key,), role, source.source, sha256, int(head["ContentLength"]))

    def _digest(self, source: DataRequest) -> str:
        if self._hash_key is None:
            raise PackageError("the package builder has no hash key: sources cannot be found")
        return subject_digest(self._hash_key, source.subject_type, source.subject_id)

    async def _feed(self, inputs: list[_Input], pipe: _Pipe) -> None:
        """The package's inputs in order, each followed by `_END`: a data or details
        object's chunks as they stream, an events window whole."""
        try:
            for part in inputs:
                for key in part.keys:
                    if part.role == "events":
                        stored = await self._store.get(key)
                        if stored is None:
                            raise PackageError(f"events window {key} disappeared while packaging")
                        await pipe.put(stored.body)
                        continue
                    async with self._store.open(key) as reading:
                        async for chunk in reading.chunks():
                            await pipe.put(chunk)
                await pipe.put(_END)
        except BaseException as exc:
            pipe.fail(exc)
            raise

    def _context(self, record: AccessRequest, built_at: datetime) -> ReportContext:
        first = record.first
        events = first.events
        label = (
            first.subject_id
            if first.subject_type == "email"
            else f"{first.subject_type} {first.subject_id}"
        )
        return ReportContext(
            request_id=record.id,
            subject_type=first.subject_type,
            subject_label=label,
            controller=self._controller,
            received_on=record.deadline.received_on,
            due_by=record.deadline.due_by,
            generated_at=built_at,
            events_range=(
                (date.fromisoformat(events.since), date.fromisoformat(events.until))
                if events
                else None
            ),
            sources=tuple(_fact(source) for source in record.data_requests),
            statement=self._statement,
            language=_language_of(record),
        )


def _language_of(record: AccessRequest) -> str:
    """The language of the report's article-15 block. The request names none yet: `en`.
    (The hook for SPEC's planned `MAIL_LANGUAGE` and a request's own language: return it
    here once the record has one.)"""
    return "en"


def _fact(source: DataRequest) -> SourceFact:
    return SourceFact(
        source=source.source,
        kind=source.subject_type,
        id="" if source.subject_type == "email" else source.subject_id,
        status=source.status.value,
        database=source.database.name if source.database else None,
        collection=source.collection.name if source.collection else None,
        profile=source.profile,
        found_by=source.found_by,
    )


def _manifest_source(source: DataRequest, files: list[str]) -> dict[str, Any]:
    return {
        "source": source.source,
        "status": source.status.value,
        "database": source.database.to_json() if source.database else None,
        "collection": source.collection.to_json() if source.collection else None,
        "files": files,
    }


_END = object()  # the end of one input in the pipe


def _next(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


class _Pipe:
    """Bytes from the loop to the ZIP writer's thread, a few chunks deep (bounded memory)."""

    DEPTH = 4
    POLL_SECONDS = 0.25

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue(self.DEPTH)
        self._failure: BaseException | None = None

    async def put(self, item: Any) -> None:
        await self._queue.put(item)

    def fail(self, exc: BaseException) -> None:
        self._failure = exc
        self.close()

    def close(self) -> None:
        """Wake a waiting reader with the failure (or a cancellation) in place of bytes."""
        self._failure = self._failure or PackageError("package build stopped")
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_STOP)

    def get(self) -> Any:
        """The next item (thread side); raises what stopped the loop side.

        It waits in short steps: once the loop has stopped (the process is exiting) no item
        will ever come, and a thread blocked for ever keeps the interpreter from exiting
        (its pool's threads are joined at exit). Found by the soak: a replica SIGTERMed
        during a package build logged "stopped" and then never exited."""
        try:
            future = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop)
        except RuntimeError:  # the loop is closed
            raise PackageError("package build stopped: the event loop is gone") from None
        while True:
            try:
                item = future.result(timeout=self.POLL_SECONDS)
                break
            except concurrent.futures.TimeoutError:
                if not self._loop.is_running():
                    future.cancel()
                    raise PackageError("package build stopped: the event loop is gone") from None
        if item is _STOP:
            assert self._failure is not None
            raise self._failure
        return item

    def until_end(self) -> Iterator[bytes]:
        while (item := self.get()) is not _END:
            yield item


_STOP = object()


class _Contents:
    """The package's files as stream-zip's members, made on the writer thread: each file is
    hashed as it passes, the data, details and events feed the report, and the manifest
    comes last."""

    def __init__(
        self,
        record: AccessRequest,
        report: ReportBuilder,
        built_at: datetime,
        pipe: _Pipe,
        plan: _Plan,
    ) -> None:
        self._record = record
        self._report = report
        self._built_at = built_at
        self._pipe = pipe
        self._plan = plan
        self._method = ZIP_64 if plan.size > ZIP32_LIMIT else ZIP_32
        self.files: list[_Member] = []

    def members(self) -> Iterator[Any]:
        modified = self._built_at.replace(tzinfo=None)
        method = self._method
        data_left = self._plan.data_files
        for part in self._plan.inputs:
            if part.role == "data":
                data_left -= 1
                self._report.begin(part.name, last=data_left == 0)
                yield (part.name, modified, _MODE, method, self._data(part))
            elif part.role == "details":
                yield (part.name, modified, _MODE, method, self._details(part))
            else:
                yield (part.name, modified, _MODE, method, self._events(part))
        html = self._file("report.html").add(self._report.render())
        yield ("report.html", modified, _MODE, method, iter([html]))
        record = self._record
        manifest = {
            "request_id": record.id,
            "subject_type": record.first.subject_type,
            "received_on": record.deadline.received_on.isoformat(),
            "due_by": record.deadline.due_by.isoformat(),
            "built_at": isoformat(self._built_at),
            "files": [f.entry() for f in self.files],
            "sources": self._plan.sources,
        }
        body = json.dumps(manifest, indent=2).encode() + b"\n"
        yield ("manifest.json", modified, _MODE, method, iter([body]))

    def _file(self, name: str) -> _Member:
        member = _Member(name)
        self.files.append(member)
        return member

    def _data(self, part: _Input) -> Iterator[bytes]:
        """A source's archive, exact bytes, checked against the sha256 recorded when it was
        taken."""
        member = self._file(part.name)
        with _Beside(self._report.feed) as feed:
            for chunk in self._pipe.until_end():
                feed(chunk)
                yield member.add(chunk)
        self._check(part, member, "archive")

    def _details(self, part: _Input) -> Iterator[bytes]:
        """A profile's or subprofile's own record, exact bytes; its first DETAILS_BYTES go
        to the report."""
        member = self._file(part.name)
        kept = bytearray()
        for chunk in self._pipe.until_end():
            if len(kept) <= DETAILS_BYTES:
                kept += chunk[: DETAILS_BYTES + 1 - len(kept)]
            yield member.add(chunk)
        self._check(part, member, "details")
        complete = len(kept) <= DETAILS_BYTES
        self._report.add_details(part.source, bytes(kept), complete=complete)

    def _check(self, part: _Input, member: _Member, what: str) -> None:
        if part.sha256 and part.sha256 != member.digest.hexdigest():
            raise PackageError(
                f"{what} of source {part.source} of {self._record.id} does not match its "
                "recorded sha256; not packaged"
            )

    def _events(self, part: _Input) -> Iterator[bytes]:
        """Every stored month window, source after source (keys are window start days):
        JSON Lines. With events from several sources, a line already written (the same
        event, returned for the address and for a profile) is left out: its 16-byte digest
        is all that is kept of it."""
        member = self._file(part.name)
        seen: set[bytes] | None = set() if self._plan.event_sources > 1 else None
        for body in self._pipe.until_end():
            lines = body.splitlines()
            if seen is not None:
                lines, body = _unseen(lines, seen)
            self._report.add_events([json.loads(line) for line in lines if line.strip()])
            yield member.add(body)


def _unseen(lines: list[bytes], seen: set[bytes]) -> tuple[list[bytes], bytes]:
    """The lines not seen before (noted now), and their bytes as JSON Lines."""
    kept = []
    for line in lines:
        if not line.strip():
            continue
        digest = hashlib.blake2b(line.strip(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(line)
    return kept, b"".join(line + b"\n" for line in kept)


def _deflater() -> Any:
    """A raw deflate stream (no zlib header), as a ZIP member holds it."""
    return isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -15)


class _Beside:
    """Runs `work` on each chunk in a thread of its own, a couple of chunks behind, so the
    report's parsing overlaps the deflate (ISA-L works without the GIL); whatever `work`
    raised is raised on leaving."""

    def __init__(self, work: Callable[[bytes], None], depth: int = 2) -> None:
        self._work = work
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="package-report", daemon=True)

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._failure is None:
                try:
                    self._work(chunk)
                except BaseException as exc:  # raised in the caller's thread on leaving
                    self._failure = exc

    def __enter__(self) -> Callable[[bytes], None]:
        self._thread.start()
        return self._queue.put

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._failure is not None and exc_info[0] is None:
            raise self._failure
