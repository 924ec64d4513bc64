"""RunPod serverless entry point: validate the job, run the engine, deliver the audio.

    python handler.py                              # production worker loop (on RunPod)
    python handler.py --test_input '{"input": {...}}'   # one local job, then exit
    python handler.py --rp_serve_api               # the SDK's local HTTP server

The handler is an async generator (concurrency and cancellation need `async`). A job yields one
result, or one `{"error": ...}` item, which fails the job. A `stream: true` job yields audio items
as frames are decoded, then one `{"status": "complete", ...}` summary (or an error item, which
fails the job). The SDK's local modes do not iterate generators, so there the same handler runs
behind `collect`, which returns what it yielded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np

import captions
import lifetime
from config import Settings, SettingsError, load_settings
from inference import ChunkAudio, ModelLoadError, VibeVoiceEngine
from jobs import JobError, StreamRenderer, build_segments, chunk_spans, plan_job, render
from schema import InputError, JobInput, parse_job_input
from storage import DeliveryError, S3Storage, deliver
from voices import VoiceLibrary

log = logging.getLogger("vibevoice.handler")


class ShutdownError(RuntimeError):
    """The worker is shutting down (SIGTERM) and the job cannot finish in time."""


# Errors whose message is written for the user (one sentence naming the field or the cause).
USER_ERRORS = (InputError, JobError, DeliveryError, ShutdownError)
STOPPED_BY_SHUTDOWN = (
    "the worker was shut down before the job finished, so no audio was delivered; submit the job again."
)
NOT_STARTED_BY_SHUTDOWN = (
    "the worker was shut down before the job started, so nothing was generated; submit the job again."
)
# Encoded audio items waiting between the generation thread and the handler; when the consumer
# falls behind, generation waits (at most this many items are held).
STREAM_QUEUE_ITEMS = 8
# Progress updates of a non-streamed job: one when its first audio is decoded, one when a chunk is
# done, and in between at most one per interval (the chunks of a batch decode together, so a long
# batch would otherwise be silent until its first chunk ends).
PROGRESS_INTERVAL_SEC = 2.0


class Shutdown:
    """What the worker does on SIGTERM (RunPod scales the worker down, or replaces it).

    The SDK's own handler stops taking jobs and waits for the running ones. On top of that, a job
    still running `timeout` seconds after the signal is stopped at its next frame and FAILED with
    a sentence, and a job that starts after that time fails at once: RunPod kills the worker a
    few seconds after SIGTERM, and a job killed with it would be lost without a word.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout  # 0: running jobs may take as long as they need
        self.since: float | None = None
        self._watching = False

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
            limit = f"{self.timeout:g} s" if self.timeout else "no time limit"
            log.warning("SIGTERM: taking no more jobs; running jobs may finish (%s)", limit)

    def expired(self) -> bool:
        return self.since is not None and self.timeout > 0 and time.monotonic() - self.since >= self.timeout

    def watch_sigterm(self) -> None:
        """Chain a SIGTERM handler in front of the one installed now (the SDK's). Main thread only."""
        if self._watching or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: object) -> None:
            self.begin()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._watching = True


