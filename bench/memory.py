"""Figure d: peak memory of a job that produces about ten minutes of audio.

A child process loads the engine, runs a short warm-up job, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), then runs one non-streamed job of ~10 minutes (ten ~300-character
chunks, mp3, uploaded to moto's S3 server) through `Worker.handle`. The figure is the growth of
the peak RSS over the loaded model, as a multiple of the job's audio size (float32 at 24 kHz).
The baseline is that audio size itself; the target is a small multiple of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import ROOT, MotoServer, Row
from bench.weights import chunk_text

CHUNKS = 12
DIFFUSION_STEPS = 3  # memory does not depend on the step count; keeps the run short
TARGET_MULTIPLE = 4  # stated bound: peak growth at most four times the float32 audio


def child() -> None:
    """Runs inside the measured process; prints one JSON line."""
    import asyncio

    import torch

    from bench.common import TORCH_THREADS
    from config import load_settings
    from handler import Worker
    from inference import VibeVoiceEngine

    torch.set_num_threads(TORCH_THREADS)
    settings = load_settings(max_text_length=20000)
    engine = VibeVoiceEngine.load(settings)
    worker = Worker(settings, engine)

    def run(job_input: dict) -> list:
        async def collect():
            return [item async for item in worker.handle({"id": "bench", "input": job_input})]

        return asyncio.run(collect())

    run({"text": "Warm up.", "max_new_tokens": 3, "diffusion_steps": 2})
    loaded = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    text = "\n\n".join(chunk_text(i) for i in range(CHUNKS))
    [item] = run({"text": text, "diffusion_steps": DIFFUSION_STEPS, "return": "url", "max_chunk_chars": 300})
    if "error" in item:
        raise SystemExit(f"the job failed: {item['error']}")
    peak = rss_kib("VmHWM")
    print(json.dumps({"loaded_kib": loaded, "peak_kib": peak, "duration_sec": item["duration_sec"],
                      "chunks": item["chunks"], "generate_sec": item["timings"]["generate_sec"]}))  # fmt: skip


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(workspace) -> tuple[list[Row], dict]:
    server = MotoServer()
    try:
        env = {**os.environ, **workspace.env(), **server.env()}
        process = subprocess.run(
            [sys.executable, "-c", "from bench.memory import child; child()"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        server.close()
    if process.returncode != 0:
        raise RuntimeError(f"the memory job failed:\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    audio_mib = result["duration_sec"] * 24000 * 4 / 2**20
    growth_mib = (result["peak_kib"] - result["loaded_kib"]) / 1024
    rows = [
        Row("d", f"peak memory growth of a {result['duration_sec'] / 60:.1f}-minute job, over the loaded model (MiB)",
            growth_mib, audio_mib, "MiB", f"<= {TARGET_MULTIPLE}",
            f"baseline: the job's audio as float32 at 24 kHz; model loaded: {result['loaded_kib'] / 1024:.0f} MiB RSS"),
    ]  # fmt: skip
    return rows, result
