"""Figure h: four different jobs at once against the same four one after another, through the worker.

Four single-chunk jobs (different texts, voices and seeds; 60 frames each, 10 diffusion steps, mp3)
go through `Worker.handle` as the RunPod SDK runs them with MAX_CONCURRENCY=4: as four concurrent
handler calls, whose chunks the decode scheduler merges into one batch. The baseline is the same
four jobs awaited one after another (what a worker taking one job at a time does). Wall time of
the whole set, medians of interleaved repeats.
"""

from __future__ import annotations

import asyncio

from bench.common import Row, interleaved_medians
from bench.weights import chunk_text

JOBS = 4
FRAMES = 60
REPEATS = 3


def measure(workspace) -> tuple[list[Row], dict]:
    from handler import Worker

    worker = Worker(workspace.settings(max_concurrency=JOBS), workspace.engine())
    jobs = [
        {"text": chunk_text(k), "speaker": ("Alice", "Frank")[k % 2], "seed": 40 + k, "max_new_tokens": FRAMES,
         "diffusion_steps": 10, "output_format": "mp3"}
        for k in range(JOBS)
    ]  # fmt: skip

    async def one(k: int) -> None:
        items = [item async for item in worker.handle({"id": f"g{k}", "input": jobs[k]})]
        if "error" in items[-1] or items[-1]["duration_sec"] < FRAMES / 7.5 - 0.01:
            raise RuntimeError(f"job {k} did not complete: {items[-1]}")

    async def together() -> None:
        await asyncio.gather(*(one(k) for k in range(JOBS)))

    async def one_after_another() -> None:
        for k in range(JOBS):
            await one(k)

    ours, baseline, detail = interleaved_medians(
        lambda: asyncio.run(together()), lambda: asyncio.run(one_after_another()), REPEATS
    )
    rows = [
        Row("h", f"wall time of {JOBS} single-chunk jobs ({FRAMES / 7.5:.0f} s of audio each) sent together (s)",
            ours, baseline, "s", "<= 0.5", f"MAX_CONCURRENCY={JOBS}; baseline: the same jobs one after another"),
    ]  # fmt: skip
    detail.update(jobs=JOBS, frames=FRAMES, repeats=REPEATS)
    return rows, detail
