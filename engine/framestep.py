"""The decode loop's frame as one static-shape function over preallocated slots (COMPILE=on).

decoder.BatchDecoder's eager `step` grows its KV cache by concatenation, left-pads rows, runs the
diffusion and the codecs only for the rows that speak, and reads tokens and lengths on the host
several times a frame: right for a CPU, but on a GPU the frame is bound by kernel launches and
host synchronisations. This module runs the same frame over buffers whose shapes never change
while rows join and leave, so `torch.compile` can fuse it and CUDA graphs can replay it:

    slots          a batch bucket B (1, 2, 4, 8, 16, ...): row b of every buffer belongs to one
                   sequence or is idle; idle rows compute and their results are discarded
    KV cache       per layer [2B, kv_heads, capacity, head_dim]: rows 0..B-1 positive, B..2B-1
                   negative; per-row lengths instead of left padding and masks. The negative row's
                   latest column is speculative: it is kept ("advance") only if the sequence
                   diffuses next frame, else overwritten; speech-start makes its length 0
    device state   tokens, lengths, positions, frame counters and the "speaks" mask stay on the
                   device; every row diffuses and runs the codecs, `torch.where` commits the rows
                   that really spoke
    tables         per slot: the sequence's noise drawn up front from its own generator (equal to
                   the eager loop's per-frame draws), its forced tokens, its guidance scale, and its
                   DPM-Solver++ coefficients and timestep embeddings for a fixed number of steps
    codec caches   per conv layer [B, channels, left_pad], updated in place

One frame costs one host synchronisation: reading the chosen tokens (and which rows are finite).
The frame's audio goes to the host the way the eager loop's does (decoder.HostCopy).

The result equals the eager loop's per sequence (tests/engine/test_framestep.py: alone, joining
mid-flight, next to other sequences, leaving), so everything around it (the scheduler's
prefill/join/step/drop/park, the tests of the engine) is unchanged. The prefill stays eager.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.attention import PACKED_SDPA, use_attention
from engine.batch import Batch, FrameOutput, HostCopy, HostFrame, RowState, Sequence, codec_map
from engine.compile_cache import StepArtifacts, cache_misses

log = logging.getLogger("vibevoice.framestep")

# Batch sizes that get their own compiled graph; a batch runs in the smallest bucket that holds it.
BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# KV capacity (columns) grows in these steps, each capacity one more compiled shape. Every frame
# attends over the whole capacity (masked): on a GPU that costs little next to the weights and one
# step holds ordinary chunks (prompt + frames) for their whole life; on the CPU it is compute.
CAPACITY_STEP = {"cuda": 1024, "cpu": 256}


def bucket_for(rows: int) -> int:
    """The smallest bucket that holds `rows` rows."""
    for bucket in BUCKETS:
        if rows <= bucket:
            return bucket
    raise ValueError(f"at most {BUCKETS[-1]} rows decode together in the compiled step, not {rows}")


# Buckets compiled at start-up (up to the batch cap) at one capacity step; a larger bucket runs
# uncompiled. With COMPILE on, the automatic batch cap is the largest bucket compiled.
WARM_UP_BUCKETS = (1, 2, 4, 8, 16)
# Buckets also compiled at two capacity steps (2048 columns on CUDA, 512 on the CPU): a chunk with
# long or several reference voices (two 30 s voices are 450 columns, 300 characters another ~600)
# stays compiled while few rows decode. Each is one more shape to compile at start-up.
LONG_WARM_UP_BUCKETS = (1, 2, 4)


def capacity_step(device: torch.device) -> int:
    return CAPACITY_STEP.get(torch.device(device).type, CAPACITY_STEP["cuda"])


def capacity_for(columns: int, device: torch.device) -> int:
    step = capacity_step(device)
    return -(-max(columns, 1) // step) * step


def warm_up_shapes(cap: int, device: torch.device, steps: int) -> list[tuple[int, int, int]]:
    """The shapes (bucket, capacity, steps) the start-up warm-up compiles for a batch cap of `cap` rows:
    every bucket a batch of up to `cap` rows uses (at most 16) at one capacity step, bucket 1 first,
    then the small ones at two steps."""
    largest = bucket_for(min(max(cap, 1), WARM_UP_BUCKETS[-1]))
    step = capacity_step(device)
    short = [(bucket, step, steps) for bucket in WARM_UP_BUCKETS if bucket <= largest]
    return short + [(bucket, 2 * step, steps) for bucket in LONG_WARM_UP_BUCKETS if bucket <= largest]


# --- data types ---------------------------------------------------------------------------------


@dataclass(eq=False)
class SlotTensors:
    """Every tensor one frame reads or writes, for a bucket of B rows (the compiled function's input)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [2B, kv_heads, capacity, head_dim]
    positive_hidden: torch.Tensor  # [B, hidden]: the last pass's output, tokens come from it
    negative_hidden: torch.Tensor  # [B, hidden]
    positive_length: torch.Tensor  # [B] long: columns of the positive row (= its next position)
    negative_length: torch.Tensor  # [B] long: committed columns of the negative row (the speculative one follows)
    negative_position: torch.Tensor  # [B] long: the negative row's next position id
    emitted: torch.Tensor  # [B] long: tokens emitted since joining (indexes `forced`)
    diffused: torch.Tensor  # [B] long: frames diffused since joining (indexes `noise`)
    live: torch.Tensor  # [B] bool: the row holds a sequence
    noise: torch.Tensor  # [B, capacity, latent] model dtype: the sequence's draws, in order
    forced: torch.Tensor  # [B, capacity] long: a token to emit instead of the model's choice, or -1
    guidance: torch.Tensor  # [B] float32: classifier-free guidance scale
    solver: torch.Tensor  # [B, steps, 5] float32: DPM-Solver++ coefficients (a, b, u, p, q) per step
    timestep_embeds: torch.Tensor  # [B, steps, head_hidden] model dtype
    acoustic: dict[str, torch.Tensor]  # conv state per layer key [B, channels, left_pad]
    semantic: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in _tensors_of(self))


