"""The admin listener's middlewares: the bearer token of `/v1`, and one error middleware per
surface, turning the service's errors (`service.errors`) into that surface's answer.

- `api_errors` (`/v1/*`): any `ServiceError` as `{"error": message}` (with `"field"` when
  the error names the input it is about) and `Retry-After` when it says when to try again,
  under the status of its kind; the router's 404 (an unknown path, or a request id that is
  not a ULID) as a JSON error too.
- `console_errors` (`/ui/*`): any `ServiceError` a page did not show itself (a form's error
  shown beside its field is the page's own) as the console's error page.

Handlers parse, call and map the result; they do not catch these errors to answer them.
"""

from __future__ import annotations

import hmac
from typing import Any

import structlog
from aiohttp import web

from service.config import Secret
from service.errors import NotFoundError, ServiceError, Unavailable
from service.web.console.routes import CONSOLE, refusal
from service.web.console.session import SESSION

Handler = Any  # aiohttp's middleware handler: (web.Request) -> Awaitable[web.StreamResponse]


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _answered(request: web.Request) -> bool:
    """Bytes of a response already went out: no other answer can follow them (the
    connection is closed instead, as aiohttp does for any error at that point)."""
    return request.writer.output_size > 0


def bearer_middleware(token: Secret) -> Any:
    """`/v1/*` needs `Authorization: Bearer <API_TOKEN>`, compared in constant time. Every
    line written while answering a route with a request id carries that id."""
    expected = f"Bearer {token.reveal()}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _under(request.path, "/v1"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "missing or wrong bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="copernica-receiver"'},
                )
        # Routes take `{id}` only as a ULID (ROUTE_ID): a matched id is one.
        request_id = request.match_info.get("id")
        if request_id is None:
            return await handler(request)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            return await handler(request)

    return middleware


def json_error(
    status: int, message: str, *, field: str | None = None, retry_after: int | None = None
) -> web.Response:
    """The API's error answer: `{"error": message[, "field": field]}`."""
    body = {"error": message}
    if field is not None:
        body["field"] = field
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`/v1/*`: a `ServiceError` as its status and JSON error; the router's 404 as JSON."""
    if not _under(request.path, "/v1"):
        return await handler(request)
    try:
        return await handler(request)
    except ServiceError as exc:
        if _answered(request):
            raise
        return json_error(exc.status, exc.message, field=exc.field, retry_after=exc.retry_after)
    except web.HTTPNotFound:
        about_a_request = request.path.startswith("/v1/data-requests/")
        return json_error(404, "no such request" if about_a_request else "not found")


# The console's own wording where the API's sentence is terse, by kind (first match):
# title, message, and where the page's button leads (None: no button).
_CONSOLE_PAGES: list[tuple[type[ServiceError], str, str, str | None]] = [
    (
        Unavailable,
        "Storage is not answering",
        "The archive (S3) did not answer in time. Nothing was changed; try again shortly.",
        None,
    ),
    (NotFoundError, "No such request", "There is no request with this id.", "/ui/"),
]


@web.middleware
async def console_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`/ui/*`: a `ServiceError` a page did not show itself, as the console's error page
    (with the signed-in operator's header, and `Retry-After` when the error says when)."""
    if not _under(request.path, "/ui"):
        return await handler(request)
    try:
        return await handler(request)
    except ServiceError as exc:
        if _answered(request):
            raise
        return console_error_page(request, exc)


def console_error_page(request: web.Request, exc: ServiceError) -> web.Response:
    title, message = exc.title, exc.message
    back: str | None = "/ui/"
    for kind, kind_title, kind_message, kind_back in _CONSOLE_PAGES:
        if isinstance(exc, kind):
            title, message, back = kind_title, kind_message, kind_back
            break
    console = request.app[CONSOLE]
    session = console.sessions.read(SESSION, request.cookies.get(SESSION.cookie))
    response = refusal(request, exc.status, title, message, session, back)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response
