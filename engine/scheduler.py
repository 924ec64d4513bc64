"""The decode scheduler: one per process; every running job's chunks share one decode batch.

It owns the model's frame loop and runs it in one thread. Each job (a `VibeVoiceEngine.synthesize`
call, in its own thread) submits its chunks as sequences and reads what they produce from its own
queue. At every frame boundary the loop does, in this order:

    leave    rows of jobs that stopped (cancelled, shutdown deadline) or failed leave the batch
    admit    free slots go to waiting sequences (policy below); a sequence's prefill runs alone,
             in pieces (a voice segment, up to 512 prompt tokens): one piece per boundary while
             the batch decodes, all that fit back to back while it is empty; once prefilled it joins
    step     one frame for every row (`decoder.BatchDecoder.step`)
    deliver  each job's frames go into its queue; rows that ended (end token, frame cap) leave,
             and their slots are refilled at the next boundary, right away

Admission: at most `BatchBudget.cap()` rows (BATCH_SIZE; 0 = automatic: on CUDA what the memory
left holds, read here, in this thread, at admission; on the CPU CPU_AUTO_BATCH). A free slot goes
to the job with the fewest sequences in the batch; on a tie, to the one served longest ago (a job
never served first, then arrival order): round-robin, so a job waiting for its first slot always
goes before a running job's next chunk. Within a job, chunks go in order.

Isolation: a job's stop (cancellation, its shutdown deadline) and its failures (a voice that does
not encode, a non-finite row, its consumer raising) remove only its own rows. An out-of-memory error
in a frame leaves the batch as it was (the step is undone), lowers the cap by a quarter, and
moves rows out: first sequences whose audio nobody has heard (a whole job, or a streamed job's
sequence that has not produced a frame yet), which start again from scratch later, then the others,
which are parked with their state and rejoin later: a streamed chunk never mixes two trajectories.
Any other exception in a shared frame fails the jobs in that frame; the loop goes on with new jobs.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engine.batch import Batch, DecodeRequest, FrameOutput, HostFrame, NonFiniteStateError, Sequence
from engine.decoder import BatchDecoder
from engine.framestep import WARM_UP_BUCKETS, FrameStep

log = logging.getLogger("vibevoice.scheduler")

# Automatic batch cap (BATCH_SIZE=0). On CUDA: as many rows as AUTO_BATCH_MEMORY_SHARE of the memory
# left holds (KV cache, codec state, one prefill), at most MAX_AUTO_BATCH; on the CPU, CPU_AUTO_BATCH.
MAX_AUTO_BATCH = 64
CPU_AUTO_BATCH = 8
AUTO_BATCH_MEMORY_SHARE = 0.75
CODEC_STATE_BYTES = 16 * 2**20  # per row: codec conv state and one frame's codec activations (7B, bf16)


# --- what a job sees ---------------------------------------------------------------------------------


@dataclass
class Frames:
    """One frame's output for one job: new audio per chunk index, and the sequences that ended."""

    audio: list[tuple[int, HostFrame]] = field(default_factory=list)
    ended: list[Sequence] = field(default_factory=list)


@dataclass
class Restart:
    """Chunk `index` starts again from scratch (out of memory); drop what it produced so far."""

    index: int


@dataclass
class Failed:
    error: BaseException


DONE = object()  # the last event of every job


@dataclass(eq=False)
class Job:
    """The scheduler's record of one synthesize() call."""

    number: int  # arrival order
    streamed: bool  # its audio is handed out as it decodes (its heard sequences are never re-decoded)
    should_stop: Callable[[], bool] | None
    waiting: deque[Sequence]  # sequences not in the batch, in the order they go in
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    in_batch: int = 0  # its sequences in the batch or in prefill
    served: int = -1  # when it last got a slot (a tick of the scheduler's counter); -1: never
    stop_requested: bool = False  # set from the job's own thread (its consumer failed or left)
    stopping: bool = False
    failed: bool = False


# --- admission -----------------------------------------------------------------------------------------


