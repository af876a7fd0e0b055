"""The operator API and the end-to-end flow: file, Copernica calls back, the archive lands."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
from ulid import ULID

from service.app import LEDGER, POLLER, STORE, hash_key
from service.clock import isoformat, utcnow
from service.intake.urls import callback_url
from service.logs import subject_digest
from service.requests.records import (
    AccessRequest,
    Archive,
    DataRequest,
    Details,
    Discovery,
    DiscoveryStatus,
    Place,
    Status,
)
from service.requests.schedule import Schedule, parse_stamp
from tests.conftest import (
    ACCESS_TOKEN,
    API_TOKEN,
    Bucket,
    Service,
    ServiceFactory,
    Simulator,
    TcpProxy,
    sha256,
)
from tests.support import archive_key, eventually, record_of, run_cli, wait_for_status

# Over ~20 s in all: left out of the quick subset, `pytest -m "not slow"`.
pytestmark = pytest.mark.slow


async def test_filed_request_is_called_back_and_archived_exactly(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    async with await service.file({"email": "carol@example.com"}) as answer:
        assert answer.status == 202
        created = await answer.json()
    assert created["status"] == "pending"
    assert created["copernica_id"]
    assert ULID.from_str(created["id"])

    shown = await wait_for_status(service, created["id"], "archived")

    assert shown["status"] == "archived"
    expected = simulator.state.payload_bytes(created["copernica_id"])
    assert await store.read(archive_key(created["id"])) == expected
    assert shown["archive"]["sha256"] == sha256(expected)
    assert shown["archive"]["source"] == "callback"
    record = json.loads(await store.read(f"copernica/requests/{created['id']}.json"))
    assert record["data_requests"][0]["subject_id"] == "carol@example.com"
    assert record["status"] == "archived"  # folded into the record when read


async def test_report_address_is_our_authenticated_callback_url(
    service: Service, simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    async with await service.file({"email": "dave@example.com"}) as answer:
        created = await answer.json()
    report = simulator.state.requests[created["copernica_id"]].report
    assert service.settings.callback_secret is not None
    digest = subject_digest(hash_key(service.settings), "email", "dave@example.com")
    assert report == callback_url(
        service.url, service.settings.callback_secret, created["id"], digest
    )
    assert "dave" not in urlsplit(report).path


async def test_without_public_base_url_no_report_is_given(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    service = await make_service(PUBLIC_BASE_URL="")
    simulator.state.faults.lose_callback = True
    async with await service.file({"profile": 12}) as answer:
        created = await answer.json()
    assert answer.status == 202
    assert simulator.state.requests[created["copernica_id"]].report is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/data-requests"),
        ("GET", "/v1/data-requests"),
        # A well-formed id no request has, fixed: xdist's workers must collect the same ids.
        ("GET", "/v1/data-requests/01HZX3K8Q5V2N7M4B6C9D1E0FG"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {API_TOKEN}", API_TOKEN])
async def test_operator_api_needs_the_bearer_token(
    service: Service, method: str, path: str, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    async with service.http.request(
        method, service.admin_url + path, json={"email": "a@b.cd"}, headers=headers
    ) as answer:
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one"),
        ({"email": "a@b.cd", "profile": 1}, "exactly one"),
        ({"email": "not-an-address"}, "e-mail"),
        ({"email": "two@@example.com"}, "e-mail"),
        ({"email": "sp ace@example.com"}, "e-mail"),
        ({"email": 5}, "e-mail"),
        ({"profile": 0}, "positive integer"),
        ({"profile": -3}, "positive integer"),
        ({"profile": "12a"}, "positive integer"),
        ({"subprofile": True}, "positive integer"),
        ({"email": "a@b.cd", "colour": "red"}, "unknown member"),
        (["email"], "JSON object"),
    ],
)
async def test_malformed_request_is_400_and_nothing_is_filed(
    service: Service, simulator: Simulator, store: Bucket, body: Any, message: str
) -> None:
    async with await service.file(body) as answer:
        assert answer.status == 400
        assert message in (await answer.json())["error"]
    assert await store.keys() == []
    assert simulator.state.requests == {}


async def test_body_that_is_not_json_is_400(service: Service, store: Bucket) -> None:
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests", data=b"{nope", headers=service.auth
    ) as answer:
        assert answer.status == 400
    assert await store.keys() == []


async def test_idempotency_key_files_once(service: Service, simulator: Simulator) -> None:
    simulator.state.faults.lose_callback = True
    headers = {"Idempotency-Key": "ticket-4711"}
    answers = []
    for _ in range(3):
        async with await service.file({"email": "erin@example.com"}, headers=headers) as answer:
            assert answer.status == 202
            answers.append(await answer.json())
    assert len({a["id"] for a in answers}) == 1
    assert len(simulator.state.requests) == 1

    async with await service.file({"email": "frank@example.com"}, headers=headers) as answer:
        assert answer.status == 422
    assert len(simulator.state.requests) == 1


async def test_copernica_refusal_marks_the_request_failed(
    make_service: ServiceFactory, simulator: Simulator
) -> None:
    service = await make_service(DISCOVERY="on", POLL_INTERVAL_SECONDS="0.5")
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests", json={"profile": 99}, headers=service.auth
    ) as answer:
        created = await answer.json()
    assert created["status"] in ("pending", "failed")
    # The simulator refuses unknown subprofiles the way Copernica does (400 + message).
    simulator.state.faults.reject_create = True
    async with await service.file({"subprofile": 5}) as answer:
        failed = await answer.json()
    assert answer.status == 202
    assert failed["sources"][0]["status"] == "gone"
    assert failed["last_error"] == "No subprofile with supplied ID"
    # Failed once discovery found nothing else to answer with.
    assert (await wait_for_status(service, failed["id"], "failed"))["discovery"]["status"] == "done"


async def test_copernica_down_leaves_the_request_submitting_with_its_error(
    service: Service, simulator: Simulator
) -> None:
    simulator.state.faults.fail_next = 100
    async with await service.file({"email": "gina@example.com"}) as answer:
        created = await answer.json()
    assert answer.status == 202
    assert created["status"] == "submitting"
    assert "503" in created["last_error"]
    assert ACCESS_TOKEN not in json.dumps(created)


async def test_a_filing_overtaken_by_the_poller_answers_202_with_its_copernica_id(
    service: Service, simulator: Simulator, store: Bucket
) -> None:
    """Copernica keeps the filer waiting past its lease and a poller takes the request over
    (it bumps the record while the filer waits). The filer's answer is not lost to a 500:
    the record takes Copernica's id, and the API answers 202 with it. Found by the soak."""
    simulator.state.faults.slow_seconds = 1.5
    filing = asyncio.create_task(service.file({"email": "otto@example.com"}))
    keys: list[str] = []
    await eventually(lambda: store.keys("requests/"), lambda k: keys.extend(k) or bool(k))
    record = json.loads(await store.read(keys[0]))
    assert record["status"] == "submitting"
    record["lease"] = {"owner": "another-replica", "until": "2000-01-01T00:00:00.000000Z"}
    record["version"] += 1  # what a poller's lease write looks like to the filer's If-Match
    await store.client.put_object(Bucket=store.name, Key=keys[0], Body=json.dumps(record))

    async with await filing as answer:
        assert answer.status == 202, await answer.text()
        created = await answer.json()
    stored = json.loads(await store.read(keys[0]))
    assert created["status"] == stored["status"] == "pending"
    assert created["copernica_id"] == stored["data_requests"][0]["copernica_id"]
    assert created["copernica_id"] in simulator.state.requests


