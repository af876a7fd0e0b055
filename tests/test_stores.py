"""How moto and SeaweedFS differ where the service meets them, one test per row of
docs/stores.md, each run on both stores (ids `[moto]` / `[seaweedfs]`).

A test states what each store does (`BY_STORE[store_kind]` where they differ) and what the
service makes of it through its own S3 module (`ArchiveStore`): when a store changes its
behaviour, the row's test goes red and the table is out of date."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from collections.abc import AsyncIterator, Awaitable
from datetime import date
from typing import Any

import aiohttp
import botocore.exceptions
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from service.metrics import Metrics
from service.storage.s3 import (
    ArchiveStore,
    ArchiveUnavailable,
    PreconditionFailed,
    s3_client,
    s3_timestamp,
)
from tests.conftest import Bucket, ServiceFactory, Simulator, make_settings, sha256
from tests.support import MIB, filed, wait_until_packaged

# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

PART = 5 * MIB  # S3's smallest part
# Presigned URLs as the service makes them (botocore presigns with SigV2 for a custom endpoint)
SIGV4 = AioConfig(signature_version="s3v4")
BODY = b'{"subject": "x"}'


@pytest.fixture
async def archive(s3_endpoint: str, bucket: str) -> AsyncIterator[ArchiveStore]:
    """The service's own S3 module on the test's bucket, as a replica builds it."""
    settings = make_settings(
        ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint, S3_PART_BYTES=str(PART)
    )
    async with s3_client(settings) as client:
        store = ArchiveStore(client, settings, Metrics())
        yield store
        await store.close()


async def answer(call: Awaitable[Any]) -> str:
    """What S3 answered a call: "ok", or "<status> <error code>"."""
    try:
        await call
    except botocore.exceptions.ClientError as exc:
        meta = exc.response.get("ResponseMetadata", {})
        return f"{meta.get('HTTPStatusCode')} {exc.response.get('Error', {}).get('Code')}"
    return "ok"


def md5(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'  # noqa: S324 (what S3 computes)


async def put(store: Bucket, key: str, body: bytes = b"") -> None:
    await store.client.put_object(Bucket=store.name, Key=key, Body=body)


# -- ETags --------------------------------------------------------------------------------------


async def test_a_single_put_has_the_md5_of_its_body_as_etag(
    archive: ArchiveStore, store: Bucket
) -> None:
    etag = await archive.put("copernica/one.json", BODY, if_none_match=True)
    assert etag == md5(BODY) == (await store.head("copernica/one.json"))["ETag"]
    [listed] = (await store.client.list_objects_v2(Bucket=store.name))["Contents"]
    assert listed["ETag"] == etag


async def test_a_multipart_upload_completes_with_the_part_etags_the_store_gave(
    archive: ArchiveStore, store: Bucket
) -> None:
    """The service never computes an ETag: it hands each part's back in
    CompleteMultipartUpload. The object's ETag is then `"<md5 of the part MD5s>-<parts>"` on
    both stores."""
    first = bytes(range(256)) * (PART // 256)
    upload = archive.upload("copernica/big.json", {"source": "callback"})
    await upload.write(first)  # a full part goes up
    await upload.write(b"tail")  # the last part, at commit
    assert await upload.commit({"sha256": sha256(first + b"tail")})
    head = await store.head("copernica/big.json")
    assert head["ETag"].endswith('-2"')  # both: the MD5 of the parts' ETags, and their count
    assert await store.read("copernica/big.json") == first + b"tail"
    assert await store.uploads() == []


# -- listings -------------------------------------------------------------------------------------


async def test_seaweedfs_lists_a_folder_before_a_sibling_that_sorts_before_its_slash(
    archive: ArchiveStore, store: Bucket, store_kind: str
) -> None:
    """SeaweedFS keeps keys as a directory tree and lists a folder `a/` where `a` sorts,
    before `a-` (S3 order puts `-` before `/`). Our layout names each level with strings of
    one length (ULIDs, stamps, ISO dates), where the two orders agree: below."""
    for key in ("k/a", "k/a-", "k/a/x", "k/a0", "k/b"):
        await put(store, f"copernica/{key}")
    listed = [item.key[len("copernica/") :] async for item in archive.objects("copernica/k/")]
    assert (
        listed
        == {
            "moto": ["k/a", "k/a-", "k/a/x", "k/a0", "k/b"],
            "seaweedfs": ["k/a", "k/a/x", "k/a-", "k/a0", "k/b"],
        }[store_kind]
    )


async def test_the_service_layout_lists_in_key_order_page_by_page_on_both(
    archive: ArchiveStore, store: Bucket
) -> None:
    """Schedule markers (stamp folders), deadline markers (date folders) and records, listed
    two to a page with StartAfter the last key (what ArchiveStore.objects does): every key
    once, in S3's key order, IsTruncated until the last page."""
    ids = ["01JAAAAAAAAAAAAAAAAAAAAAAA", "01JBBBBBBBBBBBBBBBBBBBBBBB", "01JCCCCCCCCCCCCCCCCCCCCCCC"]
    keys = archive.keys
    wanted = [keys.schedule_marker(i, f"2026112{n}T1010{n}0.00000{n}Z") for n, i in enumerate(ids)]
    wanted += [keys.schedule_marker(ids[0], "20261121T101010.000001Z")]
    wanted += [keys.deadline_marker(i, date(2026, 10 + n, 1 + n)) for n, i in enumerate(ids)]
    wanted += [keys.record(i) for i in ids]
    for key in wanted:
        await put(store, key)
    for folder in (keys.schedule_folder(), keys.deadlines_folder(), keys.records_folder()):
        expected = sorted(k for k in wanted if k.startswith(folder))
        assert [item.key async for item in archive.objects(folder, page_size=2)] == expected
        first = await store.client.list_objects_v2(Bucket=store.name, Prefix=folder, MaxKeys=2)
        assert first["IsTruncated"] is True and first["KeyCount"] == 2
        after = [item.key async for item in archive.objects(folder, start_after=expected[0])]
        assert after == expected[1:]


