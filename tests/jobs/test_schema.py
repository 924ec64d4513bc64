"""The job input schema: valid inputs resolve their defaults; invalid ones get one sentence."""

from __future__ import annotations

import pytest

from jobs.schema import InputError, parse_job_input

# (input, the field the message must name, a fragment of what is allowed)
BAD_INPUTS = [
    ({}, "'text'", "is required"),
    ({"text": ""}, "'text'", "is empty"),
    ({"text": " \n\t "}, "'text'", "is empty"),
    ({"text": "x" * 4097}, "'text'", "the limit is 4096"),
    ({"text": 42}, "'text'", "must be a string"),
    ({"text": ["a"]}, "'text'", "must be a string"),
    ({"text": "hi", "colour": "red"}, "'colour'", "allowed fields are"),
    ({"text": "hi", "cfg_scale": 0}, "'cfg_scale'", "greater than 0 and at most 10"),
    ({"text": "hi", "cfg_scale": -3.5}, "'cfg_scale'", "greater than 0 and at most 10"),
    ({"text": "hi", "cfg_scale": 1e9}, "'cfg_scale'", "greater than 0 and at most 10"),
    ({"text": "hi", "cfg_scale": "1.3"}, "'cfg_scale'", "must be a number"),
    ({"text": "hi", "cfg_scale": True}, "'cfg_scale'", "must be a number"),
    ({"text": "hi", "diffusion_steps": 0}, "'diffusion_steps'", "from 1 to 50"),
    ({"text": "hi", "diffusion_steps": 51}, "'diffusion_steps'", "from 1 to 50"),
    ({"text": "hi", "diffusion_steps": 2.5}, "'diffusion_steps'", "must be an integer"),
    ({"text": "hi", "seed": -1}, "'seed'", "from 0 to 4294967295"),
    ({"text": "hi", "seed": 2**40}, "'seed'", "from 0 to 4294967295"),
    ({"text": "hi", "output_format": "ogg"}, "'output_format'", "'mp3', 'opus', 'aac', 'flac', 'wav' or 'pcm_16'"),
    ({"text": "hi", "sample_rate": 12345}, "'sample_rate'", "must be one of 8000"),
    ({"text": "hi", "output_format": "opus", "sample_rate": 44100}, "'sample_rate' for opus", "must be one of 8000"),
    ({"text": "hi", "output_format": "mp3", "sample_rate": 12000}, "'sample_rate' for mp3", "one of 8000, 16000"),
    ({"text": "hi", "speed": 0.1}, "'speed'", "from 0.25 to 4.0"),
    ({"text": "hi", "speed": 5}, "'speed'", "from 0.25 to 4.0"),
    ({"text": "hi", "target_lufs": -80}, "'target_lufs'", "from -70 to -5"),
    ({"text": "hi", "target_lufs": 0}, "'target_lufs'", "from -70 to -5"),
    ({"text": "hi", "captions": "ass"}, "'captions'", "'srt' or 'vtt'"),
    ({"text": "hi", "return": "s3"}, "'return'", "'auto', 'url' or 'base64'"),
    ({"text": "hi", "max_chunk_chars": 10}, "'max_chunk_chars'", "from 40 to 5000"),
    ({"text": "hi", "max_new_tokens": 0}, "'max_new_tokens'", "from 1 to 4500"),
    ({"text": "hi", "bitrate_kbps": 64, "output_format": "flac"}, "'bitrate_kbps'", "only to mp3, opus and aac"),
    ({"text": "hi", "bitrate_kbps": 320, "sample_rate": 8000}, "'bitrate_kbps'", "from 8 to 64"),
    ({"text": "hi", "speakers": ["A", "B", "C", "D", "E"]}, "'speakers'", "at most 4 speakers"),
    ({"text": "hi", "speakers": []}, "'speakers'", "at least 1 item"),
    ({"text": "hi", "speakers": "Alice"}, "'speakers'", "must be a list"),
    ({"text": "hi", "speakers": [7]}, "'speakers[0]'", "a voice name or an object"),
    ({"text": "hi", "speakers": [{}]}, "'speakers[0]'", "exactly one of 'audio_base64' or 'audio_url'"),
    ({"text": "hi", "speakers": [{"audio_url": "a", "audio_base64": "b"}]}, "'speakers[0]'", "exactly one of"),
    ({"text": "hi", "speakers": [{"path": "/etc/passwd"}]}, "'speakers[0].path'", "allowed fields are"),
    ({"text": "hi", "speakers": ["Alice", {"audio_url": 5}]}, "'speakers[1].audio_url'", "must be a string"),
    ({"text": "hi", "speaker": "Al\x00ice"}, "'speaker'", "control character U+0000"),
    ({"text": "a\x07b"}, "'text'", "control character U+0007"),
    ({"text": "bad \ud800 surrogate"}, "'text'", "lone surrogate"),
    ({"text": "hi", "input": "also"}, "'text' or in 'input'", "not both"),
    ({"text": "hi", "speaker": "Alice", "voice_url": "https://x/a.wav"}, "'speaker', 'voice_url'", "only one of"),
    ({"text": "hi", "speakers": ["Alice"], "speaker": "Frank"}, "'speakers' or in 'speaker'", "not both"),
    ({"action": "dance"}, "'action'", "'synthesize' or 'list_voices'"),
]


