"""The payload check: fed in arbitrary chunks, it judges like a full parse would, and its two
paths (a body held whole and checked by simdjson, a larger one streamed through yajl) give the
same verdict and reason for every body here: `judge` runs both and compares."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.intake.payload import (
    MAX_DEPTH,
    PayloadCheck,
    Result,
    Verdict,
    is_plain_not_available,
)
from service.requests.ledger import Addressee, Ledger
from service.requests.records import AccessRequest, DataRequest

MIB = 1024 * 1024


def judge(body: bytes, chunk: int = 7, max_token: int = 4 * MIB) -> Result:
    """The verdict, the same every way the check can run: streamed through yajl; whole by
    simdjson, from chunks it kept or from the caller's buffer (as the intake runs it); and
    switching from whole to streamed half-way, either way."""
    results = []
    for whole_bytes in (0, len(body) + 1, len(body) // 2 + 1):
        for from_caller in (False, True):
            buffer = bytearray()
            check = PayloadCheck(
                max_token,
                whole_bytes=whole_bytes,
                buffered=(lambda: buffer) if from_caller else None,  # noqa: B023
            )
            for i in range(0, len(body), chunk):
                check.feed(body[i : i + chunk])
                buffer += body[i : i + chunk]
            results.append(check.finish())
    streamed = results[0]
    assert all(result == streamed for result in results), (body[:200], results)
    return streamed


def good(info_id: object = "alice@example.com", kind: str = "email") -> bytes:
    return json.dumps(
        {"info": {"type": kind, "id": info_id}, "data": [["MIME"], [{"o": 1}]]}
    ).encode()


def test_ready_payload_is_data() -> None:
    result = judge(good())
    assert (result.verdict, result.info_type, result.info_id) == (
        Verdict.DATA,
        "email",
        "alice@example.com",
    )


def test_member_order_does_not_matter() -> None:
    body = b'{"data": [], "extra": {"info": 1}, "info": {"id": 42, "type": "profile"}}'
    result = judge(body)
    assert (result.verdict, result.info_type, result.info_id) == (Verdict.DATA, "profile", 42)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "invalid JSON"),
        (b'{"info": {"type": "email", "id": "a@b.c"}, "data": [', "invalid JSON"),
        (b"[1, 2]", "top-level JSON value must be an object"),
        (b'"text"', "top-level JSON value must be an object"),
        (b'{"data": []}', "member 'info' is missing"),
        (b'{"info": {"type": "email", "id": "a@b.c"}}', "member 'data' is missing"),
        (b'{"info": [], "data": []}', "member 'info' must be an object"),
        (
            b'{"info": {"type": "email", "id": "a@b.c"}, "data": {}}',
            "member 'data' must be an array",
        ),
        (b'{"info": {"type": "person", "id": "a@b.c"}, "data": []}', "info.type must be"),
        (b'{"info": {"type": "email", "id": [1]}, "data": []}', "info.id must be"),
        (b'{"info": {"type": "email", "id": true}, "data": []}', "info.id must be"),
        (b'{"info": {"type": "email", "id": "a@b.c"}, "data": [], "data": []}', "duplicate"),
        (b'{"info": {"type": "email", "id": "a", "id": "b"}, "data": []}', "duplicate"),
        (b'{"info": {"type": "email", "id": "a@b.c"}, "data": [NaN]}', "invalid JSON"),
        (b'{"info": {"type": "email", "id": "a@b.c"}, "data": []} trailing', "invalid JSON"),
        (b'\xef\xbb\xbf{"info": {"type": "email", "id": "a@b.c"}, "data": []}', "invalid JSON"),
        (b'{"info": {"type": "email", "id": "\xff"}, "data": []}', "invalid JSON"),
    ],
)
def test_bad_bodies_are_invalid_with_a_reason(body: bytes, reason: str) -> None:
    result = judge(body)
    assert result.verdict is Verdict.INVALID
    assert reason in result.reason


def test_not_available_forms() -> None:
    body = b'{"info": {"type": "email", "id": "a@b.c"}, "data": "Data not available (yet)"}'
    assert judge(body).verdict is Verdict.NOT_AVAILABLE
    assert is_plain_not_available(b"Data not available (yet)")
    assert is_plain_not_available(b' "data not available (yet)"\n')
    assert not is_plain_not_available(b"Data not available (yet)" + b" " * 60)
    assert not is_plain_not_available(b"Data available")


def test_deep_nesting_is_refused_without_recursion() -> None:
    body = b'{"info": {"type": "email", "id": "a@b.c"}, "data": ' + b"[" * 100_000
    result = judge(body, chunk=65536)
    assert result.verdict is Verdict.INVALID
    assert "nesting" in result.reason


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
def test_both_checkers_cap_nesting_at_the_same_depth(depth: int) -> None:
    body = b'{"info": {"type": "email", "id": "a"}, "data": ' + b"[" * (depth - 1)
    body += b"]" * (depth - 1) + b"}"
    result = judge(body, chunk=4096)
    assert result.verdict is (Verdict.DATA if depth <= MAX_DEPTH else Verdict.INVALID)


@pytest.mark.parametrize(
    "body",
    [
        b'{"info": {"type": "email", "id": "a"}, "data": [12345678901234567890123456789]}',
        b'{"info": {"type": "email", "id": "a"}, "data": [1e400, -1E-400, 0.5e+3]}',
        b'{"info": {"type": "email", "id": "a"}, "data": ["\\ud800 lone surrogate"]}',
        b'{"info": {"type": "profile", "id": 123456789012345678901234}, "data": []}',
        b'{"info": {"type": "email", "id": 1.5}, "data": []}',
        b'{"info": {"type": "email", "id": "a", "extra": {"id": 1}}, "data": [], "z": 1}',
        b'{"data": "Data not available (yet)"}',
        b'{"info": 5, "data": "Data not available (yet)"}',
        b'  {"info": {"type": "email", "id": "a"}, "data": []}  \n',
        b'{"info": {"type": "email", "id": "a"}, "data": ["\xed\xa0\x80"]}',
        b'{"info": {"type": "email", "id": "a"}, "data": ["\xc0\xaf overlong"]}',
        b'{"info": {"type": "email", "id": "a"}, "data": ["caf\xc3\xa9 \xf0\x9f\x98\x80"]}',
    ],
)
def test_edge_cases_get_one_verdict_from_both_checkers(body: bytes) -> None:
    judge(body)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), min_size=1, max_size=4)
)
def test_mutated_bodies_get_one_verdict_from_both_checkers(edits: list) -> None:
    body = bytearray(good(info_id="a@b.c"))
    for at, replacement in edits:
        at %= len(body)
        body[at : at + len(replacement)] = replacement
    judge(bytes(body), chunk=5)


def test_one_huge_token_is_refused_before_it_is_buffered_whole() -> None:
    check = PayloadCheck(max_token_bytes=MIB)
    check.feed(b'{"info": {"type": "email", "id": "a@b.c"}, "data": ["')
    fed = 0
    while not check.failed and fed < 10 * MIB:
        check.feed(b"x" * 65536)
        fed += 65536
    assert check.failed and "single JSON token" in (check.error or "")
    assert fed <= MIB + 2 * 65536


def addressee(kind: str, subject_id: str) -> Addressee:
    record = AccessRequest.new("01ARZ3NDEKTSV4RRFFQ69G5FAV", DataRequest(kind, subject_id))
    return Ledger(None, b"key").addressee_of(record)  # type: ignore[arg-type]


def test_subject_matching() -> None:
    assert addressee("email", "Alice@Example.com").matches("email", "alice@example.COM")
    assert not addressee("email", "alice@example.com").matches("email", "bob@example.com")
    assert not addressee("email", "alice@example.com").matches("profile", "alice@example.com")
    assert addressee("profile", "42").matches("profile", 42)
    assert addressee("profile", "42").matches("profile", "42")
    assert not addressee("profile", "42").matches("profile", 43)
    assert not addressee("profile", "1").matches("profile", True)


@pytest.mark.parametrize(
    ("kind", "mine", "info_type", "info_id", "expected"),
    [
        ("email", "alice@example.com", "email", " alice@example.com ", True),
        ("email", "1", "email", 1, False),
        ("profile", "42", "profile", " 42 ", True),
        ("profile", "42", "profile", 42.0, False),
        ("subprofile", "7", "subprofile", 7, True),
        ("subprofile", "7", "profile", 7, False),
    ],
)
def test_more_subject_matching(
    kind: str, mine: str, info_type: object, info_id: object, expected: bool
) -> None:
    assert addressee(kind, mine).matches(info_type, info_id) is expected


def test_a_remembered_addressee_holds_no_address() -> None:
    assert "alice@example.com" not in repr(addressee("email", "alice@example.com"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(data=st.lists(json_values, max_size=5), chunk=st.integers(1, 64))
def test_any_valid_payload_in_any_chunking_is_data(data: list, chunk: int) -> None:
    body = json.dumps({"info": {"type": "email", "id": "a@b.c"}, "data": data}).encode()
    assert judge(body, chunk=chunk).verdict is Verdict.DATA


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 200), chunk=st.integers(1, 64))
def test_any_truncation_is_invalid(cut: int, chunk: int) -> None:
    body = good()
    cut = min(cut, len(body) - 1)
    assert judge(body[:cut], chunk=chunk).verdict is Verdict.INVALID
