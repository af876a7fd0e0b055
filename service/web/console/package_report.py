"""The report inside an access package, read with two ranged GETs whatever the ZIP's size.

`report.html` sits near the end of the package, after `data.json` (which can be hundreds of
MB), so reading the ZIP from the start is out of the question. A ZIP ends with its central
directory, which names each member's offset and compressed size: one GET of the last
`TAIL_BYTES` finds it, a second GET fetches the report's bytes, and the standard library's
`zipfile` parses both (ZIP64 included) and checks the report's CRC.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

from service.storage.s3 import ArchiveStore

REPORT_NAME = "report.html"
# End of central directory (22 bytes + a comment of up to 64 KiB), the ZIP64 records, and a
# central directory of four members fit with room to spare.
TAIL_BYTES = 128 * 1024
LOCAL_HEADER_BYTES = 30
MAX_REPORT_BYTES = 64 * 1024 * 1024  # the report caps what it lists; this is far above


class ReportUnreadable(Exception):
    """The package is not a ZIP with a report this console can show; says why."""


async def read_report(store: ArchiveStore, key: str, size: int) -> bytes:
    """The bytes of `report.html` in the package at `key` (`size` bytes long)."""
    sparse = _Sparse(size)
    tail_start = max(0, size - TAIL_BYTES)
    sparse.add(tail_start, await store.read_range(key, tail_start, size - 1))
    try:
        with zipfile.ZipFile(sparse) as archive:
            info = archive.getinfo(REPORT_NAME)
            if info.file_size > MAX_REPORT_BYTES:
                raise ReportUnreadable(f"{REPORT_NAME} is {info.file_size} bytes, too large")
            # The local header repeats the name and may carry an extra field (at most 64 KiB).
            start = info.header_offset
            end = min(
                size,
                start + LOCAL_HEADER_BYTES + 2 * 65535 + info.compress_size,
            )
            if not sparse.holds(start, end):
                sparse.add(start, await store.read_range(key, start, end - 1))
            return archive.read(info)
    except (zipfile.BadZipFile, KeyError, _Missing, EOFError) as exc:
        raise ReportUnreadable(f"the package holds no readable {REPORT_NAME} ({exc})") from None


class _Missing(Exception):
    """zipfile asked for bytes that were not fetched (a malformed directory)."""


class _Sparse(io.RawIOBase):
    """A read-only, seekable file of `size` bytes of which only fetched ranges are known."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._pos = 0
        self._ranges: list[tuple[int, bytes]] = []

    def add(self, start: int, body: bytes) -> None:
        self._ranges.append((start, body))

    def holds(self, start: int, end: int) -> bool:
        return any(s <= start and end <= s + len(b) for s, b in self._ranges)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        for start, body in self._ranges:
            if start <= self._pos and end <= start + len(body):
                chunk = body[self._pos - start : end - start]
                self._pos = end
                return chunk
        raise _Missing(f"bytes {self._pos}-{end} were not fetched")

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)
