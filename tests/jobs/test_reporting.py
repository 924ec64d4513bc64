"""What a job reports: the progress throttle, and one result builder for whole and streamed jobs."""

from __future__ import annotations

import json

import pytest
from audio_helpers import tone

from inference import ChunkAudio
from jobs.planning import plan_job
from jobs.rendering import AudioSummary
from jobs.reporting import (
    ITEMS_LEFT_OUT,
    PROGRESS_INTERVAL_SEC,
    FinalOutput,
    ProgressThrottle,
    after_items,
    job_result,
)
from jobs.schema import parse_job_input
from jobs.timeline import Placement


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_throttled_between_chunk_ends_and_silent_after_the_last() -> None:
    sent: list[str] = []
    clock = Clock()
    throttle = ProgressThrottle(3, sent.append, clock)
    throttle(0.1, 0)  # first audio: sent
    clock.now += PROGRESS_INTERVAL_SEC / 2
    throttle(0.5, 0)  # too soon: dropped
    throttle(1.0, 1)  # a chunk ended: always sent
    clock.now += PROGRESS_INTERVAL_SEC
    throttle(2.0, 1)  # the interval has passed: sent
    throttle(3.0, 3)  # the last chunk is done: the result comes next, nothing is sent
    assert sent == [
        "0.1 s of audio generated, 0 of 3 chunks done",
        "chunk 1 of 3 done, 1.0 s of audio generated",
        "2.0 s of audio generated, 1 of 3 chunks done",
    ]


def test_errors_after_streamed_items_say_so() -> None:
    assert after_items("The job failed.", 0) == "The job failed."
    assert after_items("The job failed.", 3) == "streaming stopped after 3 item(s): the job failed."


@pytest.fixture()
def finished(settings):
    text = "Speaker 1: The first part is spoken here.\nSpeaker 2: The second part is spoken there."
    job_input = {"text": text, "disable_prefill": True, "captions": "vtt", "max_chunk_chars": 40, "seed": 9}
    plan = plan_job(parse_job_input(job_input, settings), settings, library=None)
    assert len(plan.chunks) == 2
    results = [
        ChunkAudio(0, tone(200, 1.0), frames=8, reached_cap=False),
        ChunkAudio(1, tone(300, 0.5), frames=4, reached_cap=True),
    ]
    placements = [Placement(0, 0.0, 1.0, 1.0), Placement(1, 1.0, 1.5, 1.0)]
    summary = AudioSummary(duration_sec=1.5, loudness={"applied": False}, placements=placements, encode_seconds=0.1)
    return plan, results, summary


def test_whole_and_streamed_results_share_every_field_but_delivery_and_timings(finished) -> None:
    plan, results, summary = finished
    whole = job_result(
        plan, results, summary, status="completed", delivery={"audio_base64": "AAAA", "delivery": "base64"},
        timings={"model_load_sec": 1.0, "generate_sec": 0.75, "total_sec": 2.0}, extra_warnings=["S3 was down."],
    )  # fmt: skip
    streamed = job_result(
        plan, results, summary, status="complete", delivery={"delivery": "stream", "items": 4},
        timings={"model_load_sec": 1.0, "time_to_first_audio_sec": None, "generate_sec": 0.75, "total_sec": 2.0},
    )  # fmt: skip
    shared = {"format", "content_type", "sample_rate", "duration_sec", "seed", "chunks", "segments", "loudness"}
    assert {key: whole[key] for key in shared} == {key: streamed[key] for key in shared}
    assert whole["captions"] == streamed["captions"] and whole["captions"].startswith("WEBVTT")
    assert (whole["format"], whole["bitrate_kbps"], whole["seed"]) == ("mp3", 128, 9)
    assert whole["timings"]["real_time_factor"] == pytest.approx(0.75 / (results_seconds(results)), abs=1e-4)
    assert streamed["timings"]["time_to_first_audio_sec"] is None
    assert (whole["audio_base64"], whole["delivery"], streamed["items"]) == ("AAAA", "base64", 4)
    capped = "chunk(s) 1 reached the frame cap and may be cut short."
    assert streamed["warnings"] == [capped] and whole["warnings"] == [capped, "S3 was down."]
    assert [segment["speaker"] for segment in whole["segments"]] == ["Speaker 1", "Speaker 2"]


def results_seconds(results) -> float:
    return sum(result.audio.size for result in results) / 24000


def test_final_output_leaves_the_audio_items_out_only_past_the_limit() -> None:
    """The SDK aggregates the very objects a streamed job yields: below the limit they stay whole;
    once the summary would pass it, the earlier items are emptied and the summary says why."""
    items = [{"status": "streaming", "seq": n, "audio_chunk": "A" * 400} for n in range(3)]
    summary = {"status": "complete", "items": 3}
    roomy = FinalOutput(10_000)
    for item in [*items, summary]:
        roomy.add(item)
    assert all(item["audio_chunk"] for item in items) and "warnings" not in summary

    tight = FinalOutput(1_000)
    for item in [*items, summary]:
        tight.add(item)
    assert items == [{}, {}, {}]
    assert summary["warnings"] == [ITEMS_LEFT_OUT.format(limit=0.001)]
    assert len(json.dumps([*items, summary])) <= 1_000
