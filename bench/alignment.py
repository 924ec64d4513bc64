"""Figure g: word alignment, its cost per minute of audio and what it does to a job's time.

The cost: `aligner.align_chunk` on the espeak-ng corpus (real speech with known word starts,
tools/speech_corpus.py), CPU seconds per minute of audio against the minute itself (so the ratio
is the aligner's real-time factor on one core), with the word-start error it reaches. The job: an
8-chunk job through `Worker.handle` with `"timestamps": "word"` against the same job without,
alternately. Decoded chunk by chunk (BATCH_SIZE=1), each chunk is aligned in the aligner's process
while the next one decodes, so only the last chunk's alignment adds to the job; decoded as one
batch, the chunks finish together and their alignment follows the batch (informational row). The
tiny checkpoint's chunks are noise, which the aligner gives up on after a full search, and the
2-core machine shares its CPU between decoding and aligning.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np

from bench.common import Row, interleaved_medians
from bench.weights import chunk_text

REPEATS = 3
JOB_CHUNKS = 8
JOB_FRAMES = 40


def measure(workspace) -> tuple[list[Row], dict]:
    from text import aligner
    from tools import speech_corpus

    corpus = speech_corpus.build()
    audio_seconds = sum(sentence.audio.size for sentence in corpus) / speech_corpus.RATE
    aligner.align_chunk([(0, corpus[0].text)], corpus[0].audio, speech_corpus.RATE)  # loads the model

    def align_all() -> list[float]:
        errors = []
        for sentence in corpus:
            timing = aligner.align_chunk([(0, sentence.text)], sentence.audio, speech_corpus.RATE)
            errors += speech_corpus.start_errors_ms(sentence, [word.start for word in timing.words])
        return errors

    times = []
    for _ in range(REPEATS):
        started = time.process_time()
        errors = align_all()
        times.append(time.process_time() - started)
    per_minute = statistics.median(times) / audio_seconds * 60
    median_error, p95_error = statistics.median(errors), float(np.percentile(errors, 95))

    with_words, without, sequential = _job_times(workspace, batch_size=1)
    batched_words, batched_without, batched = _job_times(workspace, batch_size=0)
    rows = [
        Row("g", "word alignment, CPU seconds per minute of audio (s)", per_minute, 60.0, "s", "<= 0.1",
            f"baseline: the minute itself; {len(errors)} espeak-ng words, start error median {median_error:.1f} ms, "
            f"p95 {p95_error:.1f} ms"),
        Row("g", f"wall time of a {JOB_CHUNKS}-chunk job with word timestamps, chunk by chunk (s)", with_words,
            without, "s", "<= 1.3", "baseline: the same job without timestamps"),
        Row("g", f"same, {JOB_CHUNKS} chunks in one batch (s)", batched_words, batched_without, "s",
            note="alignment follows the batch"),
    ]  # fmt: skip
    detail = {"align_cpu_seconds": times, "audio_seconds": audio_seconds, "words": len(errors),
              "median_error_ms": median_error, "p95_error_ms": p95_error, "chunk_by_chunk": sequential,
              "one_batch": batched}  # fmt: skip
    return rows, detail


def _job_times(workspace, batch_size: int) -> tuple[float, float, dict]:
    from handler import Worker
    from text.aligner import Aligner

    settings = workspace.settings(max_chunk_chars=120, batch_size=batch_size)
    worker = Worker(settings, workspace.engine(), aligner=Aligner(24000))
    text = " ".join(chunk_text(index)[:110] for index in range(JOB_CHUNKS))
    job = {"text": text, "max_new_tokens": JOB_FRAMES, "diffusion_steps": 3, "seed": 1, "output_format": "wav"}

    def run(timestamps: str) -> None:
        async def one() -> dict:
            return [item async for item in worker.handle({"id": "bench", "input": {**job, "timestamps": timestamps}})]

        (result,) = asyncio.run(one())
        if "error" in result:
            raise RuntimeError(result["error"])

    with_words, without, detail = interleaved_medians(lambda: run("word"), lambda: run("none"), REPEATS)
    worker.aligner.close()
    return with_words, without, detail
