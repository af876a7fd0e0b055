"""The parts a soak runs: the S3 store (moto or SeaweedFS, its own process) behind a fault
proxy, the Copernica simulator
(in this process, so its state is read directly), replicas of the service (each its own
process, restarted after a kill as an orchestrator would) and nginx in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from aiobotocore.session import get_session
from aiohttp import web

from deploy.local_nginx import Nginx
from deploy.seaweedfs import SeaweedFS
from service.simulator.account import Account
from service.simulator.app import SIM_STATE, SimState, SimulatorConfig, create_simulator_app
from tests.conftest import (
    ACCESS_TOKEN,
    API_TOKEN,
    CALLBACK_SECRET,
    Listeners,
    TcpProxy,
    bound_socket,
    free_port,
    port_of,
    wait_for_port,
)

from .plan import (
    COPERNICA_TIMEOUT,
    DRAIN,
    GRACE,
    LEASE,
    PART,
    POLL_INTERVAL,
    RATE,
    REPLICAS,
    Plan,
)

os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

STORES = ("moto", "seaweedfs")  # the S3 stores a soak runs on (`--s3`, SOAK_S3)


class Replica(Listeners):
    """One replica (`python -m service serve`). Its ports stay the same across restarts
    (nginx's upstream list is fixed). A start that finds S3 unreachable is refused by the
    service (exit 2, its store check); like an orchestrator, `start` tries again."""

    def __init__(self, number: int, env: dict[str, str], log_path: Path) -> None:
        super().__init__(env)
        self.number = number
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.refused_starts = 0
        self.terms: list[tuple[int | None, float]] = []  # (exit code, seconds to exit)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, within: float = 120.0, movable: bool = False) -> None:
        """Until it serves: its `serving` log line says both ports are its own (not another
        process's that took one). `movable` (before nginx names its ports): a start that found
        a port taken (`free_port`'s race) is tried again at once on two others."""
        deadline = time.monotonic() + within
        while True:
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            log = await asyncio.to_thread(self.log_path.open, "ab")
            with log:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "service", "serve", env=self.env, stdout=log, stderr=log
                )
            self.starts += 1
            exited = asyncio.create_task(self.proc.wait())
            while not exited.done():
                if re.search(rb'"event": ?"serving"', await self._printed(offset)):
                    return
                await asyncio.wait([exited], timeout=0.05)
            if movable and b"address already in use" in (await self._printed(offset)).lower():
                self.starts -= 1
                self.pick_ports()
                continue
            self.refused_starts += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.number} does not start: see {self.log_path}")
            await asyncio.sleep(1.0)

    async def _printed(self, offset: int) -> bytes:
        """What it wrote to its log since `offset`."""

        def read() -> bytes:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read()

        return await asyncio.to_thread(read)

    async def kill(self) -> None:
        if self.proc is not None and self.alive:
            self.proc.kill()
            await self.proc.wait()

    async def terminate(self) -> None:
        """SIGTERM, then wait; the exit code and how long it took are kept for the checker."""
        if self.proc is None or not self.alive:
            return
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = await asyncio.wait_for(self.proc.wait(), DRAIN + GRACE + 10)
        except TimeoutError:
            code = None
            await self.kill()
        self.terms.append((code, time.monotonic() - began))


class Stack:
    """Everything of one soak run, started in `__aenter__` and stopped in `__aexit__`."""

    def __init__(self, plan: Plan, workdir: Path, store: str = "moto") -> None:
        if store not in STORES:
            raise ValueError(f"store {store!r}: one of {', '.join(STORES)}")
        self.plan = plan
        self.workdir = workdir
        self.store = store
        self.bucket = f"soak-{uuid.uuid4().hex[:12]}"
        self._exit = contextlib.AsyncExitStack()
        self.replicas: list[Replica] = []
        self.moto: asyncio.subprocess.Process | None = None
        self._moto_log: asyncio.Task[None]
        self.seaweedfs: SeaweedFS | None = None
        self.nginx: Nginx | None = None
        self.s3: Any = None  # a client straight to the store, for the checker (not the proxy)
        self.sim_state: SimState
        # Subjects (casefolded) whose e-mail data request Copernica refuses "Invalid method".
        self.invalid_method: set[str] = set()

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    async def _start_store(self) -> None:
        """moto (in memory), or SeaweedFS with its state under the workdir and one identity,
        the AWS_* credentials every replica and the checker sign with."""
        if self.store == "seaweedfs":
            credentials = (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
            self.seaweedfs = SeaweedFS(self.workdir / "seaweedfs", credentials=credentials)
            await asyncio.to_thread(self.seaweedfs.start)
            self.s3_port = self.seaweedfs.ports["s3.port"]
            return
        # moto binds port 0 itself and names the port it got: no other process can take it
        # in between (as conftest's moto_endpoint).
        self.moto = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.moto.stderr is not None
        running = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
        while not (found := running.search(await self.moto.stderr.readline())):
            if self.moto.stderr.at_eof():
                raise RuntimeError(f"moto did not start (exit code {await self.moto.wait()})")
        self.s3_port = int(found[1])
        # Its request log goes on to stderr: read and dropped, so the pipe never fills.
        self._moto_log = asyncio.create_task(_drain(self.moto.stderr))
        await asyncio.to_thread(wait_for_port, self.s3_port)

    async def __aenter__(self) -> Stack:
        await self._start_store()
        self.s3 = await self._exit.enter_async_context(
            get_session().create_client("s3", endpoint_url=self.s3_url)
        )
        await self.s3.create_bucket(Bucket=self.bucket)

        self.proxy = TcpProxy(self.s3_port)
        await self.proxy.start()

        app = create_simulator_app(
            SimulatorConfig(
                access_token=ACCESS_TOKEN,
                ready_after=1.0,
                payload_size=4096,
                delivery_retries=4,
                delivery_retry_delay=0.5,
                seed=self.plan.seed,
                payload_seed=self.plan.seed,
            )
        )
        self.sim_state = app[SIM_STATE]
        self.sim_state.account = Account.from_json(self.plan.account())
        self.invalid_method = {r.email.casefold() for r in self.plan.requests if r.invalid_method}
        app.middlewares.append(self._invalid_method)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._exit.push_async_callback(runner.cleanup)
        sim_socket = bound_socket()  # ours until the simulator listens on it: no port race
        sim_port = port_of(sim_socket)
        await web.SockSite(runner, sim_socket).start()

        nginx_port = free_port()
        env = {
            "COPERNICA_ACCESS_TOKEN": ACCESS_TOKEN,
            "CALLBACK_SECRET": CALLBACK_SECRET,
            "API_TOKEN": API_TOKEN,
            "ARCHIVE_BUCKET": self.bucket,
            "S3_ENDPOINT_URL": self.proxy.url,
            "COPERNICA_API_URL": f"http://127.0.0.1:{sim_port}/v2",
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{nginx_port}",
            "S3_TIMEOUT_SECONDS": "5",
            "S3_PART_BYTES": str(PART),
            "POLL_INTERVAL_SECONDS": str(POLL_INTERVAL),
            "POLL_LEASE_SECONDS": str(LEASE),
            "REQUEST_EXPIRY_HOURS": repr(self.plan.expiry / 3600),
            "RETENTION_DAYS": repr(self.plan.retention / 86400),
            "COPERNICA_MAX_RPS": str(RATE),
            "COPERNICA_TIMEOUT_SECONDS": str(COPERNICA_TIMEOUT),
            "SHUTDOWN_DRAIN_SECONDS": str(DRAIN),
            "SHUTDOWN_GRACE_SECONDS": str(GRACE),
            "DISCOVERY": "off",  # on for the requests filed with "discover": true
        }
        for number in range(REPLICAS):
            self.replicas.append(Replica(number, env, self.workdir / f"replica-{number}.log"))
        await asyncio.gather(*(r.start(movable=True) for r in self.replicas))
        await self._start_nginx(nginx_port)
        return self

    async def _start_nginx(self, port: int) -> None:
        """nginx in front of the replicas, on `port` (`free_port`: nginx binds it itself). One
        found taken is started on another, and the replicas (nothing filed yet) again with
        that PUBLIC_BASE_URL."""
        nginx_dir = self.workdir / "nginx"
        nginx_dir.mkdir(exist_ok=True)
        for _ in range(5):
            try:
                self.nginx = Nginx(nginx_dir, [r.port for r in self.replicas], port).start()
                return
            except RuntimeError:
                errors = (nginx_dir / "error.log").read_text(errors="replace")
                if f"127.0.0.1:{port} failed (98: address already in use)" not in errors.lower():
                    raise
            port = free_port()
            for replica in self.replicas:
                await replica.kill()
                replica.env["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"
                replica.starts = replica.refused_starts = 0
            await asyncio.gather(*(r.start(movable=True) for r in self.replicas))
        raise RuntimeError(f"no free port for nginx: see {nginx_dir}/error.log")

    @web.middleware
    async def _invalid_method(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The simulator's `email_invalid_method` switch, per subject: its own is global. Inside
        the simulator's middlewares (the call is counted, authenticated and given its faults
        first), as its own switch answers."""
        subject = request.match_info.get("subject", "").casefold()
        if (
            request.method == "POST"
            and request.match_info.get("kind") == "email"
            and request.path.endswith("/datarequest")
            and subject in self.invalid_method
        ):
            return web.json_response({"error": {"message": "Invalid method"}}, status=400)
        return await handler(request)

    def admin_urls(self) -> list[str]:
        return [r.admin_url for r in self.replicas if r.alive]

    async def heal(self) -> None:
        """Every fault off and every replica running: what the checker's final state needs."""
        self.proxy.up()
        self.proxy.latency = 0.0
        faults = self.sim_state.faults
        faults.status_5xx_rate = faults.status_429_rate = faults.slow_seconds = 0.0
        await asyncio.gather(*(r.start() for r in self.replicas if not r.alive))

    async def stop_replicas(self) -> None:
        await asyncio.gather(*(r.terminate() for r in self.replicas))

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for replica in self.replicas:
            await replica.kill()
        if self.nginx is not None:
            self.nginx.stop()
        await self.proxy.close()
        await self._exit.aclose()
        if self.moto is not None:
            self.moto.terminate()
            await self.moto.wait()
            self._moto_log.cancel()
        if self.seaweedfs is not None:
            await asyncio.to_thread(self.seaweedfs.stop)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
