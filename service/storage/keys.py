"""The S3 key layout of SPEC: every key and every prefix the service reads or writes.

All keys live under ARCHIVE_PREFIX. Nothing else builds a key by hand, so the layout can be
read here in one place; no e-mail address is ever part of a key. The layout is fixed: records
and markers already in buckets must keep being found, so a key here never changes shape.
"""

from __future__ import annotations

from datetime import date, datetime

from ulid import ULID


class Keys:
    """Keys and folders (prefixes ending in `/`) under one ARCHIVE_PREFIX."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    # -- request records ------------------------------------------------------------------

    def records_folder(self) -> str:
        return f"{self.prefix}requests/"

    def record(self, request_id: str) -> str:
        return f"{self.records_folder()}{request_id}.json"

    def record_id(self, key: str) -> str:
        """The request id a record key names (the inverse of `record`)."""
        return key[len(self.records_folder()) : -len(".json")]

    def idempotency(self, key_hash: str) -> str:
        return f"{self.prefix}idempotency/{key_hash}.json"

    # -- what is stored for a request -------------------------------------------------------

    def archive(self, request_id: str) -> str:
        # The date is the request's creation date, read from its ULID: deterministic.
        created = ULID.from_str(request_id).datetime
        return f"{self.prefix}archive/{created:%Y/%m/%d}/{request_id}.json"

    # -- sources found by discovery (SPEC "Sources and discovery") ------------------------------
    # Everything of one source lies under `sources/{id}/{digest}/`, the digest being the keyed
    # digest of the source's subject (`service.logs.subject_digest`, never the address or the
    # profile id): its data (`data.json`, the archive rules of the first source's archive),
    # its profile or subprofile record (`details.json`) and its events (`events/`). The first
    # source's data stays at `archive(...)`; its details, when it is a profile or subprofile,
    # lie under its own digest here too.

    def sources_folder(self, request_id: str) -> str:
        return f"{self.prefix}sources/{request_id}/"

    def source_folder(self, request_id: str, digest: str) -> str:
        return f"{self.sources_folder(request_id)}{digest}/"

    def source_request_id(self, key: str) -> str | None:
        """The request id of a key under `sources/{id}/` (None for a key elsewhere)."""
        root = f"{self.prefix}sources/"
        request_id, inside, _ = key.removeprefix(root).partition("/")
        return request_id if key.startswith(root) and inside and request_id else None

    def source_data(self, request_id: str, digest: str) -> str:
        return f"{self.source_folder(request_id, digest)}data.json"

    def source_details(self, request_id: str, digest: str) -> str:
        return f"{self.source_folder(request_id, digest)}details.json"

    def source_events(self, request_id: str, digest: str, window_start: str) -> str:
        return f"{self.source_events_folder(request_id, digest)}{window_start}.jsonl"

    def source_events_folder(self, request_id: str, digest: str) -> str:
        return f"{self.source_folder(request_id, digest)}events/"

    def quarantine(self, request_id: str, received_at: datetime) -> str:
        return f"{self.quarantine_folder(request_id)}{received_at:%Y%m%dT%H%M%S.%fZ}.bin"

    def quarantine_folder(self, request_id: str) -> str:
        return f"{self.prefix}quarantine/{request_id}/"

    def events(self, request_id: str, window_start: str) -> str:
        return f"{self.events_folder(request_id)}{window_start}.jsonl"

    def events_folder(self, request_id: str) -> str:
        return f"{self.prefix}events/{request_id}/"

    def packages_folder(self) -> str:
        return f"{self.prefix}packages/"

    def package(self, request_id: str) -> str:
        return f"{self.packages_folder()}{request_id}.zip"

    def package_id(self, key: str) -> str:
        """The request id a package key names (the inverse of `package`)."""
        return key[len(self.packages_folder()) : -len(".zip")]

    # -- indexes: empty marker objects listed in key order ----------------------------------

    def deadlines_folder(self) -> str:
        """The deadline index: one marker per request not yet answered."""
        return f"{self.prefix}deadlines/"

    def deadline_marker(self, request_id: str, due: date) -> str:
        return f"{self.deadlines_folder()}{due.isoformat()}/{request_id}"

    def schedule_folder(self) -> str:
        """The poll schedule: one marker per scheduled visit."""
        return f"{self.prefix}due/"

    def schedule_marker(self, request_id: str, when: str) -> str:
        """`when` is a schedule stamp (`service.requests.schedule.stamp`)."""
        return f"{self.schedule_folder()}{when}/{request_id}"

    def housekeeping_lease(self) -> str:
        """The housekeeping lease: which replica runs census, janitor, backfill and retention
        (`service.collect.housekeeping`), until when, and its last census."""
        return f"{self.prefix}leases/housekeeping.json"

    def retention_folder(self) -> str:
        """Requests that ended without a package (failed, expired; later refused): one marker
        per request under the UTC day it ended, so retention finds those due by listing only
        the days `RETENTION_DAYS` ago and earlier (`service.answer.retention`)."""
        return f"{self.prefix}retention/"

    def retention_marker(self, request_id: str, ended: date) -> str:
        return f"{self.retention_folder()}{ended.isoformat()}/{request_id}"

    def retention_marker_parts(self, key: str) -> tuple[date, str]:
        """The day and request id a retention marker names (the inverse of
        `retention_marker`); ValueError for a key of another shape."""
        day, request_id = key[len(self.retention_folder()) :].split("/")
        return date.fromisoformat(day), request_id

    def migration_done(self, name: str) -> str:
        """The marker a finished migration leaves, so later processes skip it."""
        return f"{self.prefix}migrations/{name}.done"

    def migration_progress(self, name: str) -> str:
        """Where a migration in progress notes how far it got, so whichever replica runs
        it next goes on from there."""
        return f"{self.prefix}migrations/{name}.json"

    # -- the start-up proof and the events export -------------------------------------------

    def probes_folder(self) -> str:
        return f"{self.prefix}startup-probe/"

    def probe(self, name: str) -> str:
        return f"{self.probes_folder()}{name}"

    def export(self, folder: str, window: str) -> str:
        """One window of an `events --out s3` export, in the export's own folder."""
        return f"{self.prefix}exports/{folder}/{window}.jsonl"
