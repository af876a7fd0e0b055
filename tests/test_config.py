"""Settings: validated once, errors name the variable, secrets never shown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.config import SERVE_REQUIRES, ConfigError, Settings

BASE = {
    "COPERNICA_ACCESS_TOKEN": "tok-secret-value",
    "CALLBACK_SECRET": "cb-secret-value",
    "API_TOKEN": "api-secret-value",
    "ARCHIVE_BUCKET": "bucket",
}


def load(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env}, dotenv=None, require=SERVE_REQUIRES)


def test_defaults_match_the_spec() -> None:
    s = load()
    assert s.copernica_api_url == "https://api.copernica.com/v2"
    assert s.copernica_events_url == "https://api.copernica.com/v1"
    assert s.archive_prefix == "copernica/"
    assert (s.host, s.port) == ("0.0.0.0", 8080)
    assert s.max_callback_bytes == 1073741824
    assert s.poll_interval_seconds == 300
    assert s.request_expiry_hours == 168
    assert s.copernica_max_rps == 5
    assert s.events_lookback_days == 0
    assert s.receiver_url == "http://127.0.0.1:9090"
    assert (s.admin_host, s.admin_port) == ("0.0.0.0", 9090)
    assert (s.log_format, s.log_level) == ("auto", "info")
    assert s.public_base_url is None
    assert s.package_link_seconds == 86400
    assert s.retention_days == 0
    assert s.report_controller_name is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ADMIN_PORT": "8080"}, "ADMIN_PORT must differ from PORT"),
        ({"PACKAGE_LINK_SECONDS": "604801"}, "PACKAGE_LINK_SECONDS must be at most 604800"),
        ({"PACKAGE_LINK_SECONDS": "0"}, "PACKAGE_LINK_SECONDS must be >= 1"),
        ({"RETENTION_DAYS": "-1"}, "RETENTION_DAYS must be >= 0"),
        ({"RETENTION_DAYS": "a week"}, "RETENTION_DAYS must be a number"),
    ],
)
def test_answering_settings_are_checked(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(**env)


def test_retention_days_takes_fractions_and_admin_host_its_own_value() -> None:
    s = load(RETENTION_DAYS="0.5", HOST="0.0.0.0", ADMIN_HOST="127.0.0.1")
    assert s.retention_days == 0.5
    assert (s.host, s.admin_host) == ("0.0.0.0", "127.0.0.1")


def test_events_url_follows_the_api_version() -> None:
    assert load(COPERNICA_API_URL="https://x.test/v3/").copernica_events_url == "https://x.test/v1"


@pytest.mark.parametrize("missing", SERVE_REQUIRES)
def test_missing_required_setting_is_named(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is required$"):
        Settings.from_env(env, dotenv=None, require=SERVE_REQUIRES)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("MAX_CALLBACK_BYTES", "0"),
        ("POLL_INTERVAL_SECONDS", "-1"),
        ("COPERNICA_API_URL", "ftp://x"),
        ("PUBLIC_BASE_URL", "not a url"),
        ("ARCHIVE_SSE", "rot13"),
        ("LOG_FORMAT", "xml"),
        ("S3_PART_BYTES", "1024"),
        ("EVENT_LOOP", "trio"),
    ],
)
def test_malformed_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name} "):
        load(**{name: value})


def test_kms_needs_a_key_id() -> None:
    with pytest.raises(ConfigError, match="ARCHIVE_KMS_KEY_ID"):
        load(ARCHIVE_SSE="aws:kms")


def test_secrets_are_redacted_in_repr() -> None:
    text = repr(load())
    for secret in ("tok-secret-value", "cb-secret-value", "api-secret-value"):
        assert secret not in text
    assert "***" in text


def test_serve_stops_with_one_line_naming_the_setting(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", **{k: v for k, v in BASE.items() if k != "API_TOKEN"}}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["configuration error: API_TOKEN is required"]
