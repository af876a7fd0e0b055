"""Logs: one JSON format for our lines and the standard library's, secrets scrubbed from
both, and the request id on every line written during a callback, API call or poll visit."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import Callable

import aiohttp
import structlog

from service.logs import configure_logging
from tests.conftest import (
    ACCESS_TOKEN,
    Bucket,
    ServiceProcess,
    Simulator,
    make_settings,
    report_url,
)
from tests.support import MIB, eventually, file_request, log_lines, text_of


def test_standard_library_lines_are_json_scrubbed_and_carry_the_bound_request_id() -> None:
    stream = io.StringIO()
    configure_logging(make_settings(LOG_FORMAT="json"), stream)
    try:
        with structlog.contextvars.bound_contextvars(request_id="01ABC"):
            logging.getLogger("aiohttp.server").error("token %s leaked", ACCESS_TOKEN)
        structlog.get_logger("x").info("ours", note=f"also {ACCESS_TOKEN}")
    finally:
        logging.getLogger().handlers = []
    theirs, ours = (json.loads(line) for line in stream.getvalue().splitlines())
    assert theirs["event"] == "token *** leaked"
    assert theirs["logger"] == "aiohttp.server"
    assert theirs["level"] == "error"
    assert theirs["request_id"] == "01ABC"
    assert ours["note"] == "also ***" and "request_id" not in ours
    assert ACCESS_TOKEN not in stream.getvalue()


async def test_a_retry_during_a_poll_visit_carries_the_request_id(
    service_processes: Callable[..., ServiceProcess], simulator: Simulator
) -> None:
    simulator.state.faults.lose_callback = True
    replica = service_processes(
        POLL_INTERVAL_SECONDS="0.3", SHUTDOWN_DRAIN_SECONDS="0.5", SHUTDOWN_GRACE_SECONDS="2"
    )
    async with aiohttp.ClientSession() as http:
        created = await file_request(http, replica.admin_url, {"profile": 4})
    simulator.state.faults.fail_next = 1  # the poll's first call is answered 503, then retried

    async def retried() -> list[dict]:
        return [e for e in await log_lines(replica.log_path) if e["event"] == "copernica_retry"]

    [retry] = (await eventually(retried, what="a copernica_retry line"))[:1]
    assert retry["request_id"] == created["id"]


async def test_a_sender_hanging_up_mid_body_is_an_outcome_of_its_own(
    service_processes: Callable[..., ServiceProcess], simulator: Simulator, store: Bucket
) -> None:
    simulator.state.faults.lose_callback = True
    replica = service_processes(S3_PART_BYTES=str(5 * MIB))
    async with aiohttp.ClientSession() as http:
        created = await file_request(http, replica.admin_url, {"email": "hang@example.com"})
    path = report_url("", created["id"], ("email", "hang@example.com"))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {20 * MIB}\r\n\r\n"
    ).encode()
    body = b'{"info":{"type":"email","id":"hang@example.com"},"data":[["' + b"x" * (7 * MIB)

    def send_half_and_hang_up() -> None:
        with socket.create_connection(("127.0.0.1", replica.port)) as sock:
            sock.sendall(head + body)  # more than one part: a multipart upload is under way

    await asyncio.get_running_loop().run_in_executor(None, send_half_and_hang_up)

    async def outcome() -> list[dict]:
        return [e for e in await log_lines(replica.log_path) if e["event"] == "callback"]

    [line] = await eventually(outcome, what="the callback line")
    assert line["outcome"] == "sender_hung_up"
    assert line["request_id"] == created["id"]
    await eventually(store.uploads, lambda uploads: uploads == [], what="the upload aborted")
    assert await store.keys("archive/") == []
    text = await text_of(replica.log_path)
    assert "Traceback" not in text and "Error handling request" not in text
