"""Structured logging: structlog configured once, JSON in production, secrets scrubbed."""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from service.config import Settings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Scrub:
    """Replace every configured secret in any string value by `***` (last line of defence)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = [s for s in secrets if len(s) >= 4]

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                for secret in self._secrets:
                    if secret in value:
                        value = value.replace(secret, "***")
                event[key] = value
        return event


def configure_logging(settings: Settings, stream: Any = None) -> None:
    """Set up structlog for the whole process; call once, at start-up.

    Our own lines go straight through structlog's processors (no stdlib logging on the hot
    path). Lines of the standard library's loggers (aiohttp, botocore, asyncio) go through
    structlog's ProcessorFormatter: the same format, the same scrubber, and the request id
    bound in the context (`structlog.contextvars`) by the callback, API call or poll visit
    they were written in.
    """
    stream = stream or sys.stdout
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    scrub = _Scrub(settings.secrets())
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, scrub, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                scrub,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(_LEVELS[settings.log_level], logging.INFO))
    # botocore's own INFO lines are per call ("Found credentials ..."): warnings only.
    logging.getLogger("botocore").setLevel(logging.WARNING)


def subject_digest(key: bytes, subject_type: str, subject_id: str) -> str:
    """A keyed hash of a data subject (e-mail addresses compared case-insensitively)."""
    normal = subject_id.strip().casefold() if subject_type == "email" else subject_id.strip()
    return hmac.new(key, f"{subject_type}:{normal}".encode(), hashlib.sha256).hexdigest()


def subject_hash(key: bytes, subject_type: str, subject_id: str) -> str:
    """The short keyed hash logs and metrics may carry, never the address."""
    return subject_digest(key, subject_type, subject_id)[:16]
