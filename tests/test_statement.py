"""The article-15 statement: built-in defaults, a company's TOML file in their place, and a file
that lacks an entry stopping `serve` with one line naming it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from service.answer.statement import (
    _DEFAULTS,
    DEFAULT_STATEMENT,
    LANGUAGES,
    TEXTS,
    load_statement,
)
from service.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def toml(document: dict[str, Any]) -> str:
    """A TOML file of tables of strings (JSON strings are TOML basic strings)."""
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
        for name, table in document.items()
    )


def company(**changes: dict[str, Any]) -> dict[str, Any]:
    document = {name: dict(table) for name, table in _DEFAULTS.items()}
    document["contact"] = {
        "name": "Privacy desk, Koffie B.V.",
        "email": "privacy@koffie.test",
        "address": "Postbus 1, 1000 AA Amsterdam",
    }
    for name, table in changes.items():
        document[name] = {**document.get(name, {}), **table}
    return document


def test_the_defaults_say_everything_article_15_asks_in_both_languages() -> None:
    statement = load_statement(None)
    assert statement is DEFAULT_STATEMENT
    assert statement.authority.name == "Autoriteit Persoonsgegevens"
    assert statement.authority.url == "https://autoriteitpersoonsgegevens.nl"
    assert statement.contact.placeholder and "[contact]" in statement.contact.email
    for language in LANGUAGES:
        texts = statement.texts(language)
        assert all(getattr(texts, name) for name in TEXTS)
        assert "Copernica" in texts.recipients
        assert all(f" {n}" in texts.rights for n in (16, 17, 18, 21)) and "77" in texts.complaint
    assert statement.texts("de") is statement.en


def test_a_company_file_replaces_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "statement.toml"
    path.write_text(toml(company(nl={"storage": "Wij bewaren alles één jaar."})))

    statement = load_statement(str(path))

    assert statement.contact.name == "Privacy desk, Koffie B.V."
    assert statement.contact.address == "Postbus 1, 1000 AA Amsterdam"
    assert not statement.contact.placeholder
    assert statement.nl.storage == "Wij bewaren alles één jaar."
    assert statement.en.storage == DEFAULT_STATEMENT.en.storage


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"nl": {"rights": None}}, "missing [nl].rights"),
        ({"en": {"purposes": "  "}}, "[en].purposes must be text, not empty"),
        ({"en": {"purpose": "typo"}}, "unknown entry [en].purpose"),
        ({"authority": {"url": "javascript:alert(1)"}}, "[authority].url must be an http(s)"),
        ({"contact": {"email": "nobody"}}, "[contact].email must be an e-mail address"),
        ({"de": {"purposes": "Zwecke"}}, "unknown entry [de]"),
    ],
)
def test_an_entry_missing_or_malformed_is_named(
    tmp_path: Path, document: dict[str, Any], error: str
) -> None:
    changed = company(**document)
    for table in changed.values():
        for key in [k for k, v in table.items() if v is None]:
            del table[key]
    path = tmp_path / "statement.toml"
    path.write_text(toml(changed))
    with pytest.raises(ConfigError, match=rf"^CONTROLLER_STATEMENT: {re.escape(error)}"):
        load_statement(str(path))


async def test_serve_refuses_to_start_with_an_incomplete_statement(tmp_path: Path) -> None:
    document = company()
    del document["nl"]["rights"]
    path = tmp_path / "statement.toml"
    path.write_text(toml(document))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COPERNICA_ACCESS_TOKEN": "t",
        "CALLBACK_SECRET": "s",
        "API_TOKEN": "a",
        "ARCHIVE_BUCKET": "b",
        "S3_ENDPOINT_URL": "http://127.0.0.1:9",  # never reached: start-up stops before S3
        "PORT": "0",
        "ADMIN_PORT": "0",
        "CONTROLLER_STATEMENT": str(path),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        cwd=tmp_path,  # no .env of the checkout
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)

    assert proc.returncode == 2
    assert err.decode().splitlines() == [
        "configuration error: CONTROLLER_STATEMENT: missing [nl].rights"
    ]
    assert b"serving" not in out
