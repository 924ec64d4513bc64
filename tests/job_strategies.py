"""Hypothesis strategies for job inputs: valid jobs, and every way a client can get one wrong.

`job_inputs()` draws a raw `job["input"]` value as the worker would receive it from JSON: mostly
a valid job with one or more fields mutated (wrong types, unicode of every category, huge and tiny
numbers, NaN and infinity, deep nesting, very long strings, unknown keys, duplicate keys resolved
as JSON does), sometimes something that is not a job at all. Voice URLs never reach the network:
the tests resolve every name to a private address, which the worker refuses before connecting.
"""

from __future__ import annotations

import base64
import json

from audio_helpers import encode_file, tone
from hypothesis import strategies as st

# The job's fields as a client writes them (aliases included), from schema.JobInput.
FIELDS = [
    "action", "text", "input", "speaker", "speakers", "voice_audio_base64", "voice_url", "cfg_scale",
    "diffusion_steps", "seed", "max_chunk_chars", "max_new_tokens", "disable_prefill", "output_format",
    "sample_rate", "bitrate_kbps", "speed", "normalize", "target_lufs", "captions", "timestamps", "caption_unit",
    "return", "return_mode", "stream", "stream_chunk_ms",
]  # fmt: skip

CLIPS = [
    base64.b64encode(encode_file(tone(220, 1.0, 16000), 16000, "wav", "pcm_s16le")).decode(),
    base64.b64encode(encode_file(tone(330, 1.0, 22050), 22050, "mp3", "libmp3lame")).decode(),
]
TEXTS = [
    "Hello there.",
    "Speaker 1: Hi.\nSpeaker 2: Hello!",
    "Speaker 1: One.\nSpeaker 2: Two.\nSpeaker 3: Three.",
    "A longer passage. It has several sentences! Does it chunk? Yes, it does; and it goes on. " * 4,
    "你好，世界。这是一个测试。",
    "[pause:300ms] Pauses, [pause] here [PAUSE:1.5s] and [laughs] there. [pause:2s]",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=15,
)


def nested(depth: int) -> dict:
    root: dict = {}
    node = root
    for _ in range(depth):
        node["x"] = {}
        node = node["x"]
    return root


# Strings meant to break things: every unicode category, control characters, surrogates, huge.
nasty_text = st.one_of(
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200),
    st.text(alphabet=st.sampled_from("\x00\x07\x1b\u200b\u202e\ufeff\ud800\udfff\n\r\t :"), max_size=50),
    st.integers(0, 60_000).map(lambda n: "a" * n),
    st.integers(0, 3000).map(lambda n: "Speaker 1: x\n" * n),
    st.sampled_from(["", " ", "Speaker 9: hi", "Speaker 0: a\nSpeaker 1: b", "Speaker: x", "speaker 1 hi"]),
    st.sampled_from(["[pause:x] a", "a [pause:11s]", "[pause:2s", "[pause]" * 200, "[pause:9999999s] a", "[ pause ]"]),
)
numbers = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, 1e-320, 1e308, 2**53 + 1, 4500, 4501, 5000, 0.25, 4.0, 48000, 24000]),
)
voice_urls = st.one_of(
    st.sampled_from(["http://voices.test/a.wav", "https://127.0.0.1/a.wav", "file:///etc/passwd", "ftp://x/y"]),
    st.text(max_size=60),
)


@st.composite
def valid_jobs(draw) -> dict:
    """A job the schema accepts (it may still fail planning: voices, script labels, limits)."""
    job: dict = {"text": draw(st.sampled_from(TEXTS))}
    fmt = draw(st.sampled_from([None, "mp3", "opus", "aac", "flac", "wav", "pcm_16", "pcm"]))
    if fmt:
        job["output_format"] = fmt
    optional = {
        "speaker": st.sampled_from(["Alice", "Frank", "alice", "en-Frank_man", "Nobody"]),
        "speakers": st.lists(st.sampled_from(["Alice", "Frank"]), min_size=1, max_size=4),
        "voice_audio_base64": st.sampled_from(CLIPS),
        "cfg_scale": st.floats(0.01, 10),
        "diffusion_steps": st.integers(1, 50),
        "seed": st.integers(0, 2**32 - 1),
        "max_chunk_chars": st.integers(40, 5000),
        "max_new_tokens": st.integers(1, 4500),
        "speed": st.floats(0.25, 4.0),
        "normalize": st.booleans(),
        "target_lufs": st.floats(-70, -5),
        "captions": st.sampled_from(["srt", "vtt"]),
        "timestamps": st.sampled_from(["none", "sentence", "word"]),
        "return": st.sampled_from(["auto", "base64"]),
        "disable_prefill": st.booleans(),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        job[name] = draw(optional[name])
    if "captions" in job and draw(st.booleans()):
        job["caption_unit"] = draw(st.sampled_from(["chunk", "sentence", "word"]))
    if fmt in ("mp3", "opus", "wav", "pcm_16", "pcm") and draw(st.booleans()):
        job["stream"] = True
    return job


@st.composite
def mutated_jobs(draw) -> dict:
    """A valid job with 1-3 fields replaced, added or removed."""
    job = draw(valid_jobs())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*FIELDS, *FIELDS, "colour", "", "TEXT", "speakers[0]", "__proto__"]))
        how = draw(st.sampled_from(["value", "text", "number", "nest", "drop", "voice", "url", "speakers"]))
        if how == "drop":
            job.pop(name, None)
        elif how == "value":
            job[name] = draw(json_values)
        elif how == "text":
            job[name] = draw(nasty_text)
        elif how == "number":
            job[name] = draw(numbers)
        elif how == "nest":
            job[name] = nested(draw(st.integers(1, 3000)))
        elif how == "voice":  # a clip cut anywhere, or text that is no base64 at all
            clip = draw(st.sampled_from(CLIPS))
            job[name] = clip[: draw(st.integers(0, len(clip)))] if draw(st.booleans()) else draw(nasty_text)
        elif how == "url":
            job["voice_url"] = draw(voice_urls)
        else:
            entry = st.one_of(
                st.sampled_from(["Alice", "Frank", "", "../../etc/passwd"]),
                st.fixed_dictionaries({"audio_base64": st.sampled_from(CLIPS) | nasty_text}),
                st.fixed_dictionaries({"audio_url": voice_urls}),
                json_values,
            )
            job["speakers"] = draw(st.lists(entry, max_size=6))
    return job


@st.composite
def duplicate_keys(draw) -> dict:
    """A job whose JSON repeats a key: decoded as the worker's JSON parser does (the last one wins)."""
    job = draw(valid_jobs())
    name = draw(st.sampled_from(sorted(job)))
    text = json.dumps(job)[:-1] + f", {json.dumps(name)}: {json.dumps(draw(json_values))}}}"
    return json.loads(text)


def job_inputs() -> st.SearchStrategy:
    """What may arrive in job["input"]: mostly jobs with mistakes, some valid, some not jobs at all."""
    return st.one_of(
        valid_jobs(),
        mutated_jobs(),
        mutated_jobs(),
        mutated_jobs(),
        duplicate_keys(),
        json_values,
        st.integers(1, 3000).map(nested),
    )
