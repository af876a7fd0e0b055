"""Helpers shared by test modules: waiting for conditions (never for time), filing requests and
playing Copernica's callbacks, reading metrics and logs, and putting S3 into the state a crash
leaves. Fixtures live in conftest.py; test modules import helpers from here only."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
from ulid import ULID

from service.simulator.account import SAMPLE_PLACES, sample_account
from tests.conftest import API_TOKEN, Bucket, Service, Simulator

T = TypeVar("T")

MIB = 1024 * 1024
EMAIL = "Alice.Example+dsar@example.com"


# -- waiting -----------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    accept: Callable[[T], bool] = bool,
    # A parameter, not asyncio.timeout around the call: on failure this says what it saw last.
    timeout: float = 20.0,  # noqa: ASYNC109
    what: str = "condition",
) -> T:
    """Call `probe` (async or not) until `accept` holds for what it returns, and return that;
    fail after `timeout` seconds, saying what was last seen. The one way tests wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = probe()
        value = cast(T, await found if inspect.isawaitable(found) else found)
        if accept(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g} s; last: {value!r}")
        await asyncio.sleep(0.05)


async def wait_for_status(
    service: Service,
    request_id: str,
    status: str,
    timeout: float = 10,  # noqa: ASYNC109 - handed to eventually()
) -> dict[str, Any]:
    """The request as the operator API shows it, once it has `status`."""
    return await eventually(
        lambda: service.show(request_id),
        lambda shown: shown["status"] == status,
        timeout=timeout,
        what=f"status {status} of {request_id}",
    )


async def wait_until_packaged(service: Service, request_id: str) -> dict[str, Any]:
    return await eventually(
        lambda: service.show(request_id),
        lambda shown: shown.get("package") is not None,
        what=f"package of {request_id}",
    )


# -- filing, and playing Copernica ---------------------------------------------------------


