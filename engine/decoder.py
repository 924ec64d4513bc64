"""VibeVoice's decode loop as small steps over a batch of rows, for the scheduler (scheduler.py).

transformers' `generate` runs, for every 133 ms frame, one language-model pass for the text
(positive) branch and a second one for the unconditional (negative) branch of classifier-free
guidance, each reading all the weights. Decoding is memory-bandwidth bound, so this loop runs the
same per-frame steps with the model's own modules, batched over every sequence that decodes:

    prefill        one sequence alone, in pieces (its voices, then its prompt): its rows, ready to join
    join           prefilled (or parked) sequences become rows of the running batch, at a frame boundary
    step           one frame for every row:
      choose_tokens    argmax among the tokens VibeVoice may emit, from the matching rows of lm_head
      diffuse          classifier-free-guided diffusion for the rows that speak, both halves per head call
      codec_step       acoustic decode and semantic encode of those rows (per-row streaming conv state)
      forward_both     ONE language-model pass for the positive and the negative rows of every sequence
    drop / park    rows leave the batch (ended, stopped), or leave with their state kept (out of memory)

The batch's rows are `[pos_0 .. pos_n-1, neg_0 .. neg_n-1]` in one KV cache, right-aligned (left
padding, masked) with explicit position ids, so a row sees exactly the positions it would see alone.
`step` is the one per-frame function: its input is the batch at a frame boundary, its output the
batch one frame later plus what each sequence produced. With COMPILE on, framestep.FrameStep
replaces join/step/drop/park (a static, compiled step over preallocated slots, equal per sequence);
the scheduler does not change.

Per sequence the result equals transformers' stock `generate` for that chunk alone (the tests
check both): its random draws come from its own generator, seeded with the job seed, consumed in
the same order as the stock loop consumes the global one (the sigma-VAE noise of the voice latents
during the prompt, then `randn(2, latent)` per frame of which the first row is used); the negative
branch advances only on frames the sequence diffuses, and is reset on speech-start, as in the stock
loop; the codec caches advance per sequence. So a sequence's audio does not depend on what else is
in the batch, or on when it joined.

Voices: the acoustic encoder's output for a reference voice is deterministic; only its sigma-VAE
noise is random. Each distinct voice (keyed by a hash of its normalised samples) is encoded once
per process, alone and in segments of VOICE_SEGMENT_SAMPLES through the encoder's streaming cache
(so a long voice never needs more encoder memory than one segment), and kept; each sequence then
draws the noise stock `encode` would draw, in the same shapes and order, under its own seed.

One difference from `generate` is deliberate. Because `guidance_scale` is not 1, transformers'
generic `_get_logits_processor` also adds its token-level classifier-free guidance
(UnbatchedClassifierFreeGuidanceLogitsProcessor): a third language-model pass per frame, over the
generated token ids without the prompt, that reweighs the choice between "next frame", "speech
end" and "end of text". VibeVoice's own inference code applies guidance to the diffusion head only
and picks tokens by argmax of the text branch, and so does this loop. The tiny test checkpoint
allows only the frame token, so the audio is equal; with the real model the two loops can end
speech at different frames, and their audio is equal up to there.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from engine.batch import (
    Batch,
    ChunkAudio,
    DecodeRequest,
    FrameOutput,
    HostCopy,
    HostFrame,
    NonFiniteStateError,
    RowState,
    Sequence,
    VoiceClip,
    codec_map,
    ended_by_cap,
)
from engine.framestep import FrameStep, bucket_for, capacity_for

log = logging.getLogger("vibevoice.decoder")

# Generation-config fields that would change token choice but that this loop does not apply.
_UNSUPPORTED_LOGITS_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias")
# A prompt is prefilled in pieces of at most this many tokens (one piece per frame boundary while
# other sequences decode), so a long prompt never stalls the batch for more than one such forward.
PREFILL_PIECE_TOKENS = 512
# A voice is encoded in segments of this many samples (20 s at 24 kHz; a multiple of the codec's
# 3200-sample hop): the 7B's encoder needs ~768 bytes per sample, so ~370 MB per segment.
VOICE_SEGMENT_SAMPLES = 480_000
# Encoded voices kept per process (deterministic encoder output, ~0.3 MB per minute of voice in bf16).
VOICE_CACHE_BYTES = 64 * 2**20
# Diffusion steps when neither the deployment nor the checkpoint's generation config names a count
# (VibeVoice's own inference scripts use 10).
FALLBACK_DIFFUSION_STEPS = 10


def default_diffusion_steps(generation_config, setting: int = 0) -> int:
    """The deployment's diffusion steps per frame, resolved once: DEFAULT_DIFFUSION_STEPS when given
    (not 0), else the checkpoint's generation config (`num_diffusion_steps`; a converted community
    checkpoint has its `ddpm_num_inference_steps` there, 20 for the 7B), else FALLBACK_DIFFUSION_STEPS.
    The compiled step is compiled for exactly this count, and jobs that give none run with it."""
    return int(setting or getattr(generation_config, "num_diffusion_steps", None) or FALLBACK_DIFFUSION_STEPS)


# --- the decoder ----------------------------------------------------------------------------------


class BatchDecoder:
    """Prefills sequences and decodes a batch of them frame by frame with the model's own modules."""

    def __init__(self, model, compile_mode: str = "off", diffusion_steps: int = 0):
        self.model = model
        self.diffusion_steps = default_diffusion_steps(model.generation_config, diffusion_steps)
        config = model.config
        generation_config = model.generation_config
        self.audio_token_id = int(config.audio_token_id)
        self.audio_bos_token_id = int(config.audio_bos_token_id)
        self.hop_length = int(config.audio_config.hop_length)
        eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else config.eos_token_id
        self.eos_token_ids = {int(t) for t in (eos if isinstance(eos, list | tuple) else [eos])}
        # VibeVoice may only emit these (transformers' VibeVoiceTokenConstraintProcessor); the
        # generation config may suppress some of them (the tiny test checkpoint does).
        valid = [config.audio_bos_token_id, config.audio_eos_token_id, config.audio_token_id, config.eos_token_id]
        suppressed = set(generation_config.suppress_tokens or [])
        self.allowed_token_ids = sorted({int(t) for t in valid} - suppressed)
        if not self.allowed_token_ids:
            raise ValueError("the generation config suppresses every token VibeVoice can emit")
        for name in _UNSUPPORTED_LOGITS_SETTINGS:
            value = getattr(generation_config, name, None)
            if value not in (None, 1.0, 0, [], {}):
                log.warning("generation_config.%s=%r is not applied by the batched decode loop", name, value)

        lm_head = model.lm_head
        # The rows of lm_head for the allowed tokens: the logits VibeVoice's argmax can pick from.
        self.token_head = nn.Linear(lm_head.in_features, len(self.allowed_token_ids), bias=False,
                                    device=lm_head.weight.device, dtype=lm_head.weight.dtype)  # fmt: skip
        with torch.no_grad():
            self.token_head.weight.copy_(lm_head.weight[self.allowed_token_ids])
        self.token_head.eval()
        self._allowed = torch.tensor(self.allowed_token_ids, device=lm_head.weight.device)

        self.noise_scheduler = model._build_default_noise_scheduler(generation_config)
        # One user of the model at a time: the scheduler's loop holds it for a boundary and a frame,
        # `decode` and stock `generate` for their whole run (the noise scheduler is stateful).
        self.lock = threading.Lock()
        self._negative_start: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.voice_cache = VoiceLatentCache(VOICE_CACHE_BYTES)
        self.compile_mode = compile_mode
        self.compile_error: str | None = None  # why the compiled step could not be built (COMPILE on or auto)
        self.frame_step = self._frame_step(compile_mode)

    def _frame_step(self, compile_mode: str):
        """The static frame step (framestep.py) when COMPILE resolves to on; None runs this module's loop.

        auto is on for CUDA and off on the CPU, where compiling each bucket costs more than a minute
        at every start (make bench, figure k; docs/operations.md). Compilation itself waits for the
        start-up check (VibeVoiceEngine.warm_up), which also decides what a failure means."""
        if compile_mode not in ("off", "on", "auto"):
            raise ValueError(f"compile_mode must be off, on or auto, not {compile_mode!r}")
        if compile_mode == "off" or (compile_mode == "auto" and self.device.type != "cuda"):
            return None
        try:
            return FrameStep(self, compile_frame=True)
        except Exception as exc:  # an unsupported model or torch: the start-up check says so
            self.compile_error = f"the compiled decode step cannot be built: {str(exc).splitlines()[0]}"
            return None

    @property
    def compiled(self) -> bool:
        """The compiled static step is in use (False with COMPILE off, or after a compile failure)."""
        return self.frame_step is not None and self.frame_step.compiled

    @torch.inference_mode()
    def compile_shapes(self, shapes: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], float]:
        """Compile the step for these shapes (bucket, capacity, steps) before jobs come; the seconds each
        took (nothing to do when not compiled). framestep.warm_up_shapes says which shapes start-up needs."""
        if self.frame_step is None or not self.frame_step.compiled:
            return {}
        with self.lock:
            return self.frame_step.warm_up(shapes)

    def warm_up(self, batch_sizes: list[int], diffusion_steps: int | None = None) -> dict[tuple[int, int, int], float]:
        """Compile the step for these batch sizes' buckets at one capacity step (benchmarks)."""
        steps = diffusion_steps or (self.frame_step.default_steps if self.frame_step else self.diffusion_steps)
        buckets = sorted({bucket_for(n) for n in batch_sizes})
        return self.compile_shapes([(bucket, capacity_for(1, self.device), steps) for bucket in buckets])

    @contextlib.contextmanager
    def eager_loop(self) -> Iterator[None]:
        """This module's loop for the length of the block, the static step set aside (the start-up
        comparisons run both on one model). Only while no batch is decoding."""
        frame_step, self.frame_step = self.frame_step, None
        try:
            yield
        finally:
            self.frame_step = frame_step

    @property
    def device(self) -> torch.device:
        return self.model.device

    # --- a whole decode, for callers without a scheduler ------------------------------------------

    @torch.inference_mode()
    def decode(
        self,
        requests: list[DecodeRequest],
        on_frame: Callable[[int, np.ndarray], None] | None = None,
        on_output: Callable[[FrameOutput], None] | None = None,
    ) -> list[ChunkAudio]:
        """Decode `requests` together to the end, in this thread; results in request order.

        The scheduler runs the same steps for every job of the process; this is the same loop
        for one group of requests (tests, tools, the start-up checks). `on_frame(index, samples)`
        gets every frame's audio, `on_output(output)` every FrameOutput as the step made it (its
        device tensors are valid until the next frame: copy what you keep)."""
        with self.lock:
            return self._decode(requests, on_frame, on_output)

    def _decode(self, requests: list[DecodeRequest], on_frame, on_output=None) -> list[ChunkAudio]:
        sequences = [Sequence(request) for request in requests]
        audio: dict[int, list[np.ndarray]] = {id(s): [] for s in sequences}
        batch = Batch()
        for sequence in sequences:
            for _ in self.prefill(sequence):
                pass
        self.join(batch, sequences)
        while batch.sequences:
            outputs = self.step(batch)
            for output in outputs:
                if output.failed:
                    raise NonFiniteStateError(f"chunk {output.sequence.request.index}: the hidden state is not finite")
                if output.audio is not None:
                    samples = output.audio.numpy()
                    audio[id(output.sequence)].append(samples)
                    if on_frame is not None:
                        on_frame(output.sequence.request.index, samples)
                if on_output is not None:
                    on_output(output)
            self.drop(batch, [row for row, output in enumerate(outputs) if not output.ended])
        return [self.result(s, audio[id(s)]) for s in sequences]

    def result(self, sequence: Sequence, frames: list[np.ndarray]) -> ChunkAudio:
        samples = np.concatenate(frames) if frames else np.zeros(0, dtype=np.float32)
        tokens = list(sequence.tokens)
        return ChunkAudio(
            index=sequence.request.index,
            audio=samples.astype(np.float32, copy=False),
            frames=sum(1 for token in tokens if token == self.audio_token_id),
            reached_cap=ended_by_cap(tokens, sequence.request.max_frames, self.audio_token_id),
            tokens=tokens,
            compiled_frames=sequence.compiled_frames,
            uncompiled_frames=sequence.uncompiled_frames,
        )

    # --- prefill: one sequence alone --------------------------------------------------------------

    def prefill(self, sequence: Sequence) -> Iterator[None]:
        """Prefill one sequence alone, in pieces; yields between pieces (the scheduler runs a frame of
        the batch there). When it is exhausted, `sequence.state` holds the rows that join the batch.

        Alone, because left-padded batched prefill can give NaN rows with fused kernels on CUDA, and
        because a sequence joining a running batch has nobody to share its prompt pass with."""
        embeds = yield from self._prompt_embeds(sequence)  # [prompt_len, hidden]
        model = self.model.model
        length = int(embeds.shape[0])
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        for start in range(0, length, PREFILL_PIECE_TOKENS):
            end = min(length, start + PREFILL_PIECE_TOKENS)
            out = model.language_model(
                inputs_embeds=embeds[None, start:end],
                position_ids=torch.arange(start, end, device=embeds.device)[None],
                past_key_values=cache,
                use_cache=True,
            )
            if end < length:
                yield
        positive_hidden = out.last_hidden_state[0, -1]  # [hidden]
        if not bool(torch.isfinite(positive_hidden).all()):
            raise NonFiniteStateError(f"chunk {sequence.request.index}: the prompt's hidden state is not finite")
        negative_hidden, start_kv = self._negative_start_state()
        sequence.next_position = length
        sequence.state = RowState(
            positive_hidden=positive_hidden,
            negative_hidden=negative_hidden[0],
            positive_kv=[(layer.keys, layer.values) for layer in cache.layers],
            negative_kv=start_kv,
            positive_mask=torch.ones(length, dtype=torch.long, device=embeds.device),
            negative_mask=torch.ones(1, dtype=torch.long, device=embeds.device),
        )

    def _prompt_embeds(self, sequence: Sequence) -> Iterator[None]:
        """The prompt's input embeddings with the voice latents in the placeholder positions; sets
        the sequence's generator to the state the stock loop's global RNG has when frames start.

        Stock `encode` draws the sigma-VAE noise from the global RNG (seeded with the job seed):
        `randn(voices)` for the scales, then `randn_like(latents)` over the voices padded to the
        longest. Those draws are replayed here, in the same shapes and order, on the cached
        deterministic encoder output, inside a forked RNG; the CPU RNG state they leave becomes the
        sequence's generator for the frames, as in the stock loop."""
        request = sequence.request
        model = self.model.model
        device = self.device
        input_ids = request.input_ids.to(device).unsqueeze(0)
        embeds = model.get_input_embeddings()(input_ids)  # [1, prompt_len, hidden]
        sequence.generator.manual_seed(request.seed)
        if not request.voices:
            return embeds[0]
        encoded = []
        for clip in request.voices:
            encoded.append((yield from self._encode_voice(clip)))  # [frames, latent]
        longest = max(clip.frames for clip in request.voices)
        # [voices, longest, latent] as a transposed view of [voices, latent, longest], the layout of the
        # encoder's own output: `randn_like` keeps strides, so the noise lands where stock puts it.
        latents = encoded[0].new_zeros(len(encoded), encoded[0].shape[-1], longest).transpose(1, 2)
        for row, voice in enumerate(encoded):
            latents[row, : voice.shape[0]] = voice
        devices = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(request.seed)
            vae_std = model.audio_tower.config.vae_std
            noise_std = vae_std * torch.randn(latents.shape[0], device=latents.device, dtype=latents.dtype)
            latents = latents + noise_std[:, None, None] * torch.randn_like(latents)
            sequence.generator.set_state(torch.get_rng_state())
        features = (latents + model.latent_bias_factor.to(device)) * model.latent_scaling_factor.to(device)
        features = model.multi_modal_projector(features)  # [voices, longest, hidden]
        real = torch.cat([features[row, : clip.frames] for row, clip in enumerate(request.voices)])
        placeholders = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, audio_features=real)
        return embeds.masked_scatter(placeholders, real.to(embeds.dtype))[0]

    def _encode_voice(self, clip: VoiceClip) -> Iterator[None]:
        """The acoustic encoder's deterministic output for one voice [frames, latent], from the cache
        or encoded now in segments (one segment per piece of prefill work)."""
        cached = self.voice_cache.get(clip.key)
        if cached is not None:
            return cached
        encoder = self.model.model.audio_tower.encoder
        samples = clip.samples.to(self.device, self.model.dtype)[None, None]  # [1, 1, frames * hop]
        padding_cache, pieces = None, []
        for start in range(0, samples.shape[-1], VOICE_SEGMENT_SAMPLES):
            output = encoder(samples[..., start : start + VOICE_SEGMENT_SAMPLES], padding_cache=padding_cache,
                             use_cache=True)  # fmt: skip
            padding_cache = output.padding_cache
            pieces.append(output.latents[0])  # [segment frames, latent]
            if start + VOICE_SEGMENT_SAMPLES < samples.shape[-1]:
                yield
        latents = torch.cat(pieces)[: clip.frames]
        self.voice_cache.put(clip.key, latents)
        return latents

    def _negative_start_state(self) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The negative branch starts from a lone speech-start token at position 0: the same for
        every sequence, so its hidden state [1, hidden] and KV entry are computed once."""
        if self._negative_start is None:
            model = self.model.model
            token = torch.tensor([[self.audio_bos_token_id]], device=self.device)
            cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            out = model.language_model(
                inputs_embeds=model.get_input_embeddings()(token),
                position_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                past_key_values=cache,
                use_cache=True,
            )
            kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            self._negative_start = (out.last_hidden_state[:, -1].clone(), kv)
        return self._negative_start

    # --- rows joining and leaving -------------------------------------------------------------

    def join(self, batch: Batch, sequences: list[Sequence]) -> None:
        """Append sequences with a row state (prefilled or parked) as the batch's last rows.

        Every row stays right-aligned: the narrower side is left-padded with masked zero columns,
        so the last column is the latest pass of every row (the negative rows' speculative one).
        All or nothing: the new tensors are built before the batch takes them, so if it raises (out
        of memory) the batch and the sequences are as they were."""
        if not sequences:
            return
        if self.frame_step is not None:
            return self.frame_step.join(batch, sequences)
        states = [sequence.state for sequence in sequences]
        n = len(batch)
        width = max(
            [batch.columns] + [s.positive_mask.numel() for s in states] + [s.negative_mask.numel() for s in states]
        )

        def right(tensor: torch.Tensor) -> torch.Tensor:  # [rows, heads, L, hd] -> [rows, heads, width, hd]
            return F.pad(tensor, (0, 0, width - tensor.shape[2], 0))

        joined = bool(batch.kv)
        kv = []
        for layer in range(len(states[0].positive_kv)):
            new = []
            for side in (0, 1):  # keys, values
                old = batch.kv[layer][side] if joined else None
                parts = [right(old[:n])] if old is not None else []
                parts += [right(s.positive_kv[layer][side]) for s in states]
                parts += [right(old[n:])] if old is not None else []
                parts += [right(s.negative_kv[layer][side]) for s in states]
                new.append(torch.cat(parts))
            kv.append((new[0], new[1]))
        old_mask = [F.pad(batch.mask[:n], (width - batch.columns, 0))] if batch.mask is not None else []
        old_negative = [F.pad(batch.mask[n:], (width - batch.columns, 0))] if batch.mask is not None else []
        mask = torch.cat(
            old_mask
            + [F.pad(s.positive_mask, (width - s.positive_mask.numel(), 0))[None] for s in states]
            + old_negative
            + [F.pad(s.negative_mask, (width - s.negative_mask.numel(), 0))[None] for s in states]
        )
        hidden = [s.positive_hidden[None] for s in states]
        negative = [s.negative_hidden[None] for s in states]
        if n:
            hidden, negative = [batch.positive_hidden, *hidden], [batch.negative_hidden, *negative]
        hidden, negative = torch.cat(hidden), torch.cat(negative)
        acoustic = _codec_cat([(batch.acoustic, n)] + [(s.acoustic, 1) for s in states])
        semantic = _codec_cat([(batch.semantic, n)] + [(s.semantic, 1) for s in states])
        batch.kv, batch.mask, batch.positive_hidden, batch.negative_hidden = kv, mask, hidden, negative
        batch.acoustic, batch.semantic = acoustic, semantic
        batch.sequences.extend(sequences)
        for sequence in sequences:
            sequence.state = None

    def drop(self, batch: Batch, keep: list[int]) -> None:
        """Keep only the rows `keep` (in that order); the others leave the batch and free their KV."""
        n = len(batch)
        if keep == list(range(n)):
            return
        if self.frame_step is not None:
            return self.frame_step.drop(batch, keep)
        if not keep:
            batch.__dict__.update(Batch().__dict__)
            return
        rows = torch.tensor(keep, device=batch.mask.device)
        both = torch.cat([rows, rows + n])
        for layer, (keys, values) in enumerate(batch.kv):
            batch.kv[layer] = (keys[both], values[both])
        batch.mask = batch.mask[both]
        batch.positive_hidden, batch.negative_hidden = batch.positive_hidden[rows], batch.negative_hidden[rows]
        batch.acoustic = _codec_select(batch.acoustic, rows)
        batch.semantic = _codec_select(batch.semantic, rows)
        batch.sequences = [batch.sequences[row] for row in keep]
        self._trim_columns(batch)

    def park(self, batch: Batch, rows: list[int]) -> list[Sequence]:
        """Take rows out of the batch with their state (`sequence.state`), to join again later."""
        if self.frame_step is not None:
            return self.frame_step.park(batch, rows) if rows else []
        n = len(batch)
        parked = []
        for row in rows:
            sequence = batch.sequences[row]
            positive_kv, positive_mask = _row_cut(batch, row)
            negative_kv, negative_mask = _row_cut(batch, n + row)
            index = torch.tensor([row], device=batch.mask.device)
            sequence.state = RowState(
                positive_hidden=batch.positive_hidden[row].clone(),
                negative_hidden=batch.negative_hidden[row].clone(),
                positive_kv=positive_kv,
                negative_kv=negative_kv,
                positive_mask=positive_mask,
                negative_mask=negative_mask,
                acoustic=_codec_select(batch.acoustic, index),
                semantic=_codec_select(batch.semantic, index),
            )
            parked.append(sequence)
        self.drop(batch, [row for row in range(n) if row not in rows])
        return parked

    @staticmethod
    def _trim_columns(batch: Batch) -> None:
        """Drop leading cache columns no row can see (left padding of rows that left)."""
        first = _first_visible(batch.mask.any(dim=0))
        if first:
            batch.kv = [(keys[:, :, first:], values[:, :, first:]) for keys, values in batch.kv]
            batch.mask = batch.mask[:, first:]

    # --- one frame ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, batch: Batch) -> list[FrameOutput]:
        """One frame for every row of the batch, in place; returns what each sequence produced.

        Input: the batch at a frame boundary (each row's hidden state from its latest pass).
        Output: the batch one frame later, with rows that ended still in it (the caller drops them
        at the next boundary, with any others that leave). If it raises (out of memory), the
        batch and the sequences are as they were, so the frame can be retried with fewer rows."""
        if self.frame_step is not None:
            return self.frame_step.step(batch)
        tokens, finite = self.choose_tokens(batch)  # [n] host ints, [n] host bools
        speaking = [row for row, token in enumerate(tokens) if token == self.audio_token_id and finite[row]]
        generators = [batch.sequences[row].generator for row in speaking]
        saved = [generator.get_state() for generator in generators]
        try:
            latent, audio, acoustic, semantic_cache, semantic = self.speak(batch, speaking)
            embeds = self.next_embeds(tokens, speaking, latent, semantic)  # [n, 1, hidden]
            mask, negative_lengths = self.negative_after(batch, tokens)  # [2n, L], [n]
            self.forward_both(batch, embeds, mask, negative_lengths)
        except BaseException:
            for generator, state in zip(generators, saved, strict=True):
                generator.set_state(state)
            raise
        if speaking:
            batch.acoustic, batch.semantic = acoustic, semantic_cache
        return self._commit(batch, tokens, finite, speaking, audio, latent, negative_lengths)

    def choose_tokens(self, batch: Batch) -> tuple[list[int], list[bool]]:
        """Next token of every sequence (argmax among the allowed tokens), and which rows are finite."""
        logits = self.token_head(batch.positive_hidden).float()  # [n, allowed]
        tokens = self._allowed[logits.argmax(dim=-1)]  # [n]
        finite = torch.isfinite(batch.positive_hidden).all(-1) & torch.isfinite(batch.negative_hidden).all(-1)
        token_list, finite_list = torch.stack([tokens, finite.long()]).tolist()  # the frame's one sync
        for row, sequence in enumerate(batch.sequences):
            forced = sequence.request.forced_tokens
            if len(sequence.tokens) < len(forced):
                token_list[row] = forced[len(sequence.tokens)]
        return token_list, [bool(value) for value in finite_list]

    def speak(self, batch: Batch, rows: list[int]):
        """Diffusion, acoustic decode and semantic encode for the rows that speak this frame.

        Returns (latent [m, 1, latent], audio [m, 1, hop], the batch's new acoustic and semantic
        conv state, semantic features [m, 1, semantic]); the batch itself is not changed."""
        if not rows:
            return None, None, None, None, None
        index = torch.tensor(rows, device=batch.positive_hidden.device)
        condition = torch.cat([batch.positive_hidden[index], batch.negative_hidden[index]])  # [2m, hidden]
        latent = self.diffuse(condition, [batch.sequences[row] for row in rows])  # [m, 1, latent]
        n = len(batch)
        audio, acoustic = _codec_step(self._acoustic_decode, self._scale_latent(latent), batch.acoustic, index, n)
        semantic, semantic_cache = _codec_step(self._semantic_encode, audio, batch.semantic, index, n)
        return latent, audio, acoustic, semantic_cache, semantic

    def diffuse(self, condition: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """Latents [m, 1, latent] for m speaking sequences; condition is [2m, hidden] (positive halves
        first). Sequences with the same steps and guidance scale share each head call."""
        m = len(sequences)
        groups: dict[tuple[int, float], list[int]] = {}
        for k, sequence in enumerate(sequences):
            groups.setdefault((sequence.request.diffusion_steps, sequence.request.cfg_scale), []).append(k)
        if len(groups) == 1:
            [(steps, scale)] = groups
            return self._sample_latent(condition, [s.generator for s in sequences], scale, steps)
        latent = None
        for (steps, scale), members in groups.items():
            index = torch.tensor(members, device=condition.device)
            part = self._sample_latent(
                torch.cat([condition[:m][index], condition[m:][index]]),
                [sequences[k].generator for k in members], scale, steps,
            )  # fmt: skip
            latent = part.new_empty(m, *part.shape[1:]) if latent is None else latent
            latent[index] = part
        return latent

    def next_embeds(self, tokens: list[int], rows: list[int], latent, semantic) -> torch.Tensor:
        """The next input of every row [n, 1, hidden]: the token's embedding, or the frame's features."""
        model = self.model.model
        token_ids = torch.tensor(tokens, device=self.device)
        embeds = model.get_input_embeddings()(token_ids).unsqueeze(1)
        if rows:
            frame_embeds = (model.multi_modal_projector(latent) + model.semantic_connector(semantic)).to(embeds.dtype)
            if len(rows) == len(tokens):
                return frame_embeds
            embeds[torch.tensor(rows, device=self.device)] = frame_embeds
        return embeds

    def negative_after(self, batch: Batch, tokens: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The mask [2n, L] and negative lengths once this frame's tokens are known.

        The negative branch really saw the last pass's input only where the sequence diffuses now;
        elsewhere that speculative column is masked. Speech-start restarts the negative branch
        from a single-token context (its next input sees only itself), as in the stock loop."""
        n = len(batch)
        speaks = [token == self.audio_token_id for token in tokens]
        lengths = [s.negative_length + int(speak) for s, speak in zip(batch.sequences, speaks, strict=True)]
        silent = [n + row for row, speak in enumerate(speaks) if not speak]
        restart = [n + row for row, token in enumerate(tokens) if token == self.audio_bos_token_id]
        mask = batch.mask.clone()
        if silent:
            mask[torch.tensor(silent, device=mask.device), -1] = 0
        if restart:
            mask[torch.tensor(restart, device=mask.device)] = 0
        return mask, lengths

    def forward_both(self, batch: Batch, embeds: torch.Tensor, mask: torch.Tensor, negative_lengths: list[int]):
        """One language-model pass over both branches of every row: appends one column to the cache.

        embeds [n, 1, hidden]; mask [2n, L] -> [2n, L + 1]. On an exception the cache is cut back to
        its L columns (each layer grows by concatenation, so its first L columns are unchanged)."""
        n = len(batch)
        columns = batch.columns
        mask = torch.cat([mask, mask.new_ones(2 * n, 1)], dim=1)
        positions = torch.tensor(
            [[s.next_position] for s in batch.sequences] + [[length] for length in negative_lengths], device=self.device
        )  # [2n, 1]
        cache = _cache_over(batch.kv, self.model.config)
        batch.kv = []  # the cache owns the tensors during the pass: each layer's old tensor is freed as it grows
        try:
            out = self.model.model.language_model(
                inputs_embeds=torch.cat([embeds, embeds]),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        except BaseException:
            batch.kv = [(layer.keys[:, :, :columns], layer.values[:, :, :columns]) for layer in cache.layers]
            raise
        batch.kv = [(layer.keys, layer.values) for layer in cache.layers]
        hidden = out.last_hidden_state[:, -1]  # [2n, hidden]
        batch.positive_hidden, batch.negative_hidden, batch.mask = hidden[:n], hidden[n:], mask

    def _commit(self, batch, tokens, finite, speaking, audio, latent, negative_lengths) -> list[FrameOutput]:
        """After a successful frame: advance each sequence and say what it produced."""
        copy = HostCopy(audio) if speaking else None
        frames = {row: HostFrame(copy, k) for k, row in enumerate(speaking)}
        latents = {row: latent[k, 0] for k, row in enumerate(speaking)}
        outputs = []
        for row, sequence in enumerate(batch.sequences):
            token = tokens[row]
            sequence.count_frame(compiled=False)
            sequence.tokens.append(token)
            sequence.negative_length = negative_lengths[row]
            sequence.next_position += 1
            ended = token in self.eos_token_ids or len(sequence.tokens) >= sequence.request.max_frames
            outputs.append(FrameOutput(sequence, token, frames.get(row), ended=ended, failed=not finite[row],
                                       latent=latents.get(row), hidden=batch.positive_hidden[row]))  # fmt: skip
        return outputs

    # --- per-frame pieces -------------------------------------------------------------------------

    def _sample_latent(
        self, condition: torch.Tensor, generators: list[torch.Generator], guidance_scale: float, steps: int
    ) -> torch.Tensor:
        """Classifier-free-guided diffusion for m sequences: both halves in one head call per step."""
        head = self.model.model.diffusion_head
        latent_size = self.model.config.audio_config.hidden_size
        m = len(generators)
        # Drawn on the CPU, two rows per sequence of which the first is used, as the stock loop does.
        noise = torch.cat([torch.randn(2, latent_size, generator=g)[:1] for g in generators])
        latent = noise.to(condition)
        scheduler = self.noise_scheduler
        scheduler.set_timesteps(num_inference_steps=steps)
        for timestep in scheduler.timesteps:
            both = torch.cat([latent, latent])
            eps = head(both, timestep.repeat(2 * m).to(both), condition=condition)
            cond_eps, uncond_eps = torch.split(eps, m, dim=0)
            guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            latent = scheduler.step(guided, timestep, latent).prev_sample
        return latent.unsqueeze(1)

    def _scale_latent(self, latent: torch.Tensor) -> torch.Tensor:
        model = self.model.model
        return latent / model.latent_scaling_factor.to(latent.device) - model.latent_bias_factor.to(latent.device)

    def _acoustic_decode(self, latent: torch.Tensor, cache):
        output = self.model.model.audio_tower.decode(latent, padding_cache=cache, use_cache=True)
        return output.audio, output.padding_cache

    def _semantic_encode(self, audio: torch.Tensor, cache):
        output = self.model.model.semantic_tokenizer_encoder(audio, padding_cache=cache, use_cache=True)
        return output.latents, output.padding_cache


class VoiceLatentCache:
    """Encoded voices by content key, least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # voices encoded so far (tests count them)

    def get(self, key: str) -> torch.Tensor | None:
        latents = self._entries.get(key)
        if latents is not None:
            self._entries.move_to_end(key)
        return latents

    def put(self, key: str, latents: torch.Tensor) -> None:
        self.encoded += 1
        self._entries[key] = latents
        while sum(t.nbytes for t in self._entries.values()) > self.max_bytes and len(self._entries) > 1:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


# --- cache helpers -------------------------------------------------------------------------------


def _first_visible(mask: torch.Tensor) -> int:
    visible = mask.nonzero()
    return int(visible[0]) if visible.numel() else int(mask.shape[-1])


def _row_cut(batch: Batch, row: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One cache row from its first visible column on: per layer [1, kv_heads, L', head_dim], mask [L']."""
    first = _first_visible(batch.mask[row])
    kv = [(k[row : row + 1, :, first:].clone(), v[row : row + 1, :, first:].clone()) for k, v in batch.kv]
    return kv, batch.mask[row, first:].clone()


def _cache_over(kv: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A DynamicCache whose layers hold these tensors (no copy)."""
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def _codec_select(cache, rows: torch.Tensor):
    return None if cache is None else codec_map(cache, lambda key, layer: layer.cache[rows])


def _codec_cat(parts: list[tuple[object | None, int]]):
    """Rows of several codec states, in order; a missing state (never spoke) is zero rows."""
    template = next((cache for cache, _ in parts if cache is not None), None)
    if template is None:
        return None

    def rows(key, layer):
        tensors = [
            cache.layers[key].cache if cache is not None else layer.cache.new_zeros(count, *layer.cache.shape[1:])
            for cache, count in parts
            if count
        ]
        return torch.cat(tensors)

    return codec_map(template, rows)


def _codec_step(run, inputs: torch.Tensor, cache, index: torch.Tensor, n: int):
    """Run a streaming codec for the rows in `index` only, so no other row's conv state advances.

    Returns (output, the batch's new conv state); `cache` itself is not changed."""
    sub = _codec_select(cache, index)
    output, sub = run(inputs, sub)
    if index.numel() == n:
        return output, sub
    if cache is None:  # first use: every other row starts from the zero state
        full = codec_map(sub, lambda key, layer: layer.cache.new_zeros(n, *layer.cache.shape[1:]))
    else:
        full = codec_map(cache, lambda key, layer: layer.cache.clone())
    for key, layer in full.layers.items():
        layer.cache[index] = sub.layers[key].cache
    return output, full
