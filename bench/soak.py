"""`make soak`: 500 mixed jobs through the `make serve` stack, then leaks, losses and slow-down.

The RunPod API emulator and one worker running the SDK's production loop (tiny checkpoint, 4 jobs
at a time) take a mix of jobs: every output format, streamed, cloned from a clip sent with the
job, multi-speaker, cancelled while running, and bad. Before and after, the worker's resident
memory, open file descriptors (/proc/PID/fd) and threads are read; every job must reach a final
status exactly once (lost: never finished; duplicated: taken by the worker twice), and the time
per job must not trend upward. Results go to bench/soak.json and bench/soak.md.

Targets: RSS growth <= 10 %, file descriptors and threads back to baseline, 0 lost or duplicated,
the last fifth of the jobs no slower than the first fifth (by median, same kinds) within 25 %.

    python -m bench.soak [--jobs 500] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from audio_helpers import encode_file, tone  # noqa: E402

from tools.local_home import prepare  # noqa: E402
from tools.runpod_emulator import RunpodEmulator  # noqa: E402

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
TINY = {"max_new_tokens": 3, "diffusion_steps": 2}
CLIP = base64.b64encode(encode_file(tone(220, 1.5, 16000), 16000, "wav", "pcm_s16le")).decode()
KINDS = ["mp3", "opus", "aac", "flac", "wav", "pcm_16", "streamed", "cloned", "multi-speaker", "cancelled", "bad"]
TARGETS = {"rss_growth": 0.10, "trend": 1.25}


def job_for(kind: str, number: int) -> dict:
    text = f"Soak job number {number}."
    if kind in ("mp3", "opus", "aac", "flac", "wav", "pcm_16"):
        return {"text": text, "output_format": kind, **TINY}
    if kind == "streamed":
        return {"text": text, "stream": True, "output_format": "pcm_16", **TINY}
    if kind == "cloned":
        return {"text": text, "voice_audio_base64": CLIP, "output_format": "mp3", **TINY}
    if kind == "multi-speaker":
        return {"text": f"Speaker 1: {text}\nSpeaker 2: Yes.", "speakers": ["Alice", "Frank"], **TINY}
    if kind == "cancelled":
        return {"text": text * 8, "max_new_tokens": 400, "diffusion_steps": 4, "max_chunk_chars": 60}
    return {"text": text, "cfg_scale": -1}  # bad


class Client:
    def __init__(self, api: RunpodEmulator):
        self.api = api

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api.base_url + path, data=data, headers=self.api.headers, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


def worker_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    value = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    value = {key: text.split()[0] if text.split() else "" for key, text in value.items()}
    return {
        "rss_mb": round(int(value["VmRSS"]) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(value["Threads"]),
    }


class TakeCounter(logging.Handler):
    """Counts how often the emulator hands each job to a worker (a job taken twice is duplicated)."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"job (\S+) taken by", record.getMessage())
        if match:
            self.taken[match.group(1)] += 1


def run_wave(client: Client, wave: list[tuple[int, str]], deadline_s: float = 600) -> list[dict]:
    """Submit a wave of jobs, cancel the ones meant to be cancelled once running, wait for all."""
    submitted = [(n, kind, client.call("POST", "/run", {"input": job_for(kind, n)})["id"]) for n, kind in wave]
    results, pending = [], {job_id: (n, kind) for n, kind, job_id in submitted}
    end = time.monotonic() + deadline_s
    while pending and time.monotonic() < end:
        for job_id, (n, kind) in list(pending.items()):
            reply = client.call("GET", f"/status/{job_id}")
            if kind == "streamed" and reply["status"] not in ("IN_QUEUE",):
                client.call("GET", f"/stream/{job_id}")
            if kind == "cancelled" and reply["status"] == "IN_PROGRESS":
                client.call("POST", f"/cancel/{job_id}")
                continue
            if reply["status"] in FINAL:
                results.append({"n": n, "kind": kind, "id": job_id, "status": reply["status"],
                                "ms": reply.get("executionTime", 0)})  # fmt: skip
                del pending[job_id]
        time.sleep(0.1)
    for job_id, (n, kind) in pending.items():
        results.append({"n": n, "kind": kind, "id": job_id, "status": "LOST", "ms": None})
    return results


EXPECTED = {"bad": "FAILED", "cancelled": "CANCELLED"}


def soak(jobs: int, concurrency: int) -> dict:
    logging.basicConfig(level=logging.WARNING)
    counter = TakeCounter()
    logging.getLogger("runpod_emulator").addHandler(counter)
    logging.getLogger("runpod_emulator").setLevel(logging.INFO)
    logging.getLogger("runpod_emulator").propagate = False  # counted, not printed
    home = Path(tempfile.mkdtemp(prefix="vibevoice-soak-"))
    env = {**prepare(home), "DEVICE": "cpu", "MAX_CONCURRENCY": "4", "LOG_LEVEL": "WARNING"}
    with RunpodEmulator() as api, api.start_worker(env, log_path=home / "worker.log") as worker:
        worker.wait_until_polling(300)
        client = Client(api)
        pid = worker.process.pid
        warm = [(i, kind) for i, kind in enumerate(KINDS * 2)]
        run_wave(client, warm)
        time.sleep(3)
        before = worker_stats(pid)
        started = time.monotonic()
        plan = [(n, KINDS[n % len(KINDS)]) for n in range(jobs)]
        results = []
        for start in range(0, jobs, concurrency):
            results += run_wave(client, plan[start : start + concurrency])
            print(f"\r{len(results)}/{jobs} jobs", end="", flush=True)
        print()
        time.sleep(5)  # let the worker settle (threads end, buffers go)
        after = worker_stats(pid)
        wall = time.monotonic() - started
    return summarise(results, counter.taken, before, after, wall, jobs)


