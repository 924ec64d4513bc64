"""The OpenAI bridge end to end, with unmodified OpenAI clients.

official `openai` SDK -> bridge in workerd (bridge/scripts/serve.js, Miniflare) -> RunPod API
emulator (tools/runpod_emulator.py) -> the SDK's real worker loop (`python handler.py`, tiny
checkpoint) -> audio back: streamed items through /stream, or whole files through moto's S3
server and a presigned URL. All on 127.0.0.1.

Nothing is mocked here; the model is the tiny random-weight checkpoint (no GPU and no real weights
on test machines), so the audio is noise of the right codec, rate and length. RunPod's rough edges
(RUNNING, split /stream backlogs, 429s, passing 5xx) come from the emulator's RunpodBehaviour
switches; clients that leave are real sockets that close.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import socket
import struct
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
from conftest import ROOT, free_port, make_volume, running_api

from runtime import lifetime
from tools.local_home import pinned_voice_names, write_demo_voices
from tools.runpod_emulator import RunpodEmulator

# One xdist worker runs this module (its fixtures start the emulator, a worker and the bridge).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bridge_e2e")]

BRIDGE_DIR = ROOT / "bridge"
# Tiny generations (VibeVoice settings the bridge passes through as extra body fields).
TINY = {"max_new_tokens": 4, "diffusion_steps": 3, "seed": 11}
# A job that runs for seconds on the tiny model: long enough to leave, or to occupy the worker.
LONG_TEXT = "Speaker 1: A job that keeps the worker busy for a while, sentence after sentence. " * 4
LONG = {"max_new_tokens": 300, "diffusion_steps": 3}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# OpenAI's voice names (its speech guide); the bridge maps each to a preset (bridge/src/openai_voices.js).
OPENAI_VOICE_NAMES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


@dataclass
class Bridge:
    base_url: str  # what OpenAI clients are given, ending in /v1
    token: str
    emulator: object  # tools.runpod_emulator.RunpodEmulator
    log_path: Path

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key or self.token, max_retries=0, timeout=120)

    def get_json(self, path: str, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key or self.token}"}
        request = urllib.request.Request(self.base_url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def job_status(self, job_id: str) -> str:
        """The job's status as RunPod (the emulator) sees it."""
        request = urllib.request.Request(
            f"{self.emulator.base_url}/status/{job_id}", headers={"Authorization": f"Bearer {self.emulator.api_key}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["status"]

    def jobs(self, text: str) -> list[dict]:
        """Every RunPod job submitted with this text: id, policy, status now."""
        return self.emulator.submissions(text)

    def wait_for_job(self, text: str, statuses: set[str], timeout: float = 60) -> dict:
        """The one job for `text`, once its status is in `statuses` (bounded in time)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(text)
            assert len(jobs) <= 1, jobs
            if jobs and jobs[0]["status"] in statuses:
                return jobs[0]
            assert time.monotonic() < deadline, f"job for {text!r} is {jobs and jobs[0]['status']}, not {statuses}"
            time.sleep(0.05)

    def open_speech(self, body: dict) -> socket.socket:
        """A speech request on a raw socket, its answer left unread (a client that may leave)."""
        host, port = self.base_url.removeprefix("http://").removesuffix("/v1").split(":")
        payload = json.dumps({"model": "tts-1", "voice": "alloy", **body}).encode()
        head = (
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(head.encode() + payload)
        return sock


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
        "MINIFLARE_WORKERD_PATH": str(ROOT / "tools" / "workerd_with_parent.py"),  # workerd dies with Node
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
def preset_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume with a synthetic voice under each reference voice's name, as `make serve`'s (and as a
    deployment fetches them): every preset the bridge offers by default exists."""
    home = make_volume(tmp_path_factory.mktemp("preset-volume"))
    write_demo_voices(home / "demo" / "voices", pinned_voice_names())
    return home


@pytest.fixture(scope="module")
def chain(
    tiny_model_dir: Path, preset_volume: Path, s3_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chain]:
    """The RunPod emulator and one worker (the SDK's real loop) that delivers through S3."""
    logs = tmp_path_factory.mktemp("bridge-e2e")
    worker_env = {
        "MODEL_PATH": str(tiny_model_dir),
        "VIBEVOICE_HOME": str(preset_volume),
        "DEVICE": "cpu",
        "S3_ENDPOINT_URL": s3_server.endpoint,
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "S3_BUCKET_NAME": s3_server.bucket,
        # Voice clips come as URLs to the bridge, which listens on 127.0.0.1 here.
        "VOICE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
        # One job at a time, so that one busy job keeps the next ones IN_QUEUE (busy_worker).
        "MAX_CONCURRENCY": "1",
    }
    with running_api(logs / "worker.log", worker_env) as api:
        yield Chain(api.emulator, logs)


# What every bridge here runs with, besides a fresh token; fixtures add their own settings.
BRIDGE_SETTINGS = {
    "POLL_INITIAL_MS": "100",
    "POLL_MAX_MS": "500",
    "STREAM_POLL_INITIAL_MS": "50",
    "STREAM_POLL_MAX_MS": "200",
    "JOB_TIMEOUT_SECONDS": "240",
    "RUNSYNC_WAIT_SECONDS": "2",
    "RETRY_BASE_MS": "50",
    "RETRY_MAX_MS": "500",
}


def running_bridge(chain: Chain, name: str, **settings: str) -> Iterator[Bridge]:
    token = "e2e-token-" + os.urandom(8).hex()
    log_path = chain.logs / f"{name}.log"
    options = {**BRIDGE_SETTINGS, "AUTH_TOKEN": token, **settings}
    process, origin = start_bridge(chain.emulator.base_url, chain.emulator.api_key, log_path, **options)
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
    deltas, done, event_lines = [], None, []
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
            if line.startswith("event: "):
                event_lines.append(line.removeprefix("event: "))
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            assert event_lines.pop() == event["type"]  # each event named on its own line first, as OpenAI sends
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


def test_every_openai_voice_name_speaks_on_a_fresh_bridge(bridge: Bridge) -> None:
    """`make bridge` with no voices.json: OpenAI's voice names are listed with their preset's name, and
    each gives audio in that preset's voice (the same text and seed: names sharing a preset give the
    same samples, names with different presets different ones)."""
    listed = {voice["id"]: voice["name"] for voice in bridge.get_json("/audio/voices")["voices"]}
    by_preset: dict[str, dict[str, np.ndarray]] = {}
    for name in OPENAI_VOICE_NAMES:
        label, _, preset = listed[name].partition(" (")
        assert label == name.capitalize() and preset.endswith(")"), listed[name]
        audio = bridge.client().audio.speech.create(
            model="tts-1", voice=name, input="Every voice, one sentence.", response_format="wav", extra_body=TINY
        )
        by_preset.setdefault(preset, {})[name] = probe(audio.content).samples
    assert len(by_preset) >= 4, by_preset.keys()
    firsts = []
    for preset, samples in by_preset.items():
        first = next(iter(samples.values()))
        assert all(np.array_equal(first, other) for other in samples.values()), preset
        firsts.append(first)
    assert all(not np.array_equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])


def test_models_and_voices_lists(bridge: Bridge) -> None:
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "vibevoice-7b"} <= {m.id for m in bridge.client().models.list()}
    voices = bridge.get_json("/audio/voices")["voices"]
    assert {"id": "alloy", "name": "Alloy (Alice)"}.items() <= voices[0].items()
    assert {voice["id"] for voice in voices} >= {"alloy", "echo", "onyx", "nova", "shimmer"}


