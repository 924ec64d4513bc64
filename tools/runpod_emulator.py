"""A local stand-in for RunPod's public serverless API, fed by the real runpod worker loop.

RunPod's SDK has a local server (`handler.py --rp_serve_api`), but it answers differently from the
real service (POST for /status and /stream, /run only stores the job, /stream returns everything at
the end, yielded errors count as success). This module serves the public endpoint API the way
api.runpod.ai does, on 127.0.0.1 only, under the real path shape `/v2/{endpoint_id}/...`:

    POST /run               queue a job: {"id", "status": "IN_QUEUE"}
    POST /runsync?wait=ms   queue a job and wait for it (90 s by default; 1000-300000 ms, else 400)
    GET  /status/{id}       the job: id, status, delayTime, executionTime, workerId, output | error
    GET  /status-sync/{id}?wait=ms   /status that waits like /runsync
    GET  /stream/{id}       the items streamed since the previous call: {"status", "stream": [{"output"}]}
    POST /cancel/{id}       CANCELLED; a running job is stopped on its worker
    POST /retry/{id}        re-queue a FAILED or TIMED_OUT job under the same id
    POST /purge-queue       drop the queued jobs: {"removed", "status": "completed"}
    GET  /health            {"jobs": {...}, "workers": {...}}

Every public route needs `Authorization: Bearer <key>` (a bare key is accepted as well, as RunPod's
own docs send it); anything else gets 401. The same server also plays RunPod's control plane
for a worker process started with the SDK's webhook variables (`worker_env`), so jobs run through
the SDK's production loop unchanged: `job-take` (and `job-take-batch` when the worker's concurrency
is above 1) hand out queued jobs as long-polls, `job-stream` receives each yielded item, `job-done`
receives the final result and progress updates (`{"status": "IN_PROGRESS", ...}`), `job-stop` is
the long-poll that carries `{"jobsToStop": [...]}` when a job is cancelled or times out, and
`ping` is the worker's heartbeat. The control routes need the worker's own key.

Policies follow RunPod's documentation: `policy.executionTimeout` (default 600000 ms, more than
5000) ends a running job TIMED_OUT, `policy.ttl` (default 24 h, 10 s to 7 days) ends a job that is
not finished by then TIMED_OUT, and results are kept 30 minutes after /run and 1 minute after
/runsync, then /status answers 404. A result larger than 20 MB (`result_limit_bytes`) is refused:
the job reads COMPLETED without its output, as reported of RunPod. Deliberate simplifications are
listed in the project docs (no webhooks, one endpoint per server, /stream never holds the request
open).

RunPod behaviours that clients must survive are off by default and switched on with a
`RunpodBehaviour` (constructor argument `behaviour`, or the attribute at any time; command-line
flags for `make serve`): the RUNNING state, /stream backlogs split across replies at 1 MB, rate
limits answered 429 with Retry-After, and passing 5xx answers on /status and /stream.
`submissions(text)` lists every job ever submitted with that input text (with its policy), so
tests can count the jobs a client caused.

A worker can have a cold start (`start_worker(..., cold_start_s=N)`, `--cold-start N`): RunPod
counts it as initializing and hands it no job until N seconds after it was started, however soon its
process asks, as a worker that scales from zero pulls its image, loads the model and compiles first.

Python use (tests, `make serve`):

    with RunpodEmulator(api_key="k") as api:                 # 127.0.0.1, a free port
        with api.start_worker({"MODEL_PATH": ...}) as worker:  # `python handler.py`, real SDK loop
            worker.wait_until_polling(timeout=120)
            requests.post(f"{api.base_url}/runsync", headers=api.headers, json={"input": {...}})

Command line (what `make serve` runs):

    python -m tools.runpod_emulator [--port 8000] [--key KEY] [--no-worker] [--cold-start SECONDS]
        [--running-state] [--stream-reply-bytes N] [--rate-limit N/SECONDS] [--transient-every N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from runtime import lifetime

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("runpod_emulator")

IN_QUEUE, IN_PROGRESS = "IN_QUEUE", "IN_PROGRESS"
COMPLETED, FAILED, CANCELLED, TIMED_OUT = "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"
FINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

# Documented limits and defaults (docs.runpod.io, "Send API requests" / "Operation reference").
RUNSYNC_DEFAULT_WAIT_MS = 90_000
RUNSYNC_WAIT_BOUNDS_MS = (1_000, 300_000)
RUN_PAYLOAD_LIMIT = 10 * 1024 * 1024
RUNSYNC_PAYLOAD_LIMIT = 20 * 1024 * 1024
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
MIN_EXECUTION_TIMEOUT_MS = 5_000  # "must be > 5000 ms"
DEFAULT_TTL_MS = 24 * 3600 * 1000
TTL_BOUNDS_MS = (10_000, 7 * 24 * 3600 * 1000)
RUN_RETENTION_S = 30 * 60
RUNSYNC_RETENTION_S = 60
STREAM_REPLY_LIMIT_BYTES = 1_000_000  # a /stream reply carries at most 1 MB of items
# A job's final result (the job-done body) larger than /runsync's documented 20 MB payload limit,
# which the SDK's own size check names too, is refused with 400 Bad Request; the job then reads
# COMPLETED without its output (runpod/runpod-python#309, runpod-workers/worker-comfyui#129).
RESULT_LIMIT_BYTES = 20_000_000
RATE_LIMITS = {"run": (1000, 10.0), "runsync": (2000, 10.0), "status": (2000, 10.0), "stream": (2000, 10.0)}

# The SDK ignores a stop signal for a job it has taken but not started yet (its run loop starts
# jobs every 0.1 s), so a stop is repeated every STOP_RESEND_S until the worker drops the job.
STOP_RESEND_S = 0.5
STOP_SIGNAL_LIFETIME_S = 120.0

NOT_FOUND = {"error": "request does not exist"}

# A worker that dies holding jobs (killed by the out-of-memory killer, its machine lost): RunPod
# notices when its heartbeat stops and puts the jobs back in the queue ("automatic retries" of
# queue-based endpoints; the /health "retried" count). A job whose worker is lost again after
# LOST_WORKER_RETRIES retries ends FAILED with LOST_WORKER_ERROR (see the docs' failure section).
LOST_WORKER_RETRIES = 1
LOST_WORKER_ERROR = (
    "the worker running this job stopped before it finished (it may have run out of memory), "
    "and so did the worker it was retried on; the job was not completed."
)


@dataclass
class Job:
    """One request, as the service keeps it."""

    id: str
    input: Any
    sync: bool
    submitted: float
    execution_timeout_s: float
    ttl_s: float
    s3_config: dict | None = None
    status: str = IN_QUEUE
    worker_id: str | None = None
    started: float | None = None
    finished: float | None = None
    output: Any = None
    has_output: bool = False
    error: str | None = None
    progress: Any = None
    stream: list = field(default_factory=list)
    stream_read: int = 0  # how many stream items /stream has handed out
    lost: int = 0  # times the worker running the job was lost
    expires: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def reply(self) -> dict:
        """The job as /status shows it."""
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            body["delayTime"] = _ms(self.started - self.submitted)
            if self.finished is not None:
                body["executionTime"] = _ms(self.finished - self.started)
        if self.worker_id:
            body["workerId"] = self.worker_id
        if self.status == IN_PROGRESS and self.progress is not None:
            body["output"] = self.progress
        elif self.has_output and self.status in (COMPLETED, FAILED):
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body

    def for_worker(self) -> dict:
        job: dict[str, Any] = {"id": self.id, "input": self.input}
        if self.s3_config is not None:
            job["s3Config"] = self.s3_config
        return job


@dataclass
class PendingStop:
    """A stop signal for a job on a worker, repeated until the worker no longer has the job."""

    raised: float
    sent: float = 0.0


@dataclass
class WorkerSeen:
    """A worker process as the control plane knows it."""

    id: str
    last_seen: float
    first_seen: float = field(default_factory=time.monotonic)
    jobs: set[str] = field(default_factory=set)
    to_stop: dict[str, PendingStop] = field(default_factory=dict)
    stop_signal: asyncio.Event = field(default_factory=asyncio.Event)
    leaving: bool = False
    unhealthy: str | None = None  # "check: reason" from a failed start-up fitness check

    def forget_stops(self, still_running: set[str] | None = None) -> None:
        """Drop the stop signals the worker no longer needs: all when it runs nothing (`None`), else
        those of jobs it no longer reports (a report older than the signal could cross it, hence 2 s)."""
        now = time.monotonic()
        for job_id, stop in list(self.to_stop.items()):
            if still_running is None or (job_id not in still_running and now - stop.raised > 2.0):
                del self.to_stop[job_id]


@dataclass
class RunpodBehaviour:
    """RunPod behaviours that clients must cope with, off unless switched on (all opt-in).

    running_state       a job on a worker reads RUNNING (a documented state) instead of IN_PROGRESS
    stream_reply_bytes  a /stream reply carries items up to this many bytes (RunPod: 1 MB); the rest
                        waits for the next call, while the reply already shows the job's final status
    rate_limits         {operation: (requests, seconds)}, e.g. {"run": (1, 2.0)} or RATE_LIMITS (RunPod's
                        published limits); calls past the limit get 429 with Retry-After
    transient_every     every Nth /status and /stream call answers `transient_status` (a gateway
                        failure) before anything is handed out
    lose_stream_every   every Nth /stream reply that carries items hands them out and is then lost on
                        the way (the client gets `transient_status`; a retried read brings the items
                        after them), as a reply dropped between RunPod and its client
    """

    running_state: bool = False
    stream_reply_bytes: int | None = None
    rate_limits: dict[str, tuple[int, float]] | None = None
    transient_every: int = 0
    transient_status: int = 503
    lose_stream_every: int = 0
    _calls: dict[str, int] = field(default_factory=dict, repr=False)
    _recent: dict[str, deque] = field(default_factory=dict, repr=False)

    def refusal(self, operation: str) -> web.Response | None:
        """The 429 or passing 5xx this call gets instead of an answer, if any."""
        limit = (self.rate_limits or {}).get(operation)
        if limit:
            count, seconds = limit
            now = time.monotonic()
            recent = self._recent.setdefault(operation, deque())
            while recent and now - recent[0] >= seconds:
                recent.popleft()
            if len(recent) >= count:
                retry_after = max(1, math.ceil(seconds - (now - recent[0])))
                return web.json_response(
                    {"error": "rate limit exceeded"}, status=429, headers={"Retry-After": str(retry_after)}
                )
            recent.append(now)
        if self.transient_every and operation in ("status", "stream"):
            self._calls[operation] = self._calls.get(operation, 0) + 1
            if self._calls[operation] % self.transient_every == 0:
                return web.json_response({"error": "upstream connect error"}, status=self.transient_status)
        return None

    def shown(self, body: Any) -> Any:
        """A public reply as RunPod words it (RUNNING for a job a worker has)."""
        if self.running_state and isinstance(body, dict) and body.get("status") == IN_PROGRESS:
            return {**body, "status": "RUNNING"}
        return body

    def stream_batch(self, items: list) -> list:
        """The first items of a /stream backlog that fit in one reply (always at least one)."""
        if not self.stream_reply_bytes:
            return items
        size, batch = 0, []
        for item in items:
            size += len(json.dumps({"output": item}))
            if batch and size > self.stream_reply_bytes:
                break
            batch.append(item)
        return batch

    def loses(self, items: list) -> bool:
        """Whether this /stream reply, carrying `items`, is lost on the way (`lose_stream_every`)."""
        if not (self.lose_stream_every and items):
            return False
        self._calls["stream replies"] = self._calls.get("stream replies", 0) + 1
        return self._calls["stream replies"] % self.lose_stream_every == 0


class RequestError(Exception):
    """A client error: becomes `{"error": message}` with the given HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class RunpodEmulator:
    """RunPod's public endpoint API and worker control plane on 127.0.0.1, in a background thread.

    `api_key` is what clients send; the worker gets a separate key of its own. `port=0` picks a
    free port. Retention, timeouts and the long-poll hold time can be shortened for tests.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        endpoint_id: str = "vibevoice-local",
        port: int = 0,
        run_retention_s: float = RUN_RETENTION_S,
        runsync_retention_s: float = RUNSYNC_RETENTION_S,
        min_execution_timeout_ms: int = MIN_EXECUTION_TIMEOUT_MS,
        poll_hold_s: float = 5.0,
        worker_timeout_s: float = 30.0,
        lost_worker_retries: int = LOST_WORKER_RETRIES,
        min_ttl_ms: int = TTL_BOUNDS_MS[0],
        result_limit_bytes: int = RESULT_LIMIT_BYTES,
        behaviour: RunpodBehaviour | None = None,
    ):
        self.api_key = api_key or "rp-local-" + secrets.token_hex(12)
        self.worker_key = "rp-worker-" + secrets.token_hex(12)
        self._control_keys = _worker_keys(self.worker_key)
        self.endpoint_id = endpoint_id
        self.requested_port = port
        self.run_retention_s = run_retention_s
        self.runsync_retention_s = runsync_retention_s
        self.min_execution_timeout_ms = min_execution_timeout_ms
        self.min_ttl_ms = min_ttl_ms
        self.result_limit_bytes = result_limit_bytes
        self.behaviour = behaviour or RunpodBehaviour()
        self._submissions: list[dict] = []  # every job ever submitted (kept past the jobs' retention)
        self.poll_hold_s = poll_hold_s
        self.worker_timeout_s = worker_timeout_s
        self.lost_worker_retries = lost_worker_retries
        self.port: int | None = None

        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._workers: dict[str, WorkerSeen] = {}
        self._expected_workers: set[str] = set()
        self._ready_at: dict[str, float] = {}  # a worker's cold start ends then (time.monotonic())
        self._polling: dict[str, threading.Event] = {}  # set at a worker's first job-take
        self._processes: dict[str, WorkerProcess] = {}  # workers this emulator started, by pod id
        self._counts = {"completed": 0, "failed": 0, "retried": 0}
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._take_waiters: set[asyncio.Future] = set()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._janitor: asyncio.Task | None = None

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's root, e.g. http://127.0.0.1:8000."""
        if self.port is None:
            raise RuntimeError("the emulator is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The endpoint's base URL, as https://api.runpod.ai/v2/{endpoint_id} would be."""
        return f"{self.url}/v2/{self.endpoint_id}"

    @property
    def headers(self) -> dict[str, str]:
        """Headers for a client request (the bearer key and JSON)."""
        return {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}

    def start(self) -> RunpodEmulator:
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="runpod-emulator", daemon=True)
        self._thread.start()
        if not started.wait(30) or failure:
            raise RuntimeError(f"the RunPod emulator did not start: {failure[0] if failure else 'timeout'}")
        log.info("RunPod emulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=15)
        self._thread = None

    @contextlib.contextmanager
    def behaving(self, **switches: object) -> Iterator[None]:
        """RunpodBehaviour(**switches) for the length of a `with` block (tests switch RunPod's rough edges)."""
        saved = self.behaviour
        self.behaviour = RunpodBehaviour(**switches)
        try:
            yield
        finally:
            self.behaviour = saved

    def __enter__(self) -> RunpodEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(self._routes())
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.requested_port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._janitor = asyncio.create_task(self._sweep_forever())

    async def _shutdown(self) -> None:
        self._closing = True
        if self._janitor:
            self._janitor.cancel()
        self._wake_pollers()
        for job in self._jobs.values():
            job.done.set()  # release waiting /runsync calls
        if self._runner:
            await self._runner.cleanup()

    # --- the worker side ------------------------------------------------------------------

    def worker_env(self, pod_id: str = "worker-local") -> dict[str, str]:
        """The variables RunPod sets in a worker container, pointing at this server (runpod 1.12)."""
        control = f"{self.url}/v2/{self.endpoint_id}"
        return {
            # Templates: the SDK substitutes $ID and $RUNPOD_POD_ID itself.
            "RUNPOD_WEBHOOK_GET_JOB": f"{control}/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{control}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{control}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{control}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_AI_API_KEY": self.worker_key,
            "RUNPOD_POD_ID": pod_id,
            "RUNPOD_POD_HOSTNAME": pod_id,
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,
            # No GPU here, and the start-up network check dials 8.8.8.8: skip both.
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        }

    def start_worker(
        self,
        env: dict[str, str] | None = None,
        *,
        pod_id: str | None = None,
        log_path: Path | None = None,
        command: list[str] | None = None,
        cold_start_s: float = 0.0,
    ) -> WorkerProcess:
        """Start `python handler.py` (the production loop) against this server; see WorkerProcess.

        With `cold_start_s`, the worker is initializing and takes no job until that many seconds from now."""
        pod_id = pod_id or "worker-" + secrets.token_hex(4)
        self._call(self._expect_worker, pod_id, time.monotonic() + cold_start_s)
        full_env = {"RUNPOD_DEBUG_LEVEL": "INFO", **os.environ, **(env or {}), **self.worker_env(pod_id)}
        process = WorkerProcess(self, pod_id, full_env, log_path, command or [sys.executable, "handler.py"])
        self._processes[pod_id] = process
        return process

    def polling_event(self, pod_id: str) -> threading.Event:
        """Set once the worker `pod_id` has asked for a job."""
        return self._polling.setdefault(pod_id, threading.Event())

    def release_worker(self, pod_id: str) -> None:
        """The worker is shutting down: answer its held long-polls now and give it no more jobs."""
        self._call(self._release_worker, pod_id)

    def _call(self, function: Callable[..., Any], *args: object) -> Any:
        """Run `function` on the server's loop (state is only touched there) and return its result."""
        if self._loop is None:
            raise RuntimeError("the emulator is not running")

        async def run() -> Any:
            result = function(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=15)

    def _expect_worker(self, pod_id: str, ready_at: float) -> None:
        self._expected_workers.add(pod_id)
        self._ready_at[pod_id] = ready_at
        self.polling_event(pod_id)

    def _release_worker(self, pod_id: str) -> None:
        self._expected_workers.discard(pod_id)
        worker = self._workers.get(pod_id)
        if worker:
            worker.leaving = True
            worker.stop_signal.set()
        self._wake_pollers()

    def _wake_pollers(self, workers: bool = True) -> None:
        """Wake held job-take polls (and, with `workers`, the job-stop polls too)."""
        for waiter in self._take_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if workers:
            for worker in self._workers.values():
                worker.stop_signal.set()

    # --- routes ---------------------------------------------------------------------------

    def _routes(self) -> list[web.RouteDef]:
        prefix = "/v2/{endpoint_id}"
        public = [
            ("POST", "/run", self._run),
            ("POST", "/runsync", self._runsync),
            ("GET", "/status/{job_id}", self._status),
            ("POST", "/status/{job_id}", self._status),
            ("GET", "/status-sync/{job_id}", self._status_sync),
            ("POST", "/status-sync/{job_id}", self._status_sync),
            ("GET", "/stream/{job_id}", self._stream),
            ("POST", "/stream/{job_id}", self._stream),
            ("POST", "/cancel/{job_id}", self._cancel),
            ("POST", "/retry/{job_id}", self._retry),
            ("POST", "/purge-queue", self._purge_queue),
            ("GET", "/health", self._health),
        ]
        control = [
            ("GET", "/job-take/{worker_id}", self._job_take),
            ("GET", "/job-take-batch/{worker_id}", self._job_take_batch),
            ("GET", "/job-stop/{worker_id}", self._job_stop),
            ("POST", "/job-done/{worker_id}/{job_id}", self._job_done),
            ("POST", "/job-stream/{worker_id}/{job_id}", self._job_stream),
            ("GET", "/ping/{worker_id}", self._ping),
        ]
        routes = [web.route(m, prefix + p, self._public(h)) for m, p, h in public]
        routes += [web.route(m, prefix + p, self._control(h)) for m, p, h in control]
        return routes

    def _public(self, handler):
        async def wrapped(request: web.Request) -> web.Response:
            if not _key_matches(request, [self.api_key]):
                return web.json_response({"error": "Unauthorized"}, status=401)
            if request.match_info["endpoint_id"] != self.endpoint_id:
                return web.json_response({"error": "endpoint not found"}, status=404)
            self._expire()
            refusal = self.behaviour.refusal(request.path.split("/")[3])
            if refusal is not None:
                return refusal
            try:
                body, status = await handler(request)
            except RequestError as exc:
                body, status = {"error": str(exc)}, exc.status
            return web.json_response(self.behaviour.shown(body), status=status)

        return wrapped

    def _control(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not _key_matches(request, self._control_keys):
                return web.json_response({"error": "Unauthorized"}, status=401)
            if request.match_info["endpoint_id"] != self.endpoint_id:
                return web.json_response({"error": "endpoint not found"}, status=404)
            worker = self._see_worker(request.match_info["worker_id"])
            return await handler(request, worker)

        return wrapped

    # --- public operations ----------------------------------------------------------------

    async def _run(self, request: web.Request) -> tuple[dict, int]:
        job = self._submit(await _read_json(request, RUN_PAYLOAD_LIMIT), sync=False)
        return {"id": job.id, "status": job.status}, 200

    async def _runsync(self, request: web.Request) -> tuple[dict, int]:
        wait_s = _wait_seconds(request)
        job = self._submit(await _read_json(request, RUNSYNC_PAYLOAD_LIMIT), sync=True)
        await self._wait_done(job, wait_s)
        return job.reply(), 200

    async def _status(self, request: web.Request) -> tuple[dict, int]:
        job = self._jobs.get(request.match_info["job_id"])
        return (job.reply(), 200) if job else (NOT_FOUND, 404)

    async def _status_sync(self, request: web.Request) -> tuple[dict, int]:
        job = self._jobs.get(request.match_info["job_id"])
        if not job:
            return NOT_FOUND, 404
        await self._wait_done(job, _wait_seconds(request))
        return job.reply(), 200

    async def _stream(self, request: web.Request) -> tuple[dict, int]:
        job = self._jobs.get(request.match_info["job_id"])
        if not job:
            return NOT_FOUND, 404
        items = self.behaviour.stream_batch(job.stream[job.stream_read :])
        job.stream_read += len(items)
        if self.behaviour.loses(items):
            return {"error": "upstream connect error"}, self.behaviour.transient_status
        return {"status": job.status, "stream": [{"output": item} for item in items]}, 200

    async def _cancel(self, request: web.Request) -> tuple[dict, int]:
        job = self._jobs.get(request.match_info["job_id"])
        if not job:
            return NOT_FOUND, 404
        if job.status not in FINAL:
            self._end(job, CANCELLED)
            log.info("job %s cancelled", job.id)
        return {"id": job.id, "status": job.status}, 200

    async def _retry(self, request: web.Request) -> tuple[dict, int]:
        job = self._jobs.get(request.match_info["job_id"])
        if not job:
            return NOT_FOUND, 404
        if job.status not in (FAILED, TIMED_OUT):
            raise RequestError(400, f"only FAILED or TIMED_OUT jobs can be retried; this job is {job.status}.")
        job.done = asyncio.Event()  # the finished attempt released its waiters
        job.submitted = time.monotonic()
        self._requeue(job)
        self._counts["retried"] += 1
        return {"id": job.id, "status": job.status}, 200

    def _requeue(self, job: Job) -> None:
        """Back in the queue under the same id, without the previous attempt's output or stream."""
        for timer in job.timers:
            timer.cancel()
        job.timers.clear()
        job.status, job.worker_id, job.started, job.finished, job.expires = IN_QUEUE, None, None, None, None
        job.output, job.has_output, job.error, job.progress = None, False, None, None
        job.stream, job.stream_read = [], 0
        ttl_left = max(0.0, job.submitted + job.ttl_s - time.monotonic())
        job.timers.append(self._loop.call_later(ttl_left, self._time_out, job, "ttl"))
        self._enqueue(job)

    async def _purge_queue(self, request: web.Request) -> tuple[dict, int]:
        removed = 0
        while self._queue:
            job = self._jobs.get(self._queue.popleft())
            if job and job.status == IN_QUEUE:
                self._end(job, CANCELLED)
                removed += 1
        return {"removed": removed, "status": "completed"}, 200

    async def _health(self, request: web.Request) -> tuple[dict, int]:
        statuses = [job.status for job in self._jobs.values()]
        now = time.monotonic()
        alive = [w for w in self._workers.values() if not w.leaving and now - w.last_seen < self.worker_timeout_s]
        warming = {w.id for w in alive if self._ready_at.get(w.id, 0.0) > now}
        alive = [w for w in alive if w.id not in warming]
        running = sum(1 for w in alive if w.jobs)
        idle = len(alive) - running
        initializing = len((self._expected_workers - set(self._workers)) | warming)
        jobs = {
            "completed": self._counts["completed"],
            "failed": self._counts["failed"],
            "inProgress": statuses.count(IN_PROGRESS),
            "inQueue": statuses.count(IN_QUEUE),
            "retried": self._counts["retried"],
        }
        unhealthy = sum(1 for w in self._workers.values() if w.unhealthy)
        workers = {"idle": idle, "initializing": initializing, "ready": idle, "running": running,
                   "throttled": 0, "unhealthy": unhealthy}  # fmt: skip
        return {"jobs": jobs, "workers": workers}, 200

    def _submit(self, body: Any, sync: bool) -> Job:
        if not isinstance(body, dict) or body.get("input") is None:
            raise RequestError(400, "the request body must be a JSON object with an 'input' field.")
        policy = body.get("policy") or {}
        if not isinstance(policy, dict):
            raise RequestError(400, "'policy' must be an object.")
        timeout_ms = _policy_ms(policy, "executionTimeout", DEFAULT_EXECUTION_TIMEOUT_MS,
                                self.min_execution_timeout_ms + 1, TTL_BOUNDS_MS[1])  # fmt: skip
        ttl_ms = _policy_ms(policy, "ttl", DEFAULT_TTL_MS, self.min_ttl_ms, TTL_BOUNDS_MS[1])
        s3_config = body.get("s3Config")
        if body.get("webhook") or body.get("webhookV2"):
            log.warning("webhooks are not emulated; the job runs but no webhook is called")
        job_id = ("sync-" if sync else "") + f"{uuid.uuid4()}-u1"
        job = Job(job_id, body["input"], sync, time.monotonic(), timeout_ms / 1000, ttl_ms / 1000,
                  s3_config if isinstance(s3_config, dict) else None)  # fmt: skip
        self._jobs[job.id] = job
        job.timers.append(self._loop.call_later(job.ttl_s, self._time_out, job, "ttl"))
        self._enqueue(job)
        self._record_submission(job, policy)
        log.info("job %s queued (%s)", job.id, "runsync" if sync else "run")
        return job

    # --- what clients submitted (for tests that count jobs) -------------------------------

    def _record_submission(self, job: Job, policy: dict) -> None:
        text = job.input.get("text") if isinstance(job.input, dict) else None
        self._submissions.append({"id": job.id, "text": text, "sync": job.sync, "policy": policy})

    def submissions(self, text: str | None = None) -> list[dict]:
        """Every job submitted (with input text `text`): id, text, sync, policy, and its status now
        (None once RunPod would have forgotten it)."""

        def collect() -> list[dict]:
            found = [dict(entry) for entry in self._submissions if text is None or entry["text"] == text]
            for entry in found:
                job = self._jobs.get(entry["id"])
                entry["status"] = job.status if job else None
            return found

        return self._call(collect)

    def _enqueue(self, job: Job) -> None:
        self._queue.append(job.id)
        self._wake_pollers(workers=False)

    async def _wait_done(self, job: Job, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), seconds)

    def _end(
        self, job: Job, status: str, output: Any = None, has_output: bool = False, error: str | None = None
    ) -> None:
        """Move a job to a final status; a running job is told to stop on its worker."""
        if job.status == IN_PROGRESS and status in (CANCELLED, TIMED_OUT):
            worker = self._workers.get(job.worker_id or "")
            if worker:
                worker.to_stop[job.id] = PendingStop(time.monotonic())
                worker.stop_signal.set()
        if job.status == IN_QUEUE:
            with contextlib.suppress(ValueError):
                self._queue.remove(job.id)
        worker = self._workers.get(job.worker_id or "")
        if worker:
            worker.jobs.discard(job.id)
        job.status, job.output, job.has_output, job.error = status, output, has_output, error
        job.finished = time.monotonic()
        if job.started is None and status in (CANCELLED, TIMED_OUT):
            job.started = job.finished  # delayTime then reads as the time spent waiting
        job.expires = job.finished + (self.runsync_retention_s if job.sync else self.run_retention_s)
        for timer in job.timers:
            timer.cancel()
        job.timers.clear()
        if status == COMPLETED:
            self._counts["completed"] += 1
        elif status in (FAILED, TIMED_OUT):
            self._counts["failed"] += 1
        job.done.set()

    def _time_out(self, job: Job, reason: str) -> None:
        if job.status not in FINAL:
            log.info("job %s timed out (%s)", job.id, reason)
            self._end(job, TIMED_OUT, error=f"job timed out ({reason})")

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id in [j.id for j in self._jobs.values() if j.expires is not None and j.expires <= now]:
            del self._jobs[job_id]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._expire()
            self._find_lost_workers()

    def _find_lost_workers(self) -> None:
        """Workers holding jobs whose process has exited, or whose heartbeat stopped, are lost."""
        now = time.monotonic()
        for worker in [w for w in self._workers.values() if w.jobs]:
            process = self._processes.get(worker.id)
            exited = process is not None and process.process.poll() is not None
            silent = now - worker.last_seen > self.worker_timeout_s
            if exited or silent:
                self._lose_worker(worker, "its process exited" if exited else "its heartbeat stopped")

    def _lose_worker(self, worker: WorkerSeen, why: str) -> None:
        """Forget the worker; its running jobs go back to the queue, or fail once retried enough."""
        del self._workers[worker.id]
        for job_id in sorted(worker.jobs):
            job = self._jobs.get(job_id)
            if job is None or job.status != IN_PROGRESS or job.worker_id != worker.id:
                continue
            job.lost += 1
            if job.lost > self.lost_worker_retries:
                log.warning("job %s lost with worker %s (%s); retried %d time(s): FAILED", job.id, worker.id, why,
                            self.lost_worker_retries)  # fmt: skip
                self._end(job, FAILED, error=LOST_WORKER_ERROR)
            else:
                log.warning("job %s lost with worker %s (%s): back in the queue", job.id, worker.id, why)
                self._requeue(job)
                self._counts["retried"] += 1
        log.info("worker %s is gone (%s)", worker.id, why)

    # --- control plane --------------------------------------------------------------------

    def _see_worker(self, worker_id: str) -> WorkerSeen:
        worker = self._workers.get(worker_id)
        if worker is None:
            worker = self._workers[worker_id] = WorkerSeen(worker_id, time.monotonic())
            log.info("worker %s connected", worker_id)
        worker.last_seen = time.monotonic()
        return worker

    async def _job_take(self, request: web.Request, worker: WorkerSeen) -> web.Response:
        self._note_jobs_in_progress(request, worker)
        jobs = await self._take(worker, 1)
        return web.json_response(jobs[0]) if jobs else web.Response(status=204)

    async def _job_take_batch(self, request: web.Request, worker: WorkerSeen) -> web.Response:
        try:
            count = max(1, min(64, int(request.query.get("batch_size", "1"))))
        except ValueError:
            return web.json_response({"error": "batch_size must be an integer"}, status=400)
        self._note_jobs_in_progress(request, worker)
        jobs = await self._take(worker, count)
        return web.json_response(jobs) if jobs else web.Response(status=204)

    def _note_jobs_in_progress(self, request: web.Request, worker: WorkerSeen) -> None:
        if request.query.get("job_in_progress") == "0":
            worker.forget_stops()

    async def _take(self, worker: WorkerSeen, count: int) -> list[dict]:
        """Hold the request until jobs are queued (or the hold time passes), then hand them out."""
        warming = self._ready_at.get(worker.id, 0.0) - time.monotonic()
        if warming > 0:  # a cold start: no job yet, however soon the process asks
            await asyncio.sleep(min(warming, self.poll_hold_s))
            return []
        self.polling_event(worker.id).set()
        self._expected_workers.discard(worker.id)
        if worker.leaving or self._closing:
            await asyncio.sleep(0.2)  # the SDK asks again at once after an empty answer
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll_hold_s
        while not (self._closing or worker.leaving):
            taken = self._pop_jobs(worker, count)
            if taken:
                return taken
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waiter = loop.create_future()
            self._take_waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                break
            finally:
                self._take_waiters.discard(waiter)
        return []

    def _pop_jobs(self, worker: WorkerSeen, count: int) -> list[dict]:
        taken = []
        while self._queue and len(taken) < count:
            job = self._jobs.get(self._queue.popleft())
            if job is None or job.status != IN_QUEUE:
                continue
            job.status, job.worker_id, job.started = IN_PROGRESS, worker.id, time.monotonic()
            job.timers.append(self._loop.call_later(job.execution_timeout_s, self._time_out, job, "executionTimeout"))
            worker.jobs.add(job.id)
            taken.append(job.for_worker())
            log.info("job %s taken by %s", job.id, worker.id)
        return taken

    async def _job_stop(self, request: web.Request, worker: WorkerSeen) -> web.Response:
        """The worker's stop channel: held open until a job of this worker must stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll_hold_s
        while not (self._closing or worker.leaving):
            now = time.monotonic()
            for job_id in [j for j, stop in worker.to_stop.items() if now - stop.raised > STOP_SIGNAL_LIFETIME_S]:
                del worker.to_stop[job_id]
            due = sorted(job_id for job_id, stop in worker.to_stop.items() if now - stop.sent >= STOP_RESEND_S)
            if due:
                for job_id in due:
                    worker.to_stop[job_id].sent = now
                return web.json_response({"jobsToStop": due})
            next_resend = min((stop.sent + STOP_RESEND_S - now for stop in worker.to_stop.values()), default=None)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            wait = remaining if next_resend is None else max(0.01, min(remaining, next_resend))
            worker.stop_signal.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.stop_signal.wait(), wait)
        return web.Response(status=204)

    async def _job_done(self, request: web.Request, worker: WorkerSeen) -> web.Response:
        job = self._jobs.get(request.match_info["job_id"])
        if job is None:
            return web.json_response(NOT_FOUND, status=404)
        body = await _read_worker_json(request)
        if body.get("status") == IN_PROGRESS:  # runpod.serverless.progress_update
            if job.status == IN_PROGRESS:
                job.progress = body.get("output")
            return web.json_response({})
        worker.to_stop.pop(job.id, None)
        if job.status != IN_PROGRESS or job.worker_id != worker.id:
            return web.json_response({})  # cancelled or timed out meanwhile: the result is dropped
        if len(await request.read()) > self.result_limit_bytes:
            log.warning("job %s: its result is over the %d-byte limit and is dropped", job.id, self.result_limit_bytes)
            self._end(job, COMPLETED)
            return web.json_response({"error": "result too large"}, status=400)
        error = body.get("error")
        if error is not None:
            message = error if isinstance(error, str) else json.dumps(error)
            self._end(job, FAILED, body.get("output"), "output" in body, message)
        else:
            self._end(job, COMPLETED, body.get("output"), "output" in body)
        log.info("job %s %s in %d ms", job.id, job.status, job.reply().get("executionTime", 0))
        return web.json_response({})

    async def _job_stream(self, request: web.Request, worker: WorkerSeen) -> web.Response:
        job = self._jobs.get(request.match_info["job_id"])
        if job is None:
            return web.json_response(NOT_FOUND, status=404)
        body = await _read_worker_json(request)
        if job.status == IN_PROGRESS and job.worker_id == worker.id and "output" in body:
            job.stream.append(body["output"])
        return web.json_response({})

    async def _ping(self, request: web.Request, worker: WorkerSeen) -> web.Response:
        if request.query.get("status") == "unhealthy":  # a failed fitness check, just before the worker exits
            worker.unhealthy = f"{request.query.get('check', '?')}: {request.query.get('reason', '')}"
            worker.leaving = True
            log.warning("worker %s is unhealthy (%s)", worker.id, worker.unhealthy)
            return web.json_response({})
        # The heartbeat lists the jobs the worker holds ("id1,id2"), or nothing.
        running = request.query.get("job_id", "")
        worker.forget_stops({job_id for job_id in running.split(",") if job_id})
        return web.json_response({})


class WorkerProcess:
    """`python handler.py` running the SDK's production loop against a RunpodEmulator.

    Output goes to `log_path` (a file) when given, else to this process's own stdout. The worker
    gets its own process group, so `stop` ends it and the SDK's heartbeat child together.
    """

    def __init__(
        self, emulator: RunpodEmulator, pod_id: str, env: dict[str, str], log_path: Path | None, command: list[str]
    ):
        self.emulator = emulator
        self.pod_id = pod_id
        self.log_path = log_path
        self._log_file = open(log_path, "ab") if log_path else None  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file else None,
            start_new_session=True,
            # If the process that started the worker dies without stopping it, the worker must die
            # too: with its control plane gone, the SDK's job loop would retry in a tight loop.
            preexec_fn=lifetime.die_with_parent,
        )

    def wait_until_polling(self, timeout: float = 300) -> None:
        """Block until the worker asks the emulator for a job (the model is loaded by then)."""
        event = self.emulator.polling_event(self.pod_id)
        deadline = time.monotonic() + timeout
        while not event.wait(0.25):
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not poll for jobs within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(worker output went to the terminal)"
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(line if len(line) < 400 else line[:400] + " ..." for line in text)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (the SDK's graceful shutdown), then SIGKILL of the group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(RuntimeError):
                self.emulator.release_worker(self.pod_id)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # the heartbeat child, should it outlive the worker
            os.killpg(self.process.pid, signal.SIGKILL)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- helpers --------------------------------------------------------------------------------


def _key_matches(request: web.Request, keys: list[str]) -> bool:
    header = request.headers.get("Authorization", "").strip()
    if header[:7].lower() == "bearer ":
        header = header[7:].strip()
    return bool(header) and any(hmac.compare_digest(header.encode(), key.encode()) for key in keys)


def _worker_keys(worker_key: str) -> list[str]:
    """The worker's key, plus the one the SDK sends instead when ~/.runpod/config.toml has one."""
    keys = [worker_key]
    credentials = Path.home() / ".runpod" / "config.toml"
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError, AttributeError):
        configured = tomllib.loads(credentials.read_text()).get("default", {}).get("api_key")
        if isinstance(configured, str) and configured:
            keys.append(configured)
    return keys


