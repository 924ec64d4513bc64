"""Encoders: mono float32 audio in, the bytes of one output format out, piece by piece.

Every encoder has the same two calls: `write(samples)` returns the bytes produced so far and
`close()` the rest, so the pieces concatenate to one valid file (a whole file is one `write` +
`close`). Which encoder a format uses, with which codec and container, is in formats.py, which
opens them (`formats.open_encoder`); this module does not import it.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from typing import Protocol

import av
import numpy as np

from audio import mp3
from audio.dsp import BLOCK_SAMPLES


class Codec(Protocol):
    """What an encoder reads of its format (formats.OutputFormat is one)."""

    codec: str  # the FFmpeg encoder, or "pcm_s16le" for samples written here
    container: str | None  # the FFmpeg muxer; None where this module writes the bytes itself

    def default_kbps(self, sample_rate: int) -> int | None: ...


def to_pcm16(samples: np.ndarray) -> bytes:
    """Float [-1, 1] to signed 16-bit little-endian, clipped (loudness keeps peaks under -1 dBTP)."""
    clipped = np.clip(samples, -1.0, 1.0)
    return (np.round(clipped * 32767.0)).astype("<i2").tobytes()


def _pcm16_blocks(samples: np.ndarray) -> list[bytes]:
    """`to_pcm16` block by block, so no float64 copy of a whole long signal is made."""
    return [to_pcm16(samples[i : i + BLOCK_SAMPLES]) for i in range(0, samples.size, BLOCK_SAMPLES)]


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM16 mono WAV header; `data_bytes=None` writes the streaming form (sizes maxed)."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff_size = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", size)
    )  # fmt: skip


class Encoder:
    """The interface every format's encoder has (see the module docstring)."""

    def __init__(self, spec: Codec, sample_rate: int, bitrate_kbps: int | None, streaming: bool):
        self.spec = spec
        self.sample_rate = sample_rate
        self.bitrate_kbps = bitrate_kbps
        self.streaming = streaming

    def write(self, samples: np.ndarray) -> bytes:
        raise NotImplementedError

    def close(self) -> bytes:
        raise NotImplementedError


class PcmEncoder(Encoder):
    """Raw 16-bit little-endian samples, no header."""

    def write(self, samples: np.ndarray) -> bytes:
        return b"".join(_pcm16_blocks(samples))

    def close(self) -> bytes:
        return b""


class WavEncoder(Encoder):
    """PCM16 in a WAV header. A whole file gets exact sizes; a stream the 'unknown size' form."""

    def __init__(self, spec: Codec, sample_rate: int, bitrate_kbps: int | None, streaming: bool):
        super().__init__(spec, sample_rate, bitrate_kbps, streaming)
        self._pending: list[bytes] = []  # a whole file's samples: the header needs their size
        self._header_sent = False

    def write(self, samples: np.ndarray) -> bytes:
        pcm = _pcm16_blocks(samples)
        if not self.streaming:
            self._pending.extend(pcm)
            return b""
        if not self._header_sent:
            self._header_sent = True
            pcm.insert(0, wav_header(self.sample_rate, None))
        return b"".join(pcm)

    def close(self) -> bytes:
        if self.streaming:
            return b"" if self._header_sent else wav_header(self.sample_rate, None)
        size = sum(len(piece) for piece in self._pending)
        pieces, self._pending = self._pending, []
        return b"".join([wav_header(self.sample_rate, size), *pieces])


class FFmpegEncoder(Encoder):
    """A codec and container of FFmpeg's, in-process through PyAV (`spec.codec`, `spec.container`)."""

    def __init__(self, spec: Codec, sample_rate: int, bitrate_kbps: int | None, streaming: bool):
        super().__init__(spec, sample_rate, bitrate_kbps, streaming)
        # A whole file is muxed into a seekable buffer, so muxers can finish their headers (mp3's
        # Xing frame, FLAC's STREAMINFO); a stream into a write-only sink, so bytes handed out
        # are never rewritten.
        self._buffer: io.BytesIO | _WriteOnlySink = _WriteOnlySink() if streaming else io.BytesIO()
        # The Ogg muxer holds pages for a second unless told otherwise; a stream wants them now.
        options = {"page_duration": "100000"} if streaming and spec.container == "ogg" else {}
        self._container = av.open(self._buffer, mode="w", format=spec.container, options=options)
        self._stream = self._container.add_stream(spec.codec, rate=sample_rate, layout="mono")
        if bitrate_kbps:
            self._stream.bit_rate = bitrate_kbps * 1000
        self._samples_written = 0
        self._closed = False

    def write(self, samples: np.ndarray) -> bytes:
        for start in range(0, samples.size, BLOCK_SAMPLES):
            block = samples[start : start + BLOCK_SAMPLES].reshape(1, -1).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(block, format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._samples_written
            frame.time_base = Fraction(1, self.sample_rate)
            self._samples_written += block.size
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._take()

    def close(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._closed = True
        return self._take()

    def _take(self) -> bytes:
        if isinstance(self._buffer, _WriteOnlySink):
            return self._buffer.take()
        return self._buffer.getvalue() if self._closed else b""


class LameEncoder(Encoder):
    """MP3 through LAME directly (mp3.py). A whole file starts with the Info/LAME tag frame that
    makes it gapless; a stream cannot have one (its frame count is known only at the end), so
    decoders keep the encoder's delay in front of a streamed file, as with FFmpeg's muxer."""

    def __init__(self, spec: Codec, sample_rate: int, bitrate_kbps: int | None, streaming: bool):
        super().__init__(spec, sample_rate, bitrate_kbps, streaming)
        kbps = bitrate_kbps or spec.default_kbps(sample_rate)
        assert kbps is not None, "mp3 has a bitrate rule"
        self._lame = mp3.LameStream(sample_rate, kbps)
        self._frames: list[bytes] = []  # a whole file's frames: the tag in front needs them all

    def write(self, samples: np.ndarray) -> bytes:
        pieces = [self._lame.encode(samples[i : i + BLOCK_SAMPLES]) for i in range(0, samples.size, BLOCK_SAMPLES)]
        if self.streaming:
            return b"".join(pieces)
        self._frames.extend(pieces)
        return b""

    def close(self) -> bytes:
        tail = self._lame.flush()
        self._lame.close()
        if self.streaming:
            return tail
        frames = b"".join([*self._frames, tail])
        self._frames = []
        return mp3.info_frame(frames, self._lame.samples, self._lame) + frames


class _WriteOnlySink:
    """A file-like object without seek: FFmpeg muxers then write strictly forward."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._pieces.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._pieces)
        self._pieces.clear()
        return data
