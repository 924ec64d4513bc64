"""VibeVoice's decode loop, batched: several chunks and both guidance branches per forward pass.

transformers' `generate` runs, for every 133 ms frame, one language-model pass for the text
(positive) branch and a second one for the unconditional (negative) branch of classifier-free
guidance, each reading all the weights. Decoding is memory-bandwidth bound, so this loop runs the
same per-frame steps with the model's own modules, but batched:

- the positive and negative rows of every sequence go through the language model as ONE forward
  (rows `[pos_0 .. pos_n-1, neg_0 .. neg_n-1]` in one KV cache, left-padded, with explicit
  position ids, so a row sees exactly the positions it would see alone);
- the diffusion head runs both guidance halves of every sequence in one call per step;
- the chunks of a job decode together (left-padded prompts); each sequence ends on its own
  (end token, frame cap) and its rows leave the batch, so finished sequences cost nothing;
- the next token is chosen among the tokens VibeVoice may emit (speech frame, speech start/end,
  end of text) from the matching rows of `lm_head`, instead of all 152k vocabulary rows.

Per sequence the result equals transformers' stock `generate` for that chunk alone (the tests
check both): its random draws come from its own generator, seeded with the job seed, consumed in
the same order as the stock loop consumes the global one (the sigma-VAE noise of the voice latents
during the prompt, then `randn(2, latent)` per frame of which the first row is used); the
negative branch advances only on frames the sequence diffuses, and is reset on speech-start, as
in the stock loop; the codec caches (acoustic decoder, semantic encoder) advance per sequence.

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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

log = logging.getLogger("vibevoice.decoder")

# Generation-config fields that would change token choice but that this loop does not apply.
_UNSUPPORTED_LOGITS_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias")


@dataclass
class DecodeRequest:
    """One sequence to decode: a chunk's prompt and its limits."""

    index: int  # the chunk index, reported back with every frame
    input_ids: torch.Tensor  # [prompt_len] token ids of the prompt
    max_frames: int  # the frame cap: at most this many generated tokens
    seed: int
    input_values: torch.Tensor | None = None  # [voices, samples] reference audio, or None
    padding_mask: torch.Tensor | None = None


@dataclass
class DecodedSequence:
    index: int
    audio: np.ndarray  # 24 kHz mono float32
    frames: int  # generated speech frames
    reached_cap: bool  # stopped by the frame cap while still speaking
    tokens: list[int] = field(default_factory=list)  # every generated token id


class _Sequence:
    """The per-sequence state of one row pair (positive, negative) in the batch."""

    def __init__(self, request: DecodeRequest, generator: torch.Generator):
        self.request = request
        self.generator = generator
        self.tokens: list[int] = []
        self.frames: list[torch.Tensor] = []
        self.next_position = int(request.input_ids.numel())  # positive row's next position id
        self.negative_length = 0  # inputs the negative branch has really seen (its next position id)

    def result(self, audio_token_id: int) -> DecodedSequence:
        audio = torch.cat(self.frames, dim=-1).reshape(-1) if self.frames else torch.zeros(0)
        tokens = self.tokens
        reached_cap = len(tokens) >= self.request.max_frames and bool(tokens) and tokens[-1] == audio_token_id
        return DecodedSequence(
            index=self.request.index,
            audio=audio.float().cpu().numpy().astype(np.float32, copy=False),
            frames=sum(1 for token in tokens if token == audio_token_id),
            reached_cap=reached_cap,
            tokens=list(tokens),
        )


