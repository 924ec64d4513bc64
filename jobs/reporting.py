"""What a job reports: its progress updates while it runs, and its result fields when it is done.

`job_result` builds the result of every synthesis job, whole file or stream, so both carry the
same fields computed the same way (segments, captions, warnings, timings).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from config import MODEL_SAMPLE_RATE
from inference import ChunkAudio, EngineReport
from jobs.planning import JobPlan
from jobs.rendering import AudioSummary
from jobs.timeline import JobTimestamps

# Progress updates of a non-streamed job: one when its first audio is decoded, one when a chunk is
# done, and in between at most one per interval (the chunks of a batch decode together, so a long
# batch would otherwise be silent until its first chunk ends).
PROGRESS_INTERVAL_SEC = 2.0


def job_result(
    plan: JobPlan,
    results: list[ChunkAudio],
    summary: AudioSummary,
    *,
    status: str,
    delivery: dict,
    timings: dict,
    timed: dict | None = None,
    extra_warnings: list[str] | None = None,
    engine: EngineReport | None = None,
) -> dict:
    """The fields of a finished job's result.

    `delivery`: how the audio went out (the URL or base64 and the method, or the streamed item
    count); `timings`: the stages this path measured, in seconds, added to the common ones;
    `timed`: the job's `JobTimestamps.fields` (segments, words, captions; without it, a job that
    asked for no alignment gets them at chunk granularity); `engine`: what the engine ran, reported
    with this job's frames compiled and uncompiled.
    """
    if timed is None:
        timed = JobTimestamps.for_plan(None, plan).fields(summary.placements, plan.captions)
    result = {
        "status": status,
        "format": plan.output_format,
        "content_type": plan.format.content_type,
        "sample_rate": plan.sample_rate,
        "duration_sec": round(summary.duration_sec, 3),
        **delivery,
        "seed": plan.params.seed,
        "chunks": len(results),
        "segments": timed["segments"],
        **({"words": timed["words"]} if "words" in timed else {}),
        "loudness": summary.loudness,
        "timings": _timings(results, {**timings, **_align_timings(timed)}),
    }
    if engine is not None:
        result["engine"] = engine.for_job(results)
    if plan.bitrate_kbps:
        result["bitrate_kbps"] = plan.bitrate_kbps
    if "captions" in timed:
        result["captions"] = timed["captions"]
    warnings = job_warnings(plan, results) + timed["warnings"] + (extra_warnings or [])
    if warnings:
        result["warnings"] = warnings
    return result


def _timings(results: list[ChunkAudio], stages: dict) -> dict:
    """Every stage rounded to the millisecond, plus the real-time factor of the generation."""
    generated_seconds = sum(result.audio.size for result in results) / MODEL_SAMPLE_RATE
    timings = {name: None if value is None else round(value, 3) for name, value in stages.items()}
    generate = stages["generate_sec"]
    timings["real_time_factor"] = round(generate / generated_seconds, 4) if generated_seconds else None
    return timings


def _align_timings(timed: dict) -> dict:
    """Alignment's own time (in its processes, beside generation) and what the job waited for it."""
    if timed["align_sec"] is None:
        return {}
    return {"align_sec": timed["align_sec"], "align_wait_sec": timed["align_wait_sec"]}


def job_warnings(plan: JobPlan, results: list[ChunkAudio]) -> list[str]:
    """The plan's warnings, plus one for chunks that ran into their frame cap."""
    warnings = list(plan.warnings)
    capped = [result.index for result in results if result.reached_cap]
    if capped:
        warnings.append(f"chunk(s) {', '.join(map(str, capped))} reached the frame cap and may be cut short.")
    return warnings


def after_items(message: str, items: int) -> str:
    """An error after streamed audio says so: the job fails, it was not merely cut short."""
    if not items:
        return message
    return f"streaming stopped after {items} item(s): {message[0].lower()}{message[1:]}"


# The summary's warning when a streamed job's final output leaves its audio items out.
ITEMS_LEFT_OUT = (
    "the job's final output (/status, /run) holds only this summary: its audio items together pass "
    "RunPod's {limit:g} MB result limit, and were delivered on /stream."
)


class FinalOutput:
    """Keeps a streamed job's final output within RunPod's result limit.

    The SDK keeps every item a job yields and posts them all as the job's final output
    (`return_aggregate_stream`). RunPod refuses an output past its limit: the job would lose its
    result after all its audio was streamed. `add` sees each item before it is yielded; when the
    summary (the last item) would take the total past `limit`, the earlier items are emptied in
    place (the SDK holds the same objects, and has already posted each one to /stream), so the
    output is `[{}, ..., summary]`, and the summary says so.
    """

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.items: list[dict] = []
        self.size = 2  # the list's brackets

    def add(self, item: dict) -> None:
        size = len(json.dumps(item)) + 2  # and a separator
        if item.get("status") == "complete" and self.size + size > self.limit:
            for earlier in self.items:
                earlier.clear()
            self.size = 2 + 4 * len(self.items)  # "{}, " each
            item["warnings"] = [*item.get("warnings", []), ITEMS_LEFT_OUT.format(limit=self.limit / 1e6)]
            size = len(json.dumps(item)) + 2
        self.items.append(item)
        self.size += size


class ProgressThrottle:
    """Turns the engine's progress calls into the few updates worth sending (see PROGRESS_INTERVAL_SEC).

    Nothing is sent once the last chunk is done: an update sent just before the result can
    arrive after it.
    """

    def __init__(self, total_chunks: int, send: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.total = total_chunks
        self.send = send
        self.clock = clock
        self.last_update: float | None = None
        self.chunks_done = 0

    def __call__(self, audio_seconds: float, chunks_done: int) -> None:
        chunk_ended, self.chunks_done = chunks_done > self.chunks_done, chunks_done
        if chunks_done >= self.total:
            return
        now = self.clock()
        if chunk_ended:
            message = f"chunk {chunks_done} of {self.total} done, {audio_seconds:.1f} s of audio generated"
        elif self.last_update is None or now - self.last_update >= PROGRESS_INTERVAL_SEC:
            message = f"{audio_seconds:.1f} s of audio generated, {chunks_done} of {self.total} chunks done"
        else:
            return
        self.last_update = now
        self.send(message)
