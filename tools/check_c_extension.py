"""Build a tiny C extension against this interpreter's own headers and call it: what Triton does at run time.

    python -m tools.check_c_extension        # in the production venv (make test-deploy runs it there)

Triton, which torch.compile uses on CUDA, builds a small C launcher for its kernels the first time
they run: the system C compiler (`CC`, else gcc, else clang), `-shared -fPIC`, against the
interpreter's `Python.h`, loaded as an extension module. This script does the same with a module of
its own, in a temporary folder, so an image that lacks the compiler or the headers fails here, with
the missing piece named (engine/toolchain.py's rules), rather than in the worker's start-up check.
Exit status 0 and one line when it works; 1 and the reason when it does not.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from engine import toolchain

SOURCE = r"""
#include <Python.h>

static PyObject *add(PyObject *self, PyObject *args) {
    long a, b;
    if (!PyArg_ParseTuple(args, "ll", &a, &b)) return NULL;
    return PyLong_FromLong(a + b);
}

static PyMethodDef methods[] = {{"add", add, METH_VARARGS, "a + b"}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "vibevoice_c_check", NULL, -1, methods};
PyMODINIT_FUNC PyInit_vibevoice_c_check(void) { return PyModule_Create(&module); }
"""


def build_and_call(folder: Path) -> int:
    """Compile the module as Triton compiles its launcher, import it, and return add(40, 2)."""
    reason = toolchain.problem("cuda")
    if reason is not None:
        raise RuntimeError(reason)
    source = folder / "vibevoice_c_check.c"
    source.write_text(SOURCE)
    library = folder / f"vibevoice_c_check{sysconfig.get_config_var('EXT_SUFFIX')}"
    command = [toolchain.find_compiler("cuda"), str(source), "-O3", "-shared", "-fPIC", "-o", str(library),
               f"-I{toolchain.python_headers().parent}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"the compiler failed: {(done.stderr or done.stdout).strip().splitlines()[:3]}")
    spec = importlib.util.spec_from_file_location("vibevoice_c_check", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.add(40, 2)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="c-extension-") as folder:
        try:
            result = build_and_call(Path(folder))
        except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
            print(f"check_c_extension: FAILED: {exc}", file=sys.stderr)
            return 1
    if result != 42:
        print(f"check_c_extension: FAILED: the extension returned {result}, not 42", file=sys.stderr)
        return 1
    print(f"check_c_extension: built and called a C extension with {toolchain.find_compiler('cuda')} "
          f"against {toolchain.python_headers()} (Python {sys.version.split()[0]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
