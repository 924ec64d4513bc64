"""Streamed jobs as RunPod clients see them: the API emulator (tools/runpod_emulator.py) feeding the
SDK's real worker loop (`python handler.py`, the tiny checkpoint). Nothing is mocked.
"""

from __future__ import annotations

import base64
import time

import pytest
from audio_helpers import probe
from conftest import RunpodAPI, running_api
from test_runpod_emulator import FINAL, wait_for_log

pytestmark = pytest.mark.slow
FAST = {"diffusion_steps": 3, "seed": 8}


def audio_of(items: list[dict]) -> bytes:
    return b"".join(base64.b64decode(item["audio_chunk"]) for item in items if item.get("status") == "streaming")


def check_items(items: list[dict]) -> dict:
    *audio_items, summary = items
    assert audio_items and all(item["status"] == "streaming" for item in audio_items)
    assert [item["seq"] for item in audio_items] == list(range(len(audio_items)))
    assert summary["status"] == "complete" and summary["items"] == len(audio_items)
    return summary


def test_streamed_items_arrive_before_the_job_completes(runpod_api: RunpodAPI) -> None:
    job_input = {"text": "Streamed through RunPod's stream endpoint.", **FAST, "max_new_tokens": 40,
                 "stream": True, "stream_chunk_ms": 100, "output_format": "pcm_16"}  # fmt: skip
    status, job = runpod_api.call("POST", "/run", {"input": job_input})
    assert status == 200
    items: list[dict] = []
    first_item_at = completed_at = None
    items_while_running = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _, reply = runpod_api.call("GET", f"/stream/{job['id']}")
        now = time.monotonic()
        new = [entry["output"] for entry in reply["stream"]]
        if new and first_item_at is None:
            first_item_at = now
        if reply["status"] == "IN_PROGRESS":
            items_while_running += len(new)
        items += new
        if reply["status"] in FINAL:
            completed_at = now
            break
        time.sleep(0.03)
    assert reply["status"] == "COMPLETED"
    assert first_item_at is not None and completed_at is not None and first_item_at < completed_at
    assert items_while_running > 0  # handed out while the job was still running
    summary = check_items(items)
    assert summary["duration_sec"] == pytest.approx(40 * 3200 / 24000, abs=1e-3)
    assert len(audio_of(items)) == 40 * 3200 * 2
    # /status holds the same items, aggregated (return_aggregate_stream).
    assert runpod_api.call("GET", f"/status/{job['id']}")[1]["output"] == items


@pytest.mark.parametrize(
    "fmt, codec, rate",
    [("pcm_16", None, 24000), ("wav", "pcm_s16le", 24000), ("mp3", "mp3float", 24000), ("opus", "opus", 48000)],
)
def test_runsync_returns_the_aggregated_items_of_one_file(runpod_api: RunpodAPI, fmt, codec, rate) -> None:
    text = "Speaker 1: One stream, with two voices.\nSpeaker 2: And a second chunk for them."
    job_input = {"text": text, "speakers": ["Alice", "Frank"], "max_chunk_chars": 40, **FAST, "max_new_tokens": 6,
                 "stream": True, "output_format": fmt}  # fmt: skip
    status, reply = runpod_api.call("POST", "/runsync", {"input": job_input})
    assert status == 200 and reply["status"] == "COMPLETED", reply
    summary = check_items(reply["output"])
    assert summary["chunks"] == 2 and summary["sample_rate"] == rate
    data = audio_of(reply["output"])
    if fmt == "pcm_16":
        assert len(data) == 2 * round(summary["duration_sec"] * 24000)
    else:
        info = probe(data)
        assert info.codec == codec and info.sample_rate == rate
        assert abs(info.duration - summary["duration_sec"]) < 0.12


@pytest.mark.fault
def test_cancel_stops_a_streaming_job(runpod_api: RunpodAPI) -> None:
    text = "A long streamed job, cancelled early, long enough that its frame cap is not what ends it. " * 4
    job_input = {"text": text, **FAST, "max_new_tokens": 600, "stream": True, "stream_chunk_ms": 100,
                 "output_format": "pcm_16"}  # fmt: skip
    _, job = runpod_api.call("POST", "/run", {"input": job_input})
    deadline = time.monotonic() + 60
    while not runpod_api.call("GET", f"/stream/{job['id']}")[1]["stream"]:
        assert time.monotonic() < deadline, "no streamed item within 60 s"
        time.sleep(0.03)
    assert runpod_api.call("POST", f"/cancel/{job['id']}") == (200, {"id": job["id"], "status": "CANCELLED"})
    # The SDK learns of the cancel on its next poll: generous on a loaded machine, bounded anyway.
    wait_for_log(runpod_api.worker.log_path, f"job {job['id']} cancelled", timeout=120)
    _, reply = runpod_api.call("POST", "/runsync", {"input": {"text": "Next job.", **FAST, "max_new_tokens": 3}})
    assert reply["status"] == "COMPLETED"
    assert runpod_api.call("GET", f"/status/{job['id']}")[1]["status"] == "CANCELLED"


def test_a_failing_stream_job_is_failed_with_its_sentence(runpod_api: RunpodAPI) -> None:
    status, reply = runpod_api.call("POST", "/runsync", {"input": {"text": "No.", "stream": True,
                                                                   "output_format": "flac"}})  # fmt: skip
    assert status == 200 and reply["status"] == "FAILED"
    assert reply["error"] == (
        "'output_format' flac cannot be streamed; with 'stream': true use mp3, opus, wav or pcm_16."
    )
    assert runpod_api.call("GET", f"/stream/{reply['id']}") == (200, {"status": "FAILED", "stream": []})


def test_a_stream_past_runpods_result_limit_keeps_its_summary(tiny_model_dir, volume, tmp_path) -> None:
    """The SDK posts every streamed item again as the job's final output, and RunPod drops a result
    past its limit (the emulator with a 60 kB limit here, the worker told the same through
    RESULT_LIMIT_BYTES). /stream delivers every item; /status then holds the emptied items and
    the summary, which says so, instead of losing the result after all its audio was sent."""
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu",
           "RESULT_LIMIT_BYTES": "60000"}  # fmt: skip
    with running_api(tmp_path / "worker.log", env, result_limit_bytes=60_000) as api:
        job_input = {"text": "A stream longer than the result limit.", **FAST, "max_new_tokens": 14,
                     "stream": True, "stream_chunk_ms": 200, "output_format": "pcm_16"}  # fmt: skip
        status, job = api.call("POST", "/run", {"input": job_input})
        assert status == 200
        items: list[dict] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, reply = api.call("GET", f"/stream/{job['id']}")
            items += [entry["output"] for entry in reply["stream"]]
            if reply["status"] in FINAL and not reply["stream"]:
                break
            time.sleep(0.05)
        summary = check_items(items)
        assert len(audio_of(items)) == 14 * 3200 * 2 > 60_000  # all the audio, past the limit
        final = api.call("GET", f"/status/{job['id']}")[1]
    assert final["status"] == "COMPLETED"
    *emptied, kept = final["output"]
    assert emptied == [{}] * summary["items"]
    assert kept == summary and "RunPod's 0.06 MB result limit" in kept["warnings"][-1]
