"""The invariant checker: reads only the bucket (straight from moto), the simulator's state
and the processes' logs, and says for each guarantee how much it checked and what broke."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.simulator.account import php_json
from service.simulator.app import subject_key
from tests.conftest import leaks_in
from tests.support import archive_key

from .plan import DRAIN, GRACE, RATE, REPLICAS, Plan, PlannedRequest
from .run import Outcome, purge_overdue, records, retention_start, uploads
from .stack import Stack

FINAL = ("archived", "failed", "expired", "purged")
SOURCE_FINAL = ("archived", "gone", "unsupported", "failed", "expired")
# After drain + grace, what still runs is cancelled; its clean-up (aborting an upload, closing
# clients) and the interpreter's exit come on top. Measured in soaks: up to ~4 s.
SHUTDOWN_SLACK = 5.0
# aiohttp's client leaves the task that writes a request body unretrieved when the connection
# is cut under it; asyncio then logs it. The request itself fails and is retried: not a crash.
LIBRARY_NOISE = ("Task exception was never retrieved", "ClientRequest.write_bytes()")
# aiohttp's server, when a handler finishes after the shutdown stopped waiting for it (our
# drain + grace were over: the work still running is cancelled, its client retries), sets a
# waiter the shutdown already finished and logs InvalidStateError (aiohttp's own race, as in
# aiohttp PR #8611 and Tribler issue #8156). Nothing of ours is lost: counted, not a crash.
SHUTDOWN_NOISE = ("aiohttp.server", "_handler_waiter.set_result", "InvalidStateError")


def first_source(record: dict[str, Any]) -> dict[str, Any]:
    """The record's first data request (the filed subject): its archive, events, error."""
    return dict(record["data_requests"][0])


@dataclass
class Row:
    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.checked += 1
        if not ok:
            self.violations.append(what)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def source_name(subject_type: str, subject_id: str) -> str:
    """The record's name of the source a Copernica data request was filed for."""
    return "email" if subject_type == "email" else f"{subject_type}:{subject_id}"


def package_folder(n: int, source: dict[str, Any]) -> str:
    """Where a record's n-th source lies in its package (service/answer/package.py)."""
    if n == 0:
        return ""
    if source["subject_type"] == "email":
        return "sources/email/"
    return f"sources/{source['subject_type']}-{source['subject_id']}/"


def request_id_of(report: str | None) -> str | None:
    if not report or "/callbacks/datarequest/" not in report:
        return None
    return report.split("/callbacks/datarequest/", 1)[1].split("/", 1)[0]


