"""The static frame step (engine/framestep.py) against the eager loop (engine/decoder.py), tiny checkpoint, float32.

Mocked: nothing. The eager loop is the reference (tests/engine/test_decoder.py holds it equal to stock
`generate`): the static step, run as is and compiled with torch.compile, must give every
sequence the same tokens and the same audio within 1e-4, alone, next to others, joining
mid-flight, parked and leaving. It must read the host once per frame, and rows joining or leaving
must not recompile it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_decoder import STEPS, TOLERANCE, decode_by_hand, max_difference, request

from engine import framestep
from engine.batch import Batch
from engine.decoder import BatchDecoder
from engine.framestep import FrameStep, capacity_for, solver_coefficients
from text.script import Chunk, Turn

# One xdist worker runs this module (its fixtures compile the static step).
pytestmark = pytest.mark.xdist_group("framestep")


@pytest.fixture(scope="module")
def voices(settings) -> dict[int, np.ndarray]:
    from jobs.voices import VoiceLibrary

    library = VoiceLibrary.for_settings(settings)
    alice, frank = library.load("Alice"), library.load("Frank")
    return {0: alice[:24000], 1: frank[:30000], 2: alice[24000:40000]}


@pytest.fixture(scope="module")
def chunks():
    return [
        Chunk(0, (Turn(0, "The first chunk of a longer text, read by one voice."),)),
        Chunk(1, (Turn(1, "Second."), Turn(0, "Two speakers share this one."))),
        Chunk(2, (Turn(2, "A short third."),)),
    ]


def static_decoder(engine, compile_frame: bool = False) -> BatchDecoder:
    """A decoder over the session's model whose join/step/drop/park run the static step, with the
    tests' diffusion steps as the deployment's (a smaller graph to compile than the default 10)."""
    decoder = BatchDecoder(engine.model, diffusion_steps=STEPS)
    decoder.frame_step = FrameStep(decoder, compile_frame=compile_frame)
    return decoder


def with_decoder(engine, decoder):
    """The session's engine with another decoder, for helpers that take an engine (decode_by_hand)."""
    swapped = object.__new__(type(engine))
    swapped.__dict__.update(engine.__dict__)
    swapped.decoder = decoder
    return swapped


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_solver_coefficients_reproduce_the_scheduler(engine, steps) -> None:
    """The five numbers per step give diffusers' own DPM-Solver++ trajectory for any inputs."""
    scheduler = engine.decoder.noise_scheduler
    table = solver_coefficients(scheduler, steps)
    scheduler.set_timesteps(num_inference_steps=steps)
    generator = torch.Generator().manual_seed(steps)
    latent = torch.randn(4, 8, generator=generator)
    mine, previous = latent.clone(), torch.zeros_like(latent)
    for step, timestep in enumerate(scheduler.timesteps):
        eps = torch.randn(4, 8, generator=generator)
        latent = scheduler.step(eps, timestep, latent).prev_sample
        a, b, u, p, q = table[step].tolist()
        mine, previous = a * mine + b * eps + u * previous, p * mine + q * eps
    assert torch.allclose(mine, latent, atol=1e-5)


def test_one_chunk_and_a_batch_equal_the_eager_loop(engine, voices, chunks) -> None:
    static = static_decoder(engine)
    caps = {0: 6, 1: 3, 2: 5}  # different lengths: finished sequences leave, the bucket shrinks
    requests = [request(engine, c, voices, caps[c.index], 7) for c in chunks]
    eager = engine.decoder.decode(requests)
    together = static.decode(requests)
    [alone] = static.decode([requests[1]])
    for got, want in zip(together, eager, strict=True):
        assert got.tokens == want.tokens and got.frames == caps[got.index]
        assert max_difference(got.audio, want.audio) <= TOLERANCE
    assert max_difference(alone.audio, eager[1].audio) <= TOLERANCE
    other = static.decode([request(engine, chunks[1], voices, 3, 8)])[0]
    assert max_difference(other.audio, eager[1].audio) > 100 * TOLERANCE  # the comparison can fail


