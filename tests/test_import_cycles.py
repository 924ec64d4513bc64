"""No import cycles among the worker's modules, and no module imported twice under two names.

Every import counts, also those inside functions and under TYPE_CHECKING: a cycle hidden in a
function still means two modules that cannot be read or changed one without the other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from code_layout import ROOT, worker_modules


def imports_of(path, modules: set[str]) -> set[str]:
    """The worker modules that `path` imports (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    modules = worker_modules()
    names = set(modules)
    return {name: imports_of(path, names) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_worker_module_imports_itself_back() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["handler"], "the graph holds the worker's modules"
    assert cycles(graph) == []


def test_no_package_imports_itself_back() -> None:
    """The packages in one direction as well (jobs -> inference -> engine, never back)."""
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        top = module.split(".")[0]
        graph.setdefault(top, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] != top)
    assert cycles(graph) == []


def test_importing_the_handler_loads_each_module_once() -> None:
    """In a fresh interpreter, no source file is loaded twice under two names (say `aligner` and
    `text.aligner`): two copies would hold two sets of globals and two classes of each type."""
    script = (
        "import json, sys; import handler; "
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    files: dict[str, list[str]] = {}
    for name, path in json.loads(done.stdout.splitlines()[-1]).items():
        if path and Path(path).resolve().is_relative_to(ROOT) and ".venv" not in path:  # the project's own files
            files.setdefault(path, []).append(name)
    twice = {path: names for path, names in files.items() if len(names) > 1}
    assert not twice, twice
    assert len(files) > 30, "the handler imports the worker's modules"