async def test_show_unknown_or_malformed_id_is_404(service: Service) -> None:
    for request_id in (str(ULID()), "../../etc/passwd", "x" * 300):
        async with service.http.get(
            f"{service.admin_url}/v1/data-requests/{request_id}", headers=service.auth
        ) as answer:
            assert answer.status == 404


async def test_list_pages_and_filters(service: Service, simulator: Simulator) -> None:
    simulator.state.faults.lose_callback = True
    ids = []
    for n in range(5):
        async with await service.file({"profile": n + 1}) as answer:
            ids.append((await answer.json())["id"])

    seen, cursor = [], ""
    while True:
        query = "?limit=2&status=pending" + (f"&cursor={cursor}" if cursor else "")
        async with service.http.get(
            f"{service.admin_url}/v1/data-requests{query}", headers=service.auth
        ) as answer:
            page = await answer.json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids

    for bad in ("?status=lost", "?limit=0", "?limit=x", "?cursor=zzz"):
        async with service.http.get(
            f"{service.admin_url}/v1/data-requests{bad}", headers=service.auth
        ) as answer:
            assert answer.status == 400


async def test_health_ready_and_metrics(service: Service, simulator: Simulator) -> None:
    async with service.http.get(f"{service.url}/healthz") as answer:
        assert answer.status == 200
    async with service.http.get(f"{service.url}/readyz") as answer:
        assert answer.status == 200
    simulator.state.faults.lose_callback = True
    async with await service.file({"email": "hal@example.com"}) as answer:
        request_id = (await answer.json())["id"]
    async with service.http.post(service.callback_url(request_id), data=b"{") as answer:
        assert answer.status == 422
    async with service.http.get(f"{service.admin_url}/metrics") as answer:
        text = await answer.text()
    assert 'receiver_callbacks_total{code="422",outcome="invalid"} 1.0' in text
    assert "receiver_s3_request_duration_seconds_bucket" in text
    assert "hal@example.com" not in text and request_id not in text