def test_speech_start_end_and_end_of_text_equal_the_eager_loop(engine, voices, chunks) -> None:
    """Forced speech-end, speech-start (negative branch back to length 0) and end of text."""
    config = engine.model.config
    frame, start, end = config.audio_token_id, config.audio_bos_token_id, config.audio_eos_token_id
    eos = config.eos_token_id
    patterns = [
        [frame, frame, end, start, frame, frame, frame],
        [end, frame, frame, start, frame, eos],
        [start, frame, end, end, frame, start, start, frame],
    ]
    requests = [
        request(engine, c, voices, len(p), 11, forced_tokens=tuple(p)) for c, p in zip(chunks, patterns, strict=True)
    ]
    eager = engine.decoder.decode(requests)
    static = static_decoder(engine).decode(requests)
    for got, want, pattern in zip(static, eager, patterns, strict=True):
        assert got.tokens == want.tokens == pattern
        assert max_difference(got.audio, want.audio) <= TOLERANCE


def test_joining_parking_and_leaving_mid_flight_equal_the_eager_loop(engine, voices, chunks) -> None:
    """Rows join a running batch at different frames (the bucket grows), one is parked and rejoins,
    rows leave (it shrinks); mixed diffusion steps and guidance scales share the frame."""
    requests = [request(engine, c, voices, frames, seed) for c, frames, seed in
                [(chunks[0], 7, 1), (chunks[1], 5, 2), (chunks[2], 6, 3), (chunks[0], 4, 4)]]  # fmt: skip
    requests[2] = type(requests[2])(**{**requests[2].__dict__, "diffusion_steps": 5, "cfg_scale": 2.0})
    alone = [engine.decoder.decode([r])[0].audio for r in requests]
    static = with_decoder(engine, static_decoder(engine))
    joined = decode_by_hand(static, requests, join_at={1: 2, 2: 3, 3: 5}, park_at={0: (3, 6)})
    for got, want in zip(joined, alone, strict=True):
        assert max_difference(got, want) <= TOLERANCE


def test_a_parked_sequence_rejoins_the_eager_loop_where_it_left(engine, voices, chunks) -> None:
    """Parking hands back the eager loop's row state and generator: the eager loop goes on from it."""
    r = request(engine, chunks[0], voices, 6, 21)
    [want] = engine.decoder.decode([r])
    static, eager = static_decoder(engine), engine.decoder
    from engine.batch import Sequence

    sequence, batch, frames = Sequence(r), Batch(), []
    with torch.inference_mode():
        for _ in static.prefill(sequence):
            pass
        static.join(batch, [sequence])
        for _ in range(3):
            frames += [o.audio.numpy() for o in static.step(batch) if o.audio is not None]
        [sequence] = static.park(batch, [0])
        batch = Batch()
        eager.join(batch, [sequence])
        while batch.sequences:
            outputs = eager.step(batch)
            frames += [o.audio.numpy() for o in outputs if o.audio is not None]
            eager.drop(batch, [i for i, o in enumerate(outputs) if not o.ended])
    assert max_difference(np.concatenate(frames), want.audio) <= TOLERANCE


# --- host synchronisations and operator dispatches -------------------------------------------------


def test_one_host_synchronisation_per_frame(engine, voices, chunks) -> None:
    """Counted: host reads (tolist, item, numpy, bool/int of a tensor) and the operators that read
    the device on CUDA (nonzero, masked_select, _local_scalar_dense, ...), inside `step` only."""
    from bench.step_counters import count_syncs

    requests = [request(engine, c, voices, 4, 5) for c in chunks]
    static_counts = count_syncs(static_decoder(engine), requests)
    eager_counts = count_syncs(engine.decoder, requests)
    assert static_counts and max(static_counts) == 1
    assert max(eager_counts) > 1  # the counter can fail: the eager loop reads the host more often


