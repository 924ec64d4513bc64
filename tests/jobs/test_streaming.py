"""Streamed jobs through `Worker.handle` (what RunPod iterates), with the tiny checkpoint.

Mocked: nothing, except the fault injected to make a job fail mid-stream (a forward hook that
raises, standing in for a GPU fault). Audio is decoded with FFmpeg's decoders.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import numpy as np
import pytest
from audio_helpers import probe

FAST = {"diffusion_steps": 3, "seed": 21}
# Long enough that its text-derived frame cap (about 70 s) is above the 200 frames the tests ask for.
LONG_TEXT = "A job that is cancelled long before its end, with text enough for many frames of audio. " * 4
SCRIPT = {
    "text": "Speaker 1: Streaming starts with the first frames.\nSpeaker 2: And goes on, chunk after chunk.",
    "speakers": ["Alice", "Frank"],
    "max_chunk_chars": 40,
}


async def items_of(worker, job_input: dict, job_id: str = "stream") -> list[dict]:
    return [item async for item in worker.handle({"id": job_id, "input": job_input})]


def stream(worker, job_input: dict) -> list[dict]:
    return asyncio.run(items_of(worker, {**job_input, "stream": True}))


def audio_of(items: list[dict]) -> bytes:
    return b"".join(base64.b64decode(item["audio_chunk"]) for item in items if item.get("status") == "streaming")


def whole_file(worker, job_input: dict) -> bytes:
    [item] = asyncio.run(items_of(worker, {**job_input, "return": "base64"}))
    return base64.b64decode(item["audio_base64"])


def check_shape(items: list[dict], fmt: str, rate: int) -> dict:
    *audio_items, summary = items
    assert audio_items and all(item["status"] == "streaming" for item in audio_items)
    assert [item["seq"] for item in audio_items] == list(range(len(audio_items)))
    assert all(item["format"] == fmt and item["sample_rate"] == rate for item in audio_items)
    assert all(len(json.dumps(item)) < 1_000_000 for item in audio_items)  # RunPod's stream-chunk limit
    assert summary["status"] == "complete" and summary["items"] == len(audio_items)
    assert not {"audio_chunk", "audio_base64", "audio_url"} & set(summary)
    assert summary["timings"]["time_to_first_audio_sec"] <= summary["timings"]["total_sec"]
    return summary


@pytest.mark.parametrize(
    "fmt, extra",
    [
        ("pcm_16", {}),
        ("wav", {"sample_rate": 16000, "speed": 1.25}),
        ("pcm_16", {"sample_rate": 44100, "speed": 0.8}),
    ],
)
def test_streamed_pcm_and_wav_equal_the_whole_file(make_worker, fmt, extra) -> None:
    """With normalize off, the streamed samples are the non-streamed job's samples, gaps,
    speed change and resampling included; segments agree too."""
    worker = make_worker()
    job = {**SCRIPT, **FAST, "max_new_tokens": 5, "output_format": fmt, "normalize": False, **extra}
    items = stream(worker, job)
    summary = check_shape(items, fmt, extra.get("sample_rate", 24000))
    streamed = audio_of(items)
    reference = whole_file(worker, job)
    [whole] = asyncio.run(items_of(worker, {**job, "return": "base64"}))
    if fmt == "wav":
        assert streamed[:4] == b"RIFF" and reference[:4] == b"RIFF"
        streamed, reference = streamed[44:], reference[44:]  # the streamed header has no sizes
    assert streamed == reference
    assert summary["segments"] == whole["segments"] and summary["duration_sec"] == whole["duration_sec"]
    assert summary["chunks"] == 2 and summary["seed"] == 21
    assert summary["loudness"]["applied"] is False and summary["loudness"]["reason"] == "normalize is false"


@pytest.mark.parametrize("fmt, codec", [("mp3", "mp3float"), ("opus", "opus"), ("wav", "pcm_s16le")])
def test_streamed_bytes_concatenate_to_one_decodable_file(make_worker, fmt, codec) -> None:
    items = stream(make_worker(), {**SCRIPT, **FAST, "max_new_tokens": 6, "output_format": fmt})
    rate = 48000 if fmt == "opus" else 24000
    summary = check_shape(items, fmt, rate)
    assert len(items) > 3  # several audio items, not one blob
    info = probe(audio_of(items))
    assert info.codec == codec and info.sample_rate == rate and info.channels == 1
    assert abs(info.duration - summary["duration_sec"]) < 0.12  # encoder delay of mp3/opus
    # Normalisation needs the whole signal: streaming measures instead, and says so.
    loudness = summary["loudness"]
    assert loudness["applied"] is False and loudness["reason"].startswith("streaming:")
    assert loudness["measured_lufs"] is not None and loudness["true_peak_dbtp"] is not None


def test_items_arrive_while_the_engine_is_still_decoding(make_worker) -> None:
    """The first item is in the consumer's hands before the engine has decoded the last frame."""
    worker = make_worker()
    frames = {"count": 0}
    decoder = worker.engine.model.model.audio_tower.decoder
    handle = decoder.register_forward_hook(lambda *args: frames.__setitem__("count", frames["count"] + 1))
    seen_at_first_item: list[int] = []

    async def consume() -> list[dict]:
        items = []
        job = {"text": "One long chunk of streamed speech.", **FAST, "max_new_tokens": 30,
               "stream": True, "stream_chunk_ms": 100, "output_format": "pcm_16"}  # fmt: skip
        async for item in worker.handle({"id": "s", "input": job}):
            if not items:
                seen_at_first_item.append(frames["count"])
            items.append(item)
        return items

    try:
        items = asyncio.run(consume())
    finally:
        handle.remove()
    assert frames["count"] == 30 and len(items) == 30 * 3200 // 2400 + 1  # 100 ms items, then the summary
    assert seen_at_first_item[0] < 30


