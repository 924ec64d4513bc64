"""The start-up fitness check (VibeVoiceEngine.warm_up) on the tiny checkpoint.

Mocked: a failing attention kernel. flash-attn cannot run on this machine (no GPU), so a broken
attention implementation is registered with transformers' AttentionInterface under its own name
and the model is loaded with it: the first forward pass raises inside attention, as a flash-attn
build whose kernels do not run on a GPU would.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoProcessor, VibeVoiceForConditionalGeneration

from inference import EngineInfo, GenerationParams, VibeVoiceEngine
from text.script import Chunk, Turn


def broken_attention(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


AttentionInterface.register("broken_for_tests", broken_attention)


def make_engine(path, attention: str = "sdpa") -> VibeVoiceEngine:
    model = VibeVoiceForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation={"text_config": attention}
    ).eval()
    info = EngineInfo(source=str(path), device="cpu", dtype="float32", attention=attention, load_seconds=0.0)
    return VibeVoiceEngine(model, AutoProcessor.from_pretrained(path), info)


def test_warm_up_checks_a_forward_pass_not_the_first_token(tiny_model_dir, caplog):
    engine = make_engine(tiny_model_dir)
    # A model whose first choice is never a speech frame (here: the speech-frame token is suppressed).
    engine.model.generation_config.suppress_tokens = [engine.model.config.audio_token_id]
    engine = VibeVoiceEngine(engine.model, engine.processor, engine.info)
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=1, seed=0, max_new_tokens=1, use_voice_prompt=False)
    first = engine.generate_chunk(Chunk(0, (Turn(0, "Hello."),)), {}, params)
    assert first.audio.size == 0, "a check on the first frame's audio would fail here"

    with caplog.at_level(logging.WARNING, logger="vibevoice.engine"):
        engine.warm_up()  # passes: the forward pass runs and its audio is finite
    assert engine.info.attention == "sdpa" and "using sdpa" not in caplog.text


def test_attention_failing_on_the_first_pass_falls_back_to_sdpa(tiny_model_dir, caplog):
    engine = make_engine(tiny_model_dir, attention="broken_for_tests")
    with caplog.at_level(logging.WARNING, logger="vibevoice.engine"):
        engine.warm_up()
    assert engine.info.attention == "sdpa"
    assert "broken_for_tests failed on the first forward pass (CUDA error: no kernel image" in caplog.text
    assert "; using sdpa attention" in caplog.text
    # The engine now generates with sdpa.
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=2, seed=1, max_new_tokens=3, use_voice_prompt=False)
    result = engine.synthesize([Chunk(0, (Turn(0, "Hello again."),))], {}, params)[0]
    assert result.frames == 3 and np.isfinite(result.audio).all()


def test_non_finite_output_fails_the_check(tiny_model_dir):
    engine = make_engine(tiny_model_dir, attention="broken_for_tests")
    with torch.no_grad():
        engine.model.model.language_model.norm.weight.fill_(float("nan"))  # a GPU that computes garbage
    with pytest.raises(RuntimeError, match=r"failed with sdpa too: .*not.* finite"):
        engine.warm_up()
