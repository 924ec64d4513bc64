"""Convert a community-layout VibeVoice checkpoint to the transformers-native ("-hf") layout.

The community layout (e.g. `vibevoice/VibeVoice-7B`, read by the `vibevoice` package) has a config with
`decoder_config` / `acoustic_tokenizer_config` / `semantic_tokenizer_config` / `diffusion_head_config`,
sharded safetensors under the community module names, and a preprocessor config that names the Qwen2.5
tokenizer instead of shipping it. transformers' `VibeVoiceForConditionalGeneration` needs the native
layout: its own config, module names, generation config, processor, tokenizer and chat template.

Every tensor is renamed one-to-one and written unchanged (same shape, same dtype, same bytes); a tensor
that no rule maps, or a native tensor that nothing fills, stops the conversion. Shards are converted one
at a time, so memory stays at one shard even for the 7B model.

    python -m deploy.convert_checkpoint SRC DST [--tokenizer PATH_OR_NAME]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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

# The special tokens VibeVoice uses, looked up in the tokenizer (Qwen2.5 ids in the real model).
SPEECH_START, SPEECH_END, SPEECH_PAD, END_OF_TEXT = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|endoftext|>",
)

# Community defaults that the native classes hard-wire: a checkpoint that differs cannot be converted.
_CODEC_FIXED = {
    "causal": True,
    "channels": 1,
    "conv_norm": "none",
    "pad_mode": "constant",
    "mixer_layer": "depthwise_conv",
    "layernorm": "RMSNorm",
    "layernorm_elementwise_affine": True,
    "disable_last_norm": True,
    "conv_bias": True,
}


class ConversionError(RuntimeError):
    """The checkpoint cannot be converted; the message says which tensor or setting is the problem."""


# --- tensor names -------------------------------------------------------------------------------


def _shift(match: re.Match, group: int) -> str:
    """Community codecs count the stem as layer 0; the native ones name it `stem` and count from 0 after it."""
    return str(int(match.group(group)) - 1)


def _codec_rules(community: str, parts: dict[str, str]) -> list[tuple[str, Callable[[re.Match], str]]]:
    """Renames inside one codec; `parts` maps "encoder"/"decoder" to the native module path of each part."""
    c, part = re.escape(community), "(" + "|".join(parts) + ")"
    block = r"((?:norm|ffn_norm|ffn\.linear[12])\.\w+|gamma|ffn_gamma)"
    rules = [
        (rf"{c}\.encoder\.downsample_layers\.0\.0\.conv\.conv\.(\w+)", lambda m: f"{parts['encoder']}.stem.conv.conv.{m[1]}"),
        (rf"{c}\.encoder\.downsample_layers\.([1-9]\d*)\.0\.conv\.conv\.(\w+)",
         lambda m: f"{parts['encoder']}.conv_layers.{_shift(m, 1)}.conv.conv.{m[2]}"),
        (rf"{c}\.{part}\.stages\.0\.(\d+)\.mixer\.conv\.conv\.conv\.(\w+)",
         lambda m: f"{parts[m[1]]}.stem.stage.{m[2]}.mixer.conv.{m[3]}"),
        (rf"{c}\.{part}\.stages\.([1-9]\d*)\.(\d+)\.mixer\.conv\.conv\.conv\.(\w+)",
         lambda m: f"{parts[m[1]]}.conv_layers.{_shift(m, 2)}.stage.{m[3]}.mixer.conv.{m[4]}"),
        (rf"{c}\.{part}\.stages\.0\.(\d+)\.{block}", lambda m: f"{parts[m[1]]}.stem.stage.{m[2]}.{m[3]}"),
        (rf"{c}\.{part}\.stages\.([1-9]\d*)\.(\d+)\.{block}",
         lambda m: f"{parts[m[1]]}.conv_layers.{_shift(m, 2)}.stage.{m[3]}.{m[4]}"),
        (rf"{c}\.{part}\.head\.conv\.conv\.(\w+)", lambda m: f"{parts[m[1]]}.head.conv.{m[2]}"),
    ]  # fmt: skip
    if "decoder" in parts:
        rules += [
            (rf"{c}\.decoder\.upsample_layers\.0\.0\.conv\.conv\.(\w+)", lambda m: f"{parts['decoder']}.stem.conv.conv.{m[1]}"),
            (rf"{c}\.decoder\.upsample_layers\.([1-9]\d*)\.0\.convtr\.convtr\.(\w+)",
             lambda m: f"{parts['decoder']}.conv_layers.{_shift(m, 1)}.convtr.convtr.{m[2]}"),
        ]  # fmt: skip
    return rules


def _connector_rules(community: str, native: str) -> list[tuple[str, Callable[[re.Match], str]]]:
    parts = {"fc1": "linear_1", "norm": "act", "fc2": "linear_2"}
    return [(rf"{re.escape(community)}\.(fc1|norm|fc2)\.(\w+)", lambda m: f"{native}.{parts[m[1]]}.{m[2]}")]


_RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"model\.language_model\.(.+)", lambda m: f"model.language_model.{m[1]}"),
    (r"lm_head\.weight", lambda m: "lm_head.weight"),
    (r"model\.speech_scaling_factor", lambda m: "model.latent_scaling_factor"),
    (r"model\.speech_bias_factor", lambda m: "model.latent_bias_factor"),
    *_codec_rules("model.acoustic_tokenizer", {"encoder": "model.audio_tower.encoder", "decoder": "model.audio_tower.decoder"}),
    # The native semantic model is the encoder alone, without an `.encoder` level.
    *_codec_rules("model.semantic_tokenizer", {"encoder": "model.semantic_tokenizer_encoder"}),
    *_connector_rules("model.acoustic_connector", "model.multi_modal_projector"),
    *_connector_rules("model.semantic_connector", "model.semantic_connector"),
    (r"model\.prediction_head\.(noisy_images_proj|cond_proj)\.weight", lambda m: f"model.diffusion_head.{m[1]}.weight"),
    (r"model\.prediction_head\.t_embedder\.mlp\.0\.weight", lambda m: "model.diffusion_head.timestep_proj.fc1.weight"),
    (r"model\.prediction_head\.t_embedder\.mlp\.2\.weight", lambda m: "model.diffusion_head.timestep_proj.fc2.weight"),
    (r"model\.prediction_head\.layers\.(\d+)\.adaLN_modulation\.1\.weight",
     lambda m: f"model.diffusion_head.layers.{m[1]}.linear.weight"),
    (r"model\.prediction_head\.layers\.(\d+)\.(norm\.weight|ffn\.(?:gate|up|down)_proj\.weight)",
     lambda m: f"model.diffusion_head.layers.{m[1]}.{m[2]}"),
    (r"model\.prediction_head\.final_layer\.adaLN_modulation\.1\.weight",
     lambda m: "model.diffusion_head.final_layer.linear_1.weight"),
    (r"model\.prediction_head\.final_layer\.linear\.weight", lambda m: "model.diffusion_head.final_layer.linear_2.weight"),
]  # fmt: skip
_COMPILED = [(re.compile(pattern), rename) for pattern, rename in _RULES]


def native_name(community_name: str) -> str:
    """The native name of one community tensor; raises ConversionError when no rule (or several) match."""
    names = [rename(match) for pattern, rename in _COMPILED if (match := pattern.fullmatch(community_name))]
    if len(names) != 1:
        problem = "no rule maps" if not names else f"{len(names)} rules map"
        raise ConversionError(f"{problem} the tensor {community_name!r}")
    return names[0]


# --- configuration -------------------------------------------------------------------------------


def _codec_config(community: dict, label: str) -> dict:
    """Arguments of the native codec config for a community acoustic/semantic tokenizer config."""
    for key, value in _CODEC_FIXED.items():
        if key in community and community[key] != value:
            raise ConversionError(f"{label}.{key} is {community[key]!r}; the native classes support only {value!r}")
    depths = community.get("encoder_depths", "3-3-3-3-3-3-8")
    depths = [int(d) for d in depths.split("-")] if isinstance(depths, str) else list(depths)
    ratios = list(community.get("encoder_ratios", [8, 5, 5, 4, 2, 2]))
    # The native decoder mirrors the encoder; a community decoder that does not cannot be expressed.
    decoder_depths = community.get("decoder_depths")
    if decoder_depths is not None:
        decoder_depths = (
            [int(d) for d in decoder_depths.split("-")] if isinstance(decoder_depths, str) else decoder_depths
        )
        if list(decoder_depths) != depths[::-1]:
            raise ConversionError(f"{label}.decoder_depths must mirror encoder_depths")
    if community.get("decoder_ratios") not in (None, ratios):
        raise ConversionError(f"{label}.decoder_ratios must equal encoder_ratios")
    filters = community.get("encoder_n_filters", 32)
    if community.get("decoder_n_filters", filters) != filters:
        raise ConversionError(f"{label}.decoder_n_filters must equal encoder_n_filters")
    return {
        "channels": community.get("channels", 1),
        "hidden_size": community.get("vae_dim", 64),
        "num_filters": filters,
        "downsampling_ratios": ratios[::-1],  # the community encoder reverses its ratios itself
        "depths": depths,
        "rms_norm_eps": community.get("layernorm_eps", 1e-5),
        "layer_scale_init_value": community.get("layer_scale_init_value", 1e-6),
        "initializer_range": community.get("weight_init_value", 1e-2),
        # sigma-VAE: the per-item noise scale is drawn from N(0, fix_std / 0.8) in both implementations.
        "vae_std": community.get("fix_std", 0.5) / 0.8,
    }


def native_config(community: dict, tokenizer) -> tuple:
    """(VibeVoiceConfig, GenerationConfig) for a community config.json and the tokenizer it uses."""
    from transformers import (
        VibeVoiceAcousticTokenizerConfig,
        VibeVoiceAcousticTokenizerEncoderConfig,
        VibeVoiceConfig,
    )

    missing = [k for k in ("decoder_config", "acoustic_tokenizer_config", "semantic_tokenizer_config",
                           "diffusion_head_config") if k not in community]  # fmt: skip
    if missing:
        raise ConversionError(f"config.json is not a community VibeVoice config (missing {', '.join(missing)})")
    text_config = _text_config(community)
    acoustic = community["acoustic_tokenizer_config"]
    if acoustic.get("std_dist_type", "gaussian") != "gaussian":
        raise ConversionError("acoustic_tokenizer_config.std_dist_type must be gaussian")
    semantic = community["semantic_tokenizer_config"]
    if semantic.get("std_dist_type", "none") != "none":
        raise ConversionError("semantic_tokenizer_config.std_dist_type must be none")
    semantic_args = _codec_config(semantic, "semantic_tokenizer_config")
    semantic_args["hidden_size"] = semantic.get("vae_dim", 128)
    semantic_args.pop("vae_std")  # the semantic encoder never samples

    head = community["diffusion_head_config"]
    diffusion = _diffusion_config(head, text_config.hidden_size, acoustic)
    ids = _special_token_ids(tokenizer)
    config = VibeVoiceConfig(
        text_config=text_config,
        audio_config=VibeVoiceAcousticTokenizerConfig(**_codec_config(acoustic, "acoustic_tokenizer_config")),
        semantic_model_config=VibeVoiceAcousticTokenizerEncoderConfig(**semantic_args),
        diffusion_head_config=diffusion,
        pad_token_id=ids[END_OF_TEXT],
        eos_token_id=ids[END_OF_TEXT],
        audio_bos_token_id=ids[SPEECH_START],
        audio_eos_token_id=ids[SPEECH_END],
        audio_token_id=ids[SPEECH_PAD],
    )
    config.architectures = ["VibeVoiceForConditionalGeneration"]
    if community.get("torch_dtype"):
        config.dtype = community["torch_dtype"]
    return config, _generation_config(config, head)


def _text_config(community: dict):
    """The language model's Qwen2Config from the community decoder_config."""
    from transformers import Qwen2Config

    decoder = dict(community["decoder_config"])
    if decoder.pop("model_type", "qwen2") != "qwen2":
        raise ConversionError("decoder_config.model_type must be qwen2")
    if "torch_dtype" in decoder:
        decoder["dtype"] = decoder.pop("torch_dtype")
    # The 1.5B model ties lm_head to the input embeddings; some configs say so only at the top level.
    decoder.setdefault("tie_word_embeddings", community.get("tie_word_embeddings", False))
    return Qwen2Config(**decoder)


