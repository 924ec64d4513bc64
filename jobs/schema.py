"""The job input contract: one declarative pydantic model, validated strictly.

Every problem becomes one sentence that names the field and says what is allowed
(`describe_error`). Limits that depend on the deployment (text length, chunk size, defaults)
come from the settings passed in the validation context.
"""

from __future__ import annotations

import math
import reprlib
import unicodedata
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from audio.formats import (
    ALL_SAMPLE_RATES,
    FORMATS,
    OutputFormat,
    bitrate_names,
    join_words,
    resolve_name,
    streaming_names,
)
from config import Settings
from text.script import MAX_SPEAKERS, has_visible

OutputFormatName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]

# Human descriptions of numeric ranges, used in error messages.
RANGES = {
    "cfg_scale": "greater than 0 and at most 10",
    "diffusion_steps": "an integer from 1 to 50",
    "seed": "an integer from 0 to 4294967295",
    "speed": "a number from 0.25 to 4.0",
    "target_lufs": "a number from -70 to -5",
    "max_chunk_chars": "an integer from 40 to 5000",
    "max_new_tokens": "an integer from 1 to 4500 (frames of 133 ms)",
    "bitrate_kbps": "an integer number of kbit/s",
    "stream_chunk_ms": "an integer from 100 to 5000 (milliseconds of audio per streamed item)",
}


class VoiceSource(BaseModel):
    """Reference audio sent with the job, to clone a voice from."""

    model_config = ConfigDict(extra="forbid", strict=True)

    audio_base64: str | None = Field(None, description="wav, mp3, flac, ogg/opus or m4a/aac, base64-encoded")
    audio_url: str | None = Field(None, max_length=4096, description="an http(s) URL of such a file")

    @model_validator(mode="after")
    def _exactly_one(self) -> VoiceSource:
        if (self.audio_base64 is None) == (self.audio_url is None):
            raise ValueError("must have exactly one of 'audio_base64' or 'audio_url'")
        return self


SpeakerVoice = str | VoiceSource


