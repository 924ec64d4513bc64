"""The VibeVoice engine: one model per process, loaded once, turning a job's chunks into audio.

It drives transformers' native VibeVoice classes (`VibeVoiceForConditionalGeneration`,
`VibeVoiceProcessor`). Each chunk's prompt is VibeVoice's script prompt with the reference voice
of every speaker in that chunk, so a speaker sounds the same in every chunk.

Two decode loops produce the same audio per chunk: `decoder.BatchDecoder` (the default) decodes
the chunks of a job together in batches, with both guidance branches in one pass; transformers'
stock `generate` (`generate_chunk`) decodes one chunk at a time and stays as the reference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, StoppingCriteria, StoppingCriteriaList, VibeVoiceForConditionalGeneration

import hub_cache
from config import MODEL_SAMPLE_RATE, Settings
from decoder import BatchDecoder, DecodeRequest
from text import Chunk, Turn, max_frames_for

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
    seconds: float  # wall time spent generating it (with batching: its whole batch)


@dataclass
class EngineInfo:
    source: str
    device: str
    dtype: str
    attention: str
    load_seconds: float
    notes: list[str] = field(default_factory=list)


# Automatic batch size on CUDA (BATCH_SIZE=0): the largest batch whose KV cache and codec state
# fit in half of the free memory, at most MAX_AUTO_BATCH; on the CPU, CPU_AUTO_BATCH.
MAX_AUTO_BATCH = 16
CPU_AUTO_BATCH = 8
AUTO_BATCH_MEMORY_SHARE = 0.5
CODEC_STATE_BYTES = 64 * 2**20  # per sequence: codec conv caches, frame activations, the frames kept

AudioCallback = Callable[[int, np.ndarray], None]
ChunkCallback = Callable[[ChunkAudio, int], None]
ProgressCallback = Callable[[float, int], None]


class _StopWhen(StoppingCriteria):
    """Ends generation between frames when `should_stop()` turns true (cancellation)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class VibeVoiceEngine:
    """Loads the model once and turns chunks plus reference voices into 24 kHz audio."""

    sample_rate = MODEL_SAMPLE_RATE

    def __init__(
        self,
        model: VibeVoiceForConditionalGeneration,
        processor,
        info: EngineInfo,
        batch_size: int = 0,
        decode_loop: str = "own",
    ):
        self.model = model
        self.processor = processor
        self.info = info
        self.processor.tokenizer.padding_side = "left"  # batched prompts must be left-padded
        self.hop_length = int(model.config.audio_config.hop_length)
        self.frame_rate = self.sample_rate / self.hop_length  # 7.5 frames per second
        self.batch_size = batch_size  # 0: automatic
        self.decode_loop = decode_loop
        self.decoder = BatchDecoder(model)
        self._lock = threading.Lock()  # one generation at a time per process
        self._oom_batch_limit: int | None = None  # lowered after an out-of-memory error

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
        return cls(model, processor, info, batch_size=settings.batch_size, decode_loop=settings.decode_loop)

    # --- start-up check -------------------------------------------------------------------

    def warm_up(self) -> None:
        """Check that a full forward pass runs and yields finite audio (a start-up fitness check).

        A short prompt without voices goes through the whole frame path once: the language model,
        the diffusion head and the acoustic decoder. The first token is forced to a speech frame, so
        the check does not depend on which token the model would pick first. If the configured
        attention fails here (a flash-attn build that imports but whose kernels do not run on this
        GPU), the model switches to sdpa, the log says so, and the check runs again.
        """
        try:
            self._forward_once()
        except Exception as exc:  # any failure of the kernels: the sdpa retry below decides
            if self.info.attention == "sdpa":
                raise RuntimeError(f"the warm-up forward pass failed: {_first_line(exc)}") from None
            note = f"{self.info.attention} failed on the first forward pass ({_first_line(exc)}); using sdpa attention"
            log.warning(note)
            self.info.notes.append(note)
            self._use_sdpa()
            self.info.attention = "sdpa"
            try:
                self._forward_once()
            except Exception as retry_exc:
                raise RuntimeError(f"the warm-up forward pass failed with sdpa too: {_first_line(retry_exc)}") from None
        log.info("warm-up: a forward pass with %s attention gave finite audio", self.info.attention)

    def _use_sdpa(self) -> None:
        # Only the language model has a choice of attention; switching the whole model would also
        # hand sdpa to the codecs, which have none.
        text_config = self.model.config.get_text_config(decoder=True)
        for module in self.model.modules():
            if module is not self.model and getattr(module, "config", None) is text_config:
                module.set_attn_implementation("sdpa")
                return
        raise RuntimeError("the language model could not be found to switch its attention to sdpa")

    def _forward_once(self) -> None:
        inputs = self.prepare_inputs(Chunk(0, (Turn(0, "Hello."),)), {}, with_voices=False)
        request = DecodeRequest(index=0, input_ids=inputs["input_ids"][0], max_frames=1, seed=0)
        speech_frame = int(self.model.config.audio_token_id)
        with self._exclusive("warm-up"):
            decoded = self.decoder.decode(
                [request], guidance_scale=1.3, diffusion_steps=1, force_tokens=lambda index, step: speech_frame
            )
        audio = decoded[0].audio
        if audio.size == 0 or not bool(np.isfinite(audio).all()):
            raise RuntimeError(f"the forward pass gave {audio.size} samples, not all of them finite")

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
        with self._exclusive(f"chunk {chunk.index} (stock generate)"), torch.inference_mode():
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

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """One generation at a time per process (jobs that run concurrently take turns).

        Begin and end are logged at DEBUG, so a log shows that generations never overlap.
        """
        with self._lock:
            log.debug("generation begins: %s", what)
            try:
                yield
            finally:
                log.debug("generation ends: %s", what)

    def synthesize(
        self,
        chunks: list[Chunk],
        voices: dict[int, np.ndarray],
        params: GenerationParams,
        on_chunk: ChunkCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_audio: AudioCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[ChunkAudio]:
        """Generate every chunk; results come back in chunk order.

        `on_audio(chunk_index, samples)` receives the audio as it is decoded, frame by frame and in
        chunk order (a later chunk of the same batch is held until the earlier ones are done);
        `on_chunk(result, total)` is called for each finished chunk, also in chunk order;
        `on_progress(audio_seconds, chunks_done)` after every decoding step (a chunk counts as done
        when its sequence ends, even while the rest of its batch goes on).
        `should_stop()` is checked between frames (cancellation).
        """
        order = _ChunkOrder(chunks, on_audio, on_chunk)
        decoded_frames = 0
        ended: set[int] = set()

        def step(frames: int) -> None:
            nonlocal decoded_frames
            decoded_frames += frames
            if on_progress is not None:
                on_progress(decoded_frames * self.hop_length / self.sample_rate, len(ended))

        if self.decode_loop == "stock":
            for chunk in chunks:
                if should_stop and should_stop():
                    break
                result = self.generate_chunk(chunk, voices, params, should_stop)
                if on_audio is not None:
                    order.audio(chunk.index, result.audio)
                order.finished(result)
                ended.add(chunk.index)
                step(result.frames)
            return order.results()

        requests = [self._request(chunk, voices, params) for chunk in chunks]
        pending = list(requests)
        batch_size = self.pick_batch_size(requests)
        with self._exclusive(f"{len(requests)} chunk(s) in batches of {batch_size}"):
            while pending and not (should_stop and should_stop()):
                group = pending[:batch_size]
                started = time.perf_counter()
                order.start_attempt([request.index for request in group])
                try:
                    decoded = self.decoder.decode(
                        group,
                        guidance_scale=params.cfg_scale,
                        diffusion_steps=params.diffusion_steps,
                        on_frame=order.audio if on_audio is not None else None,
                        should_stop=should_stop,
                        on_step=step,
                        on_done=ended.add,
                    )
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    decoded = None
                if decoded is None:  # outside the except block, so the failed batch's tensors are freed
                    batch_size = self._after_out_of_memory(batch_size)
                    continue
                seconds = time.perf_counter() - started
                for sequence in decoded:
                    order.finished(
                        ChunkAudio(
                            index=sequence.index,
                            audio=sequence.audio,
                            frames=sequence.frames,
                            reached_cap=sequence.reached_cap,
                            seconds=seconds,
                        )
                    )
                pending = pending[len(group) :]
        return order.results()

    def _request(self, chunk: Chunk, voices: dict[int, np.ndarray], params: GenerationParams) -> DecodeRequest:
        inputs = self.prepare_inputs(chunk, voices, params.use_voice_prompt)
        return DecodeRequest(
            index=chunk.index,
            input_ids=inputs["input_ids"][0],
            max_frames=self.frame_cap(chunk, params),
            seed=params.seed,
            input_values=inputs.get("input_values"),
            padding_mask=inputs.get("padding_mask"),
        )

    def pick_batch_size(self, requests: list[DecodeRequest]) -> int:
        """BATCH_SIZE, or (0) `auto_batch_size` on CUDA and CPU_AUTO_BATCH on the CPU; never more
        than the chunks, never more than an out-of-memory error allowed, never less than 1."""
        wanted = self.batch_size
        if wanted == 0:
            if self.model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.model.device)
                longest = max(int(r.input_ids.numel()) + r.max_frames for r in requests)
                wanted = auto_batch_size(free, self.kv_bytes_per_token(), longest)
            else:
                wanted = CPU_AUTO_BATCH
        if self._oom_batch_limit is not None:
            wanted = min(wanted, self._oom_batch_limit)
        return max(1, min(wanted, len(requests)))

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token adds to one row of the language model's cache."""
        text = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        element = torch.finfo(self.model.dtype).bits // 8
        return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element

    def _after_out_of_memory(self, batch_size: int) -> int:
        smaller = max(1, batch_size // 2)
        if self._oom_batch_limit is None or smaller < self._oom_batch_limit:
            log.warning("out of GPU memory at batch size %d; retrying with %d from now on", batch_size, smaller)
        self._oom_batch_limit = smaller
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return smaller


def auto_batch_size(free_bytes: int, kv_bytes_per_token: int, longest_tokens: int) -> int:
    """The automatic CUDA batch size: what fits in AUTO_BATCH_MEMORY_SHARE of the free memory.

    Per sequence: a positive and a negative KV row for its whole length (prompt + frame cap),
    doubled because DynamicCache's concatenation briefly holds two copies, plus CODEC_STATE_BYTES.
    """
    per_sequence = 2 * 2 * kv_bytes_per_token * longest_tokens + CODEC_STATE_BYTES
    return max(1, min(MAX_AUTO_BATCH, int(free_bytes * AUTO_BATCH_MEMORY_SHARE // per_sequence)))


class _ChunkOrder:
    """Hands out audio and finished chunks in chunk order, though a batch decodes them together.

    The current chunk's frames pass straight through; a later chunk's frames wait until every
    earlier chunk is done. When a batch is retried (after running out of memory), the audio
    already handed out is not handed out again: the retry regenerates the same audio (each chunk
    has its own seeded generator), and only what lies beyond it is new.
    """

    def __init__(self, chunks: list[Chunk], on_audio: AudioCallback | None, on_chunk: ChunkCallback | None):
        self.order = [chunk.index for chunk in chunks]
        self.on_audio = on_audio
        self.on_chunk = on_chunk
        self.position = 0  # index into `order` of the chunk whose audio flows now
        self.sent: dict[int, int] = dict.fromkeys(self.order, 0)  # samples handed out per chunk
        self.received: dict[int, int] = dict.fromkeys(self.order, 0)  # samples seen in this attempt
        self.held: dict[int, list[np.ndarray]] = {index: [] for index in self.order}
        self.done: dict[int, ChunkAudio] = {}

    def start_attempt(self, indices: list[int]) -> None:
        for index in indices:
            self.received[index] = 0
            self.held[index] = []

    def audio(self, index: int, samples: np.ndarray) -> None:
        start = self.received[index]
        self.received[index] += samples.size
        new = samples[max(0, self.sent[index] - start) :]
        if not new.size:
            return
        if self._current() == index:
            self._send(index, new)
        else:
            self.held[index].append(new)

    def finished(self, result: ChunkAudio) -> None:
        self.done[result.index] = result
        while (index := self._current()) is not None and index in self.done:
            if self.on_chunk:
                self.on_chunk(self.done[index], len(self.order))
            self.position += 1
            following = self._current()
            if following is not None and self.held[following]:
                held, self.held[following] = self.held[following], []
                for piece in held:
                    self._send(following, piece)

    def results(self) -> list[ChunkAudio]:
        return [self.done[index] for index in self.order if index in self.done]

    def _current(self) -> int | None:
        return self.order[self.position] if self.position < len(self.order) else None

    def _send(self, index: int, samples: np.ndarray) -> None:
        self.sent[index] += samples.size
        if self.on_audio is not None:
            self.on_audio(index, samples)


# --- model location and loading -----------------------------------------------------------------


def resolve_model_path(settings: Settings) -> tuple[Path, str]:
    """Where the checkpoint is: MODEL_PATH, RunPod's cached models, the volume's cache, or a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if settings.model_path is not None:
        if not (settings.model_path / "config.json").is_file():
            raise ModelLoadError(f"MODEL_PATH {settings.model_path} has no config.json.")
        return settings.model_path, str(settings.model_path)

    # RunPod's cached models may lack refs/main: find_snapshot also finds them by their snapshot folders.
    cached = hub_cache.find_snapshot(settings.runpod_hf_cache, settings.model_id)
    if cached is not None:
        return cached, f"{settings.model_id} (RunPod cached model)"
    if settings.hf_cache.is_dir():
        try:
            path = snapshot_download(settings.model_id, cache_dir=str(settings.hf_cache), local_files_only=True)
            return Path(path), f"{settings.model_id} (volume cache)"
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            pass

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
            f"{path} is a community-layout VibeVoice checkpoint; convert it to the transformers-native layout "
            "first (python convert_checkpoint.py SRC DST; bootstrap.sh does it on its own)."
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
