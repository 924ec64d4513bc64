"""Shared fixtures: the tiny checkpoint (built once per session), voices, settings, engine, servers.

Mocked here: nothing. The model is the real VibeVoice code path with a tiny random-weight
checkpoint (no GPU and no real weights on test machines); S3 is moto's server on 127.0.0.1;
RunPod's public API is tools/runpod_emulator.py on 127.0.0.1 feeding the SDK's real worker loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The one-line reliability summary after the run (counts from the tests that ran): tests/reliability.py;
# how `make test` shares the tests among its processes: tests/scheduling.py.
pytest_plugins = ["reliability", "scheduling"]

# Tests never see the host's cloud settings.
for _name in list(os.environ):
    if _name.startswith(("S3_", "RUNPOD_")) or _name in ("MODEL_ID", "MODEL_PATH", "HF_TOKEN", "VIBEVOICE_CONFIG"):
        del os.environ[_name]
os.environ["HF_HUB_OFFLINE"] = "1"
# One seed for the run's generated inputs (tests/fuzzing.py), shared with pytest-xdist's worker processes,
# which inherit this environment.
os.environ.setdefault("FUZZ_SEED", str(random.SystemRandom().randrange(2**32)))
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's caches for this run, shared by every process in it (pytest-xdist's workers and the
# workers the tests start inherit the environment): a shape compiled once is a cache hit for the rest
# of the run, and no run reads an earlier run's cache, as on a fresh CI machine.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _COMPILE_CACHE = tempfile.mkdtemp(prefix="vibevoice-test-compile-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_COMPILE_CACHE, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(_COMPILE_CACHE, "triton")
else:
    _COMPILE_CACHE = None

from config import Settings, load_settings  # noqa: E402
from runtime import lifetime  # noqa: E402
from tools import tiny_checkpoint  # noqa: E402
from tools.local_home import write_demo_voices  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's compile cache goes with the process that made it (not with pytest-xdist's workers)."""
    if _COMPILE_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint.build_native(tmp_path_factory.mktemp("tiny-vibevoice"))


def make_volume(home: Path) -> Path:
    """The volume layout in `home`, with two demo voices (en-Alice_woman, en-Frank_man)."""
    for folder in ("hf_home", "hf_cache", "models", "output"):
        (home / folder).mkdir(parents=True, exist_ok=True)
    write_demo_voices(home / "demo" / "voices")
    return home


@pytest.fixture(scope="session")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VIBEVOICE_HOME with the volume layout and two demo voices (Alice, Frank)."""
    return make_volume(tmp_path_factory.mktemp("volume"))


@pytest.fixture(scope="session")
def make_settings(tiny_model_dir: Path, volume: Path):
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"model_path": tiny_model_dir, "vibevoice_home": volume, "device": "cpu"}
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture(scope="session")
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture(scope="session")
def engine(settings: Settings):
    from inference import VibeVoiceEngine

    return VibeVoiceEngine.load(settings)


@pytest.fixture()
def make_worker(engine, make_settings):
    """A Worker around the session's engine; keyword overrides change its settings."""
    from handler import Worker

    def make(storage=None, progress=None, **overrides: object):
        return Worker(make_settings(**overrides), engine, storage=storage, progress=progress)

    return make


@pytest.fixture()
def run_job(make_worker):
    """Run one job through Worker.collect (what the SDK's local modes call); return its result."""

    def run(job_input: dict, worker=None, job_id: str = "test-job"):
        worker = worker or make_worker()
        return asyncio.run(worker.collect({"id": job_id, "input": job_input}))

    return run


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    bucket: str

    def settings_overrides(self, **extra: object) -> dict:
        return {
            "s3_endpoint_url": self.endpoint,
            "s3_access_key_id": self.access_key_id,
            "s3_secret_access_key": self.secret_access_key,
            "s3_bucket_name": self.bucket,
            **extra,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name="us-east-1",
        )


def _start_moto(check_credentials: bool) -> tuple[subprocess.Popen, S3Server]:
    """moto's S3 server on 127.0.0.1 in its own process.

    With `check_credentials`, the first four requests are unauthenticated (they create a user,
    its key, its policy and the bucket) and every later request must be signed with that key,
    so wrong keys fail as on real S3. (moto cannot check presigned URLs in that mode, so the
    download tests use the server without credential checks.)
    """
    import boto3

    port = free_port()
    env = dict(os.environ)
    if check_credentials:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lifetime.die_with_parent,  # gone with the test session, however it ends
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, timeout=60)
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
                 "aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}  # fmt: skip
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="worker")
        key = iam.create_access_key(UserName="worker")["AccessKey"]
        policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
        iam.put_user_policy(UserName="worker", PolicyName="s3", PolicyDocument=policy)
        boto3.client("s3", **admin).create_bucket(Bucket="vibevoice-test")
    except BaseException:
        process.terminate()
        raise
    return process, S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], "vibevoice-test")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """S3 on 127.0.0.1 whose presigned URLs download (moto server, no credential checks)."""
    process, server = _start_moto(check_credentials=False)
    yield server
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_strict_server() -> Iterator[S3Server]:
    """S3 on 127.0.0.1 that checks every request's signature (wrong keys fail)."""
    process, server = _start_moto(check_credentials=True)
    yield server
    process.terminate()
    process.wait(timeout=10)


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def http_files(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server over a temp folder; yields (base URL, folder)."""
    handler = lambda *args, **kwargs: _QuietHandler(*args, directory=str(tmp_path), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


@dataclass
class RunpodAPI:
    """A RunPod API emulator on 127.0.0.1 with a live worker (`python handler.py`, the SDK's real loop)."""

    base_url: str  # like https://api.runpod.ai/v2/{endpoint_id}
    api_key: str
    emulator: object  # tools.runpod_emulator.RunpodEmulator
    worker: object  # tools.runpod_emulator.WorkerProcess

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None, key: str | None = None, timeout: float = 120):
        """One request to `base_url + path`; returns (HTTP status, JSON body)."""
        headers = dict(self.headers)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}" if key else ""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def wait_for(self, job_id: str, statuses: set[str], timeout: float = 120, interval: float = 0.1) -> dict:
        """Poll /status until the job's status is one of `statuses` (bounded in time)."""
        deadline = time.monotonic() + timeout
        while True:
            status, reply = self.call("GET", f"/status/{job_id}")
            assert status == 200, reply
            if reply["status"] in statuses:
                return reply
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {reply['status']} after {timeout} s")
            time.sleep(interval)


