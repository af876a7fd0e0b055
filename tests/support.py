"""Helpers shared by test modules: waiting for conditions (never for time), reading metrics,
and putting S3 into the state a crash leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tests.conftest import Bucket, Service

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool] = bool,
    timeout: float = 20.0,
    what: str = "condition",
) -> T:
    """Call `probe` until `accept` holds for what it returns; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g} s; last: {value!r}")
        await asyncio.sleep(0.05)


async def wait_until_packaged(service: Service, request_id: str) -> dict[str, Any]:
    return await eventually(
        lambda: service.show(request_id),
        lambda shown: shown.get("package") is not None,
        what=f"package of {request_id}",
    )


async def metric(service: Service, name: str) -> float:
    """The value of one unlabelled metric (or the sum over its labels)."""
    async with service.http.get(f"{service.admin_url}/metrics") as answer:
        text = await answer.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def record_of(store: Bucket, request_id: str) -> dict[str, Any]:
    return dict(json.loads(await store.read(f"copernica/requests/{request_id}.json")))


async def snapshot(store: Bucket, request_id: str) -> dict[str, bytes]:
    """Every object stored for a request (record, archive, events, package, ...) by key."""
    found = {}
    for key in await store.keys():
        if request_id in key:
            found[key] = await store.read(key)
    return found
