"""The access package: built once off the callback path, exact, handed out by download or
link, adopted (not rebuilt) after a crash between its upload and the record update."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import zipfile
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from service.answer.package import PackageBuilder, PackageError, _Pipe
from service.clock import parse_isoformat, utcnow
from service.logs import subject_digest
from service.metrics import Metrics
from service.requests.records import (
    AccessRequest,
    Archive,
    DataRequest,
    Details,
    Events,
    Place,
    Status,
)
from service.requests.schedule import stamp
from service.simulator.payloads import make_events
from service.storage.keys import Keys
from service.storage.s3 import ArchiveStore, s3_client
from tests.conftest import (
    API_TOKEN,
    Bucket,
    Service,
    ServiceFactory,
    Simulator,
    make_settings,
    sha256,
)
from tests.support import (
    archive_key,
    eventually,
    filed,
    metric,
    record_of,
    run_cli,
    wait_until_packaged,
)

# On moto and on SeaweedFS (tests/conftest.py): the test ids say which.
# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = [pytest.mark.both_stores, pytest.mark.slow]

FAST = {"POLL_INTERVAL_SECONDS": "0.2", "POLL_LEASE_SECONDS": "5"}


def cli_env(service: Service) -> dict[str, str]:
    return {"API_TOKEN": API_TOKEN, "RECEIVER_URL": service.admin_url}


def unzip(body: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None  # every member's CRC is right
        return {name: archive.read(name) for name in archive.namelist()}


async def test_an_archived_request_gets_an_exact_package(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.events = make_events(
        date(2026, 5, 10), date(2026, 7, 2), per_day=1, email="gil@example.com"
    )
    service = await make_service(**FAST, REPORT_CONTROLLER_NAME="Shop & Co <B.V.>")
    created = await filed(
        service,
        {"email": "gil@example.com", "events": {"since": "2026-05-10", "until": "2026-07-02"}},
    )

    shown = await wait_until_packaged(service, created["id"])

    package = shown["package"]
    assert package["key"] == f"copernica/packages/{created['id']}.zip"
    stored = await store.read(package["key"])
    assert package["sha256"] == sha256(stored) and package["size"] == len(stored)
    head = await store.head(package["key"])
    assert head["ContentType"] == "application/zip"
    files = unzip(stored)
    assert sorted(files) == ["data.json", "events.jsonl", "manifest.json", "report.html"]
    payload = simulator.state.payload_bytes(created["copernica_id"])
    assert files["data.json"] == payload == await store.read(shown["archive"]["key"])
    windows = await store.keys(f"events/{created['id']}/")
    assert files["events.jsonl"] == b"".join([await store.read(k) for k in windows])
    assert len(files["events.jsonl"].splitlines()) == 53
    manifest = json.loads(files["manifest.json"])
    assert manifest["request_id"] == created["id"]
    assert manifest["subject_type"] == "email"
    assert manifest["received_on"] == created["received_on"]
    assert manifest["due_by"] == created["due_by"]
    assert {f["name"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        name: (len(body), sha256(body)) for name, body in files.items() if name != "manifest.json"
    }
    report = files["report.html"].decode()
    assert "Shop &amp; Co &lt;B.V.&gt;" in report
    assert "<script" not in report.lower()
    assert await store.uploads() == []
    assert await metric(service, "receiver_packages_built_total") >= 1


async def test_no_package_before_the_data_is_archived(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600
    service = await make_service(**FAST)
    created = await filed(service, {"profile": 5})

    async with service.http.get(
        f"{service.admin_url}/v1/data-requests/{created['id']}/package", headers=service.auth
    ) as answer:
        assert answer.status == 409
        assert "not built yet" in (await answer.json())["error"]
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests/{created['id']}/package/link", headers=service.auth
    ) as answer:
        assert answer.status == 409
    assert await store.keys("packages/") == []
    assert (await service.show(created["id"]))["answered_at"] is None


async def test_unknown_request_has_no_package(service: Service) -> None:
    for request_id in (str(ULID()), "nope"):
        async with service.http.get(
            f"{service.admin_url}/v1/data-requests/{request_id}/package", headers=service.auth
        ) as answer:
            assert answer.status == 404
    async with service.http.get(f"{service.admin_url}/v1/data-requests/{ULID()}/package") as answer:
        assert answer.status == 401


async def test_download_streams_the_package_and_answers_the_request(
    make_service: ServiceFactory, store: Bucket
) -> None:
    service = await make_service(**FAST)
    created = await filed(service, {"email": "hal@example.com"})
    package = (await wait_until_packaged(service, created["id"]))["package"]

    async with service.http.get(
        f"{service.admin_url}/v1/data-requests/{created['id']}/package", headers=service.auth
    ) as answer:
        assert answer.status == 200
        body = await answer.read()
        assert answer.headers["Content-Type"] == "application/zip"
        assert answer.headers["ETag"] == f'"{package["sha256"]}"'
        assert answer.headers["Content-Length"] == str(package["size"])
        assert answer.headers["Content-Disposition"] == (
            f'attachment; filename="access-package-{created["id"]}.zip"'
        )
    assert body == await store.read(package["key"])

    first = await eventually(
        lambda: service.show(created["id"]), lambda s: s["answered_at"] is not None
    )
    assert first["overdue"] is False
    async with service.http.get(
        f"{service.admin_url}/v1/data-requests/{created['id']}/package", headers=service.auth
    ) as answer:
        assert answer.status == 200
    assert (await service.show(created["id"]))["answered_at"] == first["answered_at"]
    # An answered request leaves the deadline index: nothing to extend either.
    assert await store.keys("deadlines/") == []
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests/{created['id']}/extend",
        json={"months": 1, "reason": "late"},
        headers=service.auth,
    ) as answer:
        assert answer.status == 409


async def test_a_link_is_a_presigned_get_of_the_package(
    make_service: ServiceFactory, store: Bucket
) -> None:
    service = await make_service(**FAST, PACKAGE_LINK_SECONDS="600")
    created = await filed(service, {"subprofile": 44})
    package = (await wait_until_packaged(service, created["id"]))["package"]

    asked = utcnow()
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests/{created['id']}/package/link", headers=service.auth
    ) as answer:
        assert answer.status == 200
        link = await answer.json()
    answered = utcnow()
    async with service.http.get(link["url"]) as fetched:  # no token: the URL is the key
        assert fetched.status == 200
        assert sha256(await fetched.read()) == package["sha256"]
    # Valid for exactly PACKAGE_LINK_SECONDS from when the link was made.
    expires = parse_isoformat(link["expires_at"])
    assert asked + timedelta(seconds=600) <= expires <= answered + timedelta(seconds=600)
    assert "X-Amz-Expires=600" in link["url"]
    assert (await service.show(created["id"]))["answered_at"] is not None


async def test_a_package_left_by_a_crashed_replica_is_adopted_not_rebuilt(
    make_service: ServiceFactory, store: Bucket
) -> None:
    """A replica uploaded the package and died before writing the record: the next visit
    finds the package, reads back its sha256 and records it; no second package is built."""
    service = await make_service(**FAST)
    created = await filed(service, {"email": "ivy@example.com"})
    package = (await wait_until_packaged(service, created["id"]))["package"]
    etag = (await store.head(package["key"]))["ETag"]

    # The state the crash leaves: the record as before its update, its poll marker still there.
    record = await record_of(store, created["id"])
    when = stamp(utcnow())
    record.update(package=None, next_poll_at=when, lease=None, version=record["version"] + 1)
    await store.client.put_object(
        Bucket=store.name,
        Key=f"copernica/requests/{created['id']}.json",
        Body=json.dumps(record).encode(),
    )
    await store.client.put_object(
        Bucket=store.name, Key=f"copernica/due/{when}/{created['id']}", Body=b""
    )

    adopted = await wait_until_packaged(service, created["id"])

    assert adopted["package"]["sha256"] == package["sha256"]
    assert adopted["package"]["size"] == package["size"]
    assert (await store.head(package["key"]))["ETag"] == etag
    assert await store.keys("packages/") == [package["key"]]
    assert await store.keys("due/") == []


async def builder_for(s3_endpoint: str, bucket: str) -> tuple[Any, Any]:
    settings = make_settings(
        ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint, S3_PART_BYTES=str(5 * 1024 * 1024)
    )
    return settings, s3_client(settings)


async def test_racing_builders_write_one_package_and_agree_on_it(
    make_service: ServiceFactory, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """Two replicas building the same package at once: one object, both report its sha256."""
    service = await make_service(POLL_INTERVAL_SECONDS="600")  # its poller stays out of it
    created = await filed(service, {"email": "jo@example.com"})
    await eventually(lambda: store.keys("archive/"))
    record = AccessRequest.from_bytes(json.dumps(await record_of(store, created["id"])).encode())
    record.first.status = Status.ARCHIVED

    settings, client = await builder_for(s3_endpoint, bucket)
    async with client as s3:
        archive_store = ArchiveStore(s3, settings, Metrics())
        builders = [PackageBuilder(archive_store, None) for _ in range(3)]
        results = await asyncio.gather(*(b.ensure(record) for b in builders))

    key = f"copernica/packages/{created['id']}.zip"
    assert await store.keys("packages/") == [key]
    stored = await store.read(key)
    assert {r.package.sha256 for r in results} == {sha256(stored)}
    assert await store.uploads() == []


async def test_an_archive_that_does_not_match_its_sha256_is_not_packaged(
    make_service: ServiceFactory, store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    service = await make_service(POLL_INTERVAL_SECONDS="600")
    created = await filed(service, {"email": "kim@example.com"})
    await eventually(lambda: store.keys("archive/"))
    record = AccessRequest.from_bytes(json.dumps(await record_of(store, created["id"])).encode())
    record.first.mark_archived(
        Archive("b", "k", hashlib.sha256(b"something else").hexdigest(), 1, "poll", None)
    )

    settings, client = await builder_for(s3_endpoint, bucket)
    async with client as s3:
        with pytest.raises(PackageError, match="does not match"):
            await PackageBuilder(ArchiveStore(s3, settings, Metrics()), None).ensure(record)
    assert await store.keys("packages/") == []
    assert await store.uploads() == []


async def test_cli_download_checks_the_sha256(
    make_service: ServiceFactory, store: Bucket, tmp_path: Path
) -> None:
    service = await make_service(**FAST)
    created = await filed(service, {"email": "lou@example.com"})
    package = (await wait_until_packaged(service, created["id"]))["package"]
    out = tmp_path / "subject.zip"

    code, output = await run_cli("download", created["id"], "--out", str(out), env=cli_env(service))

    assert code == 0, output
    assert out.read_bytes() == await store.read(package["key"])
    assert package["sha256"] in output
    assert not (tmp_path / "subject.zip.part").exists()

    code, output = await run_cli(
        "download", str(ULID()), "--out", str(tmp_path / "x.zip"), env=cli_env(service)
    )
    assert code == 1
    assert "no such request" in output and not (tmp_path / "x.zip").exists()


async def test_the_janitor_aborts_package_uploads_a_killed_builder_left(
    store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """A builder killed mid-upload leaves a multipart upload; once the package exists (built
    by another replica) that upload can never complete and is aborted. One whose key does
    not exist yet may still be in progress elsewhere and stays. Found by the soak: the
    janitor used to look at archive uploads only."""
    settings = make_settings(ARCHIVE_BUCKET=bucket, S3_ENDPOINT_URL=s3_endpoint)
    built, building = str(ULID()), str(ULID())
    async with s3_client(settings) as s3:
        archive = ArchiveStore(s3, settings, Metrics())
        for request_id in (built, building):
            await s3.create_multipart_upload(Bucket=bucket, Key=archive.keys.package(request_id))
        await s3.put_object(Bucket=bucket, Key=archive.keys.package(built), Body=b"PK")

        assert await archive.abort_superseded_uploads() == 1

    assert [u["Key"] for u in await store.uploads()] == [f"copernica/packages/{building}.zip"]


async def test_an_archive_whose_sha256_note_was_lost_gets_it_from_the_package_build(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """A multipart archive's metadata has no sha256 (it is noted in the record after the
    upload; an S3 outage just then loses the note). The poller then finds the object with no
    sha256 anywhere; the package build reads every byte, and the record takes its sha256.
    Found by the soak: such a record used to say `sha256: null` for ever."""
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600
    service = await make_service(POLL_INTERVAL_SECONDS="0.3", POLL_LEASE_SECONDS="5")
    created = await filed(service, {"email": "lu@example.com"})
    body = simulator.state.payload_bytes(created["copernica_id"])
    # The object as a multipart upload leaves it when the record note is lost: no sha256.
    await store.client.put_object(Bucket=store.name, Key=archive_key(created["id"]), Body=body)

    record = await eventually(
        lambda: record_of(store, created["id"]),
        lambda r: r.get("package") is not None,
        what="the package",
    )
    assert record["data_requests"][0]["archive"]["sha256"] == sha256(body)
    assert "data_sha256" not in record["package"]


@pytest.mark.filterwarnings("ignore:coroutine 'Queue.get' was never awaited")
def test_the_zip_writers_thread_stops_when_the_event_loop_is_gone() -> None:
    """The ZIP writer's thread waits for input from the loop. When the loop has stopped (the
    process exits after SIGTERM) no input comes: the thread must give up, else it keeps the
    interpreter from exiting. Found by the soak: a replica logged "stopped" and then hung."""
    loop = asyncio.new_event_loop()
    running = threading.Thread(target=loop.run_forever, daemon=True)
    running.start()
    pipe = _Pipe(loop)
    loop.call_soon_threadsafe(loop.stop)
    running.join(5)
    outcome: list[BaseException | object] = []

    def read() -> None:
        try:
            outcome.append(pipe.get())
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    loop.close()
    assert not reader.is_alive(), "the writer's thread still waits for a loop that is gone"
    assert isinstance(outcome[0], PackageError)


async def test_an_adopted_package_with_a_lost_sha256_note_gets_it_from_the_archive(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    """As above, but the package was built by a replica that died before recording it: the
    visit adopts the package, which says nothing about data.json, so the archive is read.
    Found by the 300-second soak: a purged record kept `archive.sha256: null`."""
    simulator.state.faults.lose_callback = True
    simulator.state.config.ready_after = 3600
    service = await make_service(POLL_INTERVAL_SECONDS="0.3", POLL_LEASE_SECONDS="5")
    created = await filed(service, {"email": "mia@example.com"})
    body = simulator.state.payload_bytes(created["copernica_id"])
    left = b"PK a package left by a replica that died"
    await store.client.put_object(
        Bucket=store.name, Key=f"copernica/packages/{created['id']}.zip", Body=left
    )
    await store.client.put_object(Bucket=store.name, Key=archive_key(created["id"]), Body=body)

    record = await eventually(
        lambda: record_of(store, created["id"]),
        lambda r: r.get("package") is not None,
        what="the adopted package",
    )
    assert record["package"]["sha256"] == sha256(left)
    assert record["data_requests"][0]["archive"]["sha256"] == sha256(body)


# -- the whole person: several sources --------------------------------------------------------

HASH_KEY = b"k" * 32


def line(n: int, kind: str = "open") -> bytes:
    event = {"event": kind, "time": f"2026-05-0{n} 10:00:00", "data": {"id": n, "profile": 101}}
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


async def test_a_package_holds_every_source_and_each_event_once(
    store: Bucket, s3_endpoint: str, bucket: str
) -> None:
    """The filed address, a profile and its subprofile archived, a profile gone: each
    archived source's exact data and details under its own name, the manifest listing all
    four, and an event both the address and the profile returned written once."""
    request_id = str(ULID())
    keys = Keys("copernica/")
    events = Events("2026-05-01", "2026-06-01", windows=1, stored=1)
    email = DataRequest("email", "ann@example.com", status=Status.ARCHIVED, events=events)
    profile = DataRequest(
        "profile", "101", status=Status.ARCHIVED, events=events, database=Place("1", "Newsletter")
    )
    subprofile = DataRequest(
        "subprofile",
        "1001",
        status=Status.ARCHIVED,
        database=Place("1", "Newsletter"),
        collection=Place("11", "Orders"),
        profile="101",
    )
    gone = DataRequest("profile", "202", status=Status.GONE, database=Place("2", "Shop"))
    record = AccessRequest.new(request_id, email, received_on="2026-06-20")
    for source in (profile, subprofile, gone):
        record.add_source(source)

    def digest(source: DataRequest) -> str:
        return subject_digest(HASH_KEY, source.subject_type, source.subject_id)

    objects = {
        keys.archive(request_id): b'{"data":[["first"]]}',
        keys.events(request_id, "2026-05-01"): line(1) + line(2),
        keys.source_data(request_id, digest(profile)): b'{"data":[["profile"]]}',
        keys.source_details(request_id, digest(profile)): b'{"ID":"101","fields":{"Name":"Ann"}}',
        keys.source_events(request_id, digest(profile), "2026-05-01"): line(2) + line(3),
        keys.source_data(request_id, digest(subprofile)): b'{"data":[]}',
        keys.source_details(request_id, digest(subprofile)): b'{"ID":"1001","fields":{}}',
    }
    for key, body in objects.items():
        await store.client.put_object(Bucket=bucket, Key=key, Body=body)
    for source, key in (
        (email, keys.archive(request_id)),
        (profile, keys.source_data(request_id, digest(profile))),
        (subprofile, keys.source_data(request_id, digest(subprofile))),
    ):
        source.archive = Archive(bucket, key, sha256(objects[key]), len(objects[key]), "poll", None)
    for source in (profile, subprofile):
        body = objects[keys.source_details(request_id, digest(source))]
        source.note_details(Details("k", sha256(body), len(body)))

    settings, client = await builder_for(s3_endpoint, bucket)
    async with client as s3:
        builder = PackageBuilder(ArchiveStore(s3, settings, Metrics()), None, hash_key=HASH_KEY)
        built = await builder.ensure(record)

    files = unzip(await store.read(built.package.key))
    profile_key = keys.source_details(request_id, digest(profile))
    assert {name: body for name, body in files.items() if name.endswith(".json")} == {
        "data.json": objects[keys.archive(request_id)],
        "sources/profile-101/data.json": objects[keys.source_data(request_id, digest(profile))],
        "sources/profile-101/details.json": objects[profile_key],
        "sources/subprofile-1001/data.json": b'{"data":[]}',
        "sources/subprofile-1001/details.json": b'{"ID":"1001","fields":{}}',
        "manifest.json": files["manifest.json"],
    }
    assert files["events.jsonl"] == line(1) + line(2) + line(3)
    assert built.data_sha256 == sha256(files["data.json"])
    manifest = json.loads(files["manifest.json"])
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {
        name: sha256(body) for name, body in files.items() if name != "manifest.json"
    }
    assert manifest["sources"] == [
        {
            "source": "email",
            "status": "archived",
            "database": None,
            "collection": None,
            "files": ["data.json"],
        },
        {
            "source": "profile:101",
            "status": "archived",
            "database": {"id": "1", "name": "Newsletter"},
            "collection": None,
            "files": ["sources/profile-101/data.json", "sources/profile-101/details.json"],
        },
        {
            "source": "subprofile:1001",
            "status": "archived",
            "database": {"id": "1", "name": "Newsletter"},
            "collection": {"id": "11", "name": "Orders"},
            "files": ["sources/subprofile-1001/data.json", "sources/subprofile-1001/details.json"],
        },
        {
            "source": "profile:202",
            "status": "gone",
            "database": {"id": "2", "name": "Shop"},
            "collection": None,
            "files": [],
        },
    ]
    assert not any("ann@example.com" in name for name in files)
    assert "removed before we could collect it" in files["report.html"].decode()
    assert await store.uploads() == []