@pytest.mark.parametrize(("job_input", "field", "fragment"), BAD_INPUTS)
def test_bad_input_is_one_sentence_naming_the_field(settings, job_input, field, fragment) -> None:
    with pytest.raises(InputError) as error:
        parse_job_input(job_input, settings)
    message = str(error.value)
    assert field in message and fragment in message, message
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message
    assert len(message) < 600


@pytest.mark.parametrize("raw", [None, "text", 5, ["text"]])
def test_input_must_be_an_object(settings, raw) -> None:
    with pytest.raises(InputError, match="'input' must be a JSON object"):
        parse_job_input(raw, settings)


def test_defaults_come_from_settings(make_settings) -> None:
    settings = make_settings(default_sample_rate=44100, default_output_format="wav", default_cfg_scale=2.0)
    job = parse_job_input({"input": "Hello."}, settings)  # `input` is an alias of `text`
    assert job.text == "Hello."
    assert (job.output_format, job.sample_rate, job.bitrate_kbps) == ("wav", 44100, None)
    assert (job.cfg_scale, job.diffusion_steps, job.max_chunk_chars) == (2.0, 10, 300)
    assert (job.target_lufs, job.stream_chunk_ms) == (-20.0, None)  # stream_chunk_ms: streamed jobs only
    streamed = parse_job_input({"text": "a", "stream": True, "cfg_scale": 0.5}, settings)
    assert (streamed.stream_chunk_ms, streamed.cfg_scale) == (400, 0.5)


def test_opus_defaults_to_48k_and_pcm_alias(settings) -> None:
    assert parse_job_input({"text": "a", "output_format": "opus"}, settings).sample_rate == 48000
    job = parse_job_input({"text": "a", "output_format": "pcm"}, settings)
    assert job.output_format == "pcm_16"
    mp3 = parse_job_input({"text": "a", "sample_rate": 8000}, settings)
    assert mp3.bitrate_kbps == 64  # the default 128 does not exist at 8 kHz


@pytest.mark.parametrize("rate", [8000, 12000, 16000, 24000, 48000])
def test_opus_takes_every_rate_libopus_encodes(settings, rate) -> None:
    job = parse_job_input({"text": "a", "output_format": "opus", "sample_rate": rate}, settings)
    assert (job.sample_rate, job.bitrate_kbps) == (rate, 64)


def test_text_limit_follows_settings(make_settings) -> None:
    settings = make_settings(max_text_length=10)
    with pytest.raises(InputError, match="the limit is 10"):
        parse_job_input({"text": "eleven chars"}, settings)


def test_deep_nesting_is_rejected_cleanly(settings) -> None:
    nested: dict = {}
    node = nested
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InputError) as error:
        parse_job_input({"text": "hi", "speakers": [nested]}, settings)
    assert "speakers[0]" in str(error.value) or "nested" in str(error.value)
