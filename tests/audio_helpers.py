"""Test helpers that make and inspect real audio files with FFmpeg's codecs (through PyAV)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


def tone(frequency: float, seconds: float, rate: int = 24000, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def encode_file(samples: np.ndarray, rate: int, container: str, codec: str, channels: int = 1) -> bytes:
    """Encode with any FFmpeg muxer/encoder (used to make reference clips in many formats)."""
    buffer = io.BytesIO()
    layout = "stereo" if channels == 2 else "mono"
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout=layout)
        data = np.tile(samples, (channels, 1)) if channels == 2 else samples.reshape(1, -1)
        fmt = "fltp" if channels == 2 else "flt"
        frame = av.AudioFrame.from_ndarray(data.astype(np.float32), format=fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


@dataclass
class Probe:
    codec: str
    sample_rate: int
    channels: int
    samples: np.ndarray  # decoded, mono float32 at the stream's own rate

    @property
    def duration(self) -> float:
        return self.samples.size / self.sample_rate


def probe(data: bytes, container: str | None = None) -> Probe:
    """Decode a file with FFmpeg's own decoder and report what the stream says it is."""
    with av.open(io.BytesIO(data), format=container) as source:
        stream = source.streams.audio[0]
        codec = stream.codec_context.name
        rate = stream.codec_context.sample_rate
        channels = stream.codec_context.layout.nb_channels
        pieces = [_as_float(frame.to_ndarray()).reshape(channels, -1).mean(axis=0) for frame in source.decode(stream)]
    samples = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    return Probe(codec, rate, channels, samples)


def _as_float(samples: np.ndarray) -> np.ndarray:
    if np.issubdtype(samples.dtype, np.integer):
        return samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
    return samples.astype(np.float32)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[np.argmax(spectrum)])


def check_audio(output: list) -> dict:
    """A job's RunPod output holding one inline mp3 or wav result whose audio decodes to its duration."""
    assert isinstance(output, list) and len(output) == 1
    item = output[0]
    info = probe(base64.b64decode(item["audio_base64"]))
    assert info.codec == {"mp3": "mp3float", "wav": "pcm_s16le"}[item["format"]]
    assert abs(info.duration - item["duration_sec"]) < 0.08
    return item
