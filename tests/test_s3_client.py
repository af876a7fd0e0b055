"""The service's S3 client reads S3's timestamps as botocore's default parser does, faster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.utils import parse_timestamp

from service.storage.s3 import s3_client, s3_timestamp
from tests.conftest import Bucket, make_settings


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-25T01:02:03.000Z",  # a listing's LastModified
        "2026-11-25T01:02:03Z",
        "2026-11-25T01:02:03.123456+01:00",
        "Wed, 25 Nov 2026 01:02:03 GMT",  # a Last-Modified header
        "Tue, 24 Nov 2026 23:02:03 -0200",
    ],
)
def test_timestamps_equal_botocores(text: str) -> None:
    parsed = s3_timestamp(text)
    assert parsed == parse_timestamp(text)
    assert parsed.utcoffset() is not None


def test_a_format_it_does_not_know_goes_to_botocore() -> None:
    assert s3_timestamp("1764032523") == datetime(2025, 11, 25, 1, 2, 3, tzinfo=UTC)


async def test_listing_and_head_read_the_same_times_as_a_default_client(
    store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    key = f"{store.prefix}due/2026-11-25T01:02:03Z/01JDCK0000000000000000TIME"
    await store.client.put_object(Bucket=bucket, Key=key, Body=b"")
    expected_listed = (await store.client.list_objects_v2(Bucket=bucket, Prefix=key))["Contents"]
    expected_head = await store.client.head_object(Bucket=bucket, Key=key)

    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    async with s3_client(settings) as s3:
        listed = (await s3.list_objects_v2(Bucket=bucket, Prefix=key))["Contents"]
        head = await s3.head_object(Bucket=bucket, Key=key)

    modified = listed[0]["LastModified"]
    assert modified == expected_listed[0]["LastModified"]
    assert modified.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - modified) < timedelta(minutes=5)
    assert head["LastModified"] == expected_head["LastModified"]
    assert head["LastModified"].tzinfo is UTC  # not dateutil's tzutc()
