"""The console's routes (`/ui/...` on the admin listener): sign-in, the requests page, one
request (extend, raise discovery's limit, download, link, report) and the filing form.

Handlers call the domain objects directly (Filing, Ledger, and the OperatorApi's hand-out
functions, so a download or link from here answers the request exactly as the API does)
and render Jinja2 templates with autoescape. Every page works without JavaScript.

An error a page shows itself (a form's error beside its field, a package that cannot be
handed out on the request's page) is caught here; any other (`service.errors`: no such
request, storage unavailable, a filter the page does not offer) reaches
`middlewares.console_errors`, which renders the error page (`refusal`).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import structlog
from aiohttp import web
from multidict import MultiMapping

from service.clock import utcnow
from service.collect.filing import Filing, IdempotencyConflict, IdempotencyInProgress
from service.config import Settings
from service.errors import Conflict, Gone, InvalidInput
from service.metrics import Metrics
from service.requests.deadline import parse_extension
from service.requests.deadline_index import DeadlineIndex
from service.requests.ledger import Ledger
from service.requests.records import STATUSES, AccessRequest
from service.storage.s3 import ArchiveStore, ArchiveUnavailable
from service.web.api import (
    ROUTE_ID,
    OperatorApi,
    PackageRefused,
    no_such_request,
    parse_max_sources,
)
from service.web.console.package_report import ReportUnreadable, read_report
from service.web.console.session import LOGIN, SESSION, Sessions, Signed, delete_cookie, set_cookie
from service.web.console.views import (
    DISCOVERY_LABELS,
    PAGE_SIZE,
    STATUS_LABELS,
    SUBJECT_KINDS,
    VIEWS,
    FilingForm,
    Filters,
    discovery_limit,
    extension_months_left,
    listing,
    size_text,
    sources,
    subject_label,
    time_text,
    timeline,
)

log = structlog.get_logger(__name__)

HERE = Path(__file__).parent

# The console's own pages: styles from its own origin only, no script, no frame, forms
# posting back to it. The report of a package is stricter still (REPORT_POLICY).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
REPORT_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'; sandbox"
)

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("service.web.console", "templates"),
    autoescape=True,  # every value is escaped; nothing is marked safe
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters.update(size=size_text, time=time_text)
_ENVIRONMENT.globals.update(
    STATUS_LABELS=STATUS_LABELS,
    VIEWS=VIEWS,
    STATUSES=STATUSES,
    SUBJECT_KINDS=SUBJECT_KINDS,
    DISCOVERY_LABELS=DISCOVERY_LABELS,
)


class Console:
    """What the console's handlers work with; one per application, made at start-up."""

    def __init__(
        self,
        operator: OperatorApi,
        filing: Filing,
        ledger: Ledger,
        deadlines: DeadlineIndex,
        store: ArchiveStore,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        assert settings.api_token is not None
        self.operator = operator
        self.filing = filing
        self.ledger = ledger
        self.deadlines = deadlines
        self.store = store
        self.metrics = metrics
        self.sessions = Sessions(settings.api_token)
        self.link_hours = settings.package_link_seconds / 3600
        self.discover = settings.discovery  # the filing form's default
        self.max_sources = settings.discovery_max_sources

    def census(self) -> dict[str, int]:
        """Counts across all requests that cost no S3 call: housekeeping's last census of the
        poll schedule (requests not yet final) and of the overdue ones (on a replica not
        holding the housekeeping lease, the holder's census as its lease object shows it)."""
        census = self.metrics.census
        return {"in_progress": census.pending, "overdue": census.overdue}


CONSOLE = web.AppKey("console", Console)

Handler = Callable[[web.Request, Signed], Awaitable[web.StreamResponse]]


def setup_console(app: web.Application) -> None:
    """Register the console's routes; `app[CONSOLE]` is set by the clients' start-up."""
    r = app.router
    r.add_static("/ui/static/", HERE / "static", name="console-static")
    r.add_get("/ui", to_console)
    r.add_get("/ui/login", login_page)
    r.add_post("/ui/login", login)
    r.add_post("/ui/logout", signed_in(logout))
    r.add_get("/ui/", signed_in(requests_page))
    r.add_get("/ui/requests/new", signed_in(new_request_page))
    r.add_post("/ui/requests", signed_in(file_request))
    r.add_get(f"/ui/requests/{ROUTE_ID}", signed_in(request_page))
    r.add_post(f"/ui/requests/{ROUTE_ID}/extend", signed_in(extend))
    r.add_post(f"/ui/requests/{ROUTE_ID}/discovery", signed_in(raise_discovery_limit))
    r.add_post(f"/ui/requests/{ROUTE_ID}/link", signed_in(create_link))
    r.add_get(f"/ui/requests/{ROUTE_ID}/package", signed_in(download))
    r.add_get(f"/ui/requests/{ROUTE_ID}/report", signed_in(report))


# -- rendering ---------------------------------------------------------------------------


def render(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    session: Signed | None = None,
    **context: Any,
) -> web.Response:
    css = request.app.router["console-static"].url_for(filename="console.css")
    html = _ENVIRONMENT.get_template(template).render(
        css=str(css), session=session, path=request.path, **context
    )
    return web.Response(text=html, content_type="text/html", status=status, headers=PAGE_HEADERS)


def refusal(
    request: web.Request,
    status: int,
    title: str,
    message: str,
    session: Signed | None = None,
    back: str | None = None,
) -> web.Response:
    """A page that says plainly why something was refused."""
    return render(
        request,
        "error.html.j2",
        status=status,
        session=session,
        title=title,
        message=message,
        back=back,
    )


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **PAGE_HEADERS})


