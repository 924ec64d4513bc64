"""RunPod serverless entry point: validate the job, plan it, generate, render, deliver.

    python handler.py                              # production worker loop (on RunPod)
    python handler.py --test_input '{"input": {...}}'   # one local job, then exit
    python handler.py --rp_serve_api               # the SDK's local HTTP server

A job's `input` (schema.JobInput; the contract is docs/api.md) is either
    {"text": "...", ...}            synthesis: text or a "Speaker 1: ..." script, voices by preset name
                                    or cloned from audio, output format, rate, bitrate, speed,
                                    loudness, captions, "return": auto | url | base64, "stream": true
    {"action": "list_voices"}       the preset voices on the volume

The handler is an async generator (concurrency and cancellation need `async`). A job yields one
result, or one `{"error": ...}` item, which fails the job. A `stream: true` job yields audio items
as frames are decoded, then one `{"status": "complete", ...}` summary (or an error item, which
fails the job). The SDK's local modes do not iterate generators, so there the same handler runs
behind `collect`, which returns what it yielded.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from config import Settings, SettingsError, load_settings
from inference import ChunkAudio, ModelLoadError, StartupError, VibeVoiceEngine
from jobs.planning import JobError, JobPlan, plan_job
from jobs.rendering import LevelTracker, StreamRenderer, render
from jobs.reporting import FinalOutput, ProgressThrottle, after_items, job_result
from jobs.schema import InputError, JobInput, parse_job_input
from jobs.storage import DeliveryError, S3Storage, deliver
from jobs.streaming import StreamedGeneration
from jobs.timeline import JobTimestamps
from jobs.voices import VoiceLibrary
from runtime import lifetime
from runtime.lifecycle import (
    NOT_STARTED_BY_SHUTDOWN,
    STOPPED_BY_SHUTDOWN,
    Shutdown,
    ShutdownError,
    register_failed_load,
    register_warm_up,
    report_unstarted_jobs,
)
from runtime.logs import quiet_runpod_sdk, setup_logging
from text.aligner import Aligner, shared_aligner

log = logging.getLogger("vibevoice.handler")

# Errors whose message is written for the user (one sentence naming the field or the cause).
USER_ERRORS = (InputError, JobError, DeliveryError, ShutdownError)


class Worker:
    """Everything a job needs, created once per process: settings, engine, voices, storage."""

    def __init__(
        self,
        settings: Settings,
        engine: VibeVoiceEngine,
        library: VoiceLibrary | None = None,
        storage: S3Storage | None = None,
        progress: Callable[[dict, str], None] | None = None,
        aligner: Aligner | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.aligner = aligner or shared_aligner()  # word timings, in background processes
        self.library = library or VoiceLibrary.for_settings(settings)
        self.storage = storage if storage is not None else (S3Storage(settings) if settings.s3_configured else None)
        self.progress = progress
        self.shutdown = Shutdown(settings.shutdown_timeout)
        # Jobs taken at once (RunPod's concurrency_modifier); 0: as many as fill the decode batch.
        self.concurrency = settings.max_concurrency or (engine.default_concurrency() if engine is not None else 1)

    async def handle(self, job: dict) -> AsyncIterator[dict]:
        """The RunPod handler: yields the job's result (or its streamed items), or one error item."""
        size_thread_pool(self.concurrency)
        started = time.perf_counter()
        streamed = 0
        cancel = CancelWatch(job)
        try:
            if self.shutdown.expired():
                raise ShutdownError(NOT_STARTED_BY_SHUTDOWN)
            job_input = parse_job_input(job.get("input"), self.settings)
            if job_input.action == "list_voices":
                yield {"voices": self.library.describe()}
            elif job_input.stream:
                async for item in self.stream(job, job_input, started, cancel.hooks):
                    yield item
                    streamed += 1
            else:
                yield await self.run(job, job_input, started)
        except USER_ERRORS as exc:
            log.info("job %s failed: %s", job.get("id"), exc)
            yield {"error": after_items(str(exc), streamed)}
        except Exception as exc:  # a bug or a fault: log the traceback, tell the user one sentence
            log.exception("job %s failed unexpectedly", job.get("id"))
            message = f"internal error while generating audio ({type(exc).__name__}); the job was not completed."
            yield {"error": after_items(message, streamed)}
        cancel.close()  # not reached when the job is cancelled: the callback must see that

    async def serve(self, job: dict) -> AsyncIterator[dict]:
        """`handle` for the SDK's production loop, whose final output (every item, aggregated)
        is kept within RunPod's result limit (`reporting.FinalOutput`)."""
        output = FinalOutput(self.settings.result_limit_bytes)
        async for item in self.handle(job):
            output.add(item)
            yield item

    async def run(self, job: dict, job_input: JobInput, started: float) -> dict:
        """A whole-file job: plan, generate, render, deliver; returns the result."""
        plan = await asyncio.to_thread(plan_job, job_input, self.settings, self.library)
        stamps = JobTimestamps.for_plan(self.aligner, plan)
        tracker = LevelTracker(plan, self.settings)  # measures loudness while the audio is generated
        results, generate_seconds = await self._generate(job, plan, stamps, tracker)
        rendered = await asyncio.to_thread(render, plan, results, self.settings, tracker.level())
        delivery = await asyncio.to_thread(
            deliver,
            data=rendered.data,
            content_type=plan.format.content_type,
            extension=plan.format.extension,
            mode=plan.return_mode,
            storage=self.storage,
            inline_limit=self.settings.inline_limit_bytes,
        )
        timed = await asyncio.to_thread(stamps.fields, rendered.summary.placements, plan.captions)
        timings = {
            "model_load_sec": self.engine.info.load_seconds,
            "generate_sec": generate_seconds,
            "postprocess_sec": rendered.summary.postprocess_seconds,
            "encode_sec": rendered.summary.encode_seconds,
            "upload_sec": delivery.upload_seconds,
            "total_sec": time.perf_counter() - started,
        }
        result = job_result(
            plan, results, rendered.summary, status="completed",
            delivery={**delivery.fields, "delivery": delivery.method}, timings=timings, timed=timed,
            extra_warnings=delivery.warnings, engine=self.engine.report(),
        )  # fmt: skip
        log.info(
            "job %s: %d chars, %d chunks, %.2f s audio, rtf %s, delivery %s",
            job.get("id"), plan.characters, len(results), rendered.summary.duration_sec,
            result["timings"]["real_time_factor"], delivery.method,
        )  # fmt: skip
        return result

    async def _generate(
        self, job: dict, plan: JobPlan, stamps: JobTimestamps, tracker: LevelTracker
    ) -> tuple[list[ChunkAudio], float]:
        """The engine's audio for every chunk (in a worker thread), and the seconds it took; each
        finished chunk goes to the aligner (when the job wants timings) while the next decodes, and
        the audio to the level tracker as it comes."""
        stop = threading.Event()
        progress = None
        if self.progress is not None:
            progress = ProgressThrottle(len(plan.chunks), lambda message: self.progress(job, message))

        def chunk_done(result: ChunkAudio, total: int) -> None:
            stamps.chunk_done(result)
            tracker.on_chunk(result, total)

        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(
                self.engine.synthesize,
                plan.chunks,
                plan.voices,
                plan.params,
                on_chunk=chunk_done,
                should_stop=lambda: stop.is_set() or self.shutdown.expired(),
                on_progress=progress,
                on_audio=tracker.on_audio if tracker.enabled else None,
            )
        except asyncio.CancelledError:
            stop.set()  # the generation thread ends at its next frame
            raise
        if self.shutdown.expired():  # generation stopped early: the audio is incomplete
            raise ShutdownError(STOPPED_BY_SHUTDOWN)
        return results, time.perf_counter() - started

    async def stream(
        self, job: dict, job_input: JobInput, started: float, on_cancel: list[Callable[[], None]]
    ) -> AsyncIterator[dict]:
        """A streamed job: audio items while the engine decodes, then the summary item."""
        plan = await asyncio.to_thread(plan_job, job_input, self.settings, self.library)
        renderer = StreamRenderer(plan, self.settings)
        stamps = JobTimestamps.for_plan(self.aligner, plan)
        generation = StreamedGeneration(self.engine, plan, renderer, self.shutdown, stamps)
        on_cancel.append(generation.stop.set)  # a cancel that lands while the SDK holds an item
        generation.start()
        first_audio: float | None = None
        items = 0
        try:
            while (next_item := await generation.next_piece()) is not None:
                piece, words = next_item
                if first_audio is None:
                    first_audio = time.perf_counter() - started
                item = {
                    "status": "streaming",
                    "seq": items,
                    "format": plan.output_format,
                    "sample_rate": plan.sample_rate,
                    "audio_chunk": base64.b64encode(piece).decode("ascii"),
                }
                if words:  # "timestamps": "word": the chunks aligned since the item before
                    item["words"] = words
                yield item
                items += 1
        finally:
            generation.stop.set()  # a no-op after a normal end; otherwise the engine stops at its next frame
        results = await generation.finished()
        summary = renderer.summary()
        timed = await asyncio.to_thread(stamps.fields, summary.placements, plan.captions)
        timings = {
            "model_load_sec": self.engine.info.load_seconds,
            "time_to_first_audio_sec": first_audio,
            "generate_sec": generation.seconds,
            "encode_sec": summary.encode_seconds,
            "total_sec": time.perf_counter() - started,
        }
        result = job_result(
            plan, results, summary, status="complete", delivery={"delivery": "stream", "items": items},
            timings=timings, timed=timed, engine=self.engine.report(),
        )  # fmt: skip
        log.info(
            "job %s: streamed %d items, %.2f s audio, first audio after %s s",
            job.get("id"), items, summary.duration_sec, result["timings"]["time_to_first_audio_sec"],
        )  # fmt: skip
        yield result

    async def collect(self, job: dict) -> list | dict:
        """`handle` for the SDK's local modes: the yielded items as a list, or the error.

        With VIBEVOICE_TEST_OUTPUT set, the same value is also written there as JSON (the SDK
        truncates long log lines, so `make run` reads the audio from that file).
        """
        items = [item async for item in self.handle(job)]
        errors = [item for item in items if isinstance(item, dict) and "error" in item]
        result: list | dict = {"error": errors[0]["error"]} if errors else items
        if os.environ.get("VIBEVOICE_TEST_OUTPUT"):
            Path(os.environ["VIBEVOICE_TEST_OUTPUT"]).write_text(json.dumps(result))
        return result