class JobInput(BaseModel):
    """What a synthesis job may contain (docs/api.md has the contract).

    Once validated, every value the job runs with is filled in: the deployment's defaults (format,
    sample rate, bitrate, generation settings) are applied here and nowhere else.
    """

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    action: Literal["synthesize", "list_voices"] = "synthesize"
    text: str | None = Field(None, validation_alias=AliasChoices("text", "input"))

    # Voices: a preset name, or a cloning source; `speakers` gives one per script label.
    speaker: str | None = Field(None, min_length=1, max_length=200)
    speakers: list[Any] | None = Field(None, min_length=1)
    voice_audio_base64: str | None = None
    voice_url: str | None = Field(None, max_length=4096)

    # Generation.
    cfg_scale: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    diffusion_steps: int | None = Field(None, ge=1, le=50)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    max_chunk_chars: int | None = Field(None, ge=40, le=5000)
    max_new_tokens: int | None = Field(None, ge=1, le=4500)
    disable_prefill: bool = False

    # Output.
    output_format: OutputFormatName | None = None
    sample_rate: int | None = None
    bitrate_kbps: int | None = Field(None, ge=1, le=512)
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False)
    normalize: bool = True
    target_lufs: float | None = Field(None, ge=-70, le=-5, allow_inf_nan=False)
    captions: Literal["srt", "vtt"] | None = None
    # Timestamps from forced alignment of the generated audio: sentence segments, or also words.
    timestamps: Literal["none", "sentence", "word"] = "none"
    caption_unit: Literal["chunk", "sentence", "word"] | None = None  # default: chunk, or sentence with timestamps
    return_mode: Literal["auto", "url", "base64"] = Field(
        "auto", validation_alias=AliasChoices("return", "return_mode")
    )

    # Streaming: audio items as frames are decoded, then a summary item.
    stream: bool = False
    stream_chunk_ms: int | None = Field(None, ge=100, le=5000)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "text" in data and "input" in data:
            raise ValueError("give the text in 'text' or in 'input', not both")
        fmt = data.get("output_format")
        if isinstance(fmt, str) and resolve_name(fmt) != fmt:
            data = {**data, "output_format": resolve_name(fmt)}
        return data

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        settings: Settings = info.context["settings"]
        if len(value) > settings.max_text_length:  # first: the checks below cost time per character
            raise ValueError(f"is {len(value)} characters long; the limit is {settings.max_text_length}")
        check_printable(value, "text")
        if not has_visible(value):
            raise ValueError("is empty; give the text to speak")
        return value

    @field_validator("speaker", "voice_url")
    @classmethod
    def _printable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            check_printable(value, info.field_name, allow_newlines=False)
        return value

    @field_validator("speakers")
    @classmethod
    def _speakers(cls, value: list[Any] | None) -> list[SpeakerVoice] | None:
        if value is None:
            return None
        if len(value) > MAX_SPEAKERS:
            raise ValueError(f"has {len(value)} voices; a script has at most {MAX_SPEAKERS} speakers")
        return [_speaker_voice(entry, f"speakers[{index}]") for index, entry in enumerate(value)]

    @field_validator("sample_rate")
    @classmethod
    def _sample_rate(cls, value: int | None) -> int | None:
        if value is not None and value not in ALL_SAMPLE_RATES:
            raise ValueError(f"must be one of {join_words([str(rate) for rate in ALL_SAMPLE_RATES])}")
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> JobInput:
        if self.action == "list_voices":
            return self
        if self.text is None:
            raise ValueError("'text' is required: give the text to speak")
        shorthand = [name for name in ("speaker", "voice_audio_base64", "voice_url") if getattr(self, name) is not None]
        if len(shorthand) > 1:
            raise ValueError(f"give only one of {', '.join(repr(n) for n in shorthand)}")
        if self.speakers is not None and shorthand:
            raise ValueError(f"give voices either in 'speakers' or in {shorthand[0]!r}, not both")
        settings: Settings = info.context["settings"]
        spec = FORMATS[self.output_format or settings.default_output_format]
        if self.stream and not spec.streams:
            allowed = join_words(streaming_names())
            raise ValueError(f"'output_format' {spec.name} cannot be streamed; with 'stream': true use {allowed}")
        if self.stream and self.return_mode == "url":
            raise ValueError("'return' url cannot be combined with 'stream': true; streamed audio arrives in the items")
        if self.stream_chunk_ms is not None and not self.stream:
            raise ValueError("'stream_chunk_ms' applies only with 'stream': true")
        if self.caption_unit is not None and self.captions is None:
            raise ValueError("'caption_unit' applies only with 'captions' (srt or vtt)")
        self._fill_output_defaults(spec, settings)
        self._fill_generation_defaults(settings)
        return self

    # --- deployment defaults, filled once: a validated job has every value it runs with ----------

    def _fill_output_defaults(self, spec: OutputFormat, settings: Settings) -> None:
        """Sample rate and bitrate: the job's own, checked against the format, or the defaults."""
        if self.sample_rate is not None and self.sample_rate not in spec.sample_rates:
            allowed = join_words([str(rate) for rate in spec.sample_rates])
            raise ValueError(f"'sample_rate' for {spec.name} must be one of {allowed} (got {self.sample_rate})")
        rate = self.sample_rate or spec.default_sample_rate or settings.default_sample_rate
        if self.bitrate_kbps is not None:
            if spec.bitrate is None:
                raise ValueError(f"'bitrate_kbps' applies only to {join_words(bitrate_names(), 'and')}")
            low, high = spec.bitrate.range_at(rate)
            if not low <= self.bitrate_kbps <= high:
                where = f"'bitrate_kbps' for {spec.name} at {rate} Hz"
                raise ValueError(f"{where} must be from {low} to {high} (got {self.bitrate_kbps})")
        self.output_format, self.sample_rate = spec.name, rate
        if self.bitrate_kbps is None and spec.bitrate is not None:
            self.bitrate_kbps = spec.bitrate.default_at(rate)

    def _fill_generation_defaults(self, settings: Settings) -> None:
        if self.cfg_scale is None:
            self.cfg_scale = settings.default_cfg_scale
        # None (DEFAULT_DIFFUSION_STEPS 0): the engine's own count, resolved from the checkpoint at start-up.
        self.diffusion_steps = self.diffusion_steps or settings.default_diffusion_steps or None
        self.max_chunk_chars = self.max_chunk_chars or settings.max_chunk_chars
        if self.target_lufs is None:
            self.target_lufs = settings.target_lufs
        if self.stream:
            self.stream_chunk_ms = self.stream_chunk_ms or settings.stream_chunk_ms
        if self.captions is not None and self.caption_unit is None:
            self.caption_unit = "chunk" if self.timestamps == "none" else "sentence"