def _diffusion_config(head: dict, hidden_size: int, acoustic: dict):
    from transformers.models.vibevoice.configuration_vibevoice import VibeVoiceDiffusionHeadConfig

    if head.get("hidden_size", hidden_size) != hidden_size:
        raise ConversionError("diffusion_head_config.hidden_size must equal decoder_config.hidden_size")
    return VibeVoiceDiffusionHeadConfig(
        hidden_size=hidden_size,
        latent_size=head.get("latent_size", acoustic.get("vae_dim", 64)),
        num_hidden_layers=head.get("head_layers", 4),
        intermediate_size=int(head.get("head_ffn_ratio", 3.0) * hidden_size),
        rms_norm_eps=head.get("rms_norm_eps", 1e-5),
    )


def _special_token_ids(tokenizer) -> dict[str, int]:
    ids = {
        token: tokenizer.convert_tokens_to_ids(token) for token in (SPEECH_START, SPEECH_END, SPEECH_PAD, END_OF_TEXT)
    }
    unknown = [token for token, i in ids.items() if i is None or (i == tokenizer.unk_token_id and token != END_OF_TEXT)]
    if unknown:
        raise ConversionError(f"the tokenizer lacks {', '.join(unknown)}")
    return ids


def _generation_config(config, head: dict):
    """DPM-Solver with the community schedule, and the community's diffusion steps."""
    from transformers import GenerationConfig

    generation = GenerationConfig(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    generation.noise_scheduler_class = "DPMSolverMultistepScheduler"
    schedule = head.get("ddpm_beta_schedule", "cosine")
    generation.noise_scheduler_config = {
        # The community "cosine" schedule is diffusers' squaredcos_cap_v2.
        "beta_schedule": "squaredcos_cap_v2" if schedule == "cosine" else schedule,
        "prediction_type": head.get("prediction_type", "v_prediction"),
        "num_train_timesteps": head.get("ddpm_num_steps", 1000),
    }
    generation.num_diffusion_steps = head.get("ddpm_num_inference_steps", 20)
    generation.guidance_scale = 1.3
    return generation


# --- conversion --------------------------------------------------------------------------------


def _expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the native model's saved tensors, from a weightless (meta) instance."""
    from transformers import VibeVoiceForConditionalGeneration

    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(config)
    tensors = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # saved once, as the input embeddings
    return tensors


def _shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / name for name in sorted(set(weight_map.values()))]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(f"{src} has neither model.safetensors.index.json nor model.safetensors")


