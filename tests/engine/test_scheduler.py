"""The decode scheduler: jobs from several threads sharing one batch, on the tiny checkpoint (float32, CPU).

Mocked: nothing but what a CPU cannot do, and each test says so: CUDA out-of-memory errors (a
forward hook raises them) and CUDA's memory reading (a function returning a number). Every job's
audio is compared with its decode alone (1e-4): joining a batch, and when, must not change it.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
import torch

from engine.batch import DecodeRequest, NonFiniteStateError
from engine.decoder import BatchDecoder
from engine.scheduler import CODEC_STATE_BYTES, MAX_AUTO_BATCH, BatchBudget, sequence_width
from inference import GenerationParams, VibeVoiceEngine, kv_bytes_per_token
from jobs.voices import VoiceLibrary
from text.script import Chunk, Turn

TOLERANCE = 1e-4
STEPS = 2


@pytest.fixture(scope="module")
def voices(settings) -> dict[int, np.ndarray]:
    library = VoiceLibrary.for_settings(settings)
    alice, frank = library.load("Alice"), library.load("Frank")
    return {0: alice[:24000], 1: frank[:30000]}


def chunks_of(label: str, count: int) -> list[Chunk]:
    return [Chunk(i, (Turn(i % 2, f"{label}, part {i}: a few words to speak."),)) for i in range(count)]


def params(seed: int, frames: int) -> GenerationParams:
    return GenerationParams(1.3, STEPS, seed=seed, max_new_tokens=frames)


def solo(engine: VibeVoiceEngine, chunks: list[Chunk], voices, p: GenerationParams) -> list[np.ndarray]:
    """Each chunk decoded alone, outside the scheduler."""
    return [engine.decoder.decode(engine.requests([chunk], voices, p))[0].audio for chunk in chunks]


def assert_solo(results, expected: list[np.ndarray]) -> None:
    assert [r.audio.size for r in results] == [e.size for e in expected]
    for result, want in zip(results, expected, strict=True):
        assert float(np.max(np.abs(result.audio - want))) <= TOLERANCE


class JobThread(threading.Thread):
    """One synthesize() call in its own thread, as the handler runs jobs."""

    def __init__(self, engine, chunks, voices, p, **callbacks):
        super().__init__(daemon=True)
        self.engine, self.chunks, self.voices, self.p, self.callbacks = engine, chunks, voices, p, callbacks
        self.results, self.error = None, None
        self.progress = threading.Event()  # set at its first decoded frame

    def run(self) -> None:
        on_progress = self.callbacks.pop("on_progress", None)

        def progress(seconds: float, done: int) -> None:
            self.progress.set()
            if on_progress:
                on_progress(seconds, done)

        try:
            self.results = self.engine.synthesize(self.chunks, self.voices, self.p, on_progress=progress,
                                                  **self.callbacks)  # fmt: skip
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 120):
        self.join(timeout)
        assert not self.is_alive(), "the job did not finish"
        return self.results


@pytest.fixture()
def batch_sizes(engine):
    """Records the batch's rows at every frame of the scheduler (wraps the decoder's step; no
    behaviour changes; the solo decodes the tests compare with are not recorded)."""
    seen: list[int] = []
    step = engine.decoder.step

    def recording(batch):
        if threading.current_thread().name == "decode-scheduler":
            seen.append(len(batch))
        return step(batch)

    engine.decoder.step = recording
    yield seen
    del engine.decoder.step


@pytest.fixture()
def batch_size(engine):
    def set_size(size: int) -> None:
        engine.batch_size = size

    saved = engine.batch_size, engine.budget.oom_limit
    yield set_size
    engine.batch_size, engine.budget.oom_limit = saved


def test_a_job_alone_joining_mid_flight_and_with_three_others_equals_its_solo_decode(engine, voices,
                                                                                     batch_sizes) -> None:  # fmt: skip
    """Solo equivalence: the same job run alone, joining a batch that is already decoding, and
    started together with three others gives its solo audio every time."""
    job = (chunks_of("Solo", 2), params(77, 6))
    expected = solo(engine, job[0], voices, job[1])
    alone = engine.synthesize(*job[:1], voices, job[1])
    assert_solo(alone, expected)
    assert max(batch_sizes) == 2  # its own two chunks

    long = JobThread(engine, chunks_of("Long", 2), voices, params(5, 40))
    long.start()
    assert long.progress.wait(60)
    joined = engine.synthesize(*job[:1], voices, job[1])  # joins while the long job decodes
    assert_solo(joined, expected)
    long.finish()

    batch_sizes.clear()
    others = [JobThread(engine, chunks_of(f"Other {k}", 1), voices, params(100 + k, 5 + k)) for k in range(3)]
    mine = JobThread(engine, *job[:1], voices, job[1])
    for thread in [*others, mine]:
        thread.start()
    assert_solo(mine.finish(), expected)
    for k, thread in enumerate(others):
        assert_solo(thread.finish(), solo(engine, chunks_of(f"Other {k}", 1), voices, params(100 + k, 5 + k)))
    assert max(batch_sizes) >= 4  # they really shared the batch


def test_sequences_join_and_leave_at_arbitrary_frames(engine, voices, batch_sizes) -> None:
    """Jobs of different lengths start at different frames; rows leave as they end and new ones
    join the running batch; every chunk equals its solo decode."""
    jobs = [(chunks_of(f"Arbitrary {k}", 1 + k % 2), params(200 + k, 3 + 4 * k)) for k in range(4)]
    threads = []
    for k, (chunks, p) in enumerate(jobs):
        threads.append(JobThread(engine, chunks, voices, p))
        threads[-1].start()
        if k < 3:
            assert threads[-1].progress.wait(60)  # the next one joins while this one decodes
    for thread, (chunks, p) in zip(threads, jobs, strict=True):
        assert_solo(thread.finish(), solo(engine, chunks, voices, p))
    assert len(set(batch_sizes)) > 2  # the batch grew and shrank


def test_streamed_and_whole_jobs_share_a_batch(engine, voices, batch_sizes) -> None:
    streamed_pieces: list[tuple[int, np.ndarray]] = []
    streamed = JobThread(engine, chunks_of("Streamed", 2), voices, params(31, 6),
                         on_audio=lambda index, samples: streamed_pieces.append((index, samples)))  # fmt: skip
    whole = JobThread(engine, chunks_of("Whole", 2), voices, params(32, 5))
    streamed.start()
    whole.start()
    streamed_results, whole_results = streamed.finish(), whole.finish()
    assert 4 in batch_sizes
    assert_solo(streamed_results, solo(engine, chunks_of("Streamed", 2), voices, params(31, 6)))
    assert_solo(whole_results, solo(engine, chunks_of("Whole", 2), voices, params(32, 5)))
    assert [index for index, _ in streamed_pieces] == [0] * 6 + [1] * 6  # frame by frame, in chunk order
    joined = np.concatenate([samples for _, samples in streamed_pieces])
    assert np.array_equal(joined, np.concatenate([r.audio for r in streamed_results]))


def test_cancelling_one_of_three_jobs_leaves_the_others_unchanged(engine, voices) -> None:
    stop = threading.Event()
    jobs = [(chunks_of(f"Three {k}", 1), params(300 + k, 30)) for k in range(3)]
    threads = [JobThread(engine, *jobs[0][:1], voices, jobs[0][1]),
               JobThread(engine, *jobs[1][:1], voices, jobs[1][1], should_stop=stop.is_set),
               JobThread(engine, *jobs[2][:1], voices, jobs[2][1])]  # fmt: skip
    for thread in threads:
        thread.start()
    assert threads[1].progress.wait(60)
    stop.set()  # cancelled: the middle job's rows leave at the next frame boundary
    cancelled = threads[1].finish()
    assert len(cancelled) == 1 and cancelled[0].frames < 30  # cut short, as it was
    for k in (0, 2):
        assert_solo(threads[k].finish(), solo(engine, *jobs[k][:1], voices, jobs[k][1]))
    assert engine.wait_idle(30)


@pytest.mark.fault
def test_a_failing_job_among_healthy_ones_fails_alone(engine, voices) -> None:
    """Three failures that belong to one job: its consumer raises (a delivery that fails), its voice
    does not encode (a forward hook raises for that voice's length: a stand-in for a broken clip on
    a GPU), and its prompt's state is not finite (a hook writes NaN). The healthy jobs' audio is
    their solo audio."""
    odd_voice = {0: voices[0][:17000]}  # a length no other job uses
    nan_chunks = [Chunk(0, (Turn(0, "Not a number, this one."),))]
    nan_params = GenerationParams(1.3, STEPS, seed=412, max_new_tokens=8, use_voice_prompt=False)
    nan_length = engine.requests(nan_chunks, {}, nan_params)[0].input_ids.numel()  # no other prompt is this short

    def broken_consumer(index: int, samples: np.ndarray) -> None:
        raise OSError("the client went away")

    def failing_encoder(module, args, output):
        if args[0].shape[-1] == 6 * 3200:
            raise RuntimeError("voice could not be encoded")

    def nan_prompt(module, args, kwargs, output):
        if kwargs["inputs_embeds"].shape[:2] == (1, nan_length):
            output.last_hidden_state.fill_(float("nan"))
        return output

    handles = [engine.model.model.audio_tower.encoder.register_forward_hook(failing_encoder),
               engine.model.model.language_model.register_forward_hook(nan_prompt, with_kwargs=True)]  # fmt: skip
    engine.decoder.voice_cache.clear()
    try:
        healthy = [JobThread(engine, chunks_of(f"Healthy {k}", 2), voices, params(400 + k, 8)) for k in range(2)]
        bad_consumer = JobThread(engine, chunks_of("Consumer", 2), voices, params(410, 8), on_audio=broken_consumer)
        bad_voice = JobThread(engine, [Chunk(0, (Turn(0, "Odd voice."),))], odd_voice, params(411, 8))
        bad_state = JobThread(engine, nan_chunks, {}, nan_params)
        for thread in [healthy[0], bad_consumer, bad_voice, bad_state, healthy[1]]:
            thread.start()
        for thread in [bad_consumer, bad_voice, bad_state]:
            thread.finish()
    finally:
        for handle in handles:
            handle.remove()
    assert isinstance(bad_consumer.error, OSError)
    assert isinstance(bad_voice.error, RuntimeError) and "voice could not be encoded" in str(bad_voice.error)
    assert isinstance(bad_state.error, NonFiniteStateError)
    for k, thread in enumerate(healthy):
        assert_solo(thread.finish(), solo(engine, chunks_of(f"Healthy {k}", 2), voices, params(400 + k, 8)))
    assert engine.wait_idle(30)
    assert engine.synthesize(chunks_of("After", 1), voices, params(1, 2))[0].frames == 2  # still serving


@pytest.mark.fault
def test_sigterm_with_several_jobs_running(make_worker, voices) -> None:
    """SIGTERM (Shutdown.begin, what the worker's signal handler calls) while three jobs decode
    together: the short one finishes and is delivered, the two that cannot finish in time are
    stopped at their deadline and fail with the shutdown sentence; nothing else is touched."""
    short_started = threading.Event()
    worker = make_worker(progress=lambda job, message: job["id"] == "short" and short_started.set(),
                         shutdown_timeout=3.0, max_concurrency=3)  # fmt: skip
    short = {"text": "Short.", "max_new_tokens": 4, "diffusion_steps": 1, "output_format": "pcm_16"}
    endless = {"text": "Endless. " * 40, "max_new_tokens": 2000, "diffusion_steps": 1, "output_format": "pcm_16"}

    async def run_all():
        async def one(job_id, job_input):
            return [item async for item in worker.handle({"id": job_id, "input": job_input})]

        tasks = [asyncio.create_task(one(job_id, body)) for job_id, body in
                 [("endless-1", endless), ("short", short), ("endless-2", endless)]]  # fmt: skip
        await asyncio.wait_for(asyncio.to_thread(short_started.wait), timeout=60)
        worker.shutdown.begin()  # the short job has three frames left, the others hundreds
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

    first, second, third = asyncio.run(run_all())
    assert second[0]["status"] == "completed" and second[0]["duration_sec"] == pytest.approx(4 * 3200 / 24000, abs=1e-3)
    for items in (first, third):
        assert items == [{"error": "the worker was shut down before the job finished, so no audio was delivered; "
                                   "submit the job again."}]  # fmt: skip
    assert worker.engine.wait_idle(30)


def test_admission_waits_at_the_cap(engine, voices, batch_size, batch_sizes) -> None:
    """BATCH_SIZE=2 with three jobs of two chunks: never more than two rows; the rest wait and
    join as rows leave, and every chunk still equals its solo decode."""
    batch_size(2)
    jobs = [(chunks_of(f"Capped {k}", 2), params(500 + k, 3 + k)) for k in range(3)]
    threads = [JobThread(engine, chunks, voices, p) for chunks, p in jobs]
    for thread in threads:
        thread.start()
    for thread, (chunks, p) in zip(threads, jobs, strict=True):
        assert_solo(thread.finish(), solo(engine, chunks, voices, p))
    assert max(batch_sizes) == 2 and batch_sizes.count(2) > len(batch_sizes) // 2


def test_a_later_short_job_is_not_starved_by_an_earlier_long_one(engine, voices, batch_size) -> None:
    """Fairness: with two slots taken by a long job of six chunks, a short job that arrives gets
    the next free slot before the long job's third chunk, and finishes long before it."""
    batch_size(2)
    joins: list[str] = []
    join = engine.decoder.join

    def recording(batch, sequences):
        joins.extend(s.owner.number for s in sequences)
        return join(batch, sequences)

    engine.decoder.join = recording
    finished: list[str] = []
    try:
        long = JobThread(engine, chunks_of("Long job", 6), voices, params(600, 12),
                         on_chunk=lambda result, total: finished.append(f"long {result.index}"))  # fmt: skip
        long.start()
        assert long.progress.wait(60)
        short = JobThread(engine, chunks_of("Short job", 1), voices, params(601, 3),
                          on_chunk=lambda result, total: finished.append("short"))  # fmt: skip
        short.start()
        short.finish()
        long.finish()
    finally:
        del engine.decoder.join
    long_number, short_number = joins[0], next(n for n in joins if n != joins[0])
    assert joins[:3] == [long_number, long_number, short_number]  # its first slot before the long job's third
    assert finished.index("short") < finished.index("long 2")


class OutOfMemoryAbove:
    """A CUDA out-of-memory error cannot happen on this CPU: a forward pre-hook on the language model
    raises it (the only stand-in) when it runs more than `sequences` sequences at once, from the
    `after`-th such pass on."""

    def __init__(self, engine, sequences: int, after: int = 1):
        self.rows, self.after, self.passes, self.raised = 2 * sequences, after, 0, 0
        self.handle = engine.model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[0] > self.rows:
            self.passes += 1
            if self.passes >= self.after:
                self.raised += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture()
def calls_of(engine):
    """Counts calls of decoder methods by the scheduler's thread, by the job they were for."""
    counts: dict[tuple[str, int], int] = {}

    def owners(name: str, args: tuple) -> set[int]:
        if name == "prefill":  # prefill(sequence)
            return {args[0].owner.number}
        batch, rows = args  # park(batch, rows)
        return {batch.sequences[row].owner.number for row in rows}

    def count(name: str) -> None:
        original = getattr(engine.decoder, name)

        def counted(*args):
            if threading.current_thread().name == "decode-scheduler":
                for owner in owners(name, args):
                    counts[name, owner] = counts.get((name, owner), 0) + 1
            return original(*args)

        setattr(engine.decoder, name, counted)

    yield count, counts
    for name in ("prefill", "park"):
        engine.decoder.__dict__.pop(name, None)


@pytest.mark.fault
def test_out_of_memory_restarts_what_nobody_has_heard(engine, voices, batch_size, calls_of, caplog) -> None:
    """At three rows the frame fails with out-of-memory: the step is undone, the cap drops to two,
    and the row nobody has heard (the whole job's chunk that just joined) starts again from
    scratch later. Every job completes with its solo audio; nothing streamed twice."""
    jobs = [(chunks_of(f"Memory {k}", 2 - k), params(700 + k, 6)) for k in range(2)]
    expected = [solo(engine, chunks, voices, p) for chunks, p in jobs]
    count, counts = calls_of
    count("prefill")
    batch_size(4)
    pieces: list[tuple[int, np.ndarray]] = []
    with OutOfMemoryAbove(engine, sequences=2) as fault, caplog.at_level(logging.WARNING, logger="vibevoice.scheduler"):
        streamed = JobThread(engine, *jobs[0][:1], voices, jobs[0][1], on_audio=lambda i, s: pieces.append((i, s)))
        streamed.start()
        assert streamed.progress.wait(60)
        whole = JobThread(engine, *jobs[1][:1], voices, jobs[1][1])
        whole.start()
        streamed_results, whole_results = streamed.finish(), whole.finish()
    assert fault.raised == 1 and engine.budget.oom_limit == 2
    warnings = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert warnings == ["out of GPU memory at batch size 3; retrying with 2 from now on"]
    whole_number = max(number for _, number in counts)
    assert counts["prefill", whole_number] == 2  # decoded again from the start
    assert_solo(streamed_results, expected[0])
    assert_solo(whole_results, expected[1])
    assert np.array_equal(np.concatenate([s for _, s in pieces]), np.concatenate([r.audio for r in streamed_results]))


@pytest.mark.fault
def test_out_of_memory_parks_a_streamed_sequence_that_has_spoken(engine, voices, batch_size, calls_of) -> None:
    """Three streamed rows that have all spoken when memory runs out: one is parked (out of the
    batch with its state) and goes on from where it was once a slot frees; it is never decoded
    again, so its streamed audio is one trajectory, equal to its solo decode."""
    jobs = [(chunks_of(f"Parked {k}", 2 - k), params(800 + k, 8)) for k in range(2)]
    expected = [solo(engine, chunks, voices, p) for chunks, p in jobs]
    count, counts = calls_of
    count("prefill")
    count("park")
    batch_size(4)
    pieces: dict[int, list[np.ndarray]] = {0: [], 1: []}
    with OutOfMemoryAbove(engine, sequences=2, after=3) as fault:  # three 3-row frames pass: every row spoke
        threads = [JobThread(engine, chunks, voices, p, on_audio=lambda i, s, k=k: pieces[k].append(s))
                   for k, (chunks, p) in enumerate(jobs)]  # fmt: skip
        threads[0].start()
        assert threads[0].progress.wait(60)
        threads[1].start()
        results = [thread.finish() for thread in threads]
    assert fault.raised == 1
    second = max(number for _, number in counts)
    assert counts["park", second] == 1 and counts["prefill", second] == 1  # parked, never prefilled again
    for k in range(2):
        assert_solo(results[k], expected[k])
        assert np.array_equal(np.concatenate(pieces[k]), np.concatenate([r.audio for r in results[k]]))


def test_stop_ends_a_job_between_frames(engine, voices) -> None:
    calls = {"n": 0}

    def stop_at_third_check() -> bool:  # checked once per frame boundary
        calls["n"] += 1
        return calls["n"] >= 3

    results = engine.synthesize(chunks_of("Stopped", 3), voices, params(1, 20), should_stop=stop_at_third_check)
    assert [r.frames for r in results] == [2, 2, 2]  # all three joined the empty batch at once


def test_voices_are_encoded_once_per_job_and_kept_for_the_next(engine, voices) -> None:
    """Four chunks alternating two voices: two encodes; a second job with the same voices: none."""
    engine.decoder.voice_cache.clear()
    calls = {"n": 0}
    handle = engine.model.model.audio_tower.encoder.register_forward_hook(
        lambda *args: calls.__setitem__("n", calls["n"] + 1)
    )
    try:
        engine.synthesize(chunks_of("Voices", 4), voices, params(2, 2))
        first = calls["n"]
        engine.synthesize(chunks_of("Voices again", 3), voices, params(3, 2))
    finally:
        handle.remove()
    assert first == 2 and calls["n"] == 2


def test_memory_estimate_matches_the_measured_cache(engine, voices, batch_size) -> None:
    """The budget's estimate of a batch against the KV cache the CPU really holds at its widest:
    never under it, and within a fifth over it (the cap, not a guess, sets the frames here)."""
    batch_size(3)
    widest = {"bytes": 0}
    step = engine.decoder.step

    def measuring(batch):
        widest["bytes"] = max(widest["bytes"], batch.kv_bytes())
        return step(batch)

    engine.decoder.step = measuring
    p = params(9, 12)
    chunks = chunks_of("Measured", 3)
    try:
        engine.synthesize(chunks, voices, p)
    finally:
        del engine.decoder.step
    requests = [
        DecodeRequest(**{**r.__dict__, "expected_frames": r.max_frames}) for r in engine.requests(chunks, voices, p)
    ]
    estimate = engine.budget.estimate(requests) - 3 * CODEC_STATE_BYTES - engine.budget.prefill_bytes
    assert widest["bytes"] <= estimate <= 1.2 * widest["bytes"]


def test_automatic_batch_follows_the_memory_left() -> None:
    """The CUDA budget with the 7B's numbers; CUDA's memory reading is a stand-in (no GPU here)."""
    per_token = 57_344  # 28 layers x 4 KV heads x 128 x K,V x 2 bytes
    budget = BatchBudget(0, torch.device("cuda"), per_token, prefill_bytes=400 * 2**20)
    request = DecodeRequest(0, torch.zeros(450, dtype=torch.long), max_frames=600, seed=0, expected_frames=200)
    assert sequence_width(request) == 651
    per_sequence = 2 * 651 * per_token + CODEC_STATE_BYTES  # ~91 MB
    budget.memory_left = lambda: 60 * 2**30  # an 80 GB card with the 7B loaded
    assert budget.fits(request) == MAX_AUTO_BATCH > 16
    budget.memory_left = lambda: 2 * 2**30
    expected = int((0.75 * 2 * 2**30 - budget.prefill_bytes) // per_sequence)
    assert budget.fits(request) == expected == 13

    class Rows:  # a batch of n rows holding no KV yet
        def __init__(self, n: int):
            self.sequences = [type("S", (), {"request": request})()] * n

        def __len__(self) -> int:
            return len(self.sequences)

        def kv_bytes(self) -> int:
            return 0

    candidate = type("S", (), {"request": request})()
    assert budget.admits(Rows(0), candidate)  # an empty batch always takes one
    assert budget.admits(Rows(expected - 1), candidate) and not budget.admits(Rows(expected), candidate)
    budget.batch_size = 3  # BATCH_SIZE wins over memory
    assert budget.admits(Rows(2), candidate) and not budget.admits(Rows(3), candidate)


def test_concurrency_default_and_the_threads_for_it(engine, make_worker) -> None:
    """MAX_CONCURRENCY=0 resolves to the engine's default (the CPU: 2, a second job joins the
    running one); the event loop gets threads for that many jobs generating at once."""
    from handler import size_thread_pool

    assert engine.default_concurrency() == 2
    assert make_worker().concurrency == 2 and make_worker(max_concurrency=24).concurrency == 24

    async def pool_size() -> int:
        size_thread_pool(24)
        size_thread_pool(3)  # never shrinks
        return asyncio.get_running_loop()._default_executor._max_workers

    assert asyncio.run(pool_size()) == 2 * 24 + 4


@pytest.fixture()
def failing_join(engine):
    """Makes the decoder's join raise CUDA's out-of-memory error (a stand-in: no GPU here) for the
    sequences of the jobs listed in `owners`, `times` times, in the scheduler's thread; the batch is
    unchanged when it raises, as the real join leaves it."""
    state = {"owners": set(), "times": 1, "raised": 0}
    join = engine.decoder.join

    def joining(batch, sequences):
        ours = threading.current_thread().name == "decode-scheduler"
        if ours and state["raised"] < state["times"] and any(s.owner in state["owners"] for s in sequences):
            state["raised"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return join(batch, sequences)

    engine.decoder.join = joining
    yield state
    del engine.decoder.join


@pytest.mark.fault
def test_out_of_memory_in_a_join_makes_only_the_joining_sequence_wait(
    engine, voices, batch_size, calls_of, failing_join, caplog
) -> None:
    """A chunk prefilled next to a running one runs out of memory as it joins: the running chunk goes
    on untouched, the cap drops below two rows, and the chunk joins with its prefill kept (not prefilled
    again) once the running one has left. Both equal their solo decodes."""
    jobs = [(chunks_of("Running", 1), params(901, 10)), (chunks_of("Joining", 1), params(902, 4))]
    expected = [solo(engine, chunks, voices, p) for chunks, p in jobs]
    count, counts = calls_of
    count("prefill")
    batch_size(4)
    running = JobThread(engine, jobs[0][0], voices, jobs[0][1])
    with caplog.at_level(logging.WARNING, logger="vibevoice.scheduler"):
        running.start()
        assert running.progress.wait(60)
        joining = JobThread(engine, jobs[1][0], voices, jobs[1][1])
        failing_join["owners"] = _AnyJob()  # the next join, which is the joining job's
        joining.start()
        results = [running.finish(), joining.finish()]
    assert failing_join["raised"] == 1 and engine.budget.oom_limit == 1
    assert "out of GPU memory at batch size 2; retrying with 1 from now on" in caplog.text
    assert sorted(counts.values()) == [1, 1]  # nobody was prefilled twice
    for result, want in zip(results, expected, strict=True):
        assert_solo(result, want)


@pytest.mark.fault
def test_out_of_memory_in_a_join_alone_fails_that_job_only(engine, voices, failing_join) -> None:
    job = JobThread(engine, chunks_of("Alone", 1), voices, params(903, 3))
    failing_join["owners"] = _AnyJob()
    job.start()
    job.join(60)
    assert isinstance(job.error, torch.cuda.OutOfMemoryError) and "while a chunk joined the batch" in str(job.error)
    after = engine.synthesize(chunks_of("After", 1), voices, params(904, 3))  # the worker goes on
    assert after[0].frames == 3


class _AnyJob:
    def __contains__(self, owner) -> bool:
        return True


def test_the_static_budget_counts_buckets_and_capacity(engine, voices) -> None:
    """With the static step (COMPILE on) a batch holds its shape's buffers: the bucket's rows rounded up
    and the capacity of the longest frame cap, counted as the allocation really is; a shape whose buffers
    are held costs nothing new. CUDA's memory reading is a stand-in (no GPU here); the compiled shapes
    are set as the warm-up sets them (compiling costs minutes here)."""
    from engine.batch import Sequence
    from engine.framestep import FrameStep, capacity_for

    decoder = BatchDecoder(engine.model, diffusion_steps=STEPS)
    decoder.frame_step = FrameStep(decoder, compile_frame=False)
    frame_step = decoder.frame_step
    kv = kv_bytes_per_token(engine.model)
    budget = BatchBudget(0, torch.device("cuda"), kv, prefill_bytes=2**20, decoder=decoder)
    requests = engine.requests(chunks_of("Budget", 3), voices, params(905, 40))
    sequences = [Sequence(r) for r in requests]
    capacity = capacity_for(max(r.input_ids.numel() + r.max_frames + 1 for r in requests), decoder.device)
    assert frame_step.shape_for(3, sequences) == (4, capacity, STEPS)  # 3 rows: bucket 4
    allocated = frame_step.allocate(4, capacity, STEPS)
    slot_bytes = allocated.tensors.nbytes()
    assert frame_step.slot_bytes(4, capacity, STEPS) == slot_bytes > 4 * 2 * capacity * kv_bytes_per_token(engine.model)
    need = slot_bytes + 4 * CODEC_STATE_BYTES + budget.prefill_bytes
    assert budget.static_estimate(sequences) == need

    class Rows:  # a batch of two rows in no slots yet
        static = None

        def __init__(self, members):
            self.sequences = members

        def __len__(self) -> int:
            return len(self.sequences)

    budget.memory_left = lambda: need / 0.75
    assert budget.admits(Rows(sequences[:2]), sequences[2])
    budget.memory_left = lambda: need / 0.75 - 1
    assert not budget.admits(Rows(sequences[:2]), sequences[2])
    frame_step.compiled = True  # as after the warm-up, whose buffers stay held
    frame_step.compiled_shapes = {(1, capacity, STEPS), (2, capacity, STEPS), (4, capacity, STEPS)}
    frame_step.release(allocated)
    assert budget.static_estimate(sequences) == 4 * CODEC_STATE_BYTES + budget.prefill_bytes
    assert budget.admits(Rows(sequences[:2]), sequences[2])
    assert budget.cap() == 4  # the automatic cap: the largest compiled bucket
    budget.batch_size = 6
    assert budget.cap() == 6  # BATCH_SIZE wins (the start-up log says larger batches run uncompiled)
    frame_step.compiled_shapes = set()
    budget.batch_size = 0
    assert budget.cap() == 16  # before the warm-up: the largest bucket it will compile