def summarise(results: list[dict], taken: Counter, before: dict, after: dict, wall: float, jobs: int) -> dict:
    lost = [r for r in results if r["status"] == "LOST"]
    duplicated = [r for r in results if taken[r["id"]] > 1]
    wrong = [r for r in results if r["status"] != "LOST" and r["status"] != EXPECTED.get(r["kind"], "COMPLETED")]
    timed = sorted(
        (r for r in results if r["kind"] not in EXPECTED and r["status"] == "COMPLETED"), key=lambda r: r["n"]
    )
    # Each job's time relative to its kind's median, so the mix of kinds does not read as a trend.
    kind_median = {kind: statistics.median(r["ms"] for r in timed if r["kind"] == kind) or 1 for kind in
                   {r["kind"] for r in timed}}  # fmt: skip
    relative = [r["ms"] / kind_median[r["kind"]] for r in timed]
    fifth = max(1, len(timed) // 5)
    first, last = statistics.median(relative[:fifth]), statistics.median(relative[-fifth:])
    slope = _slope([r["n"] for r in timed], relative)
    growth = (after["rss_mb"] - before["rss_mb"]) / before["rss_mb"]
    checks = {
        "rss": growth <= TARGETS["rss_growth"],
        "fds": after["fds"] <= before["fds"],
        "threads": after["threads"] <= before["threads"],
        "lost": not lost and not duplicated,
        "trend": last <= first * TARGETS["trend"],
    }
    return {
        "jobs": len(results), "planned": jobs, "wall_seconds": round(wall, 1), "before": before, "after": after,
        "rss_growth": round(growth, 4), "lost": len(lost), "duplicated": len(duplicated),
        "unexpected_status": [{k: r[k] for k in ("n", "kind", "status")} for r in wrong][:20],
        "by_kind": {kind: dict(Counter(r["status"] for r in results if r["kind"] == kind)) for kind in KINDS},
        "relative_time_first_fifth": round(first, 3), "relative_time_last_fifth": round(last, 3),
        "slope_per_job": round(slope, 6),
        "checks": checks, "targets_met": all(checks.values()) and not wrong,
    }  # fmt: skip


def _slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    denominator = sum((x - mean_x) ** 2 for x in xs) or 1.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / denominator


def write(result: dict) -> None:
    (ROOT / "bench" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    b, a = result["before"], result["after"]
    rows = [
        ("worker RSS", f"{b['rss_mb']} MB", f"{a['rss_mb']} MB", f"{result['rss_growth']:+.1%}", "<= +10 %"),
        ("open file descriptors", b["fds"], a["fds"], a["fds"] - b["fds"], "back to baseline"),
        ("threads", b["threads"], a["threads"], a["threads"] - b["threads"], "back to baseline"),
        ("jobs lost / duplicated", "", "", f"{result['lost']} / {result['duplicated']}", "0 / 0"),
        ("job time / its kind's median, first vs last fifth", result["relative_time_first_fifth"],
         result["relative_time_last_fifth"], f"slope {result['slope_per_job']} per job", "last <= first x 1.25"),
    ]  # fmt: skip
    lines = [
        "# Soak (`make soak`)",
        "",
        f"{result['jobs']} mixed jobs through the RunPod API emulator and one worker (SDK production loop, tiny "
        f"checkpoint on CPU, 4 jobs at a time) in {result['wall_seconds']} s. Targets met: "
        f"**{'yes' if result['targets_met'] else 'NO'}**.",
        "",
        "| measure | before | after | change | target |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows),
        "",
        "Jobs by kind and final status: "
        + "; ".join(f"{kind} {dict(statuses)}" for kind, statuses in result["by_kind"].items())
        + ".",
        "",
    ]
    (ROOT / "bench" / "soak.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    try:
        result = soak(args.jobs, args.concurrency)
    except urllib.error.URLError as exc:
        raise SystemExit(f"soak: the emulator stopped answering ({exc})") from None
    shown = ("jobs", "before", "after", "rss_growth", "lost", "duplicated", "relative_time_first_fifth",
             "relative_time_last_fifth", "checks", "unexpected_status")  # fmt: skip
    print(json.dumps({key: result[key] for key in shown}, indent=1))
    if not args.no_write:
        write(result)
    if not result["targets_met"]:
        raise SystemExit("soak: targets missed (see above)")


if __name__ == "__main__":
    main()
