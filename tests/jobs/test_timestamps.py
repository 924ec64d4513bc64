"""Word timestamps and pause tags through the worker (`Worker.handle`) with the tiny checkpoint.

The tiny checkpoint speaks noise, so the aligner cannot follow it: the words must still come
back well-formed (every word, in order, inside the audio), and pauses must be exact. The
aligner's accuracy on real speech is tests/text/test_aligner.py's. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import re

import numpy as np
import pytest
from audio_helpers import check_audio
from test_streaming import audio_of, items_of, stream

from handler import Worker
from text import aligner

FAST = {"diffusion_steps": 3, "seed": 5, "max_new_tokens": 4}
TEXT = "Hello there, Doctor Zorblax! It is 42 degrees today. [pause:750ms] Shall we go? Yes."


def run(worker, job_input: dict) -> dict:
    [item] = asyncio.run(items_of(worker, job_input))
    assert "error" not in item, item
    return item


def spoken_words(text: str) -> list[str]:
    text = re.sub(r"\[pause[^\]]*\]", " ", text)
    return [word for word in text.split() if any(char.isalnum() for char in word)]


def pcm(item: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(item["audio_base64"]), dtype="<i2")


def check_words(result: dict, text: str) -> None:
    words = result["words"]
    assert [word["word"] for word in words] == spoken_words(text)
    starts = [word["start_sec"] for word in words]
    assert starts == sorted(starts)
    assert all(0 <= word["start_sec"] <= word["end_sec"] <= result["duration_sec"] for word in words)
    assert all(word["speaker"] == "Speaker 1" for word in words)


def test_word_timestamps_are_well_formed_on_noise(make_worker) -> None:
    result = run(make_worker(), {"text": TEXT, **FAST, "timestamps": "word", "output_format": "wav"})
    check_words(result, TEXT)
    assert [segment["text"] for segment in result["segments"]] == [
        "Hello there, Doctor Zorblax!",
        "It is 42 degrees today.",
        "Shall we go?",
        "Yes.",
    ]
    assert [segment["chunk"] for segment in result["segments"]] == [0, 0, 1, 1]
    assert result["timings"]["align_sec"] >= 0 and result["timings"]["align_wait_sec"] >= 0
    # Sentences come from the same timings as the words.
    assert result["segments"][0]["start_sec"] == result["words"][0]["start_sec"]
    assert result["segments"][-1]["end_sec"] == result["words"][-1]["end_sec"]


def test_sentence_timestamps_have_no_words(make_worker) -> None:
    result = run(make_worker(), {"text": TEXT, **FAST, "timestamps": "sentence", "captions": "srt"})
    assert "words" not in result
    assert len(result["segments"]) == 4
    assert result["captions"].count(" --> ") == 4  # sentence cues by default


@pytest.mark.parametrize("speed, rate", [(1.0, 24000), (2.0, 16000), (0.5, 44100)])
def test_a_pause_is_exact_silence_that_the_timings_account_for(make_worker, speed, rate) -> None:
    job = {"text": "[pause:500ms] First part. [pause:750ms] Second part. [pause:1s]", **FAST,
           "output_format": "pcm_16", "sample_rate": rate, "speed": speed, "return": "base64",
           "normalize": False}  # fmt: skip
    worker = make_worker()
    result = run(worker, job)
    samples = pcm(result)
    first, second = result["segments"]  # one per chunk: where each chunk's audio lies
    # Each pause keeps its length whatever the speed; a pause replaces the gap between chunks.
    assert first["start_sec"] == pytest.approx(0.5, abs=1e-3)
    assert second["start_sec"] - first["end_sec"] == pytest.approx(0.75, abs=2e-3)
    assert result["duration_sec"] - second["end_sec"] == pytest.approx(1.0, abs=2e-3)
    # Exact zeros in the audio, away from the resampler's ramps at the edges.
    edge = round(0.01 * rate)
    assert not samples[: round(0.5 * rate) - edge].any()
    between = samples[round(first["end_sec"] * rate) + edge : round(second["start_sec"] * rate) - edge]
    assert between.size >= round(0.73 * rate) and not between.any()
    assert not samples[round(second["end_sec"] * rate) + edge :].any()

    timed = run(worker, {**job, "timestamps": "word"})
    assert pcm(timed).tobytes() == samples.tobytes()  # alignment changes nothing in the audio
    check_words(timed, job["text"])
    words = timed["words"]
    assert first["start_sec"] <= words[0]["start_sec"] and words[1]["end_sec"] <= first["end_sec"]
    assert second["start_sec"] <= words[2]["start_sec"] and words[3]["end_sec"] <= second["end_sec"]


def test_word_captions_and_chunk_captions(make_worker) -> None:
    worker = make_worker()
    words = run(worker, {"text": TEXT, **FAST, "timestamps": "word", "captions": "vtt", "caption_unit": "word"})
    assert words["captions"].startswith("WEBVTT\n\n")
    assert words["captions"].count(" --> ") == len(spoken_words(TEXT))
    assert "\nZorblax!\n" in words["captions"]
    chunks = run(worker, {"text": TEXT, **FAST, "captions": "srt"})
    assert chunks["captions"].count(" --> ") == 2 and "words" not in chunks
    # Word cues without word timestamps in the result: the chunks are aligned all the same.
    aligned = run(worker, {"text": TEXT, **FAST, "captions": "srt", "caption_unit": "word"})
    assert aligned["captions"].count(" --> ") == len(spoken_words(TEXT)) and "words" not in aligned


def test_chinese_gets_sentence_timings_and_a_warning(make_worker) -> None:
    result = run(make_worker(), {"text": "你好，世界。今天天气很好。", **FAST, "timestamps": "word"})
    assert result["words"] == []
    assert [segment["text"] for segment in result["segments"]] == ["你好，世界。", "今天天气很好。"]
    assert any("sentence-level timestamps only" in warning for warning in result["warnings"])


def test_streamed_words_equal_the_whole_jobs(make_worker) -> None:
    worker = make_worker()
    job = {"text": TEXT, **FAST, "output_format": "pcm_16", "normalize": False, "timestamps": "word",
           "max_chunk_chars": 40, "speed": 1.25}  # fmt: skip
    items = stream(worker, {**job, "stream_chunk_ms": 100})
    summary = items[-1]
    whole = run(worker, {**job, "return": "base64"})
    assert audio_of(items) == base64.b64decode(whole["audio_base64"])  # pauses and speed included
    assert summary["words"] == whole["words"] and summary["segments"] == whole["segments"]
    check_words(summary, TEXT)


class InlineAligner(aligner.Aligner):
    """The real aligner, run in the calling thread: its result is ready when `submit` returns, so
    which item carries which words does not depend on timing."""

    def submit(self, turns, audio):
        future = concurrent.futures.Future()
        future.set_result(aligner.align_chunk(turns, audio, self.sample_rate))
        return future


def test_streamed_items_carry_each_chunks_words_once_it_is_aligned(engine, make_settings) -> None:
    worker = Worker(make_settings(batch_size=1), engine, aligner=InlineAligner(24000))
    job = {"text": TEXT, **FAST, "output_format": "pcm_16", "timestamps": "word", "max_chunk_chars": 40,
           "stream_chunk_ms": 100}  # fmt: skip
    *audio_items, summary = stream(worker, job)
    carried = [item["words"] for item in audio_items if "words" in item]
    # Chunk by chunk (batch size 1): each chunk's words ride on the first item after it (the last
    # chunk's on the stream's last piece); the summary repeats them all.
    assert len(carried) == summary["chunks"] == 3
    assert [word for words in carried for word in words] == summary["words"]


def test_total_pause_is_bounded_by_the_setting(make_worker) -> None:
    worker = make_worker(max_pause_sec=5)
    [item] = asyncio.run(items_of(worker, {"text": "A. [pause:3s] B. [pause:3s] C.", **FAST}))
    assert item == {
        "error": "'text' asks for 6 s of pauses in all; this deployment allows at most 5 s (MAX_PAUSE_SEC)."
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"text": "Wait [pause:two] for it."}, "'text': has a malformed pause tag '[pause:two]'"),
        ({"timestamps": "words"}, "'timestamps' must be 'none', 'sentence' or 'word'"),
        ({"caption_unit": "word"}, "'caption_unit' applies only with 'captions'"),
        ({"captions": "srt", "caption_unit": "line"}, "'caption_unit' must be 'chunk', 'sentence' or 'word'"),
    ],
)
def test_bad_timestamp_and_pause_inputs(make_worker, extra, message) -> None:
    [item] = asyncio.run(items_of(make_worker(), {"text": "Hi.", **FAST, **extra}))
    assert item["error"].startswith(message), item


def test_words_through_runpods_api(runpod_api) -> None:
    """`make serve`: RunPod's API (the emulator) in front of the SDK's real worker loop."""
    text = "Speaker 1: Welcome back. [pause:1s]\nSpeaker 2: Thanks, glad to be here."
    job = {"text": text, "speakers": ["Alice", "Frank"], **FAST, "timestamps": "word", "output_format": "wav"}
    status, reply = runpod_api.call("POST", "/runsync", {"input": job})
    assert status == 200 and reply["status"] == "COMPLETED", reply
    item = check_audio(reply["output"])
    relabelled = [{**word, "speaker": "Speaker 1"} for word in item["words"]]
    check_words({**item, "words": relabelled}, "Welcome back. Thanks, glad to be here.")
    assert [w["speaker"] for w in item["words"]] == ["Speaker 1"] * 2 + ["Speaker 2"] * 5
    first, second = item["segments"]  # sentences
    assert second["start_sec"] >= first["end_sec"] + 1.0  # the pause lies between them
