"""`make image`: build deploy/Dockerfile for real and run the image's entrypoint against S3.

There is no Docker engine here, and no registry either; what there is, and how it is used:
1. podman, buildah and debootstrap are Debian packages (installed with apt-get if missing).
2. The Dockerfile's base, `python:3.11-slim`, is stood in for by a Debian bookworm made with
   debootstrap (its python3 is 3.11): python3, pip and python-is-python3, without the PEP 668
   marker (the official image has none either), with this machine's CA bundle (PyPI is reached
   through an intercepting proxy). It is imported under the FROM name, so `podman build
   --pull=never` uses it. The root filesystem is cached in .local/image/ (git-ignored): only
   the first run spends a minute or two on debootstrap.
3. `podman build --isolation chroot --format docker` builds the Dockerfile unchanged
   (docker format keeps its HEALTHCHECK); the build's pip reaches PyPI itself.
4. crun cannot start a container here (the kernel refuses its setrlimit), so the probe does
   what a runtime would do, by hand: `buildah mount` the image's filesystem, give it /proc,
   /dev and /etc/resolv.conf in a private mount namespace (gone when the process is), and run
   the image's ENTRYPOINT + CMD with its ENV under `chroot --userspec` as its USER. Against a
   local S3 (moto) it expects 200 from /healthz and /readyz on both listeners, exit 0 from the
   image's HEALTHCHECK command, 503 from /readyz after SIGTERM and then exit code 0.
Prints a summary; exits non-zero on any failure. Needs root.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import botocore.session

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CACHE = ROOT / ".local" / "image"
IMAGE = "localhost/copernica-receiver:latest"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
# The only base this stand-in can be: bookworm's python3 is 3.11 (useradd is in minbase).
STAND_IN = {"docker.io/library/python:3.11-slim": "bookworm"}
PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates")
BASE_CONFIG = (  # what the official image's config sets that this Dockerfile relies on
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
BASE_LABEL = "org.copernica-receiver.stand-in"
PROBE_CONTAINER = "copernica-receiver-probe"
BUCKET = "copernica-archive"
DRAIN_SECONDS, GRACE_SECONDS = 3, 10
# Inside a private mount namespace: what a runtime gives a container, then the entrypoint.
IN_CHROOT = (
    'm=$1 u=$2; shift 2; mount -t proc proc "$m/proc" && mount --bind /dev "$m/dev"'
    ' && touch "$m/etc/resolv.conf" && mount --bind /etc/resolv.conf "$m/etc/resolv.conf"'
    ' && exec chroot --userspec="$u" "$m" "$@"'
)


class Failed(Exception):
    """A step went wrong; the message says which and why."""


def run(*args: str, log: Path | None = None) -> str:
    """Run a command; its stdout, or Failed with the end of its output."""
    if log is None:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        output = done.stdout + done.stderr
    else:
        with log.open("w") as out:
            done = subprocess.run(
                args, stdout=out, stderr=subprocess.STDOUT, text=True, check=False
            )
        output = log.read_text(errors="replace")
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        where = f" (whole log: {log.relative_to(ROOT)})" if log else ""
        raise Failed(f"`{' '.join(args[:3])} ...` exited {done.returncode}{where}:\n{tail}")
    return done.stdout if log is None else ""


@contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"== {name}", flush=True)
    start = time.monotonic()
    yield
    timings[name] = time.monotonic() - start


def install_tools() -> None:
    missing = [tool for tool in ("podman", "buildah", "debootstrap") if not shutil.which(tool)]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def read_dockerfile() -> tuple[str, list[str]]:
    """The one image the Dockerfile builds FROM, fully qualified, and its named stages."""
    stages: list[str] = []
    bases: set[str] = set()
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            if match[1].lower() not in stages:
                bases.add(match[1])
            if match[2]:
                stages.append(match[2].lower())
    qualified = {b if "/" in b else f"docker.io/library/{b}" for b in bases}
    if len(qualified) != 1 or next(iter(qualified)) not in STAND_IN:
        raise Failed(f"no stand-in for FROM {', '.join(sorted(bases))}: only {list(STAND_IN)}")
    return qualified.pop(), stages


def base_rootfs(suite: str) -> Path:
    """The stand-in's root filesystem as a tarball, made once per suite, packages and CA."""
    recipe = json.dumps([suite, MIRROR, PACKAGES, BASE_CONFIG, CA_BUNDLE.read_text()])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    tarball = CACHE / f"rootfs-{suite}-{key}.tar"
    if tarball.exists():
        print(f"cached: {tarball.relative_to(ROOT)}")
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("rootfs-*.tar"):
        old.unlink()
    tree = CACHE / "rootfs.tmp"
    shutil.rmtree(tree, ignore_errors=True)
    print(f"debootstrap {suite} from {MIRROR} (a minute or two; log: .local/image/debootstrap.log)")
    run(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        suite,
        str(tree),
        MIRROR,
        log=CACHE / "debootstrap.log",
    )
    shutil.copyfile(CA_BUNDLE, tree / "etc/ssl/certs/ca-certificates.crt")
    # Like the official image: pip may install into the system Python; no apt lists or caches,
    # no docs, man pages or translations ("slim"); no host name or resolver of this machine.
    for pattern in (
        "usr/lib/python3*/EXTERNALLY-MANAGED",
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
        "usr/share/doc/*/*",
        "etc/hostname",
        "etc/resolv.conf",
    ):
        for path in tree.glob(pattern):
            if path.name == "copyright":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    run("tar", "--numeric-owner", "--xattrs", "-C", str(tree), "-cf", str(tarball), ".")
    shutil.rmtree(tree)
    return tarball


