"""The deployment files: RunPod Hub metadata, Hub test jobs, the Dockerfile and its ignore list.

(shellcheck and hadolint run on bootstrap.sh and the Dockerfile in `make test` itself.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sizing
from config import Settings
from jobs.schema import parse_job_input
from jobs.voices import VoiceLibrary

ROOT = Path(__file__).resolve().parent.parent
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
HUB_TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
BOOTSTRAP = (ROOT / "bootstrap.sh").read_text()
BOOTSTRAP_VARIABLES = set(re.findall(r"^([A-Z_]+)=\$\{", BOOTSTRAP, re.MULTILINE))
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VOICES = json.loads((ROOT / "demo" / "voices.json").read_text())


def test_hub_metadata_describes_a_gpu_audio_worker():
    assert HUB["type"] == "serverless" and HUB["category"] == "audio"
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/\S+/[0-9a-f]{40}/\S+\.png", HUB["iconUrl"])
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    for versions in (config["allowedCudaVersions"], HUB_TESTS["config"]["allowedCudaVersions"]):
        assert "12.8" in versions  # torch 2.8.0 is built for CUDA 12.8 ...
        assert any(v.startswith("13.") for v in versions)  # ... and runs on hosts whose drivers report 13.x


# Sizes that fill the container disk when there is no network volume (bytes), measured as
# docs/operations.md says; the runpod SDK's start-up check then wants 10% of the disk free.
MEASURED = {
    "image": 2.0e9,  # upper bound for the network-volume image (Ubuntu 24.04, CUDA base layer, Python 3.12)
    "venv": 7.5e9,  # the production venv, measured by `make test-deploy` (torch 2.8.0 + requirements.txt)
    "flash_attn": 0.8e9,  # the flash-attn 2.8.3 wheel, installed
    "model": 18.7e9,  # vibevoice/VibeVoice-7B-hf in bf16
    "converted": 18.7e9,  # a community-layout MODEL_ID (offered in hub.json) is kept and converted beside it
}


def test_the_hub_offers_the_gpu_pools_that_fit_the_default_model():
    """gpuIds are the pools of docs/operations.md's GPU table whose smallest card holds the 7B and a row
    (bench/sizing.py, from the scheduler's budget), cheapest per hour of audio first."""
    assert HUB["config"]["gpuIds"].split(",") == sizing.tiers_that_fit()
    assert sizing.MODELS[0].model_id == Settings.model_fields["model_id"].default


def test_container_disk_fits_a_first_boot_and_leaves_what_the_sdk_checks_for():
    needed_gb = sum(MEASURED.values()) / 0.9 / 1e9  # at most 90% used after the first boot
    assert HUB["config"]["containerDiskInGb"] == math.ceil(needed_gb)


def test_first_boot_fits_runpods_start_up_limit():
    hub = next(e["input"] for e in HUB["config"]["env"] if e["key"] == "RUNPOD_INIT_TIMEOUT")
    tests = next(e["value"] for e in HUB_TESTS["config"]["env"] if e["key"] == "RUNPOD_INIT_TIMEOUT")
    image = re.search(r"RUNPOD_INIT_TIMEOUT=(\d+)", DOCKERFILE)[1]
    script = re.search(r"^RUNPOD_INIT_TIMEOUT=\$\{RUNPOD_INIT_TIMEOUT:-(\d+)\}$", BOOTSTRAP, re.MULTILINE)[1]
    assert hub["default"] == int(tests) == int(image) == int(script) >= 1800  # RunPod's default is 420 s
    reserve = int(re.search(r"^BOOTSTRAP_START_RESERVE=\$\{BOOTSTRAP_START_RESERVE:-(\d+)\}$", BOOTSTRAP, re.M)[1])
    assert (
        "BOOTSTRAP_LOCK_TIMEOUT=${BOOTSTRAP_LOCK_TIMEOUT:-$((RUNPOD_INIT_TIMEOUT - BOOTSTRAP_START_RESERVE))}"
        in BOOTSTRAP
    )
    assert 0 < hub["default"] - reserve < hub["default"]  # workers waiting for the lock stay below the limit
    # The Hub's test worker has no volume: it boots the small native model, so one cold start holds it all.
    model = next(e["value"] for e in HUB_TESTS["config"]["env"] if e["key"] == "MODEL_ID")
    assert model == "vibevoice/VibeVoice-1.5B-hf"
    assert HUB_TESTS["tests"][0]["timeout"] >= hub["default"] * 1000 * 0.75


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
            if spec["type"] == "string":
                default = str(default)
            assert spec["default"] == default, f"{key}: hub default {spec['default']!r}, settings {default!r}"
        assert spec["type"] in ("string", "number", "boolean", "huggingface"), key
        if spec["type"] == "number":
            assert "options" not in spec and spec["min"] <= spec["default"] <= spec["max"], key
        for option in spec.get("options", []):
            Settings(**{name: option["value"]})  # every offered choice is accepted
    model = next(e["input"] for e in HUB["config"]["env"] if e["key"] == "MODEL_ID")
    assert model["type"] == "huggingface"  # RunPod's model picker


def test_the_default_model_is_the_same_everywhere():
    bootstrap_default = re.search(r"^MODEL_ID=\$\{MODEL_ID:-(.+)\}$", (ROOT / "bootstrap.sh").read_text(), re.MULTILINE)
    assert bootstrap_default and bootstrap_default[1] == Settings.model_fields["model_id"].default
    hub_default = next(e["input"]["default"] for e in HUB["config"]["env"] if e["key"] == "MODEL_ID")
    assert hub_default == bootstrap_default[1]


def bridge_value(module: str, expression: str):
    """`expression` (JSON-serialisable) evaluated by Node after `import * as m from bridge/src/<module>`."""
    script = f"import * as m from './src/{module}'; console.log(JSON.stringify({expression}));"
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script], cwd=ROOT / "bridge", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def bridge_defaults() -> dict:
    """The bridge's settings with nothing set: bridge/src/config.js's own defaults."""
    return bridge_value("config.js", "m.loadConfig({})")


