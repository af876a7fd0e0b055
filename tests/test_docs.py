"""The documentation against the code: the configuration reference names exactly the settings
`service/config.py` reads (with their defaults), the README stays a short guide, and every
relative link in the README and docs/ leads to a file (and heading) that exists."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "configuration.md"
LINKED = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "HISTORY.md"]

NAME = re.compile(r"`([A-Z][A-Z0-9_]*)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
REPO_PATH = re.compile(r"`((?:service|tests|bench|deploy|docs)/[\w./-]*)(?:::\w+)?`")


def config_settings() -> dict[str, str | None]:
    """Env name -> default (as config.py writes it; None: required or derived)."""
    return {f.metadata["env"]: f.metadata["default"] for f in fields(Settings)}


def section(text: str, heading: str) -> str:
    """The text under a `## heading`, up to the next heading of that level or above."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"docs/configuration.md has no '## {heading}' section"
    return match.group(1)


def reference_rows() -> dict[str, str]:
    """Setting name -> its default cell, from the table under '## Settings'."""
    rows: dict[str, str] = {}
    for line in section(REFERENCE.read_text(), "Settings").splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for name in NAME.findall(cells[0]):
            assert name not in rows, f"{name} has two rows in docs/configuration.md"
            rows[name] = cells[1]
    return rows


def not_built_yet() -> list[str]:
    listed = section(REFERENCE.read_text(), "Not built yet")
    return [m.group(1) for m in re.finditer(r"^- `([A-Z][A-Z0-9_]*)`", listed, re.M)]


def test_config_reads_each_setting_once() -> None:
    names = [f.metadata["env"] for f in fields(Settings)]
    assert len(names) == len(set(names))
    assert len(names) > 30  # the introspection found the settings at all


def test_every_setting_in_config_is_in_the_reference_and_back() -> None:
    in_code, in_docs = set(config_settings()), set(reference_rows())
    assert not in_code - in_docs, (
        f"settings missing from docs/configuration.md: {in_code - in_docs}"
    )
    assert not in_docs - in_code, (
        f"docs/configuration.md names settings config.py lacks: {in_docs - in_code}"
    )


def test_the_reference_gives_each_default_as_config_does() -> None:
    rows = reference_rows()
    wrong = {
        name: (default, rows[name])
        for name, default in config_settings().items()
        if default is not None and f"`{default}`" not in rows[name]
    }
    assert not wrong, f"defaults differ from config.py (expected, documented): {wrong}"


def test_not_built_yet_names_only_settings_config_lacks() -> None:
    planned = not_built_yet()
    assert planned, "the 'Not built yet' list is empty or unreadable"
    assert len(planned) == len(set(planned))
    built = set(planned) & set(config_settings())
    assert not built, f"listed as not built yet but read by config.py: {built}"
    assert not set(planned) & set(reference_rows())


def test_readme_is_a_short_guide() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make run" in text
    assert "make test" in text


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def leads_somewhere(page: Path, target: str) -> bool:
    """The file exists; and a heading, if the link names one in a Markdown file."""
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / file_part).resolve() if file_part else page
    if not destination.exists():
        return False
    return not anchor or destination.suffix != ".md" or anchor in anchors(destination)


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_an_existing_file_and_heading(page: Path) -> None:
    assert page.is_file()
    broken = [target for target in relative_links(page) if not leads_somewhere(page, target)]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("page", LINKED[:-1], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_named_in_the_guide_exists(page: Path) -> None:
    """Module and file paths in backticks (bench/HISTORY.md aside: its entries are dated)."""
    missing = sorted({p for p in REPO_PATH.findall(page.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"
