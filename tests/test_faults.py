"""Faults through RunPod's API (the emulator on 127.0.0.1) and the SDK's real worker loop.

Each fault ends in a clear outcome: a job FAILED with one sentence (or COMPLETED with a warning
where the documented fallback applies), the worker serving the next job, or the worker exiting
with one clear line. Nothing is lost and nothing is written to disk in place of a delivery.

Most faults run against one worker started through tests/fault_worker.py: the real handler, with
every file write refused (RLIMIT_FSIZE=0: a disk that takes no byte) and an exception that can be
injected inside generation (a real model fault cannot be provoked on demand). Its S3 endpoint is a
proxy on 127.0.0.1 in front of moto's server, which a test can switch to hang or to drop
connections. The failed model load and SIGTERM need workers of their own.

Counted elsewhere (not repeated here): S3 wrong credentials, unknown key, missing bucket and an
unreachable endpoint at the delivery level (test_storage.py), CUDA out-of-memory (test_decoder.py,
simulated: no GPU here), cancellation and execution timeouts (test_runpod_emulator.py,
test_streaming_runpod.py), a failure mid-stream (test_streaming.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from audio_helpers import probe
from conftest import ROOT, RunpodAPI, make_volume, running_api, start_runpod_api
from test_bridge_e2e import start_bridge

# One xdist worker runs this module (its fixtures start a fault-injecting worker).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("faults")]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
TINY = {"max_new_tokens": 3, "diffusion_steps": 2}
VALID = {"text": "Still serving.", "output_format": "pcm_16", "return": "base64", **TINY}
MARKER = "FAULTMARKER"  # a job whose text holds it raises inside generation (tests/fault_worker.py)
INTERNAL_ERROR = "internal error while generating audio (RuntimeError); the job was not completed."
PROGRESS = re.compile(r"s of audio generated")
TRACEBACK = re.compile(r'Traceback|File "|, line \d+, in ')


class S3Gate:
    """A TCP proxy on 127.0.0.1 in front of an S3 server. `mode`: "pass" forwards, "stall" accepts
    and never answers (an endpoint that hangs), "reset" accepts and closes at once."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.mode = "pass"
        self.refused = 0  # connections stalled or reset
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def switch(self, mode: str) -> None:
        """Change the mode; connections already open are closed (no pooled connection slips past)."""
        with self._lock:
            self.mode, self.refused = mode, 0
            for sock in self._open:
                _close(sock)
            self._open.clear()

    def close(self) -> None:
        self.switch("pass")
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self.mode != "pass":
                    self.refused += 1
                if self.mode == "reset":
                    _close(client)
                    continue
                self._open.append(client)
                if self.mode == "stall":
                    continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture(scope="module")
def gate(s3_server) -> Iterator[S3Gate]:
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    gate = S3Gate(port)
    yield gate
    gate.close()


@pytest.fixture(scope="module")
def fault_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume of the fault worker's own: tests here break its voices."""
    return make_volume(tmp_path_factory.mktemp("fault-volume"))


@pytest.fixture(scope="module")
def fault_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-worker-tmp")


@pytest.fixture(scope="module")
def fault_api(tiny_model_dir, fault_home, fault_tmp, s3_server, gate, tmp_path_factory) -> Iterator[RunpodAPI]:
    env = {
        "MODEL_PATH": str(tiny_model_dir),
        "VIBEVOICE_HOME": str(fault_home),
        "DEVICE": "cpu",
        "MAX_CONCURRENCY": "2",
        "TMPDIR": str(fault_tmp),
        "FAULT_NO_FILE_WRITES": "1",
        "FAULT_GENERATION_MARKER": MARKER,
        "S3_ENDPOINT_URL": gate.endpoint,
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "S3_BUCKET_NAME": s3_server.bucket,
        "S3_TIMEOUT": "1",
        "S3_MAX_ATTEMPTS": "2",
        "S3_UPLOAD_DEADLINE": "20",
        # Voice URLs on the test's own servers, with a short deadline (test_trickling_voice_urls...).
        "VOICE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
        "VOICE_FETCH_TIMEOUT": "2",
    }
    log_path = tmp_path_factory.mktemp("fault-worker") / "worker.log"
    with running_api(log_path, env, command=[sys.executable, str(ROOT / "tests" / "fault_worker.py")]) as api:
        yield api


