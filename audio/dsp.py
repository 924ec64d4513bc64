"""Audio out, in-process: resampling, loudness and speed (encoding is in encoders.py).

Everything works on float32 mono numpy arrays, with FFmpeg's filters through PyAV where it has
them, so no job starts a subprocess. Untrusted audio coming in (reference voices) is decoded by
untrusted.py, within limits.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pyloudnorm
import scipy.signal
from scipy.signal import resample_poly

LOUDNESS_MIN_SECONDS = 0.4  # one gating block of ITU-R BS.1770
SILENCE_LUFS = -70.0  # the absolute gate: anything quieter is treated as silence
TRUE_PEAK_CEILING_DBTP = -1.0


class AudioError(ValueError):
    """Audio could not be decoded or processed; the message is one sentence for the user."""


# --- resampling, speed, loudness -------------------------------------------------------------


RESAMPLE_WINDOW = ("kaiser", 8.0)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling with a Kaiser-windowed FIR low-pass (no linear interpolation)."""
    if from_rate == to_rate or samples.size == 0:
        return samples
    ratio = Fraction(to_rate, from_rate)
    out = resample_poly(samples, ratio.numerator, ratio.denominator, window=RESAMPLE_WINDOW)
    return out.astype(np.float32, copy=False)


class StreamResampler:
    """`resample`, fed piece by piece: the pieces it returns concatenate to `resample(whole)`.

    Each output sample is computed from a window of the input around it that is wide enough for
    the whole filter (and starts at a multiple of the decimation factor, so the window's output
    grid is the whole signal's), so it is the very value the whole-signal call computes. An output
    is handed out once the input it depends on has arrived; `close()` hands out the rest.
    """

    def __init__(self, from_rate: int, to_rate: int):
        ratio = Fraction(to_rate, from_rate)
        self.up, self.down = ratio.numerator, ratio.denominator
        self.passthrough = from_rate == to_rate
        # resample_poly's filter reaches 10 * max(up, down) taps of the upsampled signal each side.
        self.context = math.ceil(10 * max(self.up, self.down) / self.up) + 2
        self._buffer = np.zeros(0, dtype=np.float32)  # input from absolute index self._start on
        self._start = 0
        self._received = 0
        self._next = 0  # index of the next output sample

    def write(self, samples: np.ndarray) -> np.ndarray:
        if self.passthrough:
            return samples
        self._buffer = np.concatenate([self._buffer, samples.astype(np.float32, copy=False)])
        self._received += samples.size
        ready = (self._received - self.context) * self.up // self.down  # outputs with their input all here
        return self._produce(ready) if ready > self._next else np.zeros(0, dtype=np.float32)

    def close(self) -> np.ndarray:
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        total = -(-self._received * self.up // self.down)  # the whole signal's output length
        return self._produce(total) if total > self._next else np.zeros(0, dtype=np.float32)

    def _window_start(self, output: int) -> int:
        first_input = max(0, output * self.down // self.up - self.context)
        return first_input // self.down * self.down

    def _produce(self, end: int) -> np.ndarray:
        start = self._window_start(self._next)
        window = self._buffer[start - self._start :]
        resampled = resample_poly(window, self.up, self.down, window=RESAMPLE_WINDOW)
        offset = start * self.up // self.down
        out = resampled[self._next - offset : end - offset].astype(np.float32)
        self._next = end
        keep = self._window_start(self._next)
        self._buffer = self._buffer[keep - self._start :]
        self._start = keep
        return out


def _atempo_factors(speed: float) -> list[float]:
    """One atempo instance covers 0.5..2.0 with the best quality; chain them beyond."""
    factors = []
    remaining = speed
    while remaining > 2.0:
        factors.append(2.0)
        remaining /= 2.0
    while remaining < 0.5:
        factors.append(0.5)
        remaining /= 0.5
    factors.append(remaining)
    return factors


class SpeedChanger:
    """Time-stretch by `speed` without changing pitch (FFmpeg's WSOLA `atempo`), piece by piece.

    The filter graph keeps its state between pieces; its output does not depend on how the input
    is cut (the pieces concatenate to what one whole push gives).
    """

    def __init__(self, sample_rate: int, speed: float):
        self.sample_rate = sample_rate
        self._pts = 0
        self._graph = av.filter.Graph()
        nodes = [
            self._graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono", time_base=f"1/{sample_rate}")
        ]
        nodes += [self._graph.add("atempo", f"{factor:.6f}") for factor in _atempo_factors(speed)]
        nodes.append(self._graph.add("abuffersink"))
        for left, right in itertools.pairwise(nodes):
            left.link_to(right)
        self._graph.configure()

    def write(self, samples: np.ndarray) -> np.ndarray:
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            frame.time_base = Fraction(1, self.sample_rate)
            self._pts += samples.size
            self._graph.push(frame)
        return self._pull()

    def close(self) -> np.ndarray:
        self._graph.push(None)
        return self._pull()

    def _pull(self) -> np.ndarray:
        pieces = []
        while True:
            try:
                pieces.append(self._graph.pull().to_ndarray().reshape(-1))
            except (av.error.EOFError, av.error.BlockingIOError):
                break
        return np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.zeros(0, dtype=np.float32)


def change_speed(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Time-stretch by `speed` without changing pitch; the duration becomes duration / speed."""
    if speed == 1.0 or samples.size == 0:
        return samples
    changer = SpeedChanger(sample_rate, speed)
    out = changer.write(samples)
    return np.concatenate([out, changer.close()])


# Signals are measured and encoded in blocks of this many samples, so no step holds more than a
# block's worth of float64 copies (pyloudnorm and a 4x oversampled peak on a whole 10-minute job
# took about 17 times the audio's own size).
BLOCK_SAMPLES = 1 << 16


class TruePeakMeter:
    """True peak (ITU-R BS.1770-4, annex 2: 4x oversampling), measured piece by piece.

    Each piece is oversampled with enough neighbouring samples around it that every output equals
    the one `resample_poly` gives for the whole signal (zero-padded at both ends, as the whole-signal
    call pads).
    """

    CONTEXT = 32  # input samples each side; the Kaiser filter reaches 10

    def __init__(self) -> None:
        self.peak = 0.0
        self._context = np.zeros(0)  # samples already measured, kept as left context
        self._pending = np.zeros(0)  # samples waiting for their right context

    def add(self, samples: np.ndarray) -> None:
        for start in range(0, samples.size, BLOCK_SAMPLES):
            self._pending = np.concatenate([self._pending, samples[start : start + BLOCK_SAMPLES].astype(np.float64)])
            if self._pending.size > self.CONTEXT:
                self._measure(self._pending.size - self.CONTEXT)

    def dbtp(self) -> float:
        """The peak so far, in dBTP, counting the samples still waiting for context as the last ones."""
        if self._pending.size:
            self._measure(self._pending.size)
        return 20 * math.log10(self.peak) if self.peak > 0 else -math.inf

    def _measure(self, count: int) -> None:
        window = np.concatenate([self._context, self._pending])
        oversampled = resample_poly(window, 4, 1)
        start = 4 * self._context.size
        self.peak = max(self.peak, float(np.max(np.abs(oversampled[start : start + 4 * count]))))
        measured = np.concatenate([self._context, self._pending[:count]])
        self._context = measured[-self.CONTEXT :]
        self._pending = self._pending[count:]


class LoudnessMeter:
    """Integrated loudness in LUFS (ITU-R BS.1770-4), measured piece by piece in constant memory.

    pyloudnorm's K-weighting filters, block layout and gating, with the filters' state carried from
    piece to piece and each 400 ms block's energy taken from a running sum, so the signal is never
    held whole. Gives pyloudnorm's `integrated_loudness` (to rounding).
    """

    BLOCK_SECONDS = 0.4
    STEP = 0.25  # blocks overlap by 75%
    ABSOLUTE_GATE = -70.0

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        meter = pyloudnorm.Meter(sample_rate)
        self._stages = [(stage.b, stage.a, stage.passband_gain) for stage in meter._filters.values()]
        self._states = [np.zeros(max(len(a), len(b)) - 1) for b, a, _ in self._stages]
        self.samples = 0
        self._energy = 0.0  # sum of squared weighted samples so far
        self._marks: dict[int, float] = {0: 0.0}  # block boundary -> energy before it
        self._next = [0, 0]  # next block whose lower / upper boundary is not yet marked

    def _boundary(self, block: int, upper: int) -> int:
        return int(self.BLOCK_SECONDS * (block * self.STEP + upper) * self.rate)  # pyloudnorm's rounding

    def add(self, samples: np.ndarray) -> None:
        for start in range(0, samples.size, BLOCK_SAMPLES):
            weighted = samples[start : start + BLOCK_SAMPLES].astype(np.float64)
            for number, (b, a, gain) in enumerate(self._stages):
                weighted, self._states[number] = scipy.signal.lfilter(b, a, weighted, zi=self._states[number])
                weighted = gain * weighted
            running = self._energy + np.cumsum(np.square(weighted))
            first, end = self.samples, self.samples + weighted.size
            for upper in (0, 1):
                while (boundary := self._boundary(self._next[upper], upper)) <= end:
                    if boundary > first:
                        self._marks[boundary] = float(running[boundary - first - 1])
                    self._next[upper] += 1
            self._energy = float(running[-1]) if running.size else self._energy
            self.samples = end

    def integrated(self) -> float:
        """Integrated loudness of everything added so far; -inf below one block or for silence."""
        if self.samples < self.BLOCK_SECONDS * self.rate:
            return -math.inf
        seconds = self.samples / self.rate
        blocks = int(np.round((seconds - self.BLOCK_SECONDS) / (self.BLOCK_SECONDS * self.STEP))) + 1
        energy = np.empty(blocks)
        for block in range(blocks):
            lower, upper = self._boundary(block, 0), self._boundary(block, 1)
            energy[block] = self._energy_before(upper) - self._energy_before(lower)
        energy /= self.BLOCK_SECONDS * self.rate
        with np.errstate(divide="ignore"):
            loudness = -0.691 + 10.0 * np.log10(energy)
            above_absolute = loudness >= self.ABSOLUTE_GATE
            if not above_absolute.any():
                return -math.inf
            relative_gate = -0.691 + 10.0 * np.log10(np.mean(energy[above_absolute])) - 10.0
            gated = (loudness > relative_gate) & (loudness > self.ABSOLUTE_GATE)
            return float(-0.691 + 10.0 * np.log10(np.mean(energy[gated]) if gated.any() else 0.0))

    def _energy_before(self, boundary: int) -> float:
        return self._energy if boundary >= self.samples else self._marks[boundary]


def true_peak_dbtp(samples: np.ndarray) -> float:
    """True peak in dBTP, estimated on a 4x oversampled signal (ITU-R BS.1770-4, annex 2)."""
    if samples.size == 0:
        return -math.inf
    meter = TruePeakMeter()
    meter.add(samples)
    return meter.dbtp()


def integrated_loudness(samples: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770), -inf for silence."""
    if samples.size < LOUDNESS_MIN_SECONDS * sample_rate:
        return -math.inf
    meter = LoudnessMeter(sample_rate)
    meter.add(samples)
    return meter.integrated()


@dataclass
class LoudnessReport:
    applied: bool
    target_lufs: float
    measured_lufs: float | None = None
    output_lufs: float | None = None
    gain_db: float = 0.0
    true_peak_dbtp: float | None = None
    limited_by_peak: bool = False
    reason: str | None = None

    def as_dict(self) -> dict:
        def rounded(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else round(value, 2)

        report = {
            "applied": self.applied,
            "target_lufs": self.target_lufs,
            "measured_lufs": rounded(self.measured_lufs),
            "output_lufs": rounded(self.output_lufs),
            "gain_db": round(self.gain_db, 2),
            "true_peak_dbtp": rounded(self.true_peak_dbtp),
            "limited_by_peak": self.limited_by_peak,
        }
        if self.reason:
            report["reason"] = self.reason
        return report


@dataclass(frozen=True)
class Level:
    """What loudness normalisation needs to know of a signal: its loudness, true peak and length."""

    lufs: float
    peak_dbtp: float
    samples: int


class LevelMeter:
    """Integrated loudness and true peak fed piece by piece, with the very arithmetic of one whole-signal call.

    Pieces are regrouped into the `BLOCK_SAMPLES` blocks that a whole-signal measurement cuts the
    signal into, so the meters' filters, running sums and oversampling see the same numbers in the
    same order, and `level()` equals `measure_level` on the joined signal bit for bit. This lets the
    level be measured while the engine generates the audio (rendering.LevelTracker).
    """

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self.loudness = LoudnessMeter(sample_rate)
        self.peak = TruePeakMeter()
        self.samples = 0
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0

    def add(self, samples: np.ndarray) -> None:
        self._pending.append(samples)
        self._pending_samples += samples.size
        self.samples += samples.size
        if self._pending_samples >= BLOCK_SAMPLES:
            joined = np.concatenate(self._pending)
            whole = joined.size // BLOCK_SAMPLES * BLOCK_SAMPLES
            self._measure(joined[:whole])
            self._pending, self._pending_samples = [joined[whole:]], joined.size - whole

    def level(self) -> Level:
        """The level of everything added (call once, at the end)."""
        if self._pending_samples:
            self._measure(np.concatenate(self._pending))
        self._pending, self._pending_samples = [], 0
        lufs = self.loudness.integrated() if self.samples >= LOUDNESS_MIN_SECONDS * self.rate else -math.inf
        return Level(lufs, self.peak.dbtp(), self.samples)

    def _measure(self, samples: np.ndarray) -> None:
        for start in range(0, samples.size, BLOCK_SAMPLES):
            block = samples[start : start + BLOCK_SAMPLES]
            self.loudness.add(block)
            self.peak.add(block)


def measure_level(samples: np.ndarray, sample_rate: int) -> Level:
    meter = LevelMeter(sample_rate)
    meter.add(samples)
    return meter.level()


def normalize_loudness(
    samples: np.ndarray,
    sample_rate: int,
    target_lufs: float,
    ceiling_dbtp: float = TRUE_PEAK_CEILING_DBTP,
    in_place: bool = False,
    level: Level | None = None,
) -> tuple[np.ndarray, LoudnessReport]:
    """Scale to `target_lufs`, but never so far that the true peak passes `ceiling_dbtp`.

    Audio shorter than one gating block, or quieter than the absolute gate (silence), is returned
    unchanged with the reason in the report. `in_place` scales `samples` itself (no copy). `level`
    is the signal's level when it was measured already (as it was generated); else it is measured here.
    """
    if samples.size < LOUDNESS_MIN_SECONDS * sample_rate:
        return samples, LoudnessReport(False, target_lufs, reason=f"shorter than {LOUDNESS_MIN_SECONDS} s")
    if level is None:
        level = measure_level(samples, sample_rate)
    measured, peak = level.lufs, level.peak_dbtp
    if not math.isfinite(measured) or measured < SILENCE_LUFS:
        return samples, LoudnessReport(False, target_lufs, measured_lufs=measured, reason="silent or too quiet")
    gain_db = target_lufs - measured
    limited = peak + gain_db > ceiling_dbtp
    if limited:
        gain_db = ceiling_dbtp - peak
    factor = np.float32(10 ** (gain_db / 20))
    out = np.multiply(samples, factor, out=samples if in_place else None).astype(np.float32, copy=False)
    return out, LoudnessReport(
        applied=True,
        target_lufs=target_lufs,
        measured_lufs=measured,
        output_lufs=measured + gain_db,
        gain_db=gain_db,
        true_peak_dbtp=peak + gain_db,
        limited_by_peak=limited,
    )
