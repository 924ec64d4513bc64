"""The documentation's tables are the code's: the job contract, the settings, the output formats.

Also: every relative link in the docs points at a file that exists (docs move; links must follow).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from audio.formats import markdown_table
from config import Settings
from jobs.schema import JobInput, _public_fields

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CLAUDE.md", ROOT / "bridge" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def table_after(path: Path, heading: str) -> list[list[str]]:
    """The rows (cells as text) of the first table under `heading`."""
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and its rule


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_contract_table_lists_every_job_field_in_order() -> None:
    rows = table_after(ROOT / "docs" / "api.md", "## Input")
    assert [backticked(row[0])[0] for row in rows] == _public_fields(JobInput)


def _shown(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_settings_table_lists_every_setting_with_its_default() -> None:
    rows = table_after(ROOT / "docs" / "operations.md", "## Settings")
    seen = []
    for row in rows:
        names, defaults = backticked(row[0]), backticked(row[1])
        seen += names
        fields = [Settings.model_fields[name.lower()] for name in names]
        if defaults or any(_shown(field.default) for field in fields):
            assert len(defaults) == len(names), row
            for field, default in zip(fields, defaults, strict=True):
                assert _shown(field.default) == default, (row, field.default)
    assert sorted(seen) == sorted(name.upper() for name in Settings.model_fields)


def test_the_format_table_is_generated_from_the_registry() -> None:
    assert markdown_table() in (ROOT / "docs" / "api.md").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_no_document_points_at_the_old_implementation_file() -> None:
    for path in [*DOCS, *ROOT.glob("*.py")]:
        assert "IMPLEMENTATION.md" not in path.read_text(), path
