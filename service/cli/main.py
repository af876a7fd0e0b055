"""Command line: `serve` (default), `request`, `status`, `list`, `extend`, `discovery`,
`download`, `events`, `simulate`."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import sys
from typing import Any

import aiohttp

from service.config import CLIENT_REQUIRES, SERVE_REQUIRES, ConfigError, Settings
from service.copernica.events import KINDS

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _parser() -> argparse.ArgumentParser:
    """Every subcommand and option; it stays one function because it is a list of
    declarations that reads like `--help`."""
    parser = argparse.ArgumentParser(
        prog="copernica-receiver",
        description="Files Copernica data requests and archives their results to S3.",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the HTTP service (default)")

    request = commands.add_parser("request", help="file a data request through the service")
    subject = request.add_mutually_exclusive_group(required=True)
    subject.add_argument("email", nargs="?", help="e-mail address of the data subject")
    subject.add_argument("--profile", type=int, help="Copernica profile id")
    subject.add_argument("--subprofile", type=int, help="Copernica subprofile id")
    request.add_argument("--idempotency-key", help="retrying with the same key files once")
    request.add_argument(
        "--received-on", help="day the subject's request was received, YYYY-MM-DD (default today)"
    )
    request.add_argument("--events-since", help="also archive events from this day, YYYY-MM-DD")
    request.add_argument(
        "--events-until", help="day after the last day of events, YYYY-MM-DD (default tomorrow)"
    )
    discover = request.add_mutually_exclusive_group()
    discover.add_argument(
        "--discover",
        dest="discover",
        action="store_const",
        const=True,
        help="look for the person in every database and collection (default: DISCOVERY)",
    )
    discover.add_argument(
        "--no-discover",
        dest="discover",
        action="store_const",
        const=False,
        help="the filed subject only",
    )

    status = commands.add_parser("status", help="show one request, its sources and discovery")
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="the API's JSON as it is")

    listing = commands.add_parser("list", help="list requests")
    listing.add_argument(
        "--status",
        choices=("submitting", "pending", "archived", "failed", "expired", "purged"),
    )
    listing.add_argument(
        "--overdue", action="store_true", help="only requests past due_by and not answered"
    )
    listing.add_argument(
        "--due-before", metavar="DATE", help="only requests not answered, due before DATE"
    )
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--cursor", default="")

    extend = commands.add_parser("extend", help="extend a request's deadline (GDPR art. 12(3))")
    extend.add_argument("id")
    extend.add_argument("--months", type=int, required=True, choices=(1, 2))
    extend.add_argument("--reason", required=True, help="why the extension is necessary")

    discovery = commands.add_parser(
        "discovery", help="let a discovery over its limit (over_limit) go on"
    )
    discovery.add_argument("id")
    discovery.add_argument(
        "--max-sources", type=int, required=True, help="the new limit, above the current one"
    )

    download = commands.add_parser("download", help="download a request's access package")
    download.add_argument("id")
    download.add_argument("--out", help="file to write (default access-package-ID.zip)")

    events = commands.add_parser(
        "events",
        help="export events of any range as JSON Lines, split into month windows",
        description="Fetch events from Copernica directly (COPERNICA_ACCESS_TOKEN). --tags "
        "alone selects the tags endpoint; with another source it filters by tags.",
    )
    whose = events.add_mutually_exclusive_group()
    for kind in KINDS:
        if kind != "tags":
            whose.add_argument(f"--{kind.replace('/', '-')}", dest=kind, metavar="ID")
    events.add_argument("--tags", help='semicolon-separated tags, e.g. "news;2026"')
    events.add_argument("--since", required=True, help="first day, YYYY-MM-DD (UTC)")
    events.add_argument("--until", help="day after the last, YYYY-MM-DD (default: tomorrow)")
    events.add_argument(
        "--out", default="-", help="FILE (resumable), - for stdout (default), or s3"
    )

    simulate = commands.add_parser("simulate", help="run the Copernica simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=9000)
    simulate.add_argument("--access-token", default="dev-token")
    simulate.add_argument(
        "--control",
        action="store_true",
        help="serve the /_sim/ control API (state, faults, config; no authentication)",
    )
    simulate.add_argument(
        "--ready-after", type=float, default=2.0, help="seconds until a data request is ready"
    )
    simulate.add_argument(
        "--payload-size", type=int, default=20_000, help="approximate payload bytes"
    )
    simulate.add_argument(
        "--sign-key",
        metavar="PEM",
        help="RSA private key file: sign callbacks as Copernica does (needs --account-id)",
    )
    simulate.add_argument(
        "--account-id", help="the account id sent as X-Copernica-Id in signed callbacks"
    )
    simulate.add_argument(
        "--first-id",
        type=int,
        default=1000,
        help="Copernica id of the first data request (a restarted simulator must not reuse ids)",
    )
    simulate.add_argument(
        "--key-id",
        default="one._domainkey.copernica.com",
        help="keyId of the signature (default: %(default)s)",
    )
    simulate.add_argument(
        "--account",
        metavar="FILE",
        help="JSON account to hold (databases, collections, profiles, subprofiles)",
    )
    return parser


def tune_malloc() -> None:
    """Fixed glibc malloc thresholds in place of its adaptive ones (not glibc: no-op).

    Adaptive, the mmap threshold rises after the first large free (up to 32 MiB); from then
    on the 8 MiB part buffers of big callbacks come from the heap, and freed ones linger in
    it. A fixed 1 MiB threshold maps and unmaps every such buffer: peak RSS of a 512 MiB
    callback 120-122 MiB instead of 128-139 (bench/giant_callback.py).

    Fixing it leaves the trim threshold at its 128 KiB default, though: the heap went back to
    the kernel after each callback of about 1 MB and the next faulted it in again, a
    thousand page faults and 4 ms of system CPU per callback (bench/callbacks.py). An 8 MiB
    trim threshold saved that for one callback at a time, but 64 at once grow the heap by
    about 100 MiB, and giving it back after each burst cost 300-440 page faults per callback
    (20 % more CPU). The heap now keeps up to 128 MiB free at its top: 65 faults per callback
    at concurrency 64. The price is memory not returned after a burst (never above the
    burst's own peak); the peaks are unchanged (bench/giant_callback.py 44 and 132 MiB above
    idle, bench/package.py 41). A 4 MiB mmap threshold as well would save more CPU (1 MiB
    buffers from the heap too) but puts the package build at the edge of its memory target
    (64 MiB above idle)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