async def test_start_after_a_folder_name_skips_the_folder_on_seaweedfs(
    store: Bucket, store_kind: str
) -> None:
    """StartAfter naming a folder without its slash: S3 order lists the folder's keys (they
    sort after it), SeaweedFS skips the folder. The service's StartAfter is always a full
    key (the last one listed, or a cursor it gave out)."""
    for key in ("due/20261121T101010.000000Z/A", "due/20261122T101010.000000Z/B"):
        await put(store, key)
    listed = await store.client.list_objects_v2(
        Bucket=store.name, Prefix="due/", StartAfter="due/20261121T101010.000000Z"
    )
    assert [item["Key"] for item in listed["Contents"]] == {
        "moto": ["due/20261121T101010.000000Z/A", "due/20261122T101010.000000Z/B"],
        "seaweedfs": ["due/20261122T101010.000000Z/B"],
    }[store_kind]


async def test_max_uploads_is_ignored_by_moto(store: Bucket, store_kind: str) -> None:
    """ListMultipartUploads: SeaweedFS honours MaxUploads (and says IsTruncated), moto
    answers every upload. The janitor reads one page (the first thousand)."""
    for key in ("copernica/u/b", "copernica/u/a", "copernica/u/c"):
        await store.client.create_multipart_upload(Bucket=store.name, Key=key)
    page = await store.client.list_multipart_uploads(Bucket=store.name, MaxUploads=1)
    assert (len(page["Uploads"]), bool(page.get("IsTruncated"))) == {
        "moto": (3, False),
        "seaweedfs": (1, True),
    }[store_kind]
    assert len(await store.uploads()) == 3


# -- checksums ------------------------------------------------------------------------------------


async def test_a_wrong_sha256_is_refused_by_seaweedfs_and_stored_by_moto(
    archive: ArchiveStore, store: Bucket, store_kind: str
) -> None:
    """The ChecksumSHA256 each single PUT carries: SeaweedFS checks it (400 BadDigest: the
    service answers 503, the sender retries), moto ignores it."""
    wrong = hashlib.sha256(b"something else").hexdigest()
    if store_kind == "seaweedfs":
        with pytest.raises(ArchiveUnavailable, match="BadDigest"):
            await archive.put("copernica/bad.json", BODY, sha256=wrong)
        assert await store.keys() == []
    else:
        await archive.put("copernica/bad.json", BODY, sha256=wrong)
        assert await store.read("copernica/bad.json") == BODY

    await archive.put("copernica/good.json", BODY, sha256=sha256(BODY))
    head = await store.client.head_object(
        Bucket=store.name, Key="copernica/good.json", ChecksumMode="ENABLED"
    )
    kept = base64.b64encode(hashlib.sha256(BODY).digest()).decode()
    assert head.get("ChecksumSHA256") == {"moto": None, "seaweedfs": kept}[store_kind]


