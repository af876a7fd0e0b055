"""S3 access: conditional puts, listings, streamed multipart uploads and quarantine (the key
layout is `service.storage.keys`).

All state lives in S3 (replicas are stateless). Every write that must happen once uses a
conditional request: `If-None-Match: *` for objects created once (first writer wins),
`If-Match: <etag>` for records that are updated. S3 failures become `ArchiveUnavailable`
here, at the module edge, so the HTTP layer maps them to 503 in one place.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.utils import parse_timestamp

from service.config import Settings
from service.errors import Unavailable
from service.metrics import Metrics
from service.storage.keys import Keys

# Errors that mean "S3 is not answering properly": retryable, never the caller's fault.
_UNAVAILABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.HTTPClientError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
)


class ArchiveUnavailable(Unavailable):
    """S3 could not be reached or answered with a server error; try again later. The
    exception's text names the S3 call that failed (for the logs); the client is told
    only that storage is unavailable."""

    @property
    def message(self) -> str:
        return "storage unavailable, try again"


class NotFound(Exception):
    """The object does not exist."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class StoredObject:
    body: bytes
    etag: str


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class Version:
    """One version of an object in a bucket that keeps versions (`null`: written while
    versioning was never enabled or suspended), or a delete marker."""

    key: str
    version_id: str
    latest: bool
    delete_marker: bool


# GetBucketVersioning's Status; a bucket whose versioning was never enabled has none, and
# "Unknown" is ours: the look failed (S3 down, or no s3:GetBucketVersioning permission).
VERSIONING_OFF, VERSIONING_ENABLED, VERSIONING_SUSPENDED = "Off", "Enabled", "Suspended"
VERSIONING_UNKNOWN = "Unknown"


class Reading:
    """An object being read: its size and metadata, and its bytes as chunks."""

    def __init__(self, size: int, metadata: dict[str, str], body: Any, chunk_bytes: int) -> None:
        self.size = size
        self.metadata = metadata
        self._body = body
        self._chunk_bytes = chunk_bytes

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._body.iter_chunks(self._chunk_bytes):
                yield chunk
        except _UNAVAILABLE as exc:
            raise ArchiveUnavailable(f"S3 get_object read: {type(exc).__name__}") from None


def _ascii(value: str) -> str:
    """S3 user metadata travels in HTTP headers: keep it printable ASCII."""
    return value.encode("ascii", "replace").decode("ascii").replace("\n", " ")[:1024]


