"""Build a tiny VibeVoice checkpoint: the real architecture with small dimensions and random weights.

Model weights cannot be downloaded everywhere, so tests and the offline default load this
checkpoint through exactly the same `from_pretrained` path as the real 7B model. It keeps what
matters for the code that drives the model: the transformers-native layout (config, generation
config, safetensors, processor, tokenizer, chat template), the real 3200x codec ratio (7.5 frames
per second at 24 kHz), a byte-level BPE tokenizer with the Qwen special tokens VibeVoice uses, and
non-degenerate random weights. Its audio is noise.

`build_community` writes the same model (same weights for the same seed) in the original community
layout of `vibevoice/VibeVoice-7B`, for the converter and the comparison with the reference package.

Random weights never choose to emit speech on their own (argmax keeps picking speech-start), so
the generation config suppresses the start/end/eos tokens: every step then produces one frame and
the engine's per-chunk frame cap decides the length, exactly as it would stop a runaway real model.

    python -m tools.tiny_checkpoint OUT_DIR [--seed N] [--community]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2Config,
    Qwen2Tokenizer,
    VibeVoiceAcousticTokenizerConfig,
    VibeVoiceAcousticTokenizerEncoderConfig,
    VibeVoiceAcousticTokenizerFeatureExtractor,
    VibeVoiceConfig,
    VibeVoiceForConditionalGeneration,
    VibeVoiceProcessor,
)
from transformers.models.vibevoice.configuration_vibevoice import VibeVoiceDiffusionHeadConfig

from deploy.convert_checkpoint import CHAT_TEMPLATE

# Qwen2's pre-tokenizer split (byte-level BPE runs on these pieces).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2.5 special tokens, in their real order. VibeVoice uses <|endoftext|> (eos/pad),
# <|vision_start|> (speech start), <|vision_end|> (speech end), <|vision_pad|> (one per frame)
# and <|image_pad|> (the community processor's batch padding).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

LM_VOCAB_SIZE = 512
CODEC_RATIOS = [2, 2, 4, 5, 5, 8]  # product 3200: 7.5 frames per second at 24 kHz, as in the real model

# A small fixed corpus for the BPE merges: the prompt's own words plus ordinary English.
_CORPUS = """
 Transform the text provided by various speakers into speech output, utilizing the distinct voice of each respective speaker.
 Voice input:
 Speaker 0: Speaker 1: Speaker 2: Speaker 3:
 Text input:
 Speech output:
Hello and welcome to the show. Today we are talking about speech, voices and the people who make them.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
It was a bright cold day in April, and the clocks were striking thirteen.
Thanks so much for having me. You're absolutely right, this question always brings out strong feelings.
Numbers like 3.14, 42 and 2025 appear in articles; so do names such as Dr. Smith and Mr. Jones.
What do you think? I think that is a wonderful idea! Let's get started, shall we?
""".strip()


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer shaped like Qwen2's: same pre-tokenizer, NFC, Qwen special tokens."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LM_VOCAB_SIZE - len(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer)
    backend.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.padding_side = "left"  # batched prompts must be left-padded
    return tokenizer


def build_config(tokenizer: Qwen2Tokenizer) -> VibeVoiceConfig:
    """VibeVoice's real structure (Qwen2 LM, sigma-VAE codec, semantic encoder, diffusion head), tiny."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_config = Qwen2Config(
        vocab_size=LM_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    codec = {"num_filters": 4, "depths": [1] * 7, "downsampling_ratios": CODEC_RATIOS}
    return VibeVoiceConfig(
        text_config=text_config,
        audio_config=VibeVoiceAcousticTokenizerConfig(hidden_size=64, **codec),
        semantic_model_config=VibeVoiceAcousticTokenizerEncoderConfig(hidden_size=128, **codec),
        diffusion_head_config=VibeVoiceDiffusionHeadConfig(num_hidden_layers=1, intermediate_size=3 * 64),
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        audio_bos_token_id=ids["<|vision_start|>"],
        audio_eos_token_id=ids["<|vision_end|>"],
        audio_token_id=ids["<|vision_pad|>"],
    )


