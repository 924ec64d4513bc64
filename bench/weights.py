"""Figure a: weight bytes read per second of generated audio, for the real VibeVoice-7B on a GPU; and
the bytes one compiled frame moves, with the static step's own attention against transformers' sdpa.

Decoding is memory-bandwidth bound: every module call reads that module's weights once, whatever
the batch. So the figure counts, with forward hooks on the tiny checkpoint, which modules run how
many times, and weighs each call by that module's parameter bytes in the real 7B in bf16 (built
from its configuration on the meta device: no weights needed). An embedding lookup reads only the
rows it gathers, and so does the decode loop's token head (the lm_head rows of VibeVoice's four
tokens). KV-cache and activation traffic is not counted.

The compiled static step (engine/framestep.py) is counted differently, since it calls no module as
a whole: every operator of one frame, run on the meta device in bf16 (shapes only) for the real 7B and
1.5B at a full KV capacity step (1024 columns), under bench/step_counters.py's byte counter (weights,
KV cache, activations, unfused). "Before" is its graph with transformers' sdpa, which under
torch.compile copies the KV cache once per query head (`repeat_kv`); "after" is its own attention
(engine/attention.py). tests/engine/test_attention.py checks both counts on the compiled graph itself.

The WEIGHTS=int8 rows weigh the same calls with the language model's linear layers at one byte per
weight plus their per-row scales (engine/weights.planned_bytes), as a compiled step reads them (the
eager loop on a GPU widens each int8 weight to bf16 in memory before multiplying, which reads more).

The real configurations (7B, and the 1.5B for `make gpu-bench`) live here, in one place.
"""

from __future__ import annotations

import torch

from bench.common import Row

FRAMES_PER_CHUNK = 150  # a 300-character chunk is about 20 s of speech: 150 frames of 133 ms
CHUNKS = 8
DIFFUSION_STEPS = 10  # the default
H100_BYTES_PER_SECOND = 3.35e12  # HBM3 bandwidth of an H100 SXM


def real_7b_config():
    """VibeVoice-7B's architecture: Qwen2.5-7B, the sigma-VAE codecs, a 4-layer diffusion head."""
    from transformers import (
        Qwen2Config,
        VibeVoiceAcousticTokenizerConfig,
        VibeVoiceAcousticTokenizerEncoderConfig,
        VibeVoiceConfig,
    )
    from transformers.models.vibevoice.configuration_vibevoice import VibeVoiceDiffusionHeadConfig

    text = Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    return VibeVoiceConfig(
        text_config=text,
        audio_config=VibeVoiceAcousticTokenizerConfig(),  # defaults: 32 filters, depths 3-3-3-3-3-3-8
        semantic_model_config=VibeVoiceAcousticTokenizerEncoderConfig(hidden_size=128),
        diffusion_head_config=VibeVoiceDiffusionHeadConfig(num_hidden_layers=4, intermediate_size=3 * 3584),
    )


def real_1_5b_config():
    """VibeVoice-1.5B: Qwen2.5-1.5B (tied embeddings), the 7B's codecs, a 4-layer diffusion head."""
    from transformers import (
        Qwen2Config,
        VibeVoiceAcousticTokenizerConfig,
        VibeVoiceAcousticTokenizerEncoderConfig,
        VibeVoiceConfig,
    )
    from transformers.models.vibevoice.configuration_vibevoice import VibeVoiceDiffusionHeadConfig

    text = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=65536,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    return VibeVoiceConfig(
        text_config=text,
        audio_config=VibeVoiceAcousticTokenizerConfig(),
        semantic_model_config=VibeVoiceAcousticTokenizerEncoderConfig(hidden_size=128),
        diffusion_head_config=VibeVoiceDiffusionHeadConfig(num_hidden_layers=4, intermediate_size=3 * 1536),
    )


def module_bytes(model, weights: str = "bf16") -> dict[str, int]:
    """Parameter bytes (bf16) of each module the loops call; '*_row' entries are per gathered row.

    `weights` (WEIGHTS: bf16, int8, fp8) sizes the language model's linear layers as engine/weights.py
    quantizes them (1 byte per weight plus per-row scales); everything else stays in bf16."""
    from engine.weights import planned_bytes

    def size(module) -> int:
        return sum(p.numel() for p in module.parameters()) * 2

    inner = model.model
    hidden = model.config.text_config.hidden_size
    saved = planned_bytes(model, "bf16") - planned_bytes(model, weights)  # only the language model's layers
    return {
        "language_model": size(inner.language_model) - size(inner.language_model.embed_tokens) - saved,
        "embedding_row": hidden * 2,
        "lm_head": size(model.lm_head),
        "token_head_row": hidden * 2,
        "diffusion_head": size(inner.diffusion_head),
        "acoustic_encoder": size(inner.audio_tower.encoder),
        "acoustic_decoder": size(inner.audio_tower.decoder),
        "semantic_encoder": size(inner.semantic_tokenizer_encoder),
        "acoustic_connector": size(inner.multi_modal_projector),
        "semantic_connector": size(inner.semantic_connector),
    }


