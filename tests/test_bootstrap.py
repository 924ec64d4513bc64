"""bootstrap.sh against a temporary volume folder, with nothing downloaded.

The venv is built for real (python -m venv, pip install), but from a local wheelhouse written
here: `vvtest-link` carries a .pth file that puts this test environment's site-packages on the new
venv's path (standing in for torch, transformers and the rest, which would take minutes to
install), and `vvtest-extra` is a second package for the "requirements changed" case. torch and
flash-attn installs are switched off (TORCH_SPEC="", FLASH_ATTN_SPEC=""). The model comes from
MODEL_SOURCE: the tiny checkpoint in the community layout, which bootstrap converts. The worker
started at the end is a probe script that reports its interpreter and environment, except in the
end-to-end test, which runs a real job through handler.py.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

import tiny_checkpoint
from tools.local_home import write_demo_voices

pytestmark = pytest.mark.slow  # each test boots a real venv build in a subprocess (about 10 s)

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "bootstrap.sh"
LAYOUT = ("hf_home", "hf_cache", "models", "output", "demo/voices", "venv")

PROBE = """
import importlib.util, json, os, sys
names = ("MODEL_PATH", "HF_HUB_OFFLINE", "HF_HOME", "VIBEVOICE_HOME")
modules = ("vvtest_link", "vvtest_extra", "transformers")
report = {"prefix": sys.prefix, "argv": sys.argv[1:], "cwd": os.getcwd(), **{n: os.environ.get(n) for n in names},
          "modules": {m: importlib.util.find_spec(m) is not None for m in modules}}
