"""Rendering: the engine's chunks -> one encoded file, or a stream of pieces; segments for both.

The chunk audio here is made, not generated (a tone per chunk), so every sample can be checked;
the engine's own output goes through the same functions in test_handler.py and test_streaming.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from audio_helpers import probe, tone

from audio import dsp
from inference import ChunkAudio
from jobs.planning import plan_job
from jobs.rendering import LevelTracker, StreamRenderer, render
from jobs.schema import parse_job_input
from jobs.timeline import assemble, chunk_segments

GAP = 3600  # the default 150 ms between chunks, at 24 kHz


def chunks(*seconds: float) -> list[ChunkAudio]:
    return [ChunkAudio(i, tone(220 * (i + 1), s), frames=0, reached_cap=False) for i, s in enumerate(seconds)]


def plan(settings, **job):
    text = "Speaker 1: The first part is spoken here.\nSpeaker 2: The second part is spoken there."
    job_input = {"text": text, "disable_prefill": True, "max_chunk_chars": 40, **job}
    planned = plan_job(parse_job_input(job_input, settings), settings, library=None)
    assert len(planned.chunks) == 2
    return planned


def test_chunks_join_with_silent_gaps(settings) -> None:
    job_plan = plan(settings)
    joined, layout = assemble(job_plan.chunks, chunks(1.0, 0.5), GAP, 1.0, 0)
    assert joined.size == 24000 + GAP + 12000 and not joined[24000 : 24000 + GAP].any()
    assert [(p.start_sec, p.end_sec) for p in layout.placements] == [(0, 1.0), ((24000 + GAP) / 24000, 1.65)]


def test_whole_file_without_normalisation_is_the_joined_signal(settings) -> None:
    job_plan = plan(settings, output_format="pcm_16", normalize=False)
    rendered = render(job_plan, chunks(1.0, 0.5), settings)
    samples = np.frombuffer(rendered.data, "<i2").astype(np.float32) / 32767
    assert np.max(np.abs(samples - assemble(job_plan.chunks, chunks(1.0, 0.5), GAP, 1.0, 0)[0])) < 1e-4
    assert rendered.summary.duration_sec == pytest.approx((36000 + GAP) / 24000)
    assert rendered.summary.loudness["reason"] == "normalize is false"
    assert [p.scale for p in rendered.summary.placements] == [1.0, 1.0]


def test_whole_file_is_normalised_resampled_and_encoded(settings) -> None:
    job_plan = plan(settings, output_format="flac", sample_rate=16000, speed=2.0)
    rendered = render(job_plan, chunks(2.0, 2.0), settings)
    decoded = probe(rendered.data)
    assert (decoded.codec, decoded.sample_rate) == ("flac", 16000)
    assert decoded.duration == pytest.approx(rendered.summary.duration_sec, abs=1e-3)
    assert rendered.summary.placements[0].scale == pytest.approx(0.5, abs=0.01)  # twice as fast: half as long
    assert rendered.summary.loudness["applied"] and rendered.summary.loudness["output_lufs"] == pytest.approx(-20)
    assert dsp.integrated_loudness(decoded.samples, 16000) == pytest.approx(-20, abs=0.5)


def test_segments_follow_the_speed_change(settings) -> None:
    job_plan = plan(settings, output_format="wav", speed=2.0)
    results = chunks(1.0, 1.0)
    segments = chunk_segments(job_plan.script, job_plan.chunks, render(job_plan, results, settings).summary.placements)
    assert [s["speaker"] for s in segments] == ["Speaker 1", "Speaker 2"]
    assert [s["text"] for s in segments] == ["The first part is spoken here.", "The second part is spoken there."]
    assert segments[0]["start_sec"] == 0 and segments[0]["end_sec"] == pytest.approx(0.5, abs=0.01)
    assert segments[1]["start_sec"] == pytest.approx((24000 + GAP) / 48000, abs=0.01)


@pytest.mark.parametrize("piece", [1, 1000, 3200, 50000])
@pytest.mark.parametrize("pauses", [False, True])
def test_streamed_pieces_equal_the_whole_file_however_the_audio_arrives(settings, piece, pauses) -> None:
    text = "[pause:120ms] Speaker 1: The first part is spoken here. [pause:1s]\nSpeaker 2: The second part. [pause]"
    extra = {"text": text} if pauses else {}
    job_plan = plan(settings, output_format="pcm_16", sample_rate=22050, speed=1.3, normalize=False, stream=True,
                    **extra)  # fmt: skip
    results = chunks(0.7, 0.4)
    renderer = StreamRenderer(job_plan, settings)
    pieces: list[bytes] = []
    for number, result in enumerate(results):
        for start in range(0, result.audio.size, piece):
            pieces += renderer.audio(result.audio[start : start + piece])
        pieces += renderer.chunk_done(job_plan.chunks[number], result.audio.size, last=number == len(results) - 1)
    pieces.append(renderer.finish())
    whole = render(job_plan, results, settings)
    assert b"".join(pieces) == whole.data
    summary = renderer.summary()
    assert summary.duration_sec == whole.summary.duration_sec
    assert summary.placements == whole.summary.placements
    assert summary.loudness["measured_lufs"] is not None and not summary.loudness["applied"]


def track(tracker: LevelTracker, results: list[ChunkAudio], piece: int) -> None:
    """Feed a tracker as engine.synthesize calls it: audio frame by frame, then each finished chunk."""
    for result in results:
        for start in range(0, result.audio.size, piece):
            tracker.on_audio(result.index, result.audio[start : start + piece])
        tracker.on_chunk(result, len(results))


def assembled(job_plan, results: list[ChunkAudio]) -> np.ndarray:
    return assemble(job_plan.chunks, results, GAP, job_plan.speed, job_plan.script.lead_pause_ms)[0]


PAUSES = "[pause:120ms] Speaker 1: The first part is spoken here. [pause:1s]\nSpeaker 2: The second part. [pause]"


@pytest.mark.parametrize("piece", [1, 3200, 7777, 70000])
@pytest.mark.parametrize("pauses", [False, True])
def test_level_measured_while_generating_equals_the_whole_signal_measurement(settings, piece, pauses) -> None:
    """The meters see the assembled signal (gaps, pauses) in the blocks a whole-signal call uses:
    equal bit for bit, so `render` gives the same bytes with the level it was handed."""
    job_plan = plan(settings, output_format="pcm_16", **({"text": PAUSES} if pauses else {}))
    results = chunks(3.1, 0.9)  # more than one 64k-sample block, and a partial one
    tracker = LevelTracker(job_plan, settings)
    track(tracker, results, piece)
    level = tracker.level()
    signal = assembled(job_plan, results)
    assert level == dsp.measure_level(signal, 24000) and level.samples == signal.size
    assert level.lufs == dsp.integrated_loudness(signal, 24000)
    assert level.peak_dbtp == dsp.true_peak_dbtp(signal)
    handed, measured_here = render(job_plan, results, settings, level), render(job_plan, results, settings)
    assert handed.data == measured_here.data and handed.summary.loudness == measured_here.summary.loudness


def test_level_is_measured_in_render_when_generation_could_not(settings) -> None:
    """With a speed change the signal to measure comes from the time-stretch; normalize false needs none."""
    for job in ({"speed": 1.5}, {"normalize": False}):
        tracker = LevelTracker(plan(settings, **job), settings)
        track(tracker, chunks(1.0, 1.0), 3200)
        assert tracker.level() is None
    job_plan = plan(settings, output_format="pcm_16")
    other = dsp.measure_level(tone(100, 2.0, amplitude=0.01), 24000)  # a level of another signal
    assert render(job_plan, chunks(1.0, 1.0), settings, other).data == render(job_plan, chunks(1.0, 1.0), settings).data


def test_the_engine_feeds_the_tracker_the_signal_render_assembles(engine, settings) -> None:
    """Through the real engine (tiny checkpoint): on_audio and on_chunk give exactly that signal."""
    job_plan = plan(settings, output_format="pcm_16", max_new_tokens=4, diffusion_steps=3, seed=5, text=PAUSES)
    tracker = LevelTracker(job_plan, settings)
    results = engine.synthesize(
        job_plan.chunks, job_plan.voices, job_plan.params, on_audio=tracker.on_audio, on_chunk=tracker.on_chunk
    )
    assert tracker.level() == dsp.measure_level(assembled(job_plan, results), 24000)
