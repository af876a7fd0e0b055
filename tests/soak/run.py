"""A soak run: the load and the faults of a plan, played against a stack, then settling."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from service.simulator.app import SubjectPlan, subject_key
from service.simulator.payloads import make_events
from tests.conftest import API_TOKEN

from .plan import COPERNICA_TIMEOUT, MIB, Fault, Plan, PlannedRequest
from .stack import Stack

FILING_PATIENCE = 90.0  # seconds a filing is retried (same Idempotency-Key) before giving up
PURGE_SLACK = 20.0  # seconds a due purge may wait for a replica's housekeeping round


@dataclass
class Outcome:
    """What the run saw from the outside: the filings' answers and the faults applied."""

    filed: dict[int, str] = field(default_factory=dict)  # plan number -> request id
    filing_failures: dict[int, str] = field(default_factory=dict)
    filing_retries: int = 0
    applied: list[str] = field(default_factory=list)
    started: float = 0.0  # time.time() of the run's start
    began: float = 0.0  # time.monotonic() of the run's start: the plan's times count from it
    load_ended: float = 0.0
    settled: float = 0.0
    settle_state: str = ""
    # request id -> {"package": problem, "events": problem} ("" = checked, fine)
    audits: dict[str, dict[str, str]] = field(default_factory=dict)


def prepare(stack: Stack, request: PlannedRequest) -> None:
    """Tell the simulator what this subject's request is like, before it is filed."""
    state = stack.sim_state
    key = subject_key("email", request.email)
    state.plans[key] = SubjectPlan(ready_after=request.ready_after, payload_size=request.size)
    faults: dict[str, Any] = {}
    if request.lose:
        faults["lose_callback"] = True
    if request.duplicates:
        faults["duplicate_callback"] = request.duplicates
        faults["duplicate_concurrent"] = request.concurrent
    if faults:
        state.overrides[key] = faults
    for place in request.places:  # each source's data: small, soon ready, some callbacks lost
        kind, number = place.split(":")
        state.plans[subject_key(kind, number)] = SubjectPlan(
            ready_after=0.5 + request.n % 5 * 0.5, payload_size=2048 + request.n * 97 % 8192
        )
        if request.n % 4 == 0:
            state.overrides[subject_key(kind, number)] = {"lose_callback": True}
    if request.events is not None:
        since, until = request.events
        # A few days either side too: only those inside the range may be archived.
        state.events += make_events(
            since - timedelta(days=3),
            until + timedelta(days=3),
            request.events_per_day,
            first_id=request.n * 1_000_000 + 1,
            email=request.email,
        )


async def file_one(
    http: aiohttp.ClientSession, stack: Stack, request: PlannedRequest, outcome: Outcome
) -> None:
    body: dict[str, Any] = {"email": request.email}
    if request.discover:
        body["discover"] = True
    if request.events is not None:
        body["events"] = {"since": str(request.events[0]), "until": str(request.events[1])}
    headers = {
        "Authorization": f"Bearer {API_TOKEN}",
        "Idempotency-Key": f"soak-{stack.plan.seed}-{request.n}",
    }
    deadline = time.monotonic() + FILING_PATIENCE
    last = ""
    while time.monotonic() < deadline:
        urls = stack.admin_urls()
        if urls:
            url = random.choice(urls)
            try:
                async with http.post(f"{url}/v1/data-requests", json=body, headers=headers) as a:
                    if a.status == 202:
                        outcome.filed[request.n] = (await a.json())["id"]
                        return
                    last = f"{a.status} {(await a.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
        outcome.filing_retries += 1
        await asyncio.sleep(0.5)
    outcome.filing_failures[request.n] = last


async def play_load(stack: Stack, outcome: Outcome, began: float) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        tasks = []
        for request in stack.plan.requests:
            await _until(began + request.at)
            prepare(stack, request)
            tasks.append(asyncio.create_task(file_one(http, stack, request, outcome)))
            if request.gone:
                tasks.append(asyncio.create_task(remove(stack, request, began)))
        await asyncio.gather(*tasks)


async def remove(stack: Stack, request: PlannedRequest, began: float) -> None:
    """Some of the subject's profiles and subprofiles are removed at Copernica while its
    request runs (before or after discovery finds them, or files them: timing decides)."""
    await _until(began + request.at + request.gone_after)
    stack.sim_state.faults.gone_sources.extend(request.gone)


async def play_faults(stack: Stack, outcome: Outcome, began: float) -> None:
    lanes: dict[str, list[Fault]] = {}
    for fault in stack.plan.faults:
        name = fault.kind.split("_")[0] if fault.kind not in ("kill", "term") else "replicas"
        lanes.setdefault(name, []).append(fault)

    async def lane(faults: list[Fault]) -> None:
        for fault in faults:
            await _until(began + fault.at)
            outcome.applied.append(fault.describe())
            await apply(stack, fault)

    await asyncio.gather(*(lane(f) for f in lanes.values()))