def _serve() -> int:
    from service.app import serve
    from service.logs import configure_logging

    settings = Settings.from_env(require=SERVE_REQUIRES)
    configure_logging(settings)
    tune_malloc()
    # uvloop (libuv) moves bytes between sockets with less CPU than asyncio's own loop.
    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    from service.storage.proof import UnsafeStore

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except UnsafeStore as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0


async def _call_api(
    method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    settings = Settings.from_env(require=CLIENT_REQUIRES)
    assert settings.api_token is not None
    auth = {"Authorization": f"Bearer {settings.api_token.reveal()}", **(headers or {})}
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, settings.receiver_url + path, json=body, headers=auth) as answer,
    ):
        try:
            return answer.status, await answer.json(content_type=None)
        except ValueError:
            return answer.status, {"error": (await answer.text())[:200]}


def _client(args: argparse.Namespace) -> int:
    if args.command == "request":
        body = _filing_body(args)
        if body is None:
            print("error: --events-until needs --events-since", file=sys.stderr)
            return 2
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
        status, answer = asyncio.run(_call_api("POST", "/v1/data-requests", body, headers))
        if status == 202:
            print(answer["id"])
            if answer.get("status") == "failed":
                print(f"filing failed: {answer.get('last_error')}", file=sys.stderr)
                return 1
            return 0
    elif args.command == "status":
        status, answer = asyncio.run(_call_api("GET", f"/v1/data-requests/{args.id}"))
        if status == 200:
            print(json.dumps(answer, indent=2) if args.json else "\n".join(status_lines(answer)))
            return 0
    elif args.command == "discovery":
        body = {"max_sources": args.max_sources}
        path = f"/v1/data-requests/{args.id}/discovery"
        status, answer = asyncio.run(_call_api("POST", path, body))
        if status == 200:
            print(
                f"{answer['id']} discovery {answer['discovery']['status']}, up to "
                f"{answer['discovery']['max_sources']} sources"
            )
            return 0
    elif args.command == "extend":
        body = {"months": args.months, "reason": args.reason}
        status, answer = asyncio.run(_call_api("POST", f"/v1/data-requests/{args.id}/extend", body))
        if status == 200:
            print(f"{answer['id']} due by {answer['due_by']} ({answer['days_left']} days left)")
            return 0
    else:
        query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
        query += "&overdue=true" if args.overdue else ""
        query += f"&due_before={args.due_before}" if args.due_before else ""
        query += f"&cursor={args.cursor}" if args.cursor else ""
        status, answer = asyncio.run(_call_api("GET", f"/v1/data-requests{query}"))
        if status == 200:
            for item in answer["items"]:
                print(_list_line(item))
            if answer.get("next_cursor"):
                print(f"next: --cursor {answer['next_cursor']}", file=sys.stderr)
            return 0
    print(f"error {status}: {answer.get('error', answer)}", file=sys.stderr)
    return 1


def _filing_body(args: argparse.Namespace) -> dict[str, Any] | None:
    """The body `request` files (None: --events-until without --events-since)."""
    body: dict[str, Any]
    if args.email:
        body = {"email": args.email}
    elif args.profile is not None:
        body = {"profile": args.profile}
    else:
        body = {"subprofile": args.subprofile}
    if args.received_on:
        body["received_on"] = args.received_on
    if args.discover is not None:
        body["discover"] = args.discover
    if args.events_since:
        body["events"] = {"since": args.events_since}
        if args.events_until:
            body["events"]["until"] = args.events_until
    elif args.events_until:
        return None
    return body


