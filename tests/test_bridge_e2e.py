"""The OpenAI bridge end to end, with unmodified OpenAI clients.

official `openai` SDK -> bridge in workerd (bridge/scripts/serve.js, Miniflare) -> RunPod API
emulator (tools/runpod_emulator.py) -> the SDK's real worker loop (`python handler.py`, tiny
checkpoint) -> audio back: streamed items through /stream, or whole files through moto's S3
server and a presigned URL. All on 127.0.0.1.

Nothing is mocked here; the model is the tiny random-weight checkpoint (no GPU and no real weights
on test machines), so the audio is noise of the right codec, rate and length.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
from audio_helpers import probe
from conftest import ROOT, free_port, running_api

import lifetime

pytestmark = pytest.mark.slow

BRIDGE_DIR = ROOT / "bridge"
# Tiny generations (VibeVoice settings the bridge passes through as extra body fields).
TINY = {"max_new_tokens": 4, "diffusion_steps": 3, "seed": 11}


@dataclass
class Bridge:
    base_url: str  # what OpenAI clients are given, ending in /v1
    token: str
    emulator: object  # tools.runpod_emulator.RunpodEmulator
    log_path: Path

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key or self.token, max_retries=0, timeout=120)

    def get_json(self, path: str) -> dict:
        request = urllib.request.Request(self.base_url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def job_status(self, job_id: str) -> str:
        """The job's status as RunPod (the emulator) sees it."""
        request = urllib.request.Request(
            f"{self.emulator.base_url}/status/{job_id}", headers={"Authorization": f"Bearer {self.emulator.api_key}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["status"]


def start_bridge(runpod_url: str, runpod_key: str, log_path: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """`node bridge/scripts/serve.js` (what `make bridge` runs) on a free port; returns (process, origin)."""
    node = shutil.which("node")
    if node is None or not (BRIDGE_DIR / "node_modules" / "miniflare").is_dir():
        pytest.fail("the bridge needs Node and its packages: run `make test` (it runs `npm ci` in bridge/)")
    port = free_port()
    env = {
        **os.environ,
        "BRIDGE_PORT": str(port),
        "RUNPOD_URL": runpod_url,
        "RUNPOD_API_KEY": runpod_key,
        "WRANGLER_SEND_METRICS": "false",
        "DO_NOT_TRACK": "1",
        **settings,
    }
    with log_path.open("ab") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [node, "scripts/serve.js"], cwd=BRIDGE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lifetime.die_with_parent,
        )  # fmt: skip
    origin = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the bridge exited during start-up:\n{log_path.read_text()[-2000:]}")
        # The line comes after the voices bucket is seeded (the port answers a little earlier).
        if "bridge: listening" in log_path.read_text():
            with urllib.request.urlopen(f"{origin}/health", timeout=10) as response:
                assert response.status == 200
            return process, origin
        if time.monotonic() > deadline:
            process.terminate()
            raise TimeoutError(f"the bridge did not start within 60 s:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)


@dataclass
class Chain:
    emulator: object  # tools.runpod_emulator.RunpodEmulator
    logs: Path


@pytest.fixture(scope="module")
def chain(tiny_model_dir: Path, volume: Path, s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """The RunPod emulator and one worker (the SDK's real loop) that delivers through S3."""
    logs = tmp_path_factory.mktemp("bridge-e2e")
    worker_env = {
        "MODEL_PATH": str(tiny_model_dir),
        "VIBEVOICE_HOME": str(volume),
        "DEVICE": "cpu",
        "S3_ENDPOINT_URL": s3_server.endpoint,
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "S3_BUCKET_NAME": s3_server.bucket,
    }
    with running_api(logs / "worker.log", worker_env) as api:
        yield Chain(api.emulator, logs)


def running_bridge(chain: Chain, name: str, **settings: str) -> Iterator[Bridge]:
    token = "e2e-token-" + os.urandom(8).hex()
    log_path = chain.logs / f"{name}.log"
    process, origin = start_bridge(
        chain.emulator.base_url,
        chain.emulator.api_key,
        log_path,
        AUTH_TOKEN=token,
        POLL_INITIAL_MS="100",
        POLL_MAX_MS="500",
        STREAM_POLL_INITIAL_MS="50",
        STREAM_POLL_MAX_MS="200",
        JOB_TIMEOUT_SECONDS="240",
        **settings,
    )
    try:
        yield Bridge(f"{origin}/v1", token, chain.emulator, log_path)
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def bridge(chain: Chain) -> Iterator[Bridge]:
    """The bridge as deployed by default (streams the formats the worker streams); AUTH_TOKEN on."""
    yield from running_bridge(chain, "bridge")


@pytest.fixture(scope="module")
def whole_file_bridge(chain: Chain) -> Iterator[Bridge]:
    """The bridge with STREAM_AUDIO=false: whole files through /runsync unless a stream is asked for."""
    yield from running_bridge(chain, "whole-file-bridge", STREAM_AUDIO="false")


CODECS = {
    "mp3": ("mp3float", 24000, "audio/mpeg"),
    "opus": ("opus", 48000, "audio/opus"),
    "aac": ("aac", 24000, "audio/aac"),
    "flac": ("flac", 24000, "audio/flac"),
    "wav": ("pcm_s16le", 24000, "audio/wav"),
}


@pytest.mark.parametrize("delivery", ["streamed", "whole file"])
@pytest.mark.parametrize("fmt", list(CODECS))
def test_every_format_decodes_to_the_claimed_codec(
    bridge: Bridge, whole_file_bridge: Bridge, fmt: str, delivery
) -> None:
    """Streamed: mp3, opus and wav come from /run + /stream (aac and flac are always whole files);
    whole file: /runsync, the audio downloaded from S3 through the worker's presigned URL."""
    codec, rate, content_type = CODECS[fmt]
    server = bridge if delivery == "streamed" else whole_file_bridge
    response = server.client().audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input="Hello from the bridge.", response_format=fmt, extra_body=TINY
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-runpod-job-id"]
    info = probe(response.content)
    assert (info.codec, info.sample_rate, info.channels) == (codec, rate, 1)
    assert 0.4 < info.duration < 1.0  # 4 frames of 133 ms, plus codec padding


def test_pcm_is_raw_24khz_s16le_mono(bridge: Bridge) -> None:
    client = bridge.client()
    text = "The same words in two formats."
    wav = client.audio.speech.create(model="tts-1", voice="echo", input=text, response_format="wav", extra_body=TINY)
    pcm = client.audio.speech.create(model="tts-1", voice="echo", input=text, response_format="pcm", extra_body=TINY)
    assert pcm.response.headers["content-type"] == "audio/pcm"
    raw = pcm.content
    assert raw[:4] not in (b"RIFF", b"ID3\x03", b"fLaC", b"OggS") and len(raw) % 2 == 0
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768
    # Same seed, same text: the pcm samples are the wav file's samples, without the header.
    reference = probe(wav.content)
    assert reference.sample_rate == 24000
    assert samples.size == reference.samples.size
    np.testing.assert_allclose(samples, reference.samples, atol=1 / 32768)


def test_streaming_response_receives_bytes_before_the_job_completes(bridge: Bridge) -> None:
    client = bridge.client()
    frames = 60
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input="Streaming through the bridge, piece by piece.",
        response_format="pcm",
        extra_body={**TINY, "max_new_tokens": frames, "stream_chunk_ms": 100},
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        job_id = response.headers["x-runpod-job-id"]
        pieces = response.iter_bytes()
        first = next(pieces)
        status_at_first_bytes = bridge.job_status(job_id)
        audio = first + b"".join(pieces)
    assert first
    assert status_at_first_bytes == "IN_PROGRESS"
    assert bridge.job_status(job_id) == "COMPLETED"
    assert len(audio) == frames * 3200 * 2  # 3200 samples (133 ms at 24 kHz) per frame, 16-bit


def test_sse_stream_parses(bridge: Bridge) -> None:
    text = "Server-sent events."
    deltas, done = [], None
    with bridge.client().audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="nova",
        input=text,
        response_format="mp3",
        stream_format="sse",
        extra_body={**TINY, "max_new_tokens": 12, "stream_chunk_ms": 200},
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["type"] == "speech.audio.delta":
                deltas.append(base64.b64decode(event["audio"]))
            else:
                assert done is None and event["type"] == "speech.audio.done"
                done = event
    assert len(deltas) > 1 and done is not None
    info = probe(b"".join(deltas))
    assert (info.codec, info.sample_rate) == ("mp3float", 24000)
    duration = 12 * 3200 / 24000
    assert done["usage"]["input_tokens"] == len(text)
    assert done["usage"]["output_tokens"] == math.ceil(duration * 7.5)
    assert done["usage"]["total_tokens"] == len(text) + done["usage"]["output_tokens"]


def test_speed_changes_the_duration(bridge: Bridge) -> None:
    client = bridge.client()
    durations = {}
    for speed in (1.0, 2.0):
        audio = client.audio.speech.create(
            model="tts-1-hd", voice="alloy", input="Faster.", response_format="wav", speed=speed, extra_body=TINY
        )
        durations[speed] = probe(audio.content).duration
    assert durations[2.0] == pytest.approx(durations[1.0] / 2, rel=0.05)


def test_node_sdk_gets_audio(bridge: Bridge, tmp_path: Path) -> None:
    output = tmp_path / "node.wav"
    result = subprocess.run(
        [shutil.which("node"), "test/e2e/node-client.mjs", bridge.base_url, str(output), "alloy"],
        cwd=BRIDGE_DIR,
        env={**os.environ, "OPENAI_API_KEY": bridge.token},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"status": 200, "contentType": "audio/wav"}
    assert probe(output.read_bytes()).codec == "pcm_s16le"


def test_models_and_voices_lists(bridge: Bridge) -> None:
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "vibevoice-7b"} <= {m.id for m in bridge.client().models.list()}
    voices = bridge.get_json("/audio/voices")["voices"]
    assert {"id": "alloy", "name": "Alloy (Alice)"}.items() <= voices[0].items()
    assert {voice["id"] for voice in voices} >= {"alloy", "echo", "onyx", "nova", "shimmer"}


def test_created_voice_is_usable_at_once_and_deletable(bridge: Bridge, volume: Path) -> None:
    client = bridge.client()
    clip = volume / "demo" / "voices" / "en-Frank_man.wav"
    with clip.open("rb") as sample:
        voice = client.audio.voices.create(name="Frank's clone", audio_sample=sample, consent="cons_local")
    assert voice.id.startswith("voice_") and voice.name == "Frank's clone" and voice.object == "audio.voice"
    assert voice.id in {entry["id"] for entry in bridge.get_json("/audio/voices")["voices"]}

    for reference in ({"id": voice.id}, voice.id):
        audio = client.audio.speech.create(
            model="tts-1", voice=reference, input="A cloned voice.", response_format="flac", extra_body=TINY
        )
        assert probe(audio.content).codec == "flac"

    deleted = client.audio.voices.delete(voice.id)
    assert deleted.deleted and deleted.id == voice.id
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.speech.create(model="tts-1", voice={"id": voice.id}, input="Gone.", extra_body=TINY)
    assert caught.value.body["param"] == "voice"


def test_errors_have_openai_shape(bridge: Bridge) -> None:
    client = bridge.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Too fast.", speed=9)
    assert caught.value.body["param"] == "speed"

    # The worker's own validation sentences, passed through with OpenAI's parameter names.
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input="x", extra_body={**TINY, "diffusion_steps": 99})
    assert caught.value.body["param"] == "diffusion_steps"
    assert caught.value.body["message"] == "'diffusion_steps' must be an integer from 1 to 50 (got 99)."

    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="nobody", input="Who?", extra_body=TINY)
    assert caught.value.body["param"] == "voice"
    assert "available voices" in caught.value.body["message"]

    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input="a" * 2500, extra_body=TINY)
    assert caught.value.body["param"] == "input"
    assert caught.value.body["message"] == "'text' is 2500 characters long; the limit is 2000."

    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="tts-1", voice={"id": "voice_0123456789abcdef01234567"}, input="x")
    with pytest.raises(openai.AuthenticationError):
        bridge.client(api_key="wrong").audio.speech.create(model="tts-1", voice="alloy", input="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")

    # The worker still serves after all that.
    audio = client.audio.speech.create(
        model="tts-1", voice="alloy", input="Still here.", response_format="wav", extra_body=TINY
    )
    assert probe(audio.content).codec == "pcm_s16le"


def test_secrets_stay_out_of_the_bridge_log(bridge: Bridge) -> None:
    log = bridge.log_path.read_text()
    assert bridge.token not in log
    assert bridge.emulator.api_key not in log
    assert "X-Amz-Signature" not in log


def test_health_needs_no_token(bridge: Bridge) -> None:
    with urllib.request.urlopen(bridge.base_url.removesuffix("/v1") + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["runpod"] == {"endpoint_configured": True, "api_key_configured": True}
    assert health["auth_required"] is True
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bridge.base_url + "/models", timeout=10)
    assert caught.value.code == 401
