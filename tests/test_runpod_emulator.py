"""RunPod's public API as clients see it: tools/runpod_emulator.py on 127.0.0.1 feeding the SDK's
real worker loop (`python handler.py` in production mode, the tiny checkpoint).

Nothing is mocked: jobs go through the emulator's queue, the SDK's job-take / job-stream /
job-done / job-stop calls and the real handler. Only the GPU and the real weights are absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from audio_helpers import check_audio
from conftest import RunpodAPI, start_runpod_api

from tools.runpod_emulator import (
    RATE_LIMITS,
    RunpodBehaviour,
    RunpodEmulator,
    add_behaviour_arguments,
    behaviour_from,
    build_parser,
)

pytestmark = pytest.mark.slow
FAST = {"max_new_tokens": 4, "diffusion_steps": 3}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# Four chunks of 40 frames: seconds of work; a progress update comes with the first decoded frames.
LONG_TEXT = " ".join(["This sentence is here to make a long job that runs for a while."] * 4)
LONG = {"text": LONG_TEXT, "max_chunk_chars": 70, "max_new_tokens": 40, "diffusion_steps": 3}
PROGRESS = re.compile(
    r"^(\d+\.\d s of audio generated, \d+ of \d+ chunks done|chunk \d+ of \d+ done, \d+\.\d s of audio generated)$"
)


def start_long_job(api: RunpodAPI, **extra: object) -> str:
    """Queue a long job and return its id once the engine is generating (its first progress update)."""
    status, job = api.call("POST", "/run", {"input": LONG, **extra})
    assert status == 200 and job["status"] == "IN_QUEUE"
    deadline = time.monotonic() + 60
    while not PROGRESS.match(str((reply := api.call("GET", f"/status/{job['id']}")[1]).get("output"))):
        assert reply["status"] in ("IN_QUEUE", "IN_PROGRESS") and time.monotonic() < deadline, reply
        time.sleep(0.03)
    return job["id"]


def wait_for_log(path: Path, text: str, timeout: float = 90) -> None:
    """The worker's log gets `text` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in the worker log"
        time.sleep(0.1)


# --- the operations, with the live worker -------------------------------------------------------


def test_run_then_status_completes_with_audio(runpod_api: RunpodAPI) -> None:
    status, job = runpod_api.call("POST", "/run", {"input": {"text": "Queued job.", "output_format": "wav", **FAST}})
    assert status == 200
    assert job == {"id": job["id"], "status": "IN_QUEUE"}
    reply = runpod_api.wait_for(job["id"], FINAL)
    assert reply["status"] == "COMPLETED", reply
    assert reply["id"] == job["id"] and reply["workerId"] == runpod_api.worker.pod_id
    assert isinstance(reply["delayTime"], int) and reply["executionTime"] > 0
    item = check_audio(reply["output"])
    assert item["duration_sec"] == pytest.approx(4 * 3200 / 24000, abs=1e-3)
    # A finished job stays readable (30 minutes after /run).
    assert runpod_api.call("GET", f"/status/{job['id']}") == (200, reply)


def test_runsync_returns_the_result(runpod_api: RunpodAPI) -> None:
    status, reply = runpod_api.call("POST", "/runsync", {"input": {"text": "Right away.", **FAST}})
    assert status == 200
    assert reply["status"] == "COMPLETED" and reply["id"].startswith("sync-")
    check_audio(reply["output"])


def test_runsync_shorter_wait_than_the_job_answers_in_progress(runpod_api: RunpodAPI) -> None:
    text = "Speaker 1: A job that needs more time than the request waits for it. " * 4  # a frame cap above 300
    job_input = {"text": text, "max_new_tokens": 300, "diffusion_steps": 3}
    started = time.monotonic()
    status, reply = runpod_api.call("POST", "/runsync?wait=2000", {"input": job_input})
    waited = time.monotonic() - started
    assert status == 200
    assert reply["status"] == "IN_PROGRESS", reply
    assert PROGRESS.match(reply.get("output", "0.0 s of audio generated, 0 of 1 chunks done")), reply  # no result
    assert 1.9 < waited < 10
    final = runpod_api.wait_for(reply["id"], FINAL)
    assert final["status"] == "COMPLETED"
    check_audio(final["output"])
    assert final["executionTime"] > 1000


