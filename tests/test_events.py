"""Events: the window planner (property-tested), the endpoint kinds, normalisation, the export
command against the simulator's window rules, and events archived with a data request."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.copernica.events import (
    EventsInputError,
    Source,
    Window,
    add_months,
    normalise,
    plan,
    window_limit,
)
from service.simulator.payloads import make_events
from tests.conftest import (
    ACCESS_TOKEN,
    Bucket,
    ServiceFactory,
    Simulator,
)
from tests.support import eventually, run_cli, wait_for_status

days = st.dates(min_value=date(2000, 1, 1), max_value=date(2040, 12, 31))


@given(since=days, length=st.integers(1, 3 * 366))
def test_windows_cover_the_range_exactly_each_within_the_limit(since: date, length: int) -> None:
    until = since + timedelta(days=length)
    windows = plan(since, until)
    assert windows[0].start == since and windows[-1].end == until
    for before, after in itertools.pairwise(windows):
        assert before.end == after.start  # no gap, no overlap
    for window in windows:
        assert window.start < window.end <= window_limit(window.start)


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        (
            date(2024, 1, 31),
            date(2024, 3, 1),
            [
                Window(date(2024, 1, 31), date(2024, 2, 29)),
                Window(date(2024, 2, 29), date(2024, 3, 1)),
            ],
        ),
        (date(2026, 3, 29), date(2026, 3, 30), [Window(date(2026, 3, 29), date(2026, 3, 30))]),
        (date(2026, 1, 1), date(2026, 2, 1), [Window(date(2026, 1, 1), date(2026, 2, 1))]),
    ],
)
def test_month_ends_and_dst_days(since: date, until: date, expected: list[Window]) -> None:
    assert plan(since, until) == expected


def test_add_months_clamps_to_the_month_end() -> None:
    assert add_months(date(2023, 1, 31), 1) == date(2023, 2, 28)
    assert add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)
    assert add_months(date(2024, 3, 31), -1) == date(2024, 2, 29)
    assert add_months(date(2024, 12, 15), 1) == date(2025, 1, 15)


@pytest.mark.parametrize(
    ("since", "until"), [(date(2026, 2, 1), date(2026, 2, 1)), (date(2026, 2, 2), date(2026, 2, 1))]
)
def test_empty_or_reversed_range_is_refused(since: date, until: date) -> None:
    with pytest.raises(EventsInputError, match="must be after"):
        plan(since, until)


@pytest.mark.parametrize(
    ("kind", "ident", "path"),
    [
        ("email", "a+b c@example.com", None),
        ("email", "ann+news@example.com", "email/ann%2Bnews@example.com/events"),
        ("tags", "news; summer sale ;a/b", "tags/news;summer%20sale;a%2Fb/events"),
        ("old/document", "17", "old/document/17/events"),
        ("message", "0", None),
        ("mailing", "1", None),
    ],
)
def test_sources_and_their_paths(kind: str, ident: str, path: str | None) -> None:
    if path is None:
        with pytest.raises(EventsInputError):
            Source(kind, ident)
    else:
        assert Source(kind, ident).path == path


def test_both_answer_shapes_normalise_and_unknown_types_are_kept() -> None:
    nested = {"event": "open", "data": {"id": 1, "time": "2026-01-01 00:00:00", "ip": "x"}}
    flat = {"type": "open", "id": 1, "time": "2026-01-01 00:00:00", "ip": "x"}
    assert (
        normalise(nested)
        == normalise(flat)
        == {
            "event": "open",
            "time": "2026-01-01 00:00:00",
            "data": {"id": 1, "time": "2026-01-01 00:00:00", "ip": "x"},
        }
    )
    assert normalise({"event": "teleport", "data": {"id": 2}})["event"] == "teleport"


def cli_env(simulator: Simulator) -> dict[str, str]:
    return {
        "COPERNICA_ACCESS_TOKEN": ACCESS_TOKEN,
        "COPERNICA_API_URL": simulator.url + "/v2",
        "COPERNICA_MAX_RPS": "50",
    }


@pytest.mark.parametrize("shape", ["nested", "flat"])
async def test_a_year_is_exported_with_every_event_exactly_once(
    simulator: Simulator, tmp_path: Path, shape: str
) -> None:
    simulator.state.config.events_shape = shape
    simulator.state.events = make_events(
        date(2025, 1, 1), date(2026, 1, 1), per_day=3, email="Ann@Example.com"
    )
    simulator.state.events += make_events(
        date(2025, 1, 1), date(2026, 1, 1), per_day=1, first_id=10_000, email="bob@example.com"
    )
    out = tmp_path / "ann.jsonl"

    code, output = await run_cli(
        "events",
        "--email",
        "ann@example.com",
        "--since",
        "2025-01-01",
        "--until",
        "2026-01-01",
        "--out",
        str(out),
        env=cli_env(simulator),
    )

    assert code == 0, output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [line["data"]["id"] for line in lines]
    assert sorted(ids) == list(range(1, 365 * 3 + 1))  # each of Ann's events, once
    assert {line["event"] for line in lines} >= {"open", "click", "delivery", "bounce-later"}
    assert all(set(line) == {"event", "time", "data"} for line in lines)
    assert len(simulator.state.events_calls) == 12  # one call per month window


async def test_an_interrupted_export_resumes_without_duplicates(
    simulator: Simulator, tmp_path: Path
) -> None:
    simulator.state.events = make_events(date(2025, 1, 1), date(2025, 7, 1), per_day=2, profile=42)
    simulator.state.faults.slow_seconds = 0.3
    out = tmp_path / "p.jsonl"
    args = (
        "events",
        "--profile",
        "42",
        "--since",
        "2025-01-01",
        "--until",
        "2025-07-01",
        "--out",
        str(out),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env={**os.environ, **cli_env(simulator)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await eventually(lambda: len(simulator.state.events_calls) >= 3, what="three windows asked")
    proc.kill()  # mid-run, possibly mid-write
    await proc.wait()
    simulator.state.faults.slow_seconds = 0

    code, output = await run_cli(*args, env=cli_env(simulator))

    assert code == 0, output
    ids = [json.loads(line)["data"]["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == list(range(1, 181 * 2 + 1))
    assert "already done" in output and len(simulator.state.events_calls) < 6 + 3


@pytest.mark.parametrize(
    "args",
    [
        ("--email", "a@b.cd", "--since", "2026-02-30"),
        ("--email", "a@b.cd", "--since", "2026-03-01", "--until", "2026-03-01"),
        ("--email", "a@b.cd", "--since", "2026-03-01", "--until", "2026-02-01"),
        ("--email", "not-an-address", "--since", "2026-03-01"),
        ("--profile", "abc", "--since", "2026-03-01"),
        ("--since", "2026-03-01"),
    ],
)
async def test_bad_export_input_is_refused_and_nothing_written(
    simulator: Simulator, tmp_path: Path, args: tuple[str, ...]
) -> None:
    out = tmp_path / "x.jsonl"
    code, output = await run_cli("events", *args, "--out", str(out), env=cli_env(simulator))
    assert code == 2 and "error" in output
    assert not out.exists()
    assert simulator.state.events_calls == []


async def test_a_data_request_with_events_is_archived_with_every_window(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket
) -> None:
    simulator.state.events = make_events(
        date(2026, 1, 15), date(2026, 4, 10), per_day=2, email="cy@example.com"
    )
    service = await make_service(POLL_INTERVAL_SECONDS="0.3", POLL_LEASE_SECONDS="5")
    async with await service.file(
        {"email": "cy@example.com", "events": {"since": "2026-01-15", "until": "2026-04-10"}}
    ) as answer:
        assert answer.status == 202
        created = await answer.json()

    shown = await wait_for_status(service, created["id"], "archived")

    assert shown["status"] == "archived"
    assert shown["events"]["complete"] and shown["events"]["windows"] == 3
    assert shown["events"]["events"] == 2 * 85
    keys = await store.keys(f"events/{created['id']}/")
    assert keys == [
        f"copernica/events/{created['id']}/{d}.jsonl"
        for d in ("2026-01-15", "2026-02-15", "2026-03-15")
    ]
    stored = [json.loads(line) for key in keys for line in (await store.read(key)).splitlines()]
    assert [e["data"]["id"] for e in stored] == list(range(1, 171))
    assert await store.keys("archive/")  # and the data itself


@pytest.mark.parametrize(
    "events",
    [
        {"since": "2026-13-01"},
        {"since": "2026-03-01", "until": "2026-03-01"},
        {"until": "x"},
        "2026-01-01",
        {"since": "2026-01-01", "colour": 1},
    ],
)
async def test_bad_events_option_is_400_and_nothing_filed(
    make_service: ServiceFactory, simulator: Simulator, store: Bucket, events: Any
) -> None:
    service = await make_service()
    async with await service.file({"email": "a@b.cd", "events": events}) as answer:
        assert answer.status == 400
    assert await store.keys() == []
    assert simulator.state.requests == {}
