"""Settings: every environment variable of the service, typed and validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from dotenv import dotenv_values

T = TypeVar("T")

MIB = 1024 * 1024
# S3 rejects parts below 5 MiB (except the last one); see CompleteMultipartUpload.
S3_MIN_PART_BYTES = 5 * MIB
# A presigned S3 URL (signature version 4) is valid for at most seven days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _int(name: str, value: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    return number


def _float(name: str, value: str, minimum: float = 0.0, *, inclusive: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number != number or number < minimum or (number == minimum and not inclusive):
        relation = ">=" if inclusive else ">"
        raise ConfigError(f"{name} must be {relation} {minimum}, got {value}")
    return number


def _choice(name: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value


def events_url_for(api_url: str) -> str:
    """Copernica's events exist only in v1: swap the version segment of the API URL."""
    replaced, count = re.subn(r"/v\d+$", "/v1", api_url)
    return replaced if count else api_url + "/v1"


# Each setting: (env name, default or None when required/optional, parser). The parser gets
# the variable name for its error message. Order is the order of the README's table.
_Parser = Callable[[str, str], Any]


def _secret(_name: str, value: str) -> Secret:
    return Secret(value)


def _text(_name: str, value: str) -> str:
    return value


def _prefix(_name: str, value: str) -> str:
    value = value.strip("/")
    return value + "/" if value else ""


def _sse(name: str, value: str) -> str:
    return _choice(name, value, ("AES256", "aws:kms"))


def _log_format(name: str, value: str) -> str:
    return _choice(name, value.lower(), ("auto", "json", "console"))


def _log_level(name: str, value: str) -> str:
    return _choice(name, value.lower(), ("debug", "info", "warning", "error"))


def _part_size(name: str, value: str) -> int:
    return _int(name, value, S3_MIN_PART_BYTES)


def _positive_int(name: str, value: str) -> int:
    return _int(name, value, 1)


def _non_negative_int(name: str, value: str) -> int:
    return _int(name, value, 0)


def _positive_float(name: str, value: str) -> float:
    return _float(name, value, 0.0)


def _non_negative_float(name: str, value: str) -> float:
    return _float(name, value, 0.0, inclusive=True)


def _link_seconds(name: str, value: str) -> int:
    seconds = _int(name, value, 1)
    if seconds > MAX_PRESIGN_SECONDS:
        raise ConfigError(f"{name} must be at most {MAX_PRESIGN_SECONDS} (S3's limit), got {value}")
    return seconds


def _signature_mode(name: str, value: str) -> str:
    return _choice(name, value.lower(), ("off", "verify-if-present", "require"))


def _event_loop(name: str, value: str) -> str:
    return _choice(name, value.lower(), ("uvloop", "asyncio"))


def _on_off(name: str, value: str) -> bool:
    return _choice(name, value.lower(), ("on", "off")) == "on"


def _names(_name: str, value: str) -> tuple[str, ...]:
    """A comma-separated list of names, blanks and repeats dropped, order kept."""
    return tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))


def _readable(name: str, value: str) -> str:
    if not Path(value).is_file():
        raise ConfigError(f"{name} must name a readable file, got {value!r}")
    return value


def _setting(env: str, parse: _Parser, default: str | None = None) -> Any:
    return field(default=None, metadata={"env": env, "parse": parse, "default": default})


