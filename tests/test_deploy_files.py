"""The deployment files: RunPod Hub metadata, Hub test jobs, the Dockerfile and its ignore list.

(shellcheck and hadolint run on bootstrap.sh and the Dockerfile in `make test` itself.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import Settings
from schema import parse_job_input

ROOT = Path(__file__).resolve().parent.parent
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
HUB_TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
BOOTSTRAP_VARIABLES = set(re.findall(r"^([A-Z_]+)=\$\{", (ROOT / "bootstrap.sh").read_text(), re.MULTILINE))


def test_hub_metadata_describes_a_gpu_audio_worker():
    assert HUB["type"] == "serverless" and HUB["category"] == "audio"
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    assert "12.8" in config["allowedCudaVersions"]  # torch 2.8.0 is built for CUDA 12.8
    assert config["containerDiskInGb"] >= 20


def test_hub_env_inputs_are_real_settings_with_their_real_defaults():
    fields = Settings.model_fields
    keys = [entry["key"] for entry in HUB["config"]["env"]]
    assert len(keys) == len(set(keys))
    assert {
        "HF_TOKEN",
        "MODEL_ID",
        "S3_ENDPOINT_URL",
        "S3_ACCESS_KEY_ID",
        "S3_SECRET_ACCESS_KEY",
        "S3_BUCKET_NAME",
    } <= set(keys)
    for entry in HUB["config"]["env"]:
        key, spec = entry["key"], entry["input"]
        assert spec["description"] and spec["name"], key
        name = key.lower()
        assert name in fields or key in BOOTSTRAP_VARIABLES, f"{key} is read by nothing"
        if name in fields:
            default = fields[name].default
            default = "" if default is None else default
            assert spec["default"] == default, f"{key}: hub default {spec['default']!r}, settings {default!r}"
        for option in spec.get("options", []):
            Settings(**{name: option["value"]})  # every offered choice is accepted


def test_the_default_model_is_the_same_everywhere():
    bootstrap_default = re.search(r"^MODEL_ID=\$\{MODEL_ID:-(.+)\}$", (ROOT / "bootstrap.sh").read_text(), re.MULTILINE)
    assert bootstrap_default and bootstrap_default[1] == Settings.model_fields["model_id"].default
    hub_default = next(e["input"]["default"] for e in HUB["config"]["env"] if e["key"] == "MODEL_ID")
    assert hub_default == bootstrap_default[1]


@pytest.mark.parametrize("test", HUB_TESTS["tests"], ids=lambda t: t["name"])
def test_hub_test_jobs_run_on_the_worker(test, run_job, settings):
    assert test["timeout"] >= 60_000  # milliseconds: a cold start loads the model first
    parse_job_input(test["input"], settings)
    result = run_job({**test["input"], "max_new_tokens": 3, "diffusion_steps": 2}) if "text" in test["input"] else (
        run_job(test["input"])
    )  # fmt: skip
    assert isinstance(result, list) and "error" not in result[0], result


def test_local_test_input_is_a_valid_job(settings):
    job = json.loads((ROOT / "test_input.json").read_text())
    parse_job_input(job["input"], settings)


def test_dockerfile_builds_both_modes_from_the_cuda_base():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04" in dockerfile
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE)
    assert stages == ["base", "self-contained", "volume"]  # the last stage is the default target
    assert dockerfile.count('CMD ["bash", "/app/bootstrap.sh"]') == 2
    assert "libsndfile1" in dockerfile and "python3-venv" in dockerfile


def test_docker_build_context_leaves_out_tests_venvs_and_audio():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {
        "tests",
        ".venv",
        ".venv-*",
        "node_modules",
        "**/node_modules",
        "**/*.wav",
        "**/*.mp3",
        "**/*.safetensors",
        ".git",
    } <= ignored


def test_gpu_smoke_skips_cleanly_without_cuda():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_smoke.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout


def test_gpu_smoke_script_runs_its_jobs_on_the_cpu(tiny_model_dir, volume, tmp_path):
    """The script itself, on the tiny checkpoint: every job completes and the report has its figures."""
    out = tmp_path / "report.json"
    env = {**os.environ, "MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume)}
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu_smoke.py"),
        "--cpu",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model_load_sec"] > 0 and report["device"] == "cpu"
    jobs = {job["job"]: job for job in report["jobs"]}
    assert set(jobs) == {"short", "long_multi_chunk", "multi_speaker_cloned", "streaming"}
    for name in ("short", "long_multi_chunk", "multi_speaker_cloned"):
        assert jobs[name]["ok"] and jobs[name]["audio_sec"] > 0 and jobs[name]["real_time_factor"] > 0, jobs[name]
    assert jobs["long_multi_chunk"]["chunks"] > 1
    assert jobs["streaming"]["ok"] or "skipped" in jobs["streaming"]
