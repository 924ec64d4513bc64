"""Every code block of README.md and docs/api.md runs, so no example can drift from the code.

The blocks are read from the Markdown. Per document, the `bash` blocks run in order as one script and
the `python` blocks as one program, as a reader runs them one after another in one terminal, against
`make serve`'s stack (the RunPod API emulator with a live worker on the tiny checkpoint, the session's
`runpod_api`) and, for the OpenAI example, the bridge as `make bridge` runs it. The emulator serves
RunPod's API shape at a local base URL, so the deployed URLs and keys in the examples are replaced by
the local ones (SUBSTITUTIONS) and nothing else changes. A `make` line runs as `make -n` (a dry run:
the target exists and its recipe expands; running `make test` from inside the suite would recurse, and
`make run` with a real model needs a GPU). Blocks marked `text` or `json` show outputs and shapes; they
are not code. A block without a language is refused, so nothing is skipped by accident.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from audio_helpers import probe
from conftest import ROOT, RunpodAPI
from test_bridge_e2e import start_bridge

from jobs.schema import parse_job_input

# One xdist worker runs this module (its fixtures start the bridge).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("doc_examples")]

DOCS = {"README": ROOT / "README.md", "api": ROOT / "docs" / "api.md"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
CODE = {"bash": "bash", "sh": "bash", "python": "python"}
OUTPUTS = {"text", "json"}
MAKE_LINE = re.compile(r"^((?:[A-Z_]+=\S+\s+)*)make\s+(.*)$", re.MULTILINE)
PLACEHOLDER = re.compile(r"<[a-z][a-z ]*>|<[A-Z_]+>")


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    found = [(match[1], match[2]) for match in FENCE.finditer(path.read_text())]
    for language, code in found:
        assert language in CODE or language in OUTPUTS, f"{path.name}: a ``` block needs a language: {code[:80]!r}"
    return found


def code_of(path: Path, language: str) -> str:
    return "\n".join(code for lang, code in blocks(path) if CODE.get(lang) == language)


def test_the_documents_have_the_examples_this_test_runs() -> None:
    assert code_of(DOCS["README"], "bash") and code_of(DOCS["README"], "python")
    api = code_of(DOCS["api"], "python")
    for call in ("run_sync(", ".run(", ".stream()", "b64decode"):
        assert call in api, call
    curl = code_of(DOCS["api"], "bash")
    assert "https://api.runpod.ai/v2/" in curl and "/runsync" in curl and "/stream/" in curl


@pytest.fixture(scope="module")
def bridge_origin(runpod_api: RunpodAPI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The bridge as `make bridge` runs it (wrangler.jsonc's settings, no voices.json), with a token."""
    token = "docs-token-" + os.urandom(8).hex()
    log = tmp_path_factory.mktemp("doc-bridge") / "bridge.log"
    process, origin = start_bridge(runpod_api.base_url, runpod_api.api_key, log, AUTH_TOKEN=token)
    try:
        yield origin, token
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def local(runpod_api: RunpodAPI, bridge_origin: tuple[str, str]) -> dict:
    """What the examples' deployed URLs and keys become locally, and the environment they run in."""
    emulator = runpod_api.emulator
    origin, token = bridge_origin
    substitutions = {
        "https://api.runpod.ai/v2": f"{emulator.url}/v2",
        "http://127.0.0.1:8000": emulator.url,
        "<your RunPod API key>": runpod_api.api_key,
        "local-dev": runpod_api.api_key,
        "<endpoint id>": emulator.endpoint_id,
        "https://<your-worker>.workers.dev": origin,
        "<AUTH_TOKEN>": token,
        "<your key>": token,
    }
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 is this venv's
        "RUNPOD_API_KEY": runpod_api.api_key,
        "RUNPOD_ENDPOINT_ID": emulator.endpoint_id,
        "ENDPOINT": runpod_api.base_url,
        "RUNPOD_ENDPOINT_BASE_URL": f"{emulator.url}/v2",
    }
    return {"substitutions": substitutions, "env": env}


def localised(code: str, substitutions: dict[str, str]) -> str:
    for deployed, here in substitutions.items():
        code = code.replace(deployed, here)
    code = MAKE_LINE.sub(lambda m: f"{m[1]}make -n -C {ROOT} {m[2]}", code)
    assert not PLACEHOLDER.findall(code), f"placeholders left in an example: {PLACEHOLDER.findall(code)}"
    return code


def run(language: str, code: str, local: dict, folder: Path) -> subprocess.CompletedProcess:
    folder.mkdir()
    program = localised(code, local["substitutions"])
    command = ["bash", "-euo", "pipefail", "-c", program] if language == "bash" else [sys.executable, "-c", program]
    done = subprocess.run(command, cwd=folder, env=local["env"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{language} examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_api_documents_curl_examples_run_against_make_serve(local: dict, tmp_path: Path) -> None:
    done = run("bash", code_of(DOCS["api"], "bash"), local, tmp_path / "curl")
    assert probe((tmp_path / "curl" / "hello.mp3").read_bytes()).codec == "mp3float"
    replies = json_values(done.stdout)  # curl prints each reply without a newline after it
    assert len(replies) == 2 and replies[0]["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert "stream" in replies[1] and all("output" in item for item in replies[1]["stream"])


def json_values(text: str) -> list:
    decoder, values, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def test_the_api_documents_runpod_sdk_examples_run_against_make_serve(local: dict, tmp_path: Path) -> None:
    done = run("python", code_of(DOCS["api"], "python"), local, tmp_path / "sdk")
    folder = tmp_path / "sdk"
    assert probe((folder / "hello.mp3").read_bytes()).codec == "mp3float"
    assert probe((folder / "dialogue.wav").read_bytes()).codec == "pcm_s16le"
    assert probe((folder / "streamed.mp3").read_bytes()).codec == "mp3float"
    assert "streamed " in done.stdout


def test_the_readmes_examples_run(local: dict, tmp_path: Path) -> None:
    done = run("bash", code_of(DOCS["README"], "bash"), local, tmp_path / "make")
    assert "tools.run_job" in done.stdout and "pytest" in done.stdout  # the dry runs of make run and make test
    run("python", code_of(DOCS["README"], "python"), local, tmp_path / "openai")
    assert probe((tmp_path / "openai" / "hello.mp3").read_bytes()).codec == "mp3float"


def test_the_readmes_job_inputs_are_valid_jobs(settings) -> None:
    """The feature table's inputs (JSON in the README's `input` column) pass the job schema."""
    table = DOCS["README"].read_text().split("| feature | input |", 1)[1].split("\n\n", 1)[0]
    inputs = [json.loads(cell) for cell in re.findall(r"\| `(\{.*?\})`", table)]
    assert len(inputs) >= 15
    for job in inputs:
        parse_job_input(job, settings)