# --- compiled ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(engine):
    decoder = static_decoder(engine, compile_frame=True)
    decoder.warm_up([1, 2])
    # Both buckets compiled (dynamo's count of new graphs depends on what this process compiled before:
    # an earlier engine's graph of the same shape is reused). The tests below check frames ran compiled.
    assert decoder.compiled and {rows for rows, _, _ in decoder.frame_step.compiled_shapes} == {1, 2}
    return decoder


def test_the_compiled_step_equals_the_eager_loop(engine, voices, chunks, compiled) -> None:
    requests = [request(engine, c, voices, 4, 3) for c in chunks[:2]]
    eager = engine.decoder.decode(requests)
    frames = compiled.frame_step.compiled_frames
    got = compiled.decode(requests)
    assert compiled.compiled and compiled.frame_step.compiled_frames > frames  # it really ran compiled
    for mine, want in zip(got, eager, strict=True):
        assert mine.tokens == want.tokens
        assert max_difference(mine.audio, want.audio) <= TOLERANCE


def test_joining_and_leaving_never_recompile(engine, voices, chunks, compiled) -> None:
    """After the warm-up, rows joining and leaving within the warmed buckets trace nothing new."""
    from torch._dynamo.utils import counters

    requests = [request(engine, c, voices, frames, 9) for c, frames in ((chunks[0], 4), (chunks[2], 2))]
    compiled.decode(requests[:1])  # the shapes of this run's diffusion steps
    before = counters["stats"]["unique_graphs"]
    engine_view = with_decoder(engine, compiled)
    decode_by_hand(engine_view, requests, join_at={1: 1}, park_at={})
    compiled.decode(requests)
    assert counters["stats"]["unique_graphs"] == before


def test_a_shape_the_warm_up_did_not_compile_runs_uncompiled(engine, voices, chunks, compiled, caplog) -> None:
    """Compiling mid-job would stall the whole batch: a bucket the warm-up skipped (4) runs as is."""
    from torch._dynamo.utils import counters

    requests = [request(engine, c, voices, 3, 5) for c in chunks]  # 3 rows: bucket 4
    before, frames = counters["stats"]["unique_graphs"], compiled.frame_step.compiled_frames
    with caplog.at_level(logging.INFO, logger="vibevoice.framestep"):
        got = compiled.decode(requests)
    assert counters["stats"]["unique_graphs"] == before and compiled.frame_step.compiled_frames == frames
    assert "the warm-up did not compile (4 rows" in caplog.text
    for mine, want in zip(got, engine.decoder.decode(requests), strict=True):
        assert mine.tokens == want.tokens and max_difference(mine.audio, want.audio) <= TOLERANCE


def test_a_compile_failure_logs_one_line_and_decodes_uncompiled(engine, voices, chunks, caplog, monkeypatch) -> None:
    decoder = static_decoder(engine, compile_frame=True)

    def broken(tensors):
        raise RuntimeError("inductor exploded\nwith a long traceback")

    monkeypatch.setattr(decoder.frame_step, "_run", broken)
    r = request(engine, chunks[1], voices, 3, 4)
    # As if the warm-up had compiled this shape, so the failure comes in the middle of a job.
    decoder.frame_step.compiled_shapes.add((1, capacity_for(1, decoder.device), STEPS))
    with caplog.at_level(logging.WARNING, logger="vibevoice.framestep"):
        [got] = decoder.decode([r])
    [want] = engine.decoder.decode([r])
    assert not decoder.compiled
    assert max_difference(got.audio, want.audio) <= TOLERANCE
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vibevoice.framestep"]
    assert len(lines) == 1 and "inductor exploded" in lines[0] and "\n" not in lines[0]


