"""First-boot steps of bootstrap.sh that are clearer in Python than in shell (`python -m deploy.provision ...`).

    voices      --manifest M --dest D [--url BASE ...]   fetch the pinned reference voices
    find-model  MODEL_ID --runpod-cache C --cache V     a cached model, offline, or exit 1
    download    MODEL_ID --cache V                      download with progress lines
    space       --path P --bytes N --step TEXT          enough free disk for a step, or exit 1
    watch       --label TEXT --path P [--total N]       progress lines while a folder grows

Log lines go to stderr, each starting with "bootstrap:" like the script's own; a result (a model
folder) goes to stdout, and a failure's one-sentence reason too (exit status 1), so the script can
end with it. Only the standard library is imported at the top: `voices`, `space` and `watch` run
with the system Python before the virtual environment exists (`download` needs huggingface_hub).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy import hub_cache

PROGRESS_SECONDS = 15.0  # one progress line per long step this often (BOOTSTRAP_PROGRESS_SECONDS)
STALL_SECONDS = 60.0  # a download without new bytes this long is reported stalled (BOOTSTRAP_STALL_SECONDS)


class StepError(RuntimeError):
    """A step cannot go on; the message is one sentence for the log's FAILED line."""


def log(message: str) -> None:
    print(f"bootstrap: {message}", file=sys.stderr, flush=True)


def gigabytes(size: float) -> str:
    """A byte count for the log: GB with two decimals, or MB below a gigabyte."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- disk space -------------------------------------------------------------------------------------


def min_free_share() -> float:
    """The share of / the runpod SDK's start-up check wants free (RUNPOD_MIN_DISK_PERCENT, default 10%)."""
    try:
        return float(os.environ.get("RUNPOD_MIN_DISK_PERCENT", "10")) / 100
    except ValueError:
        return 0.10


