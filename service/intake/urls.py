"""The callback address given to Copernica as `report`, made by the filing and checked by the
callback route, identically on every replica that shares CALLBACK_SECRET.

`/callbacks/datarequest/{id}/{subject}/{token}`: the request id, the keyed digest of the
subject (an HMAC, never the address) and a token authenticating both. The token is checked
before the body is read, and the body's `info` against the digest, so accepting a callback
needs no read of the request record. The earlier form `/callbacks/datarequest/{id}/{token}`
(token of the id alone) stays valid for requests filed with it; its subject check reads the
record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from service.config import Secret

ULID_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")
ROUTE = "/callbacks/datarequest/{request_id}/{subject}/{token}"
ROUTE_BY_ID = "/callbacks/datarequest/{request_id}/{token}"  # the earlier form


# A URL's token also says whose data it brings: the filed subject's (`FIRST`, whose archive is
# `archive/{yyyy}/{mm}/{dd}/{id}.json`) or a source found by discovery (`SOURCE`, archived under
# `sources/{id}/{digest}/data.json`). The role is authenticated with the rest, so the callback
# route knows the archive key from the URL alone, with no record read.
FIRST, SOURCE = "first", "source"
_LABELS = {FIRST: b"datarequest-callback:", SOURCE: b"datarequest-source:"}


def callback_token(
    secret: Secret, request_id: str, subject: str | None = None, role: str = FIRST
) -> str:
    """URL-safe HMAC-SHA256 of the request id (and the subject's digest, if given)."""
    assert subject is not None or role == FIRST, "a source's URL always names its subject"
    message = _LABELS[role] + request_id.encode()
    if subject is not None:
        message += b":" + subject.encode()
    mac = hmac.new(secret.reveal().encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def callback_url(
    public_base_url: str,
    secret: Secret,
    request_id: str,
    subject: str | None = None,
    role: str = FIRST,
) -> str:
    """The `report` address; without `subject` (a keyed digest) the earlier form."""
    token = callback_token(secret, request_id, subject, role)
    middle = f"{subject}/" if subject is not None else ""
    return f"{public_base_url}/callbacks/datarequest/{request_id}/{middle}{token}"


def token_role(
    secret: Secret, request_id: str, token: str, subject: str | None = None
) -> str | None:
    """`FIRST` or `SOURCE` for a valid token (which data the URL brings); None otherwise."""
    if not ULID_PATTERN.match(request_id) or len(token) > 64:
        return None
    if subject is None:
        valid = hmac.compare_digest(callback_token(secret, request_id), token)
        return FIRST if valid else None
    if not DIGEST_PATTERN.match(subject):
        return None
    for role in (FIRST, SOURCE):
        if hmac.compare_digest(callback_token(secret, request_id, subject, role), token):
            return role
    return None


def token_valid(secret: Secret, request_id: str, token: str, subject: str | None = None) -> bool:
    return token_role(secret, request_id, token, subject) is not None
