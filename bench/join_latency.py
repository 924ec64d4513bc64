"""Figure j: a short streamed job sent while a long job decodes: its time to first audio against
the long job's remaining time.

The long job (four ~20 s chunks, 150 frames each) runs through `Worker.handle`; once it reports
progress, a short streamed job (one chunk, 400 ms items) is sent. Its time to first audio (send ->
first item in the consumer's hands) is its prefill, which runs between two frames of the long job,
plus the frames of one item, because it joins the running batch instead of waiting behind the long
job; the baseline is what it would otherwise wait: the long job's remaining time (send -> its
result). Medians of repeats.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

from bench.common import Row
from bench.weights import chunk_text

LONG_CHUNKS = 4
LONG_FRAMES = 150
SHORT_FRAMES = 20
REPEATS = 3


def measure(workspace) -> tuple[list[Row], dict]:
    from handler import Worker

    started = threading.Event()
    worker = Worker(workspace.settings(max_concurrency=2), workspace.engine(),
                    progress=lambda job, message: job["id"] == "long" and started.set())  # fmt: skip
    long_job = {"text": "\n\n".join(chunk_text(k) for k in range(LONG_CHUNKS)), "max_new_tokens": LONG_FRAMES,
                "diffusion_steps": 10, "seed": 1, "output_format": "mp3"}  # fmt: skip
    short_job = {"text": "A short question, answered at once.", "max_new_tokens": SHORT_FRAMES,
                 "diffusion_steps": 10, "seed": 2, "stream": True, "output_format": "mp3"}  # fmt: skip

    async def once() -> tuple[float, float]:
        started.clear()

        async def long() -> float:
            items = [item async for item in worker.handle({"id": "long", "input": long_job})]
            if "error" in items[-1] or items[-1]["chunks"] != LONG_CHUNKS:
                raise RuntimeError(f"the long job failed: {items[-1]}")
            return time.perf_counter()

        async def short() -> float:
            async for item in worker.handle({"id": "short", "input": short_job}):
                if item.get("status") == "streaming":
                    return time.perf_counter()
            raise RuntimeError("the short job streamed nothing")

        long_task = asyncio.create_task(long())
        await asyncio.to_thread(started.wait, 120)
        sent = time.perf_counter()
        first_audio = await short()
        long_done = await long_task
        return first_audio - sent, long_done - sent

    runs = [asyncio.run(once()) for _ in range(REPEATS)]
    first = statistics.median(run[0] for run in runs)
    remaining = statistics.median(run[1] for run in runs)
    rows = [
        Row("j", "time to first audio of a short streamed job sent while a long job decodes (s)", first, remaining,
            "s", "<= 0.1", f"baseline: the long job's remaining time ({LONG_CHUNKS} chunks of {LONG_FRAMES} frames)"),
    ]  # fmt: skip
    return rows, {"runs": [{"first_audio_s": r[0], "long_remaining_s": r[1]} for r in runs]}