def start_runpod_api(
    log_path: Path, worker_env: dict[str, str], command: list[str] | None = None, **emulator_options: object
):
    """Start an emulator and a worker; returns (emulator, worker) once the worker polls for jobs.

    `command` replaces `python handler.py` (e.g. a wrapper that injects a fault)."""
    from tools.runpod_emulator import RunpodEmulator

    emulator = RunpodEmulator("test-key-" + os.urandom(6).hex(), **emulator_options).start()
    worker = emulator.start_worker(worker_env, log_path=log_path, command=command)
    try:
        worker.wait_until_polling(timeout=180)
    except BaseException:
        worker.stop()
        emulator.stop()
        raise
    return emulator, worker


@contextlib.contextmanager
def running_api(
    log_path: Path, worker_env: dict[str, str], command: list[str] | None = None, **emulator_options: object
) -> Iterator[RunpodAPI]:
    """An emulator with one live worker for the length of a `with` block (or a fixture's yield)."""
    emulator, worker = start_runpod_api(log_path, worker_env, command, **emulator_options)
    try:
        yield RunpodAPI(emulator.base_url, emulator.api_key, emulator, worker)
    finally:
        worker.stop()
        emulator.stop()


@pytest.fixture(scope="session")
def runpod_api(tiny_model_dir: Path, volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodAPI]:
    """RunPod's public API on 127.0.0.1 (tools/runpod_emulator.py) fed by one live worker process
    running the SDK's production loop with the tiny checkpoint. Jobs queue as on RunPod."""
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu"}
    with running_api(tmp_path_factory.mktemp("runpod-worker") / "worker.log", env) as api:
        yield api


# name -> seconds of audio it holds; each is a few MB at most.
BOMB_SECONDS = {"flac": 7200, "mp3": 3600, "opus": 7200}


def made_once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that `make` fills once per test run, shared by all of `make test`'s pytest processes
    (xdist's workers share the parent of their base folders); a lock lets one make it, the others wait."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def make_bombs(folder: Path) -> None:
    import bombs

    for kind, seconds in BOMB_SECONDS.items():
        (folder / f"{kind}.bomb").write_bytes(bombs.bomb(kind, seconds))
    (folder / "wav.bomb").write_bytes(bombs.wav_claiming(4 * 1024**3, real_seconds=400.0))


@pytest.fixture(scope="session")
def bomb_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bombs, made once per run: FLAC, low-bitrate MP3 and Ogg/Opus holding hours, and a WAV
    whose header claims 4 GB in front of 400 s of 8 kHz audio (within the byte cap)."""
    folder = made_once_per_run(tmp_path_factory, "bombs", make_bombs)
    return {kind: folder / f"{kind}.bomb" for kind in (*BOMB_SECONDS, "wav")}


@dataclass
class TrickleServer:
    """An HTTP server on 127.0.0.1 that sends one byte a second (at most `max_bytes` per answer).

    `/body` sends its headers at once and then trickles a WAV body; `/headers` trickles from the
    status line on. `cut` counts the answers the client hung up on before they were complete."""

    base_url: str
    max_bytes: int
    cut: list[str]
    stop: threading.Event

    def wait_for_cuts(self, count: int, timeout: float = 10) -> list[str]:
        """The paths of the answers cut short, once there are `count` (the server notices a hang-up
        at its next byte), or as many as there are after `timeout`."""
        deadline = time.monotonic() + timeout
        while len(self.cut) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return sorted(self.cut)


class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"RIFF" + b"\0" * (self.server.trickle.max_bytes - 4)
        if self.path == "/headers":
            head = f"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            self._trickle(head + body)
        else:
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.end_headers()
            self.wfile.flush()
            self._trickle(body)

    def _trickle(self, data: bytes) -> None:
        for index in range(min(len(data), self.server.trickle.max_bytes)):
            try:
                self.wfile.write(data[index : index + 1])
                self.wfile.flush()
            except OSError:  # the client hung up
                self.server.trickle.cut.append(self.path)
                return
            if self.server.trickle.stop.wait(1.0):
                return
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def trickle_server() -> Iterator[TrickleServer]:
    """A server that trickles one byte a second for at most 90 s per answer (so a client without a
    wall-clock deadline is held that long, and the test still ends)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    server.trickle = TrickleServer(f"http://127.0.0.1:{server.server_address[1]}", 90, [], threading.Event())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.trickle
    server.trickle.stop.set()
    server.shutdown()
    server.server_close()
