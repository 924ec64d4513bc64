"""The bad-input corpus (tests/data/bad_jobs.json) through the real worker loop.

Every malformed job goes to RunPod's public API (the emulator on 127.0.0.1) and through the SDK's
production loop into the worker. Each must end FAILED with one sentence naming the field, with no
traceback text, and the worker must serve the next valid job.

The corpus is data: `{"name", "input", "expect"}` per case, where `expect` is a fragment the error
must contain. Two expansions keep huge inputs out of the file: `{"$repeat": [s, n]}` is s * n and
`{"$nest": n}` is an object nested n levels deep.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunpodAPI, running_api

# One xdist worker runs this module (its fixtures start a worker and run the whole corpus at once).
pytestmark = pytest.mark.xdist_group("bad_inputs")

CORPUS = json.loads((Path(__file__).parent / "data" / "bad_jobs.json").read_text())["cases"]
VALID = {"text": "Still serving.", "max_new_tokens": 1, "diffusion_steps": 1, "output_format": "pcm_16"}
TRACEBACK_MARKERS = re.compile(r'Traceback|File "|, line \d+, in |\n')


def expand(value: object) -> object:
    if isinstance(value, dict):
        if "$repeat" in value:
            text, times = value["$repeat"]
            return text * times
        if "$nest" in value:
            root: dict = {}
            node = root
            for _ in range(value["$nest"]):
                node["x"] = {}
                node = node["x"]
            return root
        return {key: expand(item) for key, item in value.items()}
    if isinstance(value, list):
        return [expand(item) for item in value]
    return value


@pytest.fixture(scope="module")
def corpus_api(tiny_model_dir, volume, tmp_path_factory) -> Iterator[RunpodAPI]:
    """An emulator and a worker of its own taking 4 jobs at a time.

    At concurrency 1 the SDK's loop waits about a second between jobs; at 4 it takes the next job
    while one runs, so the corpus does not spend minutes waiting.
    """
    env = {"MODEL_PATH": str(tiny_model_dir), "VIBEVOICE_HOME": str(volume), "DEVICE": "cpu", "MAX_CONCURRENCY": "4"}
    with running_api(tmp_path_factory.mktemp("corpus-worker") / "worker.log", env) as api:
        yield api


@pytest.fixture(scope="module")
def corpus_results(corpus_api: RunpodAPI) -> dict[str, tuple[dict, dict]]:
    """Queue every bad job, each followed by a valid one, then collect the final replies."""
    runpod_api = corpus_api
    queued = []
    for case in CORPUS:
        status, bad = runpod_api.call("POST", "/run", {"input": expand(case["input"])})
        assert status == 200, bad
        status, good = runpod_api.call("POST", "/run", {"input": VALID})
        assert status == 200, good
        queued.append((case["name"], bad["id"], good["id"]))
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
    return {
        name: (runpod_api.wait_for(bad_id, final, timeout=300), runpod_api.wait_for(good_id, final, timeout=300))
        for name, bad_id, good_id in queued
    }


def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 60
    assert len({case["name"] for case in CORPUS}) == len(CORPUS)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", CORPUS, ids=[case["name"] for case in CORPUS])
def test_bad_job_fails_with_one_sentence_then_the_worker_serves(corpus_results, case: dict) -> None:
    bad, good = corpus_results[case["name"]]
    assert bad["status"] == "FAILED", bad
    message = bad["error"]
    assert case["expect"] in message, message
    assert not TRACEBACK_MARKERS.search(message), message
    assert message.endswith(".") and len(message) < 800
    assert good["status"] == "COMPLETED", good
