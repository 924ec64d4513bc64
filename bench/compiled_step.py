"""Figures k, l, m: the compiled static frame step (engine/framestep.py, COMPILE=on) against the eager loop.

k  wall time per frame, compiled against eager, at batch 1 and batch 8 (timed around `step` only,
   the two decoders alternating, medians of repeats); and the start-up compile (warm-up of one
   bucket in a fresh process, each with an empty inductor cache folder) with the compile artifacts
   an earlier start saved on the volume (engine/compile_cache.py) against none
l  operator dispatches per frame outside a compiled region (torch profiler), compiled / eager
m  host synchronisations per frame of the compiled step (bench/step_counters.py says what counts)

Same run, this CPU, the tiny checkpoint, one torch thread. The GPU figures are `make gpu-bench`'s.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, Row

FRAMES = 12
REPEATS = 5
STEPS = 10


_DECODERS: dict[int, tuple] = {}


def decoders(workspace) -> tuple:
    """(the eager decoder, a compiled one warmed up for batches 1 and 8, seconds the warm-up took), once per run."""
    from engine.decoder import BatchDecoder

    if id(workspace) not in _DECODERS:
        engine = workspace.engine()
        compiled = BatchDecoder(engine.model, compile_mode="on")
        started = time.perf_counter()
        compiled.warm_up([1, 8])
        if not compiled.compiled:
            raise RuntimeError("the step did not compile on this machine")
        _DECODERS[id(workspace)] = (engine.decoder, compiled, time.perf_counter() - started)
    return _DECODERS[id(workspace)]


def measure_frame_time(workspace) -> tuple[list[Row], dict]:
    eager, compiled, compile_s = decoders(workspace)
    rows, detail = [], {"warm_up_buckets_1_8_s": round(compile_s, 1)}
    for batch in (1, 8):
        ours, base, times = _per_frame(eager, compiled, _requests(workspace.engine(), batch))
        rows.append(Row("k", f"wall time per frame at batch {batch}, compiled step (ms)", ours * 1e3, base * 1e3,
                        "ms", "<= 0.6", "baseline: the eager loop (engine/decoder.py), same frames"))  # fmt: skip
        detail[f"batch_{batch}"] = times
    warm, cold = _start_up_compile(workspace)
    rows.append(Row("k", "start-up compile of bucket 1 in a fresh process, with the saved compile artifacts (s)",
                    warm, cold, "s", "<= 0.1", "baseline: from scratch; empty inductor caches in both"))  # fmt: skip
    detail["start_up_compile_s"] = {"with_artifacts": round(warm, 1), "from_scratch": round(cold, 1)}
    return rows, detail


def measure_dispatches(workspace) -> tuple[list[Row], dict]:
    from bench.step_counters import count_dispatches

    eager, compiled, _ = decoders(workspace)
    requests = _requests(workspace.engine(), 8)
    ours, base = count_dispatches(compiled, requests), count_dispatches(eager, requests)
    row = Row("l", "operator dispatches per frame outside a compiled region, batch 8", statistics.median(ours),
              statistics.median(base), "ops", "<= 0.2", "baseline: the eager loop; torch profiler")  # fmt: skip
    return [row], {"compiled": ours, "eager": base}


def measure_syncs(workspace) -> tuple[list[Row], dict]:
    from bench.step_counters import count_syncs

    eager, compiled, _ = decoders(workspace)
    requests = _requests(workspace.engine(), 8)
    ours, base = count_syncs(compiled, requests), count_syncs(eager, requests)
    row = Row("m", "host synchronisations per frame, compiled step (most in any frame)", max(ours), 1, "syncs",
              "<= 1", f"baseline: the one token read allowed; the eager loop makes {max(base)}")  # fmt: skip
    return [row], {"compiled": ours, "eager": base}


def _requests(engine, batch: int) -> list:
    from inference import GenerationParams
    from text.script import Chunk, Turn

    params = GenerationParams(1.3, STEPS, seed=1, max_new_tokens=FRAMES, use_voice_prompt=False)
    chunks = [Chunk(k, (Turn(0, f"Sentence number {k} of the frame benchmark."),)) for k in range(batch)]
    return engine.requests(chunks, {}, params)


def _per_frame(eager, compiled, requests) -> tuple[float, float, dict]:
    """Median seconds per frame of each decoder's `step`, runs alternating."""
    from bench.step_counters import frames

    def timed(step) -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    runs: dict[str, list[float]] = {"compiled": [], "eager": []}
    compiled_frames = compiled.frame_step.compiled_frames
    for _ in range(REPEATS):
        for name, decoder in (("eager", eager), ("compiled", compiled)):
            runs[name].append(statistics.median(frames(decoder, requests, timed)))
    if compiled.frame_step.compiled_frames == compiled_frames:  # a shape the warm-up did not compile
        raise RuntimeError("the compiled decoder ran these frames uncompiled; the figure would mean nothing")
    times = {name: [round(t * 1e3, 2) for t in values] for name, values in runs.items()}
    return statistics.median(runs["compiled"]), statistics.median(runs["eager"]), {"per_frame_ms": times}


_WARM_UP = """
import sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from config import load_settings
from inference import VibeVoiceEngine
engine = VibeVoiceEngine.load(load_settings(model_path={model!r}, vibevoice_home={home!r}, device="cpu", compile="on"))
started = time.perf_counter()
engine.decoder.warm_up([1])
assert engine.decoder.compiled
print(time.perf_counter() - started)
"""


def _start_up_compile(workspace) -> tuple[float, float]:
    """Seconds the warm-up of bucket 1 takes in a fresh process: (with the artifacts the first saved, from
    scratch). Both share a volume folder (where the first saves its artifacts), each has an empty
    inductor cache folder of its own (as a new machine has)."""
    seconds = []
    with tempfile.TemporaryDirectory(prefix="compile-artifacts-") as folder:
        script = _WARM_UP.format(root=str(ROOT), model=str(workspace.model_dir), home=folder)
        for run in ("first", "second"):
            cache = f"{folder}/inductor-{run}"
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache + "/triton"}
            done = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True,
                                  timeout=1800)  # fmt: skip
            seconds.append(float(done.stdout.split()[-1]))
    return seconds[1], seconds[0]