def test_bad_input_fails_with_one_sentence_and_the_next_job_succeeds(runpod_api: RunpodAPI) -> None:
    status, reply = runpod_api.call("POST", "/runsync", {"input": {"text": "hi", "cfg_scale": 0}})
    assert status == 200
    assert reply["status"] == "FAILED"
    assert reply["error"] == "'cfg_scale' must be greater than 0 and at most 10 (got 0)."
    assert "output" not in reply
    # The error item is not a stream item.
    assert runpod_api.call("GET", f"/stream/{reply['id']}") == (200, {"status": "FAILED", "stream": []})
    status, reply = runpod_api.call("POST", "/runsync", {"input": {"text": "Still serving.", **FAST}})
    assert reply["status"] == "COMPLETED"


def test_progress_updates_show_in_status_while_running(runpod_api: RunpodAPI) -> None:
    text = "The first sentence is here. The second one follows it. And a third one ends it."
    job_input = {"text": text, "max_chunk_chars": 40, "max_new_tokens": 25, "diffusion_steps": 3}
    _, job = runpod_api.call("POST", "/run", {"input": job_input})
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _, reply = runpod_api.call("GET", f"/status/{job['id']}")
        if reply["status"] in FINAL:
            break
        if "output" in reply and (not seen or seen[-1] != reply["output"]):
            seen.append(reply["output"])
        time.sleep(0.03)
    assert reply["status"] == "COMPLETED"
    assert reply["output"][0]["chunks"] == 3
    # The first update comes with the first frames of the batch (one per chunk), while running.
    assert seen and seen[0] == "0.4 s of audio generated, 0 of 3 chunks done", seen
    assert all(PROGRESS.match(update) for update in seen)


def test_stream_hands_out_each_item_once(runpod_api: RunpodAPI) -> None:
    status, job = runpod_api.call("POST", "/run", {"input": {"text": "One streamed item.", **FAST}})
    items: list = []
    deadline = time.monotonic() + 120
    while True:
        status, reply = runpod_api.call("GET", f"/stream/{job['id']}")
        assert status == 200 and set(reply) == {"status", "stream"}
        items += [entry["output"] for entry in reply["stream"]]
        if reply["status"] in FINAL or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply["status"] == "COMPLETED"
    assert len(items) == 1
    assert items == runpod_api.call("GET", f"/status/{job['id']}")[1]["output"]
    assert runpod_api.call("GET", f"/stream/{job['id']}") == (200, {"status": "COMPLETED", "stream": []})


@pytest.mark.fault
def test_cancel_stops_the_running_job_and_the_worker_takes_the_next(runpod_api: RunpodAPI) -> None:
    job_id = start_long_job(runpod_api)
    assert runpod_api.call("POST", f"/cancel/{job_id}") == (200, {"id": job_id, "status": "CANCELLED"})
    _, reply = runpod_api.call("POST", "/runsync", {"input": {"text": "Next job.", **FAST}})
    assert reply["status"] == "COMPLETED"
    # The handler saw CancelledError through the SDK's job-stop channel, and no late result overwrote the status.
    wait_for_log(runpod_api.worker.log_path, f"job {job_id} cancelled")
    cancelled = runpod_api.call("GET", f"/status/{job_id}")[1]
    assert cancelled["status"] == "CANCELLED" and "output" not in cancelled
    # Cancelling a finished job changes nothing.
    assert runpod_api.call("POST", f"/cancel/{reply['id']}") == (200, {"id": reply["id"], "status": "COMPLETED"})


@pytest.mark.fault
def test_execution_timeout_ends_the_job_timed_out(runpod_api: RunpodAPI) -> None:
    emulator: RunpodEmulator = runpod_api.emulator  # type: ignore[assignment]
    emulator.min_execution_timeout_ms = 100  # RunPod's floor is 5000 ms; lowered to keep the test short
    try:
        _, job = runpod_api.call("POST", "/run", {"input": LONG, "policy": {"executionTimeout": 1500}})
    finally:
        emulator.min_execution_timeout_ms = 5000
    reply = runpod_api.wait_for(job["id"], FINAL, timeout=60)
    assert reply["status"] == "TIMED_OUT"
    assert 1400 <= reply["executionTime"] < 5000
    _, reply = runpod_api.call("POST", "/runsync", {"input": {"text": "After the timeout.", **FAST}})
    assert reply["status"] == "COMPLETED"
    wait_for_log(runpod_api.worker.log_path, f"job {job['id']} cancelled")


