"""Rendering a job's audio: the engine's chunks in, encoded bytes out.

render          -> one file: joined, speed-changed, loudness-normalised, resampled and encoded
StreamRenderer  -> the same piece by piece as frames arrive, for streamed jobs (no loudness
                   normalisation: it needs the whole signal)
LevelTracker    -> the loudness and true peak `render` normalises by, measured while the engine
                   generates, so `render` only applies the gain
(where chunks, pauses and words lie in the delivered audio: timeline.py, recorded by both)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from audio import dsp, formats
from config import MODEL_SAMPLE_RATE, Settings
from inference import ChunkAudio
from jobs.planning import JobPlan
from jobs.timeline import Layout, Placement, assemble, pause_samples
from text.script import Chunk


@dataclass
class AudioSummary:
    """What a result reports about the delivered audio, whole file or stream alike."""

    duration_sec: float
    loudness: dict  # dsp.LoudnessReport.as_dict()
    placements: list[Placement]  # where each chunk lies in the delivered audio (timeline.Layout)
    encode_seconds: float
    postprocess_seconds: float | None = None  # whole files: joining, speed, loudness and resampling


@dataclass
class Rendered:
    data: bytes
    summary: AudioSummary


def render(plan: JobPlan, results: list[ChunkAudio], settings: Settings, level: dsp.Level | None = None) -> Rendered:
    """Join (gaps between chunks, pauses between sections), change speed, normalise loudness,
    resample and encode into one file.

    `level` is the signal's level measured during generation (`LevelTracker`); without it (or if
    it was measured on a signal of another length) the level is measured here.
    """
    started = time.perf_counter()
    stretched, layout = assemble(plan.chunks, results, gap_samples(settings), plan.speed, plan.script.lead_pause_ms)
    if plan.normalize:
        if level is not None and level.samples != stretched.size:
            level = None  # measured on another signal than the one built here: measure this one
        # In place: `stretched` is this function's own copy (the joined or time-stretched signal).
        stretched, report = dsp.normalize_loudness(
            stretched, MODEL_SAMPLE_RATE, plan.target_lufs, in_place=True, level=level
        )
    else:
        report = dsp.LoudnessReport(False, plan.target_lufs, reason="normalize is false")
    output = dsp.resample(stretched, MODEL_SAMPLE_RATE, plan.sample_rate)
    postprocess_seconds = time.perf_counter() - started

    started = time.perf_counter()
    data = formats.encode(output, plan.output_format, plan.sample_rate, plan.bitrate_kbps)
    summary = AudioSummary(
        duration_sec=output.size / plan.sample_rate,
        loudness=report.as_dict(),
        placements=layout.placements,
        encode_seconds=time.perf_counter() - started,
        postprocess_seconds=postprocess_seconds,
    )
    return Rendered(data=data, summary=summary)


def gap_samples(settings: Settings) -> int:
    """The silence between two chunks, in samples at the model's rate."""
    return round(settings.chunk_gap_ms * MODEL_SAMPLE_RATE / 1000)


class LevelTracker:
    """The level `render` normalises by, measured while the engine generates the audio.

    Takes engine.synthesize's `on_audio` and `on_chunk` callbacks and feeds the signal `render`
    assembles (timeline.assemble: the lead pause, chunks in order, the gap after a chunk or the
    pause its text asked for) to a `dsp.LevelMeter`, whose result equals the measurement
    `render` would make on the whole signal, bit for bit. Only at speed 1 and when normalising:
    with a speed change the signal to measure comes out of the time-stretch, after generation.
    """

    def __init__(self, plan: JobPlan, settings: Settings):
        self.enabled = plan.normalize and plan.speed == 1.0
        self.gap = np.zeros(gap_samples(settings), dtype=np.float32)
        self.pause_after = {chunk.index: chunk.pause_after_ms for chunk in plan.chunks}
        self.meter = dsp.LevelMeter(MODEL_SAMPLE_RATE)
        self._chunks_done = 0
        if self.enabled and plan.script.lead_pause_ms:
            self.meter.add(np.zeros(pause_samples(plan.script.lead_pause_ms), dtype=np.float32))

    def on_audio(self, index: int, samples: np.ndarray) -> None:
        if self.enabled:
            self.meter.add(samples)

    def on_chunk(self, result: ChunkAudio, total: int) -> None:
        self._chunks_done += 1
        if not self.enabled:
            return
        if self.pause_after.get(result.index):
            self.meter.add(np.zeros(pause_samples(self.pause_after[result.index]), dtype=np.float32))
        elif self._chunks_done < total:
            self.meter.add(self.gap)

    def level(self) -> dsp.Level | None:
        return self.meter.level() if self.enabled else None


STREAM_LOUDNESS_REASON = (
    "streaming: loudness normalisation needs the whole signal, so streamed audio keeps the model's level"
)