@dataclass(frozen=True)
class Settings:
    """All configuration; build it with `Settings.from_env`."""

    copernica_access_token: Secret | None = _setting("COPERNICA_ACCESS_TOKEN", _secret)
    copernica_api_url: str = _setting("COPERNICA_API_URL", _url, "https://api.copernica.com/v2")
    copernica_events_url: str | None = _setting("COPERNICA_EVENTS_URL", _url)
    copernica_auth_url: str = _setting(
        "COPERNICA_AUTH_URL", _url, "https://authenticate.copernica.com"
    )
    public_base_url: str | None = _setting("PUBLIC_BASE_URL", _url)
    callback_secret: Secret | None = _setting("CALLBACK_SECRET", _secret)
    api_token: Secret | None = _setting("API_TOKEN", _secret)
    archive_bucket: str | None = _setting("ARCHIVE_BUCKET", _text)
    archive_prefix: str = _setting("ARCHIVE_PREFIX", _prefix, "copernica/")
    s3_endpoint_url: str | None = _setting("S3_ENDPOINT_URL", _url)
    archive_sse: str | None = _setting("ARCHIVE_SSE", _sse)
    archive_kms_key_id: str | None = _setting("ARCHIVE_KMS_KEY_ID", _text)
    host: str = _setting("HOST", _text, "0.0.0.0")  # noqa: S104 - a server listens on all
    port: int = _setting("PORT", _non_negative_int, "8080")
    admin_port: int = _setting("ADMIN_PORT", _non_negative_int, "9090")
    admin_host: str | None = _setting("ADMIN_HOST", _text)  # unset: HOST
    max_callback_bytes: int = _setting("MAX_CALLBACK_BYTES", _positive_int, str(1024 * MIB))
    poll_interval_seconds: float = _setting("POLL_INTERVAL_SECONDS", _positive_float, "300")
    request_expiry_hours: float = _setting("REQUEST_EXPIRY_HOURS", _positive_float, "168")
    copernica_max_rps: float = _setting("COPERNICA_MAX_RPS", _positive_float, "5")
    events_lookback_days: int = _setting("EVENTS_LOOKBACK_DAYS", _non_negative_int, "0")
    receiver_url: str = _setting("RECEIVER_URL", _url, "http://127.0.0.1:9090")
    package_link_seconds: int = _setting("PACKAGE_LINK_SECONDS", _link_seconds, "86400")
    retention_days: float = _setting("RETENTION_DAYS", _non_negative_float, "0")
    report_controller_name: str | None = _setting("REPORT_CONTROLLER_NAME", _text)
    # The article-15 texts (TOML); read and checked at start-up by service.answer.statement.
    controller_statement: str | None = _setting("CONTROLLER_STATEMENT", _readable)
    log_format: str = _setting("LOG_FORMAT", _log_format, "auto")
    log_level: str = _setting("LOG_LEVEL", _log_level, "info")
    # Beyond SPEC's table (documented in the README):
    s3_part_bytes: int = _setting("S3_PART_BYTES", _part_size, str(8 * MIB))
    max_json_token_bytes: int = _setting("MAX_JSON_TOKEN_BYTES", _positive_int, str(32 * MIB))
    copernica_timeout_seconds: float = _setting("COPERNICA_TIMEOUT_SECONDS", _positive_float, "30")
    s3_timeout_seconds: float = _setting("S3_TIMEOUT_SECONDS", _positive_float, "30")
    shutdown_grace_seconds: float = _setting("SHUTDOWN_GRACE_SECONDS", _positive_float, "30")
    shutdown_drain_seconds: float = _setting("SHUTDOWN_DRAIN_SECONDS", _non_negative_float, "5")
    poll_lease_seconds: float = _setting("POLL_LEASE_SECONDS", _positive_float, "600")
    callback_read_timeout_seconds: float = _setting(
        "CALLBACK_READ_TIMEOUT_SECONDS", _positive_float, "60"
    )
    signature_mode: str = _setting("SIGNATURE_MODE", _signature_mode, "verify-if-present")
    copernica_account_id: str | None = _setting("COPERNICA_ACCOUNT_ID", _text)
    signature_public_key_file: str | None = _setting("SIGNATURE_PUBLIC_KEY_FILE", _readable)
    signature_dns_server: str | None = _setting("SIGNATURE_DNS_SERVER", _text)
    signature_max_skew_seconds: float = _setting(
        "SIGNATURE_MAX_SKEW_SECONDS", _positive_float, "60"
    )
    event_loop: str = _setting("EVENT_LOOP", _event_loop, "uvloop")
    # Discovery (SPEC "Sources and discovery"): every profile and subprofile holding the address.
    discovery: bool = _setting("DISCOVERY", _on_off, "on")
    discovery_fields: tuple[str, ...] | None = _setting("DISCOVERY_FIELDS", _names)
    discovery_max_sources: int = _setting("DISCOVERY_MAX_SOURCES", _positive_int, "100")

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        dotenv: Path | None = Path(".env"),
        require: tuple[str, ...] = (),
    ) -> Settings:
        """Read, parse and validate; `require` names settings this command cannot lack."""
        merged: dict[str, str] = {}
        if dotenv is not None and dotenv.is_file():
            merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        merged.update(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            env, parse, default = f.metadata["env"], f.metadata["parse"], f.metadata["default"]
            raw = merged.get(env, "").strip()
            if raw:
                values[f.name] = parse(env, raw)
            elif default is not None:
                values[f.name] = parse(env, default)
            elif env in require:
                raise ConfigError(f"{env} is required")
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.archive_sse == "aws:kms" and not self.archive_kms_key_id:
            raise ConfigError("ARCHIVE_KMS_KEY_ID is required when ARCHIVE_SSE is aws:kms")
        if self.signature_mode == "require" and not self.copernica_account_id:
            raise ConfigError("COPERNICA_ACCOUNT_ID is required when SIGNATURE_MODE is require")
        if self.admin_port and self.admin_port == self.port:
            raise ConfigError(
                f"ADMIN_PORT must differ from PORT ({self.port}): the operator API must not "
                "be served on the public port"
            )
        if self.admin_host is None:
            object.__setattr__(self, "admin_host", self.host)
        if self.copernica_events_url is None:
            object.__setattr__(self, "copernica_events_url", events_url_for(self.copernica_api_url))

    def secrets(self) -> list[str]:
        """The secret values, so that the log pipeline can scrub them wherever they appear."""
        found = [
            s.reveal()
            for s in (self.copernica_access_token, self.callback_secret, self.api_token)
            if s is not None and s.reveal()
        ]
        return found


SERVE_REQUIRES = ("COPERNICA_ACCESS_TOKEN", "CALLBACK_SECRET", "API_TOKEN", "ARCHIVE_BUCKET")
CLIENT_REQUIRES = ("API_TOKEN",)
