"""Decompression bombs: small files that decode to hours of audio, made with FFmpeg's encoders.

Each is encoded from silence in blocks (never holding the hours in memory) with the codec's
cheapest settings, so a 2-hour clip is a few MB and takes seconds to make. `wav_claiming` writes a
WAV header that declares gigabytes in front of a short clip.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np

# name -> (container, codec, sample rate, encoder options, bit rate)
BOMBS = {
    "flac": ("flac", "flac", 48000, {"compression_level": "0"}, None),
    "mp3": ("mp3", "libmp3lame", 8000, {}, 8000),
    # Opus decodes at 48 kHz whatever it was fed: 8 kHz input and 120 ms packets make it quick to build.
    "opus": ("ogg", "libopus", 8000, {"frame_duration": "120", "compression_level": "0"}, 6000),
}


def bomb(kind: str, seconds: float) -> bytes:
    """A clip of `seconds` of silence (with a faint tone every block, so no encoder drops it)."""
    container_name, codec, rate, options, bit_rate = BOMBS[kind]
    buffer = io.BytesIO()
    block = rate * 10
    with av.open(buffer, mode="w", format=container_name) as output:
        stream = output.add_stream(codec, rate=rate, layout="mono", options=options)
        if bit_rate:
            stream.bit_rate = bit_rate
        silence = np.zeros((1, block), dtype=np.float32)
        silence[0, :64] = 0.01
        written = 0
        while written < seconds * rate:
            frame = av.AudioFrame.from_ndarray(silence, format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, written, Fraction(1, rate)
            for packet in stream.encode(frame):
                output.mux(packet)
            written += block
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def wav_claiming(declared_bytes: int, real_seconds: float = 1.0, rate: int = 8000) -> bytes:
    """A 16-bit mono WAV whose RIFF and data sizes claim `declared_bytes` (capped at 4 GB - 1)."""
    size = min(declared_bytes, 0xFFFFFFFF - 36)
    pcm = (np.sin(np.arange(int(real_seconds * rate)) / 5) * 8000).astype("<i2").tobytes()
    header = (
        b"RIFF" + struct.pack("<I", size + 36) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", size)
    )  # fmt: skip
    return header + pcm