class StreamRenderer:
    """`render` for streamed jobs: model audio in, encoded bytes out, piece by piece.

    Audio arrives in chunk order (`audio()`), with `chunk_done()` after each chunk for the silent
    gap or the pause that follows it. It passes through the same steps as `render` in the same
    order, each kept stateful across pieces (speed, resample, encode), and leaves in pieces of at
    least `stream_chunk_ms` of audio, so the bytes handed out concatenate to one valid file whose
    pcm_16/wav samples equal `render`'s with normalize off. A pause closes the speed change of its
    section and goes in after it, as in `render`, so both record the same `layout`. Loudness is
    not normalised (it needs the whole signal); it is measured on the way out and reported.
    """

    def __init__(self, plan: JobPlan, settings: Settings):
        self.plan = plan
        self.gap_samples = gap_samples(settings)
        self.piece_samples = max(1, round(plan.stream_chunk_ms * MODEL_SAMPLE_RATE / 1000))
        self.speed = self._speed_changer()
        self.resampler = dsp.StreamResampler(MODEL_SAMPLE_RATE, plan.sample_rate)
        self.encoder = formats.open_encoder(plan.output_format, plan.sample_rate, plan.bitrate_kbps, streaming=True)
        self.loudness = dsp.LoudnessMeter(plan.sample_rate)
        self.peak = dsp.TruePeakMeter()
        self.layout = Layout()
        self.section_joined = 0  # model-rate samples of the open section, gaps included
        self.section_stretched = 0  # the same after the speed change
        self.output_samples = 0  # samples at the output rate
        self.encode_seconds = 0.0
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._lead_pause = plan.script.lead_pause_ms

    def audio(self, samples: np.ndarray) -> list[bytes]:
        """Take decoded audio; return the encoded pieces now complete (possibly none)."""
        pieces = self._begin()
        self._pending.append(samples)
        self._pending_samples += samples.size
        while self._pending_samples >= self.piece_samples:
            joined = np.concatenate(self._pending)
            pieces.append(self._encode(joined[: self.piece_samples]))
            rest = joined[self.piece_samples :]
            self._pending, self._pending_samples = ([rest] if rest.size else []), rest.size
        return [piece for piece in pieces if piece]

    def chunk_done(self, chunk: Chunk, samples: int, last: bool) -> list[bytes]:
        """After a chunk of `samples` samples: its pause, or (unless it is the last) the gap."""
        pieces = self._begin()
        self.layout.chunk(chunk.index, samples)
        if chunk.pause_after_ms:
            pieces += self._pause(chunk.pause_after_ms)
        elif not last:
            self.layout.gap(self.gap_samples)
            pieces += self.audio(np.zeros(self.gap_samples, dtype=np.float32))
        return [piece for piece in pieces if piece]

    @property
    def section_scale(self) -> float:
        """The open section's speed ratio as measured so far."""
        return self.section_stretched / self.section_joined if self.section_joined else 1 / self.plan.speed

    def finish(self) -> bytes:
        """The last piece: what is pending, then everything the stateful steps still hold."""
        started = time.perf_counter()
        data = b"".join(self._begin() + self._end_section())
        tail = self.resampler.close()
        self._measure(tail)
        data += self.encoder.write(tail) + self.encoder.close()
        self.encode_seconds += time.perf_counter() - started
        return data

    def _begin(self) -> list[bytes]:
        """The pause before the first words, once, before anything else."""
        lead, self._lead_pause = self._lead_pause, 0
        return self._pause(lead) if lead else []

    def _end_section(self) -> list[bytes]:
        """Encode what is pending and what the speed change holds; the section's length is known."""
        pieces = [self._encode(np.concatenate(self._pending))] if self._pending else []
        self._pending, self._pending_samples = [], 0
        if self.speed is not None:
            pieces.append(self._resample_encode(self.speed.close()))
            self.speed = self._speed_changer()
        self.layout.end_section(self.section_stretched)
        self.section_joined = self.section_stretched = 0
        return pieces

    def _pause(self, milliseconds: int) -> list[bytes]:
        """Exact silence after the open section's speed change (as `render` puts it)."""
        pieces = self._end_section()
        samples = pause_samples(milliseconds)
        self.layout.pause(samples)
        pieces.append(self._resample_encode(np.zeros(samples, dtype=np.float32), stretched=False))
        return pieces

    def _speed_changer(self) -> dsp.SpeedChanger | None:
        return dsp.SpeedChanger(MODEL_SAMPLE_RATE, self.plan.speed) if self.plan.speed != 1.0 else None

    def _encode(self, samples: np.ndarray) -> bytes:
        self.section_joined += samples.size
        if self.speed is not None:
            samples = self.speed.write(samples)
        return self._resample_encode(samples)

    def _resample_encode(self, samples: np.ndarray, stretched: bool = True) -> bytes:
        started = time.perf_counter()
        if stretched:
            self.section_stretched += samples.size
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
        report = dsp.LoudnessReport(
            applied=False,
            target_lufs=self.plan.target_lufs,
            measured_lufs=self.loudness.integrated(),
            true_peak_dbtp=self.peak.dbtp(),
            reason=reason,
        )
        return AudioSummary(
            duration_sec=self.output_samples / self.plan.sample_rate,
            loudness=report.as_dict(),
            placements=self.layout.placements,
            encode_seconds=self.encode_seconds,
        )