class Checker:
    def __init__(self, stack: Stack, outcome: Outcome) -> None:
        self.stack = stack
        self.plan: Plan = stack.plan
        self.outcome = outcome
        self.state = stack.sim_state
        # Each planned request by the subjects Copernica sees: its address and its places.
        self.by_subject: dict[str, PlannedRequest] = {}
        for planned in self.plan.requests:
            self.by_subject[subject_key("email", planned.email)] = planned
            for place in planned.places:
                self.by_subject[subject_key(*place.split(":"))] = planned
        # Every Copernica request made for one of our requests (a refiling makes another),
        # and for each of its sources.
        self.copernica: dict[str, list[str]] = {}
        self.per_source: dict[tuple[str, str], list[str]] = {}
        for cid, sim in self.state.requests.items():
            request_id = request_id_of(sim.report)
            if request_id is not None:
                self.copernica.setdefault(request_id, []).append(cid)
                name = source_name(sim.subject_type, sim.subject_id)
                self.per_source.setdefault((request_id, name), []).append(cid)
        self._digests: dict[str, str] = {}
        self.library_noise = 0  # aiohttp's own log lines: LIBRARY_NOISE, SHUTDOWN_NOISE

    async def _get(self, key: str) -> bytes | None:
        s3 = self.stack.s3
        try:
            answer = await s3.get_object(Bucket=self.stack.bucket, Key=key)
        except s3.exceptions.NoSuchKey:
            return None
        async with answer["Body"] as body:
            return bytes(await body.read())

    async def _keys(self, prefix: str) -> list[str]:
        pages = self.stack.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.stack.bucket, Prefix=prefix
        )
        return [item["Key"] async for page in pages for item in page.get("Contents", [])]

    async def _objects(self, prefix: str) -> list[tuple[str, int]]:
        pages = self.stack.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.stack.bucket, Prefix=prefix
        )
        return [
            (item["Key"], int(item["Size"]))
            async for page in pages
            for item in page.get("Contents", [])
        ]

    async def record(self, request_id: str) -> dict[str, Any] | None:
        body = await self._get(f"copernica/requests/{request_id}.json")
        return None if body is None else dict(json.loads(body))

    async def payload_sha256(self, copernica_id: str) -> str:
        if copernica_id not in self._digests:
            _size, digest = await asyncio.to_thread(self.state.payload_digest, copernica_id)
            self._digests[copernica_id] = digest
        return self._digests[copernica_id]

    async def expected_sha256(self, request_id: str, source: str | None = None) -> set[str]:
        """What Copernica made for the request (for one of its sources: `source`)."""
        made = (
            self.copernica.get(request_id, [])
            if source is None
            else self.per_source.get((request_id, source), [])
        )
        return {await self.payload_sha256(c) for c in made}

    def planned(self, request_id: str) -> PlannedRequest | None:
        for cid in self.copernica.get(request_id, []):
            found = self.by_subject.get(self.state.requests[cid].subject_key)
            if found is not None:
                return found
        return None

    def details_sha256(self, source: dict[str, Any]) -> str | None:
        """What Copernica answers for the source's GET profile/subprofile (the account's
        record, as the simulator writes it)."""
        kind, number = source["subject_type"], source["subject_id"]
        record = self.state.account.record(kind, number)
        if record is None:
            return None
        body = record.profile_json() if kind == "profile" else record.subprofile_json()
        return hashlib.sha256(php_json(body)).hexdigest()

    def expected_events(self, request: PlannedRequest) -> list[int]:
        assert request.events is not None
        since, until = (str(d) for d in request.events)
        return sorted(
            e["data"]["id"]
            for e in self.state.events
            if e["data"].get("email") == request.email and since <= e["data"]["time"][:10] < until
        )

    async def run(self) -> list[Row]:
        now = datetime.now(UTC)
        found = await records(self.stack)
        for record in found.values():  # what is still there is checked as it is now
            if record["status"] == "archived" and record.get("package"):
                await self.audit(record)
        rows = [
            self.filings(found),
            self.final(found),
            self.as_planned(found),
            await self.archives(found),
            await self.stray_archives(found),
            self.events(),
            self.packages(),
            self.sources_once(found),
            self.sources_as_planned(found),
            self.filed_once(found),
            self.sources_in_package(),
            self.closed_when_packaged(),
            self.purged_in_time(found),
            self.purged_when_due(found, now),
            await self.purged_leave_nothing(found),
            await self.no_uploads(),
            self.rate(),
            await self.acknowledged(found),
            self.sigterm(),
            self.logs_clean(),
            self.no_crashes(),
        ]
        return rows

    def filings(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("every filing answered 202 (retried with its Idempotency-Key)")
        for request in self.plan.requests:
            failure = self.outcome.filing_failures.get(request.n)
            row.check(failure is None, f"request {request.n}: {failure}")
        for n, request_id in self.outcome.filed.items():
            row.check(request_id in found, f"request {n}: filed as {request_id}, no record")
        return row

    def final(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("every request in a final state (archived ones packaged)")
        for record in found.values():
            status = record["status"]
            ok = status in FINAL and not (status == "archived" and not record.get("package"))
            row.check(ok, f"{record['id']}: {status}, package {bool(record.get('package'))}")
        return row

    def as_planned(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("final state as planned (never-ready: expired; others: archived or purged)")
        for record in found.values():
            request = self.planned(record["id"])
            if request is None:
                row.check(False, f"{record['id']}: no Copernica request names it")
                continue
            # never ready: expired, then purged RETENTION_DAYS after it ended (no package)
            wanted = ("expired", "purged") if request.never_ready else ("archived", "purged")
            ended = (
                not request.never_ready
                or record["status"] == "expired"
                or (record.get("ended_at") and not record.get("package"))
            )
            row.check(
                record["status"] in wanted and bool(ended),
                f"{record['id']} (plan {request.n}, {request.kind}): {record['status']} "
                f"({first_source(record).get('last_error')})",
            )
        return row

    async def archives(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("archive bytes = Copernica's payload (sha256); purged: tombstone + sha256")
        for record in found.values():
            key = archive_key(record["id"])
            stored = await self._get(key)
            expected = await self.expected_sha256(record["id"])
            recorded = (first_source(record).get("archive") or {}).get("sha256")
            if first_source(record)["status"] == "unsupported":
                row.check(  # Copernica refused the address's data request: nothing of it
                    stored in (None, b"") and recorded is None,
                    f"{record['id']}: e-mail unsupported, archive {len(stored or b'')} B",
                )
            elif record["status"] == "archived":
                actual = hashlib.sha256(stored).hexdigest() if stored is not None else None
                row.check(
                    actual in expected and actual == recorded,
                    f"{record['id']}: stored {actual}, recorded {recorded}, Copernica {expected}",
                )
            elif record["status"] == "purged" and not record.get("package"):
                row.check(  # ended without data (expired): the tombstone, no data recorded
                    stored in (None, b"") and recorded is None,
                    f"{record['id']}: purged unpackaged, object {len(stored or b'')} B",
                )
            elif record["status"] == "purged":
                row.check(
                    stored == b"" and recorded in expected,
                    f"{record['id']}: purged, object {len(stored or b'')} B, sha256 {recorded}",
                )
            else:  # expired (or failed): nothing stored; expiry closes the key with a tombstone
                row.check(
                    stored in (None, b""),
                    f"{record['id']}: {record['status']} with an archive of {len(stored or b'')} B",
                )
        return row

    async def stray_archives(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("no archive data without an archived request (tombstones: purged, expired)")
        for key in await self._keys("copernica/archive/"):
            request_id = key.rsplit("/", 1)[1].removesuffix(".json")
            status = found.get(request_id, {}).get("status")
            if status in ("purged", "expired"):
                row.check(await self._get(key) == b"", f"{key}: request {status}, not empty")
            else:
                row.check(status == "archived", f"{key}: request {status}")
        return row

    async def event_problem(self, record: dict[str, Any]) -> str | None:
        """What is wrong with an archived request's stored events ("" if nothing; None if it
        asked for none)."""
        request = self.planned(record["id"])
        if request is None or request.events is None:
            return None
        stored: list[int] = []
        for key in await self._keys(f"copernica/events/{record['id']}/"):
            body = await self._get(key) or b""
            stored += [json.loads(line)["data"]["id"] for line in body.splitlines()]
        expected = self.expected_events(request)
        complete = bool((first_source(record).get("events") or {}).get("complete"))
        if complete and sorted(stored) == expected and len(set(stored)) == len(stored):
            return ""
        return (
            f"{len(stored)} stored ({len(set(stored))} distinct), {len(expected)} expected, "
            f"complete {complete}"
        )

    async def package_problem(self, record: dict[str, Any]) -> tuple[str, str, str]:
        """What is wrong with an archived request's package ("" if nothing): as a whole
        (manifest, data.json, events), in its sources' bytes, and in what it was built from
        (no source open)."""
        package = record["package"]
        body = await self._get(package["key"])
        if body is None:
            return "no package object", "no package object", ""
        problems = []
        if hashlib.sha256(body).hexdigest() != package["sha256"]:
            problems.append("zip sha256 differs from the record")
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        manifest = json.loads(members["manifest.json"])
        for entry in manifest["files"]:
            member = members.get(entry["name"], b"")
            actual = (len(member), hashlib.sha256(member).hexdigest())
            if actual != (entry["size"], entry["sha256"]):
                problems.append(f"{entry['name']} differs from the manifest")
        first = first_source(record)
        if first["status"] == "archived":
            data = hashlib.sha256(members.get("data.json", b"")).hexdigest()
            if data != (first.get("archive") or {}).get("sha256"):
                problems.append("data.json differs from the archive")
        request = self.planned(record["id"])
        if request is not None and request.events is not None:
            lines = members.get("events.jsonl", b"").splitlines()
            ids = sorted(json.loads(line)["data"]["id"] for line in lines)
            if ids != self.expected_events(request):
                problems.append("events.jsonl differs from Copernica's events")
        return (
            "; ".join(problems),
            await self.sources_problem(record, members),
            (self.open_problem(record, manifest)),
        )

    async def sources_problem(self, record: dict[str, Any], members: dict[str, bytes]) -> str:
        """Every archived source's data in the package, the bytes Copernica made for that
        source's data request (sha256), and its details Copernica's record of it."""
        problems = []
        for n, source in enumerate(record["data_requests"]):
            if source["status"] != "archived":
                continue
            folder, name = package_folder(n, source), source["source"]
            made = await self.expected_sha256(record["id"], name)
            data = members.get(folder + "data.json")
            actual = hashlib.sha256(data).hexdigest() if data is not None else None
            recorded = (source.get("archive") or {}).get("sha256")
            if actual is None or actual not in made or actual != recorded:
                problems.append(f"{name}: data {str(actual)[:12]}, Copernica's {len(made)}")
            if source["subject_type"] == "email":
                continue
            details = members.get(folder + "details.json")
            actual = hashlib.sha256(details).hexdigest() if details is not None else None
            if actual is None or actual != self.details_sha256(source):
                problems.append(f"{name}: details {str(actual)[:12]} not Copernica's record")
        return "; ".join(problems)

    def open_problem(self, record: dict[str, Any], manifest: dict[str, Any]) -> str:
        """Packaged only with discovery finished and every source final; the package lists
        the record's sources as they ended."""
        problems = []
        if record["discovery"]["status"] not in ("off", "done"):
            problems.append(f"discovery {record['discovery']['status']}")
        sources = [(s["source"], s["status"]) for s in record["data_requests"]]
        problems += [f"{name} {status}" for name, status in sources if status not in SOURCE_FINAL]
        listed = [(s["source"], s["status"]) for s in manifest.get("sources", [])]
        if listed != sources:
            problems.append(f"manifest lists {listed}, the record {sources}")
        return "; ".join(problems)

    async def audit(self, record: dict[str, Any]) -> None:
        """Check an archived, packaged request's events and package now, before retention
        purges them; kept in the outcome (the last verdict of a request counts)."""
        package, sources, closed = await self.package_problem(record)
        verdicts = {"package": package, "sources": sources, "closed": closed}
        events = await self.event_problem(record)
        if events is not None:
            verdicts["events"] = events
        self.outcome.audits[record["id"]] = verdicts

    def events(self) -> Row:
        return self._audited("events", "events: every window stored, each event once")

    def packages(self) -> Row:
        return self._audited(
            "package", "package: data.json = archive, manifest true, sha256 as recorded"
        )

    def closed_when_packaged(self) -> Row:
        return self._audited("closed", "nothing packaged while discovery runs or a source is open")

    def sources_in_package(self) -> Row:
        return self._audited(
            "sources", "package: every archived source's data = Copernica's, details its record"
        )

    def sources_once(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("every source once in its record; every planned place found")
        for record in found.values():
            names = [s["source"] for s in record["data_requests"]]
            row.check(len(set(names)) == len(names), f"{record['id']}: sources {names}")
            request = self.planned(record["id"])
            if request is None or record["status"] != "archived":
                continue  # purged: names are digests now
            wanted = ["email", *sorted(request.places)] if request.discover else ["email"]
            row.check(
                [names[0], *sorted(names[1:])] == wanted,
                f"{record['id']} (plan {request.n}): sources {names}, planned {wanted}",
            )
        return row

    def sources_as_planned(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("source states as planned (gone: removed; unsupported: 'Invalid method')")
        for record in found.values():
            request = self.planned(record["id"])
            if request is None or record["status"] != "archived":
                continue
            for source in record["data_requests"]:
                name, status = source["source"], source["status"]
                wanted: tuple[str, ...]
                if name == "email":
                    wanted = ("unsupported",) if request.invalid_method else ("archived",)
                else:
                    wanted = ("archived", "gone") if name in request.gone else ("archived",)
                row.check(
                    status in wanted,
                    f"{record['id']} (plan {request.n}): {name} {status} "
                    f"({source.get('last_error')}), planned {'/'.join(wanted)}",
                )
        return row

    def filed_once(self, found: dict[str, dict[str, Any]]) -> Row:
        """Copernica's requests for each source of ours: one, and one more for each time the
        record says Copernica may hold another (`resubmitted`: filed again after a crash, or
        a try whose answer was lost). Copernica takes no idempotency key, so the record must
        count every such request; one it does not count is a violation."""
        row = Row("no source filed twice at Copernica (beyond those the record counts)")
        for request_id, record in found.items():
            sources = {s["source"]: s for s in record["data_requests"]}
            groups: list[tuple[str, list[str], list[dict[str, Any]]]]
            if record["status"] == "purged":  # subjects are digests: the request's as a whole
                everything = list(sources.values())
                groups = [(request_id, self.copernica.get(request_id, []), everything)]
            else:
                groups = [
                    (f"{request_id} {name}", self.per_source.get((request_id, name), []), [s])
                    for name, s in sources.items()
                ]
            for what, cids, counted in groups:
                allowed = sum(1 + s.get("resubmitted", 0) for s in counted)
                row.check(
                    len(cids) <= allowed,
                    f"{what}: {len(cids)} Copernica requests, {allowed} by the record",
                )
        return row

    def _audited(self, what: str, name: str) -> Row:
        row = Row(f"{name} (checked before purging)")
        for request_id, verdicts in self.outcome.audits.items():
            if what in verdicts:
                row.check(verdicts[what] == "", f"{request_id}: {verdicts[what]}")
        return row

    def purged_in_time(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row(f"nothing purged before its time (retention {self.plan.retention:.0f} s)")
        for record in found.values():
            if record["status"] != "purged":
                continue
            start = retention_start(record)
            if not start:
                row.check(False, f"{record['id']}: purged without a package or an end")
                continue
            age = (_time(record["purged_at"]) - _time(start)).total_seconds()
            row.check(age >= self.plan.retention, f"{record['id']}: purged {age:.1f} s after")
        return row

    def purged_when_due(self, found: dict[str, dict[str, Any]], now: datetime) -> Row:
        row = Row("everything purged once due (retention + a housekeeping round)")
        for record in found.values():
            if retention_start(record):
                row.check(
                    not purge_overdue(record, self.plan, now), f"{record['id']}: overdue, kept"
                )
        return row

    async def purged_leave_nothing(self, found: dict[str, dict[str, Any]]) -> Row:
        row = Row("purged: nothing left but the archives' tombstones")
        purged = {i for i, r in found.items() if r["status"] == "purged"}
        left: Counter[str] = Counter()
        for prefix in ("events/", "packages/", "quarantine/", "deadlines/", "sources/"):
            for key, size in await self._objects(f"copernica/{prefix}"):
                owner = next((i for i in purged if i in key), None)
                # A discovered source's data key keeps an empty tombstone, as the archive's.
                tombstone = prefix == "sources/" and key.endswith("/data.json") and size == 0
                if owner is not None and not tombstone:
                    left[owner] += 1
        for request_id in purged:
            row.check(left[request_id] == 0, f"{request_id}: {left[request_id]} objects left")
        return row

    async def no_uploads(self) -> Row:
        row = Row("no multipart upload left")
        for upload in await uploads(self.stack):
            row.check(False, f"{upload['Key']} since {upload.get('Initiated')}")
        row.checked = max(row.checked, 1)
        return row

    def rate(self) -> Row:
        limit = REPLICAS * RATE
        row = Row(f"Copernica never above {limit:.0f} calls in any second ({REPLICAS} x {RATE})")
        most = self.state.max_rps
        row.check(most <= limit, f"{most} calls in one second")
        return row

    async def acknowledged(self, found: dict[str, dict[str, Any]]) -> Row:
        """A 200 means the data is stored. A filing retried after a timeout can leave two
        Copernica requests for one source of ours, each delivering its own body; the first
        stored is kept and the other answered 200 as a repeat: either body is the subject's
        data. A repeat to a replica that knows the archive exists is answered before its
        body is read; the simulator then has sent only part of it. (A purged record names
        its sources by digest: any of its archives may hold the delivery.)"""
        row = Row("no acknowledged (200) callback lost")
        for delivery in self.state.deliveries:
            if delivery.status != 200 or delivery.kind != "payload":
                continue
            request_id = request_id_of(delivery.url) or ""
            record = found.get(request_id, {})
            sim = self.state.requests[delivery.copernica_id]
            name = source_name(sim.subject_type, sim.subject_id)
            sources = {s["source"]: s for s in record.get("data_requests", [])}
            expected = await self.expected_sha256(request_id, name)
            candidates = [sources[name]] if name in sources else list(sources.values())
            recorded = {(s.get("archive") or {}).get("sha256") for s in candidates}
            whole = delivery.bytes == self.state.payload_size(delivery.copernica_id)
            row.check(
                record.get("status") in ("archived", "purged")
                and bool(recorded & expected)
                and (delivery.sha256 in expected or not whole),
                f"{request_id} {name}: answered 200 for {delivery.sha256[:12]}, "
                f"record {record.get('status')} {sorted(map(str, recorded))}",
            )
        return row

    def sigterm(self) -> Row:
        limit = DRAIN + GRACE + SHUTDOWN_SLACK
        row = Row(f"SIGTERM: exit 0 within drain + grace + {SHUTDOWN_SLACK:.0f} s")
        for replica in self.stack.replicas:
            for code, seconds in replica.terms:
                row.check(
                    code == 0 and seconds <= limit,
                    f"replica {replica.number}: exit {code} after {seconds:.1f} s",
                )
        return row

    def _logs(self) -> list[Path]:
        paths = [Path(r.log_path) for r in self.stack.replicas]
        return [*paths, self.stack.workdir / "nginx" / "error.log"]

    def logs_clean(self) -> Row:
        row = Row("no secret or e-mail address in any log line")
        for path in self._logs():
            if not path.exists():
                continue
            text = path.read_text(errors="replace")
            row.checked += len(text.splitlines())
            row.violations += [f"{path.name}: {line}" for line in leaks_in(text)]
        return row

    def no_crashes(self) -> Row:
        row = Row("no unhandled exception in any replica's log")
        for replica in self.stack.replicas:
            for line in Path(replica.log_path).read_text(errors="replace").splitlines():
                if all(part in line for part in LIBRARY_NOISE) or all(
                    part in line for part in SHUTDOWN_NOISE
                ):
                    self.library_noise += 1
                    continue
                row.check(
                    "Traceback" not in line and "_crashed" not in line,
                    f"replica-{replica.number}.log: {line[:400]}",
                )
        return row


def table(rows: list[Row]) -> str:
    lines = ["| invariant | checked | violations | first violation |", "| --- | --- | --- | --- |"]
    for row in rows:
        first = row.violations[0].replace("|", "/")[:160] if row.violations else ""
        lines.append(f"| {row.name} | {row.checked} | {len(row.violations)} | {first} |")
    return "\n".join(lines)


async def audit_while_running(stack: Stack, outcome: Outcome, stop: asyncio.Event) -> None:
    """Check each package (and its events) soon after it is built, before retention purges
    it: new packages are found by listing `packages/` (no record read for known ones). A
    verdict taken while retention was deleting the request is dropped."""
    seen: set[str] = set()
    while not stop.is_set():
        # Anew each round: it maps our requests to the simulator's as they are now.
        checker = Checker(stack, outcome)
        keys = await checker._keys("copernica/packages/")
        new = [k.rsplit("/", 1)[1].removesuffix(".zip") for k in keys]
        for request_id in (i for i in new if i not in seen):
            record = await checker.record(request_id)
            if record is None or record["status"] != "archived" or not record.get("package"):
                continue
            await checker.audit(record)
            after = await checker.record(request_id)
            if after is None or after["status"] == "purged":
                outcome.audits.pop(request_id, None)  # purged under our feet: not a verdict
                continue
            seen.add(request_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 3.0)
