"""The worker behind the runpod SDK's own local modes, as separate processes on 127.0.0.1.

- `handler.py --rp_serve_api`: the SDK's FastAPI server (`/runsync`, `/run` + `/status`).
- `handler.py --test_input`: the SDK's one-job test mode, as `make run` uses it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from audio_helpers import check_audio, encode_file, probe, tone
from conftest import ROOT, free_port

from tools import run_job as run_job_tool

# One xdist worker runs this module (its fixtures start the SDK's local API server).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("runpod_local")]
FAST = {"max_new_tokens": 4, "diffusion_steps": 3}


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture(scope="module")
def sdk_server(tiny_model_dir: Path, volume: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:  # the SDK's server has no health route: poll its OpenAPI document
            assert process.poll() is None, "the worker exited during start-up"
            try:
                with urllib.request.urlopen(f"{base}/openapi.json", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the SDK server did not start within 120 s") from None
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_runsync_returns_decodable_audio(sdk_server: str) -> None:
    reply = post(f"{sdk_server}/runsync", {"input": {"text": "Through the SDK server.", **FAST}})
    assert reply["status"] == "COMPLETED"
    item = check_audio(reply["output"])
    assert item["duration_sec"] == pytest.approx(4 * 3200 / 24000, abs=1e-3)


def test_run_then_status(sdk_server: str) -> None:
    job = post(f"{sdk_server}/run", {"input": {"text": "Queued job.", "output_format": "wav", **FAST}})
    assert job["status"] == "IN_PROGRESS"
    reply = post(f"{sdk_server}/status/{job['id']}", {})
    assert reply["status"] == "COMPLETED"
    check_audio(reply["output"])


CLONE = base64.b64encode(encode_file(tone(200, 1.0, 16000), 16000, "flac", "flac")).decode()
CONTRACT = {
    "multi-speaker script with a cloned voice": {
        "text": "Speaker 1: Hello.\nSpeaker 2: Hi there.",
        "speakers": ["Alice", {"audio_base64": CLONE}],
        "output_format": "wav",
    },
    "single-speaker clone shorthand": {"text": "Cloned.", "voice_audio_base64": CLONE, "output_format": "mp3"},
    "opus at 48 kHz": {"text": "Opus.", "output_format": "opus"},
    "aac at 44.1 kHz": {"text": "AAC.", "output_format": "aac", "sample_rate": 44100, "bitrate_kbps": 96},
    "flac at 16 kHz, slower, captions": {"text": "Slow.", "output_format": "flac", "sample_rate": 16000,
                                         "speed": 0.5, "captions": "vtt"},
    "raw pcm": {"text": "Raw.", "output_format": "pcm"},
}  # fmt: skip
CODECS = {"wav": "pcm_s16le", "mp3": "mp3float", "opus": "opus", "aac": "aac", "flac": "flac"}


@pytest.mark.parametrize("feature", sorted(CONTRACT))
def test_job_contract_through_the_sdk_server(sdk_server: str, feature: str) -> None:
    reply = post(f"{sdk_server}/runsync", {"input": {**CONTRACT[feature], "seed": 11, **FAST}})
    assert reply["status"] == "COMPLETED", reply
    [item] = reply["output"]
    data = base64.b64decode(item["audio_base64"])
    if item["format"] == "pcm_16":
        assert abs(len(data) / 2 / 24000 - item["duration_sec"]) < 1e-3
        return
    info = probe(data)
    assert info.codec == CODECS[item["format"]] and info.sample_rate == item["sample_rate"] and info.channels == 1
    assert abs(info.duration - item["duration_sec"]) < 0.1
    if "captions" in CONTRACT[feature]:
        assert item["captions"].startswith("WEBVTT")
    if "speakers" in CONTRACT[feature]:
        assert [s["speakers"] for s in item["segments"]] == [["Speaker 1", "Speaker 2"]]


def test_list_voices_through_the_sdk_server(sdk_server: str) -> None:
    reply = post(f"{sdk_server}/runsync", {"input": {"action": "list_voices"}})
    assert [voice["name"] for voice in reply["output"][0]["voices"]] == ["en-Alice_woman", "en-Frank_man"]


@pytest.mark.parametrize(
    ("job_input", "fragment"),
    [
        ({}, "'text' is required"),
        ({"text": ""}, "'text' is empty"),
        ({"text": "x" * 4097}, "the limit is 4096"),
        ({"text": 12}, "'text' must be a string"),
        ({"text": "hi", "volume": 11}, "Unknown field 'volume'"),
        ({"text": "hi", "speaker": "Nobody"}, "available voices: en-Alice_woman, en-Frank_man"),
        ({"text": "hi", "cfg_scale": 0}, "'cfg_scale' must be greater than 0 and at most 10"),
        ({"text": "hi", "cfg_scale": 1000}, "'cfg_scale' must be greater than 0 and at most 10"),
        ({"text": "hi", "output_format": "midi"}, "'output_format' must be"),
    ],
)
def test_bad_input_fails_with_one_sentence(sdk_server: str, job_input: dict, fragment: str) -> None:
    reply = post(f"{sdk_server}/runsync", {"input": job_input})
    assert reply["status"] == "FAILED"
    assert fragment in reply["error"]
    assert "\n" not in reply["error"] and "Traceback" not in reply["error"]


def test_worker_keeps_serving_after_failures(sdk_server: str) -> None:
    assert post(f"{sdk_server}/runsync", {"input": {"text": ""}})["status"] == "FAILED"
    assert post(f"{sdk_server}/runsync", {"input": {"text": "Still here.", **FAST}})["status"] == "COMPLETED"


def test_test_input_mode_runs_one_real_job(tiny_model_dir: Path, volume: Path) -> None:
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu"}
    job = {"input": {"text": "Speaker 1: Local test.\nSpeaker 2: Mode.", "speakers": ["Alice", "Frank"], **FAST}}
    output, log, _ = run_job_tool.run(job, env, timeout=300)
    item = check_audio(output)
    assert item["chunks"] == 1
    assert "Job local_test completed successfully" in log


def test_test_input_mode_reports_failure(tiny_model_dir: Path, volume: Path) -> None:
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu"}
    with pytest.raises(RuntimeError, match="the job failed"):
        run_job_tool.run({"input": {"text": ""}}, env, timeout=300)


@pytest.mark.fault
def test_model_load_failure_exits_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_PATH": str(tmp_path), "VIBEVOICE_HOME": str(tmp_path)}
    process = subprocess.run(
        [sys.executable, "handler.py", "--test_input", '{"input": {"text": "hi"}}'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode == 1
    assert process.stderr.strip().splitlines()[-1] == (
        f"vibevoice worker: model failed to load: MODEL_PATH {tmp_path} has no config.json."
    )


def test_invalid_setting_exits_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MAX_TEXT_LENGTH": "many"}
    process = subprocess.run(
        [sys.executable, "handler.py", "--test_input", '{"input": {"text": "hi"}}'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode == 2
    assert "Invalid setting MAX_TEXT_LENGTH" in process.stderr.strip().splitlines()[-1]
