"""The start-up fitness check (VibeVoiceEngine.warm_up, engine/warmup.py, engine/fitness.py) on the tiny checkpoint.

Every fast path proves itself against the plain one, and falls back loudly (COMPILE=auto, ATTENTION=auto)
or fails the worker (COMPILE=on, ATTENTION=flash_attention_2).

Mocked, because a CPU cannot run the real thing, and each test says where:
- flash-attn: it cannot be installed here (no CUDA). Its import fails on this machine for real (the
  auto/strict rules of `pick_attention` are tested with that); a kernel that raises, or one that
  computes something else, is an attention function registered with transformers' AttentionInterface
  under its own name, with which the model is loaded, as flash-attn would be.
- compilation failing or miscompiling: the compiled function (`FrameStep._run`) is replaced by one
  that raises, or by the uncompiled frame reading a wrong guidance scale; the real compiled step is
  checked in tests/test_compiled_jobs.py.
- a missing C++ compiler: CXX names a file that does not exist.
- COMPILE=auto on a GPU: on the CPU auto means off, so an engine built with COMPILE=on gets its
  check's mode set to auto (the only difference auto makes is to fall back instead of failing).
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoProcessor, VibeVoiceForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine import fitness
from engine.framestep import FrameStep
from inference import (
    EngineInfo,
    GenerationParams,
    ModelLoadError,
    StartupError,
    VibeVoiceEngine,
    kv_bytes_per_token,
    pick_attention,
)
from text.script import Chunk, Turn


def broken_attention(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def wrong_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa over values doubled: runs, but computes something else."""
    return sdpa_attention_forward(module, query, key, value * 2.0, attention_mask, **kwargs)


AttentionInterface.register("broken_for_tests", broken_attention)
AttentionInterface.register("wrong_for_tests", wrong_attention)


def make_engine(path, attention: str = "sdpa", **options) -> VibeVoiceEngine:
    model = VibeVoiceForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation={"text_config": attention}
    ).eval()
    info = EngineInfo(source=str(path), device="cpu", dtype="float32", attention=attention, load_seconds=0.0)
    return VibeVoiceEngine(model, AutoProcessor.from_pretrained(path), info, **options)


def errors(caplog) -> list[str]:
    """The worker's own ERROR lines (not, say, asyncio's about an earlier test's loop collected meanwhile)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("vibevoice")]


# --- attention ---------------------------------------------------------------------------------------


def test_warm_up_checks_a_forward_pass_not_the_first_token(tiny_model_dir, caplog):
    engine = make_engine(tiny_model_dir)
    # A model whose first choice is never a speech frame (here: the speech-frame token is suppressed).
    engine.model.generation_config.suppress_tokens = [engine.model.config.audio_token_id]
    engine = VibeVoiceEngine(engine.model, engine.processor, engine.info)
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=1, seed=0, max_new_tokens=1, use_voice_prompt=False)
    first = engine.generate_chunk(Chunk(0, (Turn(0, "Hello."),)), {}, params)
    assert first.audio.size == 0, "a check on the first frame's audio would fail here"

    with caplog.at_level(logging.INFO, logger="vibevoice.engine"):
        engine.warm_up()  # passes: the forward pass runs and its audio is finite
    assert engine.info.attention == "sdpa" and not errors(caplog)
    report = engine.report()
    assert report.attention == {"prefill": "sdpa", "decode": "sdpa"} and not report.compile and not report.fallbacks
    assert caplog.records[-1].getMessage() == f"engine: {report.line()}"  # the start-up line says what runs


def test_an_attention_that_agrees_with_sdpa_is_kept(tiny_model_dir, caplog):
    """transformers' own eager attention is a second real kernel on the CPU: it passes the check."""
    engine = make_engine(tiny_model_dir, attention="eager")
    with caplog.at_level(logging.INFO, logger="vibevoice.engine"):
        engine.warm_up()
    assert engine.info.attention == "eager" and engine.report().attention == {"prefill": "eager", "decode": "eager"}
    line = next(r.getMessage() for r in caplog.records if "agrees with sdpa attention" in r.getMessage())
    assert "eager attention agrees with sdpa attention over 4 forced speech frames: difference" in line
    assert "tolerance 1e-04" in line


