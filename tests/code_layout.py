"""The worker's modules as the tests that guard the code's shape see them: root files and packages."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The worker's packages (each a concern; IMPLEMENTATION.md maps them). tools/ and bench/ serve development.
WORKER_PACKAGES = ("audio", "deploy", "engine", "jobs", "runtime", "text")
ROOT_MODULES = ("config", "handler", "inference")


def worker_modules() -> dict[str, Path]:
    """Every module of the worker by dotted name (package __init__ files included)."""
    modules = {name: ROOT / f"{name}.py" for name in ROOT_MODULES}
    for package in WORKER_PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules
