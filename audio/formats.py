"""Every output format in one table: its name, content type, codec, rates, bitrates and streaming.

Everything else derives from `FORMATS`: the job schema's allowed `output_format` values, sample
rates and bitrate rules, the DEFAULT_OUTPUT_FORMAT setting, the encoders, the check that a
format can stream, and the format table in docs/api.md (`markdown_table`). Tests check that the
bridge (bridge/src/formats.js) and the RunPod Hub file (.runpod/hub.json) agree with it.

Adding a format is one `OutputFormat` entry here, plus an encoder class in encoders.py when
none of the existing ones fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audio import encoders

# Output sample rates of the formats that take any rate; 24000 is the model's own rate.
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
# The rates libopus encodes (a decoder plays Opus at 48 kHz whatever rate it was encoded at).
OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)


@dataclass(frozen=True)
class Bitrate:
    """The kbit/s a lossy format takes: a default, and the allowed range by sample rate."""

    default_kbps: int
    # (lowest sample rate, min kbps, max kbps), highest rate first; the first row that fits applies.
    ranges: tuple[tuple[int, int, int], ...]

    def range_at(self, sample_rate: int) -> tuple[int, int]:
        for lowest_rate, low, high in self.ranges:
            if sample_rate >= lowest_rate:
                return low, high
        raise ValueError(f"no bitrate range for {sample_rate} Hz")

    def default_at(self, sample_rate: int) -> int:
        """The default, moved into the range where the rate does not allow it (mp3 at 8 kHz)."""
        low, high = self.range_at(sample_rate)
        return min(max(self.default_kbps, low), high)


@dataclass(frozen=True)
class OutputFormat:
    name: str  # the job's `output_format`
    content_type: str
    extension: str
    codec: str  # the FFmpeg encoder, or "pcm_s16le" for samples written here
    container: str | None  # the FFmpeg muxer; None where encoders.py writes the bytes itself
    encoder: type[encoders.Encoder]
    sample_rates: tuple[int, ...] = SAMPLE_RATES
    default_sample_rate: int | None = None  # when the job sets none; None: the DEFAULT_SAMPLE_RATE setting
    bitrate: Bitrate | None = None  # None: `bitrate_kbps` does not apply
    streams: bool = False  # True: its bytes can be sent as they are encoded and concatenate to one file
    aliases: tuple[str, ...] = ()  # other names a job may use for it
    note: str = ""  # one line for the docs' format table

    def default_kbps(self, sample_rate: int) -> int | None:
        """The bitrate an encoder uses when the job sets none (None: the format has no bitrate)."""
        return self.bitrate.default_at(sample_rate) if self.bitrate else None


FORMATS: dict[str, OutputFormat] = {
    spec.name: spec
    for spec in (
        OutputFormat(
            "mp3", "audio/mpeg", "mp3", codec="libmp3lame", container="mp3", encoder=encoders.LameEncoder,
            # libmp3lame's limits for MPEG-1 (32-48 kHz), MPEG-2 (16-24 kHz) and MPEG-2.5 (8-12 kHz)
            bitrate=Bitrate(128, ((32000, 32, 320), (16000, 8, 160), (0, 8, 64))),
            streams=True, note="constant bitrate; gapless as a whole file (LAME tag), 1105 samples late as a stream",
        ),
        OutputFormat(
            "opus", "audio/ogg", "opus", codec="libopus", container="ogg", encoder=encoders.FFmpegEncoder,
            sample_rates=OPUS_SAMPLE_RATES, default_sample_rate=48000, bitrate=Bitrate(64, ((0, 6, 256),)),
            streams=True, note="Ogg Opus; players decode it at 48 kHz whatever rate it was encoded at",
        ),
        OutputFormat(
            "aac", "audio/aac", "aac", codec="aac", container="adts", encoder=encoders.FFmpegEncoder,
            bitrate=Bitrate(128, ((0, 16, 320),)), note="AAC-LC in ADTS",
        ),
        OutputFormat("flac", "audio/flac", "flac", codec="flac", container="flac", encoder=encoders.FFmpegEncoder),
        OutputFormat(
            "wav", "audio/wav", "wav", codec="pcm_s16le", container=None, encoder=encoders.WavEncoder,
            streams=True, note="16-bit; a stream's header gives no size",
        ),
        OutputFormat(
            "pcm_16", "audio/pcm", "pcm", codec="pcm_s16le", container=None, encoder=encoders.PcmEncoder,
            streams=True, aliases=("pcm", "pcm16", "pcm_s16le"), note="raw 16-bit little-endian mono, no header",
        ),
    )
}  # fmt: skip

# Every sample rate some format takes.
ALL_SAMPLE_RATES = tuple(sorted({rate for spec in FORMATS.values() for rate in spec.sample_rates}))


def open_encoder(
    fmt: str, sample_rate: int, bitrate_kbps: int | None = None, streaming: bool = False
) -> encoders.Encoder:
    """The encoder of format `fmt` (a name in FORMATS)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    spec = FORMATS[fmt]
    return spec.encoder(spec, sample_rate, bitrate_kbps, streaming)


def encode(samples: np.ndarray, fmt: str, sample_rate: int, bitrate_kbps: int | None = None) -> bytes:
    """Encode a whole signal into one file of `fmt`."""
    encoder = open_encoder(fmt, sample_rate, bitrate_kbps)
    return encoder.write(samples) + encoder.close()


def resolve_name(name: str) -> str:
    """A format's own name for a name or alias (case-insensitive); unknown names are returned as given."""
    lowered = name.lower()
    for spec in FORMATS.values():
        if lowered in spec.aliases:
            return spec.name
    return name


def streaming_names() -> list[str]:
    return [spec.name for spec in FORMATS.values() if spec.streams]


def bitrate_names() -> list[str]:
    return [spec.name for spec in FORMATS.values() if spec.bitrate is not None]


def join_words(words: list[str], last: str = "or") -> str:
    """'a, b or c' (as error messages list allowed values)."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def markdown_table() -> str:
    """The format table of docs/api.md (a test checks that the document holds exactly this)."""
    lines = [
        "| `output_format` | Content type | Codec | Sample rates (Hz) | `bitrate_kbps` (default) | Streams | Notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in FORMATS.values():
        rates = ", ".join(str(rate) for rate in spec.sample_rates)
        if spec.default_sample_rate:
            rates += f" (default {spec.default_sample_rate})"
        bitrate = f"{_ranges(spec.bitrate)} ({spec.bitrate.default_kbps})" if spec.bitrate else "-"
        name = f"`{spec.name}`" + "".join(f", `{alias}`" for alias in spec.aliases)
        streams = "yes" if spec.streams else "no"
        lines.append(f"| {name} | {spec.content_type} | {spec.codec} | {rates} | {bitrate} | {streams} | {spec.note} |")
    return "\n".join(lines) + "\n"


def _ranges(bitrate: Bitrate) -> str:
    """'32-320 from 32000 Hz, 8-160 from 16000 Hz, 8-64 below', or '16-320' for one range."""
    if len(bitrate.ranges) == 1:
        return "{1}-{2}".format(*bitrate.ranges[0])
    return ", ".join(f"{low}-{high} " + (f"from {rate} Hz" if rate else "below") for rate, low, high in bitrate.ranges)
