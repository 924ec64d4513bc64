"""The VibeVoice engine: one model per process, loaded once, generating chunk by chunk.

It drives transformers' native VibeVoice classes (`VibeVoiceForConditionalGeneration`,
`VibeVoiceProcessor`). Each chunk's prompt is VibeVoice's script prompt with the reference voice
of every speaker in that chunk, so a speaker sounds the same in every chunk.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, StoppingCriteria, StoppingCriteriaList, VibeVoiceForConditionalGeneration

from config import MODEL_SAMPLE_RATE, Settings
from text import Chunk, max_frames_for

log = logging.getLogger("vibevoice.engine")

SYSTEM_PROMPT = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each "
    "respective speaker.\n"
)


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message is one line for the operator."""


@dataclass(frozen=True)
class GenerationParams:
    cfg_scale: float
    diffusion_steps: int
    seed: int
    max_new_tokens: int | None = None  # the job's own cap on frames per chunk
    use_voice_prompt: bool = True  # False: generate without the reference voices ("disable_prefill")


@dataclass
class ChunkAudio:
    index: int
    audio: np.ndarray  # 24 kHz mono float32
    frames: int
    reached_cap: bool
    seconds: float  # wall time spent generating it


@dataclass
class EngineInfo:
    source: str
    device: str
    dtype: str
    attention: str
    load_seconds: float
    notes: list[str] = field(default_factory=list)


