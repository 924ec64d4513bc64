"""Untrusted audio in: reference voices decoded within limits that hold before their cost is paid.

A reference clip arrives as bytes from a job (base64 or a URL) or from the voices folder. A few
megabytes of FLAC, low-bitrate MP3 or Opus can hold hours of audio, and a header can claim
anything, so nothing here trusts what a file says about itself:

- the container is recognised from its first bytes and opened with that demuxer only (no
  playlists or other formats that FFmpeg would open from a guess);
- the streams, their codecs, sample rates, channel counts and metadata are checked before the
  first frame is decoded;
- decoding counts the samples it has produced and stops the moment the clip passes
  `max_seconds`, so a refused clip never costs more memory or time than an allowed one;
- every decoded piece is checked for NaN, infinity and absurd magnitudes as it arrives.

Errors are `dsp.AudioError` (a sentence fragment the caller prefixes with the field) or
`TooLong`, which the caller turns into the duration sentence.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np

from audio.dsp import AudioError

# Containers by their first bytes -> (FFmpeg demuxer, what the user calls it).
MAGIC: tuple[tuple[int, bytes, str, str], ...] = (
    (0, b"RIFF", "wav", "wav"),
    (0, b"RF64", "wav", "wav"),
    (0, b"fLaC", "flac", "flac"),
    (0, b"OggS", "ogg", "ogg"),
    (4, b"ftyp", "mp4", "m4a"),
    (0, b"\x1a\x45\xdf\xa3", "matroska", "webm"),
)
ACCEPTED = "wav, mp3, flac, ogg (Vorbis or Opus), m4a/aac or webm"
# Decoders a voice may use: the codecs of the accepted containers, nothing exotic.
CODECS = frozenset(
    {"mp3", "mp3float", "flac", "vorbis", "opus", "libopus", "aac", "pcm_u8", "pcm_mulaw", "pcm_alaw"}
    | {f"pcm_{kind}{bits}{end}" for kind in ("s", "f") for bits in (16, 24, 32, 64) for end in ("le", "be")}
)
MIN_RATE, MAX_RATE = 8_000, 192_000  # Hz; outside this no recording of a voice exists
MAX_CHANNELS = 8
MAX_STREAMS = 8  # audio plus cover art and the odd data track; more is not a voice recording
MAX_METADATA_CHARS = 1_000_000  # tags of every stream together (titles, lyrics, comments)
# The shortest packet of the accepted codecs is 2.5 ms (Opus); a packet count far beyond what
# `max_seconds` can hold ends decoding even if packets decode to nothing.
MIN_PACKET_SECONDS = 0.0025
MAX_PROBE_BYTES = 5_000_000  # what FFmpeg may read to find the streams
MAX_SAMPLE_MAGNITUDE = 1000.0  # 60 dB over full scale: no recording, only a broken float file


class TooLong(AudioError):
    """The clip holds more than the allowed seconds of audio (decoding stopped there)."""

    def __init__(self, max_seconds: float, decoded_seconds: float):
        super().__init__(f"longer than {max_seconds:g} s of audio")
        self.max_seconds = max_seconds
        self.decoded_seconds = decoded_seconds  # where decoding stopped: the work actually done


@dataclass
class Decoded:
    samples: np.ndarray  # mono float32 at the requested rate
    source_rate: int
    channels: int
    container: str
    input_seconds: float  # what was decoded, at the source rate (counted, not declared)
    packets: int


def sniff(data: bytes) -> tuple[str, str]:
    """(FFmpeg demuxer, display name) from the first bytes; an ID3 tag in front is skipped."""
    head = data[:64]
    for offset, magic, demuxer, name in MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return demuxer, name
    start = _after_id3(data)
    frame = data[start : start + 2]
    if start and data[start : start + 4] == b"fLaC":
        return "flac", "flac"
    if len(frame) == 2 and frame[0] == 0xFF and frame[1] & 0xE0 == 0xE0:
        layer = (frame[1] >> 1) & 0b11
        return ("aac", "aac") if layer == 0 and frame[1] & 0xF0 == 0xF0 else ("mp3", "mp3")
    raise AudioError(f"the audio format is not recognised; send {ACCEPTED}")


def _after_id3(data: bytes) -> int:
    """Where the audio starts after any ID3v2 tags (their size is syncsafe: 7 bits per byte)."""
    position = 0
    while data[position : position + 3] == b"ID3" and len(data) >= position + 10:
        size = 0
        for byte in data[position + 6 : position + 10]:
            size = (size << 7) | (byte & 0x7F)
        footer = 10 if data[position + 5] & 0x10 else 0
        position += 10 + size + footer
    return position


def decode(data: bytes, sample_rate: int, max_seconds: float) -> Decoded:
    """Decode a clip to mono float32 at `sample_rate`, refusing it once it passes `max_seconds`.

    Raises TooLong for a clip longer than `max_seconds`, AudioError for anything else wrong.
    """
    if not data:
        raise AudioError("the audio is empty")
    demuxer, name = sniff(data)
    try:
        with av.open(
            io.BytesIO(data), mode="r", format=demuxer, options={"probesize": str(MAX_PROBE_BYTES)}
        ) as container:
            stream = _checked_stream(container)
            return _decode_stream(container, stream, name, sample_rate, max_seconds)
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OverflowError, MemoryError) as exc:
        raise AudioError(f"the {name} audio could not be decoded ({_ffmpeg_reason(exc)})") from None


def _checked_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream:
    """The first audio stream, once the container's shape and the stream's format are sane."""
    if len(container.streams) > MAX_STREAMS:
        raise AudioError(f"the file has {len(container.streams)} streams; a voice recording has at most {MAX_STREAMS}")
    tags = [container.metadata, *(s.metadata for s in container.streams)]
    if sum(len(k) + len(v) for meta in tags for k, v in meta.items()) > MAX_METADATA_CHARS:
        raise AudioError(f"the file's metadata is larger than {MAX_METADATA_CHARS // 1000} kB")
    if not container.streams.audio:
        raise AudioError("the file has no audio stream")
    stream = container.streams.audio[0]
    context = stream.codec_context  # None, or without a codec, for a tag FFmpeg has no decoder for
    codec = context.codec.name if context is not None and context.codec is not None else "(unknown)"
    if codec not in CODECS:
        raise AudioError(f"the audio codec {codec} is not supported; send {ACCEPTED}")
    _check_format(context.sample_rate, context.channels)
    return stream


def _check_format(rate: int, channels: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"the audio's sample rate is {rate} Hz; it must be from {MIN_RATE} to {MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"the audio has {channels} channels; at most {MAX_CHANNELS} are supported")


def _decode_stream(container, stream, name: str, sample_rate: int, max_seconds: float) -> Decoded:
    """Decode packet by packet, counting input samples; stop as soon as a limit is passed."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    max_packets = math.ceil(max_seconds / MIN_PACKET_SECONDS) + 64
    pieces: list[np.ndarray] = []
    seconds = 0.0  # decoded so far, at the source rate
    packets = 0
    rate = stream.codec_context.sample_rate
    for packet in container.demux(stream):
        packets += 1
        if packets > max_packets:
            raise TooLong(max_seconds, seconds)
        for frame in packet.decode():
            _check_format(frame.sample_rate, frame.layout.nb_channels)
            rate = frame.sample_rate
            seconds += frame.samples / frame.sample_rate
            if seconds > max_seconds:
                raise TooLong(max_seconds, seconds)
            frame.pts = None  # let the resampler count samples itself (some demuxers give none)
            pieces.extend(_finite(out.to_ndarray().reshape(-1)) for out in resampler.resample(frame))
    pieces.extend(_finite(out.to_ndarray().reshape(-1)) for out in resampler.resample(None))
    if not pieces:
        raise AudioError("the audio has no samples")
    samples = np.concatenate(pieces).astype(np.float32, copy=False)
    channels = stream.codec_context.channels
    return Decoded(samples, rate, channels, name, seconds, packets)


def _finite(piece: np.ndarray) -> np.ndarray:
    """A decoded piece, once its values are numbers a recording can hold (float formats can hold any)."""
    if not np.isfinite(piece).all():
        raise AudioError("the audio contains invalid sample values (NaN or infinity)")
    if piece.size and float(np.max(np.abs(piece))) > MAX_SAMPLE_MAGNITUDE:
        raise AudioError("the audio's sample values are far outside the range -1 to 1")
    return piece


def _ffmpeg_reason(exc: Exception) -> str:
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return reason.split(":")[0].strip().rstrip(".").lower()
