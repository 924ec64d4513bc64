"""AAC-LC in ADTS: FFmpeg's encoder on several cores at once, its segments spliced at frame boundaries.

FFmpeg's AAC encoder (the two-loop coder, its default and best) is single-threaded and the slowest
step of a whole-file job. The signal is cut into one segment per core (up to `MAX_THREADS`, each at
least `MIN_SEGMENT_FRAMES` long, all of equal length so the cores finish together), each encoded
by its own encoder in a thread (PyAV releases the GIL while FFmpeg encodes) together with
`WARMUP_FRAMES` frames before it and `LOOKAHEAD_FRAMES` after it, so that around the cut both
encoders have seen the same signal for a while. Segments start on multiples of 1024 samples, so the
frames of every encoder line up with those of one continuous encode: frame k of any encoder covers
the same input samples.

Two neighbours are joined at a frame k near the cut where both encoders chose the same window for
frame k - 1 (sequence and shape). AAC frames carry no state from frame to frame in the bitstream
(no bit reservoir in ADTS); what joins them in the decoder is the overlap-add of frame k - 1's
second half with frame k's first half, and with equal windows on the same input it cancels the
time-domain aliasing exactly as within one encode. The splice is therefore as transparent as any
frame of a continuous encode (tests/test_aac.py compares them).

The bytes depend on the number of segments, so on the machine's core count, and on nothing else.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import numpy as np

FRAME = 1024  # samples per AAC-LC frame
MIN_SEGMENT_FRAMES = 128  # about 5.5 s at 24 kHz: below that, warm-up and look-ahead cost too much
WARMUP_FRAMES = 10  # frames an encoder sees before its segment (psychoacoustic and rate state settle)
LOOKAHEAD_FRAMES = 6  # frames after it (the window decision looks ahead; the end is flushed)
SPLICE_REACH = 3  # a splice may move this many frames either way from the cut
MAX_THREADS = 16
ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
SCE, FIL, END = 0, 6, 7  # syntax elements of a raw data block


def adts_header(sample_rate: int, payload_bytes: int) -> bytes:
    """A 7-byte ADTS header for one mono AAC-LC frame (as FFmpeg's muxer writes it: no CRC, VBR fullness)."""
    length = payload_bytes + 7
    if length >= 1 << 13:
        raise ValueError("an AAC frame is too large for ADTS")
    rate_index = ADTS_RATES.index(sample_rate)
    bits = (
        (0xFFF << 44) | (1 << 40)  # syncword, MPEG-4, layer 0, no CRC
        | (1 << 38) | (rate_index << 34) | (1 << 30)  # AAC LC, rate, mono
        | (length << 13) | (0x7FF << 2)  # frame length, buffer fullness "variable"
    )  # fmt: skip
    return bits.to_bytes(7, "big")


def window_of(packet: bytes) -> tuple[int, int] | None:
    """(window_sequence, window_shape) of a raw mono AAC frame, skipping fill elements; None if unreadable."""
    bits = int.from_bytes(packet[:300], "big")
    position = min(len(packet), 300) * 8

    def take(count: int) -> int:
        nonlocal position
        position -= count
        if position < 0:
            raise ValueError("truncated")
        return (bits >> position) & ((1 << count) - 1)

    try:
        while (element := take(3)) == FIL:
            count = take(4)
            if count == 15:
                count += take(8) - 1
            take(8 * count) if count else None
        if element != SCE:
            return None
        take(4 + 8 + 1)  # element tag, global gain, reserved bit
        return take(2), take(1)
    except ValueError:
        return None


class AacStream:
    """One continuous encode with FFmpeg's AAC encoder, fed piece by piece: raw frames out."""

    def __init__(self, sample_rate: int, bitrate_kbps: int):
        self.context = av.CodecContext.create("aac", "w")
        self.context.sample_rate = sample_rate
        self.context.layout = "mono"
        self.context.format = "fltp"
        self.context.bit_rate = bitrate_kbps * 1000
        self.samples = 0

    def encode(self, samples: np.ndarray) -> list[bytes]:
        if not samples.size:
            return []
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = self.context.sample_rate
        frame.pts = self.samples
        frame.time_base = Fraction(1, self.context.sample_rate)
        self.samples += samples.size
        return [bytes(packet) for packet in self.context.encode(frame)]

    def flush(self) -> list[bytes]:
        return [bytes(packet) for packet in self.context.encode(None)]


def encode_packets(samples: np.ndarray, sample_rate: int, bitrate_kbps: int) -> list[bytes]:
    """One continuous encode: raw frames, the first one the encoder's priming."""
    stream = AacStream(sample_rate, bitrate_kbps)
    return stream.encode(samples) + stream.flush()


def adts(frames: list[bytes], sample_rate: int) -> bytes:
    """Raw AAC frames as an ADTS stream (each frame behind its header)."""
    return b"".join(adts_header(sample_rate, len(frame)) + frame for frame in frames)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def segment_starts(total_frames: int, segments: int) -> list[int]:
    """The frame where each of (at most) `segments` equal segments begins, 0 first."""
    count = max(1, min(segments, total_frames // MIN_SEGMENT_FRAMES))
    return [index * total_frames // count for index in range(count)]


def _encode_segment(samples: np.ndarray, start: int, end: int | None, rate: int, kbps: int) -> tuple[int, list[bytes]]:
    """Frames [start, end) of the signal with warm-up and look-ahead; returns (first frame's index, frames)."""
    first = max(0, start - WARMUP_FRAMES)
    stop = None if end is None else (end + LOOKAHEAD_FRAMES) * FRAME
    return first, encode_packets(samples[first * FRAME : stop], rate, kbps)


def _splice_point(left: tuple[int, list[bytes]], right: tuple[int, list[bytes]], cut: int) -> int:
    """The frame k nearest `cut` at which both encoders chose the same window for frame k - 1."""
    (left_first, left_frames), (right_first, right_frames) = left, right
    for distance in range(SPLICE_REACH + 1):
        for frame in sorted({cut - distance, cut + distance}):
            before_left = window_of(left_frames[frame - 1 - left_first])
            if before_left is not None and before_left == window_of(right_frames[frame - 1 - right_first]):
                return frame
    # Every candidate disagrees (a run of transients): take the cut; the windows' overlap then
    # mismatches in one frame, as an encoder's own window switch would without its transition window.
    return cut


def encode_adts(samples: np.ndarray, sample_rate: int, bitrate_kbps: int, threads: int | None = None) -> bytes:
    """A whole signal as one ADTS file, its segments (one per thread) encoded in parallel and spliced."""
    workers = threads or min(MAX_THREADS, usable_cores())
    starts = segment_starts(math.ceil(samples.size / FRAME), workers)
    ends: list[int | None] = [*starts[1:], None]
    with ThreadPoolExecutor(max_workers=len(starts)) as pool:
        segments = list(pool.map(lambda span: _encode_segment(samples, *span, sample_rate, bitrate_kbps),
                                 zip(starts, ends, strict=True)))  # fmt: skip
    frames: list[bytes] = []
    taken = 0  # the global index of the next frame to take
    for number, (first, packets) in enumerate(segments):
        until = len(packets) + first
        if number + 1 < len(segments):
            until = _splice_point(segments[number], segments[number + 1], starts[number + 1])
        frames += packets[taken - first : until - first]
        taken = until
    return adts(frames, sample_rate)