class Worker:
    """Everything a job needs, created once per process: settings, engine, voices, storage."""

    def __init__(
        self,
        settings: Settings,
        engine: VibeVoiceEngine,
        library: VoiceLibrary | None = None,
        storage: S3Storage | None = None,
        progress: Callable[[dict, str], None] | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.library = library or VoiceLibrary.for_settings(settings)
        self.storage = storage if storage is not None else (S3Storage(settings) if settings.s3_configured else None)
        self.progress = progress
        self.shutdown = Shutdown(settings.shutdown_timeout)

    def _should_stop(self, stop: threading.Event) -> Callable[[], bool]:
        """The engine's stop check: the job was cancelled, or the shutdown time is up."""
        return lambda: stop.is_set() or self.shutdown.expired()

    async def handle(self, job: dict) -> AsyncIterator[dict]:
        """The RunPod handler: yields the job's result (or its streamed items), or one error item."""
        started = time.perf_counter()
        streamed = 0
        try:
            if self.shutdown.expired():
                raise ShutdownError(NOT_STARTED_BY_SHUTDOWN)
            job_input = parse_job_input(job.get("input"), self.settings)
            if job_input.action == "synthesize" and job_input.stream:
                async for item in self.stream(job, job_input, started):
                    yield item
                    streamed += 1
            else:
                yield await self.run(job, job_input, started)
        except USER_ERRORS as exc:
            log.info("job %s failed: %s", job.get("id"), exc)
            yield {"error": _after_items(str(exc), streamed)}
        except asyncio.CancelledError:
            log.info("job %s cancelled", job.get("id"))
            raise
        except Exception as exc:  # a bug or a fault: log the traceback, tell the user one sentence
            log.exception("job %s failed unexpectedly", job.get("id"))
            message = f"internal error while generating audio ({type(exc).__name__}); the job was not completed."
            yield {"error": _after_items(message, streamed)}

    async def run(self, job: dict, job_input: JobInput, started: float) -> dict:
        if job_input.action == "list_voices":
            return {"voices": self.library.describe()}

        plan = await asyncio.to_thread(plan_job, job_input, self.settings, self.library)
        stop = threading.Event()

        last_update: float | None = None
        last_done = 0

        def on_progress(audio_seconds: float, chunks_done: int) -> None:
            nonlocal last_update, last_done
            total = len(plan.chunks)
            chunk_ended, last_done = chunks_done > last_done, chunks_done
            # Never once the last chunk is done: an update sent just before the result can arrive after it.
            if not self.progress or chunks_done >= total:
                return
            now = time.monotonic()
            if chunk_ended:
                message = f"chunk {chunks_done} of {total} done, {audio_seconds:.1f} s of audio generated"
            elif last_update is None or now - last_update >= PROGRESS_INTERVAL_SEC:
                message = f"{audio_seconds:.1f} s of audio generated, {chunks_done} of {total} chunks done"
            else:
                return
            last_update = now
            self.progress(job, message)

        generate_started = time.perf_counter()
        try:
            results = await asyncio.to_thread(
                self.engine.synthesize,
                plan.chunks, plan.voices, plan.params, None, self._should_stop(stop), None, on_progress,
            )  # fmt: skip
        except asyncio.CancelledError:
            stop.set()  # the generation thread ends at its next frame
            raise
        if self.shutdown.expired():  # generation stopped early: the audio is incomplete
            raise ShutdownError(STOPPED_BY_SHUTDOWN)
        generate_seconds = time.perf_counter() - generate_started

        rendered = await asyncio.to_thread(render, plan, results, self.settings, time.perf_counter)
        delivery = await asyncio.to_thread(
            deliver,
            rendered.data,
            rendered.content_type,
            rendered.extension,
            plan.return_mode,
            self.storage,
            self.settings.inline_limit_bytes,
        )

        generated_seconds = sum(result.audio.size for result in results) / self.engine.sample_rate
        warnings = job_warnings(plan, results) + delivery.warnings
        output = {
            "status": "completed",
            "format": plan.output_format,
            "content_type": rendered.content_type,
            "sample_rate": plan.sample_rate,
            "duration_sec": round(rendered.duration_sec, 3),
            **delivery.fields,
            "delivery": delivery.method,
            "seed": plan.params.seed,
            "chunks": len(results),
            "segments": rendered.segments,
            "loudness": rendered.loudness,
            "timings": {
                "model_load_sec": round(self.engine.info.load_seconds, 3),
                "generate_sec": round(generate_seconds, 3),
                "postprocess_sec": round(rendered.postprocess_seconds, 3),
                "encode_sec": round(rendered.encode_seconds, 3),
                "upload_sec": round(delivery.upload_seconds, 3),
                "total_sec": round(time.perf_counter() - started, 3),
                "real_time_factor": round(generate_seconds / generated_seconds, 4) if generated_seconds else None,
            },
        }
        if plan.bitrate_kbps:
            output["bitrate_kbps"] = plan.bitrate_kbps
        if rendered.captions is not None:
            output["captions"] = rendered.captions
        if warnings:
            output["warnings"] = warnings
        log.info(
            "job %s: %d chars, %d chunks, %.2f s audio, rtf %s, delivery %s",
            job.get("id"), plan.characters, len(results), rendered.duration_sec,
            output["timings"]["real_time_factor"], delivery.method,
        )  # fmt: skip
        return output

    async def stream(self, job: dict, job_input: JobInput, started: float) -> AsyncIterator[dict]:
        """A streamed job: audio items while the engine decodes, then the summary item.

        The engine runs in a worker thread and hands encoded pieces over through a bounded queue.
        Leaving this generator early (the job is cancelled, or the consumer stops) sets the stop
        event: the engine ends at its next frame and releases itself for the next job.
        """
        plan = await asyncio.to_thread(plan_job, job_input, self.settings, self.library)
        renderer = StreamRenderer(plan, self.settings)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        room = threading.Semaphore(STREAM_QUEUE_ITEMS)  # bounds the queue: one slot per waiting item
        stop = threading.Event()

        def put(message: tuple) -> None:
            """From the generation thread: wait for room in the queue, unless the job has stopped."""
            while not room.acquire(timeout=0.2):
                if stop.is_set():
                    return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, message)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                return

        finished_chunks = 0

        def on_audio(index: int, samples) -> None:
            for piece in renderer.audio(samples):
                put(("audio", piece))

        def on_chunk(result: ChunkAudio, total: int) -> None:
            nonlocal finished_chunks
            finished_chunks += 1
            if finished_chunks < total:
                for piece in renderer.chunk_done():
                    put(("audio", piece))

        def generate() -> None:
            try:
                results = self.engine.synthesize(
                    plan.chunks, plan.voices, plan.params, on_chunk, self._should_stop(stop), on_audio
                )
                if self.shutdown.expired():
                    raise ShutdownError(STOPPED_BY_SHUTDOWN)
                if not stop.is_set():
                    tail = renderer.finish()
                    if tail:
                        put(("audio", tail))
                put(("done", results))
            except BaseException as exc:  # handed to the handler, which turns it into the job's error
                put(("error", exc))

        generate_started = time.perf_counter()
        worker = loop.run_in_executor(None, generate)
        first_audio: float | None = None
        sequence = 0
        try:
            while True:
                kind, value = await queue.get()
                room.release()
                if kind == "error":
                    raise value
                if kind == "done":
                    results = value
                    break
                if first_audio is None:
                    first_audio = time.perf_counter() - started
                yield {
                    "status": "streaming",
                    "seq": sequence,
                    "format": plan.output_format,
                    "sample_rate": plan.sample_rate,
                    "audio_chunk": base64.b64encode(value).decode("ascii"),
                }
                sequence += 1
        finally:
            stop.set()  # a no-op after a normal end; otherwise the engine stops at its next frame
        await worker
        generate_seconds = time.perf_counter() - generate_started
        yield self._stream_summary(job, plan, renderer, results, sequence, started, first_audio, generate_seconds)

    def _stream_summary(self, job, plan, renderer, results, items, started, first_audio, generate_seconds) -> dict:
        generated_seconds = sum(result.audio.size for result in results) / self.engine.sample_rate
        segments = build_segments(plan, results, chunk_spans(results, renderer.gap_samples), renderer.time_scale)
        warnings = job_warnings(plan, results)
        summary = {
            "status": "complete",
            "format": plan.output_format,
            "content_type": renderer.encoder.content_type,
            "sample_rate": plan.sample_rate,
            "duration_sec": round(renderer.output_samples / plan.sample_rate, 3),
            "delivery": "stream",
            "items": items,
            "seed": plan.params.seed,
            "chunks": len(results),
            "segments": segments,
            "loudness": renderer.loudness_report(),
            "timings": {
                "model_load_sec": round(self.engine.info.load_seconds, 3),
                "time_to_first_audio_sec": round(first_audio, 3) if first_audio is not None else None,
                "generate_sec": round(generate_seconds, 3),
                "encode_sec": round(renderer.encode_seconds, 3),
                "total_sec": round(time.perf_counter() - started, 3),
                "real_time_factor": round(generate_seconds / generated_seconds, 4) if generated_seconds else None,
            },
        }
        if plan.bitrate_kbps:
            summary["bitrate_kbps"] = plan.bitrate_kbps
        if plan.captions:
            summary["captions"] = captions.build(segments, plan.captions)
        if warnings:
            summary["warnings"] = warnings
        log.info(
            "job %s: streamed %d items, %.2f s audio, first audio after %s s",
            job.get("id"), items, summary["duration_sec"], summary["timings"]["time_to_first_audio_sec"],
        )  # fmt: skip
        return summary

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


