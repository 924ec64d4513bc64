"""AAC in segments on several cores (aac.py): one segment is FFmpeg's file, and splices are transparent.

The reference is one continuous encode by the same FFmpeg encoder. The segment length is made short
here (so seconds of audio have splices); the splice logic does not depend on it. Quality is compared
by SNR against the input: both are the same FFmpeg encoder at the same settings, so the question is
only what the splices and the restarted encoders cost.
"""

from __future__ import annotations

import numpy as np
import pytest
from audio_helpers import probe

import aac
import encoders
from formats import FORMATS
from tools.local_home import synthetic_voice

RATE = 24000
SPEECH = np.concatenate([synthetic_voice(f0, seed, seconds=3.0) for f0, seed in ((210.0, 1), (115.0, 2), (160.0, 3))])


def continuous(samples: np.ndarray, kbps: int = 128) -> bytes:
    return aac.adts(aac.encode_packets(samples, RATE, kbps), RATE)


def decoded(data: bytes, size: int) -> np.ndarray:
    """The decoded signal aligned with the input (ADTS cannot signal the encoder's 1024-sample priming)."""
    return probe(data, container="aac").samples[aac.FRAME : aac.FRAME + size]


def snr_db(reference: np.ndarray, signal: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - signal) ** 2)))


THREADS = 3  # 3 segments of about 3 s: 2 splices in 9 s of speech


@pytest.fixture()
def short_segments(monkeypatch):
    monkeypatch.setattr(aac, "MIN_SEGMENT_FRAMES", 64)


def test_one_segment_is_ffmpegs_own_adts_file_byte_for_byte() -> None:
    """Below two segments nothing is split: the bytes are what FFmpeg's encoder and ADTS muxer give."""
    signal = SPEECH[: RATE * 5]
    before = encoders.FFmpegEncoder(FORMATS["aac"], RATE, 96, streaming=False)
    assert encoders.encode(signal, "aac", RATE, 96) == before.write(signal) + before.close()


def test_splices_are_as_transparent_as_a_continuous_encode(short_segments) -> None:
    spliced = aac.encode_adts(SPEECH, RATE, 128, threads=THREADS)
    whole = continuous(SPEECH)
    ours, reference = decoded(spliced, SPEECH.size), decoded(whole, SPEECH.size)
    assert probe(spliced, container="aac").samples.size == probe(whole, container="aac").samples.size
    # Over the whole signal: the same quality at the same bitrate (FFmpeg's rate control drifts by a
    # percent or so with what an encoder has seen before; one silent frame in front moves it as much).
    assert snr_db(SPEECH, ours) > snr_db(SPEECH, reference) - 0.3
    assert len(spliced) == pytest.approx(len(whole), rel=0.03)
    # Around every splice: no click, no aliasing left over (error as small as the continuous encode's there).
    starts = aac.segment_starts(-(-SPEECH.size // aac.FRAME), THREADS)
    assert len(starts) == 3
    for cut in starts[1:]:
        around = slice((cut - 6) * aac.FRAME, (cut + 6) * aac.FRAME)
        local_ours = snr_db(SPEECH[around], ours[around])
        local_reference = snr_db(SPEECH[around], reference[around])
        assert local_ours > local_reference - 2.0, (cut, local_ours, local_reference)
        assert np.max(np.abs(SPEECH[around] - ours[around])) < 3 * np.max(np.abs(SPEECH[around] - reference[around]))


def test_splices_join_equal_windows(short_segments) -> None:
    """Each splice is at a frame whose predecessor has the same window in both encoders."""
    starts = aac.segment_starts(-(-SPEECH.size // aac.FRAME), THREADS)
    ends = [*starts[1:], None]
    segments = [aac._encode_segment(SPEECH, start, end, RATE, 128) for start, end in zip(starts, ends, strict=True)]
    for number, cut in enumerate(starts[1:]):
        left, right = segments[number], segments[number + 1]
        frame = aac._splice_point(left, right, cut)
        assert abs(frame - cut) <= aac.SPLICE_REACH
        assert aac.window_of(left[1][frame - 1 - left[0]]) == aac.window_of(right[1][frame - 1 - right[0]])


def test_segments_follow_the_cores_and_the_bytes_nothing_else(short_segments) -> None:
    frames = -(-SPEECH.size // aac.FRAME)
    assert aac.segment_starts(frames, 1) == [0] and aac.segment_starts(frames, 16) == [0, 70, 140]  # >= 64 each
    assert aac.encode_adts(SPEECH, RATE, 64, threads=THREADS) == aac.encode_adts(SPEECH, RATE, 64, threads=THREADS)
    assert aac.encode_adts(SPEECH, RATE, 64, threads=1) == aac.adts(aac.encode_packets(SPEECH, RATE, 64), RATE)


def test_window_of_reads_ffmpegs_frames() -> None:
    """Fill elements (FFmpeg's encoder name, every 256 frames) are skipped; short windows occur in speech."""
    frames = aac.encode_packets(np.tile(SPEECH, 3), RATE, 128)
    windows = [aac.window_of(frame) for frame in frames]
    assert None not in windows
    assert frames[0][:1] != frames[1][:1]  # the first frame starts with the fill element
    sequences = {sequence for sequence, _ in windows}
    assert sequences == {0, 1, 2, 3}  # long, start, eight short, stop
    assert aac.window_of(b"\x80") is None  # not a single-channel element


def test_adts_header_fields() -> None:
    header = aac.adts_header(24000, 300)
    bits = int.from_bytes(header, "big")
    assert bits >> 44 == 0xFFF and (bits >> 40) & 1 == 1  # syncword, no CRC
    assert (bits >> 34) & 0xF == aac.ADTS_RATES.index(24000) and (bits >> 30) & 7 == 1
    assert (bits >> 13) & 0x1FFF == 307
