"""Build a tiny VibeVoice checkpoint: the real architecture with small dimensions and random weights.

Model weights cannot be downloaded everywhere, so tests and the offline default load this
checkpoint through exactly the same `from_pretrained` path as the real 7B model. It keeps what
matters for the code that drives the model: the transformers-native layout (config, generation
config, safetensors, processor, tokenizer, chat template), the real 3200x codec ratio (7.5 frames
per second at 24 kHz), a byte-level BPE tokenizer with the Qwen special tokens VibeVoice uses, and
non-degenerate random weights. Its audio is noise.

Random weights never choose to emit speech on their own (argmax keeps picking speech-start), so
the generation config suppresses the start/end/eos tokens: every step then produces one frame and
the engine's per-chunk frame cap decides the length, exactly as it would stop a runaway real model.

    python tiny_checkpoint.py OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
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

# VibeVoice's prompt template, the same text the community processor builds by hand.
CHAT_TEMPLATE = """{%- set system_prompt = system_prompt | default(" Transform the text provided by various speakers into speech output, utilizing the distinct voice of each respective speaker.\\n") -%}
{{ system_prompt -}}
{%- set audio_bos_token = audio_bos_token | default("<|vision_start|>") %}
{%- set audio_eos_token = audio_eos_token | default("<|vision_end|>") %}
{%- set audio_token = audio_token | default("<|vision_pad|>") %}
{%- set ns = namespace(speakers_with_audio="") %}
{%- for message in messages %}
    {%- set role = message['role'] %}
    {%- set content = message['content'] %}
    {%- set has_audio = content | selectattr('type', 'equalto', 'audio') | list | length > 0 %}
    {%- if has_audio and role not in ns.speakers_with_audio %}
        {%- set ns.speakers_with_audio = ns.speakers_with_audio + role + "," %}
    {%- endif %}
{%- endfor %}

{%- if ns.speakers_with_audio %}
{{ " Voice input:\\n" }}
{%- for speaker in ns.speakers_with_audio.rstrip(',').split(',') %}
{%- if speaker %}
 Speaker {{ speaker }}:{{ audio_bos_token }}{{ audio_token }}{{ audio_eos_token }}{{ "\\n" }}
{%- endif %}
{%- endfor %}
{%- endif %}
 Text input:{{ "\\n" }}

{%- for message in messages %}
    {%- set role = message['role'] %}
    {%- set text_items = message['content'] | selectattr('type', 'equalto', 'text') | list %}
    {%- for item in text_items %}
 Speaker {{ role }}: {{ item['text'] }}{{ "\\n" }}
    {%- endfor %}
{%- endfor %}
 Speech output:{{ "\\n" }}{{ audio_bos_token }}"""

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


def randomize_weights(model: VibeVoiceForConditionalGeneration, seed: int) -> None:
    """Redraw every weight: the stock init zeroes the diffusion head's output layers (exact silence).

    Codec convolutions get fan-in scaled weights (gain 0.4) so the decoded noise has a speech-like
    level (RMS around 0.15) instead of vanishing or exploding through the conv stack.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".act.weight"):
                continue  # RMSNorm gains stay at 1
            if name.endswith(("latent_scaling_factor", "latent_bias_factor")):
                continue  # stay 1 and 0: latents pass through unscaled
            noise = torch.randn(param.shape, generator=generator)
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


def build_native(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the transformers-native ("-hf") layout to `out_dir` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = VibeVoiceForConditionalGeneration(config)
    randomize_weights(model, seed)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build_native(args.out_dir, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