def openai_voices() -> dict[str, str]:
    """The bridge's map of OpenAI's voice names to presets (bridge/src/openai_voices.js)."""
    return bridge_value("openai_voices.js", "m.OPENAI_VOICES")


def wrangler_vars() -> dict[str, str]:
    """The vars a deployed bridge (and `make bridge`) runs with: bridge/wrangler.jsonc without its comments."""
    text = (ROOT / "bridge" / "wrangler.jsonc").read_text()
    return json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE))["vars"]


def test_the_text_limit_is_the_same_in_the_worker_the_hub_and_the_bridge():
    """One MAX_TEXT_LENGTH: a text the bridge passes is never refused by the worker after it queued (and
    perhaps waited for a cold start), and the Hub's form shows the worker's real default."""
    worker = Settings.model_fields["max_text_length"].default
    hub = next(e["input"]["default"] for e in HUB["config"]["env"] if e["key"] == "MAX_TEXT_LENGTH")
    hub_tests = [e for e in HUB_TESTS["config"]["env"] if e["key"] == "MAX_TEXT_LENGTH"]
    assert worker == hub == bridge_defaults()["MAX_TEXT_LENGTH"] == int(wrangler_vars()["MAX_TEXT_LENGTH"]) == 4096
    assert hub_tests == []  # the Hub's test endpoint runs the default too


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
    dockerfile = DOCKERFILE
    # The smallest CUDA image: torch's wheels bring the CUDA libraries, the flash-attn wheel needs no nvcc.
    assert "ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04" in dockerfile
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE)
    # The last stage is the default target (what RunPod Hub builds): the one that needs no network volume.
    assert stages == ["base", "volume", "self-contained"]
    assert dockerfile.count('CMD ["bash", "/app/bootstrap.sh"]') == 2
    assert "libsndfile1" in dockerfile and "python3-venv" in dockerfile


def test_the_image_installs_the_dependencies_a_volume_boot_installs():
    """The self-contained image and bootstrap.sh's venv build hold the same torch, index and flash-attn."""

    def docker_arg(name: str) -> str:
        return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)[1]

    def bootstrap_default(name: str) -> str:
        return re.search(rf"^{name}=\$\{{{name}-(.+)\}}$", BOOTSTRAP, re.MULTILINE)[1]

    assert docker_arg("TORCH_SPEC") == bootstrap_default("TORCH_SPEC")
    assert f"--index-url {docker_arg('TORCH_INDEX_URL')}" == bootstrap_default("TORCH_INDEX_ARGS")
    assert docker_arg("FLASH_ATTN_SPEC") == bootstrap_default("FLASH_ATTN_SPEC")
    assert "-r /app/requirements.txt" in DOCKERFILE


def test_every_file_the_build_context_leaves_out_by_name_exists_or_is_generated():
    """.dockerignore names no file that is gone (a stale entry hides nothing and misleads)."""
    generated = {".git", ".github", ".ci", ".venv", ".pytest_cache", ".ruff_cache", ".local", "node_modules"}
    for entry in (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()):
        if not entry or entry.startswith("#") or any(c in entry for c in "*?[") or entry in generated:
            continue
        assert (ROOT / entry).exists(), entry


def test_both_images_can_build_what_torch_compile_builds_at_run_time():
    """Triton compiles a C launcher against the interpreter's Python.h when the compiled step first
    runs: the base stage, which both targets build on, installs a C compiler and Python 3.12's headers."""
    base = DOCKERFILE[DOCKERFILE.index(" AS base\n") : DOCKERFILE.index(" AS self-contained\n")]
    packages = re.search(r"apt-get install -y --no-install-recommends \\\n\s+(.+?) \\\n", base)
    assert packages, base
    assert {"gcc", "libc6-dev", "python3-dev", "python3"} <= set(packages[1].split())
    assert "tools.check_c_extension" in (ROOT / "tools" / "test_deploy.sh").read_text()  # make test-deploy runs it


