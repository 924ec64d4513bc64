"""The compiled decode step's artifacts on the volume (engine/compile_cache.py).

Mocked: nothing. Fresh processes compile the tiny checkpoint's static step for real (bucket 1, one
diffusion step: the smallest graph), each with an empty inductor cache folder of its own, so only
the artifacts file can carry anything from one to the next; dynamo's counters say what each
process traced and compiled.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine import compile_cache
from engine.compile_cache import MEGA_CACHE, StepArtifacts

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, logging, sys
sys.path.insert(0, {root!r})
import numpy as np
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
from torch._dynamo.utils import counters
from transformers import VibeVoiceForConditionalGeneration
from engine.batch import DecodeRequest
from engine.compile_cache import StepArtifacts, use_compile_caches
from engine.decoder import BatchDecoder

attention = {{"text_config": "sdpa"}}
model = VibeVoiceForConditionalGeneration.from_pretrained({model!r}, attn_implementation=attention).eval()
use_compile_caches({folder!r})
artifacts = StepArtifacts.for_model(model)
if {corrupt!r}:
    artifacts.path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.path.write_bytes(b"PK\\x03\\x04 a zip cut short")
decoder = BatchDecoder(model, compile_mode="on")
decoder.frame_step.default_steps = 1  # the smallest graph
decoder.warm_up([1])
request = DecodeRequest(index=0, input_ids=torch.arange(20, 40), max_frames=3, seed=5, cfg_scale=1.3, diffusion_steps=1)
frames = decoder.frame_step.compiled_frames
[compiled] = decoder.decode([request])
[eager] = BatchDecoder(model).decode([request])
print(json.dumps({{
    "path": str(artifacts.path),
    "compiled": decoder.compiled and decoder.frame_step.compiled_frames > frames,
    "difference": float(np.abs(compiled.audio - eager.audio).max()),
    "counters": {{name: dict(counters[name]) for name in ("aot_autograd", "inductor", "stats")}},
}}))
"""


def fresh_process(tiny_model_dir: Path, folder: Path, inductor: Path, corrupt: bool = False) -> tuple[dict, str]:
    script = CHILD.format(root=str(ROOT), model=str(tiny_model_dir), folder=str(folder), corrupt=corrupt)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "TRITON_CACHE_DIR": str(inductor / "triton")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def kernel_libraries(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*.so")}


@pytest.mark.timeout(1800)  # compiling from scratch: minutes, more on busy shared cores
def test_a_fresh_process_compiles_from_the_saved_artifacts(tiny_model_dir, tmp_path) -> None:
    folder = tmp_path / "compile_cache"
    # The first start finds a corrupt file: one log line, it compiles from scratch and replaces the file.
    first, log = fresh_process(tiny_model_dir, folder, tmp_path / "inductor-1", corrupt=True)
    lines = [line for line in log.splitlines() if line.startswith("vibevoice.compile_cache")]
    assert len(lines) == 2 and "unusable" in lines[0] and "saved to" in lines[1], lines
    assert first["compiled"] and first["difference"] <= 1e-4
    assert first["counters"]["aot_autograd"]["autograd_cache_miss"] >= 1  # it really traced and compiled
    with zipfile.ZipFile(first["path"]) as archive:
        carried = {name.removeprefix("kernels/") for name in archive.namelist() if name.startswith("kernels/")}
        assert archive.read(MEGA_CACHE) and json.loads(archive.read("key.json"))["device"].startswith("cpu")
    assert carried and carried == kernel_libraries(tmp_path / "inductor-1")  # every C++ kernel the graph loads

    # The next start, with an empty inductor folder of its own: AOTAutograd traces nothing, inductor
    # generates and builds nothing, and the graph from the file decodes as the eager loop does.
    second, log = fresh_process(tiny_model_dir, folder, tmp_path / "inductor-2")
    aot, inductor = second["counters"]["aot_autograd"], second["counters"]["inductor"]
    assert aot.get("autograd_cache_hit", 0) >= 1 and aot.get("autograd_cache_miss", 0) == 0, aot
    assert inductor.get("fxgraph_cache_hit", 0) >= 1 and inductor.get("fxgraph_cache_miss", 0) == 0, inductor
    assert kernel_libraries(tmp_path / "inductor-2") == carried  # no kernel compiled: the file's are used
    assert second["compiled"] and second["difference"] <= 1e-4
    assert "compile artifacts loaded from" in log and "saved to" not in log  # nothing new to save


@pytest.fixture()
def artifacts(engine, tmp_path, monkeypatch) -> StepArtifacts:
    monkeypatch.setattr(compile_cache, "_folder", tmp_path / "compile_cache")
    monkeypatch.setattr(compile_cache, "_loaded", set())
    found = StepArtifacts.for_model(engine.model)
    assert found is not None and found.path.parent == tmp_path / "compile_cache"
    return found


def write_artifacts(path: Path, key: dict, mega_cache: bytes = b"\x00" * 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("key.json", json.dumps(key))
        archive.writestr(MEGA_CACHE, mega_cache)


def load_logged(artifacts: StepArtifacts, caplog) -> list[str]:
    with caplog.at_level(logging.INFO, logger="vibevoice.compile_cache"):
        assert artifacts.load() is False
    return [record.getMessage() for record in caplog.records if record.name == "vibevoice.compile_cache"]


def test_missing_artifacts_are_one_log_line(artifacts, caplog) -> None:
    [line] = load_logged(artifacts, caplog)
    assert "no compile artifacts" in line and str(artifacts.path) in line


def test_artifacts_for_another_torch_are_ignored_with_one_log_line(artifacts, caplog) -> None:
    write_artifacts(artifacts.path, {**artifacts.key, "torch": "2.8.0+cu128"})
    [line] = load_logged(artifacts, caplog)
    assert "made for another torch" in line and "ignored" in line


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not torch's"])
def test_corrupt_artifacts_are_ignored_with_one_log_line(artifacts, caplog, damage) -> None:
    write_artifacts(artifacts.path, artifacts.key, mega_cache=b"torch never wrote this" * 100)
    data = bytearray(artifacts.path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":  # inside the mega-cache member: its CRC no longer matches
        at = data.index(b"torch never wrote this") + 5
        data[at] ^= 0xFF
    artifacts.path.write_bytes(bytes(data))
    [line] = load_logged(artifacts, caplog)
    assert "unusable" in line and "\n" not in line


def test_an_unwritable_folder_is_one_log_line(artifacts, caplog, monkeypatch) -> None:
    blocker = artifacts.path.parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the folder should be")
    monkeypatch.setattr("torch.compiler.save_cache_artifacts", lambda: (b"artifacts", None))
    with caplog.at_level(logging.WARNING, logger="vibevoice.compile_cache"):
        assert artifacts.save() is False
    [line] = [record.getMessage() for record in caplog.records if record.name == "vibevoice.compile_cache"]
    assert "could not save the compile artifacts" in line


def test_the_key_names_what_the_graphs_depend_on(engine) -> None:
    key = compile_cache.step_key(engine.model)
    assert set(key) == {"torch", "triton", "cuda", "python", "transformers", "device", "dtype", "model_config",
                        "step_source"}  # fmt: skip
    assert key["dtype"] == "float32" and key["device"].startswith("cpu ")
    assert "tiny" not in json.dumps(key)  # the checkpoint's path is not part of it: a copy elsewhere hits
