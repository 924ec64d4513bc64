"""Worker settings: every value comes from the environment (optionally from a TOML file).

Names and defaults follow the deployment design (HF_TOKEN, S3_*, MAX_TEXT_LENGTH, ...). The
network-volume layout lives under VIBEVOICE_HOME so tests and local runs can point it at a
folder of their own. An invalid value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from audio.formats import FORMATS, SAMPLE_RATES

MODEL_SAMPLE_RATE = 24000  # the rate the model's audio (and reference voices) come in


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    # --- model -------------------------------------------------------------------------
    hf_token: SecretStr | None = None
    model_id: str = "vibevoice/VibeVoice-7B-hf"
    model_path: Path | None = Field(None, description="A local checkpoint folder; wins over MODEL_ID.")
    runpod_hf_cache: Path = Path("/runpod-volume/huggingface-cache/hub")
    device: Literal["auto", "cuda", "cpu"] = "auto"

    # --- network volume layout ----------------------------------------------------------
    vibevoice_home: Path = Path("/runpod-volume/vibevoice")

    # --- S3 delivery ---------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_bucket_name: str | None = None
    s3_region: str = "us-east-1"
    s3_key_prefix: str = "vibevoice/"
    s3_presign_expiry: int = Field(3600, ge=60, le=7 * 24 * 3600)
    s3_max_attempts: int = Field(3, ge=1, le=10)
    s3_timeout: float = Field(10.0, gt=0, le=300)
    # Wall-clock limit of one result's upload, all attempts together (a slow endpoint cannot stretch it).
    s3_upload_deadline: float = Field(120.0, gt=0, le=3600)
    inline_limit_bytes: int = Field(9_000_000, ge=1_000, le=20_000_000)
    # The largest final job output RunPod accepts (its /runsync payload limit, which the SDK warns
    # about too); a streamed job's aggregate leaves its audio items out beyond it (handler.py).
    result_limit_bytes: int = Field(20_000_000, ge=10_000, le=20_000_000)

    # --- job limits and defaults -----------------------------------------------------------
    # OpenAI's limit for speech input: the bridge and .runpod/hub.json share it (tests/test_deploy_files.py).
    max_text_length: int = Field(4096, ge=1, le=1_000_000)
    # Every cost a job can drive is bounded before work starts (see the failure section of the docs).
    max_chunks: int = Field(100, ge=1, le=10_000)  # chunks one job's text may be cut into
    # The longest audio a job may ask for: every chunk's frame cap, slowed down by `speed`.
    max_output_seconds: float = Field(3600.0, gt=0, le=24 * 3600)
    default_sample_rate: int = 24000
    max_chunk_chars: int = Field(300, ge=40, le=5000)
    default_speaker: str = "Alice"
    default_cfg_scale: float = Field(1.3, gt=0, le=10)
    # 10: what VibeVoice's own inference code runs (the community checkpoints' configs say 20, at twice
    # the diffusion head's cost per frame); 0: the checkpoint's own count (its generation config's
    # num_diffusion_steps). Resolved once by the engine (engine/decoder.default_diffusion_steps), which
    # compiles its decode step for it.
    default_diffusion_steps: int = Field(10, ge=0, le=50)
    default_output_format: Literal[tuple(FORMATS)] = "mp3"  # type: ignore[valid-type]
    target_lufs: float = Field(-20.0, ge=-70, le=-5)
    chunk_gap_ms: int = Field(150, ge=0, le=5000)
    # Pause tags ([pause:2s]): the silence they may add to one job in all (each tag is at most 10 s).
    max_pause_sec: float = Field(60.0, ge=0, le=3600)

    # --- voice cloning from the request ----------------------------------------------------
    voice_max_bytes: int = Field(20_000_000, ge=1_000, le=200_000_000)
    voice_min_seconds: float = Field(0.5, gt=0)
    voice_max_seconds: float = Field(300.0, gt=0, le=3600)
    voice_max_total_seconds: float = Field(600.0, gt=0, le=4 * 3600)  # all voices of one job together
    voice_fetch_timeout: float = Field(15.0, gt=0, le=300)
    # Comma-separated networks that voice URLs may reach although they are not public
    # (e.g. "127.0.0.0/8" for a local test server). Empty: only public addresses.
    voice_url_allowed_networks: str = ""

    # --- decoding and streaming ----------------------------------------------------------------
    decode_loop: Literal["own", "stock"] = "own"  # "stock": transformers' generate, one chunk at a time
    batch_size: int = Field(0, ge=0, le=64)  # chunks of all jobs decoded together; 0 = automatic (engine/scheduler.py)
    # The compiled static frame step (engine/framestep.py): auto = on for CUDA, off on the CPU (compiling is
    # slow); on = required: a worker that cannot compile it, or whose compiled step disagrees with the eager
    # loop at start-up, fails its fitness check (auto falls back to the eager loop, loudly).
    compile: Literal["auto", "on", "off"] = "auto"
    # The language model's attention for prompts and the eager loop: auto = flash_attention_2 on CUDA where
    # flash-attn is installed, else sdpa; flash_attention_2 = required (same rule as COMPILE=on).
    attention: Literal["auto", "flash_attention_2", "sdpa"] = "auto"
    stream_chunk_ms: int = Field(400, ge=100, le=5000)  # audio per streamed item
    # The language model's linear layers: as loaded, or quantized to 8 bits at load time (engine/weights.py).
    weights: Literal["bf16", "int8", "fp8"] = "bf16"

    # --- worker ------------------------------------------------------------------------------
    # Jobs taken at once (their chunks share the decode batch); 0 = automatic: on CUDA as many as
    # fill the batch, on the CPU 2 (inference.VibeVoiceEngine.default_concurrency).
    max_concurrency: int = Field(0, ge=0, le=64)
    # After SIGTERM, how long a running job may go on before it is stopped and reported FAILED
    # (RunPod kills the worker a few seconds after SIGTERM; a killed job would vanish). 0: no limit.
    shutdown_timeout: float = Field(8.0, ge=0, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("default_sample_rate")
    @classmethod
    def _known_rate(cls, value: int) -> int:
        if value not in SAMPLE_RATES:
            raise ValueError(f"must be one of {', '.join(map(str, SAMPLE_RATES))}")
        return value

    @field_validator("voice_url_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"{part!r} is not a network (write e.g. 127.0.0.0/8)") from None
        return value

    @field_validator("default_speaker")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Values from the TOML file named by VIBEVOICE_CONFIG; the environment wins over it.
        toml_file = os.environ.get("VIBEVOICE_CONFIG") or None
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))

    # --- derived paths of the volume layout ----------------------------------------------------
    @cached_property
    def hf_home(self) -> Path:
        return self.vibevoice_home / "hf_home"

    @cached_property
    def hf_cache(self) -> Path:
        return self.vibevoice_home / "hf_cache"

    @cached_property
    def compile_cache(self) -> Path:
        """torch.compile's caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), reused by later cold starts."""
        return self.vibevoice_home / "compile_cache"

    @cached_property
    def voices_dir(self) -> Path:
        return self.vibevoice_home / "demo" / "voices"

    @cached_property
    def voice_url_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """VOICE_URL_ALLOWED_NETWORKS, parsed (the validator has checked every part)."""
        parts = (part.strip() for part in self.voice_url_allowed_networks.split(","))
        return tuple(ipaddress.ip_network(part, strict=False) for part in parts if part)

    @property
    def s3_configured(self) -> bool:
        return bool(
            self.s3_endpoint_url and self.s3_access_key_id and self.s3_secret_access_key and self.s3_bucket_name
        )

    def secret_values(self) -> list[str]:
        """Every secret this process knows, so logs and messages can be scrubbed of them."""
        secrets = [self.hf_token, self.s3_access_key_id, self.s3_secret_access_key]
        values = [s.get_secret_value() for s in secrets if s is not None]
        values += [os.environ.get(name, "") for name in ("RUNPOD_API_KEY", "RUNPOD_AI_API_KEY", "AUTH_TOKEN")]
        return [v for v in values if len(v) >= 4]


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one line that names the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "_".join(str(part) for part in error["loc"]).upper() or "settings"
        raise SettingsError(f"Invalid setting {name}: {error['msg']}.") from None
