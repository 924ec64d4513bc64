"""Rendering a job's audio: the engine's chunks in, encoded bytes out.

render          -> one file: joined, speed-changed, loudness-normalised, resampled and encoded
StreamRenderer  -> the same piece by piece as frames arrive, for streamed jobs (no loudness
                   normalisation: it needs the whole signal)
build_segments  -> where each chunk lies in the delivered audio, for either of them
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

import audio
import encoders
from config import MODEL_SAMPLE_RATE, Settings
from inference import ChunkAudio
from planning import JobPlan


@dataclass
class AudioSummary:
    """What a result reports about the delivered audio, whole file or stream alike."""

    duration_sec: float
    loudness: dict  # audio.LoudnessReport.as_dict()
    time_scale: float  # output duration / joined duration (the speed change), for the segments' times
    gap_samples: int  # silence between chunks, at the model's rate
    encode_seconds: float
    postprocess_seconds: float | None = None  # whole files: joining, speed, loudness and resampling


@dataclass
class Rendered:
    data: bytes
    summary: AudioSummary


def chunk_spans(results: list[ChunkAudio], gap_samples: int) -> list[tuple[int, int]]:
    """Each chunk's sample span in the joined signal (chunks in order, silent gaps between)."""
    spans = []
    position = 0
    for number, result in enumerate(results):
        if number:
            position += gap_samples
        spans.append((position, position + result.audio.size))
        position += result.audio.size
    return spans


def join_chunks(results: list[ChunkAudio], gap_samples: int) -> np.ndarray:
    """Concatenate chunk audio with silent gaps (their spans: `chunk_spans`)."""
    gap = np.zeros(gap_samples, dtype=np.float32)
    pieces: list[np.ndarray] = []
    for number, result in enumerate(results):
        if number:
            pieces.append(gap)
        pieces.append(result.audio)
    signal = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return signal.astype(np.float32, copy=False)


def render(plan: JobPlan, results: list[ChunkAudio], settings: Settings) -> Rendered:
    """Join, change speed, normalise loudness, resample and encode into one file."""
    started = time.perf_counter()
    gap = gap_samples(settings)
    signal = join_chunks(results, gap)
    stretched = audio.change_speed(signal, MODEL_SAMPLE_RATE, plan.speed)
    # atempo scales time uniformly, so chunk spans scale by the same measured ratio.
    time_scale = stretched.size / signal.size if signal.size else 1.0
    if plan.normalize:
        # In place: `stretched` is this function's own copy (the joined or time-stretched signal).
        stretched, report = audio.normalize_loudness(stretched, MODEL_SAMPLE_RATE, plan.target_lufs, in_place=True)
    else:
        report = audio.LoudnessReport(False, plan.target_lufs, reason="normalize is false")
    output = audio.resample(stretched, MODEL_SAMPLE_RATE, plan.sample_rate)
    postprocess_seconds = time.perf_counter() - started

    started = time.perf_counter()
    data = encoders.encode(output, plan.output_format, plan.sample_rate, plan.bitrate_kbps)
    summary = AudioSummary(
        duration_sec=output.size / plan.sample_rate,
        loudness=report.as_dict(),
        time_scale=time_scale,
        gap_samples=gap,
        encode_seconds=time.perf_counter() - started,
        postprocess_seconds=postprocess_seconds,
    )
    return Rendered(data=data, summary=summary)


def gap_samples(settings: Settings) -> int:
    """The silence between two chunks, in samples at the model's rate."""
    return round(settings.chunk_gap_ms * MODEL_SAMPLE_RATE / 1000)


STREAM_LOUDNESS_REASON = (
    "streaming: loudness normalisation needs the whole signal, so streamed audio keeps the model's level"
)


