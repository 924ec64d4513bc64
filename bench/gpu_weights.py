"""`make gpu-bench`'s 8-bit rows: a model again with WEIGHTS=int8 (and fp8 where the GPU has float8).

For bench/gpu_bench.py's row list, after a model's bf16 rows (it quantizes the model in place: its
bf16 weights are gone afterwards; fp8 needs a fresh build of the model):

    reference = [r.audio for r in bf16_decoder.decode(check_requests)]   # bf16, before quantizing
    report["int8"] = weights_rows(model, "int8", check_requests, reference, timed_requests)

It records what engine/weights.py's start-up check said; compiles the frame step for each timed batch
size (the worker's path: int8 saves bytes only compiled) and counts dynamo's graph breaks and
inductor's skipped CUDA graphs; then per batch size the RTF (wall time / one sequence's audio), the
aggregate real-time multiple, the steady frame time and the peak memory; and the audio's difference
from bf16 over the first frames, same prompts and same noise (largest sample difference / bf16's
peak, per frame: bf16 kernels alone differ by up to ~0.25 between batch shapes, bench/gpu_bench.py).
On the CPU (tests) the same runs on the tiny configuration in float32, compiled or not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from config import MODEL_SAMPLE_RATE
from engine import weights
from engine.batch import DecodeRequest
from engine.decoder import BatchDecoder


def weights_rows(
    model,
    mode: str,
    check: Sequence[DecodeRequest],
    reference: Sequence[np.ndarray],
    timed: dict[int, Sequence[DecodeRequest]],
    compiled: bool = True,
) -> dict:
    """Quantize `model` for WEIGHTS=`mode` in place and measure it; `timed` maps batch size -> requests."""
    from torch._dynamo.utils import counters

    device = model.device.type
    report = weights.apply(model, mode)
    result: dict = {"asked": mode, "weights": report.used, "start_up_check": report.describe(),
                    "weight_gb": report.resident_bytes / 1e9, "rows": []}  # fmt: skip
    if device == "cuda":
        torch.cuda.empty_cache()
    counters.clear()
    decoder = BatchDecoder(model, compile_mode="on" if compiled else "off")
    started = time.perf_counter()
    decoder.warm_up(sorted(timed))
    result["compile_s"] = time.perf_counter() - started
    result["compiled"] = decoder.compiled
    got = [r.audio for r in decoder.decode(list(check))]
    result["vs_bf16"] = difference(got, list(reference), model.config.audio_config.hop_length)
    for n, batch in sorted(timed.items()):
        result["rows"].append({"batch": n, **timed_decode(decoder, list(batch), device)})
    result["graph_breaks"] = sum(counters["graph_break"].values())
    result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]  # a skipped CUDA graph is silent otherwise
    return result


def timed_decode(decoder: BatchDecoder, batch: list[DecodeRequest], device: str) -> dict:
    """A warm-up decode of 2 frames, then the batch timed to the end (frames stamped on the host)."""
    decoder.decode([DecodeRequest(**{**r.__dict__, "max_frames": 2}) for r in batch])
    frames_before = decoder.frame_step.compiled_frames if decoder.frame_step is not None else 0
    stamps: list[float] = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = decoder.decode(batch, on_frame=lambda index, samples: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - started
    frames = max(r.frames for r in results)
    audio = frames * decoder.hop_length / MODEL_SAMPLE_RATE
    steps = len(set(stamps))  # the rows of one frame are stamped together
    compiled_frames = decoder.frame_step.compiled_frames - frames_before if decoder.frame_step is not None else 0
    return {
        "frames": frames,
        "rtf": wall / audio,
        "realtime_multiple": len(batch) * audio / wall,
        "step_ms": (stamps[-1] - stamps[0]) / max(1, steps - 1) * 1e3 if stamps else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "compiled_frames": compiled_frames,
    }


def difference(got: list[np.ndarray], want: list[np.ndarray], hop: int) -> dict:
    """Per frame, the largest sample difference over the reference's peak, worst sequence; and overall."""
    per_sequence = []
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"{a.size} samples against bf16's {b.size} for the same request")
        peak = max(float(np.abs(b).max()), 1e-6)
        frames = range(0, b.size, hop)
        per_sequence.append([float(np.abs(a[k : k + hop] - b[k : k + hop]).max()) / peak for k in frames])
    per_frame = [max(errors[k] for errors in per_sequence) for k in range(len(per_sequence[0]))]
    return {"max": max(per_frame), "per_frame": [float(f"{e:.3g}") for e in per_frame]}