def randomize_weights(model: VibeVoiceForConditionalGeneration, seed: int, device: str | torch.device = "cpu") -> None:
    """Redraw every weight: the stock init zeroes the diffusion head's output layers (exact silence).

    Codec convolutions get fan-in scaled weights (gain 0.4) so the decoded noise has a speech-like
    level (RMS around 0.15) instead of vanishing or exploding through the conv stack. `device` is
    where the noise is drawn (the model's own device: the GPU benchmark draws a 7B's weights there).
    """
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".act.weight"):
                continue  # RMSNorm gains stay at 1
            if name.endswith(("latent_scaling_factor", "latent_bias_factor")):
                continue  # stay 1 and 0: latents pass through unscaled
            noise = torch.randn(param.shape, generator=generator, device=device)
            in_codec = "audio_tower" in name or "semantic_tokenizer_encoder" in name
            if in_codec and param.ndim >= 2:
                fan_in = param.shape[1] * (param.shape[2] if param.ndim == 3 else 1)
                if "convtr" in name:  # transposed conv: input channels are dim 0, stride 8 overlap
                    fan_in = param.shape[0] * param.shape[2] / 8
                param.copy_(noise * 0.4 / math.sqrt(fan_in))
            elif name.endswith("gamma"):  # ConvNeXt layer scales (1e-6 by default: blocks would vanish)
                param.copy_(0.5 + 0.1 * noise)
            else:
                param.copy_(noise * 0.02)