def real_module_bytes(weights: str = "bf16") -> dict[str, int]:
    return module_bytes(meta_model(real_7b_config()), weights)


def meta_model(config, dtype: torch.dtype = torch.bfloat16):
    """A model of this configuration on the meta device (shapes and dtypes, no weights), in `dtype`."""
    from transformers import VibeVoiceForConditionalGeneration

    from tools.tiny_checkpoint import build_generation_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = VibeVoiceForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = build_generation_config(config)  # the noise scheduler's settings
    return model.eval()


def compiled_frame_rows() -> tuple[list[Row], dict]:
    """Bytes one compiled frame moves, own attention against transformers' sdpa, 7B and 1.5B at batch 1 and 16."""
    from bench.step_counters import frame_bytes
    from engine.decoder import BatchDecoder
    from engine.framestep import CAPACITY_STEP, FrameStep

    rows, detail = [], {}
    for name, config in (("7B", real_7b_config), ("1.5B", real_1_5b_config)):
        step = FrameStep(BatchDecoder(meta_model(config())), compile_frame=False)
        for batch in (1, 16):
            after, before = (frame_bytes(step, batch, CAPACITY_STEP["cuda"], DIFFUSION_STEPS, packed=packed)
                             for packed in (True, False))  # fmt: skip
            note = "" if rows else "baseline: that graph with transformers' sdpa (repeat_kv); 1024 KV columns, unfused"
            rows.append(Row("a", f"bytes moved per compiled frame, {name} at batch {batch} (GB)", after / 1e9,
                            before / 1e9, "GB", None, note))  # fmt: skip
            detail[f"{name}_batch_{batch}"] = {"own_attention": after, "transformers_sdpa": before}
    return rows, detail


def diffusion_head_int8_bytes() -> int:
    """The 7B's diffusion head with its linear layers in int8 too (a what-if: WEIGHTS keeps it in bf16)."""
    head = meta_model(real_7b_config()).model.diffusion_head
    linear = [m.weight.shape for m in head.modules() if isinstance(m, torch.nn.Linear)]
    return sum(p.numel() for p in head.parameters()) * 2 - sum(rows * (columns - 10) for rows, columns in linear)


class TokenGuidanceCounter:
    """Counts the extra LM passes of transformers' generic token-level CFG processor."""

    def __enter__(self) -> TokenGuidanceCounter:
        from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor as cfg

        self.calls = 0
        self._cls, self._original = cfg, cfg.get_unconditional_logits

        def counted(processor, input_ids):
            self.calls += 1
            return self._original(processor, input_ids)

        cfg.get_unconditional_logits = counted
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.get_unconditional_logits = self._original


class CallCounter:
    """Counts module calls on the tiny model (a batched call counts once) and gathered rows."""

    def __init__(self, engine):
        inner = engine.model.model
        self.modules = {
            "language_model": inner.language_model,
            "lm_head": engine.model.lm_head,
            "diffusion_head": inner.diffusion_head,
            "acoustic_encoder": inner.audio_tower.encoder,
            "acoustic_decoder": inner.audio_tower.decoder,
            "semantic_encoder": inner.semantic_tokenizer_encoder,
            "acoustic_connector": inner.multi_modal_projector,
            "semantic_connector": inner.semantic_connector,
        }
        self.row_modules = {
            "embedding_row": inner.language_model.embed_tokens,
            "token_head_row": engine.decoder.token_head,
        }
        self.calls: dict[str, int] = {}
        self._handles = []

    def __enter__(self) -> CallCounter:
        self.calls = dict.fromkeys([*self.modules, *self.row_modules], 0)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._count(name)))
        self._handles.append(self.row_modules["embedding_row"].register_forward_hook(self._rows_embedded))
        self._handles.append(self.row_modules["token_head_row"].register_forward_hook(self._rows_of_head))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count(self, name: str):
        def hook(module, args, output) -> None:
            self.calls[name] += 1

        return hook

    def _rows_embedded(self, module, args, output) -> None:
        self.calls["embedding_row"] += int(args[0].numel())

    def _rows_of_head(self, module, args, output) -> None:
        self.calls["token_head_row"] += int(module.out_features)

    def weighted_bytes(self, sizes: dict[str, int]) -> int:
        return weighted_bytes(self.calls, sizes)


def weighted_bytes(calls: dict[str, int], sizes: dict[str, int]) -> int:
    """Weight bytes read: each module's calls (or gathered rows) times its bytes."""
    return sum(count * sizes[name] for name, count in calls.items())


def chunk_text(number: int) -> str:
    """About 250 characters, so the text's frame cap does not cut the chunk short."""
    return (
        f"Part {number}. The committee met again on Thursday to review the budget, the schedule and the "
        "list of open questions. Everyone agreed that the second phase should start in spring, once the "
        "survey results are in and the new team has settled."
    )


