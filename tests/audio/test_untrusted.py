"""Bounded decoding of untrusted audio (audio/untrusted.py): real files, bombs, and 500+ mutated files.

Every file here is made in the test with FFmpeg's encoders (through PyAV). The bombs are small
files that decode to hours (tests/bombs.py); each must be refused after at most the allowed seconds
of decoding, with a peak memory no higher than an allowed clip's (measured in child processes, so
nothing else in the test session counts). The mutated files come from a seeded generator: each
must give a usable voice or one sentence naming the field, never anything else.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from audio_helpers import dominant_frequency, encode_file, tone
from bombs import bomb, wav_claiming
from fuzzing import SEED, Timings, replay

from audio import untrusted
from audio.dsp import AudioError
from jobs.voices import VoiceError, VoiceLibrary, VoiceLimits

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 300.0


@pytest.mark.parametrize(
    ("container", "codec", "rate", "channels"),
    [
        ("wav", "pcm_s16le", 44100, 2),
        ("mp3", "libmp3lame", 22050, 1),
        ("flac", "flac", 48000, 2),
        ("ogg", "libopus", 48000, 1),
        ("ipod", "aac", 16000, 1),  # m4a
        ("adts", "aac", 24000, 2),
        ("webm", "libopus", 48000, 2),
    ],
)
def test_decode_any_rate_and_channels_to_24k_mono(container: str, codec: str, rate: int, channels: int) -> None:
    data = encode_file(tone(500, 1.0, rate), rate, container, codec, channels)
    decoded = untrusted.decode(data, 24000, LIMIT)
    samples = decoded.samples
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size / 24000 - 1.0) < 0.1
    assert abs(dominant_frequency(samples, 24000) - 500) < 5
    assert decoded.channels == channels and decoded.input_seconds == pytest.approx(1.0, abs=0.1)


@pytest.fixture(scope="module")
def voices(make_settings, tmp_path_factory) -> VoiceLibrary:
    return VoiceLibrary(tmp_path_factory.mktemp("no-presets"), VoiceLimits.from_settings(make_settings()))


def clone(library: VoiceLibrary, data: bytes, field: str = "'voice_audio_base64'") -> np.ndarray:
    return library.from_base64(base64.b64encode(data).decode(), field)


def assert_one_sentence(message: str, field: str = "'voice_audio_base64'") -> None:
    assert message.startswith(field) and message.endswith("."), message
    assert "\n" not in message and "Traceback" not in message and len(message) < 400, message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "the audio is empty"),
        (b"not audio at all" * 10, "format is not recognised; send wav, mp3, flac"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "the wav audio could not be decoded"),
        # A playlist would make FFmpeg open other files or URLs: never tried as a format.
        (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n", "not recognised"),
        (b"ffconcat version 1.0\nfile /etc/passwd\n", "not recognised"),
    ],
)
def test_undecodable_audio_is_one_sentence(voices: VoiceLibrary, data: bytes, fragment: str) -> None:
    with pytest.raises(VoiceError) as error:
        clone(voices, data)
    assert fragment in str(error.value)
    assert_one_sentence(str(error.value))


def wav(pcm: bytes, rate: int, channels: int = 1, bits: int = 16, fmt: int = 1) -> bytes:
    """A WAV file with any header values (format 1 = PCM, 3 = float)."""
    block = channels * bits // 8
    header = struct.pack("<HHIIHH", fmt, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(header)) + header + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (wav(b"\x00\x10" * 1000, rate=1), "sample rate is 1 Hz; it must be from 8000 to 192000 Hz"),
        (wav(b"\x00\x10" * 1000, rate=10_000_000), "sample rate is 10000000 Hz"),
        (wav(b"\x00\x10" * 4000, rate=8000, channels=40), "has 40 channels; at most 8"),
        (wav(np.full(24000, np.nan, "<f4").tobytes(), 24000, bits=32, fmt=3), "NaN or infinity"),
        (wav(np.full(24000, np.inf, "<f4").tobytes(), 24000, bits=32, fmt=3), "NaN or infinity"),
        (wav(np.full(24000, 1e30, "<f4").tobytes(), 24000, bits=32, fmt=3), "far outside the range -1 to 1"),
    ],
    ids=["1 Hz", "10 MHz", "40 channels", "NaN", "infinity", "1e30"],
)
def test_absurd_headers_and_values_are_refused(voices: VoiceLibrary, data: bytes, fragment: str) -> None:
    with pytest.raises(VoiceError) as error:
        clone(voices, data)
    assert fragment in str(error.value)
    assert_one_sentence(str(error.value))


def test_declared_sizes_are_not_trusted(voices: VoiceLibrary) -> None:
    """A header claiming 4 GB in front of 1 s of audio gives the 1 s it holds (counted, not declared)."""
    samples = clone(voices, wav_claiming(4 * 1024**3, real_seconds=1.0))
    assert abs(samples.size / 24000 - 1.0) < 0.01


def test_too_many_streams_and_huge_metadata_are_refused(voices: VoiceLibrary) -> None:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as output:
        streams = [output.add_stream("flac", rate=8000, layout="mono") for _ in range(untrusted.MAX_STREAMS + 1)]
        for stream in streams:
            frame = av.AudioFrame.from_ndarray(tone(300, 1.0, 8000).reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 8000, 0, Fraction(1, 8000)
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                output.mux(packet)
    with pytest.raises(VoiceError, match=r"has 9 streams; a voice recording has at most 8\.$"):
        clone(voices, buffer.getvalue())

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as output:
        output.metadata["comment"] = "x" * (untrusted.MAX_METADATA_CHARS + 1)
        stream = output.add_stream("flac", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(300, 1.0, 8000).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, Fraction(1, 8000)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    with pytest.raises(VoiceError, match=r"metadata is larger than 1000 kB\.$"):
        clone(voices, buffer.getvalue())


def test_unexpected_codecs_are_refused(voices: VoiceLibrary) -> None:
    data = encode_file(tone(300, 1.0, 16000), 16000, "ipod", "alac")
    with pytest.raises(VoiceError, match=r"the audio codec alac is not supported; send wav, mp3"):
        clone(voices, data)


# --- bombs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flac", "mp3", "opus", "wav"])
def test_bombs_stop_at_the_limit(bomb_files: dict[str, Path], voices: VoiceLibrary, kind: str, reliability) -> None:
    data = bomb_files[kind].read_bytes()
    assert len(data) < 8_000_000
    with pytest.raises(untrusted.TooLong) as stopped:
        untrusted.decode(data, 24000, LIMIT)
    # The work done is counted, not timed: decoding stopped within one packet past the limit.
    assert LIMIT < stopped.value.decoded_seconds <= LIMIT + 1.0, stopped.value.decoded_seconds
    with pytest.raises(VoiceError) as error:
        clone(voices, data)
    assert str(error.value) == (
        "'voice_audio_base64' is longer than 300 s of audio; reference audio may be at most 300 s."
    )
    reliability.record("bombs_refused")


PEAK_SCRIPT = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from audio import untrusted
data = open(sys.argv[2], "rb").read()
try:
    result = untrusted.decode(data, 24000, float(sys.argv[3]))
    outcome = f"decoded {result.samples.size / 24000:.1f} s"
except untrusted.TooLong as exc:
    outcome = "refused"
print(json.dumps({"outcome": outcome, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _peak(path: Path, limit: float) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(ROOT), str(path), str(limit)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


@pytest.mark.parametrize("kind", ["flac", "mp3", "opus"])
def test_a_refused_bomb_needs_no_more_memory_than_an_allowed_clip(bomb_files: dict[str, Path], kind: str) -> None:
    """Peak RSS of a child process refusing the bomb vs. one decoding an allowed 290 s clip of the
    same format: refusing costs no more than allowing (plus measurement noise)."""
    allowed = bomb_files[kind].parent / f"{kind}.allowed"
    if not allowed.exists():
        allowed.write_bytes(bomb(kind, 290))
    refused, admitted = _peak(bomb_files[kind], LIMIT), _peak(allowed, LIMIT)
    assert refused["outcome"] == "refused" and admitted["outcome"].startswith("decoded")
    assert refused["peak_mb"] <= admitted["peak_mb"] * 1.1 + 30, (refused, admitted)


# --- mutated, truncated and spliced files ---------------------------------------------------

BASES = [
    ("wav", "pcm_s16le", 16000, 1),
    ("mp3", "libmp3lame", 22050, 1),
    ("flac", "flac", 44100, 2),
    ("ogg", "libopus", 48000, 1),
    ("ipod", "aac", 24000, 1),
    ("adts", "aac", 16000, 2),
    ("webm", "libopus", 48000, 1),
]
FUZZ_CASES = 560


def mutate(rng: random.Random, data: bytes, other: bytes) -> tuple[str, bytes]:
    """One random change of a real file: truncated, bytes flipped, header fields rewritten, spliced."""
    size = len(data)
    kind = rng.choice(["truncate", "flip", "header", "splice", "repeat", "zero", "insert", "stack"])
    if kind == "truncate":
        return kind, data[: rng.randrange(0, size)]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 40)):
            out[rng.randrange(size)] = rng.randrange(256)
        return kind, bytes(out)
    if kind == "header":  # a size, rate or count field near the start set to an extreme
        out = bytearray(data)
        at = rng.randrange(0, min(size - 4, 128))
        out[at : at + 4] = struct.pack("<I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(2**32)]))
        return kind, bytes(out)
    if kind == "splice":
        return kind, data[: rng.randrange(size)] + other[rng.randrange(len(other)) :]
    if kind == "repeat":
        start = rng.randrange(size)
        piece = data[start : start + rng.randint(1, 4096)]
        return kind, data[:start] + piece * rng.randint(2, 50) + data[start:]
    if kind == "zero":
        start = rng.randrange(size)
        return kind, data[:start] + bytes(rng.randint(1, 2048)) + data[start + 2048 :]
    if kind == "insert":
        start = rng.randrange(size)
        return kind, data[:start] + rng.randbytes(rng.randint(1, 512)) + data[start:]
    return kind, data + other  # two files back to back


def test_mutated_real_files_give_a_voice_or_one_sentence(voices: VoiceLibrary, reliability) -> None:
    rng = random.Random(SEED)
    files = [encode_file(tone(220 + 50 * i, 2.0, rate), rate, c, codec, ch) for i, (c, codec, rate, ch) in
             enumerate(BASES)]  # fmt: skip
    timings = Timings("mutated audio files")
    outcomes = {"voice": 0, "error": 0}
    for case in range(FUZZ_CASES):
        base = case % len(files)
        kind, data = mutate(rng, files[base], rng.choice(files))
        label = f"case {case}: {kind} of {BASES[base][0]}/{BASES[base][1]}, {len(data)} bytes; {replay()}"
        with timings.measure(label):
            try:
                samples = clone(voices, data)
            except VoiceError as error:
                assert_one_sentence(str(error))
                outcomes["error"] += 1
                continue
            except Exception as error:  # anything else is the bug this test looks for
                raise AssertionError(f"{label}: {type(error).__name__}: {error}") from None
        assert samples.dtype == np.float32 and samples.ndim == 1, label
        assert np.isfinite(samples).all() and 0.5 <= samples.size / 24000 <= LIMIT, label
        outcomes["voice"] += 1
    assert outcomes["voice"] > 20 and outcomes["error"] > 20, outcomes  # both paths exercised
    reliability.record("generated_audio", FUZZ_CASES)
    reliability.note(timings.summary() + f" [{outcomes['voice']} voices, {outcomes['error']} errors]")


def test_decoder_errors_are_audio_errors_without_the_library() -> None:
    """audio_input on its own raises AudioError (a fragment for the caller to prefix), nothing else."""
    rng = random.Random(SEED + 1)
    data = encode_file(tone(300, 1.0, 16000), 16000, "flac", "flac")
    for _ in range(60):
        _, mutated = mutate(rng, data, data)
        try:
            untrusted.decode(mutated, 24000, LIMIT)
        except AudioError as error:
            assert not str(error).endswith("."), f"{error} ({replay()})"
