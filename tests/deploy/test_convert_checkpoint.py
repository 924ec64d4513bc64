"""The community -> native checkpoint converter, on the tiny model written in the community layout.

The tiny community checkpoint holds the same weights as the native one (`build_native`, same seed),
so a correct conversion reproduces the native checkpoint tensor for tensor. That the community
layout itself is right (the real package loads it with no missing or unexpected tensor) is checked
by tests/test_parity.py in the reference environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from deploy import convert_checkpoint
from deploy.convert_checkpoint import ConversionError, convert, native_name
from tools import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.fixture(scope="module")
def community_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint.build_community(tmp_path_factory.mktemp("community") / "tiny-community")


@pytest.fixture(scope="module")
def converted_dir(community_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(community_dir, tmp_path_factory.mktemp("converted") / "tiny-hf")


def test_real_7b_tensor_names_map_to_native_names():
    # Names as they appear in vibevoice/VibeVoice-7B's model.safetensors.index.json, and their native names.
    table = """
        model.acoustic_tokenizer.encoder.downsample_layers.0.0.conv.conv.weight
            model.audio_tower.encoder.stem.conv.conv.weight
        model.acoustic_tokenizer.encoder.downsample_layers.3.0.conv.conv.bias
            model.audio_tower.encoder.conv_layers.2.conv.conv.bias
        model.acoustic_tokenizer.encoder.stages.6.7.mixer.conv.conv.conv.weight
            model.audio_tower.encoder.conv_layers.5.stage.7.mixer.conv.weight
        model.acoustic_tokenizer.decoder.upsample_layers.6.0.convtr.convtr.weight
            model.audio_tower.decoder.conv_layers.5.convtr.convtr.weight
        model.acoustic_tokenizer.decoder.stages.0.2.ffn.linear1.weight
            model.audio_tower.decoder.stem.stage.2.ffn.linear1.weight
        model.acoustic_tokenizer.decoder.head.conv.conv.weight
            model.audio_tower.decoder.head.conv.weight
        model.semantic_tokenizer.encoder.stages.2.1.ffn_gamma
            model.semantic_tokenizer_encoder.conv_layers.1.stage.1.ffn_gamma
        model.semantic_tokenizer.encoder.head.conv.conv.bias
            model.semantic_tokenizer_encoder.head.conv.bias
        model.acoustic_connector.norm.weight
            model.multi_modal_projector.act.weight
        model.semantic_connector.fc2.bias
            model.semantic_connector.linear_2.bias
        model.prediction_head.t_embedder.mlp.2.weight
            model.diffusion_head.timestep_proj.fc2.weight
        model.prediction_head.layers.3.adaLN_modulation.1.weight
            model.diffusion_head.layers.3.linear.weight
        model.prediction_head.final_layer.adaLN_modulation.1.weight
            model.diffusion_head.final_layer.linear_1.weight
        model.prediction_head.final_layer.linear.weight
            model.diffusion_head.final_layer.linear_2.weight
        model.speech_scaling_factor
            model.latent_scaling_factor
        model.language_model.layers.27.self_attn.q_proj.bias
            model.language_model.layers.27.self_attn.q_proj.bias
        lm_head.weight
            lm_head.weight
    """
    names = table.split()
    pairs = dict(zip(names[::2], names[1::2], strict=True))
    assert {name: native_name(name) for name in pairs} == pairs


@pytest.mark.parametrize(
    "name",
    ["model.acoustic_tokenizer.encoder.fix_std", "model.semantic_tokenizer.decoder.head.conv.conv.weight", "foo"],
)
def test_unknown_tensor_names_are_refused(name):
    with pytest.raises(ConversionError, match="no rule maps"):
        native_name(name)


def test_every_converted_tensor_equals_its_original(community_dir, converted_dir):
    originals = read_tensors(community_dir)
    converted = read_tensors(converted_dir)
    assert len(originals) == len(converted) == 308
    for name, tensor in originals.items():
        new = converted[native_name(name)]
        assert new.dtype == tensor.dtype and new.shape == tensor.shape, name
        assert torch.equal(new, tensor), name
    index = json.loads((converted_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(converted)


def test_converted_checkpoint_is_the_native_checkpoint(converted_dir, tiny_model_dir):
    """Same seed, two layouts: conversion reproduces build_native's tensors, configs and tokenizer."""
    native = read_tensors(tiny_model_dir)
    converted = read_tensors(converted_dir)
    assert set(native) == set(converted)
    assert all(torch.equal(native[name], converted[name]) for name in native)
    for name in ("config.json", "generation_config.json", "processor_config.json", "chat_template.jinja"):
        assert (converted_dir / name).read_text() == (tiny_model_dir / name).read_text(), name

    from transformers import AutoTokenizer

    ours, theirs = AutoTokenizer.from_pretrained(converted_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    text = " Speaker 0: Hello, 3.14 dogs!<|vision_start|><|vision_pad|><|vision_end|>\n Speech output:\n"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.get_vocab() == theirs.get_vocab()


def load_engine_in_fresh_memory(settings):
    """Load an engine and copy its weights out of the memory-mapped file.

    CPU kernels pick code paths by the address alignment of their operands, so the same weights
    mapped at different file offsets (one file vs. two shards) differ in the last bits (~5e-7).
    In fresh allocations the two checkpoints must agree exactly.
    """
    from inference import VibeVoiceEngine

    engine = VibeVoiceEngine.load(settings)
    with torch.no_grad():
        for param in engine.model.parameters():
            param.data = param.data.clone()
    return engine


def test_converted_checkpoint_loads_and_generates_like_the_native_one(converted_dir, tiny_model_dir, make_settings):
    from inference import GenerationParams
    from text.script import Chunk, Turn

    converted = load_engine_in_fresh_memory(make_settings(model_path=converted_dir))
    native = load_engine_in_fresh_memory(make_settings(model_path=tiny_model_dir))
    chunk = Chunk(index=0, turns=(Turn(speaker=0, text="Hello there."),))
    voice = {0: np.sin(np.linspace(0, 400, 24000)).astype(np.float32) * 0.3}
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=3, seed=7, max_new_tokens=3)
    ours = converted.generate_chunk(chunk, voice, params)
    reference = native.generate_chunk(chunk, voice, params)
    assert ours.frames == reference.frames == 3
    assert ours.audio.size == 3 * 3200 and np.abs(ours.audio).max() > 0.01
    np.testing.assert_array_equal(ours.audio, reference.audio)


