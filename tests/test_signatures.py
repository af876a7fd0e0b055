"""Copernica's HTTP signatures on callbacks, with keys generated here: from a PEM file and from
a DKIM-style DNS TXT record served by a loopback DNS server; and the simulator signing its own
callbacks as Copernica does, end to end."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from service.simulator.app import SIM_STATE, SimulatorConfig, create_simulator_app
from tests.conftest import (
    ACCESS_TOKEN,
    Bucket,
    Service,
    ServiceFactory,
    Simulator,
    TcpProxy,
)
from tests.support import (
    EMAIL,
    archive_key,
    eventually,
    file_request,
    payload,
    pending_request,
)

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
    algorithm: str = "rsa-sha256",
) -> dict[str, str]:
    """Headers as Copernica's Signer makes them: it hands `algorithm` to openssl_sign, so
    rsa-sha512 is PKCS#1 v1.5 over SHA-512 (other names are only sent, never made here)."""
    hashed = {"SHA-256": "sha256", "sha-512": "sha512"}[digest]
    headers = {
        "host": service.url.removeprefix("http://"),
        "date": email.utils.formatdate(time.time() + skew, usegmt=True),
        "x-copernica-id": account,
        "digest": f"{digest}={base64.b64encode(hashlib.new(hashed, body).digest()).decode()}",
        "x-nonce": nonce or secrets.token_hex(8),
    }
    text = "\n".join(
        f"(request-target): post {path}"
        if name == "(request-target)"
        else f"{name}: {headers[name]}"
        for name in covered.split()
    )
    how = hashes.SHA512() if algorithm == "rsa-sha512" else hashes.SHA256()
    signature = base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), how))
    headers["signature"] = (
        f'keyId="{key_id}",algorithm="{algorithm}",headers="{covered}",'
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


def signing(key: rsa.RSAPrivateKey, tmp_path: Path) -> dict[str, str]:
    """The service's settings for signed callbacks only, with `key`'s public half."""
    return {
        "SIGNATURE_MODE": "require",
        "COPERNICA_ACCOUNT_ID": ACCOUNT,
        "SIGNATURE_PUBLIC_KEY_FILE": pem(key, tmp_path),
    }


async def answer_to(
    service: Service, request_id: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str]:
    url = service.callback_url(request_id)
    async with service.http.post(url, data=body, headers=headers) as answer:
        return answer.status, await answer.text()


async def send(service: Service, request_id: str, body: bytes, headers: dict[str, str]) -> int:
    return (await answer_to(service, request_id, body, headers))[0]


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


# -- a nonce is spent only by a 200; rsa-sha512 --------------------------------------------


async def test_a_signed_callback_answered_503_is_archived_when_retried_with_the_same_headers(
    make_service: ServiceFactory,
    simulator: Simulator,
    store: Bucket,
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
    s3_proxy: TcpProxy,
) -> None:
    service = await make_service(
        S3_ENDPOINT_URL=s3_proxy.url, S3_TIMEOUT_SECONDS="2", **signing(key, tmp_path)
    )
    request_id = await pending_request(service, simulator)
    body = payload()
    headers = signed_headers(key, service, path_of(service, request_id), body)
    s3_proxy.down()
    assert await send(service, request_id, body, headers) == 503
    s3_proxy.up()

    # Copernica's retry: the very same signed headers, nonce included.
    assert await send(service, request_id, body, headers) == 200
    assert await store.read(archive_key(request_id)) == body
    status, reason = await answer_to(service, request_id, body, headers)
    assert (status, "nonce seen before" in reason) == (401, True)  # a replay of a 200


async def test_concurrent_deliveries_with_one_nonce_archive_one_object(
    make_service: ServiceFactory,
    simulator: Simulator,
    store: Bucket,
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    service = await make_service(**signing(key, tmp_path))
    request_id = await pending_request(service, simulator)
    body = payload()
    headers = signed_headers(key, service, path_of(service, request_id), body)

    statuses = await asyncio.gather(*(send(service, request_id, body, headers) for _ in range(4)))

    assert 200 in statuses and set(statuses) <= {200, 401}
    assert await store.keys("archive/") == [archive_key(request_id)]
    assert await store.read(archive_key(request_id)) == body
    assert await send(service, request_id, body, headers) == 401


async def test_rsa_sha512_is_accepted_and_an_unknown_algorithm_refused(
    make_service: ServiceFactory,
    simulator: Simulator,
    store: Bucket,
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    service = await make_service(**signing(key, tmp_path))
    request_id = await pending_request(service, simulator)
    body, path = payload(), path_of(service, request_id)

    headers = signed_headers(key, service, path, body, algorithm="rsa-sha512")
    assert await send(service, request_id, body, headers) == 200
    assert await store.read(archive_key(request_id)) == body

    for algorithm in ("rsa-sha1", "hmac-sha256", "hs2019", "ed25519"):
        headers = signed_headers(key, service, path, body, algorithm=algorithm)
        status, reason = await answer_to(service, request_id, body, headers)
        assert status == 401, algorithm
        assert "algorithm must be one of rsa-sha256, rsa-sha512" in reason, algorithm


# -- the simulator signs its callbacks as Copernica does -------------------------------------


@dataclass
class Relay:
    """A man in the middle between the simulator and the service: passes each callback on
    with its headers as received (Host included, as a proxy keeping the Host does), and can
    alter one byte of a body or hold a delivery back until the test releases it."""

    target: str = ""  # the service's base URL
    url: str = ""
    tamper: bool = False
    holds: dict[int, asyncio.Event] = field(default_factory=dict)  # by delivery, from 0
    received: list[dict[str, str]] = field(default_factory=list)
    answers: list[tuple[int, str]] = field(default_factory=list)  # status, body


@pytest.fixture
async def relay(aiohttp_server: Any) -> AsyncIterator[Relay]:
    got = Relay()
    async with aiohttp.ClientSession() as http:

        async def forward(request: web.Request) -> web.Response:
            delivery = len(got.received)
            got.received.append(dict(request.headers))
            body = await request.read()
            if delivery in got.holds:
                await got.holds[delivery].wait()
            if got.tamper:
                body = body.replace(b"Weekly offers", b"Weekly 0ffers", 1)  # still valid JSON
            headers = {
                k: v
                for k, v in request.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            async with http.post(
                got.target + request.path_qs, data=body, headers=headers
            ) as answer:
                got.answers.append((answer.status, await answer.text()))
                return web.Response(status=answer.status)

        app = web.Application()
        app.router.add_post("/{tail:.*}", forward)
        server = await aiohttp_server(app, host="127.0.0.1")
        got.url = str(server.make_url("")).rstrip("/")
        yield got


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
async def signing_simulator(aiohttp_server: Any, key: rsa.RSAPrivateKey) -> Simulator:
    """The simulator with a sign key and our account id; it delivers when told to."""
    config = SimulatorConfig(
        access_token=ACCESS_TOKEN,
        ready_after=3600,
        sign_key=private_pem(key),
        account_id=ACCOUNT,
        delivery_retry_delay=0.0,
        control=True,
    )
    app = create_simulator_app(config)
    server = await aiohttp_server(app, host="127.0.0.1")
    return Simulator(str(server.make_url("")).rstrip("/"), app[SIM_STATE], app)


async def deliver_now(service: Service, simulator: Simulator, copernica_id: str) -> None:
    url = f"{simulator.url}/_sim/requests/{copernica_id}/deliver"
    async with service.http.post(url) as answer:
        assert answer.status == 200


async def answers(relay: Relay, count: int) -> list[tuple[int, str]]:
    async def probe() -> list[tuple[int, str]]:
        return list(relay.answers)

    return await eventually(probe, lambda found: len(found) >= count, what=f"{count} answers")


async def test_the_simulators_signed_callback_is_archived_and_a_tampered_or_foreign_one_refused(
    make_service: ServiceFactory,
    signing_simulator: Simulator,
    relay: Relay,
    store: Bucket,
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    service = await make_service(
        COPERNICA_API_URL=signing_simulator.url + "/v2",
        PUBLIC_BASE_URL=relay.url,
        **signing(key, tmp_path),
    )
    relay.target = service.url
    filed = await file_request(service.http, service.admin_url, {"email": EMAIL})
    request_id, copernica_id = filed["id"], filed["copernica_id"]

    relay.tamper = True
    await deliver_now(service, signing_simulator, copernica_id)
    tampered = (await answers(relay, 1))[0]
    relay.tamper = False
    signing_simulator.state.config.account_id = "999"
    await deliver_now(service, signing_simulator, copernica_id)
    foreign = (await answers(relay, 2))[1]
    signing_simulator.state.config.account_id = ACCOUNT
    await deliver_now(service, signing_simulator, copernica_id)
    genuine = (await answers(relay, 3))[2]

    assert tampered[0] == 401 and "Digest" in tampered[1]
    assert foreign[0] == 401 and "X-Copernica-Id" in foreign[1]
    assert genuine[0] == 200
    sent = relay.received[2]
    assert sent["Signature"].startswith(
        'keyId="one._domainkey.copernica.com",algorithm="rsa-sha256",'
        'headers="(request-target) host date digest x-nonce x-copernica-id",signature="'
    )
    assert sent["X-Copernica-Id"] == ACCOUNT
    assert sent["Digest"].startswith("sha-256=")  # lower case, as Copernica's verifier needs
    assert len({headers["X-Nonce"] for headers in relay.received}) == 3  # new per delivery
    archived = signing_simulator.state.payload_bytes(copernica_id)
    assert await store.read(archive_key(request_id)) == archived
    assert (await store.head(archive_key(request_id)))["Metadata"]["source"] == "callback"


async def test_the_simulator_retries_a_503_with_the_same_signed_headers_and_it_is_archived(
    make_service: ServiceFactory,
    signing_simulator: Simulator,
    relay: Relay,
    store: Bucket,
    key: rsa.RSAPrivateKey,
    tmp_path: Path,
    s3_proxy: TcpProxy,
) -> None:
    service = await make_service(
        COPERNICA_API_URL=signing_simulator.url + "/v2",
        PUBLIC_BASE_URL=relay.url,
        S3_ENDPOINT_URL=s3_proxy.url,
        S3_TIMEOUT_SECONDS="2",
        **signing(key, tmp_path),
    )
    relay.target = service.url
    filed = await file_request(service.http, service.admin_url, {"email": EMAIL})
    s3_proxy.down()
    relay.holds[1] = asyncio.Event()  # the retry waits until S3 is back

    await deliver_now(service, signing_simulator, filed["copernica_id"])
    assert (await answers(relay, 1))[0][0] == 503
    s3_proxy.up()
    relay.holds[1].set()

    assert (await answers(relay, 2))[1][0] == 200
    first, retry = relay.received
    signed = ("Signature", "Date", "Digest", "X-Nonce", "X-Copernica-Id", "Host")
    assert {h: first[h] for h in signed} == {h: retry[h] for h in signed}
    archived = signing_simulator.state.payload_bytes(filed["copernica_id"])
    assert await store.read(archive_key(filed["id"])) == archived