class BatchDecoder:
    """Decodes a batch of VibeVoice prompts to audio with the model's own modules."""

    def __init__(self, model):
        self.model = model
        config = model.config
        generation_config = model.generation_config
        self.audio_token_id = int(config.audio_token_id)
        self.audio_bos_token_id = int(config.audio_bos_token_id)
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
        self.token_head = nn.Linear(lm_head.in_features, len(self.allowed_token_ids), bias=False)
        with torch.no_grad():
            self.token_head.weight.copy_(lm_head.weight[self.allowed_token_ids])
        self.token_head.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype).eval()
        self._allowed = torch.tensor(self.allowed_token_ids, device=lm_head.weight.device)

        self.noise_scheduler = model._build_default_noise_scheduler(generation_config)
        self._negative_start: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    # --- public ---------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(
        self,
        requests: list[DecodeRequest],
        guidance_scale: float,
        diffusion_steps: int,
        on_frame: Callable[[int, np.ndarray], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        force_tokens: Callable[[int, int], int | None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[DecodedSequence]:
        """Decode every request; results come back in request order.

        `on_frame(index, samples)` receives each sequence's audio frame by frame, as decoded.
        `should_stop()` is checked between frames; when true, every sequence ends there.
        `force_tokens(index, step)` may return a token to emit instead of the model's choice (tests
        use it to walk the speech-start/end paths with a checkpoint that never takes them).
        `on_step(frames)` is called after every step with the number of frames it decoded.
        """
        if not requests:
            return []
        model = self.model.model
        device = self.model.device
        finished: dict[int, _Sequence] = {}

        # Prompt: every sequence's embeddings, left-padded into one batch.
        embeds, sequences = [], []
        for request in requests:
            prompt_embeds, generator = self._prompt_embeds(request, device)
            embeds.append(prompt_embeds)
            sequences.append(_Sequence(request, generator))
        prompt_len = max(e.shape[0] for e in embeds)
        n = len(sequences)
        hidden_size = embeds[0].shape[-1]
        prompt = embeds[0].new_zeros(n, prompt_len, hidden_size)
        prompt_mask = torch.zeros(n, prompt_len, dtype=torch.long, device=device)
        for row, e in enumerate(embeds):
            prompt[row, prompt_len - e.shape[0] :] = e
            prompt_mask[row, prompt_len - e.shape[0] :] = 1
        del embeds
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        out = model.language_model(
            inputs_embeds=prompt,
            attention_mask=prompt_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        positive_hidden = out.last_hidden_state[:, -1]
        del prompt, out

        # The negative branch starts from a lone speech-start token at position 0: the same for
        # every sequence, so its hidden state and KV entry are computed once and copied in as the
        # negative rows' first (speculative) column.
        negative_hidden, start_kv = self._negative_start_state(device)
        negative_hidden = negative_hidden.expand(n, -1)
        for layer, (keys, values) in zip(cache.layers, start_kv, strict=True):
            negative_keys = torch.zeros_like(layer.keys)
            negative_values = torch.zeros_like(layer.values)
            negative_keys[:, :, -1:] = keys
            negative_values[:, :, -1:] = values
            layer.keys = torch.cat([layer.keys, negative_keys])
            layer.values = torch.cat([layer.values, negative_values])
        negative_mask = torch.zeros_like(prompt_mask)
        negative_mask[:, -1] = 1
        mask = torch.cat([prompt_mask, negative_mask])
        acoustic_cache = semantic_cache = None

        while sequences:
            # 1. Next token of every sequence (argmax among the allowed tokens).
            logits = self.token_head(positive_hidden).float()
            tokens = self._allowed[logits.argmax(dim=-1)]
            token_list = tokens.tolist()
            if force_tokens is not None:
                for row, seq in enumerate(sequences):
                    forced = force_tokens(seq.request.index, len(seq.tokens))
                    if forced is not None:
                        token_list[row] = forced
                tokens = torch.tensor(token_list, device=device)
            diffusing = [t == self.audio_token_id for t in token_list]
            speculative = mask.shape[1] - 1  # the negative rows' column from this step's pass

            # 2. The negative branch really saw this step's input only where the sequence diffuses.
            for row, seq in enumerate(sequences):
                seq.tokens.append(token_list[row])
                if diffusing[row]:
                    seq.negative_length += 1
                else:
                    mask[n + row, speculative] = 0
                if token_list[row] == self.audio_bos_token_id:
                    # Speech-start: the negative branch restarts from a single-token context (its
                    # next input sees only itself), as in the stock loop.
                    mask[n + row] = 0

            # 3. Diffusion, acoustic decode and semantic encode for the sequences that speak.
            next_embeds = model.get_input_embeddings()(tokens).unsqueeze(1)
            rows = [row for row in range(n) if diffusing[row]]
            if rows:
                index = torch.tensor(rows, device=device) if len(rows) < n else None
                if index is None:
                    condition = torch.cat([positive_hidden, negative_hidden])
                else:
                    condition = torch.cat([positive_hidden[index], negative_hidden[index]])
                generators = [sequences[row].generator for row in rows]
                latent = self._sample_latent(condition, generators, guidance_scale, diffusion_steps)
                audio, acoustic_cache = self._run_codec(
                    self._acoustic_decode, self._scale_latent(latent), acoustic_cache, rows, n
                )
                semantic, semantic_cache = self._run_codec(self._semantic_encode, audio, semantic_cache, rows, n)
                frame_embeds = model.multi_modal_projector(latent) + model.semantic_connector(semantic)
                if index is None:
                    next_embeds = frame_embeds.to(next_embeds.dtype)
                else:
                    next_embeds[index] = frame_embeds.to(next_embeds.dtype)
                frames = audio.reshape(len(rows), -1)
                host_frames = frames.float().cpu().numpy() if on_frame else None
                for k, row in enumerate(rows):
                    sequences[row].frames.append(frames[k])
                    if on_frame is not None:
                        on_frame(sequences[row].request.index, host_frames[k])

            if on_step is not None:
                on_step(len(rows))

            # 4. Which sequences end here: end token, frame cap, or a stop request.
            stop_all = bool(should_stop and should_stop())
            keep = [
                row
                for row, seq in enumerate(sequences)
                if not stop_all
                and token_list[row] not in self.eos_token_ids
                and len(seq.tokens) < seq.request.max_frames
            ]
            if len(keep) < n:
                for row, seq in enumerate(sequences):
                    if row not in keep:
                        finished[seq.request.index] = seq
                if not keep:
                    break
                keep_t = torch.tensor(keep, device=device)
                both = torch.cat([keep_t, keep_t + n])
                sequences = [sequences[row] for row in keep]
                next_embeds = next_embeds[keep_t]
                mask = mask[both]
                for layer in cache.layers:
                    layer.keys = layer.keys[both]
                    layer.values = layer.values[both]
                for codec_cache in (acoustic_cache, semantic_cache):
                    if codec_cache is not None:
                        for layer in codec_cache.layers.values():
                            layer.cache = layer.cache[keep_t]
                n = len(sequences)
                mask = self._trim_columns(cache, mask)

            # 5. One language-model pass for both branches of every sequence.
            mask = torch.cat([mask, mask.new_ones(2 * n, 1)], dim=1)
            position_ids = torch.tensor(
                [[seq.next_position] for seq in sequences] + [[seq.negative_length] for seq in sequences],
                device=device,
            )
            out = model.language_model(
                inputs_embeds=torch.cat([next_embeds, next_embeds]),
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state[:, -1]
            positive_hidden, negative_hidden = hidden[:n], hidden[n:]
            for seq in sequences:
                seq.next_position += 1

        for seq in sequences:
            finished.setdefault(seq.request.index, seq)
        return [finished[r.index].result(self.audio_token_id) for r in requests]

    # --- the prompt -------------------------------------------------------------------------

    def _prompt_embeds(self, request: DecodeRequest, device: torch.device) -> tuple[torch.Tensor, torch.Generator]:
        """The prompt's input embeddings (voice latents in the placeholder positions) and the
        sequence's generator, in the state the stock loop's global RNG has when frames start.

        The sigma-VAE noise of the voice latents is drawn from the global RNG inside the acoustic
        tokenizer's `encode`; it is drawn here, one sequence at a time, from the global RNG seeded
        with the sequence's seed (and restored afterwards), and the CPU RNG state it leaves behind
        becomes the sequence's generator for the frames, as in the stock loop.
        """
        model = self.model.model
        input_ids = request.input_ids.to(device).unsqueeze(0)
        embeds = model.get_input_embeddings()(input_ids)
        generator = torch.Generator()
        generator.manual_seed(request.seed)
        if request.input_values is None:
            return embeds[0], generator
        devices = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(request.seed)
            audio = model.get_audio_features(
                request.input_values.to(device, self.model.dtype),
                request.padding_mask.to(device),
                sample=True,
            ).pooler_output
            generator.set_state(torch.get_rng_state())
        placeholders = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, audio_features=audio)
        return embeds.masked_scatter(placeholders, audio.to(embeds.dtype))[0], generator

    def _negative_start_state(self, device) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        if self._negative_start is None:
            model = self.model.model
            token = torch.tensor([[self.audio_bos_token_id]], device=device)
            cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            out = model.language_model(
                inputs_embeds=model.get_input_embeddings()(token),
                position_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                past_key_values=cache,
                use_cache=True,
            )
            kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            self._negative_start = (out.last_hidden_state[:, -1].clone(), kv)
        return self._negative_start

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

    @staticmethod
    def _run_codec(run, inputs: torch.Tensor, cache, rows: list[int], n: int):
        """Run a streaming codec for the speaking rows only, so no other row's conv state advances."""
        if len(rows) == n:
            return run(inputs, cache)
        index = torch.tensor(rows, device=inputs.device)
        sub_cache = None
        if cache is not None:
            sub_cache = type(cache)()
            for key, layer in cache.layers.items():
                sub_layer = type(layer)()
                sub_layer.__dict__.update(layer.__dict__)
                sub_layer.cache = layer.cache[index].clone()
                sub_cache.layers[key] = sub_layer
        output, sub_cache = run(inputs, sub_cache)
        if cache is None:  # first use: every other row starts from the zero state
            cache = type(sub_cache)()
            for key, sub_layer in sub_cache.layers.items():
                layer = type(sub_layer)()
                layer.__dict__.update(sub_layer.__dict__)
                shape = (n, *sub_layer.cache.shape[1:])
                layer.cache = sub_layer.cache.new_zeros(shape)
                cache.layers[key] = layer
        for key, layer in cache.layers.items():
            layer.cache[index] = sub_cache.layers[key].cache
        return output, cache

    # --- cache bookkeeping --------------------------------------------------------------------

    @staticmethod
    def _trim_columns(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        """Drop leading cache columns no remaining row can see (left padding of finished rows)."""
        visible = mask.any(dim=0).nonzero()
        first = int(visible[0]) if visible.numel() else mask.shape[1]
        if first == 0:
            return mask
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        return mask[:, first:]
