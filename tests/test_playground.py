"""The bridge's web playground in a real browser.

Headless Chromium (Debian's `chromium` package) driven by playwright-core through
bridge/test/browser/playground.mjs -> the page served by `make bridge`'s script (workerd) -> the
RunPod emulator (`make serve`) -> the SDK's real worker loop with the tiny checkpoint. All on
127.0.0.1. The browser runs every scenario once (a module fixture, about half a minute); each test
checks one part of what it saw. Screenshots, downloads and the raw results go to
.local/playground/ (git-ignored).

What is not real: the model (random weights, so the audio is noise of the right length and codec;
the aligner still places every word in order inside it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile
from audio_helpers import probe
from conftest import ROOT, running_api
from test_bridge_e2e import BRIDGE_DIR, start_bridge

from runtime import lifetime
from tools.local_home import synthetic_voice

# One xdist worker runs this module (its fixtures start the emulator, a worker and the bridge).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("playground")]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
OUT = ROOT / ".local" / "playground"
FRAME_SECONDS = 3200 / 24000  # one VibeVoice frame of audio at 24 kHz


@dataclass
class Run:
    results: dict  # scenario -> what the browser saw (see playground.mjs)
    token: str
    page_headers: dict[str, str]
    page_html: str


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    node = shutil.which("node")
    if not Path(CHROMIUM).exists() or node is None or not (BRIDGE_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("the browser tests need Debian's chromium and the bridge's npm packages: run `make test`")
    logs = tmp_path_factory.mktemp("playground")
    clip = logs / "clip.wav"  # a speech-like reference clip (glottal pulses through formants), 3 s
    soundfile.write(clip, synthetic_voice(150.0, 5, seconds=3.0), 24000, subtype="PCM_16")
    shutil.rmtree(OUT, ignore_errors=True)
    token = "playground-token-" + os.urandom(8).hex()
    worker_env = {
        "MODEL_PATH": str(tiny_model_dir),
        "VIBEVOICE_HOME": str(volume),
        "DEVICE": "cpu",
        # Created voices reach the worker as signed URLs to the bridge, on 127.0.0.1 here (as with make serve).
        "VOICE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    with running_api(logs / "worker.log", worker_env) as api:
        process, origin = start_bridge(
            api.base_url,
            api.api_key,
            logs / "bridge.log",
            AUTH_TOKEN=token,
            STREAM_POLL_INITIAL_MS="50",
            STREAM_POLL_MAX_MS="200",
            JOB_TIMEOUT_SECONDS="120",
        )
        try:
            with urllib.request.urlopen(origin + "/", timeout=10) as response:
                headers, html = dict(response.headers), response.read().decode()
            browser = subprocess.run(
                [node, "test/browser/playground.mjs", origin, str(OUT)],
                cwd=BRIDGE_DIR,
                env={**os.environ, "BRIDGE_TOKEN": token, "CLIP": str(clip), "CHROMIUM": CHROMIUM},
                capture_output=True,
                text=True,
                timeout=300,
                preexec_fn=lifetime.die_with_parent,  # node, and with it Chromium, end with the tests
            )
        finally:
            process.terminate()
            process.wait(timeout=20)
    assert browser.returncode == 0, browser.stderr[-3000:]
    return Run(json.loads((OUT / "results.json").read_text()), token, headers, html)


def scenario(run: Run, name: str) -> dict:
    result = run.results[name]
    assert result["ok"], result.get("error")
    return result


def test_plain_job_plays_while_it_is_generated(run: Run) -> None:
    plain = scenario(run, "plain")
    assert plain["state"] == "done" and plain["error"] == "" and plain["status"].startswith("Done: ")
    # The first sound came before the job's last audio arrived, and the player played > 0.5 s.
    assert plain["firstSoundMs"] < plain["streamEndMs"]
    assert plain["playedSeconds"] > 0.5
    assert plain["tabs"] < 40  # Speak was reached with the Tab key and pressed with Enter
    assert plain["console"] == []  # no script errors, no CSP violations
    assert (OUT / "playground.png").stat().st_size > 10_000


def test_every_api_call_sends_the_token(run: Run) -> None:
    requests = scenario(run, "plain")["requests"]
    assert {(r["method"], r["path"]) for r in requests} == {("GET", "/v1/audio/voices"), ("POST", "/v1/audio/speech")}
    assert all(r["authorization"] == f"Bearer {run.token}" for r in requests)
    assert run.token not in run.page_html


def test_download_is_a_named_mp3_that_decodes(run: Run) -> None:
    download = scenario(run, "plain")["download"]
    assert re.fullmatch(r"vibevoice-alloy-\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d\.mp3", download["suggested"])
    info = probe(Path(download["path"]).read_bytes())
    assert (info.codec, info.sample_rate, info.channels) == ("mp3float", 24000, 1)
    assert info.duration == pytest.approx(60 * FRAME_SECONDS, abs=0.15)  # 60 frames, plus encoder padding


def test_wav_streams_through_web_audio_and_downloads_with_real_sizes(run: Run) -> None:
    result = scenario(run, "wav")
    assert result["state"] == "done" and result["firstSoundMs"] < result["streamEndMs"]
    assert result["download"]["suggested"].endswith(".wav")
    path = Path(result["download"]["path"])
    with wave.open(str(path)) as file:  # the streamed header's sizes (0xFFFFFFFF) were replaced
        assert (file.getframerate(), file.getnchannels(), file.getsampwidth()) == (24000, 1, 2)
        assert file.getnframes() == 45 * 3200
    assert path.stat().st_size == 44 + 45 * 3200 * 2


def test_voice_lifecycle(run: Run) -> None:
    result = scenario(run, "voice")
    voice_id = result["created"]["picked"]
    assert result["created"]["error"] == "" and re.fullmatch(r"voice_[0-9a-f]{24}", voice_id)
    assert voice_id in result["listedAfterCreate"]
    assert result["job"]["state"] == "done", result["job"]["error"]
    assert result["sentVoice"] == {"id": voice_id}
    assert voice_id not in result["optionsAfterDelete"] and voice_id not in result["listedAfterDelete"]


def test_voice_recorded_from_the_microphone(run: Run) -> None:
    """Chromium's fake microphone (a beep) -> MediaRecorder's WebM/Opus -> a voice the worker decodes."""
    result = scenario(run, "recording")
    assert result["created"]["error"] == "" and result["created"]["picked"].startswith("voice_")
    assert result["job"]["state"] == "done", result["job"]["error"]


def test_two_speaker_script(run: Run) -> None:
    result = scenario(run, "script")
    assert result["labels"] == ["Speaker 1 voice", "Speaker 2 voice"]
    assert result["sent"] == {"speakers": ["alloy", "echo"], "voice": None}
    # The worker refuses a two-speaker script without a voice for each: it got both.
    assert result["state"] == "done", result["error"]
    assert result["playedSeconds"] > 0.5


def test_errors_show_the_bridges_sentence(run: Run) -> None:
    result = scenario(run, "errors")
    limit = result["limit"]
    assert limit == 4096
    assert result["counter"] == f"{limit + 904} / {limit} characters: 904 over the limit."
    assert result["tooLong"]["state"] == "failed"
    assert result["tooLong"]["error"] == f"'input' is {limit + 904} characters long; the limit is {limit}."
    assert result["wrongToken"] == {"error": "Incorrect bearer token.", "dialogOpen": True, "stored": 0}


def test_word_highlighting_follows_the_audio(run: Run) -> None:
    """`"timestamps": true` through the bridge to the worker's aligner and back: every word of the
    text is shown, and each is marked while it plays."""
    result = scenario(run, "words")
    assert result["sent"]["timestamps"] is True and "stream_format" not in result["sent"]
    assert result["job"]["state"] == "done", result["job"]["error"]
    assert result["shown"] == ["One", "two", "three."]
    assert sorted(result["marked"]) == sorted(result["shown"])


def test_accessibility_and_phone_layout(run: Run) -> None:
    plain, phone = scenario(run, "plain"), scenario(run, "phone")
    assert plain["axeBefore"] == [] and plain["axeAfter"] == []
    assert phone["axe"] == []  # a 390 px wide screen in dark mode
    assert phone["overflow"] <= 0  # nothing wider than the screen
    assert phone["visibleBeforeAJob"] == {"download": False, "transcript": False}


def test_security_headers(run: Run) -> None:
    headers = {name.lower(): value for name, value in run.page_headers.items()}
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
