"""The smallest job on a volume with and without the default voice.

Mocked: nothing. The jobs run through Worker.collect on the tiny checkpoint; the volume folders are
real (an empty voices folder stands for a deployment whose voice download failed).
"""

from __future__ import annotations

import base64
import io

import soundfile
from conftest import make_volume

SMALLEST = {"text": "Hello!", "output_format": "wav", "max_new_tokens": 3, "diffusion_steps": 2, "seed": 5}


def voice_warnings(result: dict) -> list[str]:
    return [warning for warning in result.get("warnings", []) if "voice" in warning]


def decoded_seconds(result: dict) -> float:
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(result["audio_base64"])))
    return samples.size / rate


def test_smallest_job_uses_the_default_voice(run_job):
    result = run_job(SMALLEST)[0]
    assert result["status"] == "completed" and not voice_warnings(result), result
    assert decoded_seconds(result) > 0.3


def test_smallest_job_without_any_voice_runs_without_a_voice_prompt_and_warns(run_job, make_worker, tmp_path):
    empty = tmp_path / "vibevoice"
    (empty / "demo" / "voices").mkdir(parents=True)
    worker = make_worker(vibevoice_home=empty)
    result = run_job(SMALLEST, worker=worker)[0]
    assert result["status"] == "completed", result
    assert voice_warnings(result) == [
        "no voice was given and the default voice 'Alice' is not in the voices folder, so the audio was generated "
        "without a voice prompt (the model picks a voice)."
    ]
    assert decoded_seconds(result) > 0.3

    # The same text with the voice prompt disabled on purpose gives the same audio: no voice was used.
    plain = run_job({**SMALLEST, "disable_prefill": True}, worker=worker)[0]
    assert plain["audio_base64"] == result["audio_base64"]

    # Listing the voices shows the folder as it is.
    assert run_job({"action": "list_voices"}, worker=worker) == [{"voices": []}]


def test_a_named_voice_that_is_missing_still_fails(run_job, make_worker, tmp_path):
    empty = tmp_path / "vibevoice"
    (empty / "demo" / "voices").mkdir(parents=True)
    result = run_job({**SMALLEST, "speaker": "Alice"}, worker=make_worker(vibevoice_home=empty))
    assert result == {"error": "'speaker': unknown voice 'Alice'; available voices: none (the voices folder is empty)."}


def test_another_default_voice_is_used_when_it_is_there(run_job, make_worker, tmp_path):
    home = make_volume(tmp_path / "vibevoice")
    worker = make_worker(vibevoice_home=home, default_speaker="Frank")
    frank = run_job(SMALLEST, worker=worker)[0]
    alice = run_job({**SMALLEST, "speaker": "Alice"}, worker=worker)[0]
    named_frank = run_job({**SMALLEST, "speaker": "en-Frank_man"}, worker=worker)[0]
    assert not voice_warnings(frank) and frank["audio_base64"] == named_frank["audio_base64"]
    assert frank["audio_base64"] != alice["audio_base64"]
