"""Run deploy/nginx.conf as our own nginx process in front of loopback replicas.

The reference configuration is used as it is; only its upstream servers and its listen
address are rewritten for loopback ports. Used by tests/scenarios/test_nginx.py and
bench/replicas.py.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = Path(__file__).resolve().parent / "nginx.conf"


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (nginx's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class Nginx:
    """nginx (one worker) with deploy/nginx.conf on 127.0.0.1:`port`, in front of
    `127.0.0.1:{p}` for each p in `upstreams`."""

    def __init__(self, workdir: Path, upstreams: list[int], port: int) -> None:
        self.port = port
        servers = "".join(
            f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;\n" for port in upstreams
        )
        site = re.sub(
            r"(upstream receiver \{\n)(?:.*\n)*?(    keepalive)",
            rf"\g<1>{servers}\2",
            CONF.read_text(),
        )
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        if not all(f"127.0.0.1:{port}" in site for port in upstreams):
            raise RuntimeError("deploy/nginx.conf no longer has the expected upstream block")
        (workdir / "site.conf").write_text(site)
        (workdir / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\n"
            f"error_log {workdir}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {workdir}/body;\n"
            f"  proxy_temp_path {workdir}/proxy;\n  include {workdir}/site.conf;\n}}\n"
        )
        self.workdir = workdir
        self.site = site
        self.url = f"http://127.0.0.1:{self.port}"
        self.pids: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        """Start nginx; returns once it listens and its worker runs (pids: master, worker)."""
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is missing: `make nginx` installs it (apt-get)")
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            workers = _children(self.proc.pid)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    if workers:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start; see {self.workdir}/error.log")
            time.sleep(0.02)
        self.pids = [self.proc.pid, *workers]
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
