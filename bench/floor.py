"""The floors for the callback benchmark, with nothing a real receiver could skip:

- `POST /put/{key}`: a bare aiohttp handler that reads the body and does one bare aiobotocore
  `put_object` to the same S3 endpoint (the floor of issue 7);
- `POST /checked/{key}`: the bare handler plus the work no receiver that keeps the exact
  bytes and refuses invalid JSON can skip: a SHA-256 of the body (sent as its S3 checksum, in
  place of botocore's CRC32, as the service does) and a full JSON validation (simdjson, the
  service's checker for a body of one part). The service against it shows its own overhead;
  the checked floor against the bare one, what the required work costs on this machine;
- `POST /multipart/{key}`: streams the body into a bare multipart upload with the service's
  part size and two parts in flight (no hash, no check, no conditions): what archiving a body
  larger than one part costs at the least without holding it whole in memory.

Both use the S3 client settings the service uses (`UNSIGNED`: no payload signature over
plain http, as botocore does over https), so the comparison is of the work, not of a setting.
The store is the benchmark's (bench/stack.py: moto, or SeaweedFS with `--s3 seaweedfs`), the
one the service writes to, with the same credentials (the AWS_* environment).

    python bench/floor.py PORT S3_ENDPOINT BUCKET [PART_BYTES]
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import simdjson
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web

S3 = web.AppKey("s3", object)
PART = web.AppKey("part", int)
# As the service's client (service/archive.py): botocore's https behaviour over plain http too.
UNSIGNED = AioConfig(s3={"payload_signing_enabled": False})


async def put(request: web.Request) -> web.Response:
    body = await request.read()
    client: Any = request.app[S3]
    await client.put_object(Bucket=request.app["bucket"], Key=request.match_info["key"], Body=body)
    return web.json_response({"status": "stored", "size": len(body)})


PARSER = simdjson.Parser()


async def checked(request: web.Request) -> web.Response:
    body = await request.read()
    digest = hashlib.sha256(body).digest()
    try:
        PARSER.parse(body)
    except ValueError:
        return web.json_response({"error": "invalid JSON"}, status=422)
    client: Any = request.app[S3]
    await client.put_object(
        Bucket=request.app["bucket"],
        Key=request.match_info["key"],
        Body=body,
        ChecksumSHA256=base64.b64encode(digest).decode(),
    )
    return web.json_response({"status": "stored", "size": len(body)})


async def multipart(request: web.Request) -> web.Response:
    client: Any = request.app[S3]
    bucket, key, part_bytes = request.app["bucket"], request.match_info["key"], request.app[PART]
    upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
    parts: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(2)
    tasks: list[asyncio.Task[None]] = []

    async def send(number: int, body: bytes) -> None:
        try:
            answer = await client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=body
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        finally:
            gate.release()

    async def flush(body: bytes) -> None:
        await gate.acquire()
        tasks.append(asyncio.create_task(send(len(tasks) + 1, body)))

    chunks: list[bytes] = []
    held = size = 0
    async for chunk in request.content.iter_any():
        chunks.append(chunk)
        held += len(chunk)
        size += len(chunk)
        if held >= part_bytes:
            await flush(b"".join(chunks))
            chunks, held = [], 0
    if chunks:
        await flush(b"".join(chunks))
    await asyncio.gather(*tasks)
    parts.sort(key=lambda p: p["PartNumber"])
    await client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    return web.json_response({"status": "stored", "size": size})


def main() -> None:
    port, endpoint, bucket = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    part_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 8 * 1024 * 1024

    async def client(app: web.Application) -> AsyncIterator[None]:
        async with get_session().create_client("s3", endpoint_url=endpoint, config=UNSIGNED) as s3:
            app[S3] = s3
            yield

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["bucket"] = bucket
    app[PART] = part_bytes
    app.cleanup_ctx.append(client)
    app.router.add_post("/put/{key}", put)
    app.router.add_post("/checked/{key}", checked)
    app.router.add_post("/multipart/{key}", multipart)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