@pytest.mark.fault
def test_cancelled_stream_stops_the_engine_within_frames(make_worker) -> None:
    worker = make_worker()
    frames = {"count": 0, "at_cancel": None}
    decoder = worker.engine.model.model.audio_tower.decoder
    handle = decoder.register_forward_hook(lambda *args: frames.__setitem__("count", frames["count"] + 1))
    job = {"text": LONG_TEXT, **FAST, "max_new_tokens": 200, "stream": True, "stream_chunk_ms": 100,
           "output_format": "pcm_16"}  # fmt: skip

    async def cancel_after_first_item() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in worker.handle({"id": "c", "input": job}):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), timeout=120)
        frames["at_cancel"] = frames["count"]
        task.cancel()  # what the RunPod SDK does to a cancelled job's handler
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancel_after_first_item())
        # The engine is free for the next job once its thread has seen the stop (bounded wait).
        assert worker.engine.wait_idle(timeout=30)
    finally:
        handle.remove()
    # Bounded queue + stop at the next frame: far fewer than the 200 frames asked for.
    assert frames["count"] <= frames["at_cancel"] + 8 + 2
    after = asyncio.run(items_of(worker, {"text": "Next job.", **FAST, "max_new_tokens": 3}))
    assert after[0]["status"] == "completed"


