"""bootstrap.sh against a temporary volume folder, with nothing downloaded from the internet.

The venv is built for real (python -m venv, pip install), but from a local wheelhouse written
here: `vvtest-link` carries a .pth file that puts this test environment's site-packages on the new
venv's path (standing in for torch, transformers and the rest, which would take minutes to
install), and `vvtest-extra` is a second package for the "requirements changed" case. torch and
flash-attn installs are switched off (TORCH_SPEC="", FLASH_ATTN_SPEC=""). The model comes from
MODEL_SOURCE: the tiny checkpoint in the community layout, which bootstrap converts; the download
tests at the end serve the native tiny checkpoint from a local Hugging Face Hub stand-in
(tests/hf_standin.py) and RunPod's model cache is a folder written here. Reference
voices come from local HTTP servers standing in for GitHub, with a manifest written here. The
worker started at the end is a probe script that reports its interpreter and environment, except
in the end-to-end test, which runs a real job through handler.py.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import pytest
from hf_standin import COMMIT, HubStandIn

from tools import tiny_checkpoint
from tools.local_home import write_demo_voices

pytestmark = pytest.mark.slow  # each test boots a real venv build in a subprocess (about 10 s)

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "bootstrap.sh"
LAYOUT = ("hf_home", "hf_cache", "models", "output", "demo/voices", "venv")

PROBE = """
import importlib.util, json, os, sys
names = ("MODEL_PATH", "HF_HUB_OFFLINE", "HF_HOME", "VIBEVOICE_HOME")
modules = ("vvtest_link", "vvtest_extra", "transformers")
report = {"prefix": sys.prefix, "argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
          **{n: os.environ.get(n) for n in names},
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
        f"{dist}/entry_points.txt": f"[console_scripts]\n{name.replace('_', '-')}-hello = {name}:hello\n",
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
    hello = "def hello():\n    print('hello from the venv')\n"
    write_wheel(folder, "vvtest_link", {"vvtest_link/__init__.py": hello, "vvtest_link.pth": site_packages + "\n"})
    write_wheel(folder, "vvtest_extra", {"vvtest_extra/__init__.py": hello})
    return folder


@pytest.fixture(scope="module")
def community_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint.build_community(tmp_path_factory.mktemp("source") / "tiny-community")


class VoiceMirrors:
    """Two local HTTP servers standing in for the voice sources (GitHub raw URLs) of a manifest."""

    def __init__(self, folder: Path):
        self.good = {path.name: path.read_bytes() for path in write_demo_voices(folder / "voices")}
        self.served: list[dict[str, bytes]] = [dict(self.good), dict(self.good)]
        self.requests: list[str] = []
        self.servers = [self._serve(files) for files in self.served]
        self.urls = [f"http://127.0.0.1:{server.server_address[1]}/demo/voices/" for server in self.servers]
        self.manifest = folder / "voices.json"
        files = {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in self.good.items()
        }
        self.manifest.write_text(json.dumps({"urls": self.urls, "files": files}))

    def _serve(self, files: dict[str, bytes]) -> http.server.ThreadingHTTPServer:
        mirrors = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                mirrors.requests.append(self.path)
                data = files.get(self.path.rpartition("/")[2])
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture()
def mirrors(tmp_path: Path):
    mirrors = VoiceMirrors(tmp_path / "mirrors")
    yield mirrors
    mirrors.close()


@pytest.fixture()
def deploy(tmp_path: Path, wheelhouse: Path, community_model: Path, mirrors: VoiceMirrors):
    """A volume folder, a requirements file and a function that runs bootstrap.sh against them."""
    home = tmp_path / "volume" / "vibevoice"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("vvtest-link==1.0\n")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    unset = ("MODEL_ID", "MODEL_PATH", "HF_TOKEN", "RUNPOD_POD_ID", "RUNPOD_INIT_TIMEOUT", "BOOTSTRAP_LOCK_TIMEOUT")
    env = {key: value for key, value in os.environ.items() if key not in unset}
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
        VOICES_MANIFEST=str(mirrors.manifest),
        WORKER_SCRIPT=str(probe),
        PROBE_OUT=str(tmp_path / "probe.json"),
        HF_HUB_OFFLINE="1",
        HOSTNAME="host-test",
    )

    class Deploy:
        def __init__(self):
            self.home, self.requirements, self.env = home, requirements, env
            self.probe_out = tmp_path / "probe.json"

        def start(self, *args: str, prefix: tuple[str, ...] = (), **extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                [*prefix, "bash", str(BOOTSTRAP), *args],
                env={**self.env, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # one log, in order, as RunPod shows it
                text=True,
                start_new_session=True,  # so a test can kill the whole group midway
            )

        def run(self, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
            started = time.perf_counter()
            process = self.start(*args, **extra)
            output, _ = process.communicate(timeout=timeout)
            self.seconds = time.perf_counter() - started
            return subprocess.CompletedProcess(process.args, process.returncode, output, "")

        def flag(self) -> dict[str, str]:
            lines = (self.home / ".first_run_complete").read_text().splitlines()
            return dict(line.split("=", 1) for line in lines)

        def venv(self) -> Path:
            return Path(self.flag()["python"]).parent.parent

        def probe(self) -> dict:
            return json.loads(self.probe_out.read_text())

        def venvs(self) -> list[str]:
            return sorted(p.name for p in (self.home / "venv").iterdir())

    return Deploy()


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout
    return done.stdout


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.strip().splitlines()[-1]


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "bootstrap finished before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_first_run_sets_up_everything_and_starts_the_worker(deploy):
    out = ok(deploy.run("--worker-arg", "x", BOOTSTRAP_PROGRESS_SECONDS="0.2"))
    assert "building the virtual environment" in out and "converting the community-layout checkpoint" in out
    # Progress lines while the venv builds and the checkpoint converts.
    lines = out.splitlines()
    venv_lines = [line for line in lines if "building the virtual environment (installing" in line]
    assert any(" MB written, " in line and " MB/s" in line and line.endswith("so far)") for line in venv_lines), out
    convert = [line for line in lines if line.startswith("bootstrap: converting to the transformers-native")]
    assert convert and all(" of " in line and "%)" in line for line in convert), out
    for folder in LAYOUT:
        assert (deploy.home / folder).is_dir(), folder

    flag = deploy.flag()
    venv = deploy.venv()
    model = deploy.home / "models" / "tiny-community-hf"
    assert flag["model_path"] == str(model) and flag["voices"] == "complete"
    # Built in place under a final name of its own: requirements hash, worker id, random suffix.
    assert venv.parent == deploy.home / "venv" and venv.name.startswith(flag["requirements"] + "-host-test-")
    assert (venv / ".requirements-hash").read_text().strip() == flag["requirements"]
    assert not (venv / ".owner").exists()
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "vibevoice" and "decoder_config" not in config
    assert not list((deploy.home / "models").glob(".build-*")), "the conversion folder was renamed into place"

    # Its console scripts work: they name the venv's own interpreter.
    pip = subprocess.run([venv / "bin" / "pip", "--version"], capture_output=True, text=True, timeout=60)
    assert pip.returncode == 0 and str(venv) in pip.stdout, pip.stdout + pip.stderr
    hello = subprocess.run([venv / "bin" / "vvtest-link-hello"], capture_output=True, text=True, timeout=60)
    assert hello.stdout == "hello from the venv\n", hello.stderr

    # The worker runs in the new venv, offline, on the converted model, with our arguments.
    probe = deploy.probe()
    assert Path(probe["prefix"]) == venv
    assert probe["MODEL_PATH"] == str(model) and probe["HF_HUB_OFFLINE"] == "1"
    assert probe["HF_HOME"] == str(deploy.home / "hf_home")
    assert probe["argv"] == ["--worker-arg", "x"] and probe["cwd"] == str(ROOT)
    assert probe["modules"] == {"vvtest_link": True, "vvtest_extra": False, "transformers": True}


def test_second_run_skips_setup(deploy, community_model, tmp_path):
    ok(deploy.run())
    first = deploy.seconds
    stamp = (deploy.home / ".first_run_complete").stat().st_mtime_ns
    venvs = deploy.venvs()

    # Converting another checkpoint checks the disk first. The volume folder is on / here, so the runpod
    # SDK's start-up check (RUNPOD_MIN_DISK_PERCENT of / free) counts: 100% makes any conversion too big.
    other = shutil.copytree(community_model, tmp_path / "other-community")
    done = deploy.run(MODEL_SOURCE=str(other), RUNPOD_MIN_DISK_PERCENT="100")
    assert done.returncode == 1
    line = last_line(done)
    assert line.startswith(f"bootstrap: FAILED not enough disk space for converting {other}: ")
    assert "that must stay free on / for the worker's start-up disk check" in line, line
    assert not (deploy.home / ".first_run_complete").exists()
    ok(deploy.run())  # the original request again: venv and converted model are reused
    stamp = (deploy.home / ".first_run_complete").stat().st_mtime_ns

    out = ok(deploy.run())
    print(f"first boot {first:.1f} s, second boot {deploy.seconds:.2f} s")
    assert "already set up" in out
    assert "building" not in out and "converting" not in out and "reference voice" not in out
    assert (deploy.home / ".first_run_complete").stat().st_mtime_ns == stamp
    assert deploy.venvs() == venvs
    assert deploy.probe()["HF_HUB_OFFLINE"] == "1"


def test_reference_voices_are_checked_and_missing_ones_retried_on_the_next_boot(deploy, mirrors):
    alice, name = "en-Alice_woman.wav", "en-Frank_man.wav"
    corrupted = bytearray(mirrors.good[alice])
    corrupted[1000] ^= 0xFF
    mirrors.served[0][alice] = bytes(corrupted)  # the first source serves a corrupted copy of Alice
    for served in mirrors.served:
        served[name] = mirrors.good[name][:-10]  # and a truncated Frank everywhere
    out = ok(deploy.run())
    assert f"voice {alice}: {mirrors.urls[0]}{alice} gave" in out and "not used" in out
    assert f"voice {alice}: fetched from {mirrors.urls[1]}{alice} (sha256 verified)" in out
    assert (deploy.home / "demo" / "voices" / alice).read_bytes() == mirrors.good[alice]
    assert f"warning: 1 reference voice(s) could not be fetched ({name})" in out
    assert not (deploy.home / "demo" / "voices" / name).exists()
    assert not [p for p in (deploy.home / "demo" / "voices").iterdir() if p.name.startswith(".")], "no partial files"
    assert deploy.flag()["voices"] == "incomplete"

    for served in mirrors.served:
        served[name] = mirrors.good[name]  # the source is back
    out = ok(deploy.run())
    assert "already set up" in out and "some reference voices are missing; trying to fetch them again" in out
    assert (deploy.home / "demo" / "voices" / name).read_bytes() == mirrors.good[name]
    assert deploy.flag()["voices"] == "complete"
    mirrors.requests.clear()
    assert "reference voices" not in ok(deploy.run()) and not mirrors.requests  # complete: no more fetching


def test_boot_runs_the_smallest_job_with_the_fetched_default_voice(deploy, tmp_path):
    job = {"input": {"text": "Hello!", "output_format": "wav", "max_new_tokens": 3, "diffusion_steps": 2, "seed": 3}}
    result_path = tmp_path / "result.json"
    env = {"WORKER_SCRIPT": str(ROOT / "handler.py"), "VIBEVOICE_TEST_OUTPUT": str(result_path), "DEVICE": "cpu"}
    out = ok(deploy.run("--test_input", json.dumps(job), timeout=600, **env))
    assert "starting the worker" in out
    result = json.loads(result_path.read_text())
    assert isinstance(result, list) and result[0]["status"] == "completed", result
    assert not [w for w in result[0].get("warnings", []) if "voice" in w], "the default voice Alice was used"
    audio = base64.b64decode(result[0]["audio_base64"])
    assert audio[:4] == b"RIFF" and result[0]["duration_sec"] > 0.3


def test_run_killed_midway_leaves_no_flag_and_the_next_run_repairs(deploy):
    process = deploy.start(BOOTSTRAP_STALE_SECONDS="2")
    wait_for(lambda: list((deploy.home / "venv").glob("*/.owner")), process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert not (deploy.home / ".first_run_complete").exists()
    [dead] = [p.parent for p in (deploy.home / "venv").glob("*/.owner")]

    time.sleep(2.5)  # its heartbeat goes stale
    out = ok(deploy.run(BOOTSTRAP_STALE_SECONDS="2"))
    assert f"removing the unfinished build {dead} (owner host-test, no heartbeat for" in out
    assert "building the virtual environment" in out
    assert not dead.exists() and deploy.venvs() == [deploy.venv().name]
    assert deploy.probe()["modules"]["vvtest_link"]


def test_two_workers_booting_together_build_once(deploy):
    first, second = deploy.start(HOSTNAME="host-a"), deploy.start(HOSTNAME="host-b")
    outputs = [process.communicate(timeout=300)[0] for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    logs = "".join(outputs)
    assert logs.count("building the virtual environment /") == 1
    assert logs.count("converting the community-layout checkpoint") == 1
    assert "set up by another worker" in logs or "already set up" in logs
    assert len(deploy.venvs()) == 1


def namespace_prefix(hostname: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """Run in new PID and UTS namespaces (bash is PID 1, as in a container) with its own host name;
    where `unshare` is not allowed, a separate process group with RUNPOD_POD_ID set instead."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--uts", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return (), {"RUNPOD_POD_ID": hostname}
    script = f'hostname {hostname} && unset HOSTNAME && exec "$@"'
    return ("unshare", "--pid", "--fork", "--uts", "bash", "-c", script, "bash"), {}


@pytest.mark.parametrize("lock", ["flock", "mkdir"])
def test_two_containers_racing_on_one_volume_one_killed_mid_build(deploy, lock):
    """Two boots in separate namespaces on one volume folder: A is killed while it builds; B, waiting
    for the lock, takes over, leaves A's folder alone while A's heartbeat is fresh, builds its own,
    and removes A's only once A's heartbeat is stale."""
    settings = {"BOOTSTRAP_LOCK": lock, "BOOTSTRAP_STALE_SECONDS": "3", "BOOTSTRAP_HEARTBEAT_SECONDS": "0.5",
                "BOOTSTRAP_LOCK_POLL_SECONDS": "0.2"}  # fmt: skip
    prefix_a, env_a = namespace_prefix("worker-a")
    prefix_b, env_b = namespace_prefix("worker-b")
    a = deploy.start(prefix=prefix_a, **settings, **env_a)
    wait_for(lambda: list((deploy.home / "venv").glob("*-worker-a-*/.owner")), a)
    b = deploy.start(prefix=prefix_b, **settings, **env_b)
    time.sleep(1.0)  # B is waiting for the lock
    assert b.poll() is None
    os.killpg(a.pid, signal.SIGKILL)  # the whole container A: bootstrap, pip, heartbeat
    a.communicate(timeout=30)
    [dead] = [p.parent for p in (deploy.home / "venv").glob("*-worker-a-*/.owner")]

    out, _ = b.communicate(timeout=300)
    assert b.returncode == 0, out
    if lock == "mkdir":
        assert "the setup lock" in out and "has had no heartbeat for" in out and "taking it over" in out
    assert "removing the unfinished build" in out and "owner worker-a" in out
    assert not dead.exists()
    [venv] = deploy.venvs()
    assert "-worker-b-" in venv and deploy.venv().name == venv
    if prefix_b:
        assert deploy.probe()["pid"] == 1, "bootstrap ran as PID 1, as in a container"


def test_flock_failing_falls_back_to_a_mkdir_lock(deploy, tmp_path):
    """A filesystem without flock: stood in for by a `flock` on PATH that fails as flock(1) does
    there (exit status 71, "No locks available")."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    (shadow / "flock").write_text("#!/bin/sh\necho 'flock: 9: No locks available' >&2\nexit 71\n")
    (shadow / "flock").chmod(0o755)
    out = ok(deploy.run(PATH=f"{shadow}:{os.environ['PATH']}"))
    assert "flock does not work on" in out and "(exit status 71); using a mkdir lock with a heartbeat" in out
    assert deploy.flag()["voices"] == "complete"
    assert not (deploy.home / ".bootstrap.lock.d").exists(), "the mkdir lock was released"


def test_a_live_mkdir_lock_is_waited_for_within_the_bound(deploy):
    lock = deploy.home / ".bootstrap.lock.d"
    lock.mkdir(parents=True)
    (lock / ".owner").write_text("owner=worker-z\ntoken=t\n")
    holder = subprocess.Popen(["bash", "-c", f"while sleep 0.2; do touch {lock / '.owner'}; done"])
    try:
        done = deploy.run(BOOTSTRAP_LOCK="mkdir", BOOTSTRAP_LOCK_TIMEOUT="2", BOOTSTRAP_LOCK_POLL_SECONDS="0.2")
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1
    assert "another worker (worker-z) is setting up the volume; waiting (at most 2s)" in done.stdout
    assert last_line(done).startswith("bootstrap: FAILED another worker held the setup lock")
    assert lock.is_dir(), "a live worker's lock is not broken"


def test_changed_requirements_rebuild_the_venv(deploy):
    ok(deploy.run())
    old = deploy.venv().name
    deploy.requirements.write_text("vvtest-link==1.0\nvvtest-extra==1.0\n")

    out = ok(deploy.run())
    assert "building the virtual environment" in out
    assert "converting" not in out, "the converted model is reused"
    new = deploy.venv().name
    assert new != old and new.startswith(deploy.flag()["requirements"])
    assert Path(deploy.probe()["prefix"]).name == new
    assert deploy.probe()["modules"]["vvtest_extra"]
    assert deploy.venvs() == sorted([old, new]), "the previous venv is kept for workers still running"


def test_broken_venv_is_rebuilt(deploy):
    ok(deploy.run())
    venv = deploy.venv()
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
    assert last_line(done) == f"bootstrap: FAILED the model folder {missing} has no config.json."
    assert not (deploy.home / ".first_run_complete").exists()

    deploy.requirements.write_text("vvtest-not-there==1.0\n")
    done = deploy.run()
    assert done.returncode == 1
    assert last_line(done) == f"bootstrap: FAILED while installing {deploy.requirements} (exit status 1)"
    assert not (deploy.home / ".first_run_complete").exists()


def test_not_enough_disk_space_fails_before_the_step_with_one_line(deploy):
    done = deploy.run(BOOTSTRAP_VENV_BYTES=str(10**15))
    assert done.returncode == 1
    line = last_line(done)
    assert line.startswith("bootstrap: FAILED not enough disk space for building the virtual environment: ")
    assert "GB needed (1000000.00 GB" in line and " GB free on " in line, line
    assert not list((deploy.home / "venv").iterdir()), "nothing was built"


def test_waiting_for_another_worker_is_bounded(deploy):
    deploy.home.mkdir(parents=True)
    with open(deploy.home / ".bootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker is (forever) setting up
        done = deploy.run(BOOTSTRAP_LOCK_TIMEOUT="1")
    assert done.returncode == 1
    assert "waiting (at most 1s)" in done.stdout
    assert last_line(done).startswith("bootstrap: FAILED another worker held the setup lock")


def test_the_lock_wait_stays_below_runpods_start_up_limit(deploy):
    deploy.home.mkdir(parents=True)
    with open(deploy.home / ".bootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = deploy.run(RUNPOD_INIT_TIMEOUT="602", BOOTSTRAP_START_RESERVE="600")
    assert "waiting (at most 2s)" in done.stdout, "the default wait is RUNPOD_INIT_TIMEOUT minus the reserve"
    with open(deploy.home / ".bootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = deploy.run(RUNPOD_INIT_TIMEOUT="602", BOOTSTRAP_LOCK_TIMEOUT="3")
    assert "BOOTSTRAP_LOCK_TIMEOUT (3s) leaves less than 600s of RUNPOD_INIT_TIMEOUT (602s)" in done.stdout


def warnings_in(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("bootstrap: WARNING")]


def test_a_worker_without_a_network_volume_is_told_what_each_cold_start_costs(deploy, tmp_path):
    """The volume folder is on / here, as on a worker without a network volume: one WARNING line, before
    the venv is built, naming the cost and the two ways out. The model comes from MODEL_SOURCE: not named."""
    out = ok(deploy.run())
    [warning] = warnings_in(out)
    assert f"no network volume: {deploy.home} is on the container disk" in warning
    assert "every cold start builds the 7.5 GB virtual environment again" in warning
    assert "Attach a network volume" in warning and "the self-contained image" in warning
    assert "downloads" not in warning
    assert out.index(warning) < out.index("building the virtual environment")
    assert warnings_in(ok(deploy.run())) == [], "a boot that finds its setup done pays nothing and says nothing"


def test_a_network_volume_or_the_self_contained_image_gets_no_warning(deploy, tmp_path):
    # /proc stands in for the container's own disk: the volume folder is then on another filesystem.
    assert warnings_in(ok(deploy.run(BOOTSTRAP_CONTAINER_DISK="/proc"))) == []
    # The self-contained image (dependencies in the image) with its model at hand: nothing to rebuild.
    home = tmp_path / "container-disk" / "vibevoice"
    image = {"VIBEVOICE_PYTHON": sys.executable, "BOOTSTRAP_CHECK_IMPORTS": "torch transformers"}
    out = ok(deploy.run(VIBEVOICE_HOME=str(home), **image))
    assert warnings_in(out) == [] and "building the virtual environment" not in out


def test_the_self_contained_image_without_a_cached_model_is_told_it_downloads_it(deploy, tmp_path):
    home = tmp_path / "container-disk" / "vibevoice"
    image = {"VIBEVOICE_PYTHON": sys.executable, "BOOTSTRAP_CHECK_IMPORTS": "torch transformers"}
    done = deploy.run(VIBEVOICE_HOME=str(home), MODEL_SOURCE="", MODEL_ID="acme/m", **image)
    assert done.returncode == 1  # offline here: the download itself fails, after the warning
    [warning] = warnings_in(done.stdout)
    assert "every cold start downloads acme/m again" in warning and "virtual environment" not in warning
    assert "cached model set to acme/m" in warning


# --- the model download, against a local stand-in for the Hugging Face Hub (tests/hf_standin.py) ---------


@pytest.fixture()
def hub(tmp_path: Path, tiny_model_dir: Path):
    standin = HubStandIn("acme/tiny-vibevoice", tiny_model_dir, throttle=20e6)
    url = standin.start()
    yield standin, url
    standin.stop()


def download_env(url: str, **extra: str) -> dict[str, str]:
    return {"MODEL_SOURCE": "", "MODEL_ID": "acme/tiny-vibevoice", "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", **extra}


def test_download_logs_progress_and_a_stall_then_checks_space_first(deploy, hub):
    standin, url = hub
    standin.stall_after, standin.stall_seconds = 11_000_000, 3.0
    out = ok(deploy.run(**download_env(url, BOOTSTRAP_PROGRESS_SECONDS="0.3", BOOTSTRAP_STALL_SECONDS="1.5")))
    total = sum(p.stat().st_size for p in standin.files().values())
    assert f"downloading acme/tiny-vibevoice: {total / 1e6:.1f} MB to fetch of {total / 1e6:.1f} MB (resumable)" in out
    lines = [line for line in out.splitlines() if line.startswith("bootstrap: downloading acme/tiny-vibevoice: ")]
    progress = [line for line in lines if " MB/s" in line]
    assert progress and all(f" of {total / 1e6:.1f} MB (" in line for line in progress), out
    assert any("left (" in line for line in progress), out
    stalled = [line for line in lines if ": stalled, no new bytes for " in line]
    assert stalled and stalled[0].startswith("bootstrap: downloading acme/tiny-vibevoice: stalled"), out
    snapshot = deploy.home / "hf_cache" / "models--acme--tiny-vibevoice" / "snapshots" / COMMIT
    assert deploy.flag()["model_path"] == str(snapshot)
    assert ok(deploy.run(**download_env("http://127.0.0.1:9"))).count("already set up") == 1  # offline now

    # Another model, with the venv in place: the free space is checked before anything is fetched. The
    # volume folder is on / here, so the SDK's share of / counts; 100% makes any download too big.
    standin.repo_id = "acme/other-vibevoice"
    done = deploy.run(**download_env(url, MODEL_ID="acme/other-vibevoice", RUNPOD_MIN_DISK_PERCENT="100"))
    assert done.returncode == 1
    line = last_line(done)
    assert line.startswith("bootstrap: FAILED not enough disk space for downloading acme/other-vibevoice: "), line
    assert " GB needed (19.0 MB plus " in line and "must stay free on / for the worker's start-up disk check" in line
    assert not list((deploy.home / "hf_cache").glob("models--acme--other-vibevoice/blobs/*")), "nothing downloaded"


def test_runpods_cached_model_without_refs_main_is_used_without_a_download(deploy, tiny_model_dir, tmp_path):
    cache = tmp_path / "huggingface-cache" / "hub"
    snapshot = cache / "models--acme--tiny-vibevoice" / "snapshots" / ("f" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    out = ok(deploy.run(**download_env("http://127.0.0.1:9", RUNPOD_HF_CACHE=str(cache))))
    assert f"using RunPod's cached model {snapshot}" in out and "downloading" not in out
    assert deploy.flag()["model_path"] == str(snapshot)
    assert deploy.probe()["MODEL_PATH"] == str(snapshot)