def runpod_progress(job: dict, message: str) -> None:
    import runpod

    runpod.serverless.progress_update(job, message)


def _sdk_local_mode(argv: list[str]) -> bool:
    """True where the SDK runs the handler itself without iterating generators."""
    return "--test_input" in argv or "--rp_serve_api" in argv or not os.environ.get("RUNPOD_WEBHOOK_GET_JOB")


def main() -> None:
    # The SDK's heartbeat is a fork: it must die with the worker, not ping on as an orphan.
    lifetime.children_die_with_this_process()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"vibevoice worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings)
    os.environ.setdefault("HF_HOME", str(settings.hf_home))
    import runpod

    quiet_runpod_sdk()  # at DEBUG (its default) the SDK prints every job's output, presigned URLs included

    local = _sdk_local_mode(sys.argv)
    try:
        engine = VibeVoiceEngine.load(settings)
    except ModelLoadError as exc:
        line = f"vibevoice worker: model failed to load: {exc}"
        print(line, file=sys.stderr, flush=True)
        if local:
            raise SystemExit(1) from None
        # On RunPod a failed fitness check reports the worker unhealthy, with this reason, and exits 1.
        register_failed_load(runpod, str(exc))
        engine = None
    else:
        if not local:
            register_warm_up(runpod, engine)
        else:  # the SDK's local modes run no fitness checks: the same check, before the first job
            try:
                engine.warm_up()
            except StartupError as exc:
                print(f"vibevoice worker: start-up check failed: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(1) from None
    worker = Worker(settings, engine, progress=None if local else runpod_progress)
    log.info("taking up to %d job(s) at once (MAX_CONCURRENCY=%d)", worker.concurrency, settings.max_concurrency)

    def concurrency(current: int) -> int:
        # The SDK's job loop calls this first, just after installing its SIGTERM handler.
        worker.shutdown.watch_sigterm()
        return worker.concurrency

    runpod.serverless.start(
        {
            "handler": worker.collect if local else worker.serve,
            "return_aggregate_stream": True,
            "concurrency_modifier": concurrency,
        }
    )
    if not local:  # the SDK's loop has ended (SIGTERM): nothing it took may vanish
        report_unstarted_jobs()


_POOL_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> threads in its pool


class CancelWatch:
    """Logs the job's cancellation and runs `hooks` when RunPod cancels it.

    The SDK cancels the task that iterates the handler. A whole job is inside the handler then and
    gets CancelledError there; a streamed job is often not: the SDK is posting its last item, so
    the handler's generator stays suspended until it is collected, and its engine would go on
    decoding. The task's own end is the one signal both cases share."""

    def __init__(self, job: dict):
        self.job_id = job.get("id")
        self.hooks: list[Callable[[], None]] = []
        self.task = asyncio.current_task()
        if self.task is not None:
            self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            log.info("job %s cancelled", self.job_id)
            for hook in self.hooks:
                hook()

    def close(self) -> None:
        """The job ended by itself: a task that runs more jobs after it keeps no callback for it."""
        if self.task is not None and not self.task.done():
            self.task.remove_done_callback(self._ended)


def thread_pool_size(jobs: int) -> int:
    """Threads in the event loop's pool for `jobs` jobs at once: each running job holds a thread
    while the engine generates for it, and another to plan or render; 4 to spare."""
    return 2 * jobs + 4


def size_thread_pool(jobs: int) -> None:
    """Give the running event loop's default thread pool room for `jobs` jobs at once
    (asyncio's own pool, min(32, cores + 4) threads, would cap how many jobs share the decode batch)."""
    loop = asyncio.get_running_loop()
    needed = thread_pool_size(jobs)
    if _POOL_SIZES.get(loop, 0) >= needed:
        return
    previous = getattr(loop, "_default_executor", None)
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(needed, thread_name_prefix="job"))
    _POOL_SIZES[loop] = needed
    if previous is not None:
        previous.shutdown(wait=False)  # its running work finishes; its idle threads end


if __name__ == "__main__":
    main()
