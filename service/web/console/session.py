"""Console sign-in: HMAC-signed, expiring cookies and CSRF tokens bound to them.

Nothing is stored server-side, so any replica accepts a cookie another replica signed. The
signing key is derived from `API_TOKEN` with a purpose label: the token itself never leaves
the server, and rotating it signs everybody out. A cookie is `{id}.{expires}.{signature}`;
a form's CSRF token is an HMAC of the cookie's id, so it is worthless without the cookie
and the cookie is worthless to a cross-site form (`SameSite=Strict`, and no token).

The sign-in form is protected the same way by a short-lived pre-session cookie (`LOGIN`),
so that every form the console shows carries a CSRF token. Signing out deletes the cookie
in the browser; a copy taken before stays valid until it expires (`SESSION_SECONDS`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from service.config import Secret

SESSION_SECONDS = 8 * 3600  # a working day
LOGIN_SECONDS = 3600  # how long a sign-in form stays usable
COOKIE_PATH = "/ui/"


@dataclass(frozen=True)
class Kind:
    """One kind of signed cookie: its name, lifetime and the purpose its signature names."""

    cookie: str
    seconds: int
    purpose: bytes


SESSION = Kind("console_session", SESSION_SECONDS, b"session")
LOGIN = Kind("console_login", LOGIN_SECONDS, b"login")


@dataclass(frozen=True)
class Signed:
    """A valid cookie: its id and the CSRF token forms sent with it must carry."""

    kind: Kind
    id: str
    expires: int
    csrf: str


class Sessions:
    """Issues and checks the console's cookies and CSRF tokens (constant-time compares)."""

    def __init__(self, api_token: Secret, clock: Callable[[], float] = time.time) -> None:
        token = api_token.reveal().encode()
        self._key = hmac.new(token, b"copernica-receiver console v1", hashlib.sha256).digest()
        # Compare digests, not the token: equal lengths, so the compare leaks nothing.
        self._token_digest = self._mac(b"token", token)
        self._clock = clock

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(self._mac(b"token", given.encode()), self._token_digest)

    def issue(self, kind: Kind) -> tuple[str, Signed]:
        """A new cookie value of `kind` and what it stands for."""
        cookie_id = secrets.token_urlsafe(18)
        expires = int(self._clock()) + kind.seconds
        value = f"{cookie_id}.{expires}.{self._signature(kind, cookie_id, expires)}"
        return value, self._signed(kind, cookie_id, expires)

    def read(self, kind: Kind, value: str | None) -> Signed | None:
        """The cookie's meaning if its signature holds and it has not expired; else None."""
        if not value or len(value) > 200:
            return None
        parts = value.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        cookie_id, expires_text, signature = parts
        expected = self._signature(kind, cookie_id, int(expires_text))
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        if int(expires_text) <= self._clock():
            return None
        return self._signed(kind, cookie_id, int(expires_text))

    def csrf_ok(self, signed: Signed, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given.encode(), signed.csrf.encode())

    def _signed(self, kind: Kind, cookie_id: str, expires: int) -> Signed:
        csrf = _text(self._mac(b"csrf:" + kind.purpose, cookie_id.encode()))
        return Signed(kind, cookie_id, expires, csrf)

    def _signature(self, kind: Kind, cookie_id: str, expires: int) -> str:
        return _text(self._mac(kind.purpose, f"{cookie_id}.{expires}".encode()))

    def _mac(self, purpose: bytes, message: bytes) -> bytes:
        return hmac.new(self._key, purpose + b"\x00" + message, hashlib.sha256).digest()


def _text(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def set_cookie(response: web.StreamResponse, request: web.Request, kind: Kind, value: str) -> None:
    """HttpOnly, SameSite=Strict, limited to the console's paths; Secure when the request
    came over https (behind a TLS-terminating proxy, aiohttp must be told the scheme)."""
    response.set_cookie(
        kind.cookie,
        value,
        max_age=kind.seconds,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def delete_cookie(response: web.StreamResponse, kind: Kind) -> None:
    response.del_cookie(kind.cookie, path=COOKIE_PATH)
