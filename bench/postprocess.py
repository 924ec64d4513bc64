"""Figure c: post-processing seconds per minute of audio, against the original design's way.

Ours: what follows generation, `rendering.render` (join, gain to -20 LUFS within a true-peak
ceiling, polyphase resample, in-process encoding: LAME directly for mp3, FFmpeg's encoders through
PyAV for the rest) and `storage.deliver` (upload to moto's S3 server on 127.0.0.1,
presigned URL), once per output format at the default sample rate. The loudness and true peak are
measured while the engine generates (`rendering.LevelTracker`, fed frame by frame as the engine
feeds it); that cost is its own row, so it can be added back.
Baseline, the design's way: pyloudnorm normalisation, an FFT resample to 48 kHz
(`scipy.signal.resample`), a WAV file written with soundfile, an `ffmpeg` subprocess to MP3
(128 kbit/s), and the same upload.

The signal is one minute of the speech-like demo voices (the tiny model's output is noise).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.common import MotoServer, Row, interleaved_medians

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm_16")
SECONDS = 60.0
REPEATS = 3


def one_minute(workspace) -> np.ndarray:
    voices = workspace.voices()
    joined = np.concatenate([voices[0], voices[1]])
    samples = int(SECONDS * 24000)
    return np.resize(joined, samples).astype(np.float32)


def design_way(samples: np.ndarray, storage, scratch: Path) -> bytes:
    """Loudness with pyloudnorm, FFT resample to 48 kHz, ffmpeg subprocess to MP3, upload."""
    import pyloudnorm
    import scipy.signal
    import soundfile

    meter = pyloudnorm.Meter(24000)
    normalised = pyloudnorm.normalize.loudness(samples, meter.integrated_loudness(samples), -20.0)
    resampled = scipy.signal.resample(normalised, samples.size * 2).astype(np.float32)
    wav, mp3 = scratch / "out.wav", scratch / "out.mp3"
    soundfile.write(wav, resampled, 48000, subtype="PCM_16")
    subprocess.run(
        ["ffmpeg", "-y", "-loglevel", "error", "-i", str(wav), "-codec:a", "libmp3lame", "-b:a", "128k", str(mp3)],
        check=True,
    )
    data = mp3.read_bytes()
    storage.upload(data, "audio/mpeg", "mp3")
    return data


def level_during_generation(plan, results, settings):
    """The level as the handler gets it: a LevelTracker fed 3200-sample frames (one decode step each)."""
    from jobs.rendering import LevelTracker

    tracker = LevelTracker(plan, settings)
    for result in results:
        for start in range(0, result.audio.size, 3200):
            tracker.on_audio(result.index, result.audio[start : start + 3200])
        tracker.on_chunk(result, len(results))
    return tracker.level()


def measure(workspace) -> tuple[list[Row], dict]:
    from handler import Worker
    from inference import ChunkAudio
    from jobs.planning import plan_job
    from jobs.rendering import render
    from jobs.schema import parse_job_input
    from jobs.storage import deliver

    if shutil.which("ffmpeg") is None:
        raise RuntimeError("the design's baseline needs the ffmpeg command (make bench installs Debian's ffmpeg)")
    server = MotoServer()
    try:
        settings = workspace.settings(**server.settings_overrides())
        worker = Worker(settings, workspace.engine())
        samples = one_minute(workspace)
        rows, detail = [], {"seconds_of_audio": SECONDS, "per_format": {}}
        with tempfile.TemporaryDirectory() as scratch:

            def baseline():
                design_way(samples, worker.storage, Path(scratch))

            for fmt, rate in [(f, None) for f in FORMATS] + [("mp3", 48000)]:
                job = {"text": "One minute of audio.", "output_format": fmt, "return": "url"}
                if rate:
                    job["sample_rate"] = rate
                plan = plan_job(parse_job_input(job, settings), settings, worker.library)
                results = [ChunkAudio(0, samples, frames=0, reached_cap=False)]
                level = level_during_generation(plan, results, settings)

                def ours(plan=plan, results=results, level=level):
                    rendered = render(plan, results, settings, level)
                    spec = plan.format
                    deliver(rendered.data, spec.content_type, spec.extension, "url", worker.storage, 1000)

                ours_s, baseline_s, timing = interleaved_medians(ours, baseline, REPEATS)
                label = f"{fmt} {plan.sample_rate // 1000} kHz" if fmt != "opus" else "opus 48 kHz"
                detail["per_format"][label] = timing
                per_minute = 60.0 / SECONDS
                target = "<= 0.5" if fmt in ("mp3", "aac") and rate is None else None
                note = f"default output ({fmt} at 24 kHz) vs the design's mp3 at 48 kHz" if target else ""
                if rate:
                    note = "like for like: both mp3 at 48 kHz"
                rows.append(
                    Row("c", f"post-processing + upload per minute of audio, {label} (s)", ours_s * per_minute,
                        baseline_s * per_minute, "s", target, note)
                )  # fmt: skip
            level_s, baseline_s, timing = interleaved_medians(
                lambda: level_during_generation(plan, results, settings), baseline, REPEATS
            )
            detail["level_during_generation"] = timing
            rows.append(
                Row("c", "loudness + true peak measured during generation, per minute of audio (s)",
                    level_s * per_minute, baseline_s * per_minute, "s", None,
                    "paid between decode steps; not in the rows above")
            )  # fmt: skip
    finally:
        server.close()
    return rows, detail