def test_created_voice_is_usable_at_once_and_deletable(bridge: Bridge, preset_volume: Path) -> None:
    client = bridge.client()
    clip = preset_volume / "demo" / "voices" / "en-Frank_man.wav"
    consent = client.audio.voice_consents.create(
        name="Frank's consent", language="en-US", recording=("consent.wav", wav_bytes(24000, 1, 1.0), "audio/wav")
    )
    with clip.open("rb") as sample:
        voice = client.audio.voices.create(name="Frank's clone", audio_sample=sample, consent=consent.id)
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

    # The worker's limits, checked by the bridge before a job is queued (MAX_TEXT_LENGTH, PRESET_VOICES).
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input="a" * 5000, extra_body=TINY)
    assert caught.value.body["param"] == "input"
    assert caught.value.body["message"] == "'input' is 5000 characters long; the limit is 4096."
    assert bridge.jobs("a" * 5000) == []

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
    assert "signature=" not in log  # the bridge's own signed clip URLs


def test_health_needs_no_token(bridge: Bridge) -> None:
    with urllib.request.urlopen(bridge.base_url.removesuffix("/v1") + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["runpod"] == {"endpoint_configured": True, "api_key_configured": True}
    assert health["auth_required"] is True and health["keys_configured"] is True
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bridge.base_url + "/audio/voice_consents", timeout=10)
    assert caught.value.code == 401


