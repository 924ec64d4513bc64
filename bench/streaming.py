"""Figure f: streaming, time to the first audio item against the job's total time.

One streamed job of a single chunk giving 20 s of audio (150 frames, 10 diffusion steps, mp3,
400 ms items) through `Worker.handle`, timed from the handler's start: when the first audio item
reaches the consumer, and when the summary item does. Medians of repeats after a warm-up.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench.common import Row
from bench.weights import chunk_text

FRAMES = 150
REPEATS = 3


def measure(workspace) -> tuple[list[Row], dict]:
    from handler import Worker

    worker = Worker(workspace.settings(), workspace.engine())
    job = {"text": chunk_text(0), "max_new_tokens": FRAMES, "diffusion_steps": 10, "seed": 3, "stream": True,
           "output_format": "mp3"}  # fmt: skip

    async def one_job() -> tuple[float, float, int]:
        started = time.perf_counter()
        first = None
        items = 0
        async for item in worker.handle({"id": "bench", "input": job}):
            if "error" in item:
                raise RuntimeError(item["error"])
            if item["status"] == "streaming":
                items += 1
                if first is None:
                    first = time.perf_counter() - started
        return first, time.perf_counter() - started, items

    asyncio.run(one_job())  # warm-up
    runs = [asyncio.run(one_job()) for _ in range(REPEATS)]
    first = statistics.median(run[0] for run in runs)
    total = statistics.median(run[1] for run in runs)
    rows = [
        Row("f", f"streaming: time to first audio item, {FRAMES / 7.5:.0f} s single-chunk job (s)", first, total,
            "s", "<= 0.25", "baseline: the job's total time"),
    ]  # fmt: skip
    detail = {"runs": [{"first_audio_s": r[0], "total_s": r[1], "items": r[2]} for r in runs]}
    return rows, detail