def test_attention_failing_on_the_first_pass_falls_back_to_sdpa(tiny_model_dir, caplog):
    engine = make_engine(tiny_model_dir, attention="broken_for_tests")  # stands in for a flash-attn that raises
    with caplog.at_level(logging.WARNING, logger="vibevoice.engine"):
        engine.warm_up()
    assert engine.info.attention == "sdpa"
    [line] = errors(caplog)
    assert line.startswith("broken_for_tests attention failed the start-up check against sdpa attention: ")
    assert "CUDA error: no kernel image" in line and line.endswith("; using sdpa attention (ATTENTION=auto)")
    report = engine.report()
    assert report.attention == {"prefill": "sdpa", "decode": "sdpa"} and report.fallbacks == (line,)
    # The engine now generates with sdpa.
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=2, seed=1, max_new_tokens=3, use_voice_prompt=False)
    result = engine.synthesize([Chunk(0, (Turn(0, "Hello again."),))], {}, params)[0]
    assert result.frames == 3 and np.isfinite(result.audio).all()
    engine.scheduler.close()


def test_an_attention_that_disagrees_with_sdpa_is_given_up(tiny_model_dir, caplog):
    engine = make_engine(tiny_model_dir, attention="wrong_for_tests")  # a kernel that runs but computes otherwise
    with caplog.at_level(logging.WARNING, logger="vibevoice.engine"):
        engine.warm_up()
    [line] = errors(caplog)
    assert "wrong_for_tests attention DISAGREES with sdpa attention over 4 forced speech frames" in line
    difference = float(line.split("difference ")[1].split()[0])
    assert difference > 100 * fitness.tolerance_for(torch.float32) and engine.info.attention == "sdpa"


def test_a_required_attention_that_fails_fails_the_check(tiny_model_dir):
    engine = make_engine(tiny_model_dir, attention="broken_for_tests", attention_mode="flash_attention_2")
    with pytest.raises(StartupError, match=r"^ATTENTION=flash_attention_2, but broken_for_tests attention failed"):
        engine.warm_up()


def test_non_finite_output_fails_the_check(tiny_model_dir):
    engine = make_engine(tiny_model_dir, attention="broken_for_tests")
    with torch.no_grad():
        engine.model.model.language_model.norm.weight.fill_(float("nan"))  # a GPU that computes garbage
    with pytest.raises(StartupError, match=r"^the warm-up forward pass failed: .*not finite"):
        engine.warm_up()


def test_flash_attention_is_used_where_it_imports_and_required_only_when_asked(monkeypatch):
    """flash-attn does not import on this machine (no CUDA build): auto says so and uses sdpa everywhere;
    asking for it stops the worker; a stand-in module that imports makes auto pick it."""
    with pytest.raises(ImportError):
        import flash_attn  # noqa: F401
    notes: list[str] = []
    assert pick_attention("cuda", "auto", notes) == "sdpa"
    assert notes and notes[0].startswith("flash-attn cannot be imported") and "sdpa attention everywhere" in notes[0]
    with pytest.raises(ModelLoadError, match="ATTENTION is flash_attention_2, but flash-attn cannot be imported"):
        pick_attention("cuda", "flash_attention_2", [])
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        pick_attention("cpu", "flash_attention_2", [])
    assert pick_attention("cpu", "auto", []) == "sdpa" and pick_attention("cuda", "sdpa", []) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert pick_attention("cuda", "auto", []) == "flash_attention_2"


# --- the compiled step ---------------------------------------------------------------------------------


@pytest.fixture()
def compiling(engine):
    """An engine over the session's model with COMPILE=on (bucket 1 only, 2 diffusion steps); closed after."""
    made = []

    def make(**options) -> VibeVoiceEngine:
        made.append(VibeVoiceEngine(engine.model, engine.processor, engine.info, batch_size=1, compile_mode="on",
                                    diffusion_steps=2, **options))  # fmt: skip
        return made[-1]

    yield make
    for each in made:
        each.scheduler.close()


def test_a_compile_failure_fails_a_required_compile_and_falls_back_under_auto(compiling, caplog):
    """Mocked: the compiled function raises (as inductor does on a missing compiler or a bad kernel)."""

    def broken(tensors):
        raise RuntimeError("inductor exploded\nwith a long traceback")

    strict = compiling()
    strict.decoder.frame_step._run = broken
    with pytest.raises(StartupError, match=r"^COMPILE=on, but compiling the decode step failed: .*inductor exploded"):
        strict.warm_up()

    lenient = compiling()
    lenient.decoder.frame_step._run = broken
    lenient.fast_paths.compile_mode = "auto"  # a GPU's auto (on the CPU auto is off)
    with caplog.at_level(logging.INFO, logger="vibevoice"):
        lenient.warm_up()
    assert lenient.decoder.frame_step is None  # the eager loop decodes
    line = next(line for line in errors(caplog) if "COMPILE=auto" in line)
    assert "compiling the decode step failed: RuntimeError: inductor exploded" in line
    assert line.endswith("; decoding uncompiled (COMPILE=auto)")
    report = lenient.report()
    assert not report.compile and report.compiled_buckets == {} and report.fallbacks == (line,)
    params = GenerationParams(cfg_scale=1.3, diffusion_steps=None, seed=3, max_new_tokens=3, use_voice_prompt=False)
    [chunk] = lenient.synthesize([Chunk(0, (Turn(0, "After the fallback."),))], {}, params)
    assert (chunk.compiled_frames, chunk.uncompiled_frames) == (0, 3)


