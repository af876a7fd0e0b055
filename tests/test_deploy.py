"""deploy/: the manifests parse, point their probes at routes that exist, agree on ports, give
shutdown enough time, keep secrets in the Secret, and name only settings the service knows."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from service.app import create_app, create_public_app
from service.config import Settings
from tests.conftest import make_settings

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


def test_compose_runs_two_replicas_behind_nginx_with_minio() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"receiver-1", "receiver-2", "nginx", "minio", "minio-bucket"} <= set(services)
    for name in ("receiver-1", "receiver-2"):
        env = services[name]["environment"]
        assert set(env) <= KNOWN
        assert env["S3_ENDPOINT_URL"].startswith("http://minio:")
        assert env["ADMIN_PORT"] != env["PORT"]
        # Operators reach the admin port on the host's loopback only.
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])
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