def job_warnings(plan, results: list[ChunkAudio]) -> list[str]:
    """The plan's warnings, plus one for chunks that ran into their frame cap."""
    warnings = list(plan.warnings)
    capped = [result.index for result in results if result.reached_cap]
    if capped:
        warnings.append(f"chunk(s) {', '.join(map(str, capped))} reached the frame cap and may be cut short.")
    return warnings


def _after_items(message: str, items: int) -> str:
    """An error after streamed audio says so: the job fails, it was not merely cut short."""
    if not items:
        return message
    return f"streaming stopped after {items} item(s): {message[0].lower()}{message[1:]}"


class RedactSecrets(logging.Filter):
    """Replaces every known secret in log records with '***'."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def setup_logging(settings: Settings) -> None:
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    stream.addFilter(RedactSecrets(settings.secret_values()))
    root = logging.getLogger()
    root.handlers[:] = [stream]
    root.setLevel(settings.log_level)
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def runpod_progress(job: dict, message: str) -> None:
    import runpod

    runpod.serverless.progress_update(job, message)


def register_failed_load(runpod_module, reason: str) -> None:
    """A start-up fitness check that fails with the load error (RunPod then marks the worker unhealthy)."""

    def model_loaded() -> None:
        raise RuntimeError(f"model failed to load: {reason}")

    runpod_module.serverless.register_fitness_check(model_loaded)


def register_warm_up(runpod_module, engine: VibeVoiceEngine) -> None:
    """A start-up fitness check that generates one frame, so a worker whose GPU or kernels are
    broken is reported unhealthy before it takes a job rather than failing every job."""

    def model_generates() -> None:
        from inference import GenerationParams
        from text import Chunk, Turn

        params = GenerationParams(cfg_scale=1.3, diffusion_steps=1, seed=0, max_new_tokens=1, use_voice_prompt=False)
        result = engine.generate_chunk(Chunk(0, (Turn(0, "Hello."),)), {}, params)
        if result.audio.size == 0 or not bool(np.isfinite(result.audio).all()):
            raise RuntimeError("the model produced no usable audio in a one-frame warm-up")

    runpod_module.serverless.register_fitness_check(model_generates)


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
    worker = Worker(settings, engine, progress=None if local else runpod_progress)

    def concurrency(current: int) -> int:
        # The SDK's job loop calls this first, just after installing its SIGTERM handler.
        worker.shutdown.watch_sigterm()
        return settings.max_concurrency

    runpod.serverless.start(
        {
            "handler": worker.collect if local else worker.handle,
            "return_aggregate_stream": True,
            "concurrency_modifier": concurrency,
        }
    )
    if not local:  # the SDK's loop has ended (SIGTERM): nothing it took may vanish
        report_unstarted_jobs()


def report_unstarted_jobs() -> int:
    """Report FAILED every job the SDK took but never ran; returns how many.

    On SIGTERM the SDK stops its loop, yet a job-take request already on its way can still hand
    it a job, which then sits in its queue unrun while RunPod counts it as in progress.
    """
    try:  # the SDK's own job registry and result call (runpod 1.12)
        from runpod.http_client import AsyncClientSession
        from runpod.serverless.modules.rp_http import send_result
        from runpod.serverless.modules.worker_state import JobsProgress
    except ImportError:
        return 0
    left = sorted(job.id for job in JobsProgress())
    if not left:
        return 0

    async def report() -> None:
        async with AsyncClientSession() as session:
            for job_id in left:
                await send_result(session, {"error": NOT_STARTED_BY_SHUTDOWN}, {"id": job_id})

    asyncio.run(report())
    log.warning("shutdown: %d job(s) taken but not started were reported failed: %s", len(left), ", ".join(left))
    return len(left)


if __name__ == "__main__":
    main()