class _StopWhen(StoppingCriteria):
    """Ends generation between frames when `should_stop()` turns true (cancellation)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class VibeVoiceEngine:
    """Loads the model once and turns chunks plus reference voices into 24 kHz audio."""

    sample_rate = MODEL_SAMPLE_RATE

    def __init__(self, model: VibeVoiceForConditionalGeneration, processor, info: EngineInfo):
        self.model = model
        self.processor = processor
        self.info = info
        self.processor.tokenizer.padding_side = "left"  # batched prompts must be left-padded
        self.hop_length = int(model.config.audio_config.hop_length)
        self.frame_rate = self.sample_rate / self.hop_length  # 7.5 frames per second
        self._lock = threading.Lock()  # one generation at a time per process

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings) -> VibeVoiceEngine:
        started = time.perf_counter()
        path, source = resolve_model_path(settings)
        check_native_layout(path)
        device = pick_device(settings.device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        notes: list[str] = []
        model, attention = _load_model(path, device, dtype, notes)
        processor = AutoProcessor.from_pretrained(path)
        model.eval()
        info = EngineInfo(
            source=source,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            attention=attention,
            load_seconds=time.perf_counter() - started,
            notes=notes,
        )
        log.info(
            "model loaded from %s on %s (%s, %s attention) in %.1f s",
            source, device, info.dtype, attention, info.load_seconds,
        )  # fmt: skip
        return cls(model, processor, info)

    # --- prompts --------------------------------------------------------------------------

    def build_prompt(self, chunk: Chunk, with_voices: bool) -> str:
        """VibeVoice's script prompt, as the reference processor writes it.

        Voices are listed in ascending speaker order; each `<|vision_pad|>` placeholder is
        expanded by the processor to one token per 3200 samples of that speaker's reference.
        """
        processor = self.processor
        prompt = SYSTEM_PROMPT
        if with_voices:
            prompt += " Voice input:\n"
            voice = processor.audio_bos_token + processor.audio_token + processor.audio_eos_token
            for speaker in chunk.speakers:
                prompt += f" Speaker {speaker}:{voice}\n"
        prompt += " Text input:\n"
        for turn in chunk.turns:
            prompt += f" Speaker {turn.speaker}: {turn.text}\n"
        prompt += " Speech output:\n" + processor.audio_bos_token
        return prompt

    def prepare_inputs(self, chunk: Chunk, voices: dict[int, np.ndarray], with_voices: bool) -> dict:
        """Token ids, attention mask and (with voices) the reference audio, on the model's device."""
        prompt = self.build_prompt(chunk, with_voices)
        audio = [voices[speaker] for speaker in chunk.speakers] if with_voices else None
        inputs = self.processor(text=prompt, audio=audio, sampling_rate=self.sample_rate, return_tensors="pt")
        device = self.model.device
        prepared = {key: value.to(device) for key, value in inputs.items()}
        if "input_values" in prepared:
            prepared["input_values"] = prepared["input_values"].to(self.model.dtype)
        return prepared

    # --- generation --------------------------------------------------------------------------

    def frame_cap(self, chunk: Chunk, params: GenerationParams) -> int:
        cap = max_frames_for(chunk, self.frame_rate)
        return min(cap, params.max_new_tokens) if params.max_new_tokens else cap

    def generate_chunk(
        self,
        chunk: Chunk,
        voices: dict[int, np.ndarray],
        params: GenerationParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> ChunkAudio:
        """Generate one chunk with transformers' `generate`, seeded with the job seed."""
        started = time.perf_counter()
        inputs = self.prepare_inputs(chunk, voices, params.use_voice_prompt)
        cap = self.frame_cap(chunk, params)
        stopping = StoppingCriteriaList([_StopWhen(should_stop)]) if should_stop else None
        with self._lock, torch.inference_mode():
            torch.manual_seed(params.seed)
            output = self.model.generate(
                **inputs,
                max_new_tokens=cap,
                guidance_scale=params.cfg_scale,
                num_diffusion_steps=params.diffusion_steps,
                stopping_criteria=stopping,
                return_dict_in_generate=True,
            )
        waveform = output.audio[0]
        samples = waveform.reshape(-1).float().cpu().numpy() if waveform is not None else np.zeros(0, dtype=np.float32)
        generated = output.sequences[0, inputs["input_ids"].shape[1] :]
        frames = int((generated == self.model.config.audio_token_id).sum())
        reached_cap = len(generated) >= cap and int(generated[-1]) == self.model.config.audio_token_id
        return ChunkAudio(
            index=chunk.index,
            audio=samples.astype(np.float32, copy=False),
            frames=frames,
            reached_cap=reached_cap,
            seconds=time.perf_counter() - started,
        )

    def synthesize(
        self,
        chunks: list[Chunk],
        voices: dict[int, np.ndarray],
        params: GenerationParams,
        on_chunk: Callable[[ChunkAudio, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[ChunkAudio]:
        """Generate every chunk in order; `on_chunk(result, total)` is called after each one."""
        results = []
        for chunk in chunks:
            if should_stop and should_stop():
                break
            result = self.generate_chunk(chunk, voices, params, should_stop)
            results.append(result)
            if on_chunk:
                on_chunk(result, len(chunks))
        return results


# --- model location and loading -----------------------------------------------------------------


def resolve_model_path(settings: Settings) -> tuple[Path, str]:
    """Where the checkpoint is: MODEL_PATH, RunPod's cached models, the volume's cache, or a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if settings.model_path is not None:
        if not (settings.model_path / "config.json").is_file():
            raise ModelLoadError(f"MODEL_PATH {settings.model_path} has no config.json.")
        return settings.model_path, str(settings.model_path)

    for cache, label in ((settings.runpod_hf_cache, "RunPod cached model"), (settings.hf_cache, "volume cache")):
        if cache.is_dir():
            try:
                path = snapshot_download(settings.model_id, cache_dir=str(cache), local_files_only=True)
                return Path(path), f"{settings.model_id} ({label})"
            except (LocalEntryNotFoundError, FileNotFoundError, OSError):
                continue

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        path = snapshot_download(settings.model_id, cache_dir=str(settings.hf_cache), token=token)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"could not download {settings.model_id}: {reason}") from None
    return Path(path), f"{settings.model_id} (downloaded)"


def check_native_layout(path: Path) -> None:
    """The native classes need the "-hf" layout; a community checkpoint must be converted first."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json could not be read: {exc}") from None
    if "decoder_config" in config or "acoustic_tokenizer_config" in config:
        raise ModelLoadError(
            f"{path} is a community-layout VibeVoice checkpoint; convert it to the transformers-native layout first."
        )
    if config.get("model_type") != "vibevoice":
        raise ModelLoadError(f"{path} is not a VibeVoice checkpoint (model_type {config.get('model_type')!r}).")


def pick_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE is cuda but no CUDA device is available.")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def _load_model(
    path: Path, device: str, dtype: torch.dtype, notes: list[str]
) -> tuple[VibeVoiceForConditionalGeneration, str]:
    """Load with flash_attention_2 on CUDA when it works, else sdpa (said once in the log)."""
    attempts = ["sdpa"]
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            attempts = ["flash_attention_2", "sdpa"]
        except ImportError:
            notes.append("flash-attn is not installed; using sdpa attention")
            log.warning(notes[-1])
    last_error: Exception | None = None
    for attention in attempts:
        try:
            model = VibeVoiceForConditionalGeneration.from_pretrained(
                path,
                dtype=dtype,
                # Only the language model has a choice of attention; the codecs are convolutional.
                attn_implementation={"text_config": attention},
                device_map=device,
            )
            return model, attention
        except (ImportError, ValueError, RuntimeError) as exc:
            last_error = exc
            if attention == "flash_attention_2":
                notes.append(f"flash_attention_2 failed ({str(exc).splitlines()[0]}); using sdpa attention")
                log.warning(notes[-1])
    reason = str(last_error).splitlines()[0] if last_error else "unknown error"
    raise ModelLoadError(f"could not load the model from {path}: {reason}")
