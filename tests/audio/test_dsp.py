"""Audio out: resampling filters, loudness and speed (decoding: test_audio_input.py; encoding: test_encoders.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from audio_helpers import dominant_frequency, tone

from audio import dsp


def test_resampling_filters_instead_of_aliasing() -> None:
    # An 11 kHz tone is above the 8 kHz Nyquist limit of 16 kHz audio: a proper filter removes it,
    # linear interpolation would fold it down to 5 kHz at nearly full level.
    high = tone(11000, 1.0)
    down = dsp.resample(high, 24000, 16000)
    assert down.size == 16000
    assert np.sqrt(np.mean(down**2)) < 0.01 * np.sqrt(np.mean(high**2))
    linear = np.interp(np.arange(16000) * 1.5, np.arange(high.size), high)
    assert np.sqrt(np.mean(linear**2)) > 0.3 * np.sqrt(np.mean(high**2))
    # In-band content passes unchanged in level and frequency.
    low = dsp.resample(tone(1000, 1.0), 24000, 44100)
    assert abs(np.sqrt(np.mean(low[2000:-2000] ** 2)) - 0.3 / math.sqrt(2)) < 0.005
    assert abs(dominant_frequency(low, 44100) - 1000) < 2


def _speech_like(seconds: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * 24000)) / 24000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.05 * envelope * (np.sin(2 * np.pi * 180 * t) + 0.3 * rng.standard_normal(t.size))).astype(np.float32)


@pytest.mark.parametrize("target", [-30.0, -20.0, -16.0])
def test_loudness_reaches_target_under_peak_ceiling(target: float) -> None:
    out, report = dsp.normalize_loudness(_speech_like(), 24000, target)
    assert report.applied
    assert abs(dsp.integrated_loudness(out, 24000) - target) <= 1.0
    assert dsp.true_peak_dbtp(out) <= -1.0 + 0.05


def test_loudness_is_limited_by_true_peak() -> None:
    clicks = np.zeros(24000 * 2, dtype=np.float32)
    clicks[::4800] = 0.5  # very peaky: reaching -10 LUFS would clip
    out, report = dsp.normalize_loudness(clicks + 0.001 * _speech_like(2.0), 24000, -10.0)
    assert report.limited_by_peak
    assert dsp.true_peak_dbtp(out) <= -1.0 + 0.05


def test_silence_and_short_audio_are_left_alone() -> None:
    silent = np.zeros(24000, dtype=np.float32)
    out, report = dsp.normalize_loudness(silent, 24000, -20)
    assert not report.applied and report.reason == "silent or too quiet" and out is silent
    short = _speech_like(0.2)
    out, report = dsp.normalize_loudness(short, 24000, -20)
    assert not report.applied and "shorter" in report.reason and out is short


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0])
def test_speed_scales_duration_and_keeps_pitch(speed: float) -> None:
    signal = tone(220, 4.0)
    out = dsp.change_speed(signal, 24000, speed)
    assert abs(out.size / signal.size - 1 / speed) <= 0.03 / speed
    middle = out[out.size // 4 : 3 * out.size // 4]
    assert abs(dominant_frequency(middle, 24000) - 220) < 6


@pytest.mark.parametrize("rate", [24000, 44100])
def test_loudness_meter_fed_in_pieces_equals_pyloudnorm(rate: int) -> None:
    import pyloudnorm

    rng = np.random.default_rng(7)
    samples = 0.1 * rng.standard_normal(rate * 5 + 123) * (0.5 + 0.5 * np.sin(np.arange(rate * 5 + 123) / 2000))
    samples = samples.astype(np.float32)
    samples[rate : rate * 2] = 0  # a pause, so the gates matter
    expected = pyloudnorm.Meter(rate).integrated_loudness(samples.astype(np.float64))
    meter = dsp.LoudnessMeter(rate)
    for start in range(0, samples.size, 3001):
        meter.add(samples[start : start + 3001])
    assert abs(meter.integrated() - expected) < 1e-9
    assert abs(dsp.integrated_loudness(samples, rate) - expected) < 1e-9


def test_true_peak_meter_fed_in_pieces_equals_whole_signal_oversampling() -> None:
    from scipy.signal import resample_poly

    samples = _speech_like(2.0)
    samples[24000] = 0.9  # an inter-sample peak candidate in the middle of a piece
    expected = 20 * math.log10(np.max(np.abs(resample_poly(samples.astype(np.float64), 4, 1))))
    meter = dsp.TruePeakMeter()
    for start in range(0, samples.size, 777):
        meter.add(samples[start : start + 777])
    assert meter.dbtp() == pytest.approx(expected, abs=1e-12)
    assert dsp.true_peak_dbtp(samples) == pytest.approx(expected, abs=1e-12)