def test_unmapped_tensor_fails_loudly(community_dir, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(community_dir, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    save_file({"model.extra_thing.weight": torch.zeros(2)}, str(src / "model-00003-of-00003.safetensors"))
    index["weight_map"]["model.extra_thing.weight"] = "model-00003-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"model\.extra_thing\.weight"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.converting-*")), "the half-written folder is removed"


def test_missing_tensor_fails_loudly(community_dir, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(community_dir, src)
    shard = src / "model-00002-of-00002.safetensors"
    tensors = read_tensors_of(shard)
    del tensors["model.prediction_head.cond_proj.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(ConversionError, match=r"1 native tensors have no source, e.g. model.diffusion_head.cond_proj"):
        convert(src, tmp_path / "out")


def test_wrong_shape_fails_loudly(community_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(community_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["diffusion_head_config"]["head_ffn_ratio"] = 4.0  # the checkpoint's FFN is 3x wide
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="has shape"):
        convert(src, tmp_path / "out")


def test_unsupported_architecture_setting_is_named(community_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(community_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["acoustic_tokenizer_config"]["causal"] = False
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"acoustic_tokenizer_config\.causal"):
        convert(src, tmp_path / "out")


def test_cli_converts_and_reports_errors_in_one_line(community_dir, tmp_path):
    tokenizer = json.loads((community_dir / "preprocessor_config.json").read_text())["language_model_pretrained_name"]
    run = [sys.executable, "-m", "deploy.convert_checkpoint", str(community_dir), str(tmp_path / "out")]
    done = subprocess.run([*run, "--tokenizer", tokenizer], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "out")
    assert convert_checkpoint.is_community_layout(community_dir)
    assert not convert_checkpoint.is_community_layout(tmp_path / "out")

    again = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 1
    assert again.stderr.strip() == f"convert_checkpoint: {tmp_path / 'out'} already exists"


def read_tensors_of(shard: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(shard), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def test_tied_embeddings_checkpoint_converts_without_lm_head(community_dir, tmp_path):
    """The 1.5B model ties lm_head to the input embeddings (its config says so at the top level)."""
    from safetensors.torch import save_file
    from transformers import VibeVoiceForConditionalGeneration

    src = tmp_path / "src"
    shutil.copytree(community_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = True
    del config["decoder_config"]["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(config))
    shard = src / "model-00002-of-00002.safetensors"
    tensors = read_tensors_of(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard))

    out = convert(src, tmp_path / "out")
    assert "lm_head.weight" not in read_tensors(out)
    model = VibeVoiceForConditionalGeneration.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
