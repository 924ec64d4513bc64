"""Bursts of jobs: 50 at once through RunPod's API (the emulator) into one worker that takes 4 at a
time (async handler, concurrency_modifier 4), then 50 at once through the OpenAI bridge in workerd.

Every job has its own seed and its own length (1 to 5 frames), so each result can be matched to
its request: the seed it reports and the duration of its audio. None may be lost or duplicated,
the jobs' generations overlap (their chunks share the decode batch: begin/end lines in the
worker's DEBUG log nest), and the worker's memory returns near its baseline after each burst.
Then 200 mixed jobs (whole, streamed, cloned, cancelled) at once into a worker taking 8 at a time:
none lost or duplicated, each with its own seed and its own audio (sampled jobs equal their solo
decode in this process). Everything talks to 127.0.0.1; every loop is bounded in count and time.
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

import numpy as np
import pytest
from audio_helpers import encode_file, probe, tone
from conftest import RunpodAPI, running_api
from test_bridge_e2e import start_bridge

# One xdist worker runs this module (its fixtures start a worker).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("load")]
BURST = 50
WARM_UP = 20  # jobs before a memory baseline
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


def test_burst_through_runpod_loses_nothing_and_shares_the_batch(load_api: RunpodAPI, reliability) -> None:
    pid = load_api.worker.process.pid
    warm_up = run_burst(load_api, "Warm-up", WARM_UP)
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

    # One begin/end pair per job, and generations overlapped: their chunks decoded in one batch.
    events = GENERATION.findall(log)
    assert events.count("begins") == events.count("ends") == BURST
    depth = [sum(1 if e == "begins" else -1 for e in events[: i + 1]) for i in range(len(events))]
    assert max(depth) >= 2
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
    client = openai.OpenAI(base_url=f"{origin}/v1", api_key=token, max_retries=0, timeout=240)

    def speak(number: int, label: str = "Bridge"):
        body = job_input(label, number)
        response = client.audio.speech.with_raw_response.create(
            model="tts-1", voice="alloy", input=body["text"], response_format="pcm" if number % 2 == 0 else "flac",
            extra_body={"seed": body["seed"], "max_new_tokens": body["max_new_tokens"], "diffusion_steps": 1},
        )  # fmt: skip
        return body, response.headers["x-runpod-job-id"], response.content, dict(response.headers)

    try:
        # The baseline is taken after a warm-up through the bridge (both paths, both formats), whichever
        # test ran before: the first jobs' one-off allocations are not a leak.
        with ThreadPoolExecutor(max_workers=WARM_UP) as pool:
            list(pool.map(lambda number: speak(number, "Warm-up"), range(WARM_UP)))
        baseline = rss_bytes(pid)
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


MIXED_BURST = 200
MIXED_KINDS = ("whole", "streamed", "cloned", "cancelled")


def mixed_input(number: int, clips: list[str]) -> dict:
    """Job `number` of the mixed burst: its kind by number, its own seed and length."""
    kind = MIXED_KINDS[number % 4]
    body = {"text": f"Mixed job number {number}.", "seed": 9000 + number, "max_new_tokens": 1 + number % 5,
            "diffusion_steps": 1, "output_format": "pcm_16", "normalize": False}  # fmt: skip
    if kind == "streamed":
        body.update(stream=True, stream_chunk_ms=100)
    elif kind == "cloned":
        body["voice_audio_base64"] = clips[number % len(clips)]
    elif kind == "cancelled":  # long enough that it cannot end before its cancel arrives
        body.update(text="A job to cancel, with plenty of text to speak. " * 6, max_new_tokens=3000)
    return body


def pcm_of(kind: str, reply: dict) -> bytes | None:
    output = reply.get("output") or []
    if kind == "streamed":
        if not output or output[-1].get("status") != "complete":
            return None
        return b"".join(base64.b64decode(item["audio_chunk"]) for item in output[:-1])
    return base64.b64decode(output[0]["audio_base64"]) if len(output) == 1 and "audio_base64" in output[0] else None


def test_mixed_burst_of_200_jobs_keeps_each_jobs_own_audio(tiny_model_dir, volume, tmp_path, engine, settings,
                                                           reliability):  # fmt: skip
    """200 jobs at once (whole, streamed, voice-cloned, and cancelled right after submission) into a
    worker taking 8 at a time, all decoding in one shared batch: none lost or duplicated, every
    finished job reports its own seed and carries audio of its own length; no two share audio; and
    every tenth one equals the same job decoded alone in this process (1 LSB at 16 bits)."""
    from inference import GenerationParams
    from jobs.voices import VoiceLibrary
    from text.script import Chunk, Turn

    clips = [base64.b64encode(encode_file(tone(f, 1.0, 24000), 24000, "wav", "pcm_s16le")).decode() for f in (220, 330)]
    inputs = [mixed_input(number, clips) for number in range(MIXED_BURST)]
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu",
           "MAX_CONCURRENCY": "8", "LOG_LEVEL": "DEBUG"}  # fmt: skip
    with running_api(tmp_path / "worker.log", env) as api:

        def submit(body: dict) -> str:
            status, reply = api.call("POST", "/run", {"input": body}, timeout=60)
            assert status == 200, reply
            if body["max_new_tokens"] == 3000:
                api.call("POST", f"/cancel/{reply['id']}", timeout=60)
            return reply["id"]

        with ThreadPoolExecutor(max_workers=32) as pool:
            ids = list(pool.map(submit, inputs))
        final: dict[str, dict] = {}
        deadline = time.monotonic() + 400
        while len(final) < MIXED_BURST and time.monotonic() < deadline:
            for job_id in ids:
                if job_id not in final and (reply := api.call("GET", f"/status/{job_id}")[1])["status"] in FINAL:
                    final[job_id] = reply
            time.sleep(0.2)
        log = api.worker.log_path.read_text()

    assert len(set(ids)) == MIXED_BURST
    lost, own, payloads = [], 0, {}
    for number, (body, job_id) in enumerate(zip(inputs, ids, strict=True)):
        kind, reply = MIXED_KINDS[number % 4], final.get(job_id, {"status": "never finished"})
        if kind == "cancelled":
            lost += [] if reply["status"] == "CANCELLED" else [(number, reply["status"])]
            continue
        pcm = pcm_of(kind, reply) if reply["status"] == "COMPLETED" else None
        if pcm is None:
            lost.append((number, reply["status"]))
            continue
        seed = reply["output"][-1]["seed"]
        own += seed == body["seed"] and len(pcm) == 2 * body["max_new_tokens"] * SAMPLES_PER_FRAME
        payloads[number] = pcm
    duplicated = sum(count - 1 for count in Counter(JOB_DONE.findall(log)).values())
    duplicated += sum(count - 1 for count in Counter(re.findall(r"job (\S+): streamed \d+ items", log)).values())
    reliability.record("losses", len(lost) + duplicated)
    assert lost == [] and duplicated == 0
    assert own == len(payloads) == MIXED_BURST * 3 // 4  # every finished job: its own seed and length
    assert len({hashlib.sha256(pcm).hexdigest() for pcm in payloads.values()}) == len(payloads)

    library = VoiceLibrary.for_settings(settings)
    for number in sorted(payloads)[::10]:  # its own audio: the same job decoded alone here
        body = inputs[number]
        voice = library.from_base64(body["voice_audio_base64"], "x") if "voice_audio_base64" in body else \
            library.load("Alice")  # fmt: skip
        params = GenerationParams(1.3, 1, seed=body["seed"], max_new_tokens=body["max_new_tokens"])
        [alone] = engine.decoder.decode(engine.requests([Chunk(0, (Turn(0, body["text"]),))], {0: voice}, params))
        ours = np.frombuffer(payloads[number], "<i2").astype(np.int32)
        theirs = np.round(np.clip(alone.audio, -1, 1) * 32767).astype(np.int32)
        assert int(np.abs(ours - theirs).max()) <= 1 + 1e-4 * 32767, number
    reliability.record("under_load", own)
