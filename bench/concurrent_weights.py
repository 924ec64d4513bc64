"""Figure i: 7B weight bytes read per second of audio with 8 jobs running at once, against 1 job.

The model of figure a (bench/weights.py): module calls counted with forward hooks on the tiny
checkpoint, each weighed by that module's parameter bytes in the real 7B in bf16. Eight
single-chunk jobs (two voices, their own seeds) call `VibeVoiceEngine.synthesize` from eight
threads, as the handler does for concurrent jobs; the scheduler decodes them in one batch, so one
weight read serves every row. The baseline is one such job alone. Prompt passes (one per chunk)
and voice encodes (once per distinct voice: the cache is emptied before each run) are counted too.
"""

from __future__ import annotations

import threading

from bench.common import Row
from bench.weights import DIFFUSION_STEPS, CallCounter, chunk_text, real_module_bytes

JOBS = 8
FRAMES = 60


def measure(workspace) -> tuple[list[Row], dict]:
    from inference import GenerationParams
    from text.script import Chunk, Turn

    engine = workspace.engine()
    voices = workspace.voices()
    sizes = real_module_bytes()

    def job(k: int):
        return [Chunk(0, (Turn(k % 2, chunk_text(k)),))], GenerationParams(1.3, DIFFUSION_STEPS, 60 + k, FRAMES)

    def run(count: int) -> dict:
        engine.decoder.voice_cache.clear()
        results: list = [None] * count

        def one(k: int) -> None:
            chunks, params = job(k)
            results[k] = engine.synthesize(chunks, voices, params)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(count)]
        with CallCounter(engine) as counter:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        frames = [r.frames for result in results for r in result]
        assert frames == [FRAMES] * count, f"every job must decode {FRAMES} frames: {frames}"
        audio_seconds = count * FRAMES / engine.frame_rate
        return {"calls": dict(counter.calls), "audio_seconds": audio_seconds,
                "bytes_per_audio_second": counter.weighted_bytes(sizes) / audio_seconds}  # fmt: skip

    alone, together = run(1), run(JOBS)
    ours, baseline = together["bytes_per_audio_second"] / 1e9, alone["bytes_per_audio_second"] / 1e9
    rows = [
        Row("i", f"7B weight reads per audio second, {JOBS} concurrent single-chunk jobs (GB)", ours, baseline,
            "GB", "<= 0.2", "baseline: one job alone; module calls counted on the tiny model, weighed as the 7B"),
    ]  # fmt: skip
    return rows, {"jobs": JOBS, "frames": FRAMES, "one_job": alone, "concurrent": together}
