"""The format registry (audio/formats.py) is the one list of output formats: everything else agrees with it.

Checked here: its own consistency, the RunPod Hub options, the bridge's table, and that a new
format is one entry in the table (plus an encoder class where needed). The docs' format table is
checked in test_docs.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from audio.formats import FORMATS, SAMPLE_RATES, Bitrate
from config import Settings

ROOT = Path(__file__).resolve().parents[2]
HUB_ENV = {
    entry["key"]: entry["input"] for entry in json.loads((ROOT / ".runpod" / "hub.json").read_text())["config"]["env"]
}
# The bridge answers with OpenAI's conventional content types; for Ogg Opus that is audio/opus.
OPENAI_CONTENT_TYPES = {"opus": "audio/opus"}


@pytest.mark.parametrize("spec", FORMATS.values(), ids=list(FORMATS))
def test_every_entry_is_complete(spec) -> None:
    assert spec.content_type.startswith("audio/") and spec.extension and spec.codec
    # A format that takes only some rates names the one a job gets without a rate of its own.
    if set(spec.sample_rates) != set(SAMPLE_RATES):
        assert spec.default_sample_rate in spec.sample_rates
    if spec.bitrate is not None:
        for rate in spec.sample_rates:
            low, high = spec.bitrate.range_at(rate)
            assert low <= spec.bitrate.default_at(rate) <= high
    names = [name for other in FORMATS.values() for name in (other.name, *other.aliases)]
    assert len(names) == len(set(names))


def test_bitrate_ranges_pick_the_first_row_that_fits() -> None:
    mp3 = FORMATS["mp3"].bitrate
    assert (mp3.range_at(48000), mp3.range_at(24000), mp3.range_at(8000)) == ((32, 320), (8, 160), (8, 64))
    assert mp3.default_at(8000) == 64 and mp3.default_at(24000) == 128
    with pytest.raises(ValueError):
        Bitrate(64, ((16000, 8, 64),)).range_at(8000)


def test_hub_offers_exactly_the_registry_and_the_rates() -> None:
    formats = [option["value"] for option in HUB_ENV["DEFAULT_OUTPUT_FORMAT"]["options"]]
    assert formats == list(FORMATS)
    # An option input is a string input in RunPod's hub.json schema (number inputs take min/max only).
    rates = [option["value"] for option in HUB_ENV["DEFAULT_SAMPLE_RATE"]["options"]]
    assert rates == [str(rate) for rate in SAMPLE_RATES]


def bridge_formats() -> dict[str, dict]:
    """bridge/src/formats.js's FORMATS table, read as data."""
    source = (ROOT / "bridge" / "src" / "formats.js").read_text()
    rows = re.findall(r"^\s+(\w+): \{ (.+) \},$", source, re.MULTILINE)
    table = {}
    for name, body in rows:
        fields = dict(re.findall(r"(\w+): (\"[^\"]*\"|\w+)", body))
        table[name] = {key: json.loads(value) for key, value in fields.items()}
    assert table, "no rows found in bridge/src/formats.js"
    return table


def test_the_bridge_asks_only_for_what_the_registry_offers() -> None:
    for name, row in bridge_formats().items():
        spec = FORMATS[row["worker"]]
        assert row["streams"] == spec.streams, name
        if row["sampleRate"] is None:  # the worker's default rate for that format
            assert spec.default_sample_rate is not None, name
        else:
            assert row["sampleRate"] in spec.sample_rates, name
        assert row["contentType"] == OPENAI_CONTENT_TYPES.get(name, spec.content_type), name


def test_settings_accept_every_format() -> None:
    for name in FORMATS:
        assert Settings(default_output_format=name).default_output_format == name


# A new format, added by one table entry before anything else is imported: G.711 u-law in WAV
# (FFmpeg's pcm_mulaw), through the existing FFmpegEncoder; and a second one with an encoder class
# of its own (raw 32-bit float samples).
NEW_FORMAT = r"""
import json, sys
import numpy as np
from audio import encoders
from audio import formats

class Float32Encoder(encoders.Encoder):
    def write(self, samples):
        return samples.astype("<f4").tobytes()
    def close(self):
        return b""

formats.FORMATS["ulaw"] = formats.OutputFormat(
    "ulaw", "audio/basic", "wav", codec="pcm_mulaw", container="wav", encoder=encoders.FFmpegEncoder,
    sample_rates=(8000,), default_sample_rate=8000, note="telephony",
)
formats.FORMATS["f32"] = formats.OutputFormat(
    "f32", "audio/pcm", "f32", codec="pcm_f32le", container=None, encoder=Float32Encoder, streams=True,
)

from config import load_settings
from jobs.planning import plan_job
from jobs.rendering import StreamRenderer, render
from jobs.schema import InputError, parse_job_input
from inference import ChunkAudio

settings = load_settings(default_output_format="ulaw")
report = {"table": formats.markdown_table()}
job = parse_job_input({"text": "New.", "disable_prefill": True}, settings)
report["resolved"] = [job.output_format, job.sample_rate, job.bitrate_kbps]
for bad in ({"text": "a", "stream": True}, {"text": "a", "sample_rate": 16000}, {"text": "a", "bitrate_kbps": 64}):
    try:
        parse_job_input(bad, settings)
    except InputError as exc:
        report.setdefault("errors", []).append(str(exc))
signal = (0.3 * np.sin(np.arange(24000) * 2 * np.pi * 440 / 24000)).astype(np.float32)
results = [ChunkAudio(0, signal, frames=0, reached_cap=False)]
plan = plan_job(job, settings, library=None)
rendered = render(plan, results, settings)
open(sys.argv[1], "wb").write(rendered.data)
streamed = plan_job(parse_job_input({"text": "a", "output_format": "f32", "stream": True, "disable_prefill": True,
                                    "normalize": False}, settings), settings, library=None)
renderer = StreamRenderer(streamed, settings)
pieces = renderer.audio(signal) + [renderer.finish()]
report["f32"] = [streamed.sample_rate, len(b"".join(pieces)), float(np.frombuffer(b"".join(pieces), "<f4")[1000])]
report["expected_f32"] = float(signal[1000])
print(json.dumps(report))
"""


def test_a_new_format_is_one_table_entry(tmp_path) -> None:
    """Schema, settings, rendering, streaming and the docs table follow a new registry entry."""
    out = tmp_path / "new.wav"
    done = subprocess.run(
        [sys.executable, "-c", NEW_FORMAT, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["resolved"] == ["ulaw", 8000, None]
    assert "| `ulaw` | audio/basic | pcm_mulaw | 8000 (default 8000) | - | no | telephony |" in report["table"]
    assert report["errors"] == [
        "'output_format' ulaw cannot be streamed; with 'stream': true use mp3, opus, wav, pcm_16 or f32.",
        "'sample_rate' for ulaw must be one of 8000 (got 16000).",
        "'bitrate_kbps' applies only to mp3, opus and aac.",
    ]
    from audio_helpers import probe

    decoded = probe(out.read_bytes())
    assert (decoded.codec, decoded.sample_rate) == ("pcm_mulaw", 8000)
    assert abs(decoded.duration - 1.0) < 1e-3
    rate, size, sample = report["f32"]
    assert (rate, size) == (24000, 24000 * 4) and sample == pytest.approx(report["expected_f32"])
