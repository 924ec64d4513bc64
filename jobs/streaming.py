"""A streamed job's generation: the engine in a worker thread, encoded pieces handed to the event loop.

The engine decodes in a thread; its audio passes through the job's `StreamRenderer` there, and
the encoded pieces wait in a bounded queue until the handler yields them. When the handler falls
behind, generation waits; when it stops listening (the job is cancelled, or the consumer left),
`stop` is set and the engine ends at its next frame, releasing itself for the next job.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from inference import ChunkAudio, VibeVoiceEngine
from jobs.planning import JobPlan
from jobs.rendering import StreamRenderer
from jobs.timeline import JobTimestamps
from runtime.lifecycle import STOPPED_BY_SHUTDOWN, Shutdown, ShutdownError

# Encoded audio items waiting between the generation thread and the handler; when the consumer
# falls behind, generation waits (at most this many items are held).
STREAM_QUEUE_ITEMS = 8


class StreamedGeneration:
    """Usage: `start()`, then `await next_piece()` until it returns None, then `await finished()`.

    Set `stop` (in a `finally`) when leaving early. An error in the generation thread is raised
    by `next_piece`.
    """

    def __init__(
        self,
        engine: VibeVoiceEngine,
        plan: JobPlan,
        renderer: StreamRenderer,
        shutdown: Shutdown,
        stamps: JobTimestamps | None = None,
    ):
        self.engine = engine
        self.plan = plan
        self.renderer = renderer
        self.shutdown = shutdown
        self.stamps = stamps or JobTimestamps.for_plan(None, plan)
        self._chunks = {chunk.index: chunk for chunk in plan.chunks}
        self.stop = threading.Event()
        self.seconds = 0.0  # wall time of the generation, once finished
        self._queue: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(STREAM_QUEUE_ITEMS)  # one slot per waiting item
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Future | None = None
        self._results: list[ChunkAudio] = []
        self._finished_chunks = 0
        self._started = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = time.perf_counter()
        self._worker = self._loop.run_in_executor(None, self._generate)

    async def next_piece(self) -> tuple[bytes, list[dict]] | None:
        """The next encoded piece with the words of the chunks aligned since the piece before
        (`"timestamps": "word"`; else none), or None once generation is done."""
        kind, value, *words = await self._queue.get()
        self._room.release()
        if kind == "error":
            raise value
        if kind == "done":
            self._results = value
            return None
        return value, words[0]

    async def finished(self) -> list[ChunkAudio]:
        """Waits for the generation thread; the engine's results."""
        assert self._worker is not None
        await self._worker
        self.seconds = time.perf_counter() - self._started
        return self._results

    # --- in the generation thread -------------------------------------------------------------

    def _generate(self) -> None:
        try:
            results = self.engine.synthesize(
                self.plan.chunks,
                self.plan.voices,
                self.plan.params,
                on_chunk=self._on_chunk,
                should_stop=lambda: self.stop.is_set() or self.shutdown.expired(),
                on_audio=self._on_audio,
            )
            if self.shutdown.expired():
                raise ShutdownError(STOPPED_BY_SHUTDOWN)
            if not self.stop.is_set():
                tail = self.renderer.finish()
                if tail:
                    self._send([tail])
            self._put(("done", results))
        except BaseException as exc:  # handed to the handler, which turns it into the job's error
            self._put(("error", exc))

    def _on_audio(self, index: int, samples: np.ndarray) -> None:
        self._send(self.renderer.audio(samples))

    def _on_chunk(self, result: ChunkAudio, total: int) -> None:
        self._finished_chunks += 1
        self.stamps.chunk_done(result)  # to the aligner, while the next chunk decodes
        last = self._finished_chunks == total
        self._send(self.renderer.chunk_done(self._chunks[result.index], result.audio.size, last))

    def _send(self, pieces: list[bytes]) -> None:
        """Encoded pieces to the handler; the words of chunks aligned by now go with the next one."""
        for piece in pieces:
            self._put(("audio", piece, self.stamps.ready_words(self.renderer.layout, self.renderer.section_scale)))

    def _put(self, message: tuple) -> None:
        """Wait for room in the queue, unless the job has stopped."""
        while not self._room.acquire(timeout=0.2):
            if self.stop.is_set():
                return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            return
