"""The documentation's tables are the code's: the job contract, the settings, the output formats.

Also: every relative link in the docs points at a file that exists, and at a heading that exists in
it (docs move; links must follow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from audio.formats import markdown_table
from bench import sizing
from config import Settings
from jobs.schema import JobInput, _public_fields

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    ROOT / "CLAUDE.md",
    ROOT / "IMPLEMENTATION.md",
    ROOT / "bridge" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


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


def test_the_gpu_table_is_generated_from_the_budget() -> None:
    """docs/operations.md's GPU tables are bench/sizing.py's: weights from the real configurations, the
    memory per row and the batch from the decode scheduler's budget. Regenerate with `python -m bench.sizing`."""
    assert sizing.markdown_tables() in (ROOT / "docs" / "operations.md").read_text()


def test_the_speed_estimate_counts_the_module_calls_figure_a_counted() -> None:
    """The estimate's weight reads per frame are the own loop's calls that bench figure a counted on the
    tiny model (bench/results.json): a change to what a frame calls shows up here."""
    figure_a = json.loads((ROOT / "bench" / "results.json").read_text())["details"]["a"]
    calls = figure_a["runs"]["own loop, batch 1"]["calls"]
    per_frame = {name: round(calls[name] / figure_a["frames_per_chunk"]) for name in sizing.FRAME_CALLS}
    assert per_frame == sizing.FRAME_CALLS
    steps = Settings.model_fields["default_diffusion_steps"].default
    assert figure_a["diffusion_steps"] == sizing.DIFFUSION_STEPS == steps


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces as -)."""
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:  # a repeated heading gets -1, -2, ...
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def test_anchors_are_made_as_github_makes_them() -> None:
    assert "the-decode-loop-enginedecoderpy" in anchors(ROOT / "IMPLEMENTATION.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(doc: Path) -> None:
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (doc.parent / target) if target else doc
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name} links to {target}#{anchor}, which has no such heading"
