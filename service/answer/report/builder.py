"""The data subject's report, the public entry: the archive's exact bytes (in chunks of any
size) and the event windows in, one self-contained HTML page out, saying in plain words what
an access request found (SPEC "Answering the access request").

The walk (`walk.py`) turns bytes into items, the findings (`findings.py`) count and keep
them under the caps (`caps.py`), the view model (`view.py`) puts them in words and the
template `templates/report.html.j2` lays them out.
"""

from __future__ import annotations

from typing import Any

import jinja2

from service.answer.report.context import ReportContext
from service.answer.report.findings import Findings
from service.answer.report.people import Record, read_details
from service.answer.report.view import report_view
from service.answer.report.walk import FEED_BLOCK, ArchiveWalker

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("service.answer.report", "templates"),
    autoescape=True,  # every value from the payload is escaped; nothing is marked safe
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters["num"] = lambda n: f"{n:,}"


class ReportBuilder:
    """Feed the data's bytes in order, add the details and events, then render the HTML.

    One source: `feed` its data.json and render. Several: `begin` each data file before its
    bytes (a message or record an earlier source had is shown once), `add_details` each
    profile's or subprofile's record."""

    def __init__(self, context: ReportContext, *, block_bytes: int = FEED_BLOCK) -> None:
        self.context = context
        self._block_bytes = block_bytes
        self._findings = Findings()
        self._walker: ArchiveWalker | None = None
        self._walks: list[ArchiveWalker] = []  # closed, in order
        self._records: dict[str, Record] = {}

    def begin(self, name: str, *, last: bool = True) -> None:
        """The next data file (`name`, as the page names it) starts; `last`: no data file
        follows it (its items need not be remembered for later ones)."""
        self._end_walk()
        self._findings.next_source(check=bool(self._walks), record=not last)
        self._walker = ArchiveWalker(
            self._findings.item,
            self._findings.group_edge,
            block_bytes=self._block_bytes,
            name=name,
        )

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the current data file, any size (see `ArchiveWalker.feed`)."""
        if self._walker is None:
            self.begin("data.json")
        assert self._walker is not None
        self._walker.feed(chunk)

    def add_details(self, source: str, body: bytes, *, complete: bool = True) -> None:
        """A profile's or subprofile's own record (`source` its name, `profile:{id}`):
        `body` its JSON, or its first DETAILS_BYTES when not `complete`."""
        self._records[source] = read_details(body, complete)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """One month window of normalised events ({"event", "time", "data"})."""
        self._findings.add_events(events)

    def render(self) -> bytes:
        """The report as UTF-8 HTML. Call once, after the last chunk and events."""
        if self._walker is None and not self._walks:
            self.begin("data.json")  # nothing was fed: the page says data.json is empty
        self._end_walk()
        view = report_view(self.context, self._findings, self._walks, self._records)
        # Rendered piece by piece: render() would first list every one of the template's
        # outputs (millions for a full report) and then hold the text and its bytes at once.
        out = bytearray()
        pieces: list[str] = []
        for piece in _ENVIRONMENT.get_template("report.html.j2").generate(report=view):
            pieces.append(piece)
            if len(pieces) >= 4096:
                out += "".join(pieces).encode("utf-8", "replace")
                pieces.clear()
        out += "".join(pieces).encode("utf-8", "replace")
        return bytes(out)

    def _end_walk(self) -> None:
        if self._walker is not None:
            self._walker.close()
            self._walks.append(self._walker)
            self._walker = None
