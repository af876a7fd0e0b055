"""Copernica's webhook signatures (draft-cavage HTTP Signatures v10), checked as Copernica's
own verifier library (copernica/webhook-security) does.

Rules relied on (SPEC, "Upstream API facts"): a `Signature` header
`keyId="...",algorithm="rsa-sha256",headers="...",signature="<base64>"` (or `rsa-sha512`:
Copernica's Signer hands the algorithm to `openssl_sign`, its Verifier verifies with the hash
after the dash, so both are PKCS#1 v1.5 with that hash); the signature must
cover host, date, digest, x-nonce and x-copernica-id; the signing string is the lower-cased
header names with trimmed values, `name: value`, joined by "\\n" (`(request-target)` is
`post /path`); `Date` at most 60 s off; `X-Copernica-Id` equal to our account id; keyId ends
in `.copernica.com` and names a DNS TXT record in DKIM form `v=DKIM1; k=rsa; p=<base64 DER>`;
a `Digest` header (`SHA-256=<base64>`, also sha-512/sha/md5; name case-insensitive) matching
the body. Whether data-request callbacks are signed is not documented: the per-request HMAC
in the URL stays the primary check, and a signature is verified when present (`require`
makes it mandatory). A nonce is spent only by a callback answered 200: Copernica retries a
delivery that got 503 with the same signed headers, and that retry must be archived.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

REQUIRED_HEADERS = {"host", "date", "digest", "x-nonce", "x-copernica-id"}
# `algorithm` -> the hash of its PKCS#1 v1.5 signature: the two Copernica's Signer makes.
ALGORITHMS: dict[str, type[hashes.HashAlgorithm]] = {
    "rsa-sha256": hashes.SHA256,
    "rsa-sha512": hashes.SHA512,
}
DIGESTS = {"sha-256": "sha256", "sha-512": "sha512", "sha": "sha1", "md5": "md5"}
_PARAM = re.compile(r'(\w+)="([^"]*)"')


class SignatureInvalid(Exception):
    """The request's signature is missing (when required), malformed or wrong; the message
    says which rule failed and never includes the signature itself."""


@dataclass(frozen=True)
class BodyDigest:
    """What the body must hash to, checked once it has streamed through."""

    algorithm: str  # hashlib name
    expected: bytes

    def new(self) -> Any:
        return hashlib.new(self.algorithm)


@dataclass(frozen=True)
class Signed:
    """A request whose signature verified: what its body must hash to, and the nonce it
    spends once it is answered 200 (`SignatureVerifier.spend`)."""

    digest: BodyDigest
    nonce: str


class KeyStore:
    """Public keys by keyId: a configured PEM file, or the DNS TXT record the keyId names
    (cached for an hour, fetched again at once when a signature fails: keys rotate)."""

    TTL = 3600.0

    def __init__(self, pem_file: str | None, nameserver: str | None = None) -> None:
        self._pem = (
            serialization.load_pem_public_key(Path(pem_file).read_bytes()) if pem_file else None
        )
        self._resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
        if nameserver:
            host, _, port = nameserver.rpartition(":")
            self._resolver.nameservers = [host or nameserver]
            self._resolver.port = int(port) if host else 53
        self._cache: dict[str, tuple[float, Any]] = {}

    async def key(self, key_id: str, *, fresh: bool = False) -> rsa.RSAPublicKey:
        if self._pem is not None:
            assert isinstance(self._pem, rsa.RSAPublicKey)
            return self._pem
        cached = self._cache.get(key_id)
        if cached and not fresh and time.monotonic() - cached[0] < self.TTL:
            return cached[1]
        try:
            answer = await self._resolver.resolve(key_id, "TXT", lifetime=5)
        except dns.exception.DNSException as exc:
            raise SignatureInvalid(
                f"no public key in DNS for keyId: {type(exc).__name__}"
            ) from None
        text = "".join(b"".join(record.strings).decode("ascii", "replace") for record in answer)
        found = parse_dkim(text)
        self._cache[key_id] = (time.monotonic(), found)
        return found


def parse_dkim(text: str) -> rsa.RSAPublicKey:
    """`v=DKIM1; k=rsa; p=<base64 DER>` to an RSA public key."""
    fields = dict(part.strip().split("=", 1) for part in text.split(";") if "=" in part)
    if fields.get("k", "rsa").strip() != "rsa" or not fields.get("p"):
        raise SignatureInvalid("DNS record is not a DKIM RSA key")
    try:
        key = serialization.load_der_public_key(base64.b64decode("".join(fields["p"].split())))
    except (ValueError, binascii.Error):
        raise SignatureInvalid("DNS record holds no valid key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise SignatureInvalid("DNS record is not an RSA key")
    return key


class NonceCache:
    """Nonces spent within the allowed clock skew, per replica: a replay is refused.

    Looking a nonce up and spending it are two steps: a request is checked when it arrives
    but spends its nonce only once it is answered 200, so Copernica's retry of a delivery
    that got 503 (same signed headers, same nonce) is taken. Two deliveries with one nonce
    under way at once may both pass the look-up; the archive's conditional write makes the
    second a duplicate, so the data is still stored once.
    """

    def __init__(self, ttl: float, size: int = 100_000) -> None:
        self._ttl = ttl
        self._size = size
        self._seen: OrderedDict[str, float] = OrderedDict()  # oldest spend first

    def _forget_expired(self, now: float) -> None:
        while self._seen and next(iter(self._seen.values())) < now - self._ttl:
            self._seen.popitem(last=False)

    def spent(self, nonce: str) -> bool:
        self._forget_expired(time.monotonic())
        return nonce in self._seen

    def spend(self, nonce: str) -> None:
        now = time.monotonic()
        self._forget_expired(now)
        self._seen[nonce] = now
        self._seen.move_to_end(nonce)  # spent again (two at once): remembered from now
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)


class SignatureVerifier:
    """Checks the headers of one request; returns what its body must hash to and the nonce
    it will spend, or None when there is no signature to check (and none is required)."""

    def __init__(self, mode: str, account_id: str | None, keys: KeyStore, max_skew: float) -> None:
        self.mode = mode
        self._account = account_id
        self._keys = keys
        self._skew = max_skew
        self._nonces = NonceCache(2 * max_skew)

    async def check(self, method: str, path_qs: str, headers: Mapping[str, str]) -> Signed | None:
        header = headers.get("Signature")
        if self.mode == "off" or (header is None and self.mode != "require"):
            return None
        if self._account is None and self.mode != "require":
            return None  # not configured (no COPERNICA_ACCOUNT_ID): nothing to check against
        if header is None:
            raise SignatureInvalid("signature required")
        params = dict(_PARAM.findall(header))
        algorithm = ALGORITHMS.get(params.get("algorithm", "").lower())
        if algorithm is None:
            raise SignatureInvalid(f"algorithm must be one of {', '.join(ALGORITHMS)}")
        key_id = params.get("keyId", "")
        if not key_id.endswith(".copernica.com"):
            raise SignatureInvalid("keyId must end in .copernica.com")
        signed = params.get("headers", "date").lower().split()
        if not set(signed) >= REQUIRED_HEADERS:
            missing = ", ".join(sorted(REQUIRED_HEADERS - set(signed)))
            raise SignatureInvalid(f"signature does not cover: {missing}")
        lower = {k.lower(): v for k, v in headers.items()}
        self._check_date(lower.get("date", ""))
        if self._account is None or lower.get("x-copernica-id", "").strip() != self._account:
            raise SignatureInvalid("X-Copernica-Id is not our account")
        digest = _body_digest(lower.get("digest", ""))
        text = "\n".join(
            f"(request-target): {method.lower()} {path_qs}"
            if name == "(request-target)"
            else f"{name}: {lower.get(name, '').strip()}"
            for name in signed
        ).encode()
        try:
            signature = base64.b64decode(params.get("signature", ""), validate=True)
        except (ValueError, binascii.Error):
            raise SignatureInvalid("signature is not base64") from None
        if not await self._verified(key_id, signature, text, algorithm()):
            raise SignatureInvalid("signature does not verify")
        nonce = lower.get("x-nonce", "")
        if self._nonces.spent(nonce):
            raise SignatureInvalid("nonce seen before (replay)")
        return Signed(digest, nonce)

    def spend(self, signed: Signed) -> None:
        """The request was answered 200: its nonce may not be used again."""
        self._nonces.spend(signed.nonce)

    def _check_date(self, value: str) -> None:
        try:
            moment = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            raise SignatureInvalid("Date header missing or malformed") from None
        if abs(time.time() - moment) > self._skew:
            raise SignatureInvalid(f"Date is more than {self._skew:.0f} s off")

    async def _verified(
        self, key_id: str, signature: bytes, text: bytes, algorithm: hashes.HashAlgorithm
    ) -> bool:
        for fresh in (False, True):  # a failure may mean a rotated key: fetch it once more
            key = await self._keys.key(key_id, fresh=fresh)
            try:
                key.verify(signature, text, padding.PKCS1v15(), algorithm)
                return True
            except InvalidSignature:
                continue
        return False


def _body_digest(value: str) -> BodyDigest:
    """`SHA-256=<base64>` (name case-insensitive; several may be listed, one must be known)."""
    for part in value.split(","):
        name, _, encoded = part.strip().partition("=")
        algorithm = DIGESTS.get(name.strip().lower())
        if algorithm:
            try:
                return BodyDigest(algorithm, base64.b64decode(encoded, validate=True))
            except (ValueError, binascii.Error):
                break
    raise SignatureInvalid("Digest header missing or not SHA-256/SHA-512/SHA/MD5")
