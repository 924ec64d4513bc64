"""GPU smoke and speed check of a deployed worker: real weights, real jobs, one JSON report.

Run it where the worker runs (a GPU pod with the model on the volume or in the image), with the
same environment as the worker (MODEL_ID / MODEL_PATH, VIBEVOICE_HOME, ...):

    python bench/gpu_smoke.py [--out gpu_smoke.json]

It loads the model once, then runs a fixed set of jobs through the worker's own handler: a short
sentence, a long text that splits into several chunks, a three-speaker script with cloned voices,
and the short text streamed (`"stream": true`, where the worker supports streaming). The report
has, per job, the wall time, the audio length, the real-time factor (generation seconds per second
of audio), the time to first audio, and the peak GPU memory; plus the model load time.

Without CUDA it prints why and exits 0. `--cpu` runs it on the CPU anyway (the tests do that with
the tiny checkpoint, to check the script itself).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LONG_TEXT = " ".join(
    [
        "The history of recorded sound begins with machines that scratched vibrations into soot and tin foil.",
        "For decades, every copy of a voice was a physical object that wore out a little each time it was played.",
        "Magnetic tape changed that: sound could be cut, spliced and rearranged like film.",
        "Then came digital audio, where a voice became a list of numbers that never aged.",
        "Today a model can read a script aloud in a voice it heard for only a few seconds.",
        "That raises new questions about consent, about trust, and about what it means to hear someone speak.",
        "It also opens doors for people who have lost their own voice, and for stories that would never be recorded.",
        "In this episode we follow that thread from the phonograph to the neural codec.",
    ]
)
THREE_SPEAKERS = (
    "Speaker 1: Welcome back to the show. Today we have two guests.\n"
    "Speaker 2: Thanks for having me, it's great to be here.\n"
    "Speaker 3: Likewise. I've been looking forward to this conversation all week.\n"
    "Speaker 1: Let's start with the big question: can a machine really sound human?\n"
    "Speaker 2: In short bursts, absolutely. Over an hour, that's still the hard part."
)


def voice_sample(f0: float, seed: int) -> dict:
    """A synthetic reference voice as an inline WAV (the demo voices may not be on the volume)."""
    import soundfile

    from tools.local_home import synthetic_voice

    buffer = io.BytesIO()
    soundfile.write(buffer, synthetic_voice(f0, seed, seconds=6.0), 24000, format="WAV", subtype="PCM_16")
    return {"audio_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}


def smoke_jobs(max_new_tokens: int | None) -> list[tuple[str, dict]]:
    limit = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    common = {"output_format": "wav", "seed": 1234, "return_mode": "base64", **limit}
    short = "Hello! This is a quick check that the worker speaks."
    voices = [voice_sample(210.0, 1), voice_sample(115.0, 2), voice_sample(160.0, 3)]
    return [
        ("short", {"text": short, "disable_prefill": True, **common}),
        ("long_multi_chunk", {"text": LONG_TEXT, "disable_prefill": True, "max_chunk_chars": 300, **common}),
        ("multi_speaker_cloned", {"text": THREE_SPEAKERS, "speakers": voices, **common}),
        ("streaming", {"text": short, "disable_prefill": True, "stream": True, **common}),
    ]


def _audio_seconds(items: list[dict]) -> float | None:
    final = items[-1] if items else {}
    if "duration_sec" in final:
        return float(final["duration_sec"])
    return None


async def run_job(worker, name: str, job_input: dict) -> dict:
    """One job through the handler; timings as seen by a client of the worker."""
    import torch

    cuda = torch.cuda.is_available() and worker.engine.info.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    first_audio: float | None = None
    items: list[dict] = []
    async for item in worker.handle({"id": f"smoke-{name}", "input": job_input}):
        if first_audio is None and isinstance(item, dict) and item.get("status") == "streaming":
            first_audio = time.perf_counter() - started
        items.append(item)
    wall = time.perf_counter() - started
    if items and "error" in items[-1]:
        if job_input.get("stream") and "'stream'" in items[-1]["error"]:
            return {"job": name, "ok": False, "skipped": "this worker version has no streaming: " + items[-1]["error"]}
        return {"job": name, "ok": False, "error": items[-1]["error"], "wall_sec": round(wall, 3)}
    if job_input.get("stream") and first_audio is None:
        return {"job": name, "ok": False, "skipped": "the worker returned no streamed chunks (no streaming support)"}
    seconds = _audio_seconds(items)
    timings = items[-1].get("timings", {}) if items else {}
    generate = timings.get("generate_sec", wall)
    return {
        "job": name,
        "ok": True,
        "wall_sec": round(wall, 3),
        "audio_sec": seconds,
        "chunks": items[-1].get("chunks"),
        "streamed_items": sum(1 for item in items if item.get("status") == "streaming"),
        "real_time_factor": round(generate / seconds, 4) if seconds else None,
        # Without streaming the first audio arrives with the whole result.
        "time_to_first_audio_sec": round(first_audio if first_audio is not None else wall, 3),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }


def run(out: Path | None, force_cpu: bool, max_new_tokens: int | None) -> dict | None:
    import torch

    if not torch.cuda.is_available() and not force_cpu:
        print("gpu_smoke: no CUDA device here; nothing to measure (skipped).")
        return None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from config import load_settings
    from handler import Worker
    from inference import VibeVoiceEngine

    settings = load_settings(**({"device": "cpu"} if force_cpu else {}))
    started = time.perf_counter()
    engine = VibeVoiceEngine.load(settings)
    load_wall = time.perf_counter() - started
    worker = Worker(settings, engine)
    results = [asyncio.run(run_job(worker, name, job)) for name, job in smoke_jobs(max_new_tokens)]
    report = {
        "device": torch.cuda.get_device_name(0) if engine.info.device == "cuda" else "cpu",
        "model": engine.info.source,
        "dtype": engine.info.dtype,
        "attention": engine.info.attention,
        "model_load_sec": round(load_wall, 3),
        "gpu_memory_after_load_gib": round(torch.cuda.memory_allocated() / 2**30, 3)
        if engine.info.device == "cuda"
        else None,
        "jobs": results,
        "ok": all(r["ok"] or "skipped" in r for r in results),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"), help="where to write the JSON report")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even without CUDA (checks the script)")
    parser.add_argument("--max-new-tokens", type=int, help="cap frames per chunk (quick runs)")
    args = parser.parse_args()
    report = run(args.out, args.cpu, args.max_new_tokens)
    return 0 if report is None or report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
