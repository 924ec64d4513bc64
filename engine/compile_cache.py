"""The compiled decode step's artifacts on the volume, so that a cold start compiles from them.

Each new process compiles the static frame step (framestep.py) once per bucket. PyTorch's
"mega-cache" (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) serialises what that
produced: inductor's compiled graphs (with their Triton kernels on CUDA), AOTAutograd's graphs and the
autotuning results. Loaded into a fresh process, AOTAutograd does not trace again and inductor neither
lowers nor generates code; what remains is dynamo reading the frame's bytecode for its guards and, on
CUDA, recording the graphs. On the CPU inductor's kernels are C++ libraries, which the mega-cache does
not carry (it bundles Triton binaries only), so the file carries the libraries the graphs loaded too.

One file per key, `decode-step-<hash>.zip` in the volume's `compile_cache/` folder:

    key.json        what the graphs depend on: torch, Triton, CUDA and Python versions, transformers,
                    the device, the model's configuration and dtype, the decode step's own source
    mega-cache.bin  torch.compiler.save_cache_artifacts()'s bytes
    kernels/...     (CPU) compiled kernel libraries, by their path in inductor's cache folder

It is written atomically (a temporary file in the same folder, then renamed), after a warm-up that
compiled anything anew. A missing, unreadable, corrupt (the zip's checksums) or mismatched file is
ignored with one log line and the step compiles from scratch; a file that cannot be written is
logged and skipped. Neither ever fails a start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

log = logging.getLogger("vibevoice.compile_cache")

MEGA_CACHE = "mega-cache.bin"
KERNEL_NAME = re.compile(r"kernels/[A-Za-z0-9_]{1,16}/[A-Za-z0-9_.\-]{1,255}\.so")
# The decode step's graphs come from these files (and the model's code, which the transformers
# version names): a change to them starts a new file rather than loading artifacts that never hit.
STEP_SOURCES = ("framestep.py", "attention.py")

_folder: Path | None = None  # where artifacts live (use_compile_caches); None: not kept
_loaded: set[Path] = set()  # files loaded into this process already
_STARTED = time.time()  # files inductor writes from now on are this process's


def use_compile_caches(folder: Path) -> None:
    """Keep torch.compile's caches in `folder` (on the volume): the decode step's artifacts, and
    inductor's and Triton's own cache folders (variables already set, by bootstrap.sh or the
    operator, win)."""
    global _folder
    _folder = Path(folder)
    for variable, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ.setdefault(variable, str(_folder / name))


def cache_misses() -> int:
    """Graphs AOTAutograd traced and inductor compiled in this process so far (cache misses)."""
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["autograd_cache_miss"] + counters["inductor"]["fxgraph_cache_miss"]


def step_key(model) -> dict[str, str | None]:
    """What the decode step's compiled graphs depend on, beside their shapes (which they are keyed by)."""
    import transformers

    device = model.device
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:  # inductor's C++ kernels use the widest vector instructions this CPU has
        device_name = f"{device.type} {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    sources = hashlib.sha256()
    for name in STEP_SOURCES:
        sources.update((Path(__file__).parent / name).read_bytes())
    return {
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "device": device_name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "model_config": _digest(_graph_relevant(model.config.to_dict())),
        "step_source": sources.hexdigest()[:16],
    }