def run(api: RunpodAPI, job_input: dict, timeout: float = 120) -> dict:
    """One job through /run and /status; its final reply."""
    status, job = api.call("POST", "/run", {"input": job_input})
    assert status == 200, job
    return api.wait_for(job["id"], FINAL, timeout=timeout)


def failed_with(reply: dict, sentence: str) -> str:
    assert reply["status"] == "FAILED", reply
    message = reply["error"]
    assert sentence in message, message
    assert not TRACEBACK.search(message) and "\n" not in message, message
    return message


def still_serving(api: RunpodAPI) -> None:
    reply = run(api, VALID)
    assert reply["status"] == "COMPLETED", reply
    assert len(base64.b64decode(reply["output"][0]["audio_base64"])) == 3 * 3200 * 2


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# --- a disk that takes no byte --------------------------------------------------------------------


@pytest.mark.fault
def test_jobs_complete_while_every_file_write_fails(fault_api: RunpodAPI, fault_home: Path, fault_tmp: Path) -> None:
    """The worker writes nothing during a job: audio is encoded in memory and uploaded from memory,
    so a full disk changes nothing, whatever the delivery."""
    assert "fault: file writes are refused (RLIMIT_FSIZE=0)" in fault_api.worker.log_path.read_text()
    volume_before = snapshot(fault_home)
    # What the worker made before its first job stays out: torch 2.8 creates an empty temporary
    # directory when it is imported (torch.distributed.nn.jit.instantiator) and removes it at exit.
    tmp_before = snapshot(fault_tmp)

    inline = run(fault_api, {"text": "Inline result.", "output_format": "wav", "return": "base64", **TINY})
    assert inline["status"] == "COMPLETED", inline
    assert probe(base64.b64decode(inline["output"][0]["audio_base64"])).codec == "pcm_s16le"

    uploaded = run(fault_api, {"text": "Uploaded result.", "output_format": "mp3", "return": "url", **TINY})
    assert uploaded["status"] == "COMPLETED", uploaded
    assert uploaded["output"][0]["delivery"] == "url"
    with urllib.request.urlopen(uploaded["output"][0]["audio_url"], timeout=30) as response:
        assert probe(response.read()).codec == "mp3float"

    streamed = run(fault_api, {"text": "Streamed result.", "output_format": "pcm_16", "stream": True, **TINY})
    assert streamed["status"] == "COMPLETED", streamed
    assert streamed["output"][-1]["status"] == "complete"

    assert snapshot(fault_home) == volume_before
    assert snapshot(fault_tmp) == tmp_before
    assert "File too large" not in fault_api.worker.log_path.read_text()


# --- S3 that hangs or drops the connection ----------------------------------------------------------

# The cause each fault leaves in the worker's log; the job itself says only that storage failed.
S3_FAULTS = {"stall": "ReadTimeoutError", "reset": "ConnectionClosedError"}
STORAGE_FAILED = "the audio could not be uploaded to the endpoint's storage (S3; the cause is in the worker's log)"