class StreamRenderer:
    """`render` for streamed jobs: model audio in, encoded bytes out, piece by piece.

    Audio arrives in chunk order (`audio()`), with `chunk_done()` between chunks for the silent
    gap. It passes through the same steps as `render` in the same order, each kept stateful
    across pieces (speed, resample, encode), and leaves in pieces of at least `stream_chunk_ms`
    of audio, so the bytes handed out concatenate to one valid file whose pcm_16/wav samples
    equal `render`'s with normalize off. Loudness is not normalised (it needs the whole signal);
    it is measured on the way out and reported.
    """

    def __init__(self, plan: JobPlan, settings: Settings):
        self.plan = plan
        self.gap_samples = gap_samples(settings)
        self.piece_samples = max(1, round(plan.stream_chunk_ms * MODEL_SAMPLE_RATE / 1000))
        self.speed = audio.SpeedChanger(MODEL_SAMPLE_RATE, plan.speed) if plan.speed != 1.0 else None
        self.resampler = audio.StreamResampler(MODEL_SAMPLE_RATE, plan.sample_rate)
        self.encoder = encoders.open_encoder(plan.output_format, plan.sample_rate, plan.bitrate_kbps, streaming=True)
        self.loudness = audio.LoudnessMeter(plan.sample_rate)
        self.peak = audio.TruePeakMeter()
        self.joined_samples = 0  # model-rate samples in, gaps included
        self.stretched_samples = 0  # model-rate samples after the speed change
        self.output_samples = 0  # samples at the output rate
        self.encode_seconds = 0.0
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0

    def audio(self, samples: np.ndarray) -> list[bytes]:
        """Take decoded audio; return the encoded pieces now complete (possibly none)."""
        self._pending.append(samples)
        self._pending_samples += samples.size
        pieces = []
        while self._pending_samples >= self.piece_samples:
            joined = np.concatenate(self._pending)
            pieces.append(self._encode(joined[: self.piece_samples]))
            rest = joined[self.piece_samples :]
            self._pending, self._pending_samples = ([rest] if rest.size else []), rest.size
        return [piece for piece in pieces if piece]

    def chunk_done(self) -> list[bytes]:
        """Between two chunks: the silent gap `render` puts there."""
        return self.audio(np.zeros(self.gap_samples, dtype=np.float32))

    def finish(self) -> bytes:
        """The last piece: what is pending, then everything the stateful steps still hold."""
        started = time.perf_counter()
        data = self._encode(np.concatenate(self._pending)) if self._pending else b""
        self._pending, self._pending_samples = [], 0
        tail = np.zeros(0, dtype=np.float32)
        if self.speed is not None:
            stretched = self.speed.close()
            self.stretched_samples += stretched.size
            tail = self.resampler.write(stretched)
        tail = np.concatenate([tail, self.resampler.close()])
        self._measure(tail)
        data += self.encoder.write(tail) + self.encoder.close()
        self.encode_seconds += time.perf_counter() - started
        return data

    def _encode(self, samples: np.ndarray) -> bytes:
        started = time.perf_counter()
        self.joined_samples += samples.size
        if self.speed is not None:
            samples = self.speed.write(samples)
        self.stretched_samples += samples.size
        out = self.resampler.write(samples)
        self._measure(out)
        data = self.encoder.write(out)
        self.encode_seconds += time.perf_counter() - started
        return data

    def _measure(self, samples: np.ndarray) -> None:
        self.output_samples += samples.size
        self.loudness.add(samples)
        self.peak.add(samples)

    def summary(self) -> AudioSummary:
        """What the stream delivered, once `finish` has run."""
        reason = STREAM_LOUDNESS_REASON if self.plan.normalize else "normalize is false"
        report = audio.LoudnessReport(
            applied=False,
            target_lufs=self.plan.target_lufs,
            measured_lufs=self.loudness.integrated(),
            true_peak_dbtp=self.peak.dbtp(),
            reason=reason,
        )
        return AudioSummary(
            duration_sec=self.output_samples / self.plan.sample_rate,
            loudness=report.as_dict(),
            time_scale=self.stretched_samples / self.joined_samples if self.joined_samples else 1.0,
            gap_samples=self.gap_samples,
            encode_seconds=self.encode_seconds,
        )


def build_segments(plan: JobPlan, results: list[ChunkAudio], summary: AudioSummary) -> list[dict]:
    """One segment per chunk: its speakers, its text and where it lies in the delivered audio."""
    by_index = {chunk.index: chunk for chunk in plan.chunks}
    segments = []
    for result, (start, end) in zip(results, chunk_spans(results, summary.gap_samples), strict=True):
        chunk = by_index[result.index]
        labels = [plan.script.label(speaker) for speaker in chunk.speakers]
        if len(chunk.turns) == 1:
            spoken = chunk.turns[0].text
        else:
            spoken = "\n".join(f"{plan.script.label(turn.speaker)}: {turn.text}" for turn in chunk.turns)
        segments.append(
            {
                "index": chunk.index,
                "speaker": plan.script.label(chunk.turns[0].speaker),
                "speakers": labels,
                "text": spoken,
                "start_sec": _seconds(start * summary.time_scale),
                "end_sec": _seconds(end * summary.time_scale),
            }
        )
    return segments


def _seconds(samples: float) -> float:
    return math.floor(samples / MODEL_SAMPLE_RATE * 1000 + 0.5) / 1000
