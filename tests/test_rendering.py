"""Rendering: the engine's chunks -> one encoded file, or a stream of pieces; segments for both.

The chunk audio here is made, not generated (a tone per chunk), so every sample can be checked;
the engine's own output goes through the same functions in test_handler.py and test_streaming.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from audio_helpers import probe, tone

import audio
from inference import ChunkAudio
from planning import plan_job
from rendering import StreamRenderer, render
from schema import parse_job_input
from timeline import assemble, chunk_segments

GAP = 3600  # the default 150 ms between chunks, at 24 kHz


def chunks(*seconds: float) -> list[ChunkAudio]:
    return [
        ChunkAudio(i, tone(220 * (i + 1), s), frames=0, reached_cap=False, seconds=0.0) for i, s in enumerate(seconds)
    ]


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
    assert audio.integrated_loudness(decoded.samples, 16000) == pytest.approx(-20, abs=0.5)


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