async def to_console(_request: web.Request) -> web.Response:
    return _redirect("/ui/")


# -- signing in --------------------------------------------------------------------------


def signed_in(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Only with a valid session cookie: pages redirect to the sign-in page, forms are
    refused. A form must also carry the session's CSRF token."""

    async def checked(request: web.Request) -> web.StreamResponse:
        console = request.app[CONSOLE]
        cookie = request.cookies.get(SESSION.cookie)
        session = console.sessions.read(SESSION, cookie)
        if session is None:
            if request.method in ("GET", "HEAD"):
                query = {"next": request.path_qs}
                if cookie:
                    query["expired"] = "1"
                response = _redirect(f"/ui/login?{urlencode(query)}")
            else:
                response = refusal(
                    request,
                    401,
                    "You are not signed in",
                    "Your session has expired or is not valid, so the form was not "
                    "accepted and nothing was changed. Sign in and try again.",
                    back="/ui/login",
                )
            if cookie:
                delete_cookie(response, SESSION)
            return response
        if request.method == "POST":
            form = await request.post()
            if not console.sessions.csrf_ok(session, form.get("csrf")):
                log.warning("console_csrf_refused", path=request.path)
                return refusal(
                    request,
                    403,
                    "The form was not accepted",
                    "It did not carry this session's security token (CSRF), so it may "
                    "not have come from this console. Nothing was changed. Go back, reload "
                    "the page and try again.",
                    session,
                    back="/ui/",
                )
        return await handler(request, session)

    return checked


def _login_form(
    request: web.Request, status: int = 200, error: str = "", notice: str = ""
) -> web.Response:
    """The sign-in page with a fresh pre-session cookie, whose CSRF token the form carries."""
    console = request.app[CONSOLE]
    value, login_cookie = console.sessions.issue(LOGIN)
    response = render(
        request,
        "login.html.j2",
        status=status,
        csrf=login_cookie.csrf,
        next=_safe_next(request.query.get("next") or ""),
        error=error,
        notice=notice,
    )
    set_cookie(response, request, LOGIN, value)
    return response


def _safe_next(target: str) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    ok = target.startswith("/ui/") and "//" not in target and "\\" not in target
    return target if ok and target.isprintable() else "/ui/"


async def login_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    if console.sessions.read(SESSION, request.cookies.get(SESSION.cookie)) is not None:
        return _redirect(_safe_next(request.query.get("next") or ""))
    notice = ""
    if request.query.get("expired"):
        notice = "Your session has expired or is not valid. Sign in again."
    elif request.query.get("signed_out"):
        notice = "You are signed out."
    return _login_form(request, notice=notice)


async def login(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    form = await request.post()
    login_cookie = console.sessions.read(LOGIN, request.cookies.get(LOGIN.cookie))
    if login_cookie is None or not console.sessions.csrf_ok(login_cookie, form.get("csrf")):
        log.warning("console_csrf_refused", path=request.path)
        return _login_form(
            request,
            403,
            error="This sign-in form has expired or did not come from this console "
            "(missing or wrong security token). Enter the token again.",
        )
    token = form.get("token")
    if not isinstance(token, str) or not console.sessions.token_matches(token):
        log.warning("console_sign_in_refused")
        return _login_form(request, 401, error="Wrong token. Enter the API token (API_TOKEN).")
    value, _session = console.sessions.issue(SESSION)
    response = _redirect(_safe_next(str(form.get("next") or "")))
    set_cookie(response, request, SESSION, value)
    delete_cookie(response, LOGIN)
    log.info("console_signed_in")
    return response


async def logout(request: web.Request, session: Signed) -> web.Response:
    response = _redirect("/ui/login?signed_out=1")
    delete_cookie(response, SESSION)
    log.info("console_signed_out")
    return response


# -- the requests page -------------------------------------------------------------------


async def requests_page(request: web.Request, session: Signed) -> web.Response:
    console = request.app[CONSOLE]
    filters = Filters.parse(request.query)
    today = utcnow().date()
    page = await listing(console.ledger, console.deadlines, filters, today)
    return render(
        request,
        "requests.html.j2",
        session=session,
        filters=filters,
        page=page,
        page_size=PAGE_SIZE,
        census=console.census(),
        today=today,
        link=lambda **changes: "/ui/?" + urlencode(filters.query(**changes)),
    )


# -- one request -------------------------------------------------------------------------


async def request_page(request: web.Request, session: Signed) -> web.Response:
    record = await _current(request)
    notices = {
        "filed": "The request was filed.",
        "extended": f"The deadline was extended; it is now {record.deadline.due_by}.",
        "discovery": "The limit was raised; discovery goes on "
        f"(up to {record.discovery.max_sources} sources).",
    }
    return _request_view(
        request, session, record, notice=notices.get(request.query.get("done", ""), "")
    )


def _request_view(
    request: web.Request,
    session: Signed,
    record: AccessRequest,
    *,
    status: int = 200,
    notice: str = "",
    extend_errors: dict[str, str] | None = None,
    extend_values: dict[str, str] | None = None,
    link: dict[str, str] | None = None,
    problem: str = "",
    discovery_errors: dict[str, str] | None = None,
    discovery_value: str = "",
) -> web.Response:
    today = utcnow().date()
    limit = discovery_limit(record, request.app[CONSOLE].max_sources)
    return render(
        request,
        "request.html.j2",
        status=status,
        session=session,
        record=record,
        subject=subject_label(record),
        deadline=record.deadline,
        days_left=record.deadline.days_left(today),
        overdue=record.deadline.overdue(today),
        months_left=extension_months_left(record),
        steps=timeline(record),
        notice=notice,
        problem=problem,
        extend_errors=extend_errors or {},
        extend_values=extend_values or {},
        link=link,
        link_hours=request.app[CONSOLE].link_hours,
        sources=sources(record),
        discovery=record.discovery,
        limit=limit,
        discovery_errors=discovery_errors or {},
        discovery_value=discovery_value or str(limit * 2),
    )


async def _current(request: web.Request) -> AccessRequest:
    """The request the URL names, as it is now (NotFoundError: no such request)."""
    record = await request.app[CONSOLE].operator.current(request.match_info["id"])
    if record is None:
        raise no_such_request()
    return record


async def extend(request: web.Request, session: Signed) -> web.Response:
    console = request.app[CONSOLE]
    request_id = request.match_info["id"]
    form = await request.post()
    values = {"months": str(form.get("months", "")), "reason": str(form.get("reason", ""))}
    months = int(values["months"]) if values["months"].isdigit() else values["months"]
    errors: dict[str, str] = {}
    status = 400
    try:
        months, reason = parse_extension({"months": months, "reason": values["reason"]})
        record = await console.deadlines.extend(request_id, months, reason)
    except InvalidInput as exc:  # shown beside the field it is about
        errors[exc.field or "form"] = exc.message
        record = None
    except Conflict as exc:  # extended to the limit, answered, purged
        errors["form"], status = exc.message, exc.status
        record = None
    if record is not None:
        log.info("deadline_extended", request_id=request_id, months=months, via="console")
        return _redirect(f"/ui/requests/{request_id}?done=extended")
    current = await _current(request)
    return _request_view(
        request,
        session,
        current,
        status=status,
        extend_errors=errors,
        extend_values=values,
    )


async def raise_discovery_limit(request: web.Request, session: Signed) -> web.Response:
    """The Sources card's form: a discovery stopped at its limit goes on to a higher one
    (the API's rules: `OperatorApi.raise_limit`)."""
    console = request.app[CONSOLE]
    request_id = request.match_info["id"]
    form = await request.post()
    value = str(form.get("max_sources", "")).strip()
    errors: dict[str, str] = {}
    status = 400
    try:
        max_sources = parse_max_sources({"max_sources": int(value) if value.isdigit() else value})
        await console.operator.raise_limit(request_id, max_sources)
    except InvalidInput as exc:  # beside the field
        errors[exc.field or "form"] = exc.message
    except (Conflict, Gone) as exc:  # not over its limit (any more), or purged
        errors["form"], status = exc.message, exc.status
    if not errors:
        return _redirect(f"/ui/requests/{request_id}?done=discovery")
    current = await _current(request)
    return _request_view(
        request, session, current, status=status, discovery_errors=errors, discovery_value=value
    )


async def create_link(request: web.Request, session: Signed) -> web.Response:
    """A presigned link for the data subject, shown once on the request's page."""
    operator = request.app[CONSOLE].operator
    try:
        record = await operator.packaged(request.match_info["id"])
        link = await operator.link(record)
    except PackageRefused as refused:
        return await _package_refused(request, session, refused)
    log.info("package_link_created", request_id=record.id, via="console")
    # Answered now: show the record as it is after that (or as read before, if S3 fails).
    with contextlib.suppress(ArchiveUnavailable):
        record = await operator.current(record.id) or record
    return _request_view(request, session, record, link=link)


async def download(request: web.Request, session: Signed) -> web.StreamResponse:
    """The package as an attachment, exactly as the API streams it (and answering the
    request the same way)."""
    operator = request.app[CONSOLE].operator
    try:
        record = await operator.packaged(request.match_info["id"])
        return await operator.send_package(request, record)
    except PackageRefused as refused:
        return await _package_refused(request, session, refused)


async def report(request: web.Request, session: Signed) -> web.Response:
    """The report of the package, as the data subject will see it, shown under a policy
    that lets it run nothing and load nothing."""
    console = request.app[CONSOLE]
    try:
        record = await console.operator.packaged(request.match_info["id"])
        assert record.package is not None
        body = await read_report(console.store, record.package.key, record.package.size)
    except PackageRefused as refused:
        return await _package_refused(request, session, refused)
    except ReportUnreadable as exc:
        return refusal(request, 502, "The report cannot be shown", str(exc), session)
    return web.Response(
        body=body,
        content_type="text/html",
        charset="utf-8",
        headers={**PAGE_HEADERS, "Content-Security-Policy": REPORT_POLICY},
    )


async def _package_refused(
    request: web.Request, session: Signed, refused: PackageRefused
) -> web.Response:
    """The request's page with the reason the package cannot be handed out."""
    record = await _current(request)
    problem = f"The package cannot be handed out: {refused.message}."
    return _request_view(request, session, record, status=refused.status, problem=problem)


# -- filing a request --------------------------------------------------------------------


def _filing_page(
    request: web.Request, session: Signed, form: FilingForm, status: int = 200
) -> web.Response:
    return render(
        request,
        "new.html.j2",
        status=status,
        session=session,
        form=form,
        today=utcnow().date(),
        # Ties the form to one filing: sent twice (a double click, a reload), it files once.
        idempotency_key=form.values.get("idempotency_key") or secrets.token_urlsafe(18),
    )


async def new_request_page(request: web.Request, session: Signed) -> web.Response:
    console = request.app[CONSOLE]
    return _filing_page(request, session, FilingForm.blank(utcnow().date(), console.discover))


async def file_request(request: web.Request, session: Signed) -> web.Response:
    console = request.app[CONSOLE]
    posted: MultiMapping[Any] = await request.post()
    form = FilingForm.read(posted)
    key = str(posted.get("idempotency_key", ""))
    if not (0 < len(key) <= 64 and key.isprintable()):
        key = secrets.token_urlsafe(18)
    form.values["idempotency_key"] = key
    new = form.check()
    if new is None:
        return _filing_page(request, session, form, 400)
    try:
        record = await console.filing.file(new, f"console:{key}")
    except IdempotencyConflict:
        form.errors["form"] = (
            "This form was already used to file a different request. "
            "Open a new form to file another one."
        )
        form.values["idempotency_key"] = ""
        return _filing_page(request, session, form, 409)
    except IdempotencyInProgress:
        form.errors["form"] = "This request is being filed right now; wait a moment and reload."
        return _filing_page(request, session, form, 409)
    return _redirect(f"/ui/requests/{record.id}?done=filed")
