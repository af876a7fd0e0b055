"""Mutation check of the conditional writes: each one removed in turn, its tests must go red.

`python -m tests.mutate` (or `make mutate`) copies the checkout (tracked and untracked, not
ignored files) into a scratch directory, runs the guarding tests there once unmutated (they
must pass), then for each conditional write in `MUTATIONS` removes that one condition by an
exact textual edit, runs the tests that guard it, and restores the file. It prints a table
(condition, file:line, tests run, result: red = caught, green = MISSED) and exits 1 if any
mutation survived, 2 if the tool itself could not do its job (an edit whose text is no longer
there, an unmutated run that is not green, tests that did not run).

The tests run with this checkout's virtualenv interpreter, with the scratch copy as working
directory and first on PYTHONPATH, so the scratch `service` package is imported, not the
editable install; a pytest plugin hook in this module (`-p tests.mutate`) checks that in every
run and fails the run otherwise.

Takes about 1.5 minutes on the 2-core development machine (measured 2026-11-24: 88 s, of
which 39 s the unmutated run and 4-7 s each mutation; a run under heavy load from other work
can take two to three times as long).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
SCRATCH_ENV = "MUTATE_SCRATCH_ROOT"

CW = "tests/test_conditional_writes.py"


@dataclass(frozen=True)
class Mutation:
    """Remove one condition: in `path`, inside function `where` ("Class.method" or
    "function"), the one match of `pattern` becomes `replacement`."""

    name: str
    path: str
    where: str
    pattern: str
    replacement: str
    tests: tuple[str, ...]
    note: str = ""


@dataclass
class Outcome:
    mutation: Mutation | None
    line: int = 0
    run: int = 0
    failed: list[str] = field(default_factory=list)
    output: str = ""  # the end of pytest's output
    seconds: float = 0.0

    @property
    def caught(self) -> bool:
        return bool(self.failed)


MUTATIONS = (
    Mutation(
        "(a) If-None-Match on a streamed upload's single PutObject",
        "service/storage/s3.py",
        "StreamedUpload.commit",
        r"\n\s*if_none_match=True,",
        "",
        (
            f"{CW}::test_a_different_second_body_leaves_the_acknowledged_archive",
            f"{CW}::test_of_two_uploads_to_one_key_only_the_first_commit_counts[moto-single-put]",
            "tests/test_callbacks.py::test_repeat_and_concurrent_deliveries_make_one_object",
        ),
    ),
    Mutation(
        "(b) If-None-Match on CompleteMultipartUpload",
        "service/storage/s3.py",
        "ArchiveStore.complete_upload",
        r'\n\s*IfNoneMatch="\*",',
        "",
        (
            f"{CW}::test_racing_large_deliveries_keep_the_acknowledged_archive",
            f"{CW}::test_of_two_uploads_to_one_key_only_the_first_commit_counts[moto-multipart]",
        ),
        "also refused by the start-up probe (store_check), which calls complete_upload",
    ),
    Mutation(
        "(c) If-Match on a record update (Ledger.save)",
        "service/requests/ledger.py",
        "Ledger.save",
        r",\s*if_match=etag",
        "",
        (
            f"{CW}::test_two_replicas_taking_the_lease_from_one_read_only_one_wins",
            f"{CW}::test_an_extension_made_while_the_poller_works_is_not_undone",
            "tests/test_lease_model.py::test_leases_and_schedule_hold_whatever_the_interleaving",
        ),
    ),
    Mutation(
        "(d) If-None-Match on record creation (Ledger.create)",
        "service/requests/ledger.py",
        "Ledger.create",
        r",\s*if_none_match=True",
        "",
        (
            f"{CW}::test_a_record_is_created_once",
            f"{CW}::test_a_stalled_filer_resuming_after_a_takeover_does_not_file_twice",
        ),
    ),
    Mutation(
        "(e) If-None-Match on the Idempotency-Key claim",
        "service/collect/filing.py",
        "Filing._claim_key",
        r",\s*if_none_match=True",
        "",
        (
            f"{CW}::test_one_idempotency_key_files_one_request",
            "tests/test_api.py::test_idempotency_key_files_once",
        ),
    ),
    Mutation(
        "(f) If-None-Match on an events window (S3Sink.write)",
        "service/collect/events.py",
        "S3Sink.write",
        r"\n\s*if_none_match=True,",
        "",
        (f"{CW}::test_an_events_window_stored_once_is_never_replaced",),
    ),
    Mutation(
        "(g) ArchiveStore.put passes If-None-Match on",
        "service/storage/s3.py",
        "ArchiveStore.put",
        r'extra\["IfNoneMatch"\] = "\*"',
        "pass",
        (
            f"{CW}::test_a_different_second_body_leaves_the_acknowledged_archive",
            f"{CW}::test_a_record_is_created_once",
        ),
        "every single-put condition at once; also refused by the start-up probe",
    ),
    Mutation(
        "(h) ArchiveStore.put passes If-Match on",
        "service/storage/s3.py",
        "ArchiveStore.put",
        r'extra\["IfMatch"\] = if_match',
        "pass",
        (f"{CW}::test_two_replicas_taking_the_lease_from_one_read_only_one_wins",),
        "also refused by the start-up probe",
    ),
    Mutation(
        "(i) start-up probe: If-None-Match on the second PutObject",
        "service/storage/proof.py",
        "_prove",
        r'b"second", if_none_match=True',
        'b"second"',
        (
            "tests/test_store_check.py"
            "::test_a_store_with_conditional_writes_passes_and_leaves_nothing",
        ),
        "a probe, not a guarantee: without it the service refuses every store",
    ),
    Mutation(
        "(j) start-up probe: If-Match with a stale ETag",
        "service/storage/proof.py",
        "_prove",
        r"""b"changed", if_match=f'"\{etag\.strip\(chr\(34\)\)\}x"'""",
        'b"changed"',
        (
            "tests/test_store_check.py"
            "::test_a_store_with_conditional_writes_passes_and_leaves_nothing",
        ),
        "a probe, not a guarantee: without it the service refuses every store",
    ),
    Mutation(
        "(k) If-None-Match on an expired request's tombstone (RequestWork._close_archive)",
        "service/collect/work.py",
        "RequestWork._close_archive",
        r"\n\s*if_none_match=True,",
        "",
        (
            "tests/test_poller.py"
            "::test_closing_an_expired_requests_key_never_replaces_data_that_landed",
        ),
    ),
)

# Conditional writes in service/ deliberately left out, and why.
NOT_MUTATED = (
    (
        "service/storage/proof.py _prove: the probe's first PutObject (If-None-Match)",
        "writes a fresh key: on a store that honours conditions, removing it changes nothing",
    ),
)


class ToolError(Exception):
    """The tool could not do its job (not a survived mutation)."""


# -- the edit --------------------------------------------------------------------------------


def function_span(text: str, where: str) -> tuple[int, int]:
    """Character span of function `where` ("Class.method" or "function") in `text`."""
    start = 0
    parts = where.split(".")
    if len(parts) == 2:
        found = re.search(rf"^class {re.escape(parts[0])}\b.*:$", text, re.MULTILINE)
        if found is None:
            raise ToolError(f"class {parts[0]} not found")
        start = found.end()
    name = parts[-1]
    found = re.compile(rf"^([ ]*)(?:async )?def {re.escape(name)}\(", re.MULTILINE).search(
        text, start
    )
    if found is None:
        raise ToolError(f"def {where} not found")
    indent = len(found.group(1))
    # The function ends at the next non-blank line indented no deeper than its `def` (a
    # line starting with `)` closes the def's own signature).
    end_pattern = re.compile(rf"^[ ]{{0,{indent}}}[^\s)]", re.MULTILINE)
    body_start = text.index("\n", found.end()) + 1
    end = end_pattern.search(text, body_start)
    return found.start(), end.start() if end else len(text)


def mutate(text: str, mutation: Mutation) -> tuple[str, int]:
    """The text with the one condition removed, and the line it was on (1-based)."""
    first, last = function_span(text, mutation.where)
    matches = list(re.finditer(mutation.pattern, text[first:last]))
    if len(matches) != 1:
        raise ToolError(
            f"{mutation.path}: {mutation.where} has {len(matches)} matches of "
            f"{mutation.pattern!r}, not exactly one: update tests/mutate.py"
        )
    at = first + matches[0].start()
    changed = text[:at] + matches[0].expand(mutation.replacement) + text[first + matches[0].end() :]
    if changed == text:
        raise ToolError(f"{mutation.name}: the edit changed nothing")
    matched = matches[0].group(0)
    line = text.count("\n", 0, at) + 1 + (len(matched) - len(matched.lstrip("\n")))
    return changed, line


# -- the runs --------------------------------------------------------------------------------


def copy_checkout(target: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        relative = raw.decode()
        source = ROOT / relative
        if not source.is_file():
            continue  # deleted in the work tree
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


def environment(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(scratch)
    env[SCRATCH_ENV] = str(scratch)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["LEASE_MODEL_SHRINK"] = "0"  # red or green is all we need (tests/test_lease_model.py)
    return env


def check_imports(scratch: Path) -> str:
    """Where `service` comes from in the runs: must be the scratch copy."""
    where = subprocess.run(
        [str(PYTHON), "-c", "import service; print(service.__file__)"],
        cwd=scratch,
        env=environment(scratch),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(scratch.resolve()):
        raise ToolError(f"the runs would import service from {where}, not from {scratch}")
    return where


def run_tests(scratch: Path, tests: tuple[str, ...], label: str) -> Outcome:
    report = scratch / f"junit-{re.sub(r'[^a-z0-9]+', '-', label.lower())[:40]}.xml"
    started = time.monotonic()
    proc = subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.mutate",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            # On moto: the tests of both stores (tests/conftest.py) guard the same code twice.
            "-k",
            "not seaweedfs",
            *tests,
        ],
        cwd=scratch,
        env=environment(scratch),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    outcome = Outcome(None, seconds=time.monotonic() - started)
    if proc.returncode not in (0, 1) or not report.exists():
        raise ToolError(
            f"{label}: pytest exited {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - our own file
        if case.find("skipped") is not None:
            continue
        outcome.run += 1
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            why = " ".join((bad.get("message") or "").split())[:110]
            outcome.failed.append(f"{case.get('classname')}::{case.get('name')}\n      {why}")
    if outcome.run == 0:
        raise ToolError(f"{label}: no test ran\n{proc.stdout[-3000:]}")
    if proc.returncode == 1 and not outcome.failed:
        raise ToolError(f"{label}: pytest failed outside the tests\n{proc.stdout[-3000:]}")
    outcome.output = proc.stdout[-2000:]
    return outcome


# -- the pytest side: prove which `service` the run imports -----------------------------------


def pytest_sessionstart(session: object) -> None:
    scratch = os.environ.get(SCRATCH_ENV)
    if not scratch:
        return
    import service

    where = Path(service.__file__ or "").resolve()
    if not where.is_relative_to(Path(scratch).resolve()):
        raise SystemExit(f"tests.mutate: service imported from {where}, not from {scratch}")


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only mutations whose name contains this text")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or args.only in m.name]
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="mutate-"))
    try:
        copy_checkout(scratch)
        print(f"scratch copy: {scratch}; service imported from {check_imports(scratch)}")
        # Check every edit applies before spending minutes on test runs.
        for mutation in mutations:
            mutate((scratch / mutation.path).read_text(), mutation)
        every_test = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        print(f"unmutated: {len(every_test)} test selections ...", flush=True)
        baseline = run_tests(scratch, every_test, "unmutated")
        if baseline.failed:
            raise ToolError(
                "the unmutated checkout is not green: "
                + ", ".join(baseline.failed)
                + "\n"
                + baseline.output
            )
        print(f"unmutated: {baseline.run} tests green in {baseline.seconds:.0f} s", flush=True)
        outcomes = []
        for mutation in mutations:
            path = scratch / mutation.path
            original = path.read_text()
            changed, line = mutate(original, mutation)
            path.write_text(changed)
            try:
                outcome = run_tests(scratch, mutation.tests, mutation.name)
            finally:
                path.write_text(original)
            outcome.mutation, outcome.line = mutation, line
            outcomes.append(outcome)
            verdict = "red (caught)" if outcome.caught else "GREEN (MISSED)"
            print(f"  {mutation.name}: {verdict} in {outcome.seconds:.0f} s", flush=True)
    except ToolError as exc:
        print(f"tests.mutate: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print_table(outcomes)
    print(
        f"\nunmutated run: {baseline.run} tests green in {baseline.seconds:.0f} s; "
        f"whole check {time.monotonic() - started:.0f} s"
    )
    missed = [o for o in outcomes if not o.caught]
    if missed:
        print(
            f"{len(missed)} mutation(s) SURVIVED: "
            + "; ".join(o.mutation.name for o in missed if o.mutation)
        )
        return 1
    print("every condition is guarded: each removal turned its tests red")
    return 0


def print_table(outcomes: list[Outcome]) -> None:
    rows = [("condition", "file:line", "tests run", "result")]
    for o in outcomes:
        assert o.mutation is not None
        result = (
            f"red ({len(o.failed)}/{o.run} failed)" if o.caught else f"GREEN: MISSED (0/{o.run})"
        )
        rows.append((o.mutation.name, f"{o.mutation.path}:{o.line}", str(o.run), result))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * width for width in widths))
    print("\nper mutation: the tests run, and why each red one failed")
    for o in outcomes:
        assert o.mutation is not None
        note = f" ({o.mutation.note})" if o.mutation.note else ""
        print(f"- {o.mutation.name}{note}:")
        print(f"    ran: {', '.join(t.rsplit('::', 1)[-1] for t in o.mutation.tests)}")
        for name in o.failed:
            print(f"    red: {name}")
    print("\nnot mutated:")
    for what, why in NOT_MUTATED:
        print(f"- {what}: {why}")


if __name__ == "__main__":
    sys.exit(main())
