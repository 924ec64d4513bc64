"""Planning: validated input -> chunks, one reference voice per speaker, generation parameters.

Real parts: the job schema, the text chunker and the voice library on a volume with two demo voices.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from audio_helpers import encode_file, tone

from jobs.planning import JobError, plan_job
from jobs.schema import parse_job_input
from jobs.voices import VoiceLibrary


@pytest.fixture()
def plan(settings):
    library = VoiceLibrary.for_settings(settings)

    def make(job_input: dict, **overrides):
        used = settings.model_copy(update=overrides) if overrides else settings
        return plan_job(parse_job_input(job_input, used), used, library)

    return make


def test_a_plain_text_gets_the_default_voice_and_the_deployment_defaults(plan, settings) -> None:
    planned = plan({"text": "One sentence. " * 40})
    assert list(planned.voices) == [0]
    alice = VoiceLibrary.for_settings(settings).load("Alice")
    assert np.array_equal(planned.voices[0], alice)
    assert len(planned.chunks) > 1 and all(len(chunk.turns[0].text) <= 300 for chunk in planned.chunks)
    assert (planned.output_format, planned.sample_rate, planned.bitrate_kbps) == ("mp3", 24000, 128)
    assert (planned.params.cfg_scale, planned.params.diffusion_steps) == (1.3, None)  # None: the engine's count
    assert planned.params.use_voice_prompt and planned.target_lufs == -20.0 and planned.warnings == []
    assert 0 <= planned.params.seed < 2**32  # drawn when the job gives none
    assert planned.format.content_type == "audio/mpeg"


def test_a_script_gets_one_voice_per_speaker_in_label_order(plan) -> None:
    clone = encode_file(tone(180, 2.0, 16000), 16000, "wav", "pcm_s16le")
    planned = plan(
        {
            "text": "Speaker 1: Hi.\nSpeaker 2: Hello.\nSpeaker 1: Bye.",
            "speakers": ["Frank", {"audio_base64": base64.b64encode(clone).decode()}],
            "seed": 5,
        }
    )
    assert sorted(planned.voices) == [0, 1] and planned.params.seed == 5
    assert planned.voices[1].size == 48000  # 2 s at the model's 24 kHz
    assert planned.characters == len("Hi.") + len("Hello.") + len("Bye.")


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        (
            {"text": "Speaker 1: Hi.\nSpeaker 2: Yo.", "speakers": ["Alice"]},
            "'speakers' gives 1 voice\\(s\\), but 'text' uses Speaker 2",
        ),
        ({"text": "Speaker 1: Hi.\nSpeaker 2: Yo."}, "has 2 speakers"),
        ({"text": "Just text.", "speakers": ["Alice"]}, "'speakers' needs a script"),
        ({"text": "Hi.", "speaker": "Nobody"}, "'speaker'"),
    ],
)
def test_voice_problems_are_one_sentence_naming_the_field(plan, job_input, message) -> None:
    with pytest.raises(JobError, match=message):
        plan(job_input)


def test_unused_and_ignored_voices_are_warned_about(plan) -> None:
    unused = plan({"text": "Speaker 1: Hi.", "speakers": ["Alice", "Frank"]})
    assert unused.warnings == ["speakers[1] not used: the text has no line for that speaker."]
    ignored = plan({"text": "Hi.", "speaker": "Frank", "disable_prefill": True})
    assert ignored.voices == {} and not ignored.params.use_voice_prompt
    assert ignored.warnings == ["disable_prefill is set, so the given voices were not used."]


def test_streamed_jobs_carry_their_item_length(plan) -> None:
    assert plan({"text": "Hi.", "stream": True}).stream_chunk_ms == 400
    assert plan({"text": "Hi.", "stream": True, "stream_chunk_ms": 1000}).stream_chunk_ms == 1000
    assert plan({"text": "Hi."}).stream_chunk_ms is None
