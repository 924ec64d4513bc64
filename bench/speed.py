"""Figure b: wall time of an 8-chunk text on this CPU, own batched loop against stock `generate`.

Both go through `VibeVoiceEngine.synthesize` (same prompts, voices, seed and frame counts); the
baseline is DECODE_LOOP=stock, which runs transformers' generate chunk after chunk. On this CPU
the tiny checkpoint's convolutional codecs are compute-bound and cost the same in both loops,
so this ratio understates what batching saves on a GPU (figure a).
"""

from __future__ import annotations

from bench.common import Row, interleaved_medians
from bench.weights import chunk_text

CHUNKS = 8
FRAMES_PER_CHUNK = 100
DIFFUSION_STEPS = 10
REPEATS = 3


def measure(workspace) -> tuple[list[Row], dict]:
    from inference import GenerationParams
    from text.script import Chunk, Turn

    engine = workspace.engine()
    voices = workspace.voices()
    chunks = [Chunk(i, (Turn(i % 2, chunk_text(i)),)) for i in range(CHUNKS)]
    params = GenerationParams(1.3, DIFFUSION_STEPS, seed=11, max_new_tokens=FRAMES_PER_CHUNK)

    def run(loop: str):
        def synthesize():
            engine.decode_loop, engine.batch_size = loop, CHUNKS
            try:
                results = engine.synthesize(chunks, voices, params)
            finally:
                engine.decode_loop, engine.batch_size = "own", 0
            assert sum(r.frames for r in results) == CHUNKS * FRAMES_PER_CHUNK
            return results

        return synthesize

    ours, baseline, detail = interleaved_medians(run("own"), run("stock"), REPEATS)
    audio_seconds = CHUNKS * FRAMES_PER_CHUNK / engine.frame_rate
    speedup = baseline / ours
    rows = [
        Row("b", f"wall time, {CHUNKS}-chunk text ({audio_seconds:.0f} s of audio), own batched loop (s)", ours,
            baseline, "s", None, f"stock generate chunk by chunk is the baseline; speed-up {speedup:.2f}x"),
        Row("b", "speed-up of the own loop (baseline time / own time)", speedup, 1.0, "x", ">= 3"),
        Row("b", "real-time factor on this CPU, own loop (tiny checkpoint)", ours / audio_seconds,
            baseline / audio_seconds, "RTF", None),
    ]  # fmt: skip
    detail.update(chunks=CHUNKS, frames_per_chunk=FRAMES_PER_CHUNK, diffusion_steps=DIFFUSION_STEPS, repeats=REPEATS)
    return rows, detail
