"""What every benchmark starts: an S3 store (moto's server, or SeaweedFS with `--s3 seaweedfs`
or BENCH_S3=seaweedfs, where a benchmark offers it), the simulator, the service, as processes
on loopback, and readings of a process's CPU time and memory from /proc."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.seaweedfs import SeaweedFS

ROOT = Path(__file__).resolve().parent.parent
# The S3 stores a benchmark can run on (`--s3`, BENCH_S3), and the name its tables give each.
STORES = {"moto": "moto", "seaweedfs": "SeaweedFS"}
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(port: int) -> None:
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int, field_name: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def default_store() -> str:
    """BENCH_S3, else moto."""
    return os.environ.get("BENCH_S3", "moto")


def store_argument(parser: argparse.ArgumentParser) -> None:
    """A benchmark's `--s3 moto|seaweedfs` (default BENCH_S3, else moto)."""
    parser.add_argument(
        "--s3",
        choices=list(STORES),
        default=default_store(),
        help="the S3 store the service and its baseline share (default: BENCH_S3, else moto)",
    )


def on_store(title: str, store: str) -> str:
    """A RESULTS.md section title for a run on `store`: moto's runs keep their titles, a
    SeaweedFS run gets a section of its own (" on SeaweedFS")."""
    return title if store == "moto" else f"{title} on {STORES[store]}"


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