def test_a_c_extension_builds_against_this_venvs_own_headers(tmp_path):
    """What make test-deploy runs in the production venv, run here in this one: it compiles, imports and calls."""
    done = subprocess.run([sys.executable, "-m", "tools.check_c_extension"], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "built and called a C extension" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "tools.check_c_extension"], cwd=ROOT, capture_output=True,
                             text=True, timeout=180, env={**os.environ, "CC": str(tmp_path / "no-cc")})  # fmt: skip
    assert missing.returncode == 1
    assert "no C compiler was found" in missing.stderr and "apt-get install gcc" in missing.stderr


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


def test_reference_voices_are_pinned_by_commit_and_checksum():
    assert VOICES["urls"] and all(re.search(r"/[0-9a-f]{40}/demo/voices/$", url) for url in VOICES["urls"])
    assert len(VOICES["files"]) == 9
    for name, spec in VOICES["files"].items():
        assert re.fullmatch(r"[a-z]{2}-[A-Za-z]+_(man|woman)(_bgm)?\.wav", name), name
        assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"]) and spec["bytes"] > 100_000, name


def test_the_default_voice_and_the_bridge_presets_are_among_the_fetched_voices(tmp_path):
    """Every preset name that ships as a default resolves to exactly one fetched file."""
    library = VoiceLibrary.for_settings(Settings(vibevoice_home=tmp_path))
    library.folder.mkdir(parents=True)
    for name in VOICES["files"]:
        (library.folder / name).write_bytes(b"")  # names only: find() never opens the files
    assert library.find(Settings.model_fields["default_speaker"].default).name == "en-Alice_woman"
    bridge = json.loads((ROOT / "bridge" / "voices.example.json").read_text())["voices"]
    for voice in bridge.values():
        library.find(voice["preset"] if isinstance(voice, dict) else voice)
    for name, preset in openai_voices().items():  # OpenAI's names speak with these on a fresh bridge
        assert library.find(preset).name == preset, name
    for test in HUB_TESTS["tests"]:
        for speaker in test["input"].get("speakers", []):
            library.find(speaker)


def test_the_bridge_lists_exactly_the_fetched_voices_as_presets():
    """wrangler.jsonc's PRESET_VOICES are the stems of demo/voices.json: a preset the worker lacks
    would pass the bridge and fail on the GPU; a fetched voice missing there would be refused early."""
    wrangler = (ROOT / "bridge" / "wrangler.jsonc").read_text()
    presets = re.search(r'"PRESET_VOICES":\s*"([^"]*)"', wrangler).group(1).split(",")
    assert sorted(presets) == sorted(name.removesuffix(".wav") for name in VOICES["files"])


def test_the_bridge_readme_lists_the_map_of_openai_voice_names():
    """bridge/README.md's table of OpenAI's voice names is the bridge's own map (src/openai_voices.js)."""
    text = (ROOT / "bridge" / "README.md").read_text()
    table = text.split("| voices | preset |", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for names, preset in re.findall(r"^\| (.+?) \| `([^`]+)` \|$", table, re.MULTILINE):
        documented.update(dict.fromkeys(re.findall(r"`([^`]+)`", names), preset))
    assert documented == openai_voices()


def test_fetch_voices_checks_size_and_checksum(http_files, tmp_path):
    """deploy/provision.py voices against a local server: a good file is kept, a corrupted one is not."""
    base, folder = http_files
    (folder / "good.wav").write_bytes(b"RIFF good bytes")
    (folder / "bad.wav").write_bytes(b"RIFF tampered!!")
    manifest = tmp_path / "manifest.json"
    files = {
        name: {"sha256": hashlib.sha256(b"RIFF good bytes").hexdigest(), "bytes": 15}
        for name in ("good.wav", "bad.wav")
    }
    manifest.write_text(json.dumps({"urls": [base + "/"], "files": files}))
    dest = tmp_path / "voices"
    command = [sys.executable, "-m", "deploy.provision", "voices", "--manifest", str(manifest), "--dest", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    assert sorted(p.name for p in dest.iterdir()) == ["good.wav"]
    assert "voice bad.wav: " in done.stderr and "not used" in done.stderr
    assert "warning: 1 reference voice(s) could not be fetched (bad.wav)" in done.stderr


def test_hub_presets_set_offered_settings_to_offered_values():
    """A preset's defaults name env inputs of hub.json and values those inputs offer (the 24 GB tier's int8)."""
    inputs = {entry["key"]: entry["input"] for entry in HUB["config"]["env"] if "input" in entry}
    assert any(preset["defaults"].get("WEIGHTS") == "int8" for preset in HUB["config"]["presets"])
    for preset in HUB["config"]["presets"]:
        assert preset["name"] and preset["defaults"], preset
        for key, value in preset["defaults"].items():
            options = [option["value"] for option in inputs[key].get("options", [])]
            assert not options or value in options, (preset["name"], key, value)
