"""What torch.compile needs from the machine before it can build a kernel: a compiler and Python's headers.

On CUDA, Triton builds a small C launcher for its kernels the first time it runs them
(`triton/runtime/build.py`): it looks for `CC`, else `gcc`, else `clang`, and compiles against the
interpreter's own `Python.h` (sysconfig's include folder). On the CPU, inductor compiles C++ the
same way (`CXX`, else `g++`). A CUDA runtime or base image has neither compiler nor
headers, and torch.compile then fails at the first kernel with "Failed to find C compiler", so the
worker checks before it compiles and names what is missing (`problem`).

Standard library only: `tools/check_c_extension.py` uses the same rules outside the worker.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

# (environment variable, programs tried in order) per device type, as Triton and inductor look.
COMPILERS = {"cuda": ("CC", ("gcc", "clang")), "cpu": ("CXX", ("g++",))}
# How each missing piece is installed on the image's Ubuntu (the Dockerfile's base stage has both).
INSTALL = {"CC": "apt-get install gcc", "CXX": "apt-get install g++", "headers": "apt-get install python3-dev"}


def find_compiler(device_type: str = "cuda") -> str | None:
    """The compiler torch.compile will use for `device_type` ("cuda": C for Triton; "cpu": C++), or None."""
    variable, programs = COMPILERS["cuda" if device_type == "cuda" else "cpu"]
    named = os.environ.get(variable)
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return next((found for program in programs if (found := shutil.which(program))), None)


def python_headers() -> Path:
    """Where this interpreter's Python.h must be (a venv's is its base interpreter's), found as Triton
    finds it: the default scheme's include folder, Debian's `posix_local` read as `posix_prefix`."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    return Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"


def problem(device_type: str = "cuda") -> str | None:
    """Why torch.compile cannot build kernels for `device_type` here, in one sentence; None when it can."""
    variable, programs = COMPILERS["cuda" if device_type == "cuda" else "cpu"]
    kind = "C" if variable == "CC" else "C++"
    if find_compiler(device_type) is None:
        named = os.environ.get(variable)
        where = f"{variable}={named} does not exist" if named else f"none of {', '.join(programs)} is on PATH"
        return (
            f"no {kind} compiler was found ({where}); torch.compile builds its kernels with one: "
            f"install it ({INSTALL[variable]}) or set {variable}"
        )
    headers = python_headers()
    if not headers.is_file():
        return (
            f"Python's headers are missing ({headers} does not exist); torch.compile builds against them: "
            f"install them ({INSTALL['headers']}, for this interpreter's Python version)"
        )
    return None
