"""The floor for the callback benchmark: a bare aiohttp handler that reads the body and does one
bare aiobotocore `put_object` to the same S3 endpoint. Nothing a real receiver could skip.

    python bench/floor.py PORT S3_ENDPOINT BUCKET
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

from aiobotocore.session import get_session
from aiohttp import web

S3 = web.AppKey("s3", object)


async def put(request: web.Request) -> web.Response:
    body = await request.read()
    client: Any = request.app[S3]
    await client.put_object(Bucket=request.app["bucket"], Key=request.match_info["key"], Body=body)
    return web.json_response({"status": "stored", "size": len(body)})


def main() -> None:
    port, endpoint, bucket = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    async def client(app: web.Application) -> AsyncIterator[None]:
        async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
            app[S3] = s3
            yield

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["bucket"] = bucket
    app.cleanup_ctx.append(client)
    app.router.add_post("/put/{key}", put)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