@pytest.mark.parametrize("leaver", ["more diffusion steps", "a longer prompt"])
def test_a_batch_returns_to_a_compiled_shape_when_the_rows_that_forced_it_out_leave(
    engine, voices, chunks, compiled, leaver
) -> None:
    """A row with more steps than the warm-up compiled, or one that needs a second capacity step (not
    compiled here), takes the batch to a shape that runs uncompiled; once it has left, the other row goes
    on compiled. Each chunk counts its frames both ways; the uncompiled shape's buffers are freed."""
    stays = request(engine, chunks[0], voices, 6, 31)
    if leaver == "more diffusion steps":
        leaves = request(engine, chunks[2], voices, 2, 32, diffusion_steps=STEPS + 2)
    else:  # a prompt past one capacity step: a second voice, long
        long_voices = {**voices, 2: np.tile(voices[2], 48)}  # 32 s: 240 prompt tokens
        leaves = request(engine, chunks[2], long_voices, 2, 32)
        assert leaves.input_ids.numel() > capacity_for(1, engine.decoder.device)
    [want_stays, want_leaves] = [engine.decoder.decode([r])[0] for r in (stays, leaves)]
    got_stays, got_leaves = compiled.decode([stays, leaves])
    assert (got_leaves.compiled_frames, got_leaves.uncompiled_frames) == (0, 2)
    assert (got_stays.compiled_frames, got_stays.uncompiled_frames) == (4, 2)  # compiled again once it left
    assert max_difference(got_stays.audio, want_stays.audio) <= TOLERANCE
    assert max_difference(got_leaves.audio, want_leaves.audio) <= TOLERANCE
    kept = {shape for shape, buffers in compiled.frame_step._free.items() if buffers}
    assert kept and kept <= compiled.frame_step.compiled_shapes  # only compiled shapes keep their buffers