def check_space(path: Path, needed: int, step: str) -> None:
    """Raise StepError when the filesystem of `path` lacks `needed` bytes for `step`.

    When `path` lies on the root filesystem (no network volume), the share of / that the runpod
    SDK's start-up disk check wants free is added: a setup that fills / would pass here and then
    stop the worker at its first start.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    reserve = math.ceil(usage.total * min_free_share()) if os.stat(existing).st_dev == os.stat("/").st_dev else 0
    if usage.free >= needed + reserve:
        return
    kept = (
        f" plus {gigabytes(reserve)} that must stay free on / for the worker's start-up disk check" if reserve else ""
    )
    raise StepError(
        f"not enough disk space for {step}: {gigabytes(needed + reserve)} needed ({gigabytes(needed)}{kept}), "
        f"{gigabytes(usage.free)} free on {existing}."
    )


# --- progress lines -----------------------------------------------------------------------------------


def folder_bytes(paths: list[Path]) -> int:
    """Bytes stored under the given folders (files only; a sparse or preallocated file counts what it holds)."""
    total = 0
    for root in paths:
        for folder, _, files in os.walk(root):
            for name in files:
                try:
                    info = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue  # renamed or removed while we looked
                if not os.path.islink(os.path.join(folder, name)):
                    total += min(info.st_size, info.st_blocks * 512)
    return total


@dataclass
class Progress:
    """Writes one plain log line every `interval` seconds about a step that fills folders."""

    label: str
    paths: list[Path]
    total: int | None = None  # bytes the step ends with, when known (then: percent, rate, time left)
    interval: float = PROGRESS_SECONDS
    stall_after: float | None = None  # report "stalled" after this long without new bytes (downloads)

    def run(self, stop: threading.Event) -> None:
        started = last_growth = time.monotonic()
        first = last = folder_bytes(self.paths)
        while not stop.wait(self.interval):
            now, size = time.monotonic(), folder_bytes(self.paths)
            if size > last:
                last_growth = now
            log(self.line(size, size - last, first, now - started, now - last_growth))
            last = size

    def line(self, size: int, grown: int, first: int, elapsed: float, idle: float) -> str:
        so_far = f"{gigabytes(size)} of {gigabytes(self.total)}" if self.total else f"{gigabytes(size)} written"
        if self.stall_after is not None and idle >= self.stall_after:
            return f"{self.label}: stalled, no new bytes for {duration(idle)} ({so_far}, {duration(elapsed)} so far)"
        rate = max(0, grown) / self.interval  # a step may also delete (pip's temporary files)
        text = f"{self.label}: {so_far}"
        if self.total:
            text += f" ({min(100, int(100 * size / self.total))}%)"
        text += f", {rate / 1e6:.1f} MB/s"
        average = (size - first) / elapsed if elapsed > 0 else 0
        if self.total and average > 0 and size < self.total:
            text += f", about {duration((self.total - size) / average)} left"
        return text + f" ({duration(elapsed)} so far)"

    @contextmanager
    def running(self) -> Iterator[None]:
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


def watch(progress: Progress, parent: int | None) -> None:
    """Progress lines until SIGTERM, or until the process `parent` is gone (bootstrap.sh was killed)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    thread = threading.Thread(target=progress.run, args=(stop,), daemon=True)
    thread.start()
    while not stop.wait(1.0):
        if parent is not None and not _alive(parent):
            stop.set()
    thread.join(timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- reference voices -----------------------------------------------------------------------------------


def fetch_voices(manifest_path: Path, dest: Path, urls: list[str], timeout: float) -> list[str]:
    """Fetch every voice of the manifest that `dest` lacks; return the names still missing.

    Each file is tried from each base URL in turn; a file counts only when its size and sha256
    match the manifest. It is written under a temporary name and renamed, so a file in `dest`
    is always complete. Files already in `dest` are never replaced.
    """
    manifest = json.loads(manifest_path.read_text())
    bases = [base.rstrip("/") + "/" for base in urls or manifest["urls"]]
    dest.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    unreachable: set[str] = set()  # a source that cannot be connected to is not tried for the other files
    missing = []
    for name, spec in manifest["files"].items():
        target = dest / name
        if target.exists():
            continue
        if not any(
            _fetch_one(base, name, spec, target, deadline, unreachable) for base in bases if base not in unreachable
        ):
            missing.append(name)
    present = len(manifest["files"]) - len(missing)
    if missing:
        log(
            f"warning: {len(missing)} reference voice(s) could not be fetched ({', '.join(missing)}); "
            f"{present} of {len(manifest['files'])} are in {dest}. A job that names no voice runs without a "
            "voice prompt when the default voice is missing; the next boot tries again."
        )
    else:
        log(f"reference voices: {present} of {present} in {dest}")
    return missing


def _fetch_one(base: str, name: str, spec: dict, target: Path, deadline: float, unreachable: set[str]) -> bool:
    url = base + name
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        log(f"voice {name}: no time left to fetch it from {url}")
        return False
    request = urllib.request.Request(url, headers={"User-Agent": "vibevoice-worker-bootstrap"})
    try:
        with urllib.request.urlopen(request, timeout=min(remaining, 30.0)) as response:
            data = response.read(spec["bytes"] + 1)
    except urllib.error.HTTPError as exc:
        log(f"voice {name}: could not fetch {url} (HTTP {exc.code})")
        return False
    except (urllib.error.URLError, OSError, ValueError) as exc:
        unreachable.add(base)
        log(f"voice {name}: could not reach {base} ({getattr(exc, 'reason', exc)}); not trying it for other voices")
        return False
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != spec["bytes"] or digest != spec["sha256"]:
        log(
            f"voice {name}: {url} gave {len(data)} bytes with sha256 {digest[:16]}..., expected "
            f"{spec['bytes']} bytes with sha256 {spec['sha256'][:16]}...; not used"
        )
        return False
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    partial.write_bytes(data)
    os.replace(partial, target)
    log(f"voice {name}: fetched from {url} (sha256 verified)")
    return True


# --- the model ---------------------------------------------------------------------------------------------


def find_model(model_id: str, runpod_cache: Path, cache: Path) -> Path | None:
    """The model from RunPod's cached models, else a complete copy in the volume's cache; no network."""
    found = hub_cache.find_snapshot(runpod_cache, model_id)
    if found is not None:
        log(f"using RunPod's cached model {found}")
        return found
    if not hub_cache.repo_folder(cache, model_id).is_dir():
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, cache_dir=str(cache), local_files_only=True))
    except Exception:  # absent or incomplete (an interrupted download): the download step resumes it
        return None