@pytest.mark.fault
@pytest.mark.parametrize("mode", sorted(S3_FAULTS))
def test_s3_fault_falls_back_to_base64_or_fails_within_bounded_retries(
    fault_api: RunpodAPI, gate: S3Gate, mode
) -> None:
    """S3_TIMEOUT=1 and S3_MAX_ATTEMPTS=2: two connections, then the documented outcome."""
    gate.switch(mode)
    try:
        small = run(fault_api, {"text": "Small result.", "output_format": "pcm_16", **TINY})
        assert gate.refused == 2  # bounded retries: S3_MAX_ATTEMPTS connections, no more
        assert small["status"] == "COMPLETED", small
        item = small["output"][0]
        assert item["delivery"] == "base64" and "audio_base64" in item
        assert f"{STORAGE_FAILED}; the audio is returned as base64 instead." in item["warnings"]
        assert small["executionTime"] < 30_000  # bounded: not stuck on a dead endpoint

        gate.switch(mode)
        failed = run(fault_api, {"text": "Needs a URL.", "output_format": "pcm_16", "return": "url", **TINY})
        failed_with(failed, STORAGE_FAILED)
        assert gate.refused == 2
    finally:
        gate.switch("pass")
    assert f"failed: {S3_FAULTS[mode]}" in fault_api.worker.log_path.read_text()  # the cause, for the operator
    recovered = run(fault_api, {"text": "S3 is back.", "output_format": "pcm_16", "return": "url", **TINY})
    assert recovered["status"] == "COMPLETED" and recovered["output"][0]["delivery"] == "url", recovered


@pytest.mark.fault
def test_bridge_replies_hold_no_storage_internals(fault_api: RunpodAPI, gate: S3Gate, tmp_path: Path) -> None:
    """S3 drops every connection and a job fails inside generation, behind `make bridge`'s script:
    no reply in any mode (whole file, word timestamps with the worker's warnings, SSE, raw stream)
    names the storage endpoint, the bucket, an object key or a traceback; the worker's log has the
    cause for the operator."""
    token = "faults-" + os.urandom(6).hex()
    process, origin = start_bridge(
        fault_api.base_url, fault_api.api_key, tmp_path / "bridge.log", AUTH_TOKEN=token,
        STREAM_AUDIO="false", PRESET_VOICES="en-Alice_woman,en-Frank_man", POLL_INITIAL_MS="100",
    )  # fmt: skip
    seen = []
    gate.switch("reset")
    try:
        for extra in ({}, {"timestamps": True}, {"stream_format": "sse"}, {"stream_format": "audio"}):
            for text in ("Stored nowhere.", f"A {MARKER} inside generation."):
                body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav", **TINY, **extra}
                request = urllib.request.Request(
                    f"{origin}/v1/audio/speech", data=json.dumps(body).encode(), method="POST",
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )  # fmt: skip
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        seen.append(f"{response.status} {dict(response.headers)} {response.read()[-4000:]!r}")
                except urllib.error.HTTPError as error:
                    seen.append(f"{error.code} {dict(error.headers)} {error.read()!r}")
    finally:
        gate.switch("pass")
        process.terminate()
        process.wait(timeout=20)
    everything = "\n".join(seen)
    assert "base64 instead" in everything  # the worker's warning came back (timestamps), in its words
    assert "failed while generating the audio" in everything
    for internal in (str(gate.port), "vibevoice-test", "vibevoice/20", "Traceback", "botocore", "RuntimeError"):
        assert internal not in everything, internal
    assert "ConnectionClosedError" in fault_api.worker.log_path.read_text()


# --- servers that trickle ------------------------------------------------------------------------


@pytest.mark.fault
def test_trickling_voice_urls_cannot_hold_the_worker(fault_api: RunpodAPI, trickle_server) -> None:
    """Voice URLs on a server that sends one byte a second, more of them than the worker takes at
    once (MAX_CONCURRENCY=2): each job fails at its VOICE_FETCH_TIMEOUT (2 s) with the connection
    cut, so no job or thread is held, and the next normal job completes. Without a wall-clock
    deadline each would hold its slot for the server's 90 s."""
    jobs = []
    for number in range(5):
        job = {"text": f"Trickled voice {number}.", "voice_url": f"{trickle_server.base_url}/body", **TINY}
        status, reply = fault_api.call("POST", "/run", {"input": job})
        assert status == 200, reply
        jobs.append(reply["id"])
    for job_id in jobs:
        failed_with(fault_api.wait_for(job_id, FINAL, timeout=60), "'voice_url' timed out after 2 s.")
    assert trickle_server.wait_for_cuts(5) == ["/body"] * 5  # every connection was cut, none left open
    still_serving(fault_api)