async def test_readyz_is_503_when_s3_is_unreachable(
    make_service: ServiceFactory, s3_proxy: TcpProxy
) -> None:
    service = await make_service(S3_ENDPOINT_URL=s3_proxy.url, S3_TIMEOUT_SECONDS="1")
    s3_proxy.down()

    async def ready() -> int:
        async with service.http.get(f"{service.url}/readyz") as answer:
            return answer.status

    await eventually(ready, lambda status: status == 503, what="readyz 503")
    async with service.http.get(f"{service.url}/healthz") as answer:
        assert answer.status == 200


async def test_concurrent_retries_with_one_idempotency_key_file_once(
    service: Service, simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    simulator.state.faults.slow_seconds = 0.2  # the first filing is still at work

    async def attempt() -> tuple[int, dict[str, Any]]:
        async with await service.file(
            {"email": "ola@example.com"}, headers={"Idempotency-Key": "race-1"}
        ) as answer:
            return answer.status, await answer.json()

    answers = await asyncio.gather(*(attempt() for _ in range(6)))

    assert {status for status, _ in answers} <= {202, 409}
    assert len({body["id"] for status, body in answers if status == 202}) == 1
    assert len(simulator.state.requests) == 1


async def test_the_operator_surface_is_only_on_the_admin_listener(
    service: Service, simulator: Simulator
) -> None:
    """Behind the load balancer is the public port: callbacks and health, nothing else."""
    simulator.state.faults.lose_callback = True
    async with await service.file({"profile": 3}) as answer:
        request_id = (await answer.json())["id"]
    for method, path in [
        ("GET", "/v1/data-requests"),
        ("POST", "/v1/data-requests"),
        ("GET", f"/v1/data-requests/{request_id}"),
        ("GET", f"/v1/data-requests/{request_id}/package"),
        ("GET", "/metrics"),
        ("GET", "/ui/"),
    ]:
        async with service.http.request(
            method, service.url + path, headers=service.auth, json={"profile": 1}
        ) as answer:
            assert answer.status == 404, (method, path)
    async with service.http.get(f"{service.admin_url}/metrics") as answer:
        assert answer.status == 200
    for base in (service.url, service.admin_url):
        for path in ("/healthz", "/readyz"):
            async with service.http.get(base + path) as answer:
                assert answer.status == 200, (base, path)
    # Callbacks are public only.
    callback = service.callback_url(request_id).replace(service.url, service.admin_url)
    async with service.http.post(callback, data=b"{}") as answer:
        assert answer.status in (401, 404)
    assert simulator.state.requests  # the request was filed through the admin listener


async def test_a_malformed_id_is_the_routers_404_as_a_json_error(service: Service) -> None:
    """Routes take `{id}` only as a ULID: anything else never reaches a handler, and the
    answer is the same JSON 404 as for an id that names no request."""
    routes = [("GET", ""), ("POST", "/extend"), ("GET", "/package"), ("POST", "/package/link")]
    body = {"months": 1, "reason": "more time"}
    for method, suffix in routes:
        for request_id in ("not-a-ulid", str(ULID()).lower(), "I" * 26, "0" * 27, str(ULID())):
            async with service.http.request(
                method,
                f"{service.admin_url}/v1/data-requests/{request_id}{suffix}",
                headers=service.auth,
                json=body,
            ) as answer:
                assert answer.status == 404, (method, suffix, request_id)
                assert await answer.json() == {"error": "no such request"}
    async with service.http.get(f"{service.admin_url}/v1/nothing", headers=service.auth) as answer:
        assert (answer.status, await answer.json()) == (404, {"error": "not found"})
    # Without the token, the router's 404 is not reached: 401 first.
    async with service.http.get(f"{service.admin_url}/v1/data-requests/not-a-ulid") as answer:
        assert answer.status == 401


async def test_an_invalid_input_names_its_field(service: Service, simulator: Simulator) -> None:
    simulator.state.faults.lose_callback = True
    for body, field in [
        ({"email": "not-an-address"}, "email"),
        ({"profile": "12a"}, "profile"),
        ({"profile": 1, "received_on": "2999-01-01"}, "received_on"),
        ({"profile": 1, "events": {"since": "2026-13-01"}}, "events.since"),
        ({"profile": 1, "events": {"since": "2026-05-10", "until": "2026-05-01"}}, "events.until"),
        ({"email": "a@b.cd", "profile": 1}, None),
        ({"profile": 1, "discover": "yes"}, "discover"),
        ({"profile": 1, "discover": None}, "discover"),
        ({"profile": 1, "discover": 1}, "discover"),
    ]:
        async with await service.file(body) as answer:
            assert answer.status == 400, body
            error = await answer.json()
        assert error.get("field") == field and error["error"], (body, error)
    async with service.http.get(
        f"{service.admin_url}/v1/data-requests?limit=x", headers=service.auth
    ) as answer:
        assert await answer.json() == {"error": "limit must be an integer", "field": "limit"}
    async with await service.file({"profile": 2}) as answer:
        request_id = (await answer.json())["id"]
    async with service.http.post(
        f"{service.admin_url}/v1/data-requests/{request_id}/extend",
        headers=service.auth,
        json={"months": 1},
    ) as answer:
        assert answer.status == 400
        assert (await answer.json())["field"] == "reason"


async def test_storage_unavailable_is_503_with_retry_after(
    make_service: ServiceFactory, s3_proxy: TcpProxy
) -> None:
    service = await make_service(S3_ENDPOINT_URL=s3_proxy.url, S3_TIMEOUT_SECONDS="1")
    s3_proxy.down()
    for method, path in [("GET", ""), ("GET", f"/{ULID()}"), ("POST", "")]:
        async with service.http.request(
            method,
            f"{service.admin_url}/v1/data-requests{path}",
            headers=service.auth,
            json={"profile": 1},
        ) as answer:
            assert answer.status == 503, (method, path)
            assert answer.headers["Retry-After"] == "5"
            assert await answer.json() == {"error": "storage unavailable, try again"}


# -- sources and discovery -------------------------------------------------------------------

PERSON = "alice@example.com"
FOUND = Discovery(
    DiscoveryStatus.DONE,
    address=PERSON,
    phase="done",
    databases=2,
    collections=1,
    queries=3,
    matches=3,
    calls=11,
)


def whole_person(
    discovery: Discovery = FOUND, database: str = "Newsletter", collection: str = "Orders"
) -> AccessRequest:
    """A request for PERSON found in four places, as discovery records it: the address
    (archived), a profile (archived, with details), a subprofile that was removed (gone) and
    a profile still pending. Written by a test through `Ledger.create`."""
    request_id, now = str(ULID()), isoformat(utcnow())
    digest = "d" * 64
    details = Details(f"copernica/sources/{request_id}/{digest}/details.json", "c" * 64, 512)

    def archived(size: int, source: str) -> Archive:
        return Archive("b", f"copernica/archive/{request_id}.json", "a" * 64, size, source, now)

    newsletter, webshop = Place("1", database), Place("2", "Webshop")
    record = AccessRequest.new(
        request_id,
        DataRequest(
            "email", PERSON, Status.ARCHIVED, "5001", 1, archive=archived(20480, "callback")
        ),
        received_on=utcnow().date().isoformat(),
        discovery=discovery,
    )
    for found in (
        DataRequest(
            "profile",
            "101",
            Status.ARCHIVED,
            "5002",
            1,
            archive=archived(31000, "poll"),
            database=newsletter,
            found_by="Email",
            details=details,
        ),
        DataRequest(
            "subprofile",
            "1001",
            Status.GONE,
            None,
            1,
            last_error="No subprofile with supplied ID",
            database=newsletter,
            collection=Place("11", collection),
            profile="101",
            found_by="Email",
        ),
        DataRequest(
            "profile", "202", Status.PENDING, "5004", 1, database=webshop, found_by="Contact"
        ),
    ):
        assert record.add_source(found)
    return record


async def seeded(service: Service, record: AccessRequest) -> AccessRequest:
    await service.app[LEDGER].create(record)
    return record


async def test_a_request_shows_each_source_and_its_discovery(service: Service) -> None:
    record = await seeded(service, whole_person())
    async with service.http.get(
        f"{service.admin_url}/v1/data-requests/{record.id}", headers=service.auth
    ) as answer:
        assert answer.status == 200
        text = await answer.text()
        shown = await answer.json()
    assert PERSON not in text  # the address is in the record only
    assert shown["status"] == "pending"
    assert shown["archive"]["size"] == 20480  # the first source's own, all its facts
    assert shown["archive"]["bucket"] == "b"
    assert shown["discovery"] == {
        "status": "done",
        "databases": 2,
        "collections": 1,
        "queries": 3,
        "matches": 3,
        "calls": 11,
        "max_sources": None,
        "last_error": None,
    }
    email, profile, subprofile, pending = shown["sources"]
    assert email == {
        "source": "email",
        "status": "archived",
        "copernica_id": "5001",
        "database": None,
        "collection": None,
        "profile": None,
        "details": None,
        "archive": {
            "key": f"copernica/archive/{record.id}.json",
            "sha256": "a" * 64,
            "size": 20480,
            "source": "callback",
        },
        "last_error": None,
    }
    assert profile["source"] == "profile:101"
    assert profile["database"] == {"id": "1", "name": "Newsletter"}
    assert profile["details"] == {
        "key": f"copernica/sources/{record.id}/{'d' * 64}/details.json",
        "sha256": "c" * 64,
        "size": 512,
    }
    assert profile["archive"]["size"] == 31000
    assert subprofile == {
        "source": "subprofile:1001",
        "status": "gone",
        "copernica_id": None,
        "database": {"id": "1", "name": "Newsletter"},
        "collection": {"id": "11", "name": "Orders"},
        "profile": "101",
        "details": None,
        "archive": None,
        "last_error": "No subprofile with supplied ID",
    }
    assert (pending["source"], pending["status"], pending["database"]["name"]) == (
        "profile:202",
        "pending",
        "Webshop",
    )
    # The list shows the same.
    async with service.http.get(
        f"{service.admin_url}/v1/data-requests", headers=service.auth
    ) as answer:
        (item,) = [i for i in (await answer.json())["items"] if i["id"] == record.id]
    assert [s["source"] for s in item["sources"]] == [s["source"] for s in shown["sources"]]


async def test_discover_is_a_boolean_and_part_of_the_idempotency_key(
    service: Service, simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    headers = {"Idempotency-Key": "discover-1"}
    async with await service.file({"profile": 5, "discover": False}, headers=headers) as answer:
        assert answer.status == 202
        created = await answer.json()
    assert created["discovery"]["status"] == "off"
    async with await service.file({"profile": 5}, headers=headers) as answer:
        assert answer.status == 422  # another request than the key's first
    async with await service.file({"profile": 5, "discover": False}, headers=headers) as answer:
        assert (answer.status, (await answer.json())["id"]) == (202, created["id"])


async def test_an_operator_raises_the_limit_of_a_discovery_over_it(
    make_service: ServiceFactory, store: Bucket
) -> None:
    service = await make_service(DISCOVERY_MAX_SOURCES="3", POLL_INTERVAL_SECONDS="600")
    service.app[POLLER].stop()  # nobody visits: the schedule is as the raise leaves it
    schedule = Schedule(service.app[STORE])
    over = whole_person(Discovery(DiscoveryStatus.OVER_LIMIT, address=PERSON, matches=4))
    over.next_poll_at = schedule.stamp_in(3600)  # its next visit, an hour from now
    await schedule.schedule(over.id, over.next_poll_at)
    await seeded(service, over)
    running = await seeded(service, whole_person(Discovery(DiscoveryStatus.RUNNING)))
    purged = whole_person(Discovery(DiscoveryStatus.OVER_LIMIT))
    purged.mark_purged(isoformat(utcnow()), lambda kind, ident: "e" * 64)
    await seeded(service, purged)

    async def raise_(request_id: str, body: Any) -> tuple[int, dict[str, Any]]:
        async with service.http.post(
            f"{service.admin_url}/v1/data-requests/{request_id}/discovery",
            headers=service.auth,
            json=body,
        ) as answer:
            return answer.status, await answer.json()

    for body in ({"max_sources": 3}, {"max_sources": 0}, {"max_sources": "9"}, {}, [9]):
        status, error = await raise_(over.id, body)
        assert status == 400, body
        assert error.get("field") == "max_sources" or body == [9], (body, error)
    assert (await raise_(over.id, {"max_sources": 3}))[1]["error"] == (
        "max_sources must be larger than the current limit (3)"
    )
    status, error = await raise_(running.id, {"max_sources": 10})
    assert (status, error["error"]) == (
        409,
        "discovery is running, not over_limit: there is no limit to raise",
    )
    assert (await raise_(str(ULID()), {"max_sources": 10}))[0] == 404
    assert (await raise_(purged.id, {"max_sources": 10}))[0] == 410
    assert (await record_of(store, over.id))["discovery"]["status"] == "over_limit"

    before = utcnow()
    status, shown = await raise_(over.id, {"max_sources": 10})
    assert status == 200
    assert shown["discovery"]["status"] == "running"
    assert shown["discovery"]["max_sources"] == 10
    # Visited at once: the one marker is the record's next_poll_at, due now.
    stored = await record_of(store, over.id)
    assert stored["discovery"]["max_sources"] == 10
    markers = [k for k in await store.keys("due/") if k.endswith(over.id)]
    assert markers == [f"copernica/due/{stored['next_poll_at']}/{over.id}"]
    assert before <= parse_stamp(stored["next_poll_at"]) <= utcnow()
    assert over.id in [i for _, i in await schedule.due(utcnow(), 100)]
    # Once running, there is nothing to raise.
    assert (await raise_(over.id, {"max_sources": 20}))[0] == 409


async def test_the_cli_shows_sources_and_raises_the_limit(service: Service) -> None:
    record = await seeded(service, whole_person())
    over = await seeded(
        service, whole_person(Discovery(DiscoveryStatus.OVER_LIMIT, address=PERSON, matches=4))
    )
    env = {"API_TOKEN": API_TOKEN, "RECEIVER_URL": service.admin_url}
    code, output = await run_cli("status", record.id, env=env)
    assert code == 0, output
    assert PERSON not in output
    lines = output.splitlines()
    assert "discovery: done, 2 databases, 1 collections, 3 queries, 3 matches, 11 calls" in lines
    sources = lines[lines.index("sources (4):") + 1 :]
    assert [line.split()[:2] for line in sources] == [
        ["email", "archived"],
        ["profile:101", "archived"],
        ["subprofile:1001", "gone"],
        ["profile:202", "pending"],
    ]
    assert "database Newsletter" in sources[1] and "31.0 KB" in sources[1]
    assert "collection Orders (profile 101)" in sources[2]
    assert sources[2].endswith("error: No subprofile with supplied ID")
    code, output = await run_cli("list", env=env)
    assert code == 0 and f"{over.id}  pending     email         4 sources" in output
    # The raise makes the request due at once: this replica's poller visits it right away.
    code, output = await run_cli("discovery", over.id, "--max-sources", "150", env=env)
    assert (code, output.strip()) == (0, f"{over.id} discovery running, up to 150 sources")
