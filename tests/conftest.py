"""Fixtures: a real S3 API (moto's server, or SeaweedFS: each a separate process), the
Copernica simulator and the service itself, each over real HTTP on loopback, built the way
production builds them.

The store: `TEST_S3=moto|seaweedfs` picks the one behind `s3_endpoint`, `bucket` and `store`
for every test. Unset, it is moto, and the tests marked `both_stores` (the store-facing ones)
run on each of the two, their ids ending `[moto]` / `[seaweedfs]`. Each store is one process
per session, started when a test first needs it; each test has a bucket of its own."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import get_session
from aiohttp import web
from aiohttp.test_utils import TestServer

from deploy.seaweedfs import SeaweedFS
from service.app import create_app, create_public_app
from service.config import Secret, Settings
from service.intake.callback import callback_url
from service.logs import subject_digest
from service.simulator.app import SIM_STATE, SimState, SimulatorConfig, create_simulator_app

# Any credentials do for the local S3; set before any client is made.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# -- the whole suite's logs must never show a secret or an e-mail address ------------------
# Every test's captured output (the service logs through structlog to stdout) and the log
# files of service processes are scanned; a leak fails the session. The simulator plays
# Copernica and aiohttp's access log of it is its own, so "aiohttp.access" lines are skipped
# (the service itself runs without an access log).
SERVICE_LOGS: list[Path] = []
_LEAKS: list[str] = []
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


def leaks_in(text: str) -> list[str]:
    secrets = (ACCESS_TOKEN, API_TOKEN, CALLBACK_SECRET)
    return [
        line[:300]
        for line in text.splitlines()
        if "aiohttp.access" not in line
        and (any(s in line for s in secrets) or _ADDRESS.search(line))
    ]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for section, text in report.sections:
        _LEAKS.extend(f"{report.nodeid} [{section}]: {line}" for line in leaks_in(text))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for path in SERVICE_LOGS:
        if path.exists():
            _LEAKS.extend(f"{path.name}: {line}" for line in leaks_in(path.read_text()))
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        # A worker of pytest-xdist (`make test`: -n 2): its exit status does not decide the
        # run's, so what it found goes to the controller (`pytest_testnodedown`), which fails it.
        workeroutput["leaks"] = list(dict.fromkeys(_LEAKS))
        return
    if _LEAKS:
        found = list(dict.fromkeys(_LEAKS))  # a section shows up in several phases' reports
        print("\nSECRETS OR E-MAIL ADDRESSES IN LOGS:\n" + "\n".join(found[:50]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the controller, as a worker ends
def pytest_testnodedown(node: Any, error: object) -> None:
    _LEAKS.extend(getattr(node, "workeroutput", {}).get("leaks", []))


ACCESS_TOKEN = "sim-access-token-5f1c"
API_TOKEN = "operator-token-9a7e"
CALLBACK_SECRET = "callback-secret-3d2b"


def free_port() -> int:
    """A port free a moment ago. Racy: another process may take it before it is bound again
    (`OSError: Address already in use`). An in-process listener takes `bound_socket()`
    instead; a child process binds port 0 itself and says which (moto), or its start is
    retried with other ports (`ServiceProcess.start`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bound_socket() -> socket.socket:
    """A loopback socket bound to a port the kernel picked, kept bound until a server
    listens on it (aiohttp's `TestServer(socket_factory=...)`): no other process can take
    the port in between."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


STORES = ("moto", "seaweedfs")
TEST_S3 = os.environ.get("TEST_S3", "")
if TEST_S3 not in ("", *STORES):
    raise pytest.UsageError(f"TEST_S3={TEST_S3!r}: one of {', '.join(STORES)}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "both_stores: runs on moto and on SeaweedFS (one of them if TEST_S3 names it); "
        "the test id says which",
    )
    config.addinivalue_line(
        "markers",
        "any_store: in a both_stores module, a test no store behaviour decides (an unreachable "
        "endpoint, say): it runs once, on TEST_S3's store",
    )
    config.addinivalue_line(
        "markers",
        "store_bug(store, reason): with both_stores, the test is expected to fail on that "
        "store (a bug of the store, docs/stores.md); strict: once the store is fixed, it says so",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `both_stores` that reaches the store (`store_kind`, through
    `s3_endpoint`) runs once per store; unmarked ones run on TEST_S3's (moto unless set)."""
    if "store_kind" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("both_stores") is None:
        return
    if metafunc.definition.get_closest_marker("any_store") is not None:
        return
    kinds = (TEST_S3,) if TEST_S3 else STORES
    bugs = {m.args[0]: m.kwargs["reason"] for m in metafunc.definition.iter_markers("store_bug")}
    params = [
        pytest.param(kind, marks=pytest.mark.xfail(reason=bugs[kind], strict=True))
        if kind in bugs
        else kind
        for kind in kinds
    ]
    metafunc.parametrize("store_kind", params, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which store the test runs on: "moto" or "seaweedfs"."""
    return str(getattr(request, "param", TEST_S3 or "moto"))


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server in its own process: the real S3 HTTP API, in memory. It binds port 0
    itself and says which port it got (" * Running on http://127.0.0.1:PORT" on stderr), so
    no other process can take the port between choosing and binding it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        running = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
        port = 0
        for line in proc.stderr:  # until the line naming the port (EOF: it died)
            if found := running.search(line):
                port = int(found[1])
                break
        if not port:
            raise RuntimeError(f"moto did not start (exit code {proc.wait(10)})")
        # Its request log goes on to stderr: read and dropped, so the pipe never fills.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def seaweedfs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS (`weed mini`, deploy/seaweedfs.py) in its own process, its state on disk
    in the session's temporary directory. It has one identity, the test credentials: it
    checks every signature (moto checks none), as a deployed store does."""
    credentials = (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    # Its ten listeners are bound by `weed mini` itself, on ports free a moment before: a
    # start that found one taken by another process ("... is not available") goes again on
    # others, in a directory of its own.
    for _ in range(5):
        seaweedfs = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), credentials=credentials)
        try:
            seaweedfs.start()
            break
        except RuntimeError:
            if not re.search(r"port \d+ .* not available", seaweedfs.log.read_text()):
                raise
    else:
        raise RuntimeError(f"no free ports for SeaweedFS: see {seaweedfs.log}")
    try:
        yield seaweedfs.endpoint
    finally:
        seaweedfs.stop()


@pytest.fixture
def s3_endpoint(store_kind: str, request: pytest.FixtureRequest) -> str:
    """The S3 endpoint of the test's store (`store_kind`)."""
    return str(request.getfixturevalue(f"{store_kind}_endpoint"))


@pytest.fixture
async def s3(s3_endpoint: str) -> AsyncIterator[Any]:
    """A plain S3 client for the test's own looks into the bucket."""
    async with get_session().create_client("s3", endpoint_url=s3_endpoint) as client:
        yield client


@pytest.fixture
async def bucket(s3: Any, store_kind: str) -> AsyncIterator[str]:
    """A fresh bucket per test: tests never see each other's objects. On SeaweedFS each
    bucket is a collection with a volume of its own, and a volume server holds a limited
    number (free disk / volume size): the bucket goes with its test, objects and all."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    await s3.create_bucket(Bucket=name)
    yield name
    if store_kind == "seaweedfs":
        with contextlib.suppress(Exception):  # a test that stopped the store, say
            await s3.delete_bucket(Bucket=name)


@dataclass
class Bucket:
    """What a user sees in the bucket: keys, bytes and metadata."""

    client: Any
    name: str
    prefix: str = "copernica/"

    async def keys(self, under: str = "") -> list[str]:
        """Keys under the prefix (and `under`); without `under`, the housekeeping lease (the
        replicas' own state, written from start-up on) is left out: `keys("leases/")`."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=self.prefix + under
        )
        lease = f"{self.prefix}leases/"
        return [
            item["Key"]
            async for page in pages
            for item in page.get("Contents", [])
            if under or not item["Key"].startswith(lease)
        ]

    async def read(self, key: str) -> bytes:
        answer = await self.client.get_object(Bucket=self.name, Key=key)
        async with answer["Body"] as stream:
            return bytes(await stream.read())

    async def head(self, key: str) -> dict[str, Any]:
        return dict(await self.client.head_object(Bucket=self.name, Key=key))

    async def uploads(self) -> list[dict[str, Any]]:
        answer = await self.client.list_multipart_uploads(Bucket=self.name)
        return list(answer.get("Uploads", []))


@pytest.fixture
def store(s3: Any, bucket: str) -> Bucket:
    return Bucket(s3, bucket)


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass
class Simulator:
    url: str
    state: SimState
    app: web.Application


@pytest.fixture
async def simulator(aiohttp_server: Any) -> Simulator:
    app = create_simulator_app(
        SimulatorConfig(access_token=ACCESS_TOKEN, ready_after=0.05, control=True)
    )
    server = await aiohttp_server(app, host="127.0.0.1")
    return Simulator(str(server.make_url("")).rstrip("/"), app[SIM_STATE], app)


# The suites about one data request (callbacks, polling, packages, retention...) run with
# discovery off, as they were written: the filed subject alone. The tests of discovery and of
# the whole person turn it on (`DISCOVERY="on"`, or `"discover": true` when filing).
TEST_DEFAULTS = {"DISCOVERY": "off"}


def make_settings(**overrides: str) -> Settings:
    env = {
        "COPERNICA_ACCESS_TOKEN": ACCESS_TOKEN,
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "API_TOKEN": API_TOKEN,
        "LOG_FORMAT": "json",
        **TEST_DEFAULTS,
        **overrides,
    }
    return Settings.from_env(env, dotenv=None)


Subject = tuple[str, Any]  # ("email", "a@example.com"), ("profile", 42), as filed


def subject_of(body: Any) -> Subject | None:
    """The subject a filing body names (its one email / profile / subprofile), if any."""
    if not isinstance(body, dict):
        return None
    named = [(kind, body[kind]) for kind in ("email", "profile", "subprofile") if kind in body]
    return named[0] if len(named) == 1 else None


def report_url(base: str, request_id: str, subject: Subject, secret: str = CALLBACK_SECRET) -> str:
    """The callback address the service gives Copernica for a request filed for `subject`:
    `{base}/callbacks/datarequest/{id}/{subject digest}/{token}`. The digest is the service's
    keyed digest of the subject, keyed by HMAC(CALLBACK_SECRET, "subject-hash")."""
    kind, value = subject
    # As filing normalises it: an address trimmed, a profile id as its integer.
    ident = str(value).strip() if kind == "email" else str(int(value))
    key = hmac.new(secret.encode(), b"subject-hash", hashlib.sha256).digest()  # as service.app
    return callback_url(base, Secret(secret), request_id, subject_digest(key, kind, ident))


@dataclass
class Service:
    """The running service, reached over HTTP like Copernica (`url`, the public listener)
    and an operator (`admin_url`, the operator listener) would."""

    url: str
    settings: Settings
    app: web.Application
    http: aiohttp.ClientSession
    admin_url: str = ""
    # The subject of each request filed through `file`, by request id; shared by the
    # services one test starts (replicas of one deployment).
    subjects: dict[str, Subject] = field(default_factory=dict)

    def callback_url(self, request_id: str, subject: Subject | None = None) -> str:
        """The address Copernica is given for the request (the current form, with the
        subject's digest): for the subject filed through `file`, or `subject`."""
        assert self.settings.callback_secret is not None
        if subject is None:
            subject = self.subjects.get(request_id)
        if subject is None:
            raise LookupError(f"{request_id} was not filed through Service.file: pass subject=")
        return report_url(self.url, request_id, subject, self.settings.callback_secret.reveal())

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_TOKEN}"}

    async def file(self, body: dict[str, Any], **kwargs: Any) -> aiohttp.ClientResponse:
        """POST /v1/data-requests; a request it files is remembered with its subject (the
        answer's body is read here, and stays readable by the caller)."""
        answer = await self.http.post(
            f"{self.admin_url}/v1/data-requests",
            json=body,
            headers={**self.auth, **kwargs.pop("headers", {})},
            **kwargs,
        )
        subject = subject_of(body)
        if answer.status in (200, 201, 202) and subject is not None:
            created = await answer.json(content_type=None)
            if isinstance(created, dict) and "id" in created:
                self.subjects[str(created["id"])] = subject
        return answer

    async def show(self, request_id: str) -> dict[str, Any]:
        async with self.http.get(
            f"{self.admin_url}/v1/data-requests/{request_id}", headers=self.auth
        ) as answer:
            assert answer.status == 200, await answer.text()
            return dict(await answer.json())