def build_generation_config(config: VibeVoiceConfig) -> GenerationConfig:
    generation_config = GenerationConfig(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    generation_config.noise_scheduler_class = "DPMSolverMultistepScheduler"
    generation_config.noise_scheduler_config = {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "num_train_timesteps": 1000,
    }
    generation_config.num_diffusion_steps = 10
    generation_config.guidance_scale = 1.3
    # Random weights would never emit a frame: allow only the "next frame" token.
    generation_config.suppress_tokens = [config.eos_token_id, config.audio_eos_token_id, config.audio_bos_token_id]
    generation_config._from_model_config = False  # else the VibeVoice fields are dropped on reload
    return generation_config


def build_model(seed: int) -> tuple[Qwen2Tokenizer, VibeVoiceConfig, VibeVoiceForConditionalGeneration]:
    """The tokenizer, config and randomly weighted model that both layouts are written from."""
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = VibeVoiceForConditionalGeneration(config)
    randomize_weights(model, seed)
    return tokenizer, config, model


def build_native(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the transformers-native ("-hf") layout to `out_dir` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, config, model = build_model(seed)
    model.generation_config = build_generation_config(config)
    model.save_pretrained(out)
    processor = VibeVoiceProcessor(
        feature_extractor=VibeVoiceAcousticTokenizerFeatureExtractor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    (out / "tiny_checkpoint.json").write_text(
        json.dumps({"seed": seed, "note": "random weights: the audio is noise"}, indent=2) + "\n"
    )
    return out


# --- the community layout ------------------------------------------------------------------------

# Native tensor name -> community tensor name (the inverse of convert_checkpoint.native_name, written
# from the community package's module tree so that the two can check each other).
_COMMUNITY_NAMES = [
    (r"model\.latent_(scaling|bias)_factor", r"model.speech_\1_factor"),
    (r"model\.audio_tower\.(encoder|decoder)\.(.*)", r"model.acoustic_tokenizer.\1.\2"),
    (r"model\.semantic_tokenizer_encoder\.(.*)", r"model.semantic_tokenizer.encoder.\1"),
    (r"model\.multi_modal_projector\.(.*)", r"model.acoustic_connector.\1"),
    (r"(.*_connector)\.linear_1\.(.*)", r"\1.fc1.\2"),
    (r"(.*_connector)\.act\.(.*)", r"\1.norm.\2"),
    (r"(.*_connector)\.linear_2\.(.*)", r"\1.fc2.\2"),
    (r"model\.diffusion_head\.timestep_proj\.fc1\.(.*)", r"model.prediction_head.t_embedder.mlp.0.\1"),
    (r"model\.diffusion_head\.timestep_proj\.fc2\.(.*)", r"model.prediction_head.t_embedder.mlp.2.\1"),
    (r"model\.diffusion_head\.layers\.(\d+)\.linear\.(.*)", r"model.prediction_head.layers.\1.adaLN_modulation.1.\2"),
    (r"model\.diffusion_head\.final_layer\.linear_1\.(.*)", r"model.prediction_head.final_layer.adaLN_modulation.1.\1"),
    (r"model\.diffusion_head\.final_layer\.linear_2\.(.*)", r"model.prediction_head.final_layer.linear.\1"),
    (r"model\.diffusion_head\.(.*)", r"model.prediction_head.\1"),
    # Codec stems are layer 0 of the community down/upsampling lists and stages; later layers shift by one.
    (r"(.*coder)\.stem\.conv\.conv\.(.*)", r"\1.STEM_CONV.\2"),
    (r"(.*coder)\.stem\.stage\.(.*)", r"\1.stages.0.\2"),
    (r"(.*coder)\.head\.conv\.(.*)", r"\1.head.conv.conv.\2"),
    (r"(.*)\.mixer\.conv\.(.*)", r"\1.mixer.conv.conv.conv.\2"),
]  # fmt: skip


def community_name(native: str) -> str:
    """The community package's name for a native tensor name."""
    name = native
    for pattern, replacement in _COMMUNITY_NAMES:
        name = re.sub(f"^{pattern}$", replacement, name)
    part = "downsample_layers" if ".encoder." in name else "upsample_layers"
    name = name.replace("STEM_CONV", f"{part}.0.0.conv.conv")

    def shifted(match: re.Match) -> str:
        index = int(match[2]) + 1
        if match[3] == "stage":
            return f"{match[1]}.stages.{index}."
        return f"{match[1]}.{part}.{index}.0.{match[3]}."

    return re.sub(r"(.*coder)\.conv_layers\.(\d+)\.(stage|conv|convtr)\.", shifted, name)


def _community_codec(config, vae_dim: int, fix_std: float, dist: str) -> dict:
    values = {
        "causal": True, "channels": config.channels, "conv_bias": True, "conv_norm": "none", "corpus_normalize": 0.0,
        "disable_last_norm": True, "encoder_depths": "-".join(str(d) for d in config.depths),
        "encoder_n_filters": config.num_filters, "encoder_ratios": list(reversed(config.downsampling_ratios)),
        "fix_std": fix_std, "layer_scale_init_value": config.layer_scale_init_value, "layernorm": "RMSNorm",
        "layernorm_elementwise_affine": True, "layernorm_eps": config.rms_norm_eps, "mixer_layer": "depthwise_conv",
        "pad_mode": "constant", "std_dist_type": dist, "vae_dim": vae_dim, "weight_init_value": config.initializer_range,
    }  # fmt: skip
    return values


def community_config(config: VibeVoiceConfig, generation_config: GenerationConfig) -> dict:
    """The community config.json of the same model (fields as in vibevoice/VibeVoice-7B)."""
    text, head = config.text_config, config.diffusion_head_config
    acoustic = _community_codec(config.audio_config, config.audio_config.hidden_size, 0.5, "gaussian")
    acoustic["fix_std"] = config.audio_config.vae_std * 0.8  # the native vae_std is fix_std / 0.8
    acoustic.update(model_type="vibevoice_acoustic_tokenizer", decoder_depths=None,
                    decoder_n_filters=config.audio_config.num_filters, decoder_ratios=acoustic["encoder_ratios"])  # fmt: skip
    semantic = _community_codec(config.semantic_model_config, config.semantic_model_config.hidden_size, 0, "none")
    semantic["model_type"] = "vibevoice_semantic_tokenizer"
    scheduler = generation_config.noise_scheduler_config
    return {
        "acoustic_tokenizer_config": acoustic,
        "acoustic_vae_dim": config.audio_config.hidden_size,
        "architectures": ["VibeVoiceForConditionalGeneration"],
        "decoder_config": {
            "attention_dropout": text.attention_dropout, "hidden_act": text.hidden_act, "hidden_size": text.hidden_size,
            "initializer_range": text.initializer_range, "intermediate_size": text.intermediate_size,
            "max_position_embeddings": text.max_position_embeddings, "max_window_layers": text.max_window_layers,
            "model_type": "qwen2", "num_attention_heads": text.num_attention_heads,
            "num_hidden_layers": text.num_hidden_layers, "num_key_value_heads": text.num_key_value_heads,
            "rms_norm_eps": text.rms_norm_eps, "rope_scaling": None, "rope_theta": text.rope_parameters["rope_theta"],
            "sliding_window": text.sliding_window, "tie_word_embeddings": text.tie_word_embeddings,
            "use_cache": True, "use_sliding_window": text.use_sliding_window, "vocab_size": text.vocab_size,
        },
        "diffusion_head_config": {
            "ddpm_batch_mul": 4, "ddpm_beta_schedule": "cosine",
            "ddpm_num_inference_steps": generation_config.num_diffusion_steps,
            "ddpm_num_steps": scheduler["num_train_timesteps"], "diffusion_type": "ddpm",
            "head_ffn_ratio": head.intermediate_size / head.hidden_size, "head_layers": head.num_hidden_layers,
            "hidden_size": head.hidden_size, "latent_size": head.latent_size, "model_type": "vibevoice_diffusion_head",
            "prediction_type": scheduler["prediction_type"], "rms_norm_eps": head.rms_norm_eps,
            "speech_vae_dim": head.latent_size,
        },
        "model_type": "vibevoice",
        "semantic_tokenizer_config": semantic,
        "semantic_vae_dim": config.semantic_model_config.hidden_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }  # fmt: skip


def build_community(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model in the original community layout (as `vibevoice/VibeVoice-7B` has it).

    The weights equal `build_native`'s for the same seed. Like the real repository it has no tokenizer:
    preprocessor_config.json names one (here a local folder whose name contains "qwen", which the
    community processor requires). The tensors are split over two shards with an index, as in the real
    repository. generation_config.json only carries the suppressed tokens that random weights need.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, config, model = build_model(seed)
    generation_config = build_generation_config(config)

    tensors = {community_name(name): tensor.contiguous() for name, tensor in model.state_dict().items()}
    shards: dict[str, dict[str, torch.Tensor]] = {
        "model-00001-of-00002.safetensors": {},
        "model-00002-of-00002.safetensors": {},
    }
    for name, tensor in tensors.items():
        shard = (
            "model-00001-of-00002.safetensors"
            if name.startswith("model.language_model.")
            else "model-00002-of-00002.safetensors"
        )
        shards[shard][name] = tensor
    weight_map = {}
    for shard, part in shards.items():
        save_file(part, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(community_config(config, generation_config), indent=2) + "\n")
    suppress = {"pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
                "suppress_tokens": generation_config.suppress_tokens}  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps(suppress, indent=2) + "\n")

    tokenizer_dir = (out / "tokenizer-qwen2.5-tiny").resolve()
    tokenizer.save_pretrained(tokenizer_dir)
    preprocessor = {
        "processor_class": "VibeVoiceProcessor",
        "speech_tok_compress_ratio": config.audio_config.hop_length,
        "db_normalize": True,
        "audio_processor": {"feature_extractor_type": "VibeVoiceTokenizerProcessor", "sampling_rate": 24000,
                            "normalize_audio": True, "target_dB_FS": -25, "eps": 1e-6},
        "language_model_pretrained_name": str(tokenizer_dir),
    }  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "tiny_checkpoint.json").write_text(
        json.dumps({"seed": seed, "layout": "community", "note": "random weights: the audio is noise"}, indent=2) + "\n"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--community", action="store_true", help="write the original community layout")
    args = parser.parse_args()
    build = build_community if args.community else build_native
    print(build(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