def test_a_join_that_runs_out_of_memory_changes_nothing(engine, voices, chunks, monkeypatch) -> None:
    """CUDA's out-of-memory error cannot happen on this CPU: placing the second of two joining rows raises
    it (a stand-in). No row joined, each keeps its state and its generator, the running row goes on, and
    joining again later gives each sequence its solo audio."""
    from engine.batch import Sequence

    static = static_decoder(engine)
    requests = [request(engine, c, voices, 4, 40 + k) for k, c in enumerate(chunks)]
    alone = [engine.decoder.decode([r])[0].audio for r in requests]
    first, *joining = [Sequence(r) for r in requests]
    batch, audio = Batch(), {id(s): [] for s in (first, *joining)}
    place = FrameStep._place

    def out_of_memory_on_the_last(self, slots, row, sequence):
        if sequence is joining[-1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return place(self, slots, row, sequence)

    def frame():
        outputs = static.step(batch)
        for output in outputs:
            audio[id(output.sequence)].append(output.audio.numpy())
        static.drop(batch, [row for row, output in enumerate(outputs) if not output.ended])

    with torch.inference_mode():
        for sequence in (first, *joining):
            for _ in static.prefill(sequence):
                pass
        static.join(batch, [first])
        frame()
        generators = [s.generator.get_state() for s in joining]
        monkeypatch.setattr(FrameStep, "_place", out_of_memory_on_the_last)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            static.join(batch, joining)
        monkeypatch.setattr(FrameStep, "_place", place)
        assert batch.sequences == [first] and int(batch.static.tensors.live.sum()) == 1
        assert all(s.state is not None for s in joining)
        assert all(torch.equal(s.generator.get_state(), g) for s, g in zip(joining, generators, strict=True))
        frame()
        static.join(batch, joining)
        while batch.sequences:
            frame()
    for sequence, want in zip((first, *joining), alone, strict=True):
        assert max_difference(np.concatenate(audio[id(sequence)]), want) <= TOLERANCE


def test_compile_mode_is_resolved_once(engine) -> None:
    assert BatchDecoder(engine.model, "off").frame_step is None
    assert BatchDecoder(engine.model, "auto").frame_step is None  # the CPU: off (compiling costs minutes)
    assert BatchDecoder(engine.model, "on").frame_step is not None
    with pytest.raises(ValueError, match="compile_mode"):
        BatchDecoder(engine.model, "fast")
    assert framestep.bucket_for(3) == 4 and framestep.bucket_for(1) == 1


# --- through the scheduler ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_engine(engine):
    """An engine over the session's model whose scheduler decodes with the static step (uncompiled)."""
    from inference import VibeVoiceEngine

    static = VibeVoiceEngine(engine.model, engine.processor, engine.info)
    static.decoder.frame_step = FrameStep(static.decoder, compile_frame=False)
    yield static
    static.scheduler.close()


def test_jobs_through_the_scheduler_equal_their_eager_solo_decode(engine, static_engine, voices) -> None:
    """A job alone, a job joining one that decodes, and one of three cancelled mid-flight: the
    scheduler drives the static step exactly as the eager one (same audio within 1e-4)."""
    from test_scheduler import JobThread, assert_solo, chunks_of, params, solo

    job = (chunks_of("Static", 2), params(77, 5))
    expected = solo(engine, job[0], voices, job[1])
    assert_solo(static_engine.synthesize(job[0], voices, job[1]), expected)
    long = JobThread(static_engine, chunks_of("Long", 1), voices, params(5, 24))
    long.start()
    assert long.progress.wait(60)
    assert_solo(static_engine.synthesize(job[0], voices, job[1]), expected)  # joins the running batch
    assert_solo(long.finish(), solo(engine, chunks_of("Long", 1), voices, params(5, 24)))

    import threading

    stop = threading.Event()
    jobs = [(chunks_of(f"Three {k}", 1), params(300 + k, 12)) for k in range(3)]
    threads = [JobThread(static_engine, c, voices, p, **({"should_stop": stop.is_set} if k == 1 else {}))
               for k, (c, p) in enumerate(jobs)]  # fmt: skip
    for thread in threads:
        thread.start()
    assert threads[1].progress.wait(60)
    stop.set()
    assert threads[1].finish()[0].frames < 12  # cut short: its row left the slots
    for k in (0, 2):
        assert_solo(threads[k].finish(), solo(engine, jobs[k][0], voices, jobs[k][1]))
    assert static_engine.wait_idle(30)


def test_the_warm_up_compiles_in_the_decode_thread(engine, monkeypatch) -> None:
    """CUDA graphs belong to the thread that records them: the start-up check compiles where frames run,
    the shapes of framestep.warm_up_shapes for the batch cap: buckets 1-8 (the CPU's cap) at one capacity
    step, 1-4 at two, the deployment's diffusion steps. (Compiling is stubbed: it costs minutes here;
    with no shape compiled, COMPILE=on fails the check.)"""
    import threading

    from inference import StartupError, VibeVoiceEngine

    on = VibeVoiceEngine(engine.model, engine.processor, engine.info, compile_mode="on", diffusion_steps=7)
    ran_in = []
    monkeypatch.setattr(on.decoder, "compile_shapes", lambda shapes: ran_in.append((threading.current_thread().name,
                                                                                    shapes)) or {})  # fmt: skip
    with pytest.raises(StartupError, match="no shape of the decode step was compiled"):
        on.warm_up()
    on.scheduler.close()
    short, long = capacity_for(1, on.decoder.device), 2 * capacity_for(1, on.decoder.device)
    assert ran_in == [("decode-scheduler", [(1, short, 7), (2, short, 7), (4, short, 7), (8, short, 7),
                                            (1, long, 7), (2, long, 7), (4, long, 7)])]  # fmt: skip
    assert framestep.warm_up_shapes(64, torch.device("cuda"), 20) == [
        (1, 1024, 20), (2, 1024, 20), (4, 1024, 20), (8, 1024, 20), (16, 1024, 20),
        (1, 2048, 20), (2, 2048, 20), (4, 2048, 20)]  # fmt: skip
    assert framestep.warm_up_shapes(3, torch.device("cuda"), 10)[:3] == [(1, 1024, 10), (2, 1024, 10), (4, 1024, 10)]
