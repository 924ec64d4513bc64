"""The VibeVoice engine: one model per process, loaded once, turning chunks into audio.

It drives transformers' native VibeVoice classes (`VibeVoiceForConditionalGeneration`,
`VibeVoiceProcessor`). Each chunk's prompt is VibeVoice's script prompt with the reference voice
of every speaker in that chunk, so a speaker sounds the same in every chunk.

Two decode loops produce the same audio per chunk: the own loop (the default) hands every job's
chunks to the process's decode scheduler (engine/scheduler.py), which decodes the chunks of all running
jobs in one batch with both guidance branches in one pass (engine/decoder.py); transformers' stock
`generate` (`generate_chunk`) decodes one chunk at a time and stays as the reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, StoppingCriteria, StoppingCriteriaList, VibeVoiceForConditionalGeneration

from config import MODEL_SAMPLE_RATE, Settings
from deploy import hub_cache
from engine import weights as engine_weights
from engine.batch import ChunkAudio, DecodeRequest, VoiceClip, ended_by_cap
from engine.compile_cache import use_compile_caches
from engine.decoder import PREFILL_PIECE_TOKENS, VOICE_SEGMENT_SAMPLES, BatchDecoder
from engine.scheduler import DONE, BatchBudget, DecodeScheduler, Failed, Frames, Job, Restart
from engine.warmup import FastPaths, StartupError, check_fast_paths
from text.script import Chunk, Turn, max_frames_for

log = logging.getLogger("vibevoice.engine")

__all__ = [
    "ChunkAudio",
    "EngineInfo",
    "EngineReport",
    "GenerationParams",
    "ModelLoadError",
    "StartupError",
    "VibeVoiceEngine",
]

SYSTEM_PROMPT = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each "
    "respective speaker.\n"
)
# What the memory budget plans for per chunk: speech at this many characters per second (read
# aloud is ~15; slower leaves a margin), plus a second. The frame cap (text.max_frames_for) is ~3x that.
SPEECH_CHARS_PER_SECOND = 12.0
# MAX_CONCURRENCY=0 on the CPU: a second job joins the running one instead of waiting behind it.
CPU_AUTO_CONCURRENCY = 2
# Activation bytes of the 7B's acoustic encoder per reference sample: ~768 for its 32 base filters
# in bf16 (traced on the meta device); scaled by the filters and element size of other models.
ENCODER_BYTES_PER_SAMPLE_PER_FILTER_BYTE = 12


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message is one line for the operator."""


@dataclass(frozen=True)
class GenerationParams:
    cfg_scale: float
    diffusion_steps: int | None  # None: the deployment's (VibeVoiceEngine.diffusion_steps)
    seed: int
    max_new_tokens: int | None = None  # the job's own cap on frames per chunk
    use_voice_prompt: bool = True  # False: generate without the reference voices ("disable_prefill")


@dataclass
class EngineInfo:
    source: str
    device: str
    dtype: str
    attention: str  # the language model's own attention (the prefill, the eager loop)
    load_seconds: float
    weights: engine_weights.WeightsReport | None = None  # WEIGHTS in effect (engine/weights.py)