def test_health_counts_jobs_and_workers(runpod_api: RunpodAPI) -> None:
    status, before = runpod_api.call("GET", "/health")
    assert status == 200
    assert set(before["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert before["workers"]["idle"] == 1 and before["workers"]["running"] == 0
    job_id = start_long_job(runpod_api)
    busy = runpod_api.call("GET", "/health")[1]
    assert busy["jobs"]["inProgress"] == 1
    assert busy["workers"]["running"] == 1 and busy["workers"]["idle"] == 0
    runpod_api.call("POST", f"/cancel/{job_id}")
    runpod_api.call("POST", "/runsync", {"input": {"text": "Counted.", **FAST}})
    runpod_api.call("POST", "/runsync", {"input": {"text": ""}})
    after = runpod_api.call("GET", "/health")[1]
    assert after["jobs"]["completed"] == before["jobs"]["completed"] + 1
    assert after["jobs"]["failed"] == before["jobs"]["failed"] + 1
    assert after["jobs"]["inProgress"] == 0 and after["workers"]["running"] == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/run"), ("POST", "/runsync"), ("GET", "/status/x"), ("GET", "/stream/x"), ("POST", "/cancel/x"),
     ("GET", "/health"), ("POST", "/purge-queue")],
)  # fmt: skip
@pytest.mark.parametrize("key", ["", "wrong-key"])
def test_requests_without_the_key_get_401(runpod_api: RunpodAPI, method: str, path: str, key: str) -> None:
    body = {"input": {"text": "hi"}} if method == "POST" else None
    assert runpod_api.call(method, path, body, key=key) == (401, {"error": "Unauthorized"})


def test_key_forms_and_the_control_plane_key(runpod_api: RunpodAPI) -> None:
    # RunPod's docs send the key bare as well as after "Bearer".
    request = urllib.request.Request(runpod_api.base_url + "/health", headers={"Authorization": runpod_api.api_key})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    # The clients' key does not open the worker's control plane.
    status, _ = runpod_api.call("GET", "/job-take/intruder?gpu=cpu")
    assert status == 401


@pytest.mark.parametrize(("method", "operation"), [("GET", "status"), ("GET", "stream"), ("POST", "cancel")])
def test_unknown_job_is_404(runpod_api: RunpodAPI, method: str, operation: str) -> None:
    assert runpod_api.call(method, f"/{operation}/no-such-job") == (404, {"error": "request does not exist"})


def test_the_runpod_python_client_works_unchanged(runpod_api: RunpodAPI) -> None:
    root_handlers = logging.getLogger().handlers[:]
    import runpod  # its import adds a handler to the root logger; restored below

    saved = runpod.endpoint_url_base
    runpod.endpoint_url_base = runpod_api.base_url.rsplit("/", 1)[0]
    try:
        endpoint = runpod.Endpoint(runpod_api.emulator.endpoint_id, api_key=runpod_api.api_key)
        output = endpoint.run_sync({"input": {"text": "Through the SDK client.", **FAST}}, timeout=120)
        check_audio(output)
        job = endpoint.run({"input": {"text": "Streamed through the SDK client.", **FAST}})
        streamed = list(job.stream())  # the SDK polls /stream until a final status
        assert streamed == job.output(timeout=60)
        assert endpoint.health()["workers"]["idle"] == 1
    finally:
        runpod.endpoint_url_base = saved
        logging.getLogger().handlers[:] = root_handlers


# --- queue rules, without a worker ----------------------------------------------------------------


@pytest.fixture()
def bare_api() -> Iterator[RunpodAPI]:
    """An emulator with no worker (jobs stay queued) and short retention times."""
    emulator = RunpodEmulator("bare-key", run_retention_s=0.5, runsync_retention_s=0.5).start()
    yield RunpodAPI(emulator.base_url, emulator.api_key, emulator, None)
    emulator.stop()


