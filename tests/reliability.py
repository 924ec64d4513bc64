"""The reliability line at the end of a pytest run, counted from the tests that ran and passed:

    reliability: 95 bad jobs + 75 bad bridge requests, 27 faults injected, 100 jobs under load; generated: 5000 job
    inputs, 200 worker jobs, 520 audio files, 1200 bridge requests; 5 bombs refused; soak: 500 jobs; losses: 0

Tests say what they exercised:
  @pytest.mark.bad_input        one malformed job through the worker loop
  @pytest.mark.fault            one injected fault (a parametrized case counts once per case)
  reliability.record(kind, n)   counts known at run time: "under_load" (jobs checked in a burst),
                                "generated_jobs", "generated_worker_jobs", "generated_audio" (generated
                                inputs tried), "bombs_refused", and "losses" (jobs lost or duplicated;
                                counted even when the test fails)
  reliability.note(line)        a line printed under the summary (the slowest generated case of a suite)
Marks and counts other than losses count only when the test passes. The bridge's malformed-request
corpus and its property tests run in vitest (workerd); their counts come from the passed cases in
bridge/.vitest-report.json, which every vitest run writes (`make test` runs vitest just before
pytest); a property test's title says how many requests it generates ("(300 generated)"). The soak
count is the last `make soak` run's, read from bench/soak.json.

Tests may run in several processes (pytest-xdist): each test's counts and notes travel to the process
that prints the summary inside its report (`user_properties`), and are added up there.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BRIDGE = ROOT / "bridge"
VITEST_REPORT = BRIDGE / ".vitest-report.json"
BRIDGE_CORPUS_SPEC = "bad_requests.spec.js"
BRIDGE_CORPUS_SUITE = "malformed requests corpus"
BRIDGE_PROPERTY_SPEC = "properties.spec.js"
SOAK_RESULTS = ROOT / "bench" / "soak.json"

_totals: Counter = Counter()
_notes: list[str] = []
_pending = pytest.StashKey[Counter]()
_pending_notes = pytest.StashKey[list[str]]()
_PROPERTY = "reliability"  # the name of the report property that carries a test's counts and notes


class Recorder:
    def __init__(self, item: pytest.Item):
        self.item = item

    def record(self, kind: str, count: int = 1) -> None:
        self.item.stash.setdefault(_pending, Counter())[kind] += count

    def note(self, line: str) -> None:
        self.item.stash.setdefault(_pending_notes, []).append(line)


@pytest.fixture()
def reliability(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(request.node)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bad_input: a malformed job through the worker loop (reliability line)")
    config.addinivalue_line("markers", "fault: an injected fault (reliability line)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Where the test ran: its counts into its report (which pytest-xdist sends to the controller)."""
    report = yield
    if report.when == "call" or (report.when == "setup" and report.failed):
        counts: Counter = Counter()
        marks = [name for name in ("bad_input", "fault") if item.get_closest_marker(name)]
        pending = item.stash.get(_pending, Counter())
        if report.passed:
            counts.update(marks)
            counts.update(pending)
        elif marks or pending:
            counts["failed"] += 1
            counts["losses"] += pending["losses"]
        notes = item.stash.get(_pending_notes, [])
        if counts or notes:
            report.user_properties.append((_PROPERTY, {"counts": dict(counts), "notes": list(notes)}))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Where the summary is printed: add up every test's counts and notes."""
    for name, value in report.user_properties:
        if name == _PROPERTY:
            _totals.update(value["counts"])
            _notes.extend(value["notes"])


def _vitest_cases(spec: str) -> tuple[list[dict], str]:
    """The assertion results of one bridge spec in the last vitest report, and a staleness note."""
    if not VITEST_REPORT.exists():
        return [], " (no vitest report)"
    sources = [BRIDGE / "worker.js", *BRIDGE.glob("src/*.js"), *BRIDGE.glob("test/**/*.js*")]
    newest = max(path.stat().st_mtime for path in sources if path.exists())
    report = json.loads(VITEST_REPORT.read_text())
    cases = [
        case
        for suite in report.get("testResults", [])
        if suite.get("name", "").endswith(spec)
        for case in suite.get("assertionResults", [])
    ]
    stale = " (vitest report older than the bridge code)" if VITEST_REPORT.stat().st_mtime < newest else ""
    return cases, stale


def bridge_corpus_count() -> str:
    """The bridge corpus's passed cases from the last vitest run, or why there is no count."""
    if not VITEST_REPORT.exists():
        return "bridge corpus not run (no vitest report)"
    cases, stale = _vitest_cases(BRIDGE_CORPUS_SPEC)
    passed = failed = 0
    for case in cases:
        if BRIDGE_CORPUS_SUITE in case.get("ancestorTitles", []) and not case["title"].startswith("has at least"):
            passed += case.get("status") == "passed"
            failed += case.get("status") == "failed"
    return f"{passed} bad bridge requests" + (f" ({failed} FAILED)" if failed else "") + stale


def bridge_generated_count() -> str:
    """Requests the bridge's property tests generated in their passed cases ("(N generated)" in the title)."""
    cases, stale = _vitest_cases(BRIDGE_PROPERTY_SPEC)
    generated = sum(
        int(match.group(1))
        for case in cases
        if case.get("status") == "passed" and (match := re.search(r"\((\d+) generated\)", case["title"]))
    )
    failed = sum(case.get("status") == "failed" for case in cases)
    return f"{generated} bridge requests" + (f" ({failed} property FAILED)" if failed else "") + stale


def soak_count() -> str:
    """The last `make soak` run (not part of make test): its jobs and losses."""
    if not SOAK_RESULTS.exists():
        return "soak: not run"
    soak = json.loads(SOAK_RESULTS.read_text())
    verdict = "targets met" if soak.get("targets_met") else "targets MISSED"
    return f"soak: {soak.get('jobs', 0)} jobs, {soak.get('lost', 0) + soak.get('duplicated', 0)} lost ({verdict})"


def summary_line() -> str:
    line = (
        f"reliability: {_totals['bad_input']} bad jobs + {bridge_corpus_count()}, "
        f"{_totals['fault']} faults injected, {_totals['under_load']} jobs under load; "
        f"generated: {_totals['generated_jobs']} job inputs, {_totals['generated_worker_jobs']} worker jobs, "
        f"{_totals['generated_audio']} audio files, {bridge_generated_count()}; "
        f"{_totals['bombs_refused']} bombs refused; {soak_count()}; losses: {_totals['losses']}"
    )
    if _totals["failed"]:
        line += f"; {_totals['failed']} reliability test(s) FAILED"
    return line


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller prints the summary
        return
    if any(_totals.values()):
        terminalreporter.write_line(summary_line())
        for line in _notes:
            terminalreporter.write_line(f"  {line}")