def download_model(model_id: str, cache: Path, interval: float, stall_after: float) -> Path:
    """Download (or resume) `model_id` into `cache` with progress lines, after a disk-space check."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # terminal bars; the lines below replace them
    from huggingface_hub import snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    label = f"downloading {model_id}"
    total = None
    try:
        planned = snapshot_download(model_id, cache_dir=str(cache), token=token, dry_run=True)
    except Exception as exc:  # the download below fails the same way and says why
        log(f"could not list the files of {model_id} first ({_first_line(exc)})")
    else:
        total = sum(entry.file_size or 0 for entry in planned)
        needed = sum(entry.file_size or 0 for entry in planned if entry.will_download)
        check_space(cache, needed, label)
        log(f"{label}: {gigabytes(needed)} to fetch of {gigabytes(total)} (resumable)")
    progress = Progress(label, [hub_cache.repo_folder(cache, model_id)], total, interval, stall_after)
    try:
        with progress.running():
            return Path(snapshot_download(model_id, cache_dir=str(cache), token=token))
    except Exception as exc:
        raise StepError(f"could not download {model_id}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    voices = commands.add_parser("voices")
    voices.add_argument("--manifest", type=Path, required=True)
    voices.add_argument("--dest", type=Path, required=True)
    voices.add_argument("--url", action="append", default=[], help="a base URL to try (default: the manifest's)")
    voices.add_argument("--timeout", type=float, default=120.0, help="seconds for all voices together")
    find = commands.add_parser("find-model")
    find.add_argument("model_id")
    find.add_argument("--runpod-cache", type=Path, required=True)
    find.add_argument("--cache", type=Path, required=True)
    download = commands.add_parser("download")
    download.add_argument("model_id")
    download.add_argument("--cache", type=Path, required=True)
    space = commands.add_parser("space")
    space.add_argument("--path", type=Path, required=True)
    space.add_argument("--bytes", type=int, required=True)
    space.add_argument("--step", required=True)
    progress = commands.add_parser("watch")
    progress.add_argument("--label", required=True)
    progress.add_argument("--path", type=Path, action="append", required=True)
    progress.add_argument("--total", type=int)
    progress.add_argument("--stall", type=float)
    progress.add_argument("--parent", type=int)
    for command in (download, progress):
        command.add_argument(
            "--interval", type=float, default=_env_float("BOOTSTRAP_PROGRESS_SECONDS", PROGRESS_SECONDS)
        )
    download.add_argument("--stall", type=float, default=_env_float("BOOTSTRAP_STALL_SECONDS", STALL_SECONDS))
    return parser.parse_args(argv)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="bootstrap: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        if args.command == "voices":
            return 1 if fetch_voices(args.manifest, args.dest, args.url, args.timeout) else 0
        if args.command == "find-model":
            found = find_model(args.model_id, args.runpod_cache, args.cache)
            if found is None:
                return 1
            print(found)
        elif args.command == "download":
            print(download_model(args.model_id, args.cache, args.interval, args.stall))
        elif args.command == "space":
            check_space(args.path, args.bytes, args.step)
        elif args.command == "watch":
            watch(Progress(args.label, args.path, args.total, args.interval, args.stall), args.parent)
    except StepError as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