@dataclass(eq=False)
class Slots:
    """A batch's rows in the compiled step: the tensors, and which sequence holds which row."""

    tensors: SlotTensors
    bucket: int
    capacity: int
    steps: int
    holders: list[Sequence | None]  # per row
    joined: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # id(seq) -> (rng state, tokens)
    diffused: dict[int, int] = field(default_factory=dict)  # id(seq) -> frames diffused since joining

    def row_of(self, sequence: Sequence) -> int:
        return next(row for row, holder in enumerate(self.holders) if holder is sequence)


class SlotConvCache:
    """A codec's streaming conv state over preallocated [B, channels, left_pad] buffers.

    It quacks like transformers' VibeVoiceAcousticTokenizerConv1dPaddingCache for the conv layers,
    but does not change its buffers while the codec runs: each layer's next state waits in
    `pending` until `commit` keeps it for the rows that spoke."""

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self.buffers = buffers
        self.pending: dict[str, torch.Tensor] = {}

    def update(self, hidden_states: torch.Tensor, cache_key: str, conv_module) -> torch.Tensor:
        state = self.buffers[cache_key]  # [B, channels, left_pad]
        padded = torch.cat([state, hidden_states], dim=-1)
        self.pending[cache_key] = padded[:, :, padded.shape[-1] - state.shape[-1] :]
        return padded

    def commit(self, rows: torch.Tensor) -> None:
        """Keep the new state where `rows` [B] is true."""
        for key, state in self.buffers.items():
            state.copy_(torch.where(rows[:, None, None], self.pending[key], state))


# --- the solver's coefficients ---------------------------------------------------------------------


def solver_coefficients(noise_scheduler, steps: int) -> torch.Tensor:
    """DPM-Solver++ per step as five numbers [steps, 5] float32, read off the scheduler itself.

    With a deterministic solver of order <= 2 each step is linear: with x0 = p * latent + q * eps,
    next latent = a * latent + b * eps + u * x0_previous. Running diffusers' own `step` on unit
    inputs gives a, b, u and its `convert_model_output` gives p, q, so the tensor update is the
    scheduler's arithmetic for any configuration it accepts."""
    config = noise_scheduler.config
    if config.solver_order > 2 or config.algorithm_type not in ("dpmsolver++", "dpmsolver") or config.thresholding:
        raise ValueError(f"unsupported noise scheduler for the compiled step: {dict(config)}")
    scheduler = copy.deepcopy(noise_scheduler)
    scheduler.set_timesteps(num_inference_steps=steps)
    latent = torch.tensor([[1.0], [0.0], [0.0]])
    eps = torch.tensor([[0.0], [1.0], [0.0]])
    previous = torch.tensor([[0.0], [0.0], [1.0]])
    rows = []
    for timestep in scheduler.timesteps:
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        p, q, _ = scheduler.convert_model_output(eps, sample=latent)[:, 0].tolist()
        scheduler.model_outputs[-1] = previous  # becomes the "previous x0" once `step` shifts its history
        a, b, u = scheduler.step(eps, timestep, latent).prev_sample[:, 0].tolist()
        rows.append([a, b, u, p, q])
    return torch.tensor(rows, dtype=torch.float32)


NO_OP_STEP = (1.0, 0.0, 0.0, 0.0, 0.0)  # pads a sequence with fewer steps: its latent stays as it is


# --- the frame ------------------------------------------------------------------------------------


