"""The start-up proof that the bucket is one this service may run on.

Exactly-once rests on conditional writes: `If-None-Match: *` on PutObject and on
CompleteMultipartUpload (an archive, a package, a window is written once), `If-Match` on
PutObject (a record changes only from the version read). Not every S3-compatible store honours
them; one that silently ignores them would let two replicas overwrite each other's archive or
record without anybody noticing. So before serving, each replica writes a probe object under
`{prefix}startup-probe/` and checks that each condition is refused with 412 when it should be;
a missing or unwritable bucket is refused the same way, by name. About a dozen S3 calls.

It also looks at the bucket's versioning (GetBucketVersioning: enabled, suspended, or never
enabled) and reports it: the `store_checked` log line and the `receiver_bucket_versioning`
metric. Versioning is allowed; retention then deletes every version of what it purges
(`service.answer.retention`), and the probe's own versions are deleted here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from datetime import timedelta

import structlog
from ulid import ULID

from service.clock import SYSTEM, Clock
from service.storage.s3 import (
    VERSIONING_UNKNOWN,
    ArchiveStore,
    ArchiveUnavailable,
    NotFound,
    PreconditionFailed,
)

log = structlog.get_logger(__name__)

# How long start-up waits for an S3 that does not answer before it gives up.
REACH_ATTEMPTS, REACH_PAUSE_SECONDS = 5, 1.0
STALE_PROBE = timedelta(minutes=1)


class UnsafeStore(Exception):
    """The bucket cannot be used; the message is the one line an operator needs."""


async def prove_store(store: ArchiveStore, clock: Clock = SYSTEM) -> None:
    """Return if the bucket exists, can be written and honours conditional writes; else
    UnsafeStore naming what is wrong."""
    await _reach(store)
    versioning = await store.bucket_versioning()
    key = store.keys.probe(str(ULID.from_datetime(clock.now())))
    try:
        await _prove(store, key)
    except ArchiveUnavailable as exc:  # S3 went away half-way: refused the same way
        raise UnsafeStore(
            f"S3 bucket {store.bucket!r} became unreachable during the start-up check ({exc})"
        ) from None
    with contextlib.suppress(ArchiveUnavailable):
        await abort_stale_probes(store, clock)
    # The bucket's name and state only: never an endpoint's credentials.
    log.info(
        "store_checked",
        bucket=store.bucket,
        conditional_writes="honoured",
        versioning=versioning.lower(),
        keeps_versions=store.keeps_versions,
    )
    if versioning == VERSIONING_UNKNOWN:
        log.warning(
            "store_versioning_unknown",
            bucket=store.bucket,
            hint="grant s3:GetBucketVersioning; retention deletes by version id meanwhile",
        )


async def abort_stale_probes(store: ArchiveStore, clock: Clock = SYSTEM) -> int:
    """Abort probe uploads of starts that died half-way (killed, or S3 gone mid-probe); a
    probe takes a second, so one older than a minute (its key is a ULID) is dead. Called at
    start-up and by the poller's housekeeping. Found by the soak."""
    aborted = 0
    for key, upload_id in await store.uploads(store.keys.probes_folder()):
        try:
            started = ULID.from_str(key.rsplit("/", 1)[1]).datetime
        except ValueError:
            continue
        if clock.now() - started > STALE_PROBE:
            await store.abort_upload(key, upload_id)
            aborted += 1
    return aborted


async def _prove(store: ArchiveStore, key: str) -> None:
    try:
        try:
            etag = await store.put(key, b"probe", if_none_match=True)
        except (NotFound, PreconditionFailed, ArchiveUnavailable) as exc:
            raise UnsafeStore(
                f"S3 bucket {store.bucket!r} cannot be written ({exc}); check ARCHIVE_BUCKET "
                "and the credentials' permissions"
            ) from None
        await _refused(
            store.put(key, b"second", if_none_match=True),
            store,
            "If-None-Match: * on PutObject (an existing object was overwritten)",
        )
        await _refused(
            store.put(key, b"changed", if_match=f'"{etag.strip(chr(34))}x"'),
            store,
            "If-Match on PutObject (a write with a stale ETag went through)",
        )
        upload_id = await store.create_upload(key, "application/octet-stream", {})
        try:
            part = await store.upload_part(key, upload_id, 1, b"part")
            await _refused(
                store.complete_upload(key, upload_id, [{"PartNumber": 1, "ETag": part}]),
                store,
                "If-None-Match: * on CompleteMultipartUpload (an existing object was replaced)",
            )
        finally:
            # Never raises: an upload already gone is fine, and one S3 would not abort now is
            # retried in the background (or by a later start's abort_stale_probes).
            await store.abort_upload(key, upload_id)
    finally:
        with contextlib.suppress(ArchiveUnavailable, NotFound):
            # A probe object left behind is harmless; in a bucket that keeps versions its
            # three versions go too, so starts do not pile them up.
            if store.keeps_versions:
                async for version in store.versions(key):
                    if version.key == key:
                        await store.delete_version(key, version.version_id)
            else:
                await store.delete(key)


async def _reach(store: ArchiveStore) -> None:
    for attempt in range(REACH_ATTEMPTS):
        try:
            await store.head_bucket()
            return
        except NotFound:
            raise UnsafeStore(
                f"S3 bucket {store.bucket!r} does not exist (check ARCHIVE_BUCKET and "
                "S3_ENDPOINT_URL / the AWS region)"
            ) from None
        except ArchiveUnavailable as exc:
            if attempt == REACH_ATTEMPTS - 1:
                raise UnsafeStore(
                    f"S3 bucket {store.bucket!r} is unreachable or refuses access ({exc})"
                ) from None
            await asyncio.sleep(REACH_PAUSE_SECONDS)


async def _refused(write: Awaitable[object], store: ArchiveStore, condition: str) -> None:
    """The conditional write must fail with 412; anything else means the store is unsafe."""
    try:
        await write
    except PreconditionFailed:
        return
    raise UnsafeStore(
        f"S3 bucket {store.bucket!r} does not honour conditional writes: {condition}; "
        "exactly-once archiving depends on them, refusing to start"
    )