def test_jobs_wait_in_the_queue_until_cancelled_or_purged(bare_api: RunpodAPI) -> None:
    status, first = bare_api.call("POST", "/run", {"input": {"text": "a"}})
    _, second = bare_api.call("POST", "/run", {"input": {"text": "b"}})
    assert bare_api.call("GET", f"/status/{first['id']}") == (200, {"id": first["id"], "status": "IN_QUEUE"})
    started = time.monotonic()
    _, waited = bare_api.call("POST", "/runsync?wait=1000", {"input": {"text": "c"}})
    assert waited == {"id": waited["id"], "status": "IN_QUEUE"} and 0.9 < time.monotonic() - started < 5
    assert bare_api.call("GET", "/health")[1]["jobs"]["inQueue"] == 3
    assert bare_api.call("POST", f"/cancel/{first['id']}") == (200, {"id": first["id"], "status": "CANCELLED"})
    assert bare_api.call("POST", "/purge-queue") == (200, {"removed": 2, "status": "completed"})
    assert bare_api.call("GET", f"/status/{second['id']}")[1]["status"] == "CANCELLED"
    status, reply = bare_api.call("POST", f"/retry/{second['id']}")
    assert status == 400 and "only FAILED or TIMED_OUT" in reply["error"]
    time.sleep(0.7)  # past the (shortened) retention time
    assert bare_api.call("GET", f"/status/{first['id']}") == (404, {"error": "request does not exist"})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'input' field"),
        ([1, 2], "'input' field"),
        ({"input": {"text": "hi"}, "policy": {"executionTimeout": 1000}}, "'policy.executionTimeout'"),
        ({"input": {"text": "hi"}, "policy": {"ttl": 5}}, "'policy.ttl'"),
        ({"input": {"text": "hi"}, "policy": "fast"}, "'policy' must be an object"),
    ],
)
def test_malformed_requests_get_400(bare_api: RunpodAPI, body: object, fragment: str) -> None:
    status, reply = bare_api.call("POST", "/run", body)  # type: ignore[arg-type]
    assert status == 400 and fragment in reply["error"]


@pytest.mark.parametrize("wait", ["999", "300001", "soon"])
def test_runsync_wait_outside_the_documented_range_gets_400(bare_api: RunpodAPI, wait: str) -> None:
    reply = bare_api.call("POST", f"/runsync?wait={wait}", {"input": {"text": "hi"}})
    assert reply == (400, {"error": "wait is invalid; must be between 1000 and 300000"})
    assert bare_api.call("GET", "/health")[1]["jobs"]["inQueue"] == 0


def test_invalid_json_and_unknown_endpoint(bare_api: RunpodAPI) -> None:
    request = urllib.request.Request(bare_api.base_url + "/run", data=b"{not json", headers=bare_api.headers)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 400 and "not valid JSON" in json.loads(error.value.read())["error"]
    other = RunpodAPI(bare_api.emulator.url + "/v2/other-endpoint", bare_api.api_key, None, None)
    assert other.call("GET", "/health")[0] == 404


# --- a worker with concurrency 2 (job-take-batch) ------------------------------------------------


def test_concurrent_worker_runs_two_jobs_and_stops_only_the_cancelled_one(
    tiny_model_dir: Path, volume: Path, tmp_path: Path
) -> None:
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu", "MAX_CONCURRENCY": "2"}
    emulator, worker = start_runpod_api(tmp_path / "worker.log", env)
    api = RunpodAPI(emulator.base_url, emulator.api_key, emulator, worker)
    try:
        text = "Speaker 1: This job runs next to a long one on the same worker."
        other_input = {"text": text, "max_new_tokens": 30, "diffusion_steps": 3}
        long_id = start_long_job(api)  # waits for its first progress update
        other_id = api.call("POST", "/run", {"input": other_input})[1]["id"]
        # Taken while the long job runs (the engine itself generates for one job at a time).
        api.wait_for(other_id, {"IN_PROGRESS"}, timeout=30, interval=0.02)
        assert api.call("GET", f"/status/{long_id}")[1]["status"] == "IN_PROGRESS"
        api.call("POST", f"/cancel/{long_id}")
        assert api.wait_for(other_id, FINAL)["status"] == "COMPLETED"
        assert api.call("GET", f"/status/{long_id}")[1]["status"] == "CANCELLED"
        wait_for_log(worker.log_path, f"job {long_id} cancelled")
        assert f"job {other_id} cancelled" not in worker.log_path.read_text()
    finally:
        worker.stop()
        emulator.stop()


# --- a worker with a cold start --------------------------------------------------------------------


