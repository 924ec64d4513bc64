"""Encoding: every format and rate decodes with a real decoder as claimed; streamed pieces make one file."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from audio_helpers import dominant_frequency, probe, tone

from audio import dsp, formats
from audio.formats import FORMATS

# Codec delay/padding a decoder may add at the start or end (AAC in ADTS cannot signal its
# 1024-sample priming; MP3 frames are 1152 samples). Durations are checked within this.
PADDING_SAMPLES = {"aac": 2 * 1024 + 64, "mp3": 1152 + 576, "opus": 960, "flac": 0, "wav": 0}
EXPECTED_CODEC = {"mp3": "mp3float", "opus": "opus", "aac": "aac", "flac": "flac", "wav": "pcm_s16le"}

MATRIX = [(fmt, rate) for fmt, spec in FORMATS.items() for rate in spec.sample_rates]


@pytest.mark.parametrize(("fmt", "rate"), MATRIX)
def test_every_format_and_rate_decodes_as_claimed(fmt: str, rate: int) -> None:
    signal = dsp.resample(tone(440, 1.5), 24000, rate)
    bitrate = FORMATS[fmt].bitrate.default_at(rate) if FORMATS[fmt].bitrate else None
    data = formats.encode(signal, fmt, rate, bitrate)
    if fmt == "pcm_16":
        decoded = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
        assert decoded.size == signal.size
        assert np.max(np.abs(decoded - signal)) < 1e-4
        return
    result = probe(data)
    assert result.codec == EXPECTED_CODEC[fmt]
    assert result.sample_rate == (48000 if fmt == "opus" else rate)  # Opus decodes at 48 kHz
    assert result.channels == 1
    slack = PADDING_SAMPLES[fmt] / rate + 1e-3
    assert abs(result.duration - 1.5) <= slack, (result.duration, slack)
    assert abs(dominant_frequency(result.samples, result.sample_rate) - 440) < 5


def test_wav_header_has_exact_sizes() -> None:
    data = formats.encode(tone(440, 0.5), "wav", 24000)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert int.from_bytes(data[4:8], "little") == len(data) - 8
    assert int.from_bytes(data[40:44], "little") == len(data) - 44


def test_bitrate_is_applied() -> None:
    signal = np.random.default_rng(0).normal(0, 0.1, 24000 * 4).astype(np.float32)
    small = formats.encode(signal, "mp3", 24000, 32)
    large = formats.encode(signal, "mp3", 24000, 160)
    assert len(large) > 3 * len(small)


def test_streaming_encoder_pieces_concatenate_into_one_file() -> None:
    signal = tone(300, 2.0)
    for fmt in ("mp3", "flac", "aac", "wav"):
        encoder = formats.open_encoder(
            fmt, 24000, FORMATS[fmt].bitrate.default_at(24000) if FORMATS[fmt].bitrate else None, streaming=True
        )
        pieces = [encoder.write(signal[i : i + 2400]) for i in range(0, signal.size, 2400)] + [encoder.close()]
        assert sum(1 for piece in pieces[:-1] if piece) > 1, f"{fmt} produced no bytes before close"
        assert abs(probe(b"".join(pieces)).duration - 2.0) < 0.15


@pytest.mark.parametrize("rate", [8000, 12000, 16000, 24000, 48000])
def test_opus_records_its_input_rate(rate: int) -> None:
    """The OpusHead packet keeps the rate the audio was encoded at (players still decode at 48 kHz)."""
    data = formats.encode(dsp.resample(tone(440, 1.0), 24000, rate), "opus", rate, 32)
    head = data.index(b"OpusHead")
    (input_rate,) = struct.unpack_from("<I", data, head + 12)
    assert input_rate == rate


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format 'ogg'"):
        formats.open_encoder("ogg", 24000)
