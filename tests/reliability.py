"""The reliability line at the end of a pytest run, counted from the tests that ran and passed:

    reliability: 95 bad jobs + 75 bad bridge requests, 27 faults injected, 100 jobs under load, losses: 0

Tests say what they exercised:
  @pytest.mark.bad_input        one malformed job through the worker loop
  @pytest.mark.fault            one injected fault (a parametrized case counts once per case)
  reliability.record(kind, n)   counts known at run time: "under_load" (jobs checked in a burst) and
                                "losses" (jobs lost or duplicated; counted even when the test fails)
Marks and "under_load" count only when the test passes. The bridge's malformed-request corpus runs
in vitest (workerd); the count is its passed cases in bridge/.vitest-report.json, which every
vitest run writes (`make test` runs vitest just before pytest).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BRIDGE = ROOT / "bridge"
VITEST_REPORT = BRIDGE / ".vitest-report.json"
BRIDGE_CORPUS_SPEC = "bad_requests.spec.js"
BRIDGE_CORPUS_SUITE = "malformed requests corpus"

_totals: Counter = Counter()
_pending = pytest.StashKey[Counter]()


class Recorder:
    def __init__(self, item: pytest.Item):
        self.item = item

    def record(self, kind: str, count: int = 1) -> None:
        self.item.stash.setdefault(_pending, Counter())[kind] += count


@pytest.fixture()
def reliability(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(request.node)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bad_input: a malformed job through the worker loop (reliability line)")
    config.addinivalue_line("markers", "fault: an injected fault (reliability line)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" or (report.when == "setup" and report.failed):
        marks = [name for name in ("bad_input", "fault") if item.get_closest_marker(name)]
        pending = item.stash.get(_pending, Counter())
        if report.passed:
            _totals.update(marks)
            _totals.update(pending)
        elif marks or pending:
            _totals["failed"] += 1
            _totals["losses"] += pending["losses"]
    return report


def bridge_corpus_count() -> str:
    """The bridge corpus's passed cases from the last vitest run, or why there is no count."""
    if not VITEST_REPORT.exists():
        return "bridge corpus not run (no vitest report)"
    sources = [BRIDGE / "worker.js", *BRIDGE.glob("src/*.js"), *BRIDGE.glob("test/**/*.js*")]
    newest = max(path.stat().st_mtime for path in sources if path.exists())
    report = json.loads(VITEST_REPORT.read_text())
    passed = failed = 0
    for suite in report.get("testResults", []):
        if not suite.get("name", "").endswith(BRIDGE_CORPUS_SPEC):
            continue
        for case in suite.get("assertionResults", []):
            if BRIDGE_CORPUS_SUITE in case.get("ancestorTitles", []) and not case["title"].startswith("has at least"):
                passed += case.get("status") == "passed"
                failed += case.get("status") == "failed"
    stale = " (vitest report older than the bridge code)" if VITEST_REPORT.stat().st_mtime < newest else ""
    return f"{passed} bad bridge requests" + (f" ({failed} FAILED)" if failed else "") + stale


def summary_line() -> str:
    line = (
        f"reliability: {_totals['bad_input']} bad jobs + {bridge_corpus_count()}, "
        f"{_totals['fault']} faults injected, {_totals['under_load']} jobs under load, losses: {_totals['losses']}"
    )
    if _totals["failed"]:
        line += f"; {_totals['failed']} reliability test(s) FAILED"
    return line


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if any(_totals.values()):
        terminalreporter.write_line(summary_line())