async def filed(service: Service, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    """File a data request through the operator API; the 202 answer's body."""
    async with await service.file(body, headers=headers) as answer:
        assert answer.status == 202, await answer.text()
        return dict(await answer.json())


async def file_request(
    http: aiohttp.ClientSession, base_url: str, body: dict[str, Any]
) -> dict[str, Any]:
    """File a data request through the operator API of a service process (or a load
    balancer); the 202 answer's body."""
    async with http.post(
        f"{base_url}/v1/data-requests", json=body, headers={"Authorization": f"Bearer {API_TOKEN}"}
    ) as answer:
        assert answer.status == 202, await answer.text()
        return dict(await answer.json())


def payload(info_id: Any = EMAIL, kind: str = "email", filler: int = 0) -> bytes:
    """A callback body for subject `info_id` (of type `kind`), `filler` bytes longer."""
    data = [["From: news@shop.test\r\nTo: alice\r\n\r\nHello" + "x" * filler], [{"open": 1}]]
    return json.dumps({"info": {"type": kind, "id": info_id}, "data": data}).encode()


async def pending_request(service: Service, simulator: Simulator, body: dict | None = None) -> str:
    """File a request whose callback Copernica will not send: the test plays Copernica."""
    simulator.state.faults.lose_callback = True
    return str((await filed(service, body or {"email": EMAIL}))["id"])


async def post(
    service: Service, request_id: str, body: bytes | Any, **kwargs: Any
) -> tuple[int, dict]:
    """One callback delivery to `request_id`: the status and the JSON answer."""
    async with service.http.post(service.callback_url(request_id), data=body, **kwargs) as answer:
        return answer.status, await answer.json(content_type=None)


async def delivery_cost(service: Service, url: str, body: bytes) -> tuple[int, dict[str, float]]:
    """One callback delivery to `url`: its status, and the S3 calls (and other counters) it
    moved on the service's /metrics; a poller tick's and a housekeeping round's left out."""

    async def counts() -> dict[str, float]:
        found = await metric_counts(service)
        for name, labels, value in await scrape(service.http, service.admin_url):
            if name == "receiver_housekeeping_s3_requests_total":
                key = f"s3:{labels['operation']}"  # counted in metric_counts too
                found[key] = found.get(key, 0) - value
        return found

    before = await counts()
    async with service.http.post(url, data=body) as answer:
        status = answer.status
    after = await counts()
    spent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    for key in ("s3:list_objects_v2", "s3:list_multipart_uploads", "receiver_poll_ticks_total"):
        spent.pop(key, None)  # the poller's tick, if one fell in between
    return status, spent


async def raw_exchange(service: Service, request: bytes) -> bytes:
    """Send bytes on a raw socket and read what comes back (for what a client library hides)."""
    host, port = service.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return answer


async def seed_account(simulator: Simulator, account: dict[str, Any]) -> dict[str, int]:
    """Give the simulator this account (POST /_sim/account; replaces the one it held): how
    many databases, collections, profiles and subprofiles it now holds."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{simulator.url}/_sim/account", json=account) as answer,
    ):
        assert answer.status == 200, await answer.text()
        return dict((await answer.json())["account"])


def account_with(
    person: str, places: Iterable[str] = tuple(SAMPLE_PLACES), others: int = 2
) -> dict[str, Any]:
    """An account holding `person` in `places`: "Newsletter" (profile 101, `email` field),
    "Shop" (profile 201, text field "Contact": set DISCOVERY_FIELDS=Contact), "Orders"
    (subprofile 2101 of profile 201); `others` more people per database, one removed.
    SAMPLE_PLACES maps each place to its source ("profile:101", ...)."""
    return sample_account(person, places, others)


def archive_key(request_id: str) -> str:
    """Where the archive of a request lands: under the day its id (a ULID) was made."""
    created = ULID.from_str(request_id).datetime
    return f"copernica/archive/{created:%Y/%m/%d}/{request_id}.json"


# -- what the service shows: metrics, logs, the command line -------------------------------

_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


async def scrape(http: aiohttp.ClientSession, admin_url: str) -> list[tuple[str, dict, float]]:
    """Every sample on a service's /metrics: (name, labels, value)."""
    async with http.get(f"{admin_url}/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    samples = []
    for line in text.splitlines():
        if (found := _SAMPLE.match(line)) is not None:
            name, labels, value = found.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


async def metric(service: Service, name: str, **labels: str) -> float:
    """The value of one metric, summed over the samples that carry `labels`."""
    return sum(
        value
        for sample, found, value in await scrape(service.http, service.admin_url)
        if sample == name and labels.items() <= found.items()
    )


async def metric_counts(service: Service) -> dict[str, float]:
    """S3 calls by operation ("s3:<op>") and poller ticks, from the service's /metrics;
    housekeeping's calls (the lease, census, janitor, backfill, retention) left out."""
    counts: dict[str, float] = {}
    for name, labels, value in await scrape(service.http, service.admin_url):
        if name == "receiver_s3_request_duration_seconds_count":
            key = f"s3:{labels['operation']}"
            counts[key] = counts.get(key, 0) + value
        elif name == "receiver_housekeeping_s3_requests_total":
            key = f"s3:{labels['operation']}"
            counts[key] = counts.get(key, 0) - value
        elif name == "receiver_poll_ticks_total":
            counts[name] = value
    return counts


async def callbacks_answered(
    http: aiohttp.ClientSession, admin_url: str
) -> dict[tuple[str, int], float]:
    """The callbacks a service answered, by (outcome, HTTP status): what it sent, whether or
    not the sender was still there to read it."""
    return {
        (labels["outcome"], int(labels["code"])): value
        for name, labels, value in await scrape(http, admin_url)
        if name == "receiver_callbacks_total" and value
    }


async def text_of(path: str | Path) -> str:
    """A file's text, read off the event loop (the service under test may share it)."""
    return await asyncio.to_thread(Path(path).read_text)


async def log_lines(path: str | Path) -> list[dict]:
    """Every line of a service log as JSON (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in (await text_of(path)).splitlines() if line.strip()]


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """`python -m service <args>` with `env` added: its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


# -- S3 as a user (or a crash) leaves it ---------------------------------------------------


async def record_of(store: Bucket, request_id: str) -> dict[str, Any]:
    return dict(json.loads(await store.read(f"copernica/requests/{request_id}.json")))


async def snapshot(store: Bucket, request_id: str) -> dict[str, bytes]:
    """Every object stored for a request (record, archive, events, package, ...) by key.

    A key deleted between the listing and its read (a pending request's poll marker moves on
    every visit) is left out, as if the listing had been taken a moment later."""
    found = {}
    for key in await store.keys():
        if request_id in key:
            try:
                found[key] = await store.read(key)
            except store.client.exceptions.NoSuchKey:
                continue
    return found
