"""Planning a synthesis job: from validated input to what the engine and the renderer need.

plan_job -> the script and its chunks (text.py), each speaker's reference voice (voices.py), the
generation parameters and the output settings, in one `JobPlan`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from config import Settings
from formats import FORMATS, OutputFormat
from inference import GenerationParams
from schema import JobInput, VoiceSource
from text import Chunk, Script, ScriptError, chunk_script, parse_script
from voices import VoiceError, VoiceLibrary


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
    warnings: list[str] = field(default_factory=list)

    @property
    def characters(self) -> int:
        return sum(len(turn.text) for turn in self.script.turns)

    @property
    def format(self) -> OutputFormat:
        return FORMATS[self.output_format]


def plan_job(job: JobInput, settings: Settings, library: VoiceLibrary) -> JobPlan:
    """Parse the text, chunk it, and gather the reference voice of every speaker.

    `job` is validated, so its deployment defaults are already filled in (schema.JobInput).
    """
    assert job.text is not None
    try:
        script = parse_script(job.text)
    except ScriptError as exc:
        raise JobError(f"'text': {exc}") from None
    if not script.turns:
        raise JobError("'text' is empty; give the text to speak.")

    warnings: list[str] = []
    voices: dict[int, np.ndarray] = {}
    if job.disable_prefill:
        if job.speakers or job.speaker or job.voice_audio_base64 or job.voice_url:
            warnings.append("disable_prefill is set, so the given voices were not used.")
    else:
        for speaker, (field_name, source) in _voice_sources(job, script, settings, warnings).items():
            voices[speaker] = _load_voice(source, field_name, library)

    seed = job.seed if job.seed is not None else random.SystemRandom().randrange(2**32)
    return JobPlan(
        script=script,
        chunks=chunk_script(script, job.max_chunk_chars),
        voices=voices,
        params=GenerationParams(
            cfg_scale=job.cfg_scale,
            diffusion_steps=job.diffusion_steps,
            seed=seed,
            max_new_tokens=job.max_new_tokens,
            use_voice_prompt=not job.disable_prefill,
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
        warnings=warnings,
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


def _load_voice(source: str | VoiceSource, field_name: str, library: VoiceLibrary) -> np.ndarray:
    """A preset's or a cloning source's 24 kHz audio; a problem becomes a JobError naming the field."""
    try:
        if isinstance(source, str):
            return library.load(library.find(source).name)
        if source.audio_base64 is not None:
            return library.from_base64(source.audio_base64, f"'{field_name}' audio")
        return library.from_url(source.audio_url, f"'{field_name}' audio_url")
    except VoiceError as exc:
        message = str(exc)
        if not message.startswith("'"):
            message = f"'{field_name}': {message}"
        raise JobError(message) from None