# -- presigned URLs --------------------------------------------------------------------------------


async def test_a_package_link_works_on_both_and_only_seaweedfs_checks_its_signature(
    archive: ArchiveStore, store: Bucket, s3_endpoint: str, store_kind: str
) -> None:
    await put(store, "copernica/packages/p.zip", b"PK-bytes")
    url = await archive.presigned_get("copernica/packages/p.zip", 600, "subject.zip")
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as got:
            assert got.status == 200 and await got.read() == b"PK-bytes"
            assert got.headers["Content-Disposition"] == 'attachment; filename="subject.zip"'
        # The same signature for another key; a link signed with a key the store does not know
        await put(store, "copernica/packages/q.zip", b"other")
        async with http.get(url.replace("/p.zip", "/q.zip")) as tampered:
            assert tampered.status == {"moto": 200, "seaweedfs": 403}[store_kind]
        async with get_session().create_client(
            "s3",
            endpoint_url=s3_endpoint,
            aws_access_key_id="x",
            aws_secret_access_key="y",
            config=SIGV4,
        ) as stranger:
            forged = await stranger.generate_presigned_url(
                "get_object", Params={"Bucket": store.name, "Key": "copernica/packages/p.zip"}
            )
            async with http.get(forged) as refused:
                assert refused.status == {"moto": 200, "seaweedfs": 403}[store_kind]


# -- multipart edge cases --------------------------------------------------------------------------


async def test_a_completion_over_an_existing_key_loses_on_both(
    archive: ArchiveStore, store: Bucket
) -> None:
    upload = archive.upload("copernica/a.json", {"source": "callback"})
    await upload.write(b"x" * PART)  # the key is free: the upload begins, a part goes up
    await put(store, "copernica/a.json", b"first")  # another writer wins meanwhile
    await upload.write(b"x" * 10)
    assert await upload.commit({"sha256": "unused"}) is False  # 412 on Complete; aborted
    assert await store.read("copernica/a.json") == b"first"
    assert await store.uploads() == []