def test_make_bridge_is_closed_without_a_key_and_makes_its_own(tmp_path: Path) -> None:
    """`make bridge` without AUTH_TOKEN or API_KEYS: no anonymous access; the script makes a key for
    the run and prints it on its console, and that key works."""
    log_path = tmp_path / "bridge.log"
    process, origin = start_bridge("http://127.0.0.1:9/v2/none", "key", log_path)
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{origin}/v1/audio/voice_consents", timeout=10)
        assert caught.value.code == 401
        key = log_path.read_text().split("this run's key: ", 1)[1].split()[0]
        request = urllib.request.Request(
            f"{origin}/v1/audio/voice_consents", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["data"] == []
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def owners_bridge(chain: Chain) -> Iterator[tuple[Bridge, dict[str, str]]]:
    """The bridge with keys for two owners in API_KEYS (as SHA-256 digests), beside AUTH_TOKEN."""
    keys = {"alice": "alice-" + os.urandom(8).hex(), "bob": "bob-" + os.urandom(8).hex()}
    digests = {owner: hashlib.sha256(key.encode()).hexdigest() for owner, key in keys.items()}
    for bridge in running_bridge(chain, "owners-bridge", API_KEYS=json.dumps(digests)):
        yield bridge, keys


def test_one_owners_voice_is_no_other_owners(owners_bridge: tuple[Bridge, dict[str, str]], preset_volume: Path) -> None:
    """Through the SDK and the whole chain: alice's voice clones for alice (the worker fetches the
    clip by a URL the bridge signed with CLIP_URL_SECRET at PUBLIC_URL); to bob it does not exist."""
    bridge, keys = owners_bridge
    alice, bob = bridge.client(api_key=keys["alice"]), bridge.client(api_key=keys["bob"])
    consent = alice.audio.voice_consents.create(
        name="Alice's consent", language="en-US", recording=("consent.wav", wav_bytes(24000, 1, 1.0), "audio/wav")
    )
    with pytest.raises(openai.NotFoundError):  # alice's consent is not bob's to give
        bob.audio.voices.create(name="Borrowed", audio_sample=("a.wav", wav_bytes(24000, 1, 1.0)), consent=consent.id)
    with (preset_volume / "demo" / "voices" / "en-Frank_man.wav").open("rb") as sample:
        voice = alice.audio.voices.create(name="Alice's clone", audio_sample=sample, consent=consent.id)
    audio = alice.audio.speech.create(
        model="tts-1", voice={"id": voice.id}, input="Mine.", response_format="flac", extra_body=TINY
    )
    assert probe(audio.content).codec == "flac"
    with pytest.raises(openai.NotFoundError):
        bob.audio.speech.create(model="tts-1", voice={"id": voice.id}, input="Not mine.", extra_body=TINY)
    with pytest.raises(openai.NotFoundError):
        bob.audio.voices.delete(voice.id)
    listed = bridge.get_json("/audio/voices", key=keys["bob"])["voices"]
    assert voice.id not in {entry["id"] for entry in listed}
    assert alice.audio.voices.delete(voice.id).deleted


# --- the bridge under RunPod's real behaviour ------------------------------------------------------


@pytest.fixture(scope="module")
def short_bridge(chain: Chain) -> Iterator[Bridge]:
    """A bridge that gives up on a job after 3 s (whole files)."""
    yield from running_bridge(chain, "short-bridge", STREAM_AUDIO="false", JOB_TIMEOUT_SECONDS="3")


def emulator_call(emulator: RunpodEmulator, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(emulator.base_url + path, data=data, headers=emulator.headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def busy_worker(bridge: Bridge) -> Iterator[None]:
    """The worker running a long job of its own, so that new jobs wait in the queue."""
    text = f"{LONG_TEXT} busy {os.urandom(4).hex()}"
    job = emulator_call(bridge.emulator, "POST", "/run", {"input": {"text": text, **LONG}})
    try:
        bridge.wait_for_job(text, {"IN_PROGRESS"})
        yield
    finally:
        emulator_call(bridge.emulator, "POST", f"/cancel/{job['id']}")


def leave(sock: socket.socket) -> None:
    """The client goes away: its connection is reset. (Locally, workerd takes a lone FIN for the
    half-close HTTP/1.1 allows, not a disconnect; on Cloudflare the edge ends the Worker's request
    when its client leaves.)"""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_some_body(sock: socket.socket) -> bytes:
    """Read until the reply's headers and some of its body have arrived; returns the headers."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 64:
        chunk = sock.recv(65536)
        assert chunk, f"the bridge closed the connection: {data[:300]!r}"
        data += chunk
    return data.partition(b"\r\n\r\n")[0]


DISCONNECT_MODES = {
    "whole file": ("whole_file_bridge", {"response_format": "wav"}),
    "whole file as SSE": ("bridge", {"response_format": "flac", "stream_format": "sse"}),
    "audio stream": ("bridge", {"response_format": "pcm", "stream_format": "audio"}),
    "SSE stream": ("bridge", {"response_format": "mp3", "stream_format": "sse"}),
}


@pytest.mark.fault
@pytest.mark.parametrize("mode", list(DISCONNECT_MODES))
def test_a_client_that_leaves_while_its_job_is_queued_cancels_it(mode: str, request: pytest.FixtureRequest) -> None:
    fixture, body = DISCONNECT_MODES[mode]
    bridge: Bridge = request.getfixturevalue(fixture)
    text = f"Queued, then left ({mode}) {os.urandom(4).hex()}."
    with busy_worker(bridge):
        sock = bridge.open_speech({"input": text, **body, **TINY})
        job = bridge.wait_for_job(text, {"IN_QUEUE"})
        assert job["policy"]["ttl"] == 270_000  # JOB_TIMEOUT_SECONDS 240 + TTL_MARGIN_SECONDS 30
        leave(sock)
        bridge.wait_for_job(text, {"CANCELLED"}, timeout=30)


@pytest.mark.fault
@pytest.mark.parametrize("mode", list(DISCONNECT_MODES))
def test_a_client_that_leaves_while_its_job_runs_cancels_it(mode: str, request: pytest.FixtureRequest) -> None:
    """Whole files: before the first byte, while the worker generates. Streams: after audio has
    started to arrive (the bridge's next write to the client fails, or request.signal aborts)."""
    fixture, body = DISCONNECT_MODES[mode]
    bridge: Bridge = request.getfixturevalue(fixture)
    text = f"{LONG_TEXT} Left while running ({mode}) {os.urandom(4).hex()}."
    sock = bridge.open_speech({"input": text, **body, **LONG})
    if "stream" in mode:
        assert b" 200 " in read_some_body(sock).split(b"\r\n")[0]
        sock.close()
    else:
        bridge.wait_for_job(text, {"IN_PROGRESS"})
        leave(sock)
    bridge.wait_for_job(text, {"CANCELLED"}, timeout=30)
    # The worker is free for the next job.
    audio = bridge.client().audio.speech.create(model="tts-1", voice="alloy", input="Next.", extra_body=TINY)
    assert probe(audio.content).codec == "mp3float"


def sse_audio(response) -> bytes:
    """The audio of a streamed speech response's SSE events; no event may be an error."""
    deltas = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            assert event["type"] != "error", event
            if event["type"] == "speech.audio.delta":
                deltas.append(base64.b64decode(event["audio"]))
    return b"".join(deltas)


def test_rough_runpod_is_survived_and_nothing_is_truncated(bridge: Bridge, whole_file_bridge: Bridge) -> None:
    """RUNNING, a /stream backlog split into replies of ~2 items, every third /status and /stream
    call failing with 503, and /status and /stream rate-limited to 4 calls a second: every reply
    is still whole, and each request ran exactly one job."""
    frames = 60
    rough = {"running_state": True, "stream_reply_bytes": 12_000, "transient_every": 3,
             "rate_limits": {"status": (4, 1.0), "stream": (4, 1.0)}}  # fmt: skip
    with bridge.emulator.behaving(**rough):
        text = f"Streamed through a rough RunPod {os.urandom(4).hex()}."
        pcm = bridge.client().audio.speech.create(
            model="tts-1", voice="alloy", input=text, response_format="pcm",
            extra_body={**TINY, "max_new_tokens": frames, "stream_chunk_ms": 100},
        )  # fmt: skip
        assert len(pcm.content) == frames * 3200 * 2
        assert [job["status"] for job in bridge.jobs(text)] == ["COMPLETED"]

        text = f"Events through a rough RunPod {os.urandom(4).hex()}."
        with bridge.client().audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=text, response_format="wav", stream_format="sse",
            extra_body={**TINY, "max_new_tokens": 20, "stream_chunk_ms": 100},
        ) as response:  # fmt: skip
            assert probe(sse_audio(response)).samples.size == 20 * 3200

        text = f"A whole file from a rough RunPod {os.urandom(4).hex()}."
        wav = whole_file_bridge.client().audio.speech.create(
            model="tts-1", voice="alloy", input=text, response_format="wav", extra_body=TINY
        )
        assert probe(wav.content).samples.size == 4 * 3200
        assert len(bridge.jobs(text)) == 1


def test_a_lost_stream_reply_is_filled_from_the_final_output(bridge: Bridge) -> None:
    """Every second /stream reply hands its items out and is then lost on the way (the emulator's
    lose_stream_every): the bridge takes the missing items from the job's final output on /status,
    so the audio is whole, in raw and SSE streams alike."""
    frames = 24
    with bridge.emulator.behaving(lose_stream_every=2):
        text = f"A stream with a lost reply {os.urandom(4).hex()}."
        pcm = bridge.client().audio.speech.create(
            model="tts-1", voice="alloy", input=text, response_format="pcm", stream_format="audio",
            extra_body={**TINY, "max_new_tokens": frames, "stream_chunk_ms": 100},
        )  # fmt: skip
        assert len(pcm.content) == frames * 3200 * 2
        with bridge.client().audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=f"Events with a lost reply {os.urandom(4).hex()}.",
            response_format="wav", stream_format="sse",
            extra_body={**TINY, "max_new_tokens": 12, "stream_chunk_ms": 100},
        ) as response:  # fmt: skip
            assert probe(sse_audio(response)).samples.size == 12 * 3200
    assert [job["status"] for job in bridge.jobs(text)] == ["COMPLETED"]


SDK_CODE = {"python": None, "node": "test/e2e/node-retries.mjs"}


def sdk_calls(sdk: str, bridge: Bridge, bodies: list[dict]) -> list[int]:
    """The HTTP status each request ended with, through the official SDK with its default retries."""
    if sdk == "node":
        result = subprocess.run(
            [shutil.which("node"), SDK_CODE["node"], bridge.base_url, json.dumps(bodies)],
            cwd=BRIDGE_DIR, env={**os.environ, "OPENAI_API_KEY": bridge.token},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        return [json.loads(line)["status"] for line in result.stdout.strip().splitlines()]
    client = openai.OpenAI(base_url=bridge.base_url, api_key=bridge.token, timeout=120)  # max_retries: 2
    named = {"model", "voice", "input", "response_format", "speed", "stream_format", "instructions"}
    statuses = []
    for body in bodies:
        try:
            client.audio.speech.create(
                **{k: v for k, v in body.items() if k in named},
                extra_body={k: v for k, v in body.items() if k not in named},
            )
            statuses.append(200)
        except openai.APIStatusError as error:
            statuses.append(error.status_code)
    return statuses


def unique(label: str) -> str:
    return f"{label} {os.urandom(4).hex()}."


@pytest.mark.fault
@pytest.mark.parametrize("sdk", list(SDK_CODE))
def test_sdk_retries_never_start_a_second_job(
    sdk: str, bridge: Bridge, whole_file_bridge: Bridge, short_bridge: Bridge
) -> None:
    """Every error the bridge can answer, through an official SDK with its default retries: at most
    one RunPod job per call, counted in the emulator."""
    base = {"model": "tts-1", "voice": "alloy", "response_format": "wav", **TINY}

    def run(server: Bridge, cases: list[tuple[dict, int, int]]) -> None:
        bodies = [{**base, **body} for body, _, _ in cases]
        assert sdk_calls(sdk, server, bodies) == [status for _, status, _ in cases]
        assert [len(server.jobs(body["input"])) for body in bodies] == [jobs for _, _, jobs in cases]

    run(bridge, [
        ({"input": unique("speed"), "speed": 9}, 400, 0),
        ({"input": unique("preset"), "voice": "nobody"}, 400, 0),
        ({"input": unique("voice id"), "voice": {"id": "voice_0123456789abcdef01234567"}}, 404, 0),
        ({"input": unique("too long") + "a" * 70_000}, 413, 0),
        ({"input": unique("worker check"), "diffusion_steps": 99}, 400, 1),
        ({"input": unique("fine")}, 200, 1),
    ])  # fmt: skip
    # RunPod refuses a submission (429): the bridge says 429 with Retry-After, the SDK waits and
    # tries again, and only the accepted submission is a job.
    with bridge.emulator.behaving(rate_limits={"run": (1, 2.0)}):
        run(bridge, [({"input": unique("first")}, 200, 1), ({"input": unique("rate-limited")}, 200, 1)])
    # /status and /stream always fail: the bridge retries, gives up, cancels, answers 502.
    with bridge.emulator.behaving(transient_every=1):
        run(whole_file_bridge, [({"input": f"{LONG_TEXT} {unique('status fails')}", **LONG}, 502, 1)])
        run(bridge, [({"input": unique("stream fails")}, 502, 1)])
    # The job outlives the bridge's deadline: 504, the job cancelled.
    run(short_bridge, [({"input": f"{LONG_TEXT} {unique('deadline')}", **LONG}, 504, 1)])
    # None of them is left running.
    assert not [job for job in bridge.emulator.submissions() if job["status"] in ("IN_QUEUE", "IN_PROGRESS")]


def test_open_webui_lists_the_preset_voices_without_a_token(bridge: Bridge) -> None:
    """Open WebUI fetches these without its key; with AUTH_TOKEN set, they still answer."""
    consent = bridge.client().audio.voice_consents.create(
        name="Clone's consent", language="en", recording=("consent.wav", wav_bytes(24000, 1, 1.0), "audio/wav")
    )
    created = bridge.client().audio.voices.create(
        name="Private clone", audio_sample=("clip.wav", wav_bytes(24000, 1, 2.0), "audio/wav"), consent=consent.id
    )
    with urllib.request.urlopen(bridge.base_url + "/audio/voices", timeout=10) as response:
        voices = json.loads(response.read())["voices"]
    ids = [voice["id"] for voice in voices]
    assert {"alloy", "echo", "en-Alice_woman", "en-Frank_man"} <= set(ids)
    assert created.id not in ids  # created voices are the token holders' own
    assert created.id in {voice["id"] for voice in bridge.get_json("/audio/voices")["voices"]}
    with urllib.request.urlopen(bridge.base_url + "/audio/models", timeout=10) as response:
        assert "tts-1" in {model["id"] for model in json.loads(response.read())["models"]}
    bridge.client().audio.voice_consents.delete(consent.id, extra_query={"delete_voice": "true"})
    assert created.id not in {voice["id"] for voice in bridge.get_json("/audio/voices")["voices"]}


def test_any_model_name_runs_and_the_reply_says_which(bridge: Bridge) -> None:
    response = bridge.client().audio.speech.with_raw_response.create(
        model="kokoro", voice="alloy", input="Any model.", response_format="wav",
        extra_body=TINY,
    )  # fmt: skip
    assert response.headers["x-vibevoice-model"] == "vibevoice-7b"
    assert response.headers["content-disposition"] == 'inline; filename="speech.wav"'
    assert probe(response.content).codec == "pcm_s16le"


def wav_bytes(rate: int, channels: int, seconds: float, subtype: str = "PCM_16") -> bytes:
    """A WAV file of a quiet tone with some noise."""
    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    tone = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.repeat(tone[:, None], channels, axis=1), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_consent_then_a_clip_over_the_old_7_mb_limit_clones_a_voice(bridge: Bridge) -> None:
    """OpenAI's two steps through the SDK: a consent recording, then a voice naming it. The 9.6 MB
    clip reaches the worker as a signed URL to the bridge, not inside the job."""
    client = bridge.client()
    consent = client.audio.voice_consents.create(
        name="Speaker's consent", language="en-US", recording=("consent.wav", wav_bytes(24000, 1, 1.0), "audio/wav")
    )
    assert consent.id.startswith("cons_") and consent.language == "en-US"
    assert client.audio.voice_consents.retrieve(consent.id).name == "Speaker's consent"
    big = wav_bytes(48000, 2, 25.0, "FLOAT")  # 25 s of 48 kHz stereo float: 9.6 MB
    assert 9_000_000 < len(big) <= 10 * 1024 * 1024
    voice = client.audio.voices.create(name="Big clip", audio_sample=("big.wav", big, "audio/wav"), consent=consent.id)
    text = f"In a voice from a large clip {os.urandom(4).hex()}."
    audio = client.audio.speech.create(
        model="tts-1", voice={"id": voice.id}, input=text, response_format="flac", extra_body=TINY
    )
    assert probe(audio.content).codec == "flac"
    assert [job["status"] for job in bridge.jobs(text)] == ["COMPLETED"]
    client.audio.voices.delete(voice.id)
    assert client.audio.voice_consents.delete(consent.id).deleted


def test_captions_come_back_with_whole_files_and_in_sse(bridge: Bridge) -> None:
    client = bridge.client()
    response = client.audio.speech.with_raw_response.create(
        model="tts-1",
        voice="alloy",
        input="With captions.",
        response_format="wav",
        extra_body={**TINY, "captions": "srt"},
    )
    captions = base64.b64decode(response.headers["x-vibevoice-captions"]).decode()
    assert captions.startswith("1\n00:00:00,000 --> ") and "With captions." in captions
    done = None
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Events with captions.", response_format="mp3", stream_format="sse",
        extra_body={**TINY, "captions": "vtt"},
    ) as streamed:  # fmt: skip
        for line in streamed.iter_lines():
            if line.startswith("data: ") and '"speech.audio.done"' in line:
                done = json.loads(line.removeprefix("data: "))
    assert done is not None and done["captions"].startswith("WEBVTT\n\n00:00:00.000 --> ")


# --- a cold start longer than the old deadline -------------------------------------------------------


def deployed_settings() -> dict:
    """The bridge's settings as `make bridge` and a deployment run them: wrangler.jsonc's vars, then
    bridge/src/config.js's defaults (read through the bridge's own loadConfig, by Node)."""
    script = (
        "import { readFileSync } from 'node:fs'; import { loadConfig } from './src/config.js';"
        "const text = readFileSync('wrangler.jsonc', 'utf8').replace(/^\\s*\\/\\/.*$/gm, '');"
        "console.log(JSON.stringify(loadConfig(JSON.parse(text).vars)));"
    )
    done = subprocess.run(
        [shutil.which("node"), "--input-type=module", "-e", script],
        cwd=BRIDGE_DIR, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# The longest later cold start docs/operations.md documents (scale from zero: a worker starting, loading
# the model, compiling): about ten minutes. The bridge's deadline was 300 s before it had to cover it.
DOCUMENTED_COLD_START_S = 600
OLD_DEADLINE_S = 300
# The test's clock runs this much faster: the emulated cold start and every duration of the bridge's
# (deadline, TTL margin, keep-alive interval) are divided by it; the worker's own work is tiny.
SCALE = 10


def test_a_cold_start_longer_than_the_old_deadline_gets_every_reply_whole(
    tiny_model_dir: Path, preset_volume: Path, tmp_path: Path
) -> None:
    """Requests sent while the endpoint's only worker has a cold start (the emulator holds its jobs in
    the queue until it ends, however soon the process is up): a bridge with the deployed defaults
    answers a whole file, a raw stream and an SSE stream that sends keep-alive comments while it waits;
    a bridge with the old 300 s deadline answers 504 and cancels its job. On a clock 10x faster."""
    for doc in (ROOT / "docs" / "operations.md", BRIDGE_DIR / "README.md"):
        assert "about 10 minutes" in doc.read_text(), f"{doc.name} documents the cold start this test covers"
    deployed = deployed_settings()
    assert deployed["JOB_TIMEOUT_SECONDS"] >= DOCUMENTED_COLD_START_S + 240  # the cold start and a long job
    assert DOCUMENTED_COLD_START_S > OLD_DEADLINE_S

    def scaled(**seconds: float) -> dict[str, str]:
        return {name: str(value / SCALE) for name, value in seconds.items()}

    timing = {
        "TTL_MARGIN_SECONDS": deployed["TTL_MARGIN_SECONDS"],
        "SSE_KEEPALIVE_SECONDS": deployed["SSE_KEEPALIVE_SECONDS"],
    }
    emulator = RunpodEmulator("test-key-" + os.urandom(6).hex()).start()
    chain = Chain(emulator, tmp_path)
    bridges, worker = [], None
    try:
        for name, deadline in (("cold-default", deployed["JOB_TIMEOUT_SECONDS"]), ("cold-old", OLD_DEADLINE_S)):
            bridges.append(running_bridge(chain, name, **scaled(JOB_TIMEOUT_SECONDS=deadline, **timing)))
        default, old = (next(bridge) for bridge in bridges)
        env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(preset_volume), "DEVICE": "cpu",
               "MAX_CONCURRENCY": "4", "VOICE_URL_ALLOWED_NETWORKS": "127.0.0.0/8"}  # fmt: skip
        cold = DOCUMENTED_COLD_START_S / SCALE
        worker = emulator.start_worker(env, log_path=tmp_path / "worker.log", cold_start_s=cold)
        started = time.monotonic()
        replies = cold_start_requests(default, old)
        assert time.monotonic() - started >= cold - 1
    finally:
        if worker:
            worker.stop()
        for bridge in bridges:
            bridge.close()
        emulator.stop()

    assert probe(replies["whole file"]).codec == "flac"
    assert len(replies["raw stream"]) == 4 * 3200 * 2  # 4 frames of 24 kHz s16le
    keep_alives, audio = replies["sse"]
    assert keep_alives >= 2 and probe(audio).codec == "mp3float"
    assert replies["old deadline"] == 504
    statuses = {entry["text"]: entry["status"] for entry in replies["jobs"]}
    assert [statuses[text] for text in COLD_TEXTS[:3]] == ["COMPLETED"] * 3
    assert statuses[COLD_TEXTS[3]] == "CANCELLED"


COLD_TEXTS = [f"After a cold start, {label}." for label in ("a whole file", "a raw stream", "events", "too late")]


def cold_start_requests(default: Bridge, old: Bridge) -> dict:
    """The four requests at once (sent during the cold start); what each client got."""
    from concurrent.futures import ThreadPoolExecutor

    def client(bridge: Bridge) -> openai.OpenAI:
        return openai.OpenAI(base_url=bridge.base_url, api_key=bridge.token, max_retries=0, timeout=300)

    def whole() -> bytes:
        return (
            client(default)
            .audio.speech.create(
                model="tts-1", voice="alloy", input=COLD_TEXTS[0], response_format="flac", extra_body=TINY
            )
            .content
        )

    def raw() -> bytes:
        with client(default).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=COLD_TEXTS[1], response_format="pcm", stream_format="audio",
            extra_body=TINY,
        ) as response:  # fmt: skip
            return response.read()

    def events() -> tuple[int, bytes]:
        keep_alives, deltas = 0, []
        with client(default).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=COLD_TEXTS[2], response_format="mp3", stream_format="sse",
            extra_body=TINY,
        ) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith(":") and not deltas:
                    keep_alives += 1
                elif line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    assert event["type"] != "error", event
                    if event["type"] == "speech.audio.delta":
                        deltas.append(base64.b64decode(event["audio"]))
        return keep_alives, b"".join(deltas)

    def too_late() -> int:
        try:
            client(old).audio.speech.create(
                model="tts-1", voice="alloy", input=COLD_TEXTS[3], response_format="flac", extra_body=TINY
            )
        except openai.APIStatusError as error:
            return error.status_code
        return 200

    with ThreadPoolExecutor(4) as pool:
        calls = {"whole file": whole, "raw stream": raw, "sse": events, "old deadline": too_late}
        futures = {name: pool.submit(call) for name, call in calls.items()}
        replies = {name: future.result(timeout=400) for name, future in futures.items()}
    replies["jobs"] = default.emulator.submissions()
    return replies