def measure(workspace) -> tuple[list[Row], dict]:
    from inference import GenerationParams
    from text.script import Chunk, Turn

    engine = workspace.engine()
    voices = workspace.voices()
    sizes = real_module_bytes()
    params = GenerationParams(1.3, DIFFUSION_STEPS, seed=7, max_new_tokens=FRAMES_PER_CHUNK)
    chunks = [Chunk(i, (Turn(i % 2, chunk_text(i)),)) for i in range(CHUNKS)]
    runs = {}
    for name, run in (
        ("stock generate, 1 chunk", lambda: [engine.generate_chunk(chunks[0], voices, params)]),
        ("own loop, batch 1", lambda: engine.synthesize(chunks[:1], voices, params)),
        (f"own loop, {CHUNKS} chunks as one batch", lambda: engine.synthesize(chunks, voices, params)),
    ):
        engine.batch_size = CHUNKS
        with CallCounter(engine) as counter, TokenGuidanceCounter() as token_guidance:
            results = run()
        audio_seconds = sum(r.audio.size for r in results) / engine.sample_rate
        assert all(r.frames == FRAMES_PER_CHUNK for r in results), "every chunk must reach the frame count"
        runs[name] = {
            "calls": dict(counter.calls),
            "audio_seconds": audio_seconds,
            "bytes_per_audio_second": counter.weighted_bytes(sizes) / audio_seconds,
            "token_guidance_passes": token_guidance.calls,
            "token_guidance_bytes_per_audio_second": token_guidance.calls
            * (sizes["language_model"] + sizes["lm_head"])
            / audio_seconds,
        }
    engine.batch_size = 0
    stock, single, batched = (runs[name]["bytes_per_audio_second"] for name in runs)
    int8_rows, int8_detail = int8_figures(runs, sizes)
    # transformers' generate also applies its generic token-level CFG (UnbatchedClassifierFree-
    # GuidanceLogitsProcessor, added because guidance_scale != 1): a third LM pass per frame that
    # VibeVoice's own inference code does not run. The second row compares against stock without it.
    stock_two_passes = stock - runs["stock generate, 1 chunk"]["token_guidance_bytes_per_audio_second"]
    gigabytes = 1e9
    rows = [
        Row("a", "weight reads per audio second, own loop at batch 1 (GB/s of audio)", single / gigabytes,
            stock / gigabytes, "GB", "<= 0.7", "7B bf16 module sizes x calls counted on the tiny model"),
        Row("a", "same, against stock without its token-level CFG pass (two LM passes per frame)",
            single / gigabytes, stock_two_passes / gigabytes, "GB", "<= 0.7"),
        Row("a", f"weight reads per audio second, per chunk, {CHUNKS} chunks batched (GB)", batched / gigabytes,
            stock / gigabytes, "GB", "<= 0.15"),
        Row("a", "bandwidth floor RTF on one H100, own loop at batch 1", single / H100_BYTES_PER_SECOND,
            stock / H100_BYTES_PER_SECOND, "RTF", None, "weight bytes / 3.35 TB/s; stock generate is the baseline"),
        Row("a", f"bandwidth floor RTF on one H100, per chunk, {CHUNKS} chunks batched",
            batched / H100_BYTES_PER_SECOND, stock / H100_BYTES_PER_SECOND, "RTF", None),
        *int8_rows,
    ]  # fmt: skip
    frame_rows, frame_detail = compiled_frame_rows()
    detail = {
        "module_bytes_bf16": sizes,
        **int8_detail,
        "frames_per_chunk": FRAMES_PER_CHUNK,
        "diffusion_steps": DIFFUSION_STEPS,
        "runs": runs,
        "compiled_frame_bytes": frame_detail,
    }
    return rows + frame_rows, detail


def int8_figures(runs: dict, sizes: dict[str, int]) -> tuple[list[Row], dict]:
    """WEIGHTS=int8 against bf16 from the same counted calls: only the sizes of the language model's
    linear layers change. A frame at the default 10 diffusion steps reads the diffusion head ten
    times (13.4 GB in bf16, as much as the language model's 13.1 GB), and that stays bf16; the last
    row shows what the head in int8 too would give (not offered)."""
    int8 = real_module_bytes("int8")
    head_too = {**int8, "diffusion_head": diffusion_head_int8_bytes()}

    def per_second(run: str, module_sizes: dict[str, int]) -> float:
        return weighted_bytes(runs[run]["calls"], module_sizes) / runs[run]["audio_seconds"] / 1e9

    single, batched = "own loop, batch 1", f"own loop, {CHUNKS} chunks as one batch"
    note = "baseline: WEIGHTS=bf16, the same calls; int8: the language model's linear layers (head, codecs bf16)"
    rows = [
        Row("a", "weight reads per audio second, own loop at batch 1, WEIGHTS=int8 (GB)", per_second(single, int8),
            per_second(single, sizes), "GB", "<= 0.6", note),
        Row("a", f"same, per chunk, {CHUNKS} chunks batched, WEIGHTS=int8 (GB)", per_second(batched, int8),
            per_second(batched, sizes), "GB", None),
        Row("a", "same at batch 1 if the diffusion head's linear layers were int8 too (not offered)",
            per_second(single, head_too), per_second(single, sizes), "GB", None,
            "a what-if: WEIGHTS quantizes the language model only"),
    ]  # fmt: skip
    return rows, {"module_bytes_int8": int8, "diffusion_head_int8_bytes": head_too["diffusion_head"]}
