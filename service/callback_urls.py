"""The callback address given to Copernica as `report`: the request id and a token (an HMAC
of it with CALLBACK_SECRET) in the path, so a callback is authenticated before its body is
read, identically on every replica that shares the secret. Used by the filing (to make the
address) and the callback route (to check it)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from .config import Secret

ULID_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
ROUTE = "/callbacks/datarequest/{request_id}/{token}"


def callback_token(secret: Secret, request_id: str) -> str:
    """URL-safe HMAC-SHA256 of the request id; identical on every replica sharing the secret."""
    mac = hmac.new(
        secret.reveal().encode(), b"datarequest-callback:" + request_id.encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def callback_url(public_base_url: str, secret: Secret, request_id: str) -> str:
    return (
        f"{public_base_url}/callbacks/datarequest/{request_id}/{callback_token(secret, request_id)}"
    )


def token_valid(secret: Secret, request_id: str, token: str) -> bool:
    if not ULID_PATTERN.match(request_id) or len(token) > 64:
        return False
    return hmac.compare_digest(callback_token(secret, request_id), token)
