"""Worker processes: a worker killed mid-job, and nothing left running after `make serve` ends.

A worker SIGKILLed mid-job (what the out-of-memory killer does) under the emulator: the job goes
back to the queue, as RunPod retries the jobs of a lost worker, and a restarted worker serves it
and the next one; a job whose worker is lost once more than it may be retried ends FAILED with one
sentence. The runpod SDK's heartbeat (a fork of the worker) dies with the worker.

`make serve` (`python -m tools.runpod_emulator`) ended by SIGKILL of the emulator or by SIGTERM of
its process group leaves no process behind, and neither does the bridge (`node scripts/serve.js`)
when Node is SIGKILLed: its workerd child dies with it. Every process is counted by a marker in its
environment, which the worker, its heartbeat and workerd inherit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, RunpodAPI, free_port, wait_for_port
from test_bridge_e2e import start_bridge

from runtime import lifetime
from tools.runpod_emulator import LOST_WORKER_ERROR, RunpodEmulator

pytestmark = pytest.mark.slow
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
TAG = "VIBEVOICE_PROCESS_TAG"
# Long enough to be killed mid-way on a slow machine; the tiny model never stops before its cap.
LONG = {"text": "A job that runs for a while. " * 6, "max_new_tokens": 120, "diffusion_steps": 4,
        "max_chunk_chars": 60, "output_format": "pcm_16"}  # fmt: skip
SHORT = {"text": "Next.", "max_new_tokens": 2, "diffusion_steps": 1, "output_format": "pcm_16"}


def tagged(tag: str) -> list[int]:
    """Every live process whose environment carries TAG=tag."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{TAG}={tag}".encode() in environ and state != "Z":  # zombies are already dead
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        time.sleep(0.2)


def until_running(api: RunpodAPI, job_id: str) -> dict:
    """Wait for the job's first progress update: its handler is really generating."""
    return wait_until(lambda: (r := api.call("GET", f"/status/{job_id}")[1]).get("output") and r, 180, "progress")


@pytest.mark.fault
def test_a_killed_worker_s_job_is_retried_and_a_restarted_worker_serves(tiny_model_dir, volume, tmp_path) -> None:
    emulator = RunpodEmulator("k-" + uuid.uuid4().hex, worker_timeout_s=10).start()
    try:
        env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu"}
        api = RunpodAPI(emulator.base_url, emulator.api_key, emulator, None)

        first_tag = uuid.uuid4().hex
        first = emulator.start_worker({**env, TAG: first_tag}, pod_id="worker-a", log_path=tmp_path / "a.log")
        first.wait_until_polling(180)
        assert len(tagged(first_tag)) == 2  # the worker and the SDK's heartbeat process
        job_id = api.call("POST", "/run", {"input": LONG})[1]["id"]
        until_running(api, job_id)
        os.kill(first.process.pid, signal.SIGKILL)  # the worker alone, as the out-of-memory killer does
        queued = wait_until(lambda: (r := api.call("GET", f"/status/{job_id}")[1])["status"] == "IN_QUEUE" and r,
                            30, "the lost job back in the queue")  # fmt: skip
        assert "output" not in queued and "error" not in queued
        assert api.call("GET", "/health")[1]["jobs"]["retried"] == 1
        wait_until(lambda: not tagged(first_tag), 15, "the heartbeat ending with its worker")
        first.stop()

        second_tag = uuid.uuid4().hex
        second = emulator.start_worker({**env, TAG: second_tag}, pod_id="worker-b", log_path=tmp_path / "b.log")
        second.wait_until_polling(180)
        retried = api.wait_for(job_id, FINAL, timeout=300)
        assert retried["status"] == "COMPLETED" and retried["workerId"] == "worker-b", retried
        next_job = api.call("POST", "/runsync", {"input": SHORT})[1]
        assert next_job["status"] == "COMPLETED", next_job

        emulator.lost_worker_retries = 0  # no retry left: the next lost job fails
        job_id = api.call("POST", "/run", {"input": LONG})[1]["id"]
        until_running(api, job_id)
        os.kill(second.process.pid, signal.SIGKILL)
        failed = api.wait_for(job_id, FINAL, timeout=30)
        assert failed["status"] == "FAILED" and failed["error"] == LOST_WORKER_ERROR, failed
        wait_until(lambda: not tagged(second_tag), 15, "the heartbeat ending with its worker")
        second.stop()
    finally:
        emulator.stop()


def start_serve(tiny_model_dir: Path, home: Path, tag: str) -> tuple[subprocess.Popen, int]:
    """What `make serve` runs, in a process group of its own (as make's would be)."""
    port = free_port()
    env = {**os.environ, TAG: tag, "MODEL_PATH": str(tiny_model_dir), "DEVICE": "cpu", "SERVE_API_KEY": "serve-key"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.runpod_emulator", "--port", str(port), "--home", str(home)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=lifetime.die_with_parent,
    )  # fmt: skip
    wait_for_port(port, timeout=60)

    def ready() -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/vibevoice-local/health",
                                         headers={"Authorization": "Bearer serve-key"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["workers"]["idle"] >= 1

    wait_until(ready, 180, "the worker polling for jobs")
    return process, port


@pytest.mark.parametrize("ending", ["SIGKILL of the emulator", "SIGTERM of the process group"])
def test_make_serve_leaves_no_process_behind(tiny_model_dir, tmp_path, ending: str) -> None:
    tag = uuid.uuid4().hex
    before = tagged(tag)
    process, _ = start_serve(tiny_model_dir, tmp_path / "home", tag)
    try:
        running = tagged(tag)
        assert len(running) == 3, running  # emulator, worker, the worker's heartbeat
        if ending.startswith("SIGKILL"):
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        wait_until(lambda: not tagged(tag), 30, f"every process gone after {ending}")
    finally:
        for pid in tagged(tag):  # never leave one behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
    assert before == [] and tagged(tag) == []


def test_the_bridge_s_workerd_dies_with_node(tmp_path) -> None:
    """Miniflare's workerd outlives a SIGKILLed Node unless started through tools/workerd_with_parent.py."""
    tag = uuid.uuid4().hex
    process, _ = start_bridge("http://127.0.0.1:9/v2/none", "key", tmp_path / "bridge.log", **{TAG: tag})
    try:
        running = tagged(tag)
        assert len(running) == 2, running  # node, workerd
        process.kill()
        process.wait(timeout=60)
        wait_until(lambda: not tagged(tag), 30, "workerd gone after SIGKILL of Node")
    finally:
        for pid in tagged(tag):
            os.kill(pid, signal.SIGKILL)
    assert tagged(tag) == []