async def apply(stack: Stack, fault: Fault) -> None:
    """One fault, from its start to its end (the lane waits for it)."""
    proxy, sim = stack.proxy, stack.sim_state.faults
    if fault.kind == "s3_outage":
        proxy.down()
        await asyncio.sleep(fault.duration)
        proxy.up()
    elif fault.kind == "s3_latency":
        proxy.latency = fault.amount
        await asyncio.sleep(fault.duration)
        proxy.latency = 0.0
    elif fault.kind == "s3_cut":
        # Cut every connection once this many more bytes went towards S3 (mid-upload if a
        # body is on its way), then let S3 be reached again a second later.
        proxy.cut_after_bytes = proxy.bytes_to_target + int(fault.amount)
        waited = 0.0
        while proxy.up_flag and waited < 8:
            await asyncio.sleep(0.05)
            waited += 0.05
        await asyncio.sleep(fault.duration)
        proxy.up()
    elif fault.kind == "kill":
        replica = stack.replicas[fault.target]
        await replica.kill()
        await asyncio.sleep(fault.duration)
        await replica.start()
    elif fault.kind == "term":
        replica = stack.replicas[fault.target]
        await replica.terminate()
        await replica.start()
    elif fault.kind == "copernica_errors":
        sim.status_5xx_rate, sim.status_429_rate = 0.6 * fault.amount, 0.4 * fault.amount
        await asyncio.sleep(fault.duration)
        sim.status_5xx_rate = sim.status_429_rate = 0.0
    elif fault.kind == "copernica_slow":
        sim.slow_seconds = fault.amount
        await asyncio.sleep(fault.duration)
        sim.slow_seconds = 0.0
    elif fault.kind == "copernica_silent":
        sim.slow_seconds = COPERNICA_TIMEOUT + 2
        await asyncio.sleep(fault.duration)
        sim.slow_seconds = 0.0
    else:
        raise ValueError(f"unknown fault {fault.kind}")


async def _until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def records(stack: Stack) -> dict[str, dict[str, Any]]:
    """Every request record in the bucket, by id (read straight from moto)."""
    found: dict[str, dict[str, Any]] = {}
    pages = stack.s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket, Prefix="copernica/requests/"
    )
    async for page in pages:
        for item in page.get("Contents", []):
            answer = await stack.s3.get_object(Bucket=stack.bucket, Key=item["Key"])
            async with answer["Body"] as body:
                record = json.loads(await body.read())
            found[record["id"]] = record
    return found


async def uploads(stack: Stack) -> list[dict[str, Any]]:
    answer = await stack.s3.list_multipart_uploads(Bucket=stack.bucket)
    return list(answer.get("Uploads", []))


def unsettled(found: dict[str, dict[str, Any]], plan: Plan, now: datetime) -> list[str]:
    """Why the bucket is not in its final state yet (empty: it is)."""
    why = []
    for record in found.values():
        status = record["status"]
        if status not in ("archived", "failed", "expired", "purged"):
            why.append(f"{record['id']} {status}")
        elif status == "archived" and record.get("package") is None:
            why.append(f"{record['id']} archived, no package yet")
        elif purge_overdue(record, plan, now):
            why.append(f"{record['id']} due for purging")
    return why


def retention_start(record: dict[str, Any]) -> str | None:
    """Where RETENTION_DAYS counts from: the package's build, or, for a request that ended
    without one (failed, expired), its `ended_at`."""
    package = record.get("package")
    if package:
        return str(package["built_at"])
    return record.get("ended_at")


def purge_overdue(record: dict[str, Any], plan: Plan, now: datetime) -> bool:
    start = retention_start(record)
    if record["status"] == "purged" or not start:
        return False
    since = datetime.fromisoformat(start.replace("Z", "+00:00"))
    return (now - since).total_seconds() > plan.retention + PURGE_SLACK


async def settle(stack: Stack, outcome: Outcome, within: float) -> None:
    """Faults off, every replica up; wait until every request is final (bounded)."""
    await stack.heal()
    deadline = time.monotonic() + within
    why: list[str] = []
    while time.monotonic() < deadline:
        found = await records(stack)
        why = unsettled(found, stack.plan, datetime.now(UTC))
        left = await uploads(stack)
        if not why and not left:
            outcome.settle_state = "settled"
            break
        await asyncio.sleep(2.0)
    else:
        outcome.settle_state = f"not settled after {within:.0f} s: {why[:5]}"
    outcome.settled = time.time()


def summary(plan: Plan) -> str:
    kinds: dict[str, int] = {}
    for request in plan.requests:
        kinds[request.kind] = kinds.get(request.kind, 0) + 1
    sizes = sum(r.size for r in plan.requests) / MIB
    flags = {
        "lost callbacks": sum(r.lose and not r.never_ready for r in plan.requests),
        "duplicated": sum(bool(r.duplicates) for r in plan.requests),
        "with events": sum(r.events is not None for r in plan.requests),
        "late readiness": sum(5 <= r.ready_after < 10_000 for r in plan.requests),
        "discovering": len(plan.discovering),
        "places found": sum(len(r.places) for r in plan.requests),
        "removed meanwhile": sum(len(r.gone) for r in plan.requests),
        "e-mail 'Invalid method'": sum(r.invalid_method for r in plan.requests),
    }
    return (
        f"{len(plan.requests)} requests ({', '.join(f'{v} {k}' for k, v in kinds.items())}; "
        f"{sizes:.0f} MiB of payload in all; "
        + ", ".join(f"{v} {k}" for k, v in flags.items())
        + f"); {len(plan.faults)} faults; retention {plan.retention:.0f} s"
    )