def _list_line(item: dict[str, Any]) -> str:
    """One request as `list` prints it: id, status, subject type, sources, created, due."""
    late = "  OVERDUE" if item.get("overdue") else ""
    sources = len(item.get("sources") or ())
    return (
        f"{item['id']}  {item['status']:<10}  {item['subject_type']:<10}  "
        f"{sources:>3} source{'s' if sources != 1 else ' '}  "
        f"{item['created_at']}  due {item.get('due_by')}{late}"
    )


def status_lines(request: dict[str, Any]) -> list[str]:
    """A request as `status` prints it: the request, its discovery, one line per source
    (source, status, where it was found, data size, error)."""
    late = " OVERDUE" if request.get("overdue") else ""
    lines = [
        f"{request['id']}  {request['status']}  received {request['received_on']}  "
        f"due {request['due_by']} ({request['days_left']} days left){late}"
    ]
    if request.get("package"):
        package = request["package"]
        lines.append(f"package: {_size(package['size'])}, sha256 {package['sha256']}")
    found = request.get("discovery") or {}
    line = f"discovery: {found.get('status', 'off')}"
    if found.get("status", "off") != "off":
        line += (
            f", {found['databases']} databases, {found['collections']} collections, "
            f"{found['queries']} queries, {found['matches']} matches, {found['calls']} calls"
        )
        if found.get("max_sources"):
            line += f", limit {found['max_sources']}"
        if found.get("last_error"):
            line += f"; last error: {found['last_error']}"
    lines.append(line)
    sources = request.get("sources") or []
    lines.append(f"sources ({len(sources)}):")
    for source in sources:
        data = source.get("archive")
        where = _where(source)
        size = _size(data["size"]) if data else "-"
        error = f"  error: {source['last_error']}" if source.get("last_error") else ""
        lines.append(
            f"  {source['source']:<22} {source['status']:<12} {where:<36} {size:>10}{error}"
        )
    return lines


def _where(source: dict[str, Any]) -> str:
    """Where a source was found: its database, or its collection (and profile)."""
    if source.get("collection"):
        where = f"collection {source['collection']['name']}"
        return where + (f" (profile {source['profile']})" if source.get("profile") else "")
    if source.get("database"):
        return f"database {source['database']['name']}"
    return "as filed"


def _size(size: int) -> str:
    """Bytes for people, as the console shows them (decimal units)."""
    if size < 1000:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"


def _events(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from service.collect.events import export
    from service.copernica.client import CopernicaError, CopernicaUnavailable
    from service.copernica.events import EventsInputError, Source, parse_day, plan
    from service.storage.s3 import ArchiveUnavailable

    chosen = [
        (kind, getattr(args, kind))
        for kind in KINDS
        if kind != "tags" and getattr(args, kind) is not None
    ]
    try:
        if chosen:
            source, tags = Source(*chosen[0]), args.tags
        elif args.tags:
            source, tags = Source("tags", args.tags), None
        else:
            raise EventsInputError("say whose events: --email, --profile, ... or --tags")
        since = parse_day(args.since, "--since")
        until = (
            parse_day(args.until, "--until")
            if args.until
            else datetime.now(UTC).date() + timedelta(days=1)
        )
        windows = plan(since, until)
        require = ("COPERNICA_ACCESS_TOKEN",) + (("ARCHIVE_BUCKET",) if args.out == "s3" else ())
        settings = Settings.from_env(require=require)
        progress = asyncio.run(
            export(
                settings,
                source,
                windows,
                args.out,
                tags=tags,
                progress_stream=sys.stderr if sys.stderr.isatty() else None,
            )
        )
    except (EventsInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CopernicaError, CopernicaUnavailable, ArchiveUnavailable) as exc:
        print(f"error: {exc} (run the same command again to resume)", file=sys.stderr)
        return 1
    print(
        f"{progress.events} events in {progress.windows} windows ({progress.skipped} already done)",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in (None, "serve"):
            return _serve()
        if args.command == "simulate":
            from service.simulator.app import run_simulator

            run_simulator(
                args.host,
                args.port,
                args.access_token,
                ready_after=args.ready_after,
                payload_size=args.payload_size,
                sign_key_file=args.sign_key,
                account_id=args.account_id,
                key_id=args.key_id,
                control=args.control,
                first_id=args.first_id,
                account_file=args.account,
            )
            return 0
        if args.command == "events":
            return _events(args)
        if args.command == "download":
            from service.cli.download import download

            settings = Settings.from_env(require=CLIENT_REQUIRES)
            return asyncio.run(download(settings, args.id, args.out))
        return _client(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except aiohttp.ClientConnectionError as exc:
        print(f"cannot reach the service: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