class BatchBudget:
    """How many sequences decode together: BATCH_SIZE, or (0) what the memory left holds.

    On CUDA the memory left is read at admission, in the decode thread, as free + reserved -
    allocated (`mem_get_info` alone counts PyTorch's cached-but-free blocks as used). A batch of n
    sequences in the eager loop is estimated as its KV cache (2n rows of the widest sequence: prompt +
    expected frames, at `kv_bytes_per_token` per row and token), CODEC_STATE_BYTES per row, and one
    prefill. In the static step (COMPILE on) a batch holds the buffers of its shape: the bucket's rows
    (rounded up) at the capacity of its longest sequence's frame cap; a shape whose buffers are already
    held (the warm-up's, kept for CUDA graphs) costs nothing new."""

    def __init__(
        self,
        batch_size: int,
        device: torch.device,
        kv_bytes_per_token: int,
        prefill_bytes: int,
        decoder: BatchDecoder | None = None,
    ):
        self.batch_size = batch_size  # 0: automatic
        self.device = torch.device(device)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.prefill_bytes = prefill_bytes
        self.decoder = decoder  # whose static step (when it has one) decides what a batch holds
        self.oom_limit: int | None = None  # lowered by out-of-memory errors, for the rest of the process
        self.memory_left: Callable[[], int] = self._cuda_memory_left

    def cap(self) -> int:
        """The row cap before memory is considered. Automatic: on CUDA at most MAX_AUTO_BATCH, on the
        CPU CPU_AUTO_BATCH, and with the step compiled at most its largest compiled bucket (a larger
        batch would run uncompiled; before the warm-up, the largest it will compile)."""
        cap = MAX_AUTO_BATCH if self.device.type == "cuda" else CPU_AUTO_BATCH
        frame_step = self._frame_step()
        if frame_step is not None and frame_step.compiled:
            shapes = frame_step.compiled_shapes
            cap = min(cap, max(bucket for bucket, _, _ in shapes) if shapes else WARM_UP_BUCKETS[-1])
        cap = self.batch_size or cap
        return max(1, min(cap, self.oom_limit or cap))

    def estimate(self, requests: list[DecodeRequest]) -> int:
        """Bytes a batch of these sequences needs at its widest."""
        if not requests:
            return 0
        width = max(sequence_width(request) for request in requests)
        kv = 2 * len(requests) * width * self.kv_bytes_per_token
        return kv + len(requests) * CODEC_STATE_BYTES + self.prefill_bytes

    def static_estimate(self, sequences: list[Sequence], current: object | None = None) -> int:
        """Bytes a static-step batch of these sequences allocates anew: its shape's buffers (bucket rows,
        capacity for the longest frame cap, as `FrameStep.shape_for` rounds them) unless `current` (the
        batch's slots) or an idle set already holds them, CODEC_STATE_BYTES per bucket row, one prefill."""
        frame_step = self._frame_step()
        shape = frame_step.shape_for(len(sequences), sequences)
        held = current is not None and shape == (current.bucket, current.capacity, current.steps)
        slots = 0 if held or frame_step.held(shape) else frame_step.slot_bytes(*shape)
        return slots + shape[0] * CODEC_STATE_BYTES + self.prefill_bytes

    def admits(self, batch: Batch, candidate: Sequence) -> bool:
        """May `candidate` join the batch (start its prefill, or rejoin after being parked)?"""
        rows = len(batch)
        if rows >= self.cap():
            return False
        if rows == 0 or self.batch_size or self.device.type != "cuda":
            return True
        if self._frame_step() is not None:
            need = self.static_estimate([*batch.sequences, candidate], batch.static)
            return need <= AUTO_BATCH_MEMORY_SHARE * self.memory_left()
        requests = [s.request for s in (*batch.sequences, candidate)]
        available = self.memory_left() + batch.kv_bytes()  # the batch's current KV is part of the estimate
        return self.estimate(requests) <= AUTO_BATCH_MEMORY_SHARE * available

    def fits(self, request: DecodeRequest) -> int:
        """How many sequences like `request` would decode together now (the automatic concurrency)."""
        cap = self.cap()
        if self.batch_size or self.device.type != "cuda":
            return cap
        available = AUTO_BATCH_MEMORY_SHARE * self.memory_left()
        if self._frame_step() is not None:
            need = lambda n: self.static_estimate([Sequence(request)] * n)  # noqa: E731
        else:
            need = lambda n: self.estimate([request] * n)  # noqa: E731
        return max(1, next((n - 1 for n in range(1, cap + 1) if need(n) > available), cap))

    def _frame_step(self) -> FrameStep | None:
        return self.decoder.frame_step if self.decoder is not None else None

    def lower(self, rows: int) -> int:
        """After an out-of-memory error at `rows` rows: a quarter fewer (at least one), for good."""
        smaller = max(1, rows - max(1, rows // 4))
        if self.oom_limit is None or smaller < self.oom_limit:
            log.warning("out of GPU memory at batch size %d; retrying with %d from now on", rows, smaller)
        self.oom_limit = smaller
        return smaller

    def _cuda_memory_left(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


def sequence_width(request: DecodeRequest) -> int:
    """Cache columns a sequence fills at its end: its prompt, its frames, the negative start token."""
    frames = request.expected_frames if request.expected_frames is not None else request.max_frames
    return int(request.input_ids.numel()) + min(frames, request.max_frames) + 1


# --- the scheduler ------------------------------------------------------------------------------------


class DecodeScheduler:
    """One per process: merges every job's sequences into one batch and decodes it frame by frame."""

    def __init__(self, decoder: BatchDecoder, budget: BatchBudget):
        self.decoder = decoder
        self.budget = budget
        self.batch = Batch()
        self._jobs: list[Job] = []  # decode thread only
        self._incoming: list[Job] = []
        self._calls: list[Callable[[], None]] = []  # run in the decode thread at the next boundary
        self._prefilling: tuple[Sequence, Iterator[None]] | None = None
        self._numbers = itertools.count()
        self._ticks = itertools.count()
        self._wake = threading.Condition()
        self._active = 0  # jobs submitted and not done (guarded by _wake)
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- called from the jobs' threads -----------------------------------------------------------

    def submit(self, requests: list[DecodeRequest], streamed: bool, should_stop: Callable[[], bool] | None) -> Job:
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is shutting down")
            job = Job(next(self._numbers), streamed, should_stop, deque())
            job.waiting.extend(Sequence(request, owner=job) for request in requests)
            self._incoming.append(job)
            self._active += 1
            self._start_thread()
            self._wake.notify_all()
        return job

    def call(self, function: Callable[[], object], timeout: float | None = None) -> object:
        """Run `function` in the decode thread at the next frame boundary and return its result.

        For what must happen in the thread that decodes: CUDA graphs recorded by the compiled step
        belong to the thread that records them (PyTorch keeps them per thread)."""
        done, box = threading.Event(), {}

        def task() -> None:
            try:
                box["value"] = function()
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is shutting down")
            self._calls.append(task)
            self._start_thread()
            self._wake.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("the decode thread did not run the call in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _start_thread(self) -> None:  # with self._wake held
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def stop(self, job: Job) -> None:
        """The job's thread gives up on it: its rows leave at the next frame boundary."""
        job.stop_requested = True
        with self._wake:
            self._wake.notify_all()

    def close(self, timeout: float = 10) -> None:
        """Stop the loop after its current frame (jobs still in it fail); at interpreter exit."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_idle(self, timeout: float) -> bool:
        """True once no job is left in the scheduler (False after `timeout` seconds)."""
        with self._wake:
            return self._wake.wait_for(lambda: self._active == 0, timeout)

    # --- the decode thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                self._run_calls()
                try:
                    with self.decoder.lock:
                        self._leave()
                        self._admit()
                        if self.batch.sequences:
                            self._frame()
                except Exception as exc:  # a fault of the loop itself: fail every job it holds, go on clean
                    log.exception("decode loop failed; failing the jobs it held")
                    for job in self._jobs:
                        self._fail(job, exc)
                        job.in_batch = 0
                    self.batch, self._prefilling = Batch(), None
                    self._leave()

            for job in list(self._jobs):  # closed: nothing more will decode
                self._fail(job, RuntimeError("the engine is shutting down"))
                self._finish(job)

    def _wait_for_work(self) -> bool:
        """Block until some job is there; False once the scheduler is closed."""
        with self._wake:
            while not (self._jobs or self._incoming or self._calls or self._closed):
                self._wake.wait()
            self._jobs += self._incoming
            self._incoming.clear()
            return not self._closed

    def _run_calls(self) -> None:
        with self._wake:
            calls, self._calls = self._calls, []
        for task in calls:
            task()

    def _leave(self) -> None:
        """Rows of stopped or failed jobs leave; jobs with nothing left are done."""
        for job in self._jobs:
            if not (job.stopping or job.failed) and (job.stop_requested or self._asks_to_stop(job)):
                job.stopping = True
        leaving = [s for s in self.batch.sequences if s.owner.stopping or s.owner.failed]
        if leaving:
            for job in {s.owner for s in leaving if not s.owner.failed}:
                job.events.put(Frames(ended=[s for s in leaving if s.owner is job]))  # partial audio, as it is
            self._remove(leaving)
        if self._prefilling and (self._prefilling[0].owner.stopping or self._prefilling[0].owner.failed):
            self._drop_prefill()
        for job in list(self._jobs):
            if job.stopping or job.failed:
                job.waiting.clear()
            if job.in_batch == 0 and not job.waiting:
                self._finish(job)

    def _asks_to_stop(self, job: Job) -> bool:
        try:
            return bool(job.should_stop and job.should_stop())
        except Exception as exc:
            self._fail(job, exc)
            return False

    def _admit(self) -> None:
        """Prefill work between frames: one piece while the batch decodes (running sequences wait
        for at most one piece per frame); with an empty batch, everything that fits, back to back."""
        if self.batch.sequences:
            if self._prefilling or self._start_next():
                self._prefill_piece()
            return
        while self._prefilling or self._start_next():
            self._prefill_piece()

    def _start_next(self) -> bool:
        """Take the next waiting sequence (fair share across jobs); parked ones join at once."""
        while True:
            waiting = [job for job in self._jobs if job.waiting and not (job.stopping or job.failed)]
            job = min(waiting, key=lambda j: (j.in_batch, j.served, j.number), default=None)
            if job is None or not self.budget.admits(self.batch, job.waiting[0]):
                return False
            sequence = job.waiting.popleft()
            job.in_batch += 1
            job.served = next(self._ticks)
            if sequence.state is None:
                self._prefilling = (sequence, self.decoder.prefill(sequence))
                return True
            self._join(sequence)  # parked after an out-of-memory error, or its join ran out of memory

    def _join(self, sequence: Sequence) -> None:
        """A prefilled (or parked) sequence joins the batch. Out of memory there is handled as in a frame,
        for that sequence alone: the batch is unchanged (`join` is all or nothing), the cap drops below
        the rows it would have made, and the sequence waits with its state until rows leave; alone on
        the device and still out of memory, its job fails. The other rows never notice."""
        try:
            self.decoder.join(self.batch, [sequence])
            return
        except torch.cuda.OutOfMemoryError:
            pass  # handled outside the except block, so the failed allocation's tensors are freed
        job = sequence.owner
        job.in_batch -= 1
        if not self.batch.sequences:
            self._fail(job, torch.cuda.OutOfMemoryError("CUDA out of memory while a chunk joined the batch"))
        else:
            self.budget.lower(len(self.batch) + 1)
            job.waiting.appendleft(sequence)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _prefill_piece(self) -> None:
        sequence, pieces = self._prefilling
        try:
            next(pieces)
            return
        except StopIteration:
            self._prefilling = None
            self._join(sequence)
        except torch.cuda.OutOfMemoryError:
            self._drop_prefill(retry=True)
            if self.batch.sequences:
                self._shrink()
            else:  # alone on the device and still too big
                self._fail(sequence.owner, torch.cuda.OutOfMemoryError("CUDA out of memory while preparing a chunk"))
        except Exception as exc:  # its voice or prompt failed: only its job fails
            self._drop_prefill()
            self._fail(sequence.owner, exc)

    def _drop_prefill(self, retry: bool = False) -> None:
        sequence, pieces = self._prefilling
        self._prefilling = None
        pieces.close()
        sequence.owner.in_batch -= 1
        if retry:
            sequence.owner.waiting.appendleft(sequence.fresh())

    def _frame(self) -> None:
        try:
            outputs = self.decoder.step(self.batch)
        except torch.cuda.OutOfMemoryError:
            outputs = None  # handled outside the except block, so the failed frame's tensors are freed
        except Exception as exc:  # a fault in the shared step: its jobs cannot be told apart
            log.exception("a decode step failed; failing its %d job(s)", len({s.owner for s in self.batch.sequences}))
            for job in {s.owner for s in self.batch.sequences}:
                self._fail(job, exc)
            return
        if outputs is None:
            self._shrink()
            return
        self._deliver(outputs)

    def _deliver(self, outputs: list[FrameOutput]) -> None:
        """Hand each job its frames; rows that ended or failed leave now (their slots refill next)."""
        frames: dict[Job, Frames] = {}
        leaving = []
        for output in outputs:
            sequence, job = output.sequence, output.sequence.owner
            if output.failed:
                self._fail(job, NonFiniteStateError(f"chunk {sequence.request.index}: the decoder state is not finite"))
            if job.failed:
                continue
            item = frames.setdefault(job, Frames())
            if output.audio is not None:
                item.audio.append((sequence.request.index, output.audio))
                sequence.spoke = True
            if output.ended:
                item.ended.append(sequence)
                leaving.append(sequence)
        for job, item in frames.items():
            job.events.put(item)
        leaving += [s for s in self.batch.sequences if s.owner.failed]
        if leaving:
            self._remove(leaving)

    def _remove(self, sequences: list[Sequence]) -> None:
        """These sequences' rows leave the batch (each counted once, though it may be listed twice)."""
        gone = {id(s): s for s in sequences}
        self.decoder.drop(self.batch, [row for row, s in enumerate(self.batch.sequences) if id(s) not in gone])
        for sequence in gone.values():
            sequence.owner.in_batch -= 1

    def _shrink(self) -> None:
        """After an out-of-memory error: a lower cap, and rows moved out until the batch is under it."""
        rows = len(self.batch)
        if rows == 1:
            [sequence] = self.batch.sequences
            self._fail(sequence.owner, torch.cuda.OutOfMemoryError("CUDA out of memory decoding one chunk alone"))
            self._remove([sequence])
            return
        keep = self.budget.lower(rows)
        heard = lambda s: s.spoke and s.owner.streamed  # noqa: E731
        order = sorted(self.batch.sequences, key=lambda s: (heard(s), -s.owner.number, -s.request.index))
        out = order[: rows - keep]
        retry = [s for s in out if not heard(s)]
        for sequence in retry:
            sequence.owner.waiting.appendleft(sequence.fresh())
            sequence.owner.events.put(Restart(sequence.request.index))
        self._remove(retry)
        parked = [row for row, s in enumerate(self.batch.sequences) if heard(s) and s in out]
        for sequence in reversed(self.decoder.park(self.batch, parked)):
            sequence.owner.in_batch -= 1
            sequence.owner.waiting.appendleft(sequence)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.failed:
            return
        job.failed = True
        job.waiting.clear()
        job.events.put(Failed(error))

    def _finish(self, job: Job) -> None:
        self._jobs.remove(job)
        job.events.put(DONE)
        with self._wake:
            self._active -= 1
            self._wake.notify_all()
