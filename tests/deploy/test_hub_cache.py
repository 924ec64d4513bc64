"""Finding a model in RunPod's model cache, with and without refs/main, from the engine and from bootstrap.

The cache folders are written here in the layout huggingface_hub (and RunPod's model cache) use:
models--{org}--{name}/snapshots/{commit}/ with the tiny checkpoint's files, and refs/main or not.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import hub_cache
from inference import VibeVoiceEngine, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "acme/tiny-vibevoice"


def add_snapshot(cache: Path, model: Path, commit: str, age_seconds: float = 0.0) -> Path:
    snapshot = hub_cache.repo_folder(cache, MODEL_ID) / "snapshots" / commit
    shutil.copytree(model, snapshot)
    stamp = snapshot.stat().st_mtime - age_seconds
    os.utime(snapshot, (stamp, stamp))
    return snapshot


def test_one_snapshot_without_refs_main_is_used(tmp_path, tiny_model_dir, make_settings):
    cache = tmp_path / "huggingface-cache" / "hub"
    snapshot = add_snapshot(cache, tiny_model_dir, "a" * 40)
    assert not (hub_cache.repo_folder(cache, MODEL_ID) / "refs").exists()
    assert hub_cache.find_snapshot(cache, MODEL_ID) == snapshot

    settings = make_settings(model_path=None, model_id=MODEL_ID, runpod_hf_cache=cache, vibevoice_home=tmp_path)
    assert resolve_model_path(settings) == (snapshot, f"{MODEL_ID} (RunPod cached model)")
    engine = VibeVoiceEngine.load(settings)  # the engine really loads from it, offline
    assert engine.info.source == f"{MODEL_ID} (RunPod cached model)"


def test_several_snapshots_without_refs_main_give_the_newest_with_a_log_line(tmp_path, tiny_model_dir, caplog):
    cache = tmp_path / "hub"
    add_snapshot(cache, tiny_model_dir, "1" * 40, age_seconds=3600)
    newest = add_snapshot(cache, tiny_model_dir, "2" * 40, age_seconds=60)
    add_snapshot(cache, tiny_model_dir, "3" * 40, age_seconds=7200)
    (hub_cache.repo_folder(cache, MODEL_ID) / "snapshots" / ("4" * 40)).mkdir()  # no config.json: not a candidate
    with caplog.at_level(logging.WARNING, logger="vibevoice.cache"):
        assert hub_cache.find_snapshot(cache, MODEL_ID) == newest
    assert f"has 3 snapshots of {MODEL_ID} and no usable refs/main; using the newest, {'2' * 40}" in caplog.text


def test_refs_main_wins_and_a_missing_cache_gives_none(tmp_path, tiny_model_dir):
    cache = tmp_path / "hub"
    named = add_snapshot(cache, tiny_model_dir, "1" * 40, age_seconds=3600)
    add_snapshot(cache, tiny_model_dir, "2" * 40)
    refs = hub_cache.repo_folder(cache, MODEL_ID) / "refs"
    refs.mkdir()
    (refs / "main").write_text("1" * 40)
    assert hub_cache.find_snapshot(cache, MODEL_ID) == named
    (refs / "main").write_text("9" * 40)  # names a snapshot that is not there: fall back to the folders
    assert hub_cache.find_snapshot(cache, MODEL_ID).name == "2" * 40
    assert hub_cache.find_snapshot(tmp_path / "nothing", MODEL_ID) is None
    assert hub_cache.find_snapshot(cache, "acme/other") is None


@pytest.mark.parametrize("layout", ["one snapshot", "several snapshots"])
def test_bootstrap_finds_the_cached_model_without_refs_main(tmp_path, tiny_model_dir, layout):
    """bootstrap.sh's own lookup (deploy/provision.py find-model) takes the same snapshot, offline."""
    cache = tmp_path / "hub"
    expected = add_snapshot(cache, tiny_model_dir, "2" * 40)
    if layout == "several snapshots":
        add_snapshot(cache, tiny_model_dir, "1" * 40, age_seconds=600)
    command = [sys.executable, "-m", "deploy.provision", "find-model", MODEL_ID, "--runpod-cache", str(cache),
               "--cache", str(tmp_path / "volume-cache")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(expected)
    if layout == "several snapshots":
        assert "using the newest" in done.stdout + done.stderr
