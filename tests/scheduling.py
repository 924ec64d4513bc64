"""How `make test` shares the tests among its pytest-xdist processes (`--dist loadgroup`).

A module that marks itself `pytestmark = pytest.mark.xdist_group("name")` runs whole in one process,
together with every other module of that name: the module- and session-scoped fixtures they share (a
worker stack, a compiled decode step) are built once. Every other test is scheduled on its own, so long
files spread over the processes. Larger groups are handed out first (xdist's LoadScopeScheduling orders
its work by the number of tests in each). Starting the longest tests first was measured and dropped: the
compile-heavy ones then run at the same time and cost about a sixth more CPU than they save.

xdist's own loadgroup renames each marked test's id, which pytest 9 no longer allows (ids are read-only
there, and the marks would be silently ignored), so this plugin reads the marks from the test files'
source, in the controlling process, which collects no tests itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


def marked_groups(root: Path) -> dict[str, str]:
    """Test module (its path from `root`, as test ids begin) -> the group its `pytestmark` names."""
    groups = {}
    for path in sorted((root / "tests").rglob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if "pytestmark" not in targets:
                continue
            for call in ast.walk(node.value):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "xdist_group"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ):
                    groups[path.relative_to(root).as_posix()] = str(call.args[0].value)
    return groups


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    groups = marked_groups(config.rootpath)

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return groups.get(nodeid.split("::", 1)[0], nodeid)

    return ByGroup(config, log)