@pytest.mark.fault
def test_cancel_while_the_sdk_holds_an_item_stops_the_engine(make_worker, caplog) -> None:
    """The SDK is posting an item (outside the handler's generator) when the job is cancelled: the
    generator stays suspended (kept alive here, as a reference cycle can keep it), yet the engine
    stops and the cancel is logged, from the task's own end."""
    worker = make_worker()
    job = {"text": LONG_TEXT, **FAST, "max_new_tokens": 200, "stream": True, "stream_chunk_ms": 100,
           "output_format": "pcm_16"}  # fmt: skip
    frames = {"count": 0, "at_cancel": None}
    held = []

    async def cancel_while_posting() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            generator = worker.handle({"id": "held", "input": job})
            held.append(generator)  # never collected, so never closed during the test
            await anext(generator)
            first.set()
            await asyncio.sleep(3600)  # the SDK posting the item

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), timeout=120)
        frames["at_cancel"] = frames["count"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Before asyncio.run ends: at its end it closes every suspended generator itself.
        assert await asyncio.to_thread(worker.engine.wait_idle, 30)  # the job has left the decode scheduler
        assert "job held cancelled" in caplog.text

    decoder = worker.engine.model.model.audio_tower.decoder
    handle = decoder.register_forward_hook(lambda *args: frames.__setitem__("count", frames["count"] + 1))
    try:
        with caplog.at_level(logging.INFO, logger="vibevoice"):
            asyncio.run(cancel_while_posting())
    finally:
        handle.remove()
    assert frames["count"] <= frames["at_cancel"] + 8 + 2 < 200


def test_consumer_leaving_early_also_stops_the_engine(make_worker) -> None:
    worker = make_worker()
    job = {"text": LONG_TEXT, **FAST, "max_new_tokens": 200, "stream": True, "stream_chunk_ms": 100,
           "output_format": "pcm_16"}  # fmt: skip

    async def take_two() -> None:
        generator = worker.handle({"id": "l", "input": job})
        await anext(generator)
        await anext(generator)
        frames["at_close"] = frames["count"]
        await generator.aclose()

    frames = {"count": 0, "at_close": None}
    decoder = worker.engine.model.model.audio_tower.decoder
    handle = decoder.register_forward_hook(lambda *args: frames.__setitem__("count", frames["count"] + 1))
    try:
        asyncio.run(take_two())
        assert worker.engine.wait_idle(timeout=30)  # the job has left the decode scheduler
    finally:
        handle.remove()
    # The decode loop does not wait for a slow consumer (it never stalls the batch), so it may be a
    # few frames ahead when the consumer leaves; the job stops at the next frame boundary after that.
    assert frames["count"] <= frames["at_close"] + 2 < 200


@pytest.mark.fault
def test_failure_mid_stream_fails_the_job_with_one_sentence(make_worker) -> None:
    """A fault after some audio (standing in for a GPU error: a hook that raises on the fourth
    decoded frame) ends the stream with an error item, which RunPod turns into FAILED."""
    worker = make_worker()
    frames = {"count": 0}

    def fail_on_fourth(module, args, output):
        frames["count"] += 1
        if frames["count"] == 4:
            raise RuntimeError("simulated device fault")

    handle = worker.engine.model.model.audio_tower.decoder.register_forward_hook(fail_on_fourth)
    try:
        items = stream(worker, {"text": "This will fail.", **FAST, "max_new_tokens": 10, "stream_chunk_ms": 100,
                                "output_format": "pcm_16"})  # fmt: skip
    finally:
        handle.remove()
    *audio_items, last = items
    # Three frames decoded before the fault: 9600 samples, four 100 ms items.
    assert len(audio_items) == 4 and all(item["status"] == "streaming" for item in audio_items)
    assert set(last) == {"error"}
    assert last["error"] == (
        "streaming stopped after 4 item(s): internal error while generating audio (RuntimeError); "
        "the job was not completed."
    )
    assert worker.engine.wait_idle(timeout=30)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"output_format": "aac"},
            "'output_format' aac cannot be streamed; with 'stream': true use mp3, opus, wav or pcm_16.",
        ),
        (
            {"return": "url"},
            "'return' url cannot be combined with 'stream': true; streamed audio arrives in the items.",
        ),
        (
            {"stream_chunk_ms": 50},
            "'stream_chunk_ms' must be an integer from 100 to 5000 (milliseconds of audio per streamed item) (got 50).",
        ),
    ],
)
def test_stream_input_errors(make_worker, extra, message) -> None:
    assert stream(make_worker(), {"text": "No.", **extra}) == [{"error": message}]


def test_stream_chunk_ms_needs_stream(make_worker) -> None:
    items = asyncio.run(items_of(make_worker(), {"text": "No.", "stream_chunk_ms": 200}))
    assert items == [{"error": "'stream_chunk_ms' applies only with 'stream': true."}]


def test_local_modes_collect_every_streamed_item(make_worker) -> None:
    """`collect` (the SDK's local modes, /runsync there) returns the items as one list."""
    worker = make_worker()
    result = asyncio.run(
        worker.collect({"id": "r", "input": {"text": "Collected.", **FAST, "max_new_tokens": 4, "stream": True}})
    )
    assert isinstance(result, list) and result[-1]["status"] == "complete"
    assert all(item["status"] == "streaming" for item in result[:-1]) and len(result) >= 2
    assert probe(audio_of(result)).codec == "mp3float"


def test_item_size_follows_stream_chunk_ms(make_worker) -> None:
    items = stream(make_worker(), {"text": "Sized items.", **FAST, "max_new_tokens": 12, "stream_chunk_ms": 400,
                                   "output_format": "pcm_16"})  # fmt: skip
    sizes = [len(base64.b64decode(item["audio_chunk"])) // 2 for item in items[:-1]]
    # 400 ms at 24 kHz is 9600 samples; the last item holds the remainder (12 frames = 38 400).
    assert sizes == [9600, 9600, 9600, 9600]
    assert np.sum(sizes) == 12 * 3200