class ArchiveStore:
    """One aiobotocore S3 client and the operations the service needs of it."""

    def __init__(self, client: Any, settings: Settings, metrics: Metrics) -> None:
        self._client = client
        assert settings.archive_bucket is not None
        self.bucket: str = settings.archive_bucket
        self.keys = Keys(settings.archive_prefix)
        self.part_bytes = settings.s3_part_bytes
        self._metrics = metrics
        self._sse: dict[str, str] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        # The bucket's versioning state at the last look (`bucket_versioning`); None: not
        # looked yet. An enabled or suspended bucket keeps earlier versions.
        self.versioning: str | None = None
        self.versioning_seen_at = 0.0  # time.monotonic() of that look
        if settings.archive_sse:
            self._sse["ServerSideEncryption"] = settings.archive_sse
            if settings.archive_kms_key_id:
                self._sse["SSEKMSKeyId"] = settings.archive_kms_key_id

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        """Run one S3 operation, timed, with its failures mapped to our two exceptions."""
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await getattr(self._client, operation)(Bucket=self.bucket, **kwargs)
            outcome = "ok"
            return result
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response.get("Error", {}).get("Code", "")
            if status == 412 or code == "PreconditionFailed":
                outcome = "precondition_failed"
                raise PreconditionFailed(operation) from None
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                outcome = "not_found"
                raise NotFound(kwargs.get("Key", "")) from None
            if status == 409 and code == "ConditionalRequestConflict":
                # S3 saw a concurrent conditional write on the key; the caller retries later.
                raise ArchiveUnavailable(f"S3 {operation}: concurrent conditional write") from None
            raise ArchiveUnavailable(f"S3 {operation} failed: {code or status}") from None
        except _UNAVAILABLE as exc:
            raise ArchiveUnavailable(f"S3 {operation} failed: {type(exc).__name__}") from None
        finally:
            self._metrics.s3_seconds.labels(operation, outcome).observe(
                time.perf_counter() - started
            )

    # -- plain objects -------------------------------------------------------------------

    async def get(self, key: str) -> StoredObject | None:
        try:
            answer = await self._call("get_object", Key=key)
        except NotFound:
            return None
        async with answer["Body"] as stream:
            try:
                body = await stream.read()
            except _UNAVAILABLE as exc:
                raise ArchiveUnavailable(f"S3 get_object read: {type(exc).__name__}") from None
        return StoredObject(body, answer["ETag"])

    async def read_range(self, key: str, first: int, last: int) -> bytes:
        """Bytes `first`..`last` (inclusive) of an object (NotFound if it does not exist)."""
        answer = await self._call("get_object", Key=key, Range=f"bytes={first}-{last}")
        async with answer["Body"] as stream:
            try:
                return bytes(await stream.read())
            except _UNAVAILABLE as exc:
                raise ArchiveUnavailable(f"S3 get_object read: {type(exc).__name__}") from None

    async def head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(await self._call("head_object", Key=key))
        except NotFound:
            return None

    async def put(
        self,
        key: str,
        body: bytes | bytearray,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str = "application/json",
        sha256: str | None = None,
    ) -> str:
        """Write an object; with a condition, `PreconditionFailed` when it does not hold.

        With `sha256` (hex, of `body`) S3 checks the bytes it stored against our hash, end to
        end, and the client need not compute a checksum of its own.
        """
        extra: dict[str, Any] = dict(self._sse)
        if sha256 is not None:
            extra["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(sha256)).decode()
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        if metadata:
            extra["Metadata"] = {k: _ascii(v) for k, v in metadata.items()}
        try:
            answer = await self._call(
                "put_object", Key=key, Body=body, ContentType=content_type, **extra
            )
        except NotFound:
            if if_match is None:
                raise
            # If-Match on a key that is gone: AWS and moto answer 404 NoSuchKey, SeaweedFS
            # 412. Either way the object is not the one read: the condition does not hold.
            raise PreconditionFailed("put_object") from None
        return str(answer["ETag"])

    async def delete(self, key: str) -> None:
        await self._call("delete_object", Key=key)

    # -- versions (a bucket with versioning enabled, or suspended after it was) ---------------

    async def bucket_versioning(self) -> str:
        """Look at the bucket's versioning state (`VERSIONING_OFF`, `_ENABLED`, `_SUSPENDED`,
        or `_UNKNOWN` if the look failed): one GetBucketVersioning, remembered in
        `versioning` and shown on /metrics. Never raises."""
        try:
            answer = await self._call("get_bucket_versioning")
            state = str(answer.get("Status") or VERSIONING_OFF)
        except (ArchiveUnavailable, NotFound):
            state = VERSIONING_UNKNOWN
        if state not in (VERSIONING_ENABLED, VERSIONING_SUSPENDED, VERSIONING_UNKNOWN):
            state = VERSIONING_OFF
        self.versioning, self.versioning_seen_at = state, time.monotonic()
        self._metrics.bucket_versioning.state(state.lower())
        return state

    @property
    def keeps_versions(self) -> bool:
        """A delete here may leave earlier versions behind: versioning enabled, or suspended
        (a suspended bucket keeps the versions written while it was enabled), or unknown
        (then deleting by version is the safe way; it works on any bucket)."""
        return self.versioning != VERSIONING_OFF

    async def versions(self, prefix: str, *, page_size: int = 1000) -> AsyncIterator[Version]:
        """Every version and delete marker of every key under `prefix`: one
        ListObjectVersions per `page_size` (at most 1000), made as the caller reads on."""
        markers: dict[str, str] = {}
        while True:
            answer = await self._call(
                "list_object_versions", Prefix=prefix, MaxKeys=page_size, **markers
            )
            for item in answer.get("Versions", []):
                yield Version(item["Key"], item["VersionId"], bool(item["IsLatest"]), False)
            for item in answer.get("DeleteMarkers", []):
                yield Version(item["Key"], item["VersionId"], bool(item["IsLatest"]), True)
            if not answer.get("IsTruncated") or not answer.get("NextKeyMarker"):
                return
            markers = {"KeyMarker": answer["NextKeyMarker"]}
            if answer.get("NextVersionIdMarker"):
                markers["VersionIdMarker"] = answer["NextVersionIdMarker"]

    async def delete_version(self, key: str, version_id: str) -> None:
        """Delete one version (or delete marker) for good; one already gone is fine."""
        with contextlib.suppress(NotFound):
            await self._call("delete_object", Key=key, VersionId=version_id)

    @contextlib.asynccontextmanager
    async def open(self, key: str, chunk_bytes: int = 1024 * 1024) -> AsyncIterator[Reading]:
        """Read an object as a stream of chunks (NotFound if it does not exist)."""
        answer = await self._call("get_object", Key=key)
        async with answer["Body"] as body:
            yield Reading(
                int(answer["ContentLength"]), answer.get("Metadata", {}), body, chunk_bytes
            )

    async def objects(
        self, prefix: str, *, start_after: str = "", page_size: int = 1000
    ) -> AsyncIterator[Listed]:
        """Every object under `prefix` after `start_after`, in key order, with its size and
        time: one LIST per `page_size` (at most 1000), each made only when the caller reads
        past the previous page, so a caller that stops early lists no further."""
        while True:
            answer = await self._call(
                "list_objects_v2", Prefix=prefix, StartAfter=start_after, MaxKeys=page_size
            )
            contents = answer.get("Contents", [])
            for item in contents:
                yield Listed(item["Key"], int(item["Size"]), item["LastModified"])
            if not answer.get("IsTruncated") or not contents:
                return
            start_after = contents[-1]["Key"]

    async def presigned_get(self, key: str, seconds: int, filename: str) -> str:
        """A URL anyone holding it can GET the object with, for `seconds` (no S3 call)."""
        return str(
            await self._client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": key,
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                },
                ExpiresIn=seconds,
            )
        )

    async def head_bucket(self) -> None:
        """NotFound if the bucket does not exist; ArchiveUnavailable if S3 does not answer
        or refuses access."""
        await self._call("head_bucket")

    async def reachable(self) -> bool:
        try:
            await self._call("head_bucket")
        except (ArchiveUnavailable, NotFound):
            return False
        return True

    # -- streamed uploads ----------------------------------------------------------------

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload; if S3 is failing right now, keep trying in the background.

        An aborted upload is invisible either way; this just frees its parts early instead of
        waiting for the bucket's lifecycle rule (AbortIncompleteMultipartUpload).
        """
        try:
            await self._call("abort_multipart_upload", Key=key, UploadId=upload_id)
        except NotFound:
            return
        except ArchiveUnavailable:
            task = asyncio.create_task(self._abort_later(key, upload_id))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def abort_superseded_uploads(self) -> int:
        """Abort multipart uploads to keys that exist already (archives, packages).

        Such an upload can never complete (its `If-None-Match: *` would fail): it was left by
        a replica killed mid-upload, or lost a race. Uploads whose key does not exist yet may
        still be in progress on another replica and are left alone; the bucket's lifecycle
        rule (AbortIncompleteMultipartUpload) ends those that never finish.
        """
        aborted = 0
        for key, upload_id in await self.uploads(self.keys.prefix):
            if await self.head(key) is not None:
                await self.abort_upload(key, upload_id)
                aborted += 1
        return aborted

    async def uploads(self, prefix: str) -> list[tuple[str, str]]:
        """(key, upload id) of the multipart uploads under `prefix` (the first thousand)."""
        answer = await self._call("list_multipart_uploads", Prefix=prefix)
        return [(u["Key"], u["UploadId"]) for u in answer.get("Uploads", [])]

    async def _abort_later(self, key: str, upload_id: str) -> None:
        for attempt in range(12):
            await asyncio.sleep(min(60.0, 0.5 * 2**attempt))
            try:
                await self._call("abort_multipart_upload", Key=key, UploadId=upload_id)
                return
            except NotFound:
                return
            except ArchiveUnavailable:
                continue

    async def close(self) -> None:
        """Stop background aborts; the bucket's lifecycle rule is the backstop for those left."""
        for task in list(self._cleanups):
            task.cancel()
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    # -- multipart uploads (what StreamedUpload is made of) ---------------------------------

    async def create_upload(self, key: str, content_type: str, metadata: dict[str, str]) -> str:
        answer = await self._call(
            "create_multipart_upload",
            Key=key,
            ContentType=content_type,
            Metadata={k: _ascii(v) for k, v in metadata.items()},
            **self._sse,
        )
        return str(answer["UploadId"])

    async def upload_part(self, key: str, upload_id: str, number: int, body: Any) -> str:
        """One part (a file object or bytes); its ETag."""
        answer = await self._call(
            "upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        return str(answer["ETag"])

    async def complete_upload(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        """Make the object visible, only if the key is still free (`If-None-Match: *`);
        PreconditionFailed if it is not."""
        await self._call(
            "complete_multipart_upload",
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            IfNoneMatch="*",
        )

    def upload(
        self, key: str, metadata: dict[str, str], content_type: str = "application/json"
    ) -> StreamedUpload:
        return StreamedUpload(self, key, metadata, content_type)

    async def quarantine(
        self, request_id: str, received_at: datetime, body: bytes, metadata: dict[str, str]
    ) -> str:
        key = self.keys.quarantine(request_id, received_at)
        await self.put(key, body, metadata=metadata, content_type="application/octet-stream")
        return key


class AlreadyArchived(Exception):
    """The archive object exists already (a repeat delivery, or another writer won)."""


class StreamedUpload:
    """Writes one body to one key exactly once, in bounded memory.

    Bytes are buffered until a part is full. A body that ends before that goes up in one
    `PutObject` with `If-None-Match: *`. A larger one becomes a multipart upload: parts go up
    while the rest streams in (at most `_INFLIGHT` parts in flight, so memory stays at about
    (`_INFLIGHT` + 1) x part size), and `CompleteMultipartUpload` carries `If-None-Match: *`
    too. Nothing is visible in the bucket until `commit`; `abort` leaves nothing behind.
    """

    _INFLIGHT = 2
    HEAD_BYTES = 1024 * 1024

    def __init__(
        self,
        store: ArchiveStore,
        key: str,
        metadata: dict[str, str],
        content_type: str = "application/json",
    ) -> None:
        self._store = store
        self.key = key
        self._metadata = metadata
        self._content_type = content_type
        self._buffer = bytearray()  # the part being filled; handed to S3 as it is
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self._INFLIGHT)
        self._failure: BaseException | None = None
        self._head: bytes | None = None  # the body's first bytes, once it goes up in parts

    @property
    def multipart(self) -> bool:
        return self._upload_id is not None

    @property
    def buffered(self) -> bytearray:
        """What is still buffered (the whole body while it is smaller than a part)."""
        return self._buffer

    def first_bytes(self) -> bytes:
        """The start of the body: its first `HEAD_BYTES` once uploading in parts (kept for
        quarantine), else the whole buffer."""
        return self._head if self._head is not None else bytes(self._buffer)

    async def write(self, chunk: bytes) -> None:
        self._raise_failure()
        self._buffer += chunk
        if len(self._buffer) >= self._store.part_bytes:
            await self._flush_part()

    async def _flush_part(self) -> None:
        if self._upload_id is None:
            # A repeat delivery of a large body: do not upload it all to lose at the end.
            if await self._store.head(self.key) is not None:
                raise AlreadyArchived(self.key)
            self._upload_id = await self._store.create_upload(
                self.key, self._content_type, self._metadata
            )
        if self._head is None:
            self._head = bytes(self._buffer[: self.HEAD_BYTES])
        # A file object, not the bytearray: aiohttp then sends it in small pieces, where it
        # would slice and join a bytes body into two more copies of the part
        # (bench/package.py: the streamed copy's peak 66 -> 32 MiB above idle).
        body = io.BytesIO(self._buffer)
        self._buffer = bytearray()
        number = len(self._parts) + 1
        part: dict[str, Any] = {"PartNumber": number}
        self._parts.append(part)
        await self._slots.acquire()
        task = asyncio.create_task(self._upload_part(part, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upload_part(self, part: dict[str, Any], body: io.BytesIO) -> None:
        try:
            assert self._upload_id is not None
            part["ETag"] = await self._store.upload_part(
                self.key, self._upload_id, part["PartNumber"], body
            )
        except BaseException as exc:
            self._failure = self._failure or exc
        finally:
            self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            if isinstance(self._failure, ArchiveUnavailable | PreconditionFailed):
                raise self._failure
            raise ArchiveUnavailable(f"S3 upload_part failed: {type(self._failure).__name__}")

    async def commit(self, final_metadata: dict[str, str]) -> bool:
        """Make the object visible; True if this call created it, False if it existed."""
        if self._upload_id is None:
            try:
                await self._store.put(
                    self.key,
                    self._buffer,
                    if_none_match=True,
                    metadata={**self._metadata, **final_metadata},
                    sha256=final_metadata["sha256"],
                    content_type=self._content_type,
                )
            except PreconditionFailed:
                return False
            return True
        if self._buffer:
            await self._flush_part()
        if self._tasks:
            await asyncio.gather(*self._tasks)
        self._raise_failure()
        try:
            await self._store.complete_upload(self.key, self._upload_id, self._parts)
        except PreconditionFailed:
            await self.abort()
            return False
        self._upload_id = None
        return True

    async def abort(self) -> None:
        """Drop everything uploaded so far; best effort when S3 itself is failing."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        upload_id, self._upload_id = self._upload_id, None
        self._buffer = bytearray()
        self._head = None
        if upload_id is not None:
            await self._store.abort_upload(self.key, upload_id)


def s3_timestamp(value: str) -> datetime:
    """S3's timestamps as aware datetimes, without botocore's default parser (dateutil), which
    costs more than half the CPU of a LIST of a thousand keys (bench/RESULTS.md, "S3 LIST").

    Listings carry ISO 8601 (`2026-11-25T01:02:03.000Z`), headers RFC 1123 (`Wed, 25 Nov 2026
    01:02:03 GMT`); anything else goes to botocore's own parser."""
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        pass
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@contextlib.asynccontextmanager
async def s3_client(settings: Settings) -> AsyncIterator[Any]:
    """The process's one S3 client, with timeouts short enough to answer 503 in time."""
    config = AioConfig(
        max_pool_connections=64,
        # Signature version 4 for everything, presigned package links included (botocore
        # would presign with the legacy version 2 for a custom endpoint).
        signature_version="s3v4",
        # What botocore does over https by default, also over plain http (a local MinIO):
        # no second SHA-256 of every byte for the signature. Integrity stays end to end:
        # each request carries a checksum S3 verifies (ours for single PUTs, CRC32 for parts).
        s3={"payload_signing_enabled": False},
        connect_timeout=min(5.0, settings.s3_timeout_seconds),
        read_timeout=settings.s3_timeout_seconds,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    session = get_session()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=s3_timestamp
    )
    async with session.create_client(
        "s3", endpoint_url=settings.s3_endpoint_url, config=config
    ) as client:
        yield client
