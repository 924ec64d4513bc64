"""A synthesis job from validated input to encoded audio, as pure steps the handler calls in order.

plan_job        -> which chunks, which reference voice per speaker, which settings
(engine)        -> audio per chunk
render          -> joined, speed-changed, loudness-normalised, resampled, encoded audio + segments
StreamRenderer  -> the same, piece by piece as frames arrive (no loudness normalisation: it needs
                   the whole signal), for streamed jobs
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np

import audio
import captions
from config import MODEL_SAMPLE_RATE, Settings
from inference import ChunkAudio, GenerationParams
from schema import JobInput, VoiceSource
from text import Chunk, Script, ScriptError, chunk_script, max_frames_for, parse_script
from voices import VoiceError, VoiceLibrary

# Frames per second of the model's audio (24 kHz, one frame per 3200 samples).
FRAME_RATE = MODEL_SAMPLE_RATE / 3200


class JobError(ValueError):
    """The job cannot run as asked; the message is one sentence naming the field."""


@dataclass
class JobPlan:
    script: Script
    chunks: list[Chunk]
    voices: dict[int, np.ndarray]  # speaker -> 24 kHz reference audio
    voice_names: dict[int, str]  # speaker -> preset name or "cloned"
    params: GenerationParams
    output_format: str
    sample_rate: int
    bitrate_kbps: int | None
    speed: float
    normalize: bool
    target_lufs: float
    captions: str | None
    return_mode: str
    stream: bool = False
    stream_chunk_ms: int = 400
    warnings: list[str] = field(default_factory=list)

    @property
    def characters(self) -> int:
        return sum(len(turn.text) for turn in self.script.turns)


def plan_job(job: JobInput, settings: Settings, library: VoiceLibrary) -> JobPlan:
    """Parse the text, chunk it, and gather the reference voice of every speaker.

    Every cost the job can drive is checked here, before any audio is decoded or generated:
    the text, the number of chunks and the audio they may produce (`check_costs`), and each
    reference clip while it is decoded (at most VOICE_MAX_TOTAL_SECONDS for the job's voices).
    """
    assert job.text is not None
    try:
        script = parse_script(job.text)
    except ScriptError as exc:
        raise JobError(f"'text': {exc}") from None
    if not script.turns:
        raise JobError("'text' is empty; give the text to speak.")
    chunks = chunk_script(script, job.max_chunk_chars or settings.max_chunk_chars)
    check_costs(script, chunks, job, settings)

    warnings: list[str] = []
    voices: dict[int, np.ndarray] = {}
    names: dict[int, str] = {}
    if job.disable_prefill:
        if job.speakers or job.speaker or job.voice_audio_base64 or job.voice_url:
            warnings.append("disable_prefill is set, so the given voices were not used.")
    else:
        budget = settings.voice_max_total_seconds
        for speaker, (field_name, source) in _voice_sources(job, script, settings, warnings).items():
            voices[speaker], names[speaker] = _load_voice(source, field_name, library, budget)
            budget -= voices[speaker].size / MODEL_SAMPLE_RATE

    seed = job.seed if job.seed is not None else random.SystemRandom().randrange(2**32)
    return JobPlan(
        script=script,
        chunks=chunks,
        voices=voices,
        voice_names=names,
        params=GenerationParams(
            cfg_scale=job.cfg_scale if job.cfg_scale is not None else settings.default_cfg_scale,
            diffusion_steps=job.diffusion_steps or settings.default_diffusion_steps,
            seed=seed,
            max_new_tokens=job.max_new_tokens,
            use_voice_prompt=not job.disable_prefill,
        ),
        output_format=job.resolved_format(settings),
        sample_rate=job.resolved_sample_rate(settings),
        bitrate_kbps=job.resolved_bitrate(settings),
        speed=job.speed,
        normalize=job.normalize,
        target_lufs=job.target_lufs if job.target_lufs is not None else settings.target_lufs,
        captions=job.captions,
        return_mode=job.return_mode,
        stream=job.stream,
        stream_chunk_ms=job.stream_chunk_ms or settings.stream_chunk_ms,
        warnings=warnings,
    )


def worst_case_seconds(chunks: list[Chunk], job: JobInput, settings: Settings) -> float:
    """The longest audio the job can produce: every chunk at its frame cap, gaps, then `speed`."""
    frames = 0
    for chunk in chunks:
        cap = max_frames_for(chunk, FRAME_RATE)
        frames += min(cap, job.max_new_tokens) if job.max_new_tokens else cap
    gaps = max(0, len(chunks) - 1) * settings.chunk_gap_ms / 1000
    return (frames / FRAME_RATE + gaps) / job.speed


def check_costs(script: Script, chunks: list[Chunk], job: JobInput, settings: Settings) -> None:
    """Refuse a job whose text, chunk count or possible output passes the deployment's limits."""
    spoken = sum(len(turn.text) for turn in script.turns)
    if spoken > settings.max_text_length:  # normalisation never lengthens text, but a change could
        raise JobError(f"'text' is {spoken} characters long once normalised; the limit is {settings.max_text_length}.")
    if len(chunks) > settings.max_chunks:
        raise JobError(
            f"'text' is cut into {len(chunks)} chunks; a job may have at most {settings.max_chunks} "
            "(merge short lines or raise 'max_chunk_chars')."
        )
    seconds = worst_case_seconds(chunks, job, settings)
    if seconds > settings.max_output_seconds:
        raise JobError(
            f"'text' could produce up to {seconds:.0f} s of audio at 'speed' {job.speed:g}; a job may produce at "
            f"most {settings.max_output_seconds:g} s (shorten the text, raise 'speed' or lower 'max_new_tokens')."
        )


def _voice_sources(
    job: JobInput, script: Script, settings: Settings, warnings: list[str]
) -> dict[int, tuple[str, str | VoiceSource]]:
    """Which field gives each speaker's voice: `speakers[i]` for scripts, else the single voice."""
    if job.speakers is not None:
        if not script.is_script:
            raise JobError(
                "'speakers' needs a script, but 'text' has no speaker labels: write one turn per line as "
                "'Speaker 1: ...', 'Speaker 2: ...', or give a single voice in 'speaker'."
            )
        missing = [script.label(s) for s in script.speakers if s >= len(job.speakers)]
        if missing:
            raise JobError(
                f"'speakers' gives {len(job.speakers)} voice(s), but 'text' uses {', '.join(missing)}; "
                f"give one voice per speaker, in label order."
            )
        unused = [f"speakers[{i}]" for i in range(len(job.speakers)) if i not in script.speakers]
        if unused:
            warnings.append(f"{', '.join(unused)} not used: the text has no line for that speaker.")
        return {s: (f"speakers[{s}]", job.speakers[s]) for s in script.speakers}

    if len(script.speakers) > 1:
        labels = ", ".join(script.label(s) for s in script.speakers)
        raise JobError(
            f"'text' has {len(script.speakers)} speakers ({labels}); give their voices in 'speakers', "
            'for example ["Alice", "Frank"].'
        )
    if job.voice_audio_base64 is not None:
        source: tuple[str, str | VoiceSource] = (
            "voice_audio_base64",
            VoiceSource(audio_base64=job.voice_audio_base64),
        )
    elif job.voice_url is not None:
        source = ("voice_url", VoiceSource(audio_url=job.voice_url))
    elif job.speaker is not None:
        source = ("speaker", job.speaker)
    else:
        source = ("speaker", settings.default_speaker)
    return {script.speakers[0]: source}


def _load_voice(
    source: str | VoiceSource, field_name: str, library: VoiceLibrary, budget: float
) -> tuple[np.ndarray, str]:
    """One speaker's reference audio; `budget` is what the job's voices may still hold, in seconds."""
    try:
        if isinstance(source, str):
            preset = library.find(source)
            samples = library.load(preset.name)
            if samples.size / MODEL_SAMPLE_RATE > budget:
                raise VoiceError(library.too_long(f"'{field_name}'", budget))
            return samples, preset.name
        if source.audio_base64 is not None:
            field = field_name if field_name == "voice_audio_base64" else f"{field_name}.audio_base64"
            return library.from_base64(source.audio_base64, f"'{field}'", budget), "cloned"
        field = field_name if field_name == "voice_url" else f"{field_name}.audio_url"
        return library.from_url(source.audio_url, f"'{field}'", budget), "cloned"
    except VoiceError as exc:
        message = str(exc)
        if not message.startswith("'"):
            message = f"'{field_name}': {message}"
        raise JobError(message) from None


@dataclass
class Rendered:
    data: bytes
    content_type: str
    extension: str
    duration_sec: float
    segments: list[dict]
    loudness: dict
    captions: str | None
    postprocess_seconds: float
    encode_seconds: float


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


def join_chunks(results: list[ChunkAudio], gap_samples: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate chunk audio with silent gaps; return the signal and each chunk's sample span."""
    gap = np.zeros(gap_samples, dtype=np.float32)
    pieces: list[np.ndarray] = []
    for number, result in enumerate(results):
        if number:
            pieces.append(gap)
        pieces.append(result.audio)
    signal = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return signal.astype(np.float32, copy=False), chunk_spans(results, gap_samples)


def render(plan: JobPlan, results: list[ChunkAudio], settings: Settings, clock) -> Rendered:
    """Join, change speed, normalise loudness, resample and encode; build segments and captions."""
    started = clock()
    gap = round(settings.chunk_gap_ms * MODEL_SAMPLE_RATE / 1000)
    signal, spans = join_chunks(results, gap)
    stretched = audio.change_speed(signal, MODEL_SAMPLE_RATE, plan.speed)
    # atempo scales time uniformly, so chunk spans scale by the same measured ratio.
    time_scale = stretched.size / signal.size if signal.size else 1.0
    if plan.normalize:
        # In place: `stretched` is this function's own copy (the joined or time-stretched signal).
        stretched, report = audio.normalize_loudness(stretched, MODEL_SAMPLE_RATE, plan.target_lufs, in_place=True)
    else:
        report = audio.LoudnessReport(False, plan.target_lufs, reason="normalize is false")
    output = audio.resample(stretched, MODEL_SAMPLE_RATE, plan.sample_rate)
    postprocess_seconds = clock() - started

    started = clock()
    data = audio.encode(output, plan.output_format, plan.sample_rate, plan.bitrate_kbps)
    encode_seconds = clock() - started

    segments = build_segments(plan, results, spans, time_scale)
    subtitle = captions.build(segments, plan.captions) if plan.captions else None
    _, _, content_type, extension = audio.FORMATS[plan.output_format]
    return Rendered(
        data=data,
        content_type=content_type,
        extension=extension,
        duration_sec=output.size / plan.sample_rate,
        segments=segments,
        loudness=report.as_dict(),
        captions=subtitle,
        postprocess_seconds=postprocess_seconds,
        encode_seconds=encode_seconds,
    )


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
        self.gap_samples = round(settings.chunk_gap_ms * MODEL_SAMPLE_RATE / 1000)
        self.piece_samples = max(1, round(plan.stream_chunk_ms * MODEL_SAMPLE_RATE / 1000))
        self.speed = audio.SpeedChanger(MODEL_SAMPLE_RATE, plan.speed) if plan.speed != 1.0 else None
        self.resampler = audio.StreamResampler(MODEL_SAMPLE_RATE, plan.sample_rate)
        self.encoder = audio.Encoder(plan.output_format, plan.sample_rate, plan.bitrate_kbps, streaming=True)
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

    @property
    def time_scale(self) -> float:
        return self.stretched_samples / self.joined_samples if self.joined_samples else 1.0

    def loudness_report(self) -> dict:
        reason = STREAM_LOUDNESS_REASON if self.plan.normalize else "normalize is false"
        report = audio.LoudnessReport(
            applied=False,
            target_lufs=self.plan.target_lufs,
            measured_lufs=self.loudness.integrated(),
            true_peak_dbtp=self.peak.dbtp(),
            reason=reason,
        )
        return report.as_dict()


def build_segments(
    plan: JobPlan, results: list[ChunkAudio], spans: list[tuple[int, int]], time_scale: float
) -> list[dict]:
    by_index = {chunk.index: chunk for chunk in plan.chunks}
    segments = []
    for result, (start, end) in zip(results, spans, strict=True):
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
                "start_sec": _seconds(start * time_scale),
                "end_sec": _seconds(end * time_scale),
            }
        )
    return segments


def _seconds(samples: float) -> float:
    return math.floor(samples / MODEL_SAMPLE_RATE * 1000 + 0.5) / 1000
