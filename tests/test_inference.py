"""The engine on the tiny checkpoint, loaded through the same from_pretrained path as production.

Mocked: nothing (the model code is transformers' VibeVoice; only its weights are tiny and random).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from inference import GenerationParams, ModelLoadError, VibeVoiceEngine
from jobs.voices import VoiceLibrary
from text.script import Chunk, Turn, chunk_script, parse_script


@pytest.fixture(scope="module")
def voices(settings) -> dict[int, np.ndarray]:
    library = VoiceLibrary.for_settings(settings)
    alice, frank = library.load("Alice"), library.load("Frank")
    return {0: alice, 1: frank, 2: alice[: alice.size // 2]}


def test_loads_the_real_architecture(engine: VibeVoiceEngine) -> None:
    model = engine.model
    assert type(model).__name__ == "VibeVoiceForConditionalGeneration"
    assert model.config.text_config.hidden_size == 64
    assert engine.hop_length == 3200 and engine.frame_rate == 7.5
    assert engine.info.device == "cpu" and engine.info.dtype == "float32" and engine.info.attention == "sdpa"
    assert engine.processor.tokenizer.padding_side == "left"


def test_prompt_matches_the_native_chat_template(engine: VibeVoiceEngine, voices) -> None:
    chunk = Chunk(0, (Turn(0, "Hello there."), Turn(1, "Hi! How are you?"), Turn(0, "Fine.")))
    ours = engine.prepare_inputs(chunk, voices, with_voices=True)
    conversation = [
        {"role": "0", "content": [{"type": "text", "text": "Hello there."}, {"type": "audio", "audio": voices[0]}]},
        {"role": "1", "content": [{"type": "text", "text": "Hi! How are you?"}, {"type": "audio", "audio": voices[1]}]},
        {"role": "0", "content": [{"type": "text", "text": "Fine."}]},
    ]
    native = engine.processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"sampling_rate": 24000}
    )
    assert torch.equal(ours["input_ids"], native["input_ids"])
    assert torch.equal(ours["input_values"], native["input_values"])
    assert torch.equal(ours["padding_mask"], native["padding_mask"])


def test_each_chunk_carries_the_voices_of_its_speakers(engine: VibeVoiceEngine, voices) -> None:
    chunk = Chunk(3, (Turn(2, "Third speaker."), Turn(0, "First speaker.")))
    prompt = engine.build_prompt(chunk, with_voices=True)
    assert prompt.index(" Speaker 0:<|vision_start|>") < prompt.index(" Speaker 2:<|vision_start|>")
    assert " Speaker 1:" not in prompt
    inputs = engine.prepare_inputs(chunk, voices, with_voices=True)
    expected = engine.processor.feature_extractor([voices[0], voices[2]], sampling_rate=24000)
    assert torch.equal(inputs["input_values"], expected["input_values"])
    frames = int((inputs["input_ids"] == engine.model.config.audio_token_id).sum())
    assert frames == sum(-(-voices[s].size // 3200) for s in (0, 2))


def test_without_voices_the_prompt_has_no_voice_section(engine: VibeVoiceEngine, voices) -> None:
    chunk = Chunk(0, (Turn(0, "Plain."),))
    inputs = engine.prepare_inputs(chunk, voices, with_voices=False)
    assert "input_values" not in inputs
    assert "Voice input" not in engine.build_prompt(chunk, with_voices=False)
    result = engine.generate_chunk(chunk, {}, GenerationParams(1.3, 5, seed=1, use_voice_prompt=False))
    assert result.audio.size > 0


def test_seeded_generation_is_bit_identical(engine: VibeVoiceEngine, voices) -> None:
    chunk = Chunk(0, (Turn(0, "Same seed, same audio."),))
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=5, seed=1234, max_new_tokens=6)
    first = engine.generate_chunk(chunk, voices, params)
    second = engine.generate_chunk(chunk, voices, params)
    other = engine.generate_chunk(chunk, voices, GenerationParams(1.3, 5, seed=99, max_new_tokens=6))
    assert np.array_equal(first.audio, second.audio)
    assert not np.array_equal(first.audio, other.audio)
    assert first.audio.dtype == np.float32 and np.all(np.isfinite(first.audio))
    assert 0.01 < float(np.std(first.audio)) < 1.0  # noise at a speech-like level, not silence


def test_frame_cap_follows_text_length(engine: VibeVoiceEngine, voices) -> None:
    short = Chunk(0, (Turn(0, "Hi."),))
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=3, seed=0)
    result = engine.generate_chunk(short, voices, params)
    # The tiny checkpoint always emits frames, so its length is the text-derived cap exactly.
    assert result.frames == engine.frame_cap(short, params) == 20
    assert result.audio.size == 20 * 3200 and result.reached_cap
    capped = engine.generate_chunk(short, voices, GenerationParams(1.3, 3, seed=0, max_new_tokens=4))
    assert capped.frames == 4 and capped.audio.size == 4 * 3200


def test_should_stop_ends_generation_between_frames(engine: VibeVoiceEngine, voices) -> None:
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    chunk = Chunk(0, (Turn(0, "A sentence that would give many frames. " * 3),))
    result = engine.generate_chunk(chunk, voices, GenerationParams(1.3, 3, seed=0), should_stop=stop_after_three)
    assert result.frames <= 4


def test_synthesize_reports_each_chunk(engine: VibeVoiceEngine, voices) -> None:
    script = parse_script("Speaker 1: One two.\nSpeaker 2: Three four.\nSpeaker 1: Five six.")
    chunks = chunk_script(script, max_chars=40)[:3]
    seen = []
    results = engine.synthesize(
        chunks,
        voices,
        GenerationParams(1.3, 3, seed=5, max_new_tokens=3),
        on_chunk=lambda r, n: seen.append((r.index, n)),
    )
    assert [r.index for r in results] == [c.index for c in chunks]
    assert seen == [(c.index, len(chunks)) for c in chunks]


def test_load_errors_are_one_line(make_settings, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        VibeVoiceEngine.load(make_settings(model_path=tmp_path))
    community = tmp_path / "community"
    community.mkdir()
    (community / "config.json").write_text(json.dumps({"model_type": "vibevoice", "decoder_config": {}}))
    with pytest.raises(ModelLoadError, match=r"community-layout VibeVoice checkpoint; convert it"):
        VibeVoiceEngine.load(make_settings(model_path=community))
    with pytest.raises(ModelLoadError, match="could not download vibevoice/VibeVoice-7B-hf"):
        VibeVoiceEngine.load(make_settings(model_path=None, vibevoice_home=tmp_path, runpod_hf_cache=tmp_path / "x"))


def test_model_found_in_the_volume_cache(make_settings, tiny_model_dir, tmp_path) -> None:
    """A snapshot in hf_cache (the layout huggingface_hub writes) is found offline by MODEL_ID."""
    snapshot = tmp_path / "hf_cache" / "models--acme--tiny-vibevoice" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    refs = tmp_path / "hf_cache" / "models--acme--tiny-vibevoice" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    settings = make_settings(model_path=None, model_id="acme/tiny-vibevoice", vibevoice_home=tmp_path)
    engine = VibeVoiceEngine.load(settings)
    assert engine.info.source == "acme/tiny-vibevoice (volume cache)"