def test_a_worker_with_a_cold_start_takes_no_job_until_it_ends(tiny_model_dir: Path, volume: Path, tmp_path: Path):
    """start_worker(cold_start_s=...): initializing in /health, asking for jobs and getting none, until the
    cold start ends; a job queued meanwhile waits IN_QUEUE and then runs (its delayTime says how long)."""
    cold = 45.0  # well past the worker's own start-up (seconds; tens of them on a busy machine)
    emulator = RunpodEmulator("test-key-" + os.urandom(6).hex()).start()
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu"}
    started = time.monotonic()
    worker = emulator.start_worker(env, log_path=tmp_path / "worker.log", cold_start_s=cold)
    api = RunpodAPI(emulator.base_url, emulator.api_key, emulator, worker)
    try:
        job = api.call("POST", "/run", {"input": {"text": "After a cold start.", **FAST}})[1]
        assert api.call("GET", "/health")[1]["workers"]["initializing"] == 1
        # The process asks for jobs well before its cold start ends (it loads the tiny model in seconds).
        deadline = time.monotonic() + cold
        while not emulator._call(lambda: worker.pod_id in emulator._workers):
            assert time.monotonic() < deadline, "the worker never asked for a job during its cold start"
            time.sleep(0.2)
        first_seen = emulator._call(lambda: emulator._workers[worker.pod_id].first_seen)
        assert first_seen - started < cold
        assert api.call("GET", f"/status/{job['id']}")[1]["status"] == "IN_QUEUE"
        health = api.call("GET", "/health")[1]["workers"]
        assert (health["initializing"], health["idle"], health["running"]) == (1, 0, 0)
        worker.wait_until_polling(timeout=120)  # the polling event is set once the cold start is over
        assert time.monotonic() - started >= cold
        done = api.wait_for(job["id"], FINAL)
        assert done["status"] == "COMPLETED" and done["delayTime"] >= (cold - 1) * 1000
    finally:
        worker.stop()
        emulator.stop()


def test_make_serve_has_a_cold_start_flag() -> None:
    assert build_parser().parse_args(["--cold-start", "30"]).cold_start == 30.0
    assert build_parser().parse_args([]).cold_start == 0.0


# --- RunPod behaviours clients must survive (opt-in switches) --------------------------------------


def test_running_state_and_split_stream_backlog(runpod_api: RunpodAPI) -> None:
    """RUNNING while a worker has the job; a backlog split across /stream replies, the first of
    them already COMPLETED: only reading on until a final reply is empty gets every item."""
    emulator: RunpodEmulator = runpod_api.emulator  # type: ignore[assignment]
    job_input = {"text": "A split stream.", "stream": True, "output_format": "pcm_16", "stream_chunk_ms": 100,
                 "max_new_tokens": 12, "diffusion_steps": 3}  # fmt: skip
    with emulator.behaving(running_state=True, stream_reply_bytes=8000):  # one 100 ms pcm item per reply
        _, job = runpod_api.call("POST", "/run", {"input": job_input})
        seen = {runpod_api.wait_for(job["id"], {"RUNNING", "COMPLETED"}, interval=0.02)["status"]}
        seen.add(runpod_api.wait_for(job["id"], FINAL)["status"])
        replies = []
        for _ in range(100):
            status, reply = runpod_api.call("GET", f"/stream/{job['id']}")
            assert status == 200
            replies.append(reply)
            if reply["status"] in FINAL and not reply["stream"]:
                break
    assert "RUNNING" in seen and "IN_PROGRESS" not in seen
    items = [entry["output"] for reply in replies for entry in reply["stream"]]
    assert items[-1]["status"] == "complete" and items[-1]["items"] == len(items) - 1 == 16  # 1.6 s in 100 ms items
    assert [item["seq"] for item in items[:-1]] == list(range(16))
    assert all(reply["status"] == "COMPLETED" for reply in replies)  # every reply after the end says so
    # At most 8000 bytes a reply, unless one item is larger on its own.
    assert all(len(reply["stream"]) == 1 or len(json.dumps(reply["stream"])) <= 8000 for reply in replies)
    assert len(replies) > 8