def test_a_compiled_step_that_disagrees_with_the_eager_loop_is_caught(compiling, caplog):
    """Mocked: the "compiled" function is the uncompiled frame reading a guidance scale 1.5x too large,
    as a miscompiled kernel would; it runs (and counts as compiled), but its latents differ."""

    def miscompiled(frame):
        def run(tensors):
            saved = tensors.guidance.clone()
            tensors.guidance.mul_(1.5)
            try:
                return frame(tensors)
            finally:
                tensors.guidance.copy_(saved)

        return run

    strict = compiling()
    strict.decoder.frame_step._run = miscompiled(strict.decoder.frame_step.frame)
    with pytest.raises(StartupError, match=r"^COMPILE=on, but the compiled step DISAGREES with the eager loop"):
        strict.warm_up()

    lenient = compiling()
    lenient.decoder.frame_step._run = miscompiled(lenient.decoder.frame_step.frame)
    lenient.fast_paths.compile_mode = "auto"
    with caplog.at_level(logging.INFO, logger="vibevoice"):
        lenient.warm_up()
    [line] = [line for line in errors(caplog) if "DISAGREES" in line]
    difference = float(line.split("difference ")[1].split()[0])
    assert difference > fitness.tolerance_for(torch.float32) and "tolerance 1e-04" in line
    assert lenient.decoder.frame_step is None and not lenient.report().compile


def test_a_missing_compiler_is_named_before_anything_compiles(compiling, caplog, monkeypatch, tmp_path):
    """Mocked: CXX (inductor's C++ compiler on the CPU) names a file that does not exist."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    compiled = []
    monkeypatch.setattr(FrameStep, "warm_up", lambda self, shapes: compiled.append(shapes) or {})
    with pytest.raises(StartupError, match=r"^COMPILE=on, but no C\+\+ compiler was found \(CXX=.* does not exist\)"):
        compiling().warm_up()
    lenient = compiling()
    lenient.fast_paths.compile_mode = "auto"
    with caplog.at_level(logging.ERROR, logger="vibevoice"):
        lenient.warm_up()
    [line] = errors(caplog)
    assert line.startswith("no C++ compiler was found") and "install it (apt-get install g++) or set CXX" in line
    assert compiled == [] and lenient.decoder.frame_step is None


def test_the_warm_up_compiles_only_the_shapes_whose_buffers_fit(engine, caplog):
    """The compiled shapes' buffers are allocated at start-up and kept: on a GPU too small for all of
    them, the warm-up compiles those that fit (in order, bucket 1 first) and says so. A GPU and its
    memory reading are stand-ins (no GPU here); the buffers are counted on the meta device as on CUDA."""
    from types import SimpleNamespace

    from engine.decoder import BatchDecoder
    from engine.framestep import warm_up_shapes
    from engine.scheduler import BatchBudget
    from engine.warmup import affordable_shapes

    decoder = BatchDecoder(engine.model, diffusion_steps=2)
    decoder.frame_step = FrameStep(decoder, compile_frame=True)
    gpu = SimpleNamespace(device=torch.device("cuda"), diffusion_steps=2, frame_step=decoder.frame_step)
    kv = kv_bytes_per_token(engine.model)
    budget = BatchBudget(0, torch.device("cuda"), kv, prefill_bytes=2**20, decoder=decoder)
    shapes = warm_up_shapes(budget.cap(), torch.device("cuda"), 2)
    sizes = [decoder.frame_step.slot_bytes(*shape) for shape in shapes]
    budget.memory_left = lambda: (sum(sizes) + budget.prefill_bytes) / 0.75
    assert affordable_shapes(gpu, budget) == shapes and len(shapes) == 8
    budget.memory_left = lambda: (sum(sizes[:3]) + budget.prefill_bytes) / 0.75
    with caplog.at_level(logging.WARNING, logger="vibevoice.engine"):
        assert affordable_shapes(gpu, budget) == shapes[:3]
    assert "holds the compiled step's buffers for 3 of its 8 shapes" in caplog.text
