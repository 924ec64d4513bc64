"""Bursts of jobs: 50 at once through RunPod's API (the emulator) into one worker that takes 4 at a
time (async handler, concurrency_modifier 4), then 50 at once through the OpenAI bridge in workerd.

Every job has its own seed and its own length (1 to 5 frames), so each result can be matched to
its request: the seed it reports and the duration of its audio. None may be lost or duplicated,
the engine never runs two generations at once (its begin/end lines in the worker's DEBUG log
strictly alternate), and the worker's memory returns near its baseline after each burst.
Everything talks to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from audio_helpers import probe
from conftest import RunpodAPI, running_api
from test_bridge_e2e import start_bridge

pytestmark = pytest.mark.slow
BURST = 50
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
SAMPLES_PER_FRAME = 3200  # 133 ms at 24 kHz
# Memory after a burst may exceed the baseline (taken after a warm-up burst) by this much: allocator
# caches and Python's free lists keep some memory after a burst, but a leak grows with every job.
RSS_MARGIN = 0.10
GENERATION = re.compile(r"generation (begins|ends): ")
JOB_DONE = re.compile(r"vibevoice\.handler: job (\S+): \d+ chars")


def job_input(label: str, number: int) -> dict:
    return {
        "text": f"{label} job number {number}.",
        "seed": 7000 + number,
        "max_new_tokens": 1 + number % 5,
        "diffusion_steps": 1,
        "output_format": "pcm_16",
        "normalize": False,
        "return": "base64",
    }


@pytest.fixture(scope="module")
def load_api(tiny_model_dir: Path, volume: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu",
           "MAX_CONCURRENCY": "4", "LOG_LEVEL": "DEBUG"}  # fmt: skip
    with running_api(tmp_path_factory.mktemp("load-worker") / "worker.log", env) as api:
        yield api


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def settled_rss(pid: int, ceiling: float, seconds: float = 10.0) -> int:
    """The RSS once it is under `ceiling`, or the last reading after `seconds` (bounded wait)."""
    deadline = time.monotonic() + seconds
    while (rss := rss_bytes(pid)) > ceiling and time.monotonic() < deadline:
        time.sleep(0.5)
    return rss


def run_burst(api: RunpodAPI, label: str, count: int = BURST) -> list[tuple[dict, dict]]:
    """Submit `count` jobs at once (one thread per request), then poll until all are final."""
    inputs = [job_input(label, number) for number in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        submitted = list(pool.map(lambda body: api.call("POST", "/run", {"input": body}, timeout=60), inputs))
    assert all(status == 200 for status, _ in submitted), submitted
    ids = [reply["id"] for _, reply in submitted]
    assert len(set(ids)) == count
    final: dict[str, dict] = {}
    deadline = time.monotonic() + 240
    while len(final) < count and time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in final:
                reply = api.call("GET", f"/status/{job_id}")[1]
                if reply["status"] in FINAL:
                    final[job_id] = reply
        time.sleep(0.2)
    return [
        (body, final.get(job_id, {"id": job_id, "status": "never finished"}))
        for body, job_id in zip(inputs, ids, strict=True)
    ]


def check_results(results: list[tuple[dict, dict]]) -> tuple[int, int, int]:
    """(jobs whose result matches their own input, jobs lost, distinct audio payloads)."""
    matched = lost = 0
    payloads = set()
    for body, reply in results:
        if reply["status"] != "COMPLETED" or len(reply.get("output") or []) != 1:
            lost += 1
            continue
        item = reply["output"][0]
        audio = base64.b64decode(item["audio_base64"])
        payloads.add(hashlib.sha256(audio).hexdigest())
        samples = body["max_new_tokens"] * SAMPLES_PER_FRAME
        seconds = round(samples / 24000, 3)
        matched += item["seed"] == body["seed"] and len(audio) == 2 * samples and item["duration_sec"] == seconds
    return matched, lost, len(payloads)


def test_burst_through_runpod_loses_nothing_and_never_overlaps_generations(load_api: RunpodAPI, reliability) -> None:
    pid = load_api.worker.process.pid
    warm_up = run_burst(load_api, "Warm-up", 20)
    assert all(reply["status"] == "COMPLETED" for _, reply in warm_up)
    baseline = rss_bytes(pid)
    log_start = len(load_api.worker.log_path.read_text())

    results = run_burst(load_api, "Burst")
    matched, lost, distinct = check_results(results)
    log = load_api.worker.log_path.read_text()[log_start:]
    done = Counter(JOB_DONE.findall(log))
    duplicated = sum(count - 1 for count in done.values())
    reliability.record("losses", lost + duplicated)
    assert lost == 0, [reply for _, reply in results if reply["status"] != "COMPLETED"][:3]
    assert matched == BURST, "a result does not match its request's seed and length"
    assert distinct == BURST  # no job got another job's audio
    assert duplicated == 0 and set(done) == {reply["id"] for _, reply in results}

    # One generation at a time: begin/end lines strictly alternate, one pair per job.
    events = GENERATION.findall(log)
    assert events == ["begins", "ends"] * BURST
    # The jobs did run concurrently in the handler (4 at a time), taking turns on the engine.
    assert "Jobs in progress: 4" in load_api.worker.log_path.read_text()

    after = settled_rss(pid, baseline * (1 + RSS_MARGIN))
    print(f"\nworker RSS: {baseline / 2**20:.0f} MiB after the warm-up, {after / 2**20:.0f} MiB after {BURST} jobs")
    assert after <= baseline * (1 + RSS_MARGIN)
    reliability.record("under_load", matched)


def test_burst_through_the_bridge(load_api: RunpodAPI, tmp_path: Path, reliability) -> None:
    """50 OpenAI speech requests at once: even ones streamed (pcm through /run + /stream), odd ones
    whole files (flac through /runsync). Each answer is decoded and matched to its request through
    the job id the bridge returns: the job's own seed and the audio's length."""
    import openai

    token = "load-token-" + os.urandom(8).hex()
    process, origin = start_bridge(
        load_api.base_url, load_api.api_key, tmp_path / "bridge.log", AUTH_TOKEN=token,
        JOB_TIMEOUT_SECONDS="240", POLL_INITIAL_MS="100", POLL_MAX_MS="500",
        STREAM_POLL_INITIAL_MS="50", STREAM_POLL_MAX_MS="250",
    )  # fmt: skip
    pid = load_api.worker.process.pid
    baseline = rss_bytes(pid)
    client = openai.OpenAI(base_url=f"{origin}/v1", api_key=token, max_retries=0, timeout=240)

    def speak(number: int):
        body = job_input("Bridge", number)
        response = client.audio.speech.with_raw_response.create(
            model="tts-1", voice="alloy", input=body["text"], response_format="pcm" if number % 2 == 0 else "flac",
            extra_body={"seed": body["seed"], "max_new_tokens": body["max_new_tokens"], "diffusion_steps": 1},
        )  # fmt: skip
        return body, response.headers["x-runpod-job-id"], response.content, dict(response.headers)

    try:
        with ThreadPoolExecutor(max_workers=BURST) as pool:
            answers = list(pool.map(speak, range(BURST)))
    finally:
        process.terminate()
        process.wait(timeout=20)

    matched = 0
    job_ids = [job_id for _, job_id, _, _ in answers]
    for number, (body, job_id, audio, _) in enumerate(answers):
        samples = body["max_new_tokens"] * SAMPLES_PER_FRAME
        reply = load_api.call("GET", f"/status/{job_id}")[1]
        seed = reply["output"][-1]["seed"]  # the result (whole file) or the summary item (stream)
        if number % 2 == 0:
            length_ok = len(audio) == 2 * samples
        else:
            info = probe(audio)
            length_ok = info.codec == "flac" and info.samples.size == samples
        matched += reply["status"] == "COMPLETED" and seed == body["seed"] and length_ok
    duplicated = len(job_ids) - len(set(job_ids))
    reliability.record("losses", BURST - len(answers) + duplicated)
    assert duplicated == 0
    assert matched == BURST

    # Nothing secret in the answers or the bridge's log.
    seen = (tmp_path / "bridge.log").read_text() + "".join(str(headers) for *_, headers in answers)
    assert token not in seen and load_api.api_key not in seen

    after = settled_rss(pid, baseline * (1 + RSS_MARGIN))
    print(f"\nworker RSS: {baseline / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after {BURST} bridge requests")
    assert after <= baseline * (1 + RSS_MARGIN)
    reliability.record("under_load", matched)
