"""Generated jobs and decompression bombs through RunPod's API and the SDK's real worker loop.

One emulator and one worker (the `make serve` stack, tiny checkpoint). 200 generated job inputs
(tests/job_strategies.py) go in; each must end as the same input ends in-process: a job the test's
own parse-and-plan refuses fails with that very sentence, a job that plans completes (or fails
with a one-sentence delivery error), and the worker keeps serving. Then the bombs: FLAC,
low-bitrate MP3 and Ogg/Opus clips holding hours of audio and a WAV whose header claims 4 GB, sent
as base64 and by URL. Each is refused with the duration sentence, and the worker's peak memory
(VmHWM) grows by at most 300 MB over all of them.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunpodAPI, running_api
from fuzzing import SEED, replay
from hypothesis import HealthCheck, given, seed, settings
from job_strategies import job_inputs
from test_generated_jobs import TRACEBACK, outcome

from jobs.voices import VoiceLibrary

# One xdist worker runs this module (its fixtures start a worker).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("generated_worker")]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
GENERATED = 200
DRAWN = 240  # a few are too deeply nested to send
LOCAL_URL = "http://127.0.0.1:9/voice.wav"  # loopback (allowed here), nothing listens: refused at once
TOO_LONG = "'voice_audio_base64' is longer than 300 s of audio; reference audio may be at most 300 s."
SETTINGS = {"voice_url_allowed_networks": "127.0.0.0/8"}


def depth(value: object) -> int:
    """How deeply lists and objects nest in `value` (iteratively: some are thousands deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


def local_urls(value: object) -> object:
    """Every URL-like string replaced by LOCAL_URL: generated jobs never make a DNS lookup."""
    if isinstance(value, str):
        return LOCAL_URL if re.match(r"\s*[a-zA-Z][a-zA-Z0-9+.-]*:", value) and "//" in value else value
    if isinstance(value, dict):
        return {key: local_urls(item) for key, item in value.items()}
    if isinstance(value, list):
        return [local_urls(item) for item in value]
    return value


@pytest.fixture(scope="module")
def worker_api(tiny_model_dir, volume, tmp_path_factory) -> Iterator[RunpodAPI]:
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu",
           "MAX_CONCURRENCY": "4", "VOICE_URL_ALLOWED_NETWORKS": "127.0.0.0/8", "VOICE_FETCH_TIMEOUT": "5"}  # fmt: skip
    with running_api(tmp_path_factory.mktemp("generated-worker") / "worker.log", env) as api:
        yield api


def generated_inputs(count: int) -> list[object]:
    drawn: list[object] = []

    @seed(SEED)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(job_inputs())
    def collect(raw: object) -> None:
        drawn.append(raw)

    collect()
    return drawn[:count]


@pytest.mark.bad_input
def test_generated_jobs_end_in_the_worker_as_they_end_in_process(worker_api, make_settings, reliability) -> None:
    job_settings = make_settings(**SETTINGS)
    library = VoiceLibrary.for_settings(job_settings)
    cases = []
    for raw in generated_inputs(DRAWN):
        if depth(raw) > 200:  # JSON this deep does not survive the trip (covered in-process instead)
            continue
        raw = local_urls(raw)
        expected = outcome(raw, job_settings, library)
        if not isinstance(expected, str):  # it plans: keep the generation tiny (still a valid job)
            raw = {**raw, "max_new_tokens": 2, "diffusion_steps": 1}
            expected = outcome(raw, job_settings, library)
        status, queued = worker_api.call("POST", "/run", {"input": raw})
        if raw is None:  # RunPod itself refuses a request without input
            assert status == 400, queued
            continue
        assert status == 200, queued
        cases.append((queued["id"], raw, expected))
        if len(cases) == GENERATED:
            break
    assert len(cases) == GENERATED, len(cases)
    for job_id, raw, expected in cases:
        reply = worker_api.wait_for(job_id, FINAL, timeout=600)
        shown = f"{str(raw)[:200]} ({replay()})"
        if isinstance(expected, str) and expected != "list_voices":
            assert reply["status"] == "FAILED" and reply["error"] == expected, (reply, expected, shown)
        elif reply["status"] == "FAILED":  # planned, then refused later (a delivery rule): one sentence
            error = reply["error"]
            assert not error.startswith("internal error") and error.endswith("."), (reply, shown)
            assert not TRACEBACK.search(error) and "\n" not in error, (reply, shown)
        else:
            assert reply["status"] == "COMPLETED", (reply, shown)
    final = worker_api.call("POST", "/runsync", {"input": {"text": "Still serving.", "max_new_tokens": 2}})[1]
    assert final["status"] == "COMPLETED", final
    reliability.record("generated_worker_jobs", len(cases))


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.fault
def test_bombs_through_the_worker_are_refused_and_memory_stays_flat(
    worker_api,
    bomb_files: dict[str, Path],
    http_files,
    reliability,
) -> None:
    pid = worker_api.worker.process.pid
    warm = worker_api.call("POST", "/runsync", {"input": {"text": "Warm up.", "max_new_tokens": 2}})[1]
    assert warm["status"] == "COMPLETED", warm
    before = peak_rss_mb(pid)
    base, folder = http_files
    times = {}
    for kind, path in bomb_files.items():
        clip = base64.b64encode(path.read_bytes()).decode()
        job_input = {"text": "Clone me.", "voice_audio_base64": clip, "max_new_tokens": 2}
        reply = worker_api.call("POST", "/runsync", {"input": job_input}, timeout=300)[1]
        assert reply["status"] == "FAILED" and reply["error"] == TOO_LONG, (kind, reply)
        times[kind] = reply["executionTime"]
        reliability.record("bombs_refused")
        (folder / f"{kind}.bin").write_bytes(path.read_bytes())
        job_input = {"text": "Clone me.", "voice_url": f"{base}/{kind}.bin", "max_new_tokens": 2}
        reply = worker_api.call("POST", "/runsync", {"input": job_input}, timeout=300)[1]
        assert reply["status"] == "FAILED", (kind, reply)
        assert reply["error"] == TOO_LONG.replace("voice_audio_base64", "voice_url"), (kind, reply)
        reliability.record("bombs_refused")
    growth = peak_rss_mb(pid) - before
    assert growth <= 300, f"the worker's peak memory grew by {growth:.0f} MB"
    still = worker_api.call("POST", "/runsync", {"input": {"text": "Still serving.", "max_new_tokens": 2}})[1]
    assert still["status"] == "COMPLETED", still
    shown = ", ".join(f"{kind} {ms / 1000:.1f} s" for kind, ms in times.items())
    reliability.note(f"bombs through the worker: refused in {shown}; worker peak memory grew {growth:.0f} MB")