class StaticFrame:
    """One frame over `SlotTensors` with the model's own modules; no host reads, no shape changes.

    `__call__(tensors) -> (choice [2, B] long: tokens and finite flags, audio [B, 1, hop], latent [B, 1, latent])`;
    the latent is every row's speech latent (the start-up check compares it with the eager loop's)."""

    def __init__(self, model, token_head: torch.nn.Module, allowed: torch.Tensor, audio_token_id: int, bos_id: int):
        self.model = model
        self.inner = model.model
        self.token_head = token_head
        self.allowed = allowed  # [allowed] token ids
        self.audio_token_id = audio_token_id
        self.bos_id = bos_id

    def __call__(self, s: SlotTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, finite = self.choose_tokens(s)  # [B], [B]
        speak = (tokens == self.audio_token_id) & finite & s.live  # [B]: rows that diffuse this frame
        latent = self.diffuse(s)  # [B, 1, latent]
        audio, semantic = self.codec_step(s, latent, speak)  # [B, 1, hop], [B, 1, semantic]
        frame_embeds = self.inner.multi_modal_projector(latent) + self.inner.semantic_connector(semantic)
        token_embeds = self.inner.get_input_embeddings()(tokens)  # [B, hidden]
        embeds = torch.where(speak[:, None], frame_embeds[:, 0].to(token_embeds.dtype), token_embeds)
        restart = (tokens == self.bos_id) & s.live
        self.forward_both(s, embeds, speak, restart)
        s.emitted.add_(s.live.long())
        s.diffused.add_(speak.long())
        return torch.stack([tokens, finite.long()]), audio, latent

    def choose_tokens(self, s: SlotTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax among the allowed tokens (or the forced token), and whether both rows are finite."""
        logits = self.token_head(s.positive_hidden).float()  # [B, allowed]
        chosen = self.allowed[logits.argmax(dim=-1)]  # [B]
        rows = torch.arange(s.forced.shape[0], device=chosen.device)
        forced = s.forced[rows, s.emitted.clamp(max=s.forced.shape[1] - 1)]  # [B]
        tokens = torch.where(forced >= 0, forced, chosen)
        finite = torch.isfinite(s.positive_hidden).all(-1) & torch.isfinite(s.negative_hidden).all(-1)
        return tokens, finite

    def diffuse(self, s: SlotTensors) -> torch.Tensor:
        """Guided DPM-Solver++ for every row, both halves per head call, unrolled: latents [B, 1, latent]."""
        head = self.inner.diffusion_head
        b = s.positive_hidden.shape[0]
        rows = torch.arange(b, device=s.noise.device)
        latent = s.noise[rows, s.diffused.clamp(max=s.noise.shape[1] - 1)]  # [B, latent]
        condition = head.cond_proj(torch.cat([s.positive_hidden, s.negative_hidden]))  # [2B, head_hidden], once
        timesteps = torch.cat([s.timestep_embeds, s.timestep_embeds]).transpose(0, 1)  # [steps, 2B, head_hidden]
        modulations = self._modulations(head, condition[None] + timesteps)
        previous = torch.zeros_like(latent)  # the last step's x0
        for step in range(s.solver.shape[1]):
            eps = self._head(head, torch.cat([latent, latent]), [m[step] for m in modulations])  # [2B, latent]
            cond_eps, uncond_eps = eps[:b], eps[b:]  # [B, latent] each
            # As the eager loop: the difference in the model dtype, scaled at float precision.
            guided = uncond_eps + (s.guidance[:, None] * (cond_eps - uncond_eps).float()).to(eps.dtype)
            a, bb, u, p, q = (c[:, None] for c in s.solver[:, step].unbind(-1))  # [B, 1] each
            x0 = (p * latent.float() + q * guided.float()).to(latent.dtype)  # diffusers keeps x0 in the model dtype
            latent = (a * latent.float() + bb * guided.float() + u * previous.float()).to(latent.dtype)
            previous = x0
        return latent.unsqueeze(1)

    @staticmethod
    def _modulations(head, conditions: torch.Tensor) -> list[torch.Tensor]:
        """Every step's adaLN shift/scale/gate at once: they depend on the condition and the timestep, not
        on the latent, so each layer's projection is one matrix product over all steps (its weights read
        once per frame, not once per step). conditions [steps, 2B, hh] -> per layer [steps, 2B, 3 * hh],
        then the final layer's [steps, 2B, 2 * hh]."""
        out = [layer.linear(layer.act_fn(conditions)) for layer in head.layers]
        final = head.final_layer
        return [*out, final.linear_1(final.act_fn(conditions))]

    @staticmethod
    def _head(head, noisy: torch.Tensor, modulations: list[torch.Tensor]) -> torch.Tensor:
        """The diffusion head for one step with its modulations: [2B, latent] -> [2B, latent] (the
        arithmetic of transformers' VibeVoiceDiffusionHeadAdaLayerNorm and FinalLayer)."""
        hidden = head.noisy_images_proj(noisy)
        for layer, modulation in zip(head.layers, modulations, strict=False):
            shift, scale, gate = modulation.chunk(3, dim=-1)
            hidden = hidden + gate * layer.ffn(layer.norm(hidden) * (1 + scale) + shift)
        final = head.final_layer
        shift, scale = modulations[-1].chunk(2, dim=-1)
        normed = torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), eps=final.rms_norm_eps)
        return final.linear_2(normed * (1 + scale) + shift)

    def codec_step(self, s: SlotTensors, latent: torch.Tensor, speak: torch.Tensor):
        """Acoustic decode and semantic encode of every row; only speaking rows keep their new conv state."""
        inner = self.inner
        scaled = latent / inner.latent_scaling_factor - inner.latent_bias_factor
        acoustic = SlotConvCache(s.acoustic)
        audio = inner.audio_tower.decode(scaled, padding_cache=acoustic, use_cache=True).audio  # [B, 1, hop]
        semantic_cache = SlotConvCache(s.semantic)
        semantic = inner.semantic_tokenizer_encoder(audio, padding_cache=semantic_cache, use_cache=True).latents
        acoustic.commit(speak)
        semantic_cache.commit(speak)
        return audio, semantic

    def forward_both(self, s: SlotTensors, embeds: torch.Tensor, speak: torch.Tensor, restart: torch.Tensor):
        """One language-model pass for the positive and negative rows; writes one KV column per row.

        The negative row keeps its speculative column only where the sequence speaks now, and
        starts over (length 0) at speech-start, as the eager loop's mask does."""
        negative_length = torch.where(restart, torch.zeros_like(s.negative_length), s.negative_length + speak.long())
        negative_position = s.negative_position + speak.long()
        write = torch.cat([s.positive_length, negative_length])  # [2B]: each row's new column
        positions = torch.cat([s.positive_length, negative_position])[:, None]  # [2B, 1]
        capacity = s.kv[0][0].shape[2]
        visible = torch.arange(capacity, device=write.device)[None] <= write[:, None]  # [2B, capacity]
        hidden = self._language_model(torch.cat([embeds, embeds])[:, None], visible, positions, write, s.kv)
        b = embeds.shape[0]
        s.positive_hidden.copy_(hidden[:b])
        s.negative_hidden.copy_(hidden[b:])
        s.positive_length.add_(s.live.long())
        s.negative_length.copy_(negative_length)
        s.negative_position.copy_(negative_position)

    def _language_model(self, x, visible, positions, write, kv) -> torch.Tensor:
        """The decoder layers over the slot cache: x [2B, 1, hidden] -> last hidden state [2B, hidden]."""
        lm = self.inner.language_model
        cache = SlotKVCache(kv, write)
        mask = visible[:, None, None, :]  # [2B, 1, 1, capacity] bool, True = attend
        position_embeddings = lm.rotary_emb(x, positions)
        for layer in lm.layers[: lm.config.num_hidden_layers]:
            x = layer(x, attention_mask=mask, position_embeddings=position_embeddings, past_key_values=cache)
        return lm.norm(x)[:, 0]


