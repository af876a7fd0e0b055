"""The `download` command: fetch a request's access package from the operator API into a
file, checking its sha256 against the ETag the service sends (the sha256 in the record)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import IO

import aiohttp

from service.config import Settings

CHUNK_BYTES = 256 * 1024


async def download(
    settings: Settings, request_id: str, out: str | None, progress: IO[str] | None = None
) -> int:
    """Write the package to `out` (default `access-package-ID.zip`); 0 on success. The file
    appears only once its bytes hash to the package's sha256."""
    assert settings.api_token is not None
    progress = progress if progress is not None else (sys.stderr if sys.stderr.isatty() else None)
    target = Path(out or f"access-package-{request_id}.zip")
    partial = target.with_name(target.name + ".part")
    headers = {"Authorization": f"Bearer {settings.api_token.reveal()}"}
    url = f"{settings.receiver_url}/v1/data-requests/{request_id}/package"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers=headers) as answer,
    ):
        if answer.status != 200:
            try:
                error = (await answer.json(content_type=None)).get("error")
            except ValueError:
                error = (await answer.text())[:200]
            print(f"error {answer.status}: {error}", file=sys.stderr)
            return 1
        expected = answer.headers.get("ETag", "").strip('"')
        total = answer.content_length or 0
        digest, written = hashlib.sha256(), 0
        try:
            # The command line's own file, written as the bytes arrive.
            with open(partial, "wb") as handle:  # noqa: ASYNC230
                async for chunk in answer.content.iter_chunked(CHUNK_BYTES):
                    handle.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if progress is not None:
                        _bar(progress, written, total)
                handle.flush()
                os.fsync(handle.fileno())
        except aiohttp.ClientError as exc:
            partial.unlink(missing_ok=True)
            print(f"error: download broke off ({type(exc).__name__}); try again", file=sys.stderr)
            return 1
    if progress is not None:
        progress.write("\n")
    actual = digest.hexdigest()
    if written != total or actual != expected:
        partial.unlink(missing_ok=True)
        print(
            f"error: the download does not match the package (sha256 {actual}, expected "
            f"{expected or 'none'}; {written} of {total} bytes); nothing written",
            file=sys.stderr,
        )
        return 1
    partial.replace(target)
    print(f"{target}  {written} bytes  sha256 {actual}")
    return 0


def _bar(stream: IO[str], done: int, total: int) -> None:
    share = done / total if total else 1.0
    filled = int(30 * share)
    stream.write(
        f"\r[{'#' * filled}{'.' * (30 - filled)}] {done / 1048576:.1f} of {total / 1048576:.1f} MiB"
    )
    stream.flush()