@dataclass(frozen=True)
class EngineReport:
    """What the engine runs, as each job's result reports it (`engine`, with that job's frames) and the
    start-up log states it in one line (docs/api.md#output). One field per fact: a new fact is a new
    field here, filled in VibeVoiceEngine.report."""

    device: str  # cuda, cpu
    dtype: str  # bfloat16, float32
    attention: dict[str, str]  # the language model's attention: "prefill" (prompts, voices) and "decode" (frames)
    compile: bool  # frames of the shapes below run through the compiled step
    compiled_buckets: dict[str, list[int]]  # cache columns -> batch buckets compiled at that capacity
    diffusion_steps: int  # the deployment's default, the count the compiled step runs
    weights: str = "bf16"  # WEIGHTS in effect: bf16 (as loaded; float32 on the CPU), int8 or fp8
    weight_bytes: int = 0  # the model's weights as they sit in memory
    fallbacks: tuple[str, ...] = ()  # each fast path the start-up check gave up, and why

    def for_job(self, results: list[ChunkAudio]) -> dict:
        """The result's `engine` field: this report plus the job's decode steps, compiled or not."""
        frames = {
            "compiled": sum(r.compiled_frames for r in results),
            "uncompiled": sum(r.uncompiled_frames for r in results),
        }
        return {**json.loads(self.line()), "frames": frames}  # as JSON carries it

    def line(self) -> str:
        """The start-up log's line: the same fields, as JSON."""
        return json.dumps(dataclasses.asdict(self))


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
    """Loads the model once and turns chunks plus reference voices into 24 kHz audio.

    `synthesize` may be called from several threads at once (one per job): the decode scheduler
    merges their chunks into one batch."""

    sample_rate = MODEL_SAMPLE_RATE

    def __init__(
        self,
        model: VibeVoiceForConditionalGeneration,
        processor,
        info: EngineInfo,
        batch_size: int = 0,
        decode_loop: str = "own",
        compile_mode: str = "off",
        diffusion_steps: int = 0,
        attention_mode: str = "auto",
    ):
        self.model = model
        self.processor = processor
        self.info = info
        self.processor.tokenizer.padding_side = "left"  # batched prompts must be left-padded
        self.hop_length = int(model.config.audio_config.hop_length)
        self.frame_rate = self.sample_rate / self.hop_length  # 7.5 frames per second
        self.decode_loop = decode_loop
        self.decoder = BatchDecoder(model, compile_mode, diffusion_steps)
        # DEFAULT_DIFFUSION_STEPS, else the checkpoint's own count: what jobs that give none run with,
        # and what the compiled step is compiled for.
        self.diffusion_steps = self.decoder.diffusion_steps
        self.fast_paths = FastPaths(info.attention, compile_mode, attention_mode)
        self.budget = memory_budget(model, batch_size, decoder=self.decoder)
        self.scheduler = DecodeScheduler(self.decoder, self.budget)

    @property
    def batch_size(self) -> int:
        """BATCH_SIZE: sequences decoded together (0: automatic, see scheduler.BatchBudget)."""
        return self.budget.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.budget.batch_size = value

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings) -> VibeVoiceEngine:
        started = time.perf_counter()
        # The KV cache grows every frame and rows join and leave: expandable segments keep the
        # CUDA allocator from fragmenting (read at its first allocation, so set before loading).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        use_compile_caches(settings.compile_cache)
        path, source = resolve_model_path(settings)
        check_native_layout(path)
        device = pick_device(settings.device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        notes: list[str] = []  # fast paths given up while loading (the report's fallbacks)
        model, attention = _load_model(path, device, dtype, settings.attention, notes)
        processor = AutoProcessor.from_pretrained(path)
        model.eval()
        weights = engine_weights.apply(model, settings.weights)  # before the decoder: its compiled step sees them
        if device == "cuda":
            torch.cuda.empty_cache()  # hand the loaded bf16 copies of quantized layers back to the device
        info = EngineInfo(
            source=source,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            attention=attention,
            load_seconds=time.perf_counter() - started,
            weights=weights,
        )
        log.info(
            "model loaded from %s on %s (%s, %s attention, %s weights) in %.1f s",
            source, device, info.dtype, attention, weights.used, info.load_seconds,
        )  # fmt: skip
        weights.log()
        engine = cls(model, processor, info, batch_size=settings.batch_size, decode_loop=settings.decode_loop,
                     compile_mode=settings.compile, diffusion_steps=settings.default_diffusion_steps,
                     attention_mode=settings.attention)  # fmt: skip
        engine.fast_paths.fallbacks += notes
        return engine

    # --- start-up check -------------------------------------------------------------------

    def warm_up(self) -> None:
        """The start-up fitness check, before the worker takes a job: every fast path proves itself
        against the plain one on this hardware, and the path in use gives finite audio.

        engine/warmup.py (in the decode thread: CUDA graphs belong to the thread that records them)
        compares the model's attention (flash_attention_2) with sdpa, and with COMPILE on compiles
        the decode step's shapes and compares it with the eager loop: the same forced speech frames,
        seed and noise through both, the measured difference and its tolerance logged. A fast path
        that fails or disagrees is given up with an ERROR line (the report's `fallbacks` keep it), or,
        with COMPILE=on or ATTENTION=flash_attention_2, raises StartupError: the worker is unhealthy.
        Last, one short forward pass through the path in use must give finite audio (a speech frame
        forced, so the check does not depend on which token the model would pick first). The log's
        last line is the engine's report (`engine: {...}`)."""
        paths = self.fast_paths
        try:
            self.scheduler.call(lambda: check_fast_paths(self.decoder, self.budget, self.probe_prompt(), paths))
        except StartupError:
            raise
        except Exception as exc:  # the plain path itself failed: the worker is not fit
            raise StartupError(f"the start-up check failed: {_first_line(exc)}") from None
        finally:
            self.info.attention = paths.attention
        try:
            self._forward_once()
        except Exception as exc:  # any failure of the kernels or the model: the worker is not fit
            raise StartupError(f"the warm-up forward pass failed: {_first_line(exc)}") from None
        log.info("engine: %s", self.report().line())

    def report(self) -> EngineReport:
        """What the engine runs now (see EngineReport)."""
        frame_step = self.decoder.frame_step if self.decode_loop == "own" else None
        compiled = frame_step is not None and frame_step.compiled
        buckets: dict[str, list[int]] = {}
        for bucket, capacity, _ in sorted(frame_step.compiled_shapes if compiled else ()):
            buckets.setdefault(str(capacity), []).append(bucket)
        decode = frame_step.attention if frame_step is not None else self.info.attention
        weights = self.info.weights
        return EngineReport(
            device=self.info.device,
            dtype=self.info.dtype,
            attention={"prefill": self.info.attention, "decode": decode},
            compile=compiled,
            compiled_buckets=buckets,
            diffusion_steps=self.diffusion_steps,
            weights=weights.used if weights else "bf16",
            weight_bytes=weights.resident_bytes if weights else 0,
            fallbacks=tuple(self.fast_paths.fallbacks) + ((weights.note,) if weights and weights.note else ()),
        )

    def probe_prompt(self) -> torch.Tensor:
        """The start-up checks' prompt: a short script without voices, as token ids [prompt_len]."""
        return self.prepare_inputs(Chunk(0, (Turn(0, "Hello."),)), {}, with_voices=False)["input_ids"][0]

    def _forward_once(self) -> None:
        speech_frame = int(self.model.config.audio_token_id)
        request = DecodeRequest(index=0, input_ids=self.probe_prompt(), max_frames=1, seed=0,
                                diffusion_steps=self.diffusion_steps, forced_tokens=(speech_frame,))  # fmt: skip
        decoded = self.decoder.decode([request])  # holds the model's lock itself
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
        """Token ids, attention mask and (with voices) the normalised reference audio, on the CPU."""
        prompt = self.build_prompt(chunk, with_voices)
        audio = [voices[speaker] for speaker in chunk.speakers] if with_voices else None
        return self.processor(text=prompt, audio=audio, sampling_rate=self.sample_rate, return_tensors="pt")

    def requests(
        self, chunks: list[Chunk], voices: dict[int, np.ndarray], params: GenerationParams
    ) -> list[DecodeRequest]:
        """One decode request per chunk; the chunks of a job share one clip object per distinct voice."""
        clips: dict[str, VoiceClip] = {}
        requests = []
        for chunk in chunks:
            inputs = self.prepare_inputs(chunk, voices, params.use_voice_prompt)
            found = ()
            if "input_values" in inputs:
                found = VoiceClip.from_processor(inputs["input_values"], inputs["padding_mask"], self.hop_length)
            cap = self.frame_cap(chunk, params)
            speech = math.ceil((1.0 + chunk.chars / SPEECH_CHARS_PER_SECOND) * self.frame_rate)
            requests.append(
                DecodeRequest(
                    index=chunk.index,
                    input_ids=inputs["input_ids"][0],
                    max_frames=cap,
                    seed=params.seed,
                    cfg_scale=params.cfg_scale,
                    diffusion_steps=params.diffusion_steps or self.diffusion_steps,
                    voices=tuple(clips.setdefault(clip.key, clip) for clip in found),
                    expected_frames=min(cap, speech),
                )
            )
        return requests

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
        inputs = self.prepare_inputs(chunk, voices, params.use_voice_prompt)
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        if "input_values" in inputs:
            inputs["input_values"] = inputs["input_values"].to(self.model.dtype)
        cap = self.frame_cap(chunk, params)
        stopping = StoppingCriteriaList([_StopWhen(should_stop)]) if should_stop else None
        with self._exclusive(f"chunk {chunk.index} (stock generate)"), torch.inference_mode():
            torch.manual_seed(params.seed)
            output = self.model.generate(
                **inputs,
                max_new_tokens=cap,
                guidance_scale=params.cfg_scale,
                num_diffusion_steps=params.diffusion_steps or self.diffusion_steps,
                stopping_criteria=stopping,
                return_dict_in_generate=True,
            )
        waveform = output.audio[0]
        samples = waveform.reshape(-1).float().cpu().numpy() if waveform is not None else np.zeros(0, dtype=np.float32)
        tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        audio_token = int(self.model.config.audio_token_id)
        return ChunkAudio(
            index=chunk.index,
            audio=samples.astype(np.float32, copy=False),
            frames=tokens.count(audio_token),
            reached_cap=ended_by_cap(tokens, cap, audio_token),
            tokens=tokens,
            uncompiled_frames=len(tokens),
        )

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Stock `generate` has the model to itself (the scheduler's loop waits between frames)."""
        with self.decoder.lock:
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
        """Generate every chunk; results come back in chunk order. Safe to call from several threads.

        `on_audio(chunk_index, samples)` receives the audio as it is decoded, frame by frame and in
        chunk order (a later chunk's frames are held until the earlier ones are done);
        `on_chunk(result, total)` is called for each finished chunk, also in chunk order;
        `on_progress(audio_seconds, chunks_done)` after every decoding step of this job (a chunk
        counts as done when its sequence ends, even while others go on).
        `should_stop()` is checked between frames (cancellation, the shutdown deadline); the
        chunks decoded so far come back, the one in progress cut short.
        Every callback runs in this thread, never in the decode loop's: a slow consumer delays
        only its own job.
        """
        order = _ChunkOrder(chunks, on_audio, on_chunk)
        if self.decode_loop == "stock":
            return self._synthesize_stock(chunks, voices, params, order, should_stop, on_progress)
        if not chunks:
            return []
        job = self.scheduler.submit(self.requests(chunks, voices, params), on_audio is not None, should_stop)
        log.debug("generation begins: job %d, %d chunk(s)", job.number, len(chunks))
        try:
            return _JobReader(self, order, on_progress).read(job)
        except BaseException:
            self.scheduler.stop(job)  # its rows leave the batch at the next frame boundary
            raise
        finally:
            log.debug("generation ends: job %d", job.number)

    def _synthesize_stock(self, chunks, voices, params, order, should_stop, on_progress) -> list[ChunkAudio]:
        """DECODE_LOOP=stock: transformers' generate, chunk after chunk."""
        decoded_frames = 0
        for done, chunk in enumerate(chunks, start=1):
            if should_stop and should_stop():
                break
            result = self.generate_chunk(chunk, voices, params, should_stop)
            order.audio(chunk.index, result.audio)
            order.finished(result)
            decoded_frames += result.frames
            if on_progress is not None:
                on_progress(decoded_frames * self.hop_length / self.sample_rate, done)
        return order.results()

    def wait_idle(self, timeout: float) -> bool:
        """True once no job is left in the decode scheduler (tests: a stopped job has really left)."""
        return self.scheduler.wait_idle(timeout)

    def default_concurrency(self) -> int:
        """MAX_CONCURRENCY=0: on CUDA as many jobs as typical chunks fill the batch; on the CPU, 2."""
        if self.model.device.type != "cuda":
            return CPU_AUTO_CONCURRENCY
        return self.budget.fits(typical_request(self.frame_rate))


# --- memory: what the scheduler's budget counts (also read by bench/sizing.py's GPU table) -----------------


def memory_budget(
    model: VibeVoiceForConditionalGeneration, batch_size: int = 0, device=None, decoder: BatchDecoder | None = None
) -> BatchBudget:
    """The decode scheduler's memory budget for `model` (on `device`, by default the model's own); with
    `decoder`, a batch in its static step counts that step's buffers."""
    device = model.device if device is None else device
    return BatchBudget(batch_size, device, kv_bytes_per_token(model), prefill_bytes(model), decoder)


def typical_request(frame_rate: float) -> DecodeRequest:
    """What MAX_CONCURRENCY=0 plans for: a default chunk (300 characters, ~100 text tokens) with a 20 s
    voice (150 frames) and the prompt's scaffolding (~100 tokens), speaking as long as the budget plans."""
    frames = math.ceil((1.0 + 300 / SPEECH_CHARS_PER_SECOND) * frame_rate)
    return DecodeRequest(0, torch.zeros(350, dtype=torch.long), frames, 0, expected_frames=frames)


def kv_bytes_per_token(model: VibeVoiceForConditionalGeneration) -> int:
    """Bytes of keys and values one token adds to one row of the language model's cache
    (57 344 for the 7B in bf16: 28 layers x 4 KV heads x 128 x K and V x 2 bytes)."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element


def prefill_bytes(model: VibeVoiceForConditionalGeneration) -> int:
    """Peak bytes of one prefill piece: a voice segment through the acoustic encoder, or a prompt
    piece through the language model (its activations), whichever is larger."""
    element = torch.finfo(model.dtype).bits // 8
    filters = int(model.config.audio_config.num_filters)
    voice = VOICE_SEGMENT_SAMPLES * ENCODER_BYTES_PER_SAMPLE_PER_FILTER_BYTE * filters * element
    text = model.config.get_text_config(decoder=True)
    prompt = PREFILL_PIECE_TOKENS * (8 * text.hidden_size + 3 * text.intermediate_size) * element
    return max(voice, prompt)


class _JobReader:
    """A job's side of the scheduler, in the job's own thread: frames in, callbacks and results out."""

    def __init__(self, engine: VibeVoiceEngine, order: _ChunkOrder, on_progress: ProgressCallback | None):
        self.engine = engine
        self.order = order
        self.on_progress = on_progress
        self.frames: dict[int, list[np.ndarray]] = {index: [] for index in order.order}
        self.spoken = 0  # frames with audio
        self.ended = 0

    def read(self, job: Job) -> list[ChunkAudio]:
        while True:
            try:
                event = job.events.get(timeout=1.0)
            except queue.Empty:
                if not self.engine.scheduler.alive():
                    raise RuntimeError("the decode scheduler stopped") from None
                continue
            if event is DONE:
                return self.order.results()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Restart):  # decoded again from scratch: nothing of it was handed out
                self.frames[event.index] = []
            else:
                self._take(event)

    def _take(self, item: Frames) -> None:
        for index, frame in item.audio:
            samples = frame.numpy()  # waits for this frame's device-to-host copy, here, not in the loop
            self.frames[index].append(samples)
            self.order.audio(index, samples)
        for sequence in item.ended:
            index = sequence.request.index
            self.order.finished(self.engine.decoder.result(sequence, self.frames.pop(index)))
            self.ended += 1
        self.spoken += len(item.audio)
        if self.on_progress is not None and (item.audio or item.ended):
            self.on_progress(self.spoken * self.engine.hop_length / self.engine.sample_rate, self.ended)


class _ChunkOrder:
    """Hands out audio and finished chunks in chunk order, though chunks decode together.

    The current chunk's frames pass straight through; a later chunk's frames wait until every
    earlier chunk is done. (A chunk retried after an out-of-memory error has handed nothing out:
    the scheduler re-decodes only sequences nobody has heard.)"""

    def __init__(self, chunks: list[Chunk], on_audio: AudioCallback | None, on_chunk: ChunkCallback | None):
        self.order = [chunk.index for chunk in chunks]
        self.on_audio = on_audio
        self.on_chunk = on_chunk
        self.position = 0  # index into `order` of the chunk whose audio flows now
        self.held: dict[int, list[np.ndarray]] = {index: [] for index in self.order}
        self.done: dict[int, ChunkAudio] = {}

    def audio(self, index: int, samples: np.ndarray) -> None:
        if self.on_audio is None:
            return
        if self._current() == index:
            self.on_audio(index, samples)
        else:
            self.held[index].append(samples)

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
                    self.on_audio(following, piece)

    def results(self) -> list[ChunkAudio]:
        return [self.done[index] for index in self.order if index in self.done]

    def _current(self) -> int | None:
        return self.order[self.position] if self.position < len(self.order) else None


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
            "first (python -m deploy.convert_checkpoint SRC DST; bootstrap.sh does it on its own)."
        )
    if config.get("model_type") != "vibevoice":
        raise ModelLoadError(f"{path} is not a VibeVoice checkpoint (model_type {config.get('model_type')!r}).")


def pick_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE is cuda but no CUDA device is available.")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def pick_attention(device: str, mode: str, notes: list[str]) -> str:
    """The language model's attention (ATTENTION): on CUDA flash_attention_2 where flash-attn imports
    (auto, or asked for), else sdpa; on the CPU sdpa. The start-up check then compares it with sdpa.
    Without the wheel (auto) sdpa runs everywhere, and `notes` (the engine report's fallbacks) says so."""
    if mode == "sdpa" or (mode == "auto" and device != "cuda"):
        return "sdpa"
    if device != "cuda":
        raise ModelLoadError(f"ATTENTION is {mode}, which needs a CUDA device; this worker runs on the {device}.")
    try:
        import flash_attn  # noqa: F401
    except ImportError as exc:
        if mode != "auto":
            raise ModelLoadError(f"ATTENTION is {mode}, but flash-attn cannot be imported ({exc}).") from None
        notes.append(f"flash-attn cannot be imported ({exc}); using sdpa attention everywhere (ATTENTION=auto)")
        log.warning(notes[-1])
        return "sdpa"
    return "flash_attention_2"


def _load_model(
    path: Path, device: str, dtype: torch.dtype, mode: str, notes: list[str]
) -> tuple[VibeVoiceForConditionalGeneration, str]:
    """Load with the attention `pick_attention` names; flash_attention_2 failing to load falls back to sdpa
    with an ERROR line (auto), or stops the worker (ATTENTION=flash_attention_2)."""
    attention = pick_attention(device, mode, notes)
    attempts = [attention] if attention == "sdpa" or mode != "auto" else [attention, "sdpa"]
    last_error: Exception | None = None
    for attempt in attempts:
        try:
            model = VibeVoiceForConditionalGeneration.from_pretrained(
                path,
                dtype=dtype,
                # Only the language model has a choice of attention; the codecs are convolutional.
                attn_implementation={"text_config": attempt},
                device_map=device,
            )
            return model, attempt
        except (ImportError, ValueError, RuntimeError) as exc:
            last_error = exc
            if attempt != attempts[-1]:
                notes.append(f"{attempt} failed to load ({str(exc).splitlines()[0]}); using sdpa attention "
                             "(ATTENTION=auto)")  # fmt: skip
                log.error(notes[-1])
    reason = str(last_error).splitlines()[0] if last_error else "unknown error"
    raise ModelLoadError(f"could not load the model from {path} with {attempts[-1]} attention: {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