def load_tokenizer(source: str | Path):
    """The Qwen2.5 tokenizer from a local folder or by name (the HF cache, or a download when online)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"could not load the tokenizer {source}: {str(exc).splitlines()[0]}") from None
    tokenizer.padding_side = "left"  # batched prompts must be left-padded
    return tokenizer


def tokenizer_source(src: Path, override: str | Path | None = None) -> str:
    """Where the tokenizer comes from: the override, else the name in preprocessor_config.json."""
    if override:
        return str(override)
    preprocessor = src / "preprocessor_config.json"
    if preprocessor.is_file():
        name = json.loads(preprocessor.read_text()).get("language_model_pretrained_name")
        if name:
            return name
    config = json.loads((src / "config.json").read_text())
    # The community processor falls back to Qwen2.5 by size; the 1.5B model has hidden size 1536.
    return "Qwen/Qwen2.5-1.5B" if config["decoder_config"].get("hidden_size") == 1536 else "Qwen/Qwen2.5-7B"


def convert(src: str | Path, dst: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Convert the community checkpoint in `src` into a native checkpoint in `dst` (created; must not exist).

    The output is assembled in a temporary folder beside `dst` and renamed into place at the end, so an
    interrupted conversion never leaves a half-written `dst`.
    """
    from transformers import GenerationConfig, VibeVoiceAcousticTokenizerFeatureExtractor, VibeVoiceProcessor

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ConversionError(f"{dst} already exists")
    try:
        community = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{src}/config.json could not be read: {exc}") from None
    tok = load_tokenizer(tokenizer_source(src, tokenizer))
    config, generation = native_config(community, tok)
    if (src / "generation_config.json").is_file():
        # Fields the source sets itself (e.g. suppressed tokens) win over the VibeVoice defaults.
        own = GenerationConfig.from_pretrained(src).to_diff_dict()
        for key, value in own.items():
            if key != "transformers_version":
                setattr(generation, key, value)
    generation._from_model_config = False  # else the VibeVoice fields are dropped on reload
    expected = _expected_tensors(config)

    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        dtypes = _convert_tensors(src, work, expected)
        if not community.get("torch_dtype") and len(dtypes) == 1:
            config.dtype = str(dtypes.pop()).removeprefix("torch.")
        config.save_pretrained(work)
        generation.save_pretrained(work)
        preprocessor = json.loads((src / "preprocessor_config.json").read_text()) if (
            src / "preprocessor_config.json").is_file() else {}  # fmt: skip
        audio = preprocessor.get("audio_processor", {})
        feature_extractor = VibeVoiceAcousticTokenizerFeatureExtractor(
            sampling_rate=audio.get("sampling_rate", 24000),
            normalize_audio=audio.get("normalize_audio", True),
            target_dB_FS=audio.get("target_dB_FS", -25),
            eps=audio.get("eps", 1e-6),
        )
        VibeVoiceProcessor(
            feature_extractor=feature_extractor, tokenizer=tok, chat_template=CHAT_TEMPLATE
        ).save_pretrained(work)
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _convert_tensors(src: Path, out: Path, expected: dict[str, tuple[int, ...]]) -> set[torch.dtype]:
    """Rename every tensor shard by shard, checking names and shapes; return the dtypes seen."""
    shards = _shards(src)
    weight_map: dict[str, str] = {}
    dtypes: set[torch.dtype] = set()
    total_size = 0
    for number, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        renamed: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as handle:
            for old in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                new = native_name(old)
                tensor = handle.get_tensor(old)
                if new == "lm_head.weight" and "lm_head.weight" not in expected:
                    continue  # tied to the input embeddings in the native model: saved once
                if new not in expected:
                    raise ConversionError(f"{old} maps to {new}, which the native model does not have")
                if tuple(tensor.shape) != expected[new]:
                    raise ConversionError(
                        f"{old} has shape {tuple(tensor.shape)}; the native {new} has {expected[new]}"
                    )
                if new in weight_map or new in renamed:
                    raise ConversionError(f"two tensors map to {new}")
                renamed[new] = tensor.contiguous()
                dtypes.add(tensor.dtype)
                total_size += tensor.numel() * tensor.element_size()
        save_file(renamed, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(renamed, name))
        del renamed
    leftover = sorted(set(expected) - set(weight_map))
    if leftover:
        raise ConversionError(f"{len(leftover)} native tensors have no source, e.g. {', '.join(leftover[:3])}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dtypes


def is_community_layout(path: str | Path) -> bool:
    """True when `path` holds a community-layout config (the native classes cannot load it)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "decoder_config" in config or "acoustic_tokenizer_config" in config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the community-layout checkpoint folder")
    parser.add_argument("dst", type=Path, help="the native checkpoint folder to create")
    parser.add_argument("--tokenizer", help="tokenizer folder or name (default: from preprocessor_config.json)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.dst, args.tokenizer)
    except ConversionError as exc:
        print(f"convert_checkpoint: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