open(os.environ["PROBE_OUT"], "w").write(json.dumps(report))
"""


def write_wheel(folder: Path, name: str, files: dict[str, str]) -> None:
    """A minimal pure-Python wheel (what `pip wheel` would build), written directly."""
    dist = f"{name}-1.0.dist-info"
    contents = {
        **files,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        for path, text in contents.items():
            wheel.writestr(path, text)
        wheel.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    site_packages = sysconfig.get_paths()["purelib"]
    write_wheel(folder, "vvtest_link", {"vvtest_link/__init__.py": "", "vvtest_link.pth": site_packages + "\n"})
    write_wheel(folder, "vvtest_extra", {"vvtest_extra/__init__.py": ""})
    return folder


@pytest.fixture(scope="module")
def community_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint.build_community(tmp_path_factory.mktemp("source") / "tiny-community")


@pytest.fixture()
def deploy(tmp_path: Path, wheelhouse: Path, community_model: Path):
    """A volume folder, a requirements file and a function that runs bootstrap.sh against them."""
    home = tmp_path / "volume" / "vibevoice"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("vvtest-link==1.0\n")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {key: value for key, value in os.environ.items() if key not in ("MODEL_ID", "MODEL_PATH", "HF_TOKEN")}
    env.update(
        VIBEVOICE_HOME=str(home),
        PYTHON_BIN=sys.executable,
        REQUIREMENTS_FILE=str(requirements),
        TORCH_SPEC="",
        FLASH_ATTN_SPEC="",
        PIP_EXTRA_ARGS=f"--no-index --find-links {wheelhouse}",
        BOOTSTRAP_CHECK_IMPORTS="vvtest_link torch transformers",
        MODEL_SOURCE=str(community_model),
        RUNPOD_HF_CACHE=str(tmp_path / "no-runpod-cache"),
        WORKER_SCRIPT=str(probe),
        PROBE_OUT=str(tmp_path / "probe.json"),
        HF_HUB_OFFLINE="1",
    )

    class Deploy:
        def __init__(self):
            self.home, self.requirements, self.env = home, requirements, env
            self.probe_out = tmp_path / "probe.json"

        def start(self, *args: str, **extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                ["bash", str(BOOTSTRAP), *args],
                env={**self.env, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # so a test can kill the whole group midway
            )

        def run(self, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
            started = time.perf_counter()
            process = self.start(*args, **extra)
            stdout, stderr = process.communicate(timeout=timeout)
            self.seconds = time.perf_counter() - started
            return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

        def flag(self) -> dict[str, str]:
            lines = (self.home / ".first_run_complete").read_text().splitlines()
            return dict(line.split("=", 1) for line in lines)

        def probe(self) -> dict:
            return json.loads(self.probe_out.read_text())

        def venvs(self) -> list[str]:
            return sorted(p.name for p in (self.home / "venv").iterdir())

    return Deploy()


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_first_run_sets_up_everything_and_starts_the_worker(deploy):
    out = ok(deploy.run("--worker-arg", "x"))
    assert "building the virtual environment" in out and "converting the community-layout checkpoint" in out
    for folder in LAYOUT:
        assert (deploy.home / folder).is_dir(), folder

    flag = deploy.flag()
    venv = deploy.home / "venv" / flag["requirements"]
    model = deploy.home / "models" / "tiny-community-hf"
    assert flag["model_path"] == str(model)
    assert (venv / ".requirements-hash").read_text().strip() == flag["requirements"]
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "vibevoice" and "decoder_config" not in config

    # The worker runs in the new venv, offline, on the converted model, with our arguments.
    probe = deploy.probe()
    assert Path(probe["prefix"]) == venv
    assert probe["MODEL_PATH"] == str(model) and probe["HF_HUB_OFFLINE"] == "1"
    assert probe["HF_HOME"] == str(deploy.home / "hf_home")
    assert probe["argv"] == ["--worker-arg", "x"] and probe["cwd"] == str(ROOT)
    assert probe["modules"] == {"vvtest_link": True, "vvtest_extra": False, "transformers": True}


def test_second_run_skips_setup(deploy):
    ok(deploy.run())
    first = deploy.seconds
    stamp = (deploy.home / ".first_run_complete").stat().st_mtime_ns
    venvs = deploy.venvs()

    out = ok(deploy.run())
    print(f"first boot {first:.1f} s, second boot {deploy.seconds:.2f} s")
    assert "already set up" in out
    assert "building" not in out and "converting" not in out
    assert (deploy.home / ".first_run_complete").stat().st_mtime_ns == stamp
    assert deploy.venvs() == venvs
    assert deploy.probe()["HF_HUB_OFFLINE"] == "1"


def test_run_killed_midway_leaves_no_flag_and_the_next_run_repairs(deploy):
    process = deploy.start()
    deadline = time.monotonic() + 120
    while not list((deploy.home / "venv").glob(".build-*")) and time.monotonic() < deadline:
        assert process.poll() is None, "bootstrap finished before it could be interrupted"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert not (deploy.home / ".first_run_complete").exists()
    assert list((deploy.home / "venv").glob(".build-*")), "the build was interrupted midway"

    out = ok(deploy.run())
    assert "building the virtual environment" in out
    assert (deploy.home / ".first_run_complete").exists()
    assert not list((deploy.home / "venv").glob(".build-*")), "the half-built venv was cleared"
    assert deploy.probe()["modules"]["vvtest_link"]


def test_two_workers_booting_together_build_once(deploy):
    first, second = deploy.start(), deploy.start()
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    logs = "".join(out + err for out, err in outputs)
    assert logs.count("building the virtual environment") == 1
    assert logs.count("converting the community-layout checkpoint") == 1
    assert "set up by another worker" in logs or "already set up" in logs
    assert len(deploy.venvs()) == 1


def test_changed_requirements_rebuild_the_venv(deploy):
    ok(deploy.run())
    old = deploy.flag()["requirements"]
    deploy.requirements.write_text("vvtest-link==1.0\nvvtest-extra==1.0\n")

    out = ok(deploy.run())
    assert "building the virtual environment" in out
    assert "converting" not in out, "the converted model is reused"
    new = deploy.flag()["requirements"]
    assert new != old
    assert Path(deploy.probe()["prefix"]).name == new
    assert deploy.probe()["modules"]["vvtest_extra"]
    assert deploy.venvs() == sorted([old, new]), "the previous venv is kept for workers still running"


def test_broken_venv_is_rebuilt(deploy):
    ok(deploy.run())
    venv = deploy.home / "venv" / deploy.flag()["requirements"]
    packages = list(venv.glob("lib/python*/site-packages/vvtest_link"))
    assert packages
    for package in packages:
        shutil.rmtree(package)

    out = ok(deploy.run())
    assert "building the virtual environment" in out
    assert deploy.probe()["modules"]["vvtest_link"]


def test_failures_end_with_one_clear_line_and_no_flag(deploy, tmp_path):
    missing = tmp_path / "nowhere"
    done = deploy.run(MODEL_SOURCE=str(missing))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"bootstrap: FAILED the model folder {missing} has no config.json."
    assert not (deploy.home / ".first_run_complete").exists()

    deploy.requirements.write_text("vvtest-not-there==1.0\n")
    done = deploy.run()
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"bootstrap: FAILED while installing {deploy.requirements} (exit status 1)"
    )
    assert not (deploy.home / ".first_run_complete").exists()


def test_waiting_for_another_worker_is_bounded(deploy):
    deploy.home.mkdir(parents=True)
    with open(deploy.home / ".bootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker is (forever) setting up
        done = deploy.run(BOOTSTRAP_LOCK_TIMEOUT="1")
    assert done.returncode == 1
    assert "waiting (at most 1s)" in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("bootstrap: FAILED another worker held the setup lock")


def test_boot_runs_a_real_job_through_the_handler(deploy, tmp_path):
    write_demo_voices(deploy.home / "demo" / "voices")
    job = {"input": {"text": "Hello there.", "speaker": "Alice", "output_format": "wav", "max_new_tokens": 3,
                     "diffusion_steps": 2, "seed": 3}}  # fmt: skip
    result_path = tmp_path / "result.json"
    env = {"WORKER_SCRIPT": str(ROOT / "handler.py"), "VIBEVOICE_TEST_OUTPUT": str(result_path), "DEVICE": "cpu"}
    out = ok(deploy.run("--test_input", json.dumps(job), timeout=600, **env))
    assert "starting the worker" in out
    result = json.loads(result_path.read_text())
    assert isinstance(result, list) and result[0]["status"] == "completed", result
    audio = base64.b64decode(result[0]["audio_base64"])
    assert audio[:4] == b"RIFF" and result[0]["duration_sec"] > 0.3
