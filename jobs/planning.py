"""Planning a synthesis job: from validated input to what the engine and the renderer need.

plan_job -> the script and its chunks (text/script.py), each speaker's reference voice (voices.py), the
generation parameters and the output settings, in one `JobPlan`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from audio.formats import FORMATS, OutputFormat
from config import MODEL_SAMPLE_RATE, Settings
from inference import GenerationParams
from jobs.schema import JobInput, VoiceSource
from jobs.voices import VoiceError, VoiceLibrary
from text.script import Chunk, Script, ScriptError, chunk_script, max_frames_for, parse_script

# Frames per second of the model's audio (24 kHz, one frame per 3200 samples).
FRAME_RATE = MODEL_SAMPLE_RATE / 3200


class JobError(ValueError):
    """The job cannot run as asked; the message is one sentence naming the field."""


@dataclass
class JobPlan:
    script: Script
    chunks: list[Chunk]
    voices: dict[int, np.ndarray]  # speaker -> 24 kHz reference audio
    params: GenerationParams
    output_format: str
    sample_rate: int
    bitrate_kbps: int | None
    speed: float
    normalize: bool
    target_lufs: float
    captions: str | None
    return_mode: str
    stream_chunk_ms: int | None  # streamed jobs: audio per item
    timestamps: str = "none"  # "none" | "sentence" | "word"
    caption_unit: str | None = None  # "chunk" | "sentence" | "word" with captions
    warnings: list[str] = field(default_factory=list)

    @property
    def characters(self) -> int:
        return sum(len(turn.text) for turn in self.script.turns)

    @property
    def format(self) -> OutputFormat:
        return FORMATS[self.output_format]


def plan_job(job: JobInput, settings: Settings, library: VoiceLibrary) -> JobPlan:
    """Parse the text, chunk it, and gather the reference voice of every speaker.

    `job` is validated, so its deployment defaults are already filled in (schema.JobInput). Every
    cost the job can drive is checked here, before any audio is decoded or generated: the text, its
    pauses, the number of chunks and the audio they may produce (`check_costs`), and each reference clip while
    it is decoded (at most VOICE_MAX_TOTAL_SECONDS for the job's voices).
    """
    assert job.text is not None
    try:
        script = parse_script(job.text)
    except ScriptError as exc:
        raise JobError(f"'text': {exc}") from None
    if not script.turns:
        raise JobError("'text' is empty; give the text to speak.")
    chunks = chunk_script(script, job.max_chunk_chars)
    check_costs(script, chunks, job, settings)

    warnings: list[str] = []
    voices: dict[int, np.ndarray] = {}
    if job.disable_prefill:
        if job.speakers or job.speaker or job.voice_audio_base64 or job.voice_url:
            warnings.append("disable_prefill is set, so the given voices were not used.")
    else:
        budget = settings.voice_max_total_seconds
        for speaker, (field_name, source) in _voice_sources(job, script, settings, warnings, library).items():
            voices[speaker] = _load_voice(source, field_name, library, budget)
            budget -= voices[speaker].size / MODEL_SAMPLE_RATE

    seed = job.seed if job.seed is not None else random.SystemRandom().randrange(2**32)
    return JobPlan(
        script=script,
        chunks=chunks,
        voices=voices,
        params=GenerationParams(
            cfg_scale=job.cfg_scale,
            diffusion_steps=job.diffusion_steps,
            seed=seed,
            max_new_tokens=job.max_new_tokens,
            use_voice_prompt=bool(voices),  # none: disable_prefill, or no default voice to fall back on
        ),
        output_format=job.output_format,
        sample_rate=job.sample_rate,
        bitrate_kbps=job.bitrate_kbps,
        speed=job.speed,
        normalize=job.normalize,
        target_lufs=job.target_lufs,
        captions=job.captions,
        return_mode=job.return_mode,
        stream_chunk_ms=job.stream_chunk_ms,
        timestamps=job.timestamps,
        caption_unit=job.caption_unit,
        warnings=warnings,
    )


def worst_case_seconds(script: Script, chunks: list[Chunk], job: JobInput, settings: Settings) -> float:
    """The longest audio the job can produce: every chunk at its frame cap, gaps, then `speed`;
    pauses are added after the speed change (they replace the gap where they stand)."""
    frames = 0
    for chunk in chunks:
        cap = max_frames_for(chunk, FRAME_RATE)
        frames += min(cap, job.max_new_tokens) if job.max_new_tokens else cap
    gaps = sum(1 for chunk in chunks[:-1] if not chunk.pause_after_ms) * settings.chunk_gap_ms / 1000
    return (frames / FRAME_RATE + gaps) / job.speed + script.pause_ms / 1000


def check_costs(script: Script, chunks: list[Chunk], job: JobInput, settings: Settings) -> None:
    """Refuse a job whose text, chunk count or possible output passes the deployment's limits."""
    spoken = sum(len(turn.text) for turn in script.turns)
    if spoken > settings.max_text_length:  # normalisation never lengthens text, but a change could
        raise JobError(f"'text' is {spoken} characters long once normalised; the limit is {settings.max_text_length}.")
    if script.pause_ms > settings.max_pause_sec * 1000:
        raise JobError(
            f"'text' asks for {script.pause_ms / 1000:g} s of pauses in all; "
            f"this deployment allows at most {settings.max_pause_sec:g} s (MAX_PAUSE_SEC)."
        )
    if len(chunks) > settings.max_chunks:
        raise JobError(
            f"'text' is cut into {len(chunks)} chunks; a job may have at most {settings.max_chunks} "
            "(merge short lines or raise 'max_chunk_chars')."
        )
    seconds = worst_case_seconds(script, chunks, job, settings)
    if seconds > settings.max_output_seconds:
        raise JobError(
            f"'text' could produce up to {seconds:.0f} s of audio at 'speed' {job.speed:g}; a job may produce at "
            f"most {settings.max_output_seconds:g} s (shorten the text, raise 'speed' or lower 'max_new_tokens')."
        )


def _voice_sources(
    job: JobInput, script: Script, settings: Settings, warnings: list[str], library: VoiceLibrary
) -> dict[int, tuple[str, str | VoiceSource]]:
    """Which field gives each speaker's voice: `speakers[i]` for scripts, else the single voice.

    A job that names no voice gets DEFAULT_SPEAKER; when that preset is not on the volume (its
    download failed, or it was removed), the job runs without a voice prompt and says so.
    """
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
    elif library.has(settings.default_speaker):
        source = ("speaker", settings.default_speaker)
    else:
        warnings.append(
            f"no voice was given and the default voice {settings.default_speaker!r} is not in the voices folder, "
            "so the audio was generated without a voice prompt (the model picks a voice)."
        )
        return {}
    return {script.speakers[0]: source}


def _load_voice(source: str | VoiceSource, field_name: str, library: VoiceLibrary, budget: float) -> np.ndarray:
    """A preset's or a cloning source's 24 kHz audio; a problem becomes a JobError naming the field.

    `budget` is what the job's voices may still hold, in seconds.
    """
    try:
        if isinstance(source, str):
            samples = library.load(library.find(source).name)
            if samples.size / MODEL_SAMPLE_RATE > budget:
                raise VoiceError(library.too_long(f"'{field_name}'", budget))
            return samples
        if source.audio_base64 is not None:
            field = field_name if field_name == "voice_audio_base64" else f"{field_name}.audio_base64"
            return library.from_base64(source.audio_base64, f"'{field}'", budget)
        field = field_name if field_name == "voice_url" else f"{field_name}.audio_url"
        return library.from_url(source.audio_url, f"'{field}'", budget)
    except VoiceError as exc:
        message = str(exc)
        if not message.startswith("'"):
            message = f"'{field_name}': {message}"
        raise JobError(message) from None