@dataclass
class StepArtifacts:
    """The artifacts file of one model on one machine and software stack."""

    path: Path
    key: dict[str, str | None]

    @classmethod
    def for_model(cls, model) -> StepArtifacts | None:
        """The file for this model, or None where no folder is kept (use_compile_caches was not called)."""
        if _folder is None:
            return None
        key = step_key(model)
        return cls(_folder / f"decode-step-{_digest(key)[:16]}.zip", key)

    def load(self) -> bool:
        """Put the saved artifacts where torch.compile finds them (once per process); False when there are
        none to use, said in one log line."""
        if self.path in _loaded:
            return True
        if not self.path.exists():
            log.info("no compile artifacts at %s yet: the decode step compiles from scratch", self.path)
            return False
        try:
            with zipfile.ZipFile(self.path) as archive:
                stored = json.loads(archive.read("key.json"))
                if stored != self.key:
                    differs = sorted(name for name in self.key if stored.get(name) != self.key[name]) or ["key"]
                    log.warning("compile artifacts %s were made for another %s: ignored, the decode step compiles "
                                "from scratch", self.path, ", ".join(differs))  # fmt: skip
                    return False
                mega_cache = archive.read(MEGA_CACHE)
                kernels = {name: archive.read(name) for name in archive.namelist() if KERNEL_NAME.fullmatch(name)}
            with only_errors_from("torch.compiler._cache"):  # its warning is a traceback; our line says it
                if torch.compiler.load_cache_artifacts(mega_cache) is None:
                    raise ValueError("torch could not read its mega-cache")
            placed = _place_kernels(kernels)
        except Exception as exc:  # unreadable, corrupt, or refused by torch: compile as if it were not there
            log.warning("compile artifacts %s are unusable (%s): ignored, the decode step compiles from scratch",
                        self.path, _one_line(exc))  # fmt: skip
            return False
        _loaded.add(self.path)
        log.info("compile artifacts loaded from %s (%d kernel libraries)", self.path, placed)
        return True

    def save(self) -> bool:
        """Write everything this process compiled or loaded, atomically; False (and one log line) if not."""
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:  # nothing compiled
                return False
            _write_atomically(self.path, lambda out: self._write(out, saved[0]))
        except Exception as exc:  # a full or read-only volume, a kernel gone: the next start compiles again
            log.warning("could not save the compile artifacts to %s: %s", self.path, _one_line(exc))
            return False
        _loaded.add(self.path)
        log.info("compile artifacts saved to %s (%.1f MB)", self.path, self.path.stat().st_size / 1e6)
        return True

    def _write(self, out: BinaryIO, mega_cache: bytes) -> None:
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("key.json", json.dumps(self.key, indent=1, sort_keys=True))
            archive.writestr(MEGA_CACHE, mega_cache)
            for name, path in _kernel_libraries():
                archive.write(path, name)


def _inductor_folder() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def _kernel_libraries() -> list[tuple[str, Path]]:
    """The compiled C++ libraries this process's CPU graphs need from inductor's cache folder, as (name
    in the file, path): the kernels it loaded as Python modules, and what it built there itself (the
    vector-instruction probes inductor compiles before it can name a kernel's build)."""
    folder = _inductor_folder().resolve()
    loaded = {Path(getattr(module, "__file__", None) or "") for module in list(sys.modules.values())}
    built_here = {path for path in folder.glob("*/*.so") if path.stat().st_mtime >= _STARTED}
    found = {}
    for path in loaded | built_here:
        if path.suffix != ".so" or not path.is_file():
            continue
        try:
            name = f"kernels/{path.resolve().relative_to(folder).as_posix()}"
        except ValueError:  # not one of inductor's
            continue
        if KERNEL_NAME.fullmatch(name):
            found[name] = path
    return sorted(found.items())


def _place_kernels(kernels: dict[str, bytes]) -> int:
    """Write the kernel libraries where inductor looks for them (those already there are kept)."""
    folder = _inductor_folder()
    for name, content in kernels.items():
        target = folder / name.removeprefix("kernels/")
        if target.exists():
            continue
        _write_atomically(target, lambda out, content=content: out.write(content))
    return len(kernels)


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces `path` in one rename: a reader
    (another worker on the volume) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp", delete=False) as out:
        temporary = Path(out.name)
        try:
            write(out)
        except BaseException:
            out.close()
            temporary.unlink(missing_ok=True)
            raise
    try:
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _graph_relevant(config: object) -> object:
    """A model configuration without what does not change the graphs (paths, versions, private fields)."""
    if isinstance(config, dict):
        return {str(key): _graph_relevant(value) for key, value in config.items()
                if not str(key).startswith("_") and key not in ("name_or_path", "transformers_version")}  # fmt: skip
    if isinstance(config, list):
        return [_graph_relevant(value) for value in config]
    return config


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def only_errors_from(logger: str) -> Iterator[None]:
    """Only errors from `logger` inside the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
