"""The worker's life around its jobs: start-up fitness checks, SIGTERM, and jobs left at shutdown.

RunPod runs the fitness checks before the worker takes its first job (a failing one marks the
worker unhealthy). On SIGTERM the SDK stops taking jobs and waits for the running ones;
`Shutdown` bounds that wait, and `report_unstarted_jobs` fails what the SDK took but never ran.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

from inference import VibeVoiceEngine

log = logging.getLogger("vibevoice.handler")

STOPPED_BY_SHUTDOWN = (
    "the worker was shut down before the job finished, so no audio was delivered; submit the job again."
)
NOT_STARTED_BY_SHUTDOWN = (
    "the worker was shut down before the job started, so nothing was generated; submit the job again."
)


class ShutdownError(RuntimeError):
    """The worker is shutting down (SIGTERM) and the job cannot finish in time."""


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


def register_failed_load(runpod_module, reason: str) -> None:
    """A start-up fitness check that fails with the load error (RunPod then marks the worker unhealthy)."""

    def model_loaded() -> None:
        raise RuntimeError(f"model failed to load: {reason}")

    runpod_module.serverless.register_fitness_check(model_loaded)


def register_warm_up(runpod_module, engine: VibeVoiceEngine) -> None:
    """A start-up fitness check: the fast paths checked against the plain ones (the decode step compiled
    first, with COMPILE on), then one forward pass with finite audio (see VibeVoiceEngine.warm_up)."""

    def warm_up() -> None:
        engine.warm_up()

    runpod_module.serverless.register_fitness_check(warm_up)


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
