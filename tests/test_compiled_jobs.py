"""Jobs with COMPILE=on, on the CPU: the start-up check compiles the deployment's shapes, the compiled step
agrees with the eager loop, and default jobs run every frame compiled, which their result's `engine` says.

Mocked: nothing; the step is really compiled (torch.compile, inductor's C++ on the CPU). Compiling one
shape takes a minute or more on the test machines, so each engine runs with BATCH_SIZE=1 (bucket 1
only) and its tests share it: the tiny checkpoint with DEFAULT_DIFFUSION_STEPS=3 (the setting given),
compiled at one and two capacity steps (256 and 512 columns on the CPU; 1024 and 2048 on CUDA); and a
community-layout checkpoint whose config says 20 steps, converted, with DEFAULT_DIFFUSION_STEPS=0
(the checkpoint's count), compiled at one capacity step only (the second is the same code, and another
minutes-long compile of a 20-step graph).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile

from deploy.convert_checkpoint import convert
from engine import framestep
from handler import Worker
from inference import VibeVoiceEngine
from jobs.planning import plan_job
from jobs.schema import parse_job_input
from tools import tiny_checkpoint
from tools.local_home import synthetic_voice

# Each engine compiles at start-up: minutes on a loaded 2-core machine, counted in its first test.
# One xdist worker runs this module (its compiled engine is built once).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400), pytest.mark.xdist_group("compiled_jobs")]


def run(worker: Worker, job_input: dict) -> dict:
    [result] = asyncio.run(worker.collect({"id": "compiled", "input": job_input}))
    assert "error" not in result, result
    return result


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def compiled(make_settings):
    """(settings, engine): the tiny checkpoint, COMPILE=on, BATCH_SIZE=1, DEFAULT_DIFFUSION_STEPS=3, warmed up;
    `engine.start_up_log` keeps what the start-up check logged."""
    settings = make_settings(compile="on", batch_size=1, default_diffusion_steps=3)
    engine = VibeVoiceEngine.load(settings)
    logger, lines = logging.getLogger("vibevoice"), Lines()
    logger.addHandler(lines)
    # setLevel, not `logger.level =`: it also clears the child loggers' cached answers from earlier tests.
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        engine.warm_up()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    engine.start_up_log = lines.lines
    yield settings, engine
    engine.scheduler.close()


def test_the_start_up_check_compiles_both_capacity_steps_and_agrees(compiled) -> None:
    _, engine = compiled
    checks = [line for line in engine.start_up_log if line.startswith("the compiled step ")]
    assert checks and checks[0].startswith("the compiled step agrees"), engine.start_up_log
    agreement = checks[0]
    assert "over 4 forced speech frames: difference" in agreement and agreement.endswith("tolerance 1e-04")
    assert "decode step compiled for 2 shapes (rows x cache columns: 1x256, 1x512; 3 diffusion steps)" in "\n".join(
        engine.start_up_log
    )
    assert engine.start_up_log[-1] == f"engine: {engine.report().line()}"
    report = engine.report()
    step = framestep.capacity_step(engine.model.device)
    assert report.compile and report.compiled_buckets == {str(step): [1], str(2 * step): [1]}
    assert report.diffusion_steps == 3 and report.attention == {"prefill": "sdpa", "decode": "sdpa_packed_gqa"}
    assert not report.fallbacks
    assert engine.budget.cap() == 1
    shapes = engine.fast_paths.compile_seconds
    assert list(shapes) == [(1, step, 3), (1, 2 * step, 3)] and all(seconds > 0 for seconds in shapes.values())


def test_a_default_job_runs_every_frame_compiled(compiled) -> None:
    """90 characters with the default voice: the prompt and the frame cap need more than one capacity
    step (what ran uncompiled before), so the second one compiled at start-up holds it."""
    settings, engine = compiled
    text = "A default job of about ninety characters, read with the default voice and default steps."
    result = run(Worker(settings, engine), {"text": text, "output_format": "wav"})
    plan = plan_job(parse_job_input({"text": text}, settings), settings, Worker(settings, engine).library)
    [request] = engine.requests(plan.chunks, plan.voices, plan.params)
    assert request.input_ids.numel() + request.max_frames + 1 > framestep.capacity_step(engine.model.device)
    assert request.diffusion_steps == 3
    frames = result["engine"]["frames"]
    assert frames["uncompiled"] == 0 and frames["compiled"] == request.max_frames  # the tiny model runs to its cap
    assert result["engine"]["compile"] is True and result["engine"]["diffusion_steps"] == 3


def wav_base64(seconds: float, f0: float, seed: int) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, synthetic_voice(f0, seed, seconds=seconds), 24000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_two_voice_cloned_chunk_stays_compiled(compiled) -> None:
    """Two cloned voices of 15 s fill 226 prompt tokens: past the first capacity step, inside the second."""
    settings, engine = compiled
    job = {
        "text": "Speaker 1: Two cloned voices share this chunk.\nSpeaker 2: And both stay compiled.",
        "speakers": [{"audio_base64": wav_base64(15, 110, 1)}, {"audio_base64": wav_base64(15, 220, 2)}],
        "max_new_tokens": 4,
        "output_format": "wav",
    }
    worker = Worker(settings, engine)
    plan = plan_job(parse_job_input(job, settings), settings, worker.library)
    [request] = engine.requests(plan.chunks, plan.voices, plan.params)
    step = framestep.capacity_step(engine.model.device)
    assert len(request.voices) == 2 and step < request.input_ids.numel() + request.max_frames + 1 <= 2 * step
    result = run(worker, job)
    assert result["engine"]["frames"] == {"compiled": 4, "uncompiled": 0}


def test_a_job_with_more_steps_than_compiled_runs_uncompiled_and_says_so(compiled, caplog) -> None:
    settings, engine = compiled
    with caplog.at_level(logging.INFO, logger="vibevoice.framestep"):
        result = run(Worker(settings, engine), {"text": "More steps.", "diffusion_steps": 5, "max_new_tokens": 3})
    assert result["engine"]["frames"] == {"compiled": 0, "uncompiled": 3}
    assert "a decode shape the warm-up did not compile (1 rows, 256 cache columns, 5 diffusion steps)" in caplog.text
    fewer = run(Worker(settings, engine), {"text": "Fewer steps.", "diffusion_steps": 2, "max_new_tokens": 3})
    assert fewer["engine"]["frames"] == {"compiled": 3, "uncompiled": 0}  # the compiled shape, a no-op step


@pytest.fixture(scope="module")
def community_20_steps(tmp_path_factory) -> Path:
    """The tiny checkpoint in the community layout whose config says 20 diffusion steps (as the 7B's
    `ddpm_num_inference_steps` does), converted as bootstrap.sh converts it."""
    source = tiny_checkpoint.build_community(tmp_path_factory.mktemp("community") / "tiny-community")
    config = json.loads((source / "config.json").read_text())
    config["diffusion_head_config"]["ddpm_num_inference_steps"] = 20
    (source / "config.json").write_text(json.dumps(config, indent=2))
    return convert(source, tmp_path_factory.mktemp("converted") / "tiny-hf")


def test_a_converted_checkpoint_compiles_its_own_step_count_and_a_default_job_runs_compiled(
    community_20_steps, make_settings, monkeypatch
) -> None:
    monkeypatch.setattr(framestep, "LONG_WARM_UP_BUCKETS", ())  # one capacity step: one 20-step compile
    settings = make_settings(model_path=community_20_steps, compile="on", batch_size=1, default_diffusion_steps=0)
    engine = VibeVoiceEngine.load(settings)
    try:
        assert engine.diffusion_steps == 20
        engine.warm_up()
        assert engine.report().compiled_buckets == {str(framestep.capacity_step(engine.model.device)): [1]}
        result = run(Worker(settings, engine), {"text": "Hello there.", "output_format": "wav"})
    finally:
        engine.scheduler.close()
    frames = result["engine"]["frames"]
    assert frames["uncompiled"] == 0 and frames["compiled"] > 0 and result["engine"]["diffusion_steps"] == 20
    assert np.isfinite(result["duration_sec"])