def _speaker_voice(entry: Any, field: str) -> SpeakerVoice:
    """One `speakers` entry: a preset name, or an object with audio_base64 / audio_url."""
    if isinstance(entry, str):
        if not entry.strip():
            raise ValueError(f"'{field}' is an empty voice name")
        try:
            check_printable(entry, field, allow_newlines=False)
        except ValueError as exc:
            raise ValueError(f"'{field}' {exc}") from None
        return entry
    if isinstance(entry, dict):
        try:
            return VoiceSource.model_validate(entry)
        except ValidationError as exc:
            raise PydanticCustomError("sentence", describe_error(exc, prefix=field)) from None
    raise ValueError(
        f"'{field}' must be a voice name or an object with 'audio_base64' or 'audio_url' (got {_type_name(entry)})"
    )


def check_printable(value: str, field: str, allow_newlines: bool = True) -> None:
    """Refuse control characters and lone surrogates (what broken UTF-8 escapes turn into)."""
    for position, char in enumerate(value):
        if "\ud800" <= char <= "\udfff":
            raise ValueError(f"contains invalid Unicode (a lone surrogate) at position {position}")
        if char in "\n\r\t" and allow_newlines:
            continue
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"contains the control character U+{ord(char):04X} at position {position}")


def parse_job_input(raw: Any, settings: Settings) -> JobInput:
    """Validate `job["input"]`; raises InputError with one sentence on any problem."""
    if not isinstance(raw, dict):
        raise InputError(f"'input' must be a JSON object (got {_type_name(raw)}).")
    try:
        return JobInput.model_validate(raw, context={"settings": settings})
    except ValidationError as exc:
        raise InputError(describe_error(exc)) from None
    except RecursionError:
        raise InputError("'input' is nested too deeply.") from None


class InputError(ValueError):
    """The job input is invalid; the message is one sentence naming the field."""


def describe_error(exc: ValidationError, prefix: str = "") -> str:
    """The first validation problem as one sentence naming the field and what is allowed."""
    error = exc.errors(include_url=False)[0]
    loc = list(error["loc"])
    field = _field_path(([prefix] if prefix else []) + loc)
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")

    if kind == "extra_forbidden":
        model = VoiceSource if prefix else JobInput
        allowed = ", ".join(_public_fields(model))
        return f"Unknown field '{field}'; allowed fields are: {allowed}."
    if kind == "missing":
        return f"Field '{field}' is required."
    if kind == "sentence" or message.startswith("'"):  # already a sentence naming its field
        return _sentence(message)
    if not loc:  # a model-level rule: the message names its fields
        return _sentence(f"'{prefix}' {message}" if prefix else message)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        name = str(loc[0])
        if name in RANGES:
            return f"'{field}' must be {RANGES[name]} (got {_shown(given)})."
    if kind == "literal_error":
        return f"'{field}' must be {message.removeprefix('Input should be ')} (got {_shown(given)})."
    if kind.endswith("_type") or kind in ("model_type", "model_attributes_type", "dict_type"):
        wanted = message.removeprefix("Input should be ").removeprefix("a valid ")
        return f"'{field}' must be {_article(wanted)} (got {_type_name(given)})."
    if kind in ("too_long", "too_short", "string_too_long", "string_too_short"):
        return f"'{field}' {message.lower().removeprefix('list ').removeprefix('string ')}."
    return f"'{field}' {message[0].lower() + message[1:]}" + ("" if message.endswith(".") else ".")


def _field_path(loc: list) -> str:
    path = ""
    for part in loc:
        if not isinstance(part, int):  # a client's own key: control characters escaped, length bounded
            part = _SHOWN.repr(str(part))[1:-1]
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _public_fields(model: type[BaseModel]) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        names.append(alias.choices[0] if isinstance(alias, AliasChoices) else name)
    return names


def _sentence(message: str) -> str:
    message = message[0].upper() + message[1:]
    return message if message.endswith(".") else message + "."


def _article(noun: str) -> str:
    if noun.startswith(("a ", "an ", "one of")):
        return noun
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# Values shown in messages: short, and shallow (a value nested thousands deep has no safe full repr).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 60, 40


def _shown(value: Any) -> str:
    text = _SHOWN.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