class SlotKVCache:
    """The static KV cache as transformers' attention sees it: `update` writes each row's new key and
    value at its own column and returns the whole buffers (the mask hides what a row has not seen)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], write: torch.Tensor):
        self.kv = kv
        self.rows = torch.arange(write.shape[0], device=write.device)
        self.write = write  # [2B]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        key_cache, value_cache = self.kv[layer_idx]  # [2B, kv_heads, capacity, head_dim]
        key_cache[self.rows, :, self.write] = keys[:, :, 0]  # keys [2B, kv_heads, 1, head_dim]
        value_cache[self.rows, :, self.write] = values[:, :, 0]
        return key_cache, value_cache


# --- the decoder's side: slots, rows joining and leaving, compilation ---------------------------------


class FrameStep:
    """BatchDecoder's join/step/drop/park over `Slots`, with the frame compiled (or run as is)."""

    def __init__(self, decoder, compile_frame: bool):
        self.decoder = decoder
        self.model = decoder.model
        # The language model's attention inside this step (set around every frame, `run`): sdpa with each
        # KV head's query heads packed against the shared cache (attention.py), over a 4-D boolean mask of
        # the slot cache; flash-attention 2 cannot take that mask, and its unpadding reads the host in every
        # layer, so it could not be captured either. The prefill and the eager loop keep the model's own
        # attention (flash-attention 2 where it runs).
        self.attention = PACKED_SDPA
        self.frame = StaticFrame(
            self.model, decoder.token_head, decoder._allowed, decoder.audio_token_id, decoder.audio_bos_token_id
        )
        self.compiled = compile_frame  # False once compilation failed: the same frame then runs uncompiled
        self.failure: str | None = None  # why compilation failed (one line)
        self._run: Callable = self._compile(self.frame) if compile_frame else self.frame
        self.default_steps = decoder.diffusion_steps  # the deployment's: the warm-up compiles this many
        self.last_compiled = False  # whether the latest frame ran through the compiled function
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._codec_templates: tuple[object, object] | None = None
        self._pinned: torch.Tensor | None = None
        self._free: dict[tuple[int, int, int], list[SlotTensors]] = {}  # idle buffers by (bucket, capacity, steps)
        self._said: set[tuple[int, int, int]] = set()  # uncompiled shapes the log has named
        self._bytes: dict[tuple[int, int, int], int] = {}  # slot_bytes by shape
        self._warming = False
        # Shapes (bucket, capacity, steps) the warm-up compiled. Any other shape runs uncompiled:
        # compiling it mid-job would stall every row of the batch for as long as compilation takes
        # (minutes for the 7B on a GPU), as vLLM runs batches beyond its captured sizes eagerly.
        self.compiled_shapes: set[tuple[int, int, int]] = set()
        self.compiled_frames = 0  # frames that ran through the compiled function (tests, logs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _compile(self, frame: StaticFrame) -> Callable:
        """torch.compile of the frame; on CUDA with CUDA graphs (reduce-overhead), one per shape."""
        # Each bucket, capacity and step count is one graph; leave room for all of them.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, name, max(getattr(config, name), 64))
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(frame, mode=mode, dynamic=False, fullgraph=True)

    def run(self, tensors: SlotTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame (StaticFrame's outputs), compiled when the warm-up compiled its shape; a compilation
        failure logs one line and every frame runs uncompiled from then on. `last_compiled` says which."""
        with use_attention(self.model.model.language_model, self.attention):
            if self.compiled and (self._warming or _shape_of(tensors) in self.compiled_shapes):
                try:
                    if self.device.type == "cuda":
                        torch.compiler.cudagraph_mark_step_begin()
                    result = self._run(tensors)
                    self.compiled_frames += 1
                    self.last_compiled = True
                    return result
                except Exception as exc:  # any compiler fault: never fail a job for it
                    if isinstance(exc, torch.cuda.OutOfMemoryError):
                        raise
                    self.failure = _one_line(exc)
                    if not self._warming:  # at start-up the check reports it, with what it means
                        log.error("compiling the decode step failed; it runs uncompiled: %s", self.failure)
                    self.compiled, self._run = False, self.frame
                    self._free.clear()  # buffers were kept for CUDA graphs, which will not replay now
            self.last_compiled = False
            return self.frame(tensors)

    # --- tables -------------------------------------------------------------------------------

    def tables(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """DPM-Solver++ coefficients [steps, 5] and timestep embeddings [steps, head_hidden] for `steps`."""
        if steps not in self._tables:
            scheduler = self.decoder.noise_scheduler
            coefficients = solver_coefficients(scheduler, steps).to(self.device)
            schedule = copy.deepcopy(scheduler)
            schedule.set_timesteps(num_inference_steps=steps)
            head = self.model.model.diffusion_head
            timesteps = schedule.timesteps.to(self.device, self.model.dtype)  # as the eager loop casts them
            embeds = head.timestep_proj(head.timestep_embedding(timesteps).to(self.model.dtype))
            self._tables[steps] = (coefficients, embeds)
        return self._tables[steps]

    def codec_templates(self) -> tuple[object, object]:
        """transformers' conv caches of one row (zeros), as the codecs create them: keys, shapes, dtypes."""
        if self._codec_templates is None:
            inner = self.model.model
            latent = torch.zeros(1, 1, self.model.config.audio_config.hidden_size, device=self.device,
                                 dtype=self.model.dtype)  # fmt: skip
            audio = inner.audio_tower.decode(latent, padding_cache=None, use_cache=True)
            semantic = inner.semantic_tokenizer_encoder(audio.audio, padding_cache=None, use_cache=True)
            zero = lambda key, layer: torch.zeros_like(layer.cache)  # noqa: E731
            self._codec_templates = (codec_map(audio.padding_cache, zero), codec_map(semantic.padding_cache, zero))
        return self._codec_templates

    def allocate(self, bucket: int, capacity: int, steps: int) -> Slots:
        """Slots for `bucket` rows, `capacity` KV columns and `steps` diffusion steps, every row idle.

        Buffers of a compiled shape are allocated once and reused (`release` gives them back): CUDA
        graphs replay on the addresses they were captured with, so a batch that moves back to a
        bucket finds its graph. Those of any other shape are freed when released."""
        shape = (bucket, capacity, steps)
        free = self._free.setdefault(shape, [])
        if free:
            tensors = free.pop()
        else:
            if self.compiled and not self._warming and shape not in self._said:  # once per shape
                self._said.add(shape)
                log.info("a decode shape the warm-up did not compile (%d rows, %d cache columns, %d diffusion "
                         "steps) runs uncompiled", bucket, capacity, steps)  # fmt: skip
            tensors = self._new_tensors(bucket, capacity, steps)
        for counter in (tensors.positive_length, tensors.negative_length, tensors.negative_position,
                        tensors.emitted, tensors.diffused, tensors.live):  # fmt: skip
            counter.zero_()
        return Slots(tensors, bucket, capacity, steps, [None] * bucket)

    def release(self, slots: Slots) -> None:
        """Give a batch's buffers back: kept for the next batch of a compiled shape, else freed."""
        shape = (slots.bucket, slots.capacity, slots.steps)
        if self.compiled and (self._warming or shape in self.compiled_shapes):
            self._free.setdefault(shape, []).append(slots.tensors)

    def held(self, shape: tuple[int, int, int]) -> bool:
        """Whether buffers of this shape are kept (idle) for reuse: a batch moving there allocates nothing."""
        return bool(self._free.get(shape))

    def slot_bytes(self, bucket: int, capacity: int, steps: int) -> int:
        """Bytes of one shape's buffers (KV cache of both branches, noise and token tables, codec
        state, ...), counted on the meta device without allocating them."""
        shape = (bucket, capacity, steps)
        if shape not in self._bytes:
            self._bytes[shape] = self._new_tensors(bucket, capacity, steps, torch.device("meta")).nbytes()
        return self._bytes[shape]

    def shape_for(self, rows: int, sequences: list[Sequence]) -> tuple[int, int, int]:
        """The shape (bucket, capacity, steps) a batch of `rows` rows holding `sequences` needs: the smallest
        bucket, the capacity of the longest sequence, the most diffusion steps. Rows with fewer steps pad
        with no-op steps, which still run the head; with the step compiled the floor is the deployment's
        count (a shape the warm-up compiled beats fewer steps uncompiled)."""
        capacity = capacity_for(max([_columns_needed(s) for s in sequences], default=1), self.device)
        floor = self.default_steps if self.compiled else 1
        steps = max([s.request.diffusion_steps for s in sequences] + [floor])
        return bucket_for(max(rows, 1)), capacity, steps

    def _new_tensors(self, bucket: int, capacity: int, steps: int, device: torch.device | None = None) -> SlotTensors:
        model, device, dtype = self.model, device or self.device, self.model.dtype
        text = model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_shape = (2 * bucket, text.num_key_value_heads, capacity, head_dim)
        kv = [(torch.zeros(kv_shape, device=device, dtype=dtype), torch.zeros(kv_shape, device=device, dtype=dtype))
              for _ in range(text.num_hidden_layers)]  # fmt: skip
        longs = lambda: torch.zeros(bucket, dtype=torch.long, device=device)  # noqa: E731
        acoustic, semantic = self.codec_templates()
        conv = lambda cache: {key: torch.zeros(bucket, *layer.cache.shape[1:], device=device,  # noqa: E731
                                               dtype=layer.cache.dtype)
                              for key, layer in cache.layers.items()}  # fmt: skip
        head_hidden = model.model.diffusion_head.cond_proj.out_features
        tensors = SlotTensors(
            kv=kv,
            positive_hidden=torch.zeros(bucket, text.hidden_size, device=device, dtype=dtype),
            negative_hidden=torch.zeros(bucket, text.hidden_size, device=device, dtype=dtype),
            positive_length=longs(), negative_length=longs(), negative_position=longs(),
            emitted=longs(), diffused=longs(),
            live=torch.zeros(bucket, dtype=torch.bool, device=device),
            noise=torch.zeros(bucket, capacity, model.config.audio_config.hidden_size, device=device, dtype=dtype),
            forced=torch.full((bucket, capacity), -1, dtype=torch.long, device=device),
            guidance=torch.ones(bucket, device=device),
            solver=torch.tensor(NO_OP_STEP, device=device).repeat(bucket, steps, 1),
            timestep_embeds=torch.zeros(bucket, steps, head_hidden, device=device, dtype=dtype),
            acoustic=conv(acoustic),
            semantic=conv(semantic),
        )  # fmt: skip
        if device.type != "meta":
            for tensor in _tensors_of(tensors):
                torch._dynamo.mark_static_address(tensor)  # CUDA graphs use them in place, never copy them
        return tensors

    # --- rows joining and leaving -----------------------------------------------------------------

    def slots(self, batch: Batch, rows: int, sequences: list[Sequence]) -> Slots:
        """The batch's slots in the shape `rows` rows with `sequences` added need (`shape_for`): moved to
        a larger shape when they need more, and back to a smaller (compiled) one when the rows that
        needed it have left. Rows keep their order. If the move fails (out of memory), nothing changed."""
        old: Slots | None = batch.static
        shape = self.shape_for(rows, list(batch.sequences) + sequences)
        if old is not None and shape == (old.bucket, old.capacity, old.steps):
            return old
        new = self.allocate(*shape)
        if old is not None:
            try:
                _move(old, new, [old.row_of(s) for s in batch.sequences])
            except BaseException:
                self.release(new)
                raise
            self.release(old)
        batch.static = new
        return new

    def join(self, batch: Batch, sequences: list[Sequence]) -> None:
        """Sequences with a row state (prefilled or parked) take free rows of the slots. All or none: if
        it raises (out of memory), no sequence joined and each keeps its state and its generator."""
        if not sequences:
            return
        saved = [s.generator.get_state() for s in sequences]
        slots = self.slots(batch, len(batch) + len(sequences), sequences)
        placed = []
        try:
            for sequence in sequences:
                row = slots.holders.index(None)
                self._place(slots, row, sequence)
                slots.holders[row] = sequence
                batch.sequences.append(sequence)
                placed.append(sequence)
        except BaseException:
            for sequence in placed:
                self._vacate(slots, sequence)
                batch.sequences.remove(sequence)
            for sequence, state in zip(sequences, saved, strict=True):
                sequence.generator.set_state(state)
            raise
        for sequence in sequences:
            sequence.state = None

    def _vacate(self, slots: Slots, sequence: Sequence) -> None:
        """The sequence's row goes idle."""
        row = slots.row_of(sequence)
        slots.holders[row] = None
        slots.tensors.live[row] = False
        slots.joined.pop(id(sequence), None)
        slots.diffused.pop(id(sequence), None)

    def _place(self, slots: Slots, row: int, sequence: Sequence) -> None:
        """Copy a sequence's row state into row `row`; draw its noise table from its generator."""
        t, state, request = slots.tensors, sequence.state, sequence.request
        b = slots.bucket
        positive, negative = state.positive_mask.bool(), state.negative_mask.bool()
        for (keys, values), (pk, pv), (nk, nv) in zip(t.kv, state.positive_kv, state.negative_kv, strict=True):
            parts = ((keys, pk, positive, row), (values, pv, positive, row),
                     (keys, nk, negative, b + row), (values, nv, negative, b + row))  # fmt: skip
            for cache, part, visible, at in parts:
                cache[at].zero_()  # a masked column must not hold NaN from an earlier holder
                columns = part[0][:, visible]  # [kv_heads, visible, head_dim]: holes dropped, positions are in the keys
                cache[at, :, : columns.shape[1]] = columns
        positive_columns, negative_columns = int(positive.sum()), int(negative.sum())
        if positive_columns != sequence.next_position:
            raise ValueError("a joining sequence's positive cache does not match its position")
        t.positive_hidden[row], t.negative_hidden[row] = state.positive_hidden, state.negative_hidden
        t.positive_length[row], t.negative_position[row] = positive_columns, sequence.negative_length
        t.negative_length[row] = negative_columns - 1  # its latest column is the speculative one
        t.emitted[row], t.diffused[row] = 0, 0
        remaining = request.max_frames - len(sequence.tokens)
        slots.joined[id(sequence)] = (sequence.generator.get_state(), negative_columns - 1)
        slots.diffused[id(sequence)] = 0
        latent = self.model.config.audio_config.hidden_size
        # One draw of `remaining` frames equals `remaining` per-frame draws of randn(2, latent)[:1].
        t.noise[row, :remaining] = torch.randn(remaining, 2, latent, generator=sequence.generator)[:, 0].to(t.noise)
        forced = request.forced_tokens[len(sequence.tokens) :]
        t.forced[row] = -1
        if forced:
            t.forced[row, : len(forced)] = torch.tensor(forced, device=t.forced.device)
        t.guidance[row] = request.cfg_scale
        coefficients, embeds = self.tables(request.diffusion_steps)
        t.solver[row] = torch.tensor(NO_OP_STEP, device=t.solver.device)
        t.solver[row, : request.diffusion_steps] = coefficients
        t.timestep_embeds[row, : request.diffusion_steps] = embeds
        for mine, theirs in ((t.acoustic, state.acoustic), (t.semantic, state.semantic)):
            for key, buffer in mine.items():
                buffer[row] = 0 if theirs is None else theirs.layers[key].cache[0]
        t.live[row] = True  # last: a row half placed stays idle

    def drop(self, batch: Batch, keep: list[int]) -> None:
        """Keep only the rows `keep` (in that order); the others' rows go idle (or the bucket shrinks)."""
        slots: Slots = batch.static
        staying = [batch.sequences[row] for row in keep]
        for sequence in batch.sequences:
            if sequence not in staying:
                self._vacate(slots, sequence)
        batch.sequences = staying
        if not staying:
            self.release(slots)
            batch.static = None
            return
        # Back to a smaller shape when the rows fit one; out of memory, they go on in the one they are in.
        with contextlib.suppress(torch.cuda.OutOfMemoryError):
            self.slots(batch, len(staying), [])

    def park(self, batch: Batch, rows: list[int]) -> list[Sequence]:
        """Take rows out with their state (`sequence.state`) and their generator where the eager loop has it."""
        slots: Slots = batch.static
        parked = []
        for row in rows:
            sequence = batch.sequences[row]
            rng, negative_columns = slots.joined[id(sequence)]
            row_state = self._row_state(slots, slots.row_of(sequence), sequence.next_position, negative_columns + 1)
            sequence.state = row_state
            sequence.generator.set_state(rng)  # as if drawn frame by frame: the draws it used
            used = slots.diffused[id(sequence)]
            if used:
                torch.randn(used, 2, self.model.config.audio_config.hidden_size, generator=sequence.generator)
            parked.append(sequence)
        self.drop(batch, [row for row in range(len(batch)) if row not in rows])
        return parked

    def _row_state(self, slots: Slots, r: int, positive: int, negative: int) -> RowState:
        """Row `r` as the eager loop keeps a sequence outside the batch: `positive` and `negative` columns."""
        t, b = slots.tensors, slots.bucket
        acoustic, semantic = self.codec_templates()
        return RowState(
            positive_hidden=t.positive_hidden[r].clone(),
            negative_hidden=t.negative_hidden[r].clone(),
            positive_kv=[(k[r : r + 1, :, :positive].clone(), v[r : r + 1, :, :positive].clone()) for k, v in t.kv],
            negative_kv=[
                (k[b + r : b + r + 1, :, :negative].clone(), v[b + r : b + r + 1, :, :negative].clone())
                for k, v in t.kv
            ],
            positive_mask=torch.ones(positive, dtype=torch.long, device=self.device),
            negative_mask=torch.ones(negative, dtype=torch.long, device=self.device),
            acoustic=codec_map(acoustic, lambda key, layer: t.acoustic[key][r : r + 1].clone()),
            semantic=codec_map(semantic, lambda key, layer: t.semantic[key][r : r + 1].clone()),
        )

    # --- one frame ------------------------------------------------------------------------------

    def step(self, batch: Batch) -> list[FrameOutput]:
        """One frame for every row; the batch's slots advance in place. One host read: the tokens."""
        slots: Slots = batch.static
        choice, audio, latent = self.run(slots.tensors)  # [2, B] long, [B, 1, hop], [B, 1, latent]
        tokens, finite = self._read(choice)
        copy_ = HostCopy(audio)
        outputs = []
        for sequence in batch.sequences:
            row = slots.row_of(sequence)
            token, ok = tokens[row], bool(finite[row])
            speaks = token == self.decoder.audio_token_id and ok
            self._advance(slots, sequence, token, speaks)
            ended = token in self.decoder.eos_token_ids or len(sequence.tokens) >= sequence.request.max_frames
            frame, spoken = (HostFrame(copy_, row), latent[row, 0]) if speaks else (None, None)
            outputs.append(FrameOutput(sequence, token, frame, ended=ended, failed=not ok, latent=spoken,
                                       hidden=slots.tensors.positive_hidden[row]))  # fmt: skip
        return outputs

    def _advance(self, slots: Slots, sequence: Sequence, token: int, speaks: bool) -> None:
        """The host's mirror of what the frame did to this row (lengths, positions, draws used)."""
        sequence.count_frame(self.last_compiled)
        sequence.tokens.append(token)
        sequence.next_position += 1
        sequence.negative_length += int(speaks)
        rng, negative_columns = slots.joined[id(sequence)]
        negative_columns = 0 if token == self.decoder.audio_bos_token_id else negative_columns + int(speaks)
        slots.joined[id(sequence)] = (rng, negative_columns)
        slots.diffused[id(sequence)] += int(speaks)

    def _read(self, choice: torch.Tensor) -> tuple[list[int], list[int]]:
        """The frame's one host synchronisation: tokens and finite flags, through pinned memory on CUDA."""
        if choice.device.type != "cuda":
            tokens, finite = choice.tolist()
            return tokens, finite
        if self._pinned is None or self._pinned.shape != choice.shape:
            self._pinned = torch.empty(choice.shape, dtype=choice.dtype, pin_memory=True)
        self._pinned.copy_(choice, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        tokens, finite = self._pinned.tolist()
        return tokens, finite

    # --- start-up ---------------------------------------------------------------------------------

    def warm_up(self, shapes: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], float]:
        """Compile (and on CUDA capture) the frame for each shape (bucket, capacity, steps), with idle rows,
        in order: the one place shapes are compiled, only at start-up (a shape compiled mid-job would stall
        every row of the batch). Returns the seconds each shape took; stops at a compilation failure
        (`compiled` turns False, `failure` says why). Their buffers are kept for the batches to come. The
        volume's artifacts of an earlier start are loaded first (compile_cache.py); what compiled anew is
        saved after."""
        artifacts = StepArtifacts.for_model(self.model) if self.compiled else None
        if artifacts is not None:
            artifacts.load()
        misses = cache_misses()
        seconds = {}
        self._warming = True
        try:
            for shape in shapes:
                started = time.perf_counter()
                slots = self.allocate(*shape)
                for _ in range(3 if self.device.type == "cuda" else 1):  # CUDA graphs record on the 2nd-3rd call
                    self.run(slots.tensors)
                if not self.compiled:
                    break
                self.compiled_shapes.add(shape)
                self.release(slots)
                seconds[shape] = time.perf_counter() - started
        finally:
            self._warming = False
        if artifacts is not None and self.compiled and cache_misses() > misses:
            artifacts.save()
        return seconds


def _tensors_of(tensors: SlotTensors) -> list[torch.Tensor]:
    out = [t for pair in tensors.kv for t in pair] + list(tensors.acoustic.values()) + list(tensors.semantic.values())
    for name in SlotTensors.__dataclass_fields__:
        value = getattr(tensors, name)
        if isinstance(value, torch.Tensor):
            out.append(value)
    return out


def _shape_of(tensors: SlotTensors) -> tuple[int, int, int]:
    """(bucket, capacity, steps) of a frame's tensors: what a compiled graph is specialised to."""
    return tensors.live.shape[0], tensors.noise.shape[1], tensors.solver.shape[1]


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _columns_needed(sequence: Sequence) -> int:
    """KV columns a sequence's positive row fills by its last frame (the negative row fills fewer);
    before its prefill, its prompt's length stands for its position."""
    position = max(sequence.next_position, int(sequence.request.input_ids.numel()))
    return position + sequence.request.max_frames - len(sequence.tokens) + 1


def _move(old: Slots, new: Slots, rows: list[int]) -> None:
    """Copy the rows `rows` of `old` (in that order) into rows 0.. of `new` (bucket, capacity or steps differ)."""
    index = torch.tensor(rows, dtype=torch.long, device=old.tensors.live.device)
    k, ob, nb = len(rows), old.bucket, new.bucket
    columns = min(old.capacity, new.capacity)
    for (nk, nv), (ok, ov) in zip(new.tensors.kv, old.tensors.kv, strict=True):
        for mine, theirs in ((nk, ok), (nv, ov)):
            mine[:k, :, :columns] = theirs[index, :, :columns]
            mine[nb : nb + k, :, :columns] = theirs[ob + index, :, :columns]
    for name in ("positive_hidden", "negative_hidden", "positive_length", "negative_length", "negative_position",
                 "emitted", "diffused", "live", "guidance"):  # fmt: skip
        getattr(new.tensors, name)[:k] = getattr(old.tensors, name)[index]
    new.tensors.noise[:k, :columns] = old.tensors.noise[index, :columns]
    new.tensors.forced[:k, :columns] = old.tensors.forced[index, :columns]
    steps = min(old.steps, new.steps)
    new.tensors.solver[:k] = torch.tensor(NO_OP_STEP, device=index.device)  # reused buffers hold old rows' steps
    new.tensors.solver[:k, :steps] = old.tensors.solver[index, :steps]
    new.tensors.timestep_embeds[:k, :steps] = old.tensors.timestep_embeds[index, :steps]
    for mine, theirs in ((new.tensors.acoustic, old.tensors.acoustic), (new.tensors.semantic, old.tensors.semantic)):
        for key in mine:
            mine[key][:k] = theirs[key][index]
    new.holders[:k] = [old.holders[row] for row in rows]
    new.joined, new.diffused = old.joined, old.diffused