def import_base(reference: str, tarball: Path) -> None:
    """Tag the stand-in as the FROM image, unless the one tagged is already this tarball's."""
    stamp = tarball.stem
    present = subprocess.run(
        [
            "podman",
            "image",
            "inspect",
            "--format",
            f'{{{{index .Labels "{BASE_LABEL}"}}}}',
            reference,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if present.returncode == 0 and present.stdout.strip() == stamp:
        print(f"cached: {reference} ({stamp})")
        return
    changes = [
        arg
        for change in (*BASE_CONFIG, f"LABEL {BASE_LABEL}={stamp}")
        for arg in ("--change", change)
    ]
    run("podman", "import", "--quiet", *changes, str(tarball), reference)


def inspect(image: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run("podman", "image", "inspect", image))[0]
    return info


def image_id(reference: str) -> str | None:
    found = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", reference],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() if found.returncode == 0 else None


def build(stages: list[str]) -> None:
    """podman build; each named stage is tagged too (`IMAGE-stage`), so its layer cache
    survives, and the images a rebuild replaces are removed (each holds ~150 MB of layers)."""
    tags = {f"{IMAGE}-{stage}": stage for stage in stages} | {IMAGE: None}
    before = {tag: image_id(tag) for tag in tags}
    for tag, stage in tags.items():
        target = ["--target", stage] if stage else []
        run(
            *("podman", "build", "--isolation", "chroot", "--format", "docker", "--pull=never"),
            *("-f", str(DOCKERFILE), *target, "-t", tag, str(ROOT)),
            log=CACHE / f"build{'-' + stage if stage else ''}.log",
        )
    for tag in reversed(tags):  # the final image first: it may sit on a stage's layers
        old = before[tag]
        if old is not None and old != image_id(tag):
            subprocess.run(["podman", "rmi", old], capture_output=True, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def listening(port: int, proc: subprocess.Popen[bytes], name: str) -> Callable[[], bool]:
    def check() -> bool:
        if proc.poll() is not None:
            raise Failed(f"{name} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    return check


def wait_exit(proc: subprocess.Popen[bytes], name: str, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"{name} did not exit within {timeout:.0f} s") from None


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET on loopback; status 0 when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace").strip()
    except OSError as error:
        return 0, str(error)
    finally:
        conn.close()


def expect(port: int, path: str, status: int, timeout: float) -> str:
    """GET until the status is `status` (the service may still be starting); the answer."""
    answer = (0, "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = get(port, path)
        if answer[0] == status:
            return f"{path} {answer[0]} {answer[1]}"
        time.sleep(0.1)
    raise Failed(f"GET :{port}{path} answered {answer[0]} {answer[1]!r}, not {status}")


def user_spec(mountpoint: Path, user: str) -> str:
    """USER as a runtime reads it: a group of its own, or the user's from the image's passwd."""
    if ":" in user:
        return user
    for line in (mountpoint / "etc/passwd").read_text().splitlines():
        name, _, uid, gid, *_ = line.split(":")
        if user in (name, uid):
            return f"{uid}:{gid}"
    return f"{user}:0"


def probe(image: str) -> list[str]:
    """Start the image's entrypoint against moto, probe it, stop it; the lines to report."""
    config = inspect(image)
    spec = config["Config"]
    s3_port, port, admin_port = free_port(), free_port(), free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    env = dict(item.split("=", 1) for item in spec.get("Env") or [])
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        ADMIN_PORT=str(admin_port),
        COPERNICA_ACCESS_TOKEN=secrets.token_urlsafe(16),
        COPERNICA_API_URL="http://127.0.0.1:9/v2",  # nothing is asked of Copernica here
        CALLBACK_SECRET=secrets.token_urlsafe(32),
        API_TOKEN=secrets.token_urlsafe(24),
        PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        ARCHIVE_BUCKET=BUCKET,
        S3_ENDPOINT_URL=s3_url,
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",  # noqa: S106 - moto's
        AWS_DEFAULT_REGION="us-east-1",
        SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
    )
    argv = [*(spec.get("Entrypoint") or []), *(spec.get("Cmd") or [])]
    if spec.get("WorkingDir") not in (None, "", "/"):
        argv = ["env", "-C", spec["WorkingDir"], *argv]
    lines: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    subprocess.run(["buildah", "rm", PROBE_CONTAINER], capture_output=True, check=False)
    try:
        s3 = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(s3)
        wait_until(listening(s3_port, s3, "moto"), "moto", 30)
        botocore.session.get_session().create_client(
            "s3",
            endpoint_url=s3_url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",  # noqa: S106
        ).create_bucket(Bucket=BUCKET)

        run("buildah", "from", "--pull-never", "--quiet", "--name", PROBE_CONTAINER, image)
        mountpoint = Path(run("buildah", "mount", PROBE_CONTAINER).strip())
        user = user_spec(mountpoint, spec.get("User") or "0")

        def in_image(*command: str, **kwargs: Any) -> subprocess.Popen[bytes]:
            wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", IN_CHROOT]
            return subprocess.Popen(
                [*wrapper, "in-image", str(mountpoint), user, *command], env=env, **kwargs
            )

        log = CACHE / "probe.log"
        lines.append(f"ran      chroot --userspec={user} <buildah mount> {' '.join(argv)}")
        with log.open("wb") as out:
            service = in_image(*argv, stdout=out, stderr=subprocess.STDOUT)
        procs.append(service)
        try:
            for name, number in (("public", port), ("admin", admin_port)):
                wait_until(listening(number, service, "the service"), f":{number}", 60)
                results = [expect(number, path, 200, 30) for path in ("/healthz", "/readyz")]
                lines.append(f"{name:<8} :{number}  " + "  ".join(results))

            healthcheck = (config.get("Healthcheck") or {}).get("Test") or []
            if healthcheck[:1] == ["CMD-SHELL"]:
                healthcheck = ["/bin/sh", "-c", healthcheck[1]]
            elif healthcheck[:1] == ["CMD"]:
                healthcheck = healthcheck[1:]
            else:
                raise Failed(f"the image has no HEALTHCHECK to run: {healthcheck}")
            checker = in_image(*healthcheck, stdout=subprocess.DEVNULL)
            procs.append(checker)
            code = wait_exit(checker, "the HEALTHCHECK command", 30)
            lines.append(f"HEALTHCHECK  exit {code}")
            if code != 0:
                raise Failed(f"the image's HEALTHCHECK exited {code}")

            stopped = time.monotonic()
            service.send_signal(signal.SIGTERM)
            draining = expect(port, "/readyz", 503, DRAIN_SECONDS)
            code = wait_exit(service, "the service", DRAIN_SECONDS + GRACE_SECONDS + 10)
            lines.append(
                f"SIGTERM  {draining}, then exit {code} after "
                f"{time.monotonic() - stopped:.1f} s (SHUTDOWN_DRAIN_SECONDS={DRAIN_SECONDS})"
            )
            if code != 0:
                raise Failed(f"the service exited {code} on SIGTERM")
        except Failed:
            print(f"-- the service's log ({log.relative_to(ROOT)}), last lines:", file=sys.stderr)
            print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
            raise
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(DRAIN_SECONDS + GRACE_SECONDS + 5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        subprocess.run(["buildah", "rm", PROBE_CONTAINER], capture_output=True, check=False)
    return lines


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("make image needs root (debootstrap, podman, mount, chroot)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup runs
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        with phase("tools: podman, buildah, debootstrap", timings):
            install_tools()
        with phase("base: debootstrap stand-in for the Dockerfile's FROM", timings):
            reference, stages = read_dockerfile()
            import_base(reference, base_rootfs(STAND_IN[reference]))
        with phase(f"build: podman build --isolation chroot -t {IMAGE}", timings):
            build(stages)
        with phase("probe: the entrypoint under chroot, against moto", timings):
            results = probe(IMAGE)
    except Failed as error:
        sys.exit(f"make image FAILED: {error}")
    info, base = inspect(IMAGE), inspect(reference)
    print(
        f"\nimage    {IMAGE}  {info['Id'][:12]}  {info['Size'] / 1e6:.0f} MB"
        f" (of which the stand-in base {reference}: {base['Size'] / 1e6:.0f} MB)",
        *results,
        "time     "
        + ", ".join(f"{name.split(':')[0]} {seconds:.0f} s" for name, seconds in timings.items())
        + f"; total {time.monotonic() - started:.0f} s",
        "OK",
        sep="\n",
    )


if __name__ == "__main__":
    main()