async def test_aborting_a_completed_upload_is_404_on_moto_and_ok_on_seaweedfs(
    archive: ArchiveStore, store: Bucket, store_kind: str
) -> None:
    """ArchiveStore.abort_upload takes either quietly; the object stays."""
    body = b"y" * PART
    started = await store.client.create_multipart_upload(Bucket=store.name, Key="copernica/c")
    upload_id = started["UploadId"]
    part = await store.client.upload_part(
        Bucket=store.name, Key="copernica/c", UploadId=upload_id, PartNumber=1, Body=body
    )
    await store.client.complete_multipart_upload(
        Bucket=store.name,
        Key="copernica/c",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    abort = store.client.abort_multipart_upload(
        Bucket=store.name, Key="copernica/c", UploadId=upload_id
    )
    assert await answer(abort) == {"moto": "404 NoSuchUpload", "seaweedfs": "ok"}[store_kind]
    await archive.abort_upload("copernica/c", upload_id)
    assert await store.read("copernica/c") == body


async def test_a_part_for_an_unknown_upload(store: Bucket, store_kind: str) -> None:
    """moto answers 500, SeaweedFS 404 NoSuchUpload; either way the service's upload fails
    and is tried again (ArchiveUnavailable)."""
    call = store.client.upload_part(
        Bucket=store.name, Key="copernica/d", UploadId="no-such-upload", PartNumber=1, Body=b"1"
    )
    assert await answer(call) == {"moto": "500 500", "seaweedfs": "404 NoSuchUpload"}[store_kind]


# -- metadata -----------------------------------------------------------------------------------


async def test_user_metadata_comes_back_with_lower_case_keys_on_both(
    archive: ArchiveStore, store: Bucket
) -> None:
    sent = {"sha256": "a" * 64, "Source": "callback", "received-at": "2026-11-24T10:00:00Z"}
    await archive.put("copernica/single.json", BODY, metadata=sent)
    upload_id = await archive.create_upload("copernica/multi.json", "application/json", sent)
    await archive.abort_upload("copernica/multi.json", upload_id)
    got = (await store.head("copernica/single.json"))["Metadata"]
    assert got == {"sha256": "a" * 64, "source": "callback", "received-at": "2026-11-24T10:00:00Z"}
    async with archive.open("copernica/single.json") as reading:
        assert reading.metadata == got


# -- errors and their codes -----------------------------------------------------------------------


async def test_missing_keys_answer_alike(archive: ArchiveStore, store: Bucket) -> None:
    client, name = store.client, store.name
    assert await answer(client.get_object(Bucket=name, Key="nope")) == "404 NoSuchKey"
    assert await answer(client.head_object(Bucket=name, Key="nope")) == "404 404"
    assert await archive.get("nope") is None and await archive.head("nope") is None
    assert await answer(client.delete_object(Bucket=name, Key="nope")) == "ok"
    await archive.delete("nope")


async def test_conditions_that_fail_answer_412_on_both(
    archive: ArchiveStore, store: Bucket
) -> None:
    etag = await archive.put("copernica/r.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await archive.put("copernica/r.json", b"2", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await archive.put("copernica/r.json", b"2", if_match='"0123456789abcdef0123456789abcdef"')
    await archive.put("copernica/r.json", b"3", if_match=etag)
    assert await store.read("copernica/r.json") == b"3"


async def test_if_match_on_a_missing_key_is_a_lost_condition_on_both(
    archive: ArchiveStore, store: Bucket, store_kind: str
) -> None:
    """moto (as AWS) answers 404 NoSuchKey, SeaweedFS 412: ArchiveStore.put says
    PreconditionFailed for both (the object read is not there any more)."""
    call = store.client.put_object(Bucket=store.name, Key="gone", Body=b"1", IfMatch=md5(b"0"))
    expected = {"moto": "404 NoSuchKey", "seaweedfs": "412 PreconditionFailed"}[store_kind]
    assert await answer(call) == expected
    with pytest.raises(PreconditionFailed):
        await archive.put("copernica/gone.json", b"1", if_match=md5(b"0"))
    assert await store.keys() == []


async def test_a_missing_bucket(store: Bucket, store_kind: str) -> None:
    """Reads answer NoSuchBucket on both (the start-up check refuses the bucket by name: tests/
    test_store_check.py). A PUT to it fails on moto; SeaweedFS creates the bucket."""
    client, name = store.client, f"{store.name}-missing"
    assert await answer(client.head_bucket(Bucket=name)) == "404 404"
    assert await answer(client.get_object(Bucket=name, Key="k")) == "404 NoSuchBucket"
    assert await answer(client.list_objects_v2(Bucket=name)) == "404 NoSuchBucket"
    put_answer = await answer(client.put_object(Bucket=name, Key="k", Body=b"1"))
    try:
        assert put_answer == {"moto": "404 NoSuchBucket", "seaweedfs": "ok"}[store_kind]
    finally:
        if put_answer == "ok":
            await client.delete_object(Bucket=name, Key="k")
            await client.delete_bucket(Bucket=name)


async def test_deleting_a_bucket_with_objects(store: Bucket, store_kind: str) -> None:
    """moto refuses (409 BucketNotEmpty, as AWS); SeaweedFS deletes the bucket and every
    object in it (its -s3.allowDeleteBucketNotEmpty, on by default)."""
    name = f"{store.name}-doomed"
    await store.client.create_bucket(Bucket=name)
    await store.client.put_object(Bucket=name, Key="copernica/k", Body=b"1")
    deleted = await answer(store.client.delete_bucket(Bucket=name))
    assert deleted == {"moto": "409 BucketNotEmpty", "seaweedfs": "ok"}[store_kind]
    if store_kind == "moto":
        await store.client.delete_object(Bucket=name, Key="copernica/k")
        await store.client.delete_bucket(Bucket=name)


# -- Last-Modified -------------------------------------------------------------------------------


async def test_last_modified_is_whole_seconds_on_both(
    archive: ArchiveStore, store: Bucket, s3_endpoint: str, store_kind: str
) -> None:
    """Listings write it `...T01:02:03.000Z` (moto) or `...T01:02:03Z` (SeaweedFS); our
    parser takes both, and a listing's time is its HEAD's."""
    await put(store, "copernica/t", b"1")
    [listed] = [item async for item in archive.objects("copernica/")]
    head = await archive.head("copernica/t")
    assert head is not None and listed.modified == head["LastModified"]
    assert listed.modified.microsecond == 0 and listed.modified.utcoffset() is not None
    async with get_session().create_client(
        "s3", endpoint_url=s3_endpoint, config=SIGV4
    ) as signer:  # the raw XML: a presigned LIST
        url = await signer.generate_presigned_url(
            "list_objects_v2", Params={"Bucket": store.name, "Prefix": "copernica/"}
        )
    async with aiohttp.ClientSession() as http, http.get(url) as got:
        assert got.status == 200
        xml = await got.text()
    raw = xml.split("<LastModified>")[1].split("</LastModified>")[0]
    assert raw.endswith(
        {"moto": ".000Z", "seaweedfs": f":{listed.modified.second:02d}Z"}[store_kind]
    )
    assert s3_timestamp(raw) == listed.modified


# -- versioning -----------------------------------------------------------------------------------


async def versions(store: Bucket, key: str) -> list[tuple[str, bool, bool]]:
    """(version id, is latest, is a delete marker) of every version of `key`."""
    found = await store.client.list_object_versions(Bucket=store.name, Prefix=key)
    return [(v["VersionId"], v["IsLatest"], False) for v in found.get("Versions", [])] + [
        (v["VersionId"], v["IsLatest"], True) for v in found.get("DeleteMarkers", [])
    ]


async def versioning(store: Bucket, status: str) -> None:
    await store.client.put_bucket_versioning(
        Bucket=store.name, VersioningConfiguration={"Status": status}
    )


async def test_a_suspended_bucket_keeps_versions_on_seaweedfs_and_loses_them_on_moto(
    store: Bucket, store_kind: str
) -> None:
    """AWS keeps the versions written while versioning was enabled when it is suspended, and
    a delete there leaves a `null` delete marker: SeaweedFS does both, moto neither."""
    assert "Status" not in await store.client.get_bucket_versioning(Bucket=store.name)
    await versioning(store, "Enabled")
    await put(store, "k", b"1")
    await put(store, "k", b"2")
    await put(store, "gone", b"1")
    assert len(await versions(store, "k")) == 2
    await versioning(store, "Suspended")
    await put(store, "k", b"3")
    await store.client.delete_object(Bucket=store.name, Key="gone")
    kept = len(await versions(store, "k"))
    markers = [v for v in await versions(store, "gone") if v[2]]
    assert (kept, len(markers)) == {"moto": (1, 0), "seaweedfs": (3, 1)}[store_kind]


async def test_if_match_after_versioning_is_suspended(
    archive: ArchiveStore, store: Bucket, store_kind: str
) -> None:
    """A key whose current version was written while versioning was enabled, in a bucket
    where it is now suspended: SeaweedFS refuses If-Match with its own current ETag (412),
    until an unconditional write makes a `null` version. A record there cannot be updated
    (docs/stores.md: keep versioning enabled on SeaweedFS, never suspended)."""
    await versioning(store, "Enabled")
    etag = await archive.put("copernica/requests/r.json", b"1", if_none_match=True)
    await versioning(store, "Suspended")
    if store_kind == "seaweedfs":
        with pytest.raises(PreconditionFailed):
            await archive.put("copernica/requests/r.json", b"2", if_match=etag)
        assert await store.read("copernica/requests/r.json") == b"1"
    else:
        await archive.put("copernica/requests/r.json", b"2", if_match=etag)
        assert await store.read("copernica/requests/r.json") == b"2"
    await versioning(store, "Enabled")  # enabled again: If-Match works on both
    current = (await store.head("copernica/requests/r.json"))["ETag"]
    await archive.put("copernica/requests/r.json", b"4", if_match=current)
    assert await store.read("copernica/requests/r.json") == b"4"


# -- through the service ------------------------------------------------------------------------


async def test_a_multipart_archive_is_packaged_byte_for_byte(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A payload larger than a part is archived as a multipart upload (If-None-Match on the
    completion) and packaged from its streamed read: data.json is the payload, on both."""
    simulator.state.config.payload_size = PART + MIB
    service = await make_service(
        POLL_INTERVAL_SECONDS="0.2", POLL_LEASE_SECONDS="5", S3_PART_BYTES=str(PART)
    )
    created = await filed(service, {"email": "mo@example.com"})
    shown = await wait_until_packaged(service, created["id"])

    payload = simulator.state.payload_bytes(created["copernica_id"])
    assert len(payload) > PART
    archive = shown["archive"]["key"]
    assert (await store.head(archive))["ETag"].endswith('-2"')
    assert await store.read(archive) == payload
    package = await store.read(shown["package"]["key"])
    assert zipfile.ZipFile(io.BytesIO(package)).read("data.json") == payload
    assert shown["package"]["sha256"] == sha256(package)
    assert await store.uploads() == []
