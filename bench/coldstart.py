"""Figure e: cold start, from process start to ready for the first job, and import time.

Each is a fresh `python` process, timed from the outside (start to exit), median of repeats:
- import: `import handler` (everything the worker imports at start-up);
- ready: what `handler.main()` does before it hands over to the RunPod SDK (settings, logging,
  the engine loaded from the tiny checkpoint, the worker with its voice library and S3 client);
- baseline: `import torch` and transformers' VibeVoice classes alone, the floor of any worker
  built on them (transformers' top-level import is lazy; the model classes pull in most of it).
The real 7B adds its weight loading (about 18.7 GB read from disk or RunPod's model cache).
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench.common import ROOT, Row, median_time

REPEATS = 3

READY = """
import handler, config, inference
from runtime import logs
settings = config.load_settings()
logs.setup_logging(settings)
engine = inference.VibeVoiceEngine.load(settings)
worker = handler.Worker(settings, engine)
import runpod
"""


def measure(workspace) -> tuple[list[Row], dict]:
    env = {**os.environ, **workspace.env(), "LOG_LEVEL": "WARNING"}

    def python(code: str):
        def run() -> None:
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True)

        return run

    floor_code = "import torch\nfrom transformers import AutoProcessor, VibeVoiceForConditionalGeneration"
    floor, floor_times = median_time(python(floor_code), REPEATS)
    imports, import_times = median_time(python("import handler"), REPEATS)
    ready, ready_times = median_time(python(READY), REPEATS)
    rows = [
        Row("e", "import time of the worker (import handler), s", imports, floor, "s", None,
            "baseline: import torch + transformers' VibeVoice classes in a fresh process"),
        Row("e", "process start to ready for the first job (tiny checkpoint), s", ready, floor, "s", None,
            "the 7B adds loading ~18.7 GB of weights"),
    ]  # fmt: skip
    detail = {"baseline_s": floor_times, "import_s": import_times, "ready_s": ready_times}
    return rows, detail