# --- a fault inside generation --------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("stream", [False, True], ids=["whole file", "streamed"])
def test_exception_inside_generation_fails_the_job_and_the_next_one_runs(fault_api: RunpodAPI, stream: bool) -> None:
    """Injected in the worker process (tests/fault_worker.py): the decode loop's step callback raises
    while the engine holds its lock, as a model or GPU fault would."""
    job = {"text": f"This job meets a {MARKER} inside generation.", "output_format": "pcm_16", **TINY}
    reply = run(fault_api, {**job, "stream": stream})
    failed_with(reply, INTERNAL_ERROR)
    log = fault_api.worker.log_path.read_text()
    assert "injected fault inside generation" in log  # the traceback is in the worker's log, for the operator
    still_serving(fault_api)  # the engine's lock was released


# --- broken voice files ---------------------------------------------------------------------------


@pytest.mark.fault
def test_corrupt_voice_file_fails_naming_the_voice(fault_api: RunpodAPI, fault_home: Path) -> None:
    (fault_home / "demo" / "voices" / "Broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(4000))
    reply = run(fault_api, {"text": "Broken voice.", "speaker": "Broken", **TINY})
    failed_with(reply, "'speaker': voice 'Broken' could not be read: the wav audio could not be decoded")
    still_serving(fault_api)


@pytest.mark.fault
def test_voice_file_replaced_by_a_corrupt_one_after_use(fault_api: RunpodAPI, fault_home: Path) -> None:
    """The worker caches decoded voices; a changed file is read again, never served stale."""
    voices = fault_home / "demo" / "voices"
    shutil.copy(voices / "en-Alice_woman.wav", voices / "Dora.wav")
    assert run(fault_api, {"text": "Dora speaks.", "speaker": "Dora", **TINY})["status"] == "COMPLETED"
    (voices / "Dora.wav").write_bytes(b"not audio at all" * 100)
    later = time.time() + 5
    os.utime(voices / "Dora.wav", (later, later))
    reply = run(fault_api, {"text": "Dora again.", "speaker": "Dora", **TINY})
    failed_with(reply, "'speaker': voice 'Dora' could not be read")
    still_serving(fault_api)


@pytest.mark.fault
def test_voice_deleted_after_the_listing(fault_api: RunpodAPI, fault_home: Path) -> None:
    voices = fault_home / "demo" / "voices"
    shutil.copy(voices / "en-Frank_man.wav", voices / "Carol.wav")
    listed = run(fault_api, {"action": "list_voices"})
    assert "Carol" in {voice["name"] for voice in listed["output"][0]["voices"]}
    (voices / "Carol.wav").unlink()
    reply = run(fault_api, {"text": "Carol speaks.", "speaker": "Carol", **TINY})
    message = failed_with(reply, "'speaker': unknown voice 'Carol'; available voices: ")
    assert "en-Alice_woman" in message  # what the client can use instead
    still_serving(fault_api)


# --- the model does not load ------------------------------------------------------------------------


@pytest.mark.fault
def test_model_load_failure_marks_the_worker_unhealthy_and_it_exits(tmp_path: Path, volume: Path) -> None:
    """On RunPod a failed load registers a failing fitness check: the SDK reports the worker
    unhealthy (ping with status=unhealthy and the reason) and exits 1. No job is taken."""
    from tools.runpod_emulator import RunpodEmulator

    env = {"MODEL_PATH": str(tmp_path), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu"}
    with RunpodEmulator("test-key-" + os.urandom(6).hex()) as emulator:
        api = RunpodAPI(emulator.base_url, emulator.api_key, emulator, None)
        _, queued = api.call("POST", "/run", {"input": VALID})
        with emulator.start_worker(env, log_path=tmp_path / "worker.log") as worker:
            returncode = worker.process.wait(timeout=120)
        log = (tmp_path / "worker.log").read_text()
        health = api.call("GET", "/health")[1]
        assert returncode == 1
        reason = f"MODEL_PATH {tmp_path} has no config.json."
        assert f"vibevoice worker: model failed to load: {reason}" in log.splitlines()
        assert f"Fitness check failed: model_loaded | RuntimeError: model failed to load: {reason}" in log
        assert health["workers"]["unhealthy"] == 1
        assert health["workers"]["idle"] == 0 and health["workers"]["running"] == 0
        assert api.call("GET", f"/status/{queued['id']}")[1]["status"] == "IN_QUEUE"  # left for a healthy worker


# --- SIGTERM while jobs run ---------------------------------------------------------------------------


@pytest.mark.fault
def test_sigterm_reports_every_job_the_worker_holds(tiny_model_dir: Path, volume: Path, tmp_path: Path) -> None:
    """RunPod sends SIGTERM before it removes a worker. The job that can finish in time completes;
    a job still running SHUTDOWN_TIMEOUT seconds after the signal is stopped and FAILED; a job the
    SDK takes during the shutdown (its job-take poll was already open) is FAILED as never started.
    None stays IN_PROGRESS and the worker exits 0."""
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu",
           "MAX_CONCURRENCY": "3", "SHUTDOWN_TIMEOUT": "12"}  # fmt: skip
    # A long job-take hold keeps the SDK's poll open through the shutdown, as on RunPod.
    emulator, worker = start_runpod_api(tmp_path / "worker.log", env, poll_hold_s=30)
    api = RunpodAPI(emulator.base_url, emulator.api_key, emulator, worker)
    try:
        # The two jobs decode in one batch: the endless one as a single chunk, so the short one's
        # frames stay cheap on two shared cores.
        short = {
            "text": "A shorter job, which still has time to finish after the signal and is delivered.",
            "max_new_tokens": 30,
            "diffusion_steps": 2,
        }
        endless = {
            "text": " ".join(["A job far too long to finish before the worker goes."] * 20),
            "diffusion_steps": 2,
            "max_chunk_chars": 5000,
        }
        _, first = api.call("POST", "/run", {"input": short})
        deadline = time.monotonic() + 60
        while not PROGRESS.search(str(api.call("GET", f"/status/{first['id']}")[1].get("output"))):
            assert time.monotonic() < deadline, "the first job did not start"
            time.sleep(0.02)
        _, second = api.call("POST", "/run", {"input": endless})
        api.wait_for(second["id"], {"IN_PROGRESS"}, timeout=30, interval=0.02)
        polled = emulator.polling_event(worker.pod_id)
        polled.clear()
        assert polled.wait(30), "the SDK did not ask for another job"  # its job-take poll is now open

        os.kill(worker.process.pid, signal.SIGTERM)  # what RunPod sends; the SDK stops taking jobs
        time.sleep(1.0)
        _, late = api.call("POST", "/run", {"input": VALID})  # taken by the poll that was already open
        api.wait_for(late["id"], {"IN_PROGRESS"}, timeout=30, interval=0.05)
        emulator.release_worker(worker.pod_id)  # RunPod answers the worker's other held polls

        returncode = worker.process.wait(timeout=60)
        first_reply, second_reply, late_reply = (api.wait_for(job["id"], FINAL, 10) for job in (first, second, late))
        assert returncode == 0
        assert first_reply["status"] == "COMPLETED", first_reply
        assert first_reply["output"][0]["duration_sec"] == pytest.approx(30 * 3200 / 24000, abs=0.01)
        failed_with(second_reply, "the worker was shut down before the job finished, so no audio was delivered")
        assert second_reply["executionTime"] >= 12000
        failed_with(late_reply, "the worker was shut down before the job started, so nothing was generated")
        log = worker.log_path.read_text()
        assert "SIGTERM: taking no more jobs; running jobs may finish (12 s)" in log
        assert f"1 job(s) taken but not started were reported failed: {late['id']}" in log
        assert api.call("GET", "/health")[1]["jobs"]["inProgress"] == 0
    finally:
        worker.stop()
        emulator.stop()
