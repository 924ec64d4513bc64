"""How `make test` shares the tests among its pytest-xdist processes (`--dist loadgroup`).

A module that marks itself `pytestmark = pytest.mark.xdist_group("name")` runs whole in one process,
together with every other module of that name: the module- and session-scoped fixtures they share (a
worker stack, a compiled decode step) are built once. Every other test is scheduled on its own, so long
files spread over the processes.

Order: work that declares a longer timeout than the default (`pytest.mark.timeout(...)` on the test or
its module: minutes of compiling, a full-size model) starts first, longest first, so that no process is
left with one of them at the end while the others idle; then the larger groups, then the rest.

xdist's own loadgroup renames each marked test's id, which pytest 9 no longer allows (ids are read-only
there, and the marks would be silently ignored), so this plugin reads the marks from the test files'
source, in the controlling process, which collects no tests itself.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Marks:
    """What the test files declare, keyed as test ids begin ("tests/test_x.py", "tests/test_x.py::test_y")."""

    groups: dict[str, str] = field(default_factory=dict)  # module -> its xdist_group
    timeouts: dict[str, float] = field(default_factory=dict)  # module or test -> its declared timeout (s)


def mark_calls(node: ast.AST, name: str) -> list[ast.Call]:
    """Every `....<name>(...)` call in `node` whose first argument is a constant."""
    return [
        call
        for call in ast.walk(node)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == name
        and call.args
        and isinstance(call.args[0], ast.Constant)
    ]


def read_marks(root: Path) -> Marks:
    marks = Marks()
    for path in sorted((root / "tests").rglob("test_*.py")):
        module = path.relative_to(root).as_posix()
        for node in ast.parse(path.read_text()).body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if "pytestmark" in targets:
                for call in mark_calls(node.value, "xdist_group"):
                    marks.groups[module] = str(call.args[0].value)
                for call in mark_calls(node.value, "timeout"):
                    marks.timeouts[module] = float(call.args[0].value)
            if isinstance(node, ast.FunctionDef):
                for decorator in node.decorator_list:
                    for call in mark_calls(decorator, "timeout"):
                        marks.timeouts[f"{module}::{node.name}"] = float(call.args[0].value)
    return marks


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    marks = read_marks(config.rootpath)

    def declared_timeout(scope: str) -> float:
        module, _, rest = scope.partition("::")
        test = f"{module}::{rest.split('[', 1)[0]}" if rest else module
        return max(marks.timeouts.get(module, 0.0), marks.timeouts.get(test, 0.0))

    class ByGroup(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return marks.groups.get(nodeid.split("::", 1)[0], nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the first assignment: the queue is complete, in xdist's order by size
                first_test = {scope: next(iter(tests)) for scope, tests in self.workqueue.items()}
                queue = sorted(self.workqueue.items(), key=lambda item: -declared_timeout(first_test[item[0]]))
                self.workqueue.clear()
                self.workqueue.update(queue)
                self.ordered = True
            super()._assign_work_unit(node)

    return ByGroup(config, log)
