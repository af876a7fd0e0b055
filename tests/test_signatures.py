"""Copernica's HTTP signatures on callbacks, with keys generated here: from a PEM file and from
a DKIM-style DNS TXT record served by a loopback DNS server."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import Bucket, Service, ServiceFactory, Simulator
from tests.test_callbacks import archive_key, payload, pending_request

ACCOUNT = "4711"
KEY_ID = "webhooks.copernica.com"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signed_headers(
    key: rsa.RSAPrivateKey,
    service: Service,
    path: str,
    body: bytes,
    *,
    account: str = ACCOUNT,
    skew: float = 0,
    nonce: str | None = None,
    digest: str = "SHA-256",
    key_id: str = KEY_ID,
    covered: str = "(request-target) host date x-copernica-id digest x-nonce",
) -> dict[str, str]:
    algorithm = {"SHA-256": "sha256", "sha-512": "sha512"}[digest]
    headers = {
        "host": service.url.removeprefix("http://"),
        "date": email.utils.formatdate(time.time() + skew, usegmt=True),
        "x-copernica-id": account,
        "digest": f"{digest}={base64.b64encode(hashlib.new(algorithm, body).digest()).decode()}",
        "x-nonce": nonce or secrets.token_hex(8),
    }
    text = "\n".join(
        f"(request-target): post {path}"
        if name == "(request-target)"
        else f"{name}: {headers[name]}"
        for name in covered.split()
    )
    signature = base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256()))
    headers["signature"] = (
        f'keyId="{key_id}",algorithm="rsa-sha256",headers="{covered}",'
        f'signature="{signature.decode()}"'
    )
    return {k.title(): v for k, v in headers.items() if k != "host"}


def pem(key: rsa.RSAPrivateKey, tmp_path: Path) -> str:
    path = tmp_path / "copernica.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return str(path)


async def send(service: Service, request_id: str, body: bytes, headers: dict[str, str]) -> int:
    url = service.callback_url(request_id)
    async with service.http.post(url, data=body, headers=headers) as answer:
        return answer.status


def path_of(service: Service, request_id: str) -> str:
    return service.callback_url(request_id).removeprefix(service.url)


@pytest.fixture
def key() -> rsa.RSAPrivateKey:
    return new_key()


async def test_signed_callback_is_archived_and_every_broken_rule_is_401(
    make_service: ServiceFactory,
    simulator: Simulator,
    store: Bucket,
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    service = await make_service(
        SIGNATURE_MODE="require",
        COPERNICA_ACCOUNT_ID=ACCOUNT,
        SIGNATURE_PUBLIC_KEY_FILE=pem(key, tmp_path),
    )
    request_id = await pending_request(service, simulator)
    body, path = payload(), path_of(service, request_id)

    refused = {
        "unsigned": {},
        "other key": signed_headers(new_key(), service, path, body),
        "old date": signed_headers(key, service, path, body, skew=-120),
        "future date": signed_headers(key, service, path, body, skew=120),
        "other account": signed_headers(key, service, path, body, account="999"),
        "foreign keyId": signed_headers(key, service, path, body, key_id="evil.example.com"),
        "nonce not covered": signed_headers(
            key, service, path, body, covered="host date x-copernica-id digest"
        ),
        "body changed": signed_headers(key, service, path, body + b" "),
    }
    for case, headers in refused.items():
        assert await send(service, request_id, body, headers) == 401, case
    assert await store.keys("archive/") == []

    replayed = signed_headers(key, service, path, body)
    assert await send(service, request_id, body, replayed) == 200
    assert await send(service, request_id, body, replayed) == 401  # the nonce again
    assert await store.read(archive_key(request_id)) == body


async def test_sha512_digest_and_verify_if_present(
    make_service: ServiceFactory, simulator: Simulator, key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    service = await make_service(
        COPERNICA_ACCOUNT_ID=ACCOUNT, SIGNATURE_PUBLIC_KEY_FILE=pem(key, tmp_path)
    )
    first = await pending_request(service, simulator)
    second = await pending_request(service, simulator)
    body = payload()
    headers = signed_headers(key, service, path_of(service, first), body, digest="sha-512")
    assert await send(service, first, body, headers) == 200
    assert await send(service, second, body, {}) == 200  # unsigned: the URL token suffices
    forged = signed_headers(new_key(), service, path_of(service, second), body)
    assert await send(service, second, body, forged) == 401  # present, so it must verify


class TxtServer(asyncio.DatagramProtocol):
    """A loopback DNS server answering TXT queries from a dict (name -> DKIM text)."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.queries = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        answer = dns.message.make_response(query)
        name = query.question[0].name.to_text().rstrip(".")
        self.queries += 1
        if name in self.records:
            text = self.records[name]
            chunks = " ".join(f'"{text[i : i + 250]}"' for i in range(0, len(text), 250))
            answer.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "TXT", chunks))
        self.transport.sendto(answer.to_wire(), addr)


def dkim(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@pytest.fixture
async def dns_server() -> AsyncIterator[tuple[TxtServer, int]]:
    server = TxtServer({})
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0)
    )
    yield server, transport.get_extra_info("sockname")[1]
    transport.close()


async def test_key_from_dns_is_cached_and_refreshed_on_rotation(
    make_service: ServiceFactory,
    simulator: Simulator,
    key: rsa.RSAPrivateKey,
    dns_server: tuple[TxtServer, int],
) -> None:
    server, port = dns_server
    server.records[KEY_ID] = dkim(key)
    service = await make_service(
        SIGNATURE_MODE="require",
        COPERNICA_ACCOUNT_ID=ACCOUNT,
        SIGNATURE_DNS_SERVER=f"127.0.0.1:{port}",
    )
    ids = [await pending_request(service, simulator) for _ in range(3)]
    body = payload()

    for request_id in ids[:2]:
        headers = signed_headers(key, service, path_of(service, request_id), body)
        assert await send(service, request_id, body, headers) == 200
    assert server.queries == 1  # cached

    rotated = new_key()
    server.records[KEY_ID] = dkim(rotated)
    headers = signed_headers(rotated, service, path_of(service, ids[2]), body)
    assert await send(service, ids[2], body, headers) == 200
    assert server.queries == 2