async def _read_json(request: web.Request, limit: int) -> Any:
    data = await request.read()
    if len(data) > limit:
        raise RequestError(413, f"the request body is {len(data)} bytes; the limit for this operation is {limit}.")
    try:
        return json.loads(data) if data else None
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON.") from None


async def _read_worker_json(request: web.Request) -> dict:
    # The SDK posts JSON text with a form content type, so read the raw body.
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise web.HTTPBadRequest(text="body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def _wait_seconds(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return RUNSYNC_DEFAULT_WAIT_MS / 1000
    low, high = RUNSYNC_WAIT_BOUNDS_MS
    try:
        wait_ms = int(raw)
    except ValueError:
        wait_ms = -1
    if not low <= wait_ms <= high:  # the service's own answer to an out-of-range wait
        raise RequestError(400, f"wait is invalid; must be between {low} and {high}")
    return wait_ms / 1000


def _policy_ms(policy: dict, name: str, default: int, low: int, high: int) -> int:
    value = policy.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(400, f"'policy.{name}' must be a number of milliseconds from {low} to {high}.")
    return int(value)


# --- `make serve` ----------------------------------------------------------------------------


def print_usage(api: RunpodEmulator) -> None:
    """The base URL, the key, and the variables docs/api.md's examples read."""
    print(
        f"""
RunPod API emulator with a live worker (the SDK's production loop)
  base URL: {api.base_url}
  API key:  {api.api_key}

  # the variables docs/api.md's curl and runpod SDK examples read:
  export RUNPOD_API_KEY={api.api_key} RUNPOD_ENDPOINT_ID={api.endpoint_id}
  export ENDPOINT={api.base_url} RUNPOD_ENDPOINT_BASE_URL={api.url}/v2

  # a synchronous job: waits up to 90 s (?wait=1000..300000 ms), then answers IN_PROGRESS with the id
  curl -s -X POST "$ENDPOINT/runsync" -H "Authorization: Bearer $RUNPOD_API_KEY" \\
       -H "Content-Type: application/json" -d '{{"input": {{"text": "Hello from VibeVoice."}}}}'

  # a queued job, then its status; a streamed job's items; cancel; health
  curl -s -X POST "$ENDPOINT/run" -H "Authorization: Bearer $RUNPOD_API_KEY" \\
       -H "Content-Type: application/json" -d '{{"input": {{"text": "Hi.", "stream": true}}}}'
  curl -s "$ENDPOINT/status/JOB_ID" -H "Authorization: Bearer $RUNPOD_API_KEY"
  curl -s "$ENDPOINT/stream/JOB_ID" -H "Authorization: Bearer $RUNPOD_API_KEY"
  curl -s -X POST "$ENDPOINT/cancel/JOB_ID" -H "Authorization: Bearer $RUNPOD_API_KEY"
  curl -s "$ENDPOINT/health" -H "Authorization: Bearer $RUNPOD_API_KEY"

Ctrl-C stops the emulator and the worker.
""",
        flush=True,
    )


def add_behaviour_arguments(parser: argparse.ArgumentParser) -> None:
    """`make serve` flags for RunpodBehaviour (RunPod's rough edges, all off by default)."""
    group = parser.add_argument_group("RunPod behaviours (off by default)")
    group.add_argument("--running-state", action="store_true", help="running jobs read RUNNING, not IN_PROGRESS")
    group.add_argument(
        "--stream-reply-bytes",
        type=int,
        metavar="N",
        help=f"split /stream backlogs into replies of N bytes (RunPod: {STREAM_REPLY_LIMIT_BYTES})",
    )
    group.add_argument(
        "--rate-limit",
        metavar="N/SECONDS",
        help="429 past N calls per SECONDS to each of /run, /runsync, /status, /stream, or 'documented' for "
        "RunPod's published limits",
    )
    group.add_argument(
        "--transient-every", type=int, default=0, metavar="N", help="every Nth /status and /stream call answers 503"
    )
    group.add_argument(
        "--lose-stream-every",
        type=int,
        default=0,
        metavar="N",
        help="every Nth /stream reply with items is lost after handing them out (the client gets 503)",
    )


def behaviour_from(args: argparse.Namespace) -> RunpodBehaviour:
    rate_limits = None
    if args.rate_limit == "documented":
        rate_limits = dict(RATE_LIMITS)
    elif args.rate_limit:
        count, _, seconds = args.rate_limit.partition("/")
        rate_limits = dict.fromkeys(RATE_LIMITS, (int(count), float(seconds or 1)))
    return RunpodBehaviour(
        running_state=args.running_state,
        stream_reply_bytes=args.stream_reply_bytes,
        rate_limits=rate_limits,
        transient_every=args.transient_every,
        lose_stream_every=args.lose_stream_every,
    )


def build_parser() -> argparse.ArgumentParser:
    """`make serve`'s command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=int(os.environ.get("SERVE_PORT", "8000")))
    parser.add_argument("--key", default=os.environ.get("SERVE_API_KEY"), help="the API key clients send")
    parser.add_argument("--endpoint-id", default="vibevoice-local")
    parser.add_argument("--home", type=Path, default=None, help="VIBEVOICE_HOME (default .local/vibevoice)")
    parser.add_argument("--no-worker", action="store_true", help="serve the API only; start workers yourself")
    parser.add_argument(
        "--cold-start", type=float, default=0.0, metavar="SECONDS",
        help="the worker takes no job for this long after it starts (a scale-from-zero cold start)",
    )  # fmt: skip
    add_behaviour_arguments(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    sys.path.insert(0, str(ROOT))
    from tools.local_home import DEFAULT_HOME, prepare

    api = RunpodEmulator(args.key, endpoint_id=args.endpoint_id, port=args.port, behaviour=behaviour_from(args))
    try:
        api.start()
    except RuntimeError as exc:
        raise SystemExit(f"{exc} (is port {args.port} in use? set SERVE_PORT)") from None
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = None
    try:
        if not args.no_worker:
            env = prepare(args.home or DEFAULT_HOME)
            model = env.get("MODEL_PATH") or os.environ.get("MODEL_PATH") or os.environ.get("MODEL_ID") or "MODEL_ID"
            print(f"starting the worker (`python handler.py`, model: {model}) ...", flush=True)
            worker = api.start_worker(env, pod_id="worker-local", cold_start_s=args.cold_start)
            if args.cold_start:  # jobs sent now wait IN_QUEUE until the worker is up, as after scale-to-zero
                print_usage(api)
                print(f"the worker is cold-starting: it takes jobs in {args.cold_start:.0f} s", flush=True)
            while not stop.is_set():
                try:
                    worker.wait_until_polling(timeout=1)
                    break
                except TimeoutError:
                    continue
        if not stop.is_set() and not args.cold_start:
            print_usage(api)
        while not stop.wait(1):
            if worker and worker.process.poll() is not None:
                print(f"the worker exited with code {worker.process.returncode}", flush=True)
                break
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
    finally:
        print("stopping ...", flush=True)
        if worker:
            worker.stop()
        api.stop()


if __name__ == "__main__":
    main()
