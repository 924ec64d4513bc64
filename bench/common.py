"""What every figure shares: the tiny checkpoint, an engine, timing by medians, result rows."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The bench machine's two cores are shared with other work; with two torch threads a busy
# neighbour made timings swing five-fold, with one they hold within a few percent.
TORCH_THREADS = 1


@dataclass
class Row:
    """One line of the results table: a figure, ours against its baseline, and the target."""

    figure: str
    measure: str
    ours: float
    baseline: float | None
    unit: str
    target: str | None = None  # e.g. "<= 0.7" on the ratio ours / baseline
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.ours / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        op, bound = self.target.split()
        return self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}

    @classmethod
    def from_dict(cls, row: dict) -> Row:
        return cls(**{key: row[key] for key in ("figure", "measure", "ours", "baseline", "unit", "target", "note")})


def median_time(function: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `function` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def interleaved_medians(
    ours: Callable[[], object], baseline: Callable[[], object], repeats: int
) -> tuple[float, float, dict]:
    """Median times of two functions run alternately (so both see the same machine load), after a warm-up."""
    ours()
    baseline()
    ours_times, baseline_times = [], []
    for _ in range(repeats):
        for function, times in ((baseline, baseline_times), (ours, ours_times)):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    detail = {"ours_s": [round(t, 4) for t in ours_times], "baseline_s": [round(t, 4) for t in baseline_times]}
    return statistics.median(ours_times), statistics.median(baseline_times), detail


class Workspace:
    """A temporary volume folder with the tiny checkpoint and the demo voices."""

    def __init__(self) -> None:
        from tools import tiny_checkpoint
        from tools.local_home import write_demo_voices

        self._temp = tempfile.TemporaryDirectory(prefix="vibevoice-bench-")
        self.home = Path(self._temp.name) / "vibevoice"
        for folder in ("hf_home", "hf_cache", "models", "output"):
            (self.home / folder).mkdir(parents=True)
        write_demo_voices(self.home / "demo" / "voices")
        self.model_dir = tiny_checkpoint.build_native(self.home / "models" / "tiny-vibevoice")
        self._engine = None

    def env(self) -> dict[str, str]:
        return {"MODEL_PATH": str(self.model_dir), "VIBEVOICE_HOME": str(self.home), "DEVICE": "cpu"}

    def settings(self, **overrides: object):
        from config import load_settings

        values: dict[str, object] = {"model_path": self.model_dir, "vibevoice_home": self.home, "device": "cpu"}
        values.update(overrides)
        return load_settings(**values)

    def engine(self):
        if self._engine is None:
            import torch

            from inference import VibeVoiceEngine

            torch.set_num_threads(TORCH_THREADS)
            self._engine = VibeVoiceEngine.load(self.settings())
        return self._engine

    def voices(self) -> dict[int, object]:
        from jobs.voices import VoiceLibrary

        library = VoiceLibrary.for_settings(self.settings())
        return {0: library.load("Alice"), 1: library.load("Frank")}

    def close(self) -> None:
        self._temp.cleanup()


class MotoServer:
    """moto's S3 server on 127.0.0.1 in its own process (as the tests start it), with one bucket."""

    def __init__(self) -> None:
        import boto3

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                self.process.terminate()
                raise TimeoutError("moto's S3 server did not start within 60 s")
            time.sleep(0.1)
        credentials = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **credentials).create_bucket(
            Bucket="vibevoice-bench"
        )

    def settings_overrides(self) -> dict:
        return {
            "s3_endpoint_url": self.endpoint,
            "s3_access_key_id": "bench",
            "s3_secret_access_key": "bench",
            "s3_bucket_name": "vibevoice-bench",
        }

    def env(self) -> dict[str, str]:
        return {key.upper(): str(value) for key, value in self.settings_overrides().items()}

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
