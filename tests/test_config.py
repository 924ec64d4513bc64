"""Settings from the environment and an optional TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import SettingsError, load_settings


def test_design_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.max_text_length == 4096
    assert settings.default_sample_rate == 24000
    assert settings.max_chunk_chars == 300
    assert settings.default_speaker == "Alice"
    assert settings.default_cfg_scale == 1.3
    assert settings.s3_region == "us-east-1"
    assert settings.model_id == "vibevoice/VibeVoice-7B-hf"
    assert settings.voices_dir == Path("/runpod-volume/vibevoice/demo/voices")
    assert not settings.s3_configured


def test_volume_layout_follows_vibevoice_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VIBEVOICE_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.hf_home == tmp_path / "hf_home"
    assert settings.hf_cache == tmp_path / "hf_cache"
    assert settings.voices_dir == tmp_path / "demo" / "voices"


def test_environment_wins_over_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "worker.toml"
    toml.write_text('max_text_length = 500\ndefault_speaker = "Frank"\n')
    monkeypatch.setenv("VIBEVOICE_CONFIG", str(toml))
    monkeypatch.setenv("MAX_TEXT_LENGTH", "700")
    settings = load_settings()
    assert settings.max_text_length == 700
    assert settings.default_speaker == "Frank"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MAX_TEXT_LENGTH", "lots", "Invalid setting MAX_TEXT_LENGTH"),
        ("DEFAULT_SAMPLE_RATE", "12345", "Invalid setting DEFAULT_SAMPLE_RATE: Value error, must be one of"),
        ("DEFAULT_CFG_SCALE", "-1", "Invalid setting DEFAULT_CFG_SCALE"),
        ("MAX_CHUNK_CHARS", "5", "Invalid setting MAX_CHUNK_CHARS"),
        ("DEVICE", "tpu", "Invalid setting DEVICE"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=fragment):
        load_settings()


def test_s3_needs_every_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("S3_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "secret-value")
    assert not load_settings().s3_configured
    monkeypatch.setenv("S3_BUCKET_NAME", "bucket")
    settings = load_settings()
    assert settings.s3_configured
    assert "secret-value" not in repr(settings)
    assert "secret-value" in settings.secret_values()