@dataclass
class Stack:
    """S3 store + simulator + service; `start()` returns once all listen. The store is
    `store` (STORES: moto, or SeaweedFS signing-checked with CREDENTIALS, its state in a
    temporary directory removed at `stop()`); `store_pid` is its process, for its CPU."""

    service_env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # The simulator's command (after the interpreter) and extra arguments for it.
    simulator: list[str] = field(default_factory=lambda: ["-m", "service", "simulate", "--control"])
    simulator_args: list[str] = field(default_factory=list)
    store: str = field(default_factory=default_store)

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"store {self.store!r}: one of {', '.join(STORES)}")
        os.environ.update(CREDENTIALS)
        self.seaweedfs: SeaweedFS | None = None
        self.store_pid = 0
        self.token, self.secret = secrets.token_hex(8), secrets.token_hex(16)
        self.api = secrets.token_hex(8)
        self.s3_port, self.sim_port, self.port = free_port(), free_port(), free_port()
        self.admin_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.url = f"http://127.0.0.1:{self.port}"  # public: callbacks, health
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"  # operator API, metrics
        self.bucket = "bench"

    def spawn(
        self, args: list[str], env: dict[str, str] | None = None, port: int | None = None
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        if port:
            wait_for(port)
        return proc

    @property
    def store_name(self) -> str:
        """The store as tables name it: moto, SeaweedFS."""
        return STORES[self.store]

    def start_store(self) -> int:
        """Start the S3 store on `s3_port` with the bucket made; the pid of its process.
        moto is the stack's first process (`procs[0]`); SeaweedFS (`weed mini`, one
        process) is stopped last, by `stop()`."""
        if self.store == "seaweedfs":
            directory = Path(tempfile.mkdtemp(prefix="bench-seaweedfs-"))
            credentials = (CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
            self.seaweedfs = SeaweedFS(
                directory, bucket=self.bucket, s3_port=self.s3_port, credentials=credentials
            ).start()
            assert self.seaweedfs.proc is not None
            self.store_pid = self.seaweedfs.proc.pid
            return self.store_pid
        import botocore.session

        moto = self.spawn(
            ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)], port=self.s3_port
        )
        botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1"
        ).create_bucket(Bucket=self.bucket)
        self.store_pid = moto.pid
        return self.store_pid

    def start(self, service: bool = True) -> Stack:
        """Start the S3 store and the simulator, and (unless `service=False`) the service."""
        self.start_store()
        self.sim = self.spawn(
            [
                *self.simulator,
                "--port",
                str(self.sim_port),
                "--access-token",
                self.token,
                "--ready-after",
                "3600",
                *self.simulator_args,
            ],
            port=self.sim_port,
        )
        if service:
            self.start_service()
        return self

    def service_environment(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """The service's settings: the stack's defaults, then `service_env`, then `env` (an
        empty value unsets a setting, e.g. `PUBLIC_BASE_URL`)."""
        return {
            "COPERNICA_ACCESS_TOKEN": self.token,
            "CALLBACK_SECRET": self.secret,
            "API_TOKEN": self.api,
            "ARCHIVE_BUCKET": self.bucket,
            "S3_ENDPOINT_URL": self.endpoint,
            "COPERNICA_API_URL": f"http://127.0.0.1:{self.sim_port}/v2",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "ADMIN_PORT": str(self.admin_port),
            "PUBLIC_BASE_URL": self.url,
            "MAX_CALLBACK_BYTES": str(4 * 1024**3),
            "LOG_LEVEL": "warning",
            "COPERNICA_MAX_RPS": "1000",
            **self.service_env,
            **(env or {}),
        }

    def start_service(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start the service (see `service_environment` for `env`); returns once it listens."""
        self.service = self.spawn(
            ["-m", "service", "serve"], env=self.service_environment(env), port=self.port
        )
        return self.service

    def stop_service(self) -> None:
        """Stop the service (SIGTERM, its graceful shutdown), e.g. to start it with other env."""
        self.stop_process(self.service)

    def stop_process(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM one of the stack's processes (SIGKILL after 30 s) and forget it."""
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.procs.remove(proc)

    def restart_service(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.stop_service()
        return self.start_service(env)

    async def file_requests(
        self, http: Any, subject: str, n: int, concurrency: int = 1
    ) -> dict[str, str]:
        """File n requests for `subject` through the service's API, `concurrency` at a time;
        {request id: the `report` address it gave Copernica}, as the simulator recorded it."""
        gate = asyncio.Semaphore(concurrency)

        async def one() -> tuple[str, str]:
            async with (
                gate,
                http.post(
                    f"{self.admin_url}/v1/data-requests",
                    json={"email": subject},
                    headers={"Authorization": f"Bearer {self.api}"},
                ) as answer,
            ):
                assert answer.status == 202, await answer.text()
                created = await answer.json()
                return str(created["id"]), str(created["copernica_id"])

        filed = await asyncio.gather(*(one() for _ in range(n)))
        async with http.get(f"http://127.0.0.1:{self.sim_port}/_sim/state") as answer:
            known = (await answer.json())["requests"]
        return {rid: known[cid]["report"] for rid, cid in filed}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.seaweedfs is not None:
            self.seaweedfs.stop()
            shutil.rmtree(self.seaweedfs.directory, ignore_errors=True)
            self.seaweedfs = None


def append_results(title: str, lines: list[str], replaces: tuple[str, ...] = ()) -> None:
    """Keep the last run of each benchmark in bench/RESULTS.md, with the machine it ran on;
    sections titled as in `replaces` (a benchmark's earlier titles) are dropped."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results (last run of each)\n"
    section = f"\n## {title}\n\n{time.strftime('%Y-%m-%d %H:%M')} on {machine()}\n\n"
    section += "\n".join(lines) + "\n"
    for old in (title, *replaces):
        start = text.find(f"\n## {old}\n")
        if start != -1:
            end = text.find("\n## ", start + 1)
            text = text[:start] + (text[end:] if end != -1 else "")
    path.write_text(text.rstrip() + "\n" + section)


def sized_body(subject: str, size: int) -> bytes:
    """A valid callback body for `subject` of about `size` bytes (exactly, when small): the
    simulator's payloads (whole MIME messages, at least 11 KB), or one short item padded."""
    if size >= 20_000:
        from service.simulator.payloads import PayloadSpec, payload_bytes

        return payload_bytes(PayloadSpec("email", subject, "1", size))
    item = {"type": "open", "time": "2026-01-01 00:00:00", "ip": "198.51.100.7", "note": ""}
    body = {"info": {"type": "email", "id": subject}, "data": [[item]]}
    bare = len(json.dumps(body, separators=(",", ":")))
    item["note"] = "x" * max(0, size - bare)
    return json.dumps(body, separators=(",", ":")).encode()
