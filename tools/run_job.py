"""`make run`: one real synthesis job through the RunPod SDK's local test mode.

Prepares the local volume folder (tiny checkpoint when no model is configured and there is no
GPU, demo voices), runs `handler.py --test_input <job>` exactly as RunPod's docs describe,
reads the job's result (the handler also writes it to VIBEVOICE_TEST_OUTPUT, because the SDK
truncates long log lines) and writes the audio it returned to `output/`.

    python -m tools.run_job [--input test_input.json] [--home .local/vibevoice]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tools.local_home import DEFAULT_HOME, ROOT, prepare


def run(job: dict, env: dict[str, str], timeout: float = 1800) -> tuple[list | dict, str, float]:
    """Run one job with `handler.py --test_input`; return its output, the log and the wall time."""
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        started = time.perf_counter()
        process = subprocess.run(
            [sys.executable, "handler.py", "--test_input", json.dumps(job)],
            cwd=ROOT,
            env={**os.environ, **env, "VIBEVOICE_TEST_OUTPUT": str(result_path)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        elapsed = time.perf_counter() - started
        log = process.stdout + process.stderr
        if process.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"the job failed (exit {process.returncode}):\n{_tail(log)}")
        return json.loads(result_path.read_text()), log, elapsed


def _tail(text: str, lines: int = 25) -> str:
    shown = [line if len(line) < 400 else line[:400] + " ..." for line in text.splitlines()[-lines:]]
    return "\n".join(shown)


def save_audio(item: dict, output_dir: Path, stem: str) -> Path:
    extension = {"pcm_16": "pcm", "opus": "opus"}.get(item["format"], item["format"])
    path = output_dir / f"{stem}.{extension}"
    if "audio_base64" in item:
        path.write_bytes(base64.b64decode(item["audio_base64"]))
    else:
        with urllib.request.urlopen(item["audio_url"], timeout=60) as response:
            path.write_bytes(response.read())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=ROOT / "test_input.json")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = parser.parse_args()

    env = prepare(args.home)
    job = json.loads(args.input.read_text())
    model = env.get("MODEL_PATH") or os.environ.get("MODEL_PATH") or os.environ.get("MODEL_ID") or "default MODEL_ID"
    print(f"running {args.input.name} through `handler.py --test_input` (model: {model})", flush=True)
    try:
        items, _, elapsed = run(job, env)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    if not isinstance(items, list) or not items:
        raise SystemExit(f"unexpected job result: {str(items)[:300]}")

    output_dir = args.home / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("job-%Y%m%d-%H%M%S")
    final = items[-1]
    path = save_audio(final, output_dir, stem)
    if final.get("captions"):
        path.with_suffix(".srt" if final["captions"].lstrip()[:1].isdigit() else ".vtt").write_text(final["captions"])
    timings = final["timings"]
    print(f"audio:    {path}")
    print(f"format:   {final['format']} {final['sample_rate']} Hz, delivered as {final['delivery']}")
    print(f"duration: {final['duration_sec']:.2f} s in {final['chunks']} chunk(s), seed {final['seed']}")
    print(
        "timings:  "
        + ", ".join(f"{key.removesuffix('_sec')} {value}" for key, value in timings.items() if value is not None)
        + f"; whole process {elapsed:.1f} s"
    )
    for warning in final.get("warnings", []):
        print(f"warning:  {warning}")
    if "tiny-vibevoice" in model:
        print("note:     the tiny checkpoint has random weights, so this audio is noise (see README).")


if __name__ == "__main__":
    main()