ServiceFactory = Callable[..., Awaitable[Service]]


class ServiceServer(TestServer):
    """One listener of the service, run as `serve` runs it: no access log (request lines
    carry callback tokens), and a handler whose client hangs up runs on to its answer (its
    outcome counted and logged) where aiohttp's test server would cancel it."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs.update(handler_cancellation=False, access_log=None)
        return web.AppRunner(self.app, **kwargs)


@pytest.fixture
async def make_service(
    s3_endpoint: str, bucket: str, simulator: Simulator
) -> AsyncIterator[ServiceFactory]:
    """Start the service (same factory as production) on a loopback port; settings adjustable."""
    started: list[tuple[list[ServiceServer], aiohttp.ClientSession]] = []
    subjects: dict[str, Subject] = {}

    async def start(**overrides: str) -> Service:
        # Bound now, listened on below: the ports are ours from the start (no race).
        public_socket, admin_socket = bound_socket(), bound_socket()
        port, admin_port = port_of(public_socket), port_of(admin_socket)
        base = f"http://127.0.0.1:{port}"
        env = {
            "ARCHIVE_BUCKET": bucket,
            "S3_ENDPOINT_URL": s3_endpoint,
            "COPERNICA_API_URL": simulator.url + "/v2",
            "PUBLIC_BASE_URL": base,
            "S3_TIMEOUT_SECONDS": "5",
            "ADMIN_PORT": str(admin_port),
            **overrides,
        }
        settings = make_settings(**env)
        app = create_app(settings)
        admin = ServiceServer(app, socket_factory=lambda *_: admin_socket)
        await admin.start_server()
        public = ServiceServer(create_public_app(app), socket_factory=lambda *_: public_socket)
        await public.start_server()
        http = aiohttp.ClientSession()
        started.append(([public, admin], http))
        return Service(base, settings, app, http, f"http://127.0.0.1:{admin_port}", subjects)

    yield start
    for servers, http in started:
        await http.close()
        for server in servers:
            await server.close()


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    return await make_service()


class TcpProxy:
    """A loopback TCP proxy in front of the local S3 that a test can cut, to play an outage.

    `down()` drops every open connection and refuses new ones (connection refused is not
    possible on a listening port, so new connections are accepted and closed at once).
    `latency` seconds delay the first bytes of each answer (an answer begins when bytes come
    back after bytes went out on that connection), not every chunk of a large one.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up_flag = True
        self.bytes_to_target = 0
        self.cut_after_bytes: int | None = None
        self.latency = 0.0
        self._writers: set[Any] = set()
        self._server: Any = None
        self.port = 0

    async def start(self) -> None:
        import asyncio

        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        self.up_flag = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def up(self) -> None:
        self.up_flag = True
        self.cut_after_bytes = None

    async def _serve(self, reader: Any, writer: Any) -> None:
        import asyncio

        if not self.up_flag:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        last = ["answer"]  # which way bytes went last on this connection

        async def pipe(src: Any, dst: Any, count: bool) -> None:
            try:
                while data := await src.read(65536):
                    if count:
                        self.bytes_to_target += len(data)
                        if self.cut_after_bytes is not None and (
                            self.bytes_to_target > self.cut_after_bytes
                        ):
                            self.down()
                            return
                        last[0] = "request"
                    elif last[0] == "request":
                        last[0] = "answer"
                        if self.latency:
                            await asyncio.sleep(self.latency)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort() if not self.up_flag else dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers.discard(writer)
        self._writers.discard(up_writer)

    async def close(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def s3_proxy(s3_endpoint: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    await proxy.start()
    yield proxy
    await proxy.close()


class Listeners:
    """The two loopback ports of a service process and the environment that names them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env, "HOST": "127.0.0.1", "LOG_FORMAT": "json"}
        self.pick_ports()

    def pick_ports(self) -> None:
        """Two ports free a moment ago (`free_port`: the process binds them itself, so another
        may take one first; its start then tries again with others)."""
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.env.update(PORT=str(self.port), ADMIN_PORT=str(self.admin_port))


class ServiceProcess(Listeners):
    """The service as its own OS process (`python -m service serve`), for kill tests."""

    def __init__(self, env: dict[str, str], log_path: str) -> None:
        super().__init__(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Start it and wait until it serves (its `serving` log line: both ports are its own,
        not another process's that took one). A start that found a port taken (the race
        `free_port` leaves) is tried again on two other ports."""
        for _ in range(5):
            log_path = Path(self.log_path)
            offset = log_path.stat().st_size if log_path.exists() else 0
            with log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "service", "serve"],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 30
            while self.proc.poll() is None and time.monotonic() < deadline:
                with log_path.open("rb") as log:
                    log.seek(offset)
                    if re.search(rb'"event": ?"serving"', log.read()):
                        return self
                time.sleep(0.05)
            if self.proc.poll() is None:
                raise RuntimeError(f"the service does not serve: see {self.log_path}")
            with log_path.open("rb") as log:
                log.seek(offset)
                if b"address already in use" not in log.read().lower():
                    raise RuntimeError(f"the service exited: see {self.log_path}")
            self.pick_ports()
        raise RuntimeError(f"no free ports for the service: see {self.log_path}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(30)


@pytest.fixture
def service_processes(
    s3_endpoint: str, bucket: str, simulator: Simulator, tmp_path: Any
) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(**overrides: str) -> ServiceProcess:
        env = {
            "COPERNICA_ACCESS_TOKEN": ACCESS_TOKEN,
            "CALLBACK_SECRET": CALLBACK_SECRET,
            "API_TOKEN": API_TOKEN,
            "ARCHIVE_BUCKET": bucket,
            "S3_ENDPOINT_URL": s3_endpoint,
            "COPERNICA_API_URL": simulator.url + "/v2",
            "S3_TIMEOUT_SECONDS": "5",
            **TEST_DEFAULTS,
            **overrides,
        }
        proc = ServiceProcess(env, str(tmp_path / f"service-{len(started)}.log"))
        SERVICE_LOGS.append(Path(proc.log_path))
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