def test_the_runpod_client_reads_a_split_backlog_whole(runpod_api: RunpodAPI) -> None:
    """The runpod SDK's own Job.stream() polls until a final reply with no items: it gets everything."""
    emulator: RunpodEmulator = runpod_api.emulator  # type: ignore[assignment]
    root_handlers = logging.getLogger().handlers[:]
    import runpod

    saved = runpod.endpoint_url_base
    runpod.endpoint_url_base = runpod_api.base_url.rsplit("/", 1)[0]
    try:
        with emulator.behaving(stream_reply_bytes=8000, running_state=True):
            endpoint = runpod.Endpoint(emulator.endpoint_id, api_key=runpod_api.api_key)
            job_input = {"text": "Split.", "stream": True, "output_format": "pcm_16", "stream_chunk_ms": 100,
                         "max_new_tokens": 8, "diffusion_steps": 3}  # fmt: skip
            job = endpoint.run({"input": job_input})
            streamed = list(job.stream())
    finally:
        runpod.endpoint_url_base = saved
        logging.getLogger().handlers[:] = root_handlers
    assert streamed[-1]["status"] == "complete" and streamed[-1]["items"] == 11  # 1.07 s in 100 ms items
    assert [item["seq"] for item in streamed[:-1]] == list(range(11))


def _raw_call(api: RunpodAPI, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api.base_url + path, data=data, headers=api.headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_rate_limit_answers_429_with_retry_after(bare_api: RunpodAPI) -> None:
    emulator: RunpodEmulator = bare_api.emulator  # type: ignore[assignment]
    with emulator.behaving(rate_limits={"run": (2, 1.0)}):
        answers = [_raw_call(bare_api, "POST", "/run", {"input": {"text": "limited"}}) for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 429]
        assert answers[2][1]["Retry-After"] == "1" and answers[2][2] == {"error": "rate limit exceeded"}
        assert _raw_call(bare_api, "GET", "/status/x")[0] == 404  # only /run is limited here
        time.sleep(1.05)
        assert _raw_call(bare_api, "POST", "/run", {"input": {"text": "limited"}})[0] == 200
    assert len(emulator.submissions("limited")) == 3  # the refused call started no job
    with emulator.behaving(rate_limits=RATE_LIMITS):
        assert all(_raw_call(bare_api, "GET", "/status/x")[0] == 404 for _ in range(20))


def test_transient_errors_on_status_and_stream(bare_api: RunpodAPI) -> None:
    emulator: RunpodEmulator = bare_api.emulator  # type: ignore[assignment]
    _, job = bare_api.call("POST", "/run", {"input": {"text": "flaky"}})
    with emulator.behaving(transient_every=2):
        statuses = [bare_api.call("GET", f"/status/{job['id']}")[0] for _ in range(4)]
        streams = [bare_api.call("GET", f"/stream/{job['id']}")[0] for _ in range(4)]
        assert bare_api.call("POST", "/run", {"input": {"text": "flaky"}})[0] == 200  # submissions are spared
    assert statuses == streams == [200, 503, 200, 503]


def test_policy_ttl_expires_a_queued_job_and_every_submission_is_counted() -> None:
    with RunpodEmulator("ttl-key", min_ttl_ms=100) as emulator:  # RunPod's floor is 10 s; lowered to keep it short
        api = RunpodAPI(emulator.base_url, emulator.api_key, emulator, None)
        policy = {"ttl": 300, "executionTimeout": 60_000}
        _, job = api.call("POST", "/run", {"input": {"text": "no worker"}, "policy": policy})
        api.call("POST", "/run", {"input": {"text": "no worker"}})
        assert api.wait_for(job["id"], FINAL, timeout=10, interval=0.05)["status"] == "TIMED_OUT"
        submitted = emulator.submissions("no worker")
        assert [entry["policy"] for entry in submitted] == [policy, {}]
        assert [entry["status"] for entry in submitted] == ["TIMED_OUT", "IN_QUEUE"]
        assert emulator.submissions("other") == []


def test_make_serve_flags_switch_the_behaviours_on() -> None:
    parser = argparse.ArgumentParser()
    add_behaviour_arguments(parser)
    flags = ["--running-state", "--stream-reply-bytes", "1000000", "--rate-limit", "5/2", "--transient-every", "7"]
    behaviour = behaviour_from(parser.parse_args(flags))
    assert behaviour == RunpodBehaviour(
        True, 1_000_000, dict.fromkeys(["run", "runsync", "status", "stream"], (5, 2.0)), 7
    )
    assert behaviour_from(parser.parse_args(["--rate-limit", "documented"])).rate_limits == RATE_LIMITS
    assert behaviour_from(parser.parse_args([])) == RunpodBehaviour()
