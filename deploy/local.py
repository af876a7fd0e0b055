"""`make run`: the whole stack on one machine, no credentials needed.

Starts a local S3 (moto's server mode, in memory), creates the bucket, starts the Copernica
simulator and the service with a generated development config, prints how to use it, and
stops everything on Ctrl-C. Ports can be moved with S3_PORT, SIM_PORT, PORT and ADMIN_PORT.

Callbacks are signed end to end: a throwaway RSA key pair is made in .local/ at every start;
the simulator signs its callbacks with the private half as Copernica does, and the service
runs with SIGNATURE_MODE=require and the public half, so an unsigned callback is refused.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import botocore.session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
S3_PORT = int(os.environ.get("S3_PORT", "9100"))
SIM_PORT = int(os.environ.get("SIM_PORT", "9000"))
PORT = int(os.environ.get("PORT", "8080"))
ADMIN_PORT = int(os.environ.get("ADMIN_PORT", "9090"))
BUCKET = "copernica-archive"
LOCAL = ROOT / ".local"
ACCOUNT_ID = "10001"  # the made-up Copernica account the simulator signs for


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


def signing_keys() -> tuple[Path, Path]:
    """A new RSA key pair in .local/ (private key readable by its owner only): Copernica's
    keys live in DNS, a local stack has none, so the service is given the public key file."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = LOCAL / "copernica-sign-key.pem", LOCAL / "copernica-sign-key.pub.pem"
    private.unlink(missing_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def main() -> None:
    access_token = secrets.token_urlsafe(16)
    LOCAL.mkdir(exist_ok=True)
    sign_key, verify_key = signing_keys()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
        "COPERNICA_ACCESS_TOKEN": access_token,
        "COPERNICA_API_URL": f"http://127.0.0.1:{SIM_PORT}/v2",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{PORT}",
        "CALLBACK_SECRET": secrets.token_urlsafe(32),
        "API_TOKEN": secrets.token_urlsafe(24),
        "ARCHIVE_BUCKET": BUCKET,
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "HOST": "127.0.0.1",
        "PORT": str(PORT),
        "ADMIN_PORT": str(ADMIN_PORT),
        "POLL_INTERVAL_SECONDS": "10",
        "REPORT_CONTROLLER_NAME": "Example Shop B.V.",
        "RECEIVER_URL": f"http://127.0.0.1:{ADMIN_PORT}",
        "SIGNATURE_MODE": "require",
        "COPERNICA_ACCOUNT_ID": ACCOUNT_ID,
        "SIGNATURE_PUBLIC_KEY_FILE": str(verify_key),
    }
    python = sys.executable
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def stop(*_: object) -> None:
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        s3 = subprocess.Popen(
            [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(("local S3", s3))
        wait_for(S3_PORT, "local S3 (moto)", s3)
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=env["S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",  # noqa: S106
        )
        client.create_bucket(Bucket=BUCKET)

        sim = subprocess.Popen(
            [
                python,
                "-m",
                "service",
                "simulate",
                "--control",
                "--port",
                str(SIM_PORT),
                "--access-token",
                access_token,
                "--ready-after",
                "3",
                "--sign-key",
                str(sign_key),
                "--account-id",
                ACCOUNT_ID,
            ],
            env=env,
        )
        procs.append(("simulator", sim))
        wait_for(SIM_PORT, "simulator", sim)

        service = subprocess.Popen([python, "-m", "service", "serve"], env=env)
        procs.append(("service", service))
        wait_for(PORT, "service", service)
        wait_for(ADMIN_PORT, "service (admin)", service)

        dev_env = LOCAL / "dev.env"
        dev_env.write_text(
            "".join(
                f"{k}={env[k]}\n"
                for k in ("API_TOKEN", "RECEIVER_URL", "S3_ENDPOINT_URL", "ARCHIVE_BUCKET")
            )
        )
        print(
            f"""
Local stack is up:
  service    http://127.0.0.1:{PORT}   (public: callbacks, /healthz, /readyz)
  admin      http://127.0.0.1:{ADMIN_PORT}   (operators: /v1 API, /metrics, /healthz, /readyz)
  simulator  http://127.0.0.1:{SIM_PORT}   (fake Copernica; state at /_sim/state)
  local S3   http://127.0.0.1:{S3_PORT}   (bucket {BUCKET}, in memory)

Callbacks are signed as Copernica signs them: the simulator with a throwaway key
(.local/{sign_key.name}, X-Copernica-Id {ACCOUNT_ID}); the service runs with
SIGNATURE_MODE=require, COPERNICA_ACCOUNT_ID={ACCOUNT_ID} and
SIGNATURE_PUBLIC_KEY_FILE=.local/{verify_key.name}, so unsigned callbacks get 401.

In another terminal, file a data request and watch it get archived (about 3 s):
  set -a; . .local/dev.env; set +a
  .venv/bin/python -m service request alice@example.com
  .venv/bin/python -m service status <id printed above>
  .venv/bin/python -m service list
  .venv/bin/python -m service download <id>   (the access package, about 10 s later)

The archive lands in s3://{BUCKET}/copernica/archive/YYYY/MM/DD/<id>.json; look with
  AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local aws --endpoint-url \\
    http://127.0.0.1:{S3_PORT} s3 ls --recursive s3://{BUCKET}/
(or open http://127.0.0.1:{S3_PORT}/moto-api/ in a browser).

Ctrl-C stops everything.""",
            flush=True,
        )
        while all(proc.poll() is None for _name, proc in procs):
            time.sleep(0.5)
        dead = [name for name, proc in procs if proc.poll() is not None]
        print(f"stopped: {', '.join(dead)} exited", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


if __name__ == "__main__":
    main()
