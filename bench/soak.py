"""`make soak`: 500 mixed jobs through the `make serve` stack, then leaks, losses and slow-down.

The RunPod API emulator and one worker running the SDK's production loop (tiny checkpoint, 4 jobs
at a time) take the jobs in waves of one job of every kind: every output format, streamed, cloned
from a clip sent with the job, multi-speaker, cancelled while running, and bad. Every wave does the
same work, so the worker's CPU time per wave (utime + stime of /proc/PID/stat) shows whether jobs
get slower. Other load on a shared machine does not add to it, but it makes every instruction
dearer (shared cores and caches), so after every wave the soak also times a fixed piece of work in
its own process and reports that reference beside it: a rise in both is the machine's load.

Three waves warm the worker up first and the baseline is taken after them. Two pools fill up lazily
and then stay, so a count above the baseline is not by itself a leak:

- threads: the event loop's thread pool (the worker's `asyncio.to_thread`; `handler.thread_pool_size`
  threads for its concurrency) starts a thread when a task finds none idle and never stops one; each
  pool thread that runs torch code gets its own OpenMP team (torch's thread count - 1 helpers), and
  so does the decode scheduler's thread. The worker's threads are therefore at most its idle count
  (before any job) + (pool size + 1) x torch threads;
- file descriptors: the runpod SDK's one HTTP session keeps a connection to the control plane for
  every request it ever had open at once: the job-take and job-stop polls and one result or stream
  call per running job, so at most concurrency + 2.

The pools fill at random moments (in the runs measured, their last members came anywhere from the
50th to the 330th job), so the end is compared with their ceilings, not with the middle. Everything
else must be back to baseline: every file descriptor that is not a control-plane connection (each is
named in the report). The resident memory may grow by at most 10 %. Every job must reach a final status
exactly once (lost: never finished; duplicated: taken by the worker twice), and the worker's CPU
time per wave must not trend upward: the Theil-Sen slope over the run at most +10 %. The reference
and the wall time per job are reported beside it. (Dividing by the reference was tried: it
over-corrects, as the reference is more sensitive to load than the worker.) Results go to
bench/soak.json and bench/soak.md.

    python -m bench.soak [--jobs 500]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from audio_helpers import encode_file, tone  # noqa: E402

from handler import thread_pool_size  # noqa: E402
from tools.local_home import prepare  # noqa: E402
from tools.runpod_emulator import RunpodEmulator  # noqa: E402

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
TINY = {"max_new_tokens": 3, "diffusion_steps": 2}
CLIP = base64.b64encode(encode_file(tone(220, 1.5, 16000), 16000, "wav", "pcm_s16le")).decode()
KINDS = ["mp3", "opus", "aac", "flac", "wav", "pcm_16", "streamed", "cloned", "multi-speaker", "cancelled", "bad"]
EXPECTED = {"bad": "FAILED", "cancelled": "CANCELLED"}
CONCURRENCY = 4  # the worker's MAX_CONCURRENCY
WARM_UP_WAVES = 3
CONTROL = "connection to the control plane"
TARGETS = {"rss_growth": 0.10, "cpu_trend": 0.10, "control_connections": CONCURRENCY + 2}


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


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reference_cpu_seconds(repeats: int = 3) -> float:
    """This thread's CPU time for a fixed piece of work (array arithmetic and Python bytecode, as
    in the worker's jobs), the median of a few runs of about 50 ms: what the machine's load does to
    the cost of an instruction."""
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        data = np.linspace(0.0, 1.0, 250_000, dtype=np.float32)
        for _ in range(60):
            data = np.sqrt(data * data + 1.0) - 1.0
        sum(i * i for i in range(500_000))
        times.append(time.thread_time() - started)
    return statistics.median(times)


def _tcp_remote_ports(pid: int) -> dict[str, int]:
    """Socket inode -> remote port, for the process's TCP sockets."""
    ports = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            ports[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    return ports


def open_files(pid: int, control_port: int) -> Counter:
    """What the process's file descriptors point at, counted: paths, pipes, sockets, event queues."""
    remote = _tcp_remote_ports(pid)
    kinds: Counter = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            port = remote.get(target[8:-1])
            target = CONTROL if port == control_port else "tcp socket" if port else "socket"
        elif target.startswith("pipe:["):
            target = "pipe"
        kinds[target] += 1
    return kinds


def worker_stats(pid: int, control_port: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    value = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    files = open_files(pid, control_port)
    return {
        "rss_mb": round(int(value["VmRSS"].split()[0]) / 1024, 1),
        "fds": sum(files.values()),
        "threads": int(value["Threads"].split()[0]),
        "control_connections": files[CONTROL],
        "open": dict(sorted(files.items())),
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


def soak(jobs: int) -> dict:
    logging.basicConfig(level=logging.WARNING)
    counter = TakeCounter()
    logging.getLogger("runpod_emulator").addHandler(counter)
    logging.getLogger("runpod_emulator").setLevel(logging.INFO)
    logging.getLogger("runpod_emulator").propagate = False  # counted, not printed
    home = Path(tempfile.mkdtemp(prefix="vibevoice-soak-"))
    env = {**prepare(home), "DEVICE": "cpu", "MAX_CONCURRENCY": str(CONCURRENCY), "LOG_LEVEL": "WARNING"}
    with RunpodEmulator() as api, api.start_worker(env, log_path=home / "worker.log") as worker:
        worker.wait_until_polling(300)
        client, pid, port = Client(api), worker.process.pid, api.port
        idle = worker_stats(pid, port)
        for _ in range(WARM_UP_WAVES):
            run_wave(client, [(-1, kind) for kind in KINDS])
        time.sleep(3)
        before = worker_stats(pid, port)
        plan = [(n, KINDS[n % len(KINDS)]) for n in range(jobs)]
        starts = range(0, jobs, len(KINDS))
        results, waves, middle, started = [], [], None, time.monotonic()
        for index, start in enumerate(starts):
            cpu, wall = cpu_seconds(pid), time.monotonic()
            wave = plan[start : start + len(KINDS)]
            results += run_wave(client, wave)
            cpu, wall = cpu_seconds(pid) - cpu, time.monotonic() - wall
            stats = worker_stats(pid, port)
            counts = {key: stats[key] for key in ("rss_mb", "fds", "threads", "control_connections")}
            waves.append({"jobs": len(wave), "cpu_s": round(cpu, 2), "reference_s": round(reference_cpu_seconds(), 4),
                          "wall_s": round(wall, 1), **counts})  # fmt: skip
            if index == len(starts) // 2:
                middle = stats
            print(f"\r{len(results)}/{jobs} jobs", end="", flush=True)
        print()
        time.sleep(5)  # let the worker settle (progress threads end, buffers go)
        after = worker_stats(pid, port)
        wall = time.monotonic() - started
    return summarise(results, counter.taken, {"idle": idle, "before": before, "middle": middle, "after": after},
                     waves, wall, jobs)  # fmt: skip


def thread_ceiling(idle_threads: int) -> int:
    """The most threads the worker can hold: its own, plus every pool thread and the decode thread,
    each with its OpenMP team.

    torch's thread count is read here, in the same environment as the worker's (neither sets it).
    """
    import torch

    return idle_threads + (thread_pool_size(CONCURRENCY) + 1) * torch.get_num_threads()


def summarise(results: list[dict], taken: Counter, stats: dict, waves: list[dict], wall: float, jobs: int) -> dict:
    before, after = stats["before"], stats["after"]
    lost = [r for r in results if r["status"] == "LOST"]
    duplicated = [r for r in results if taken[r["id"]] > 1]
    wrong = [r for r in results if r["status"] != "LOST" and r["status"] != EXPECTED.get(r["kind"], "COMPLETED")]
    growth = (after["rss_mb"] - before["rss_mb"]) / before["rss_mb"]
    ceiling = thread_ceiling(stats["idle"]["threads"])
    whole = [w for w in waves if w["jobs"] == len(KINDS)]  # whole waves: the same work each
    cpu, reference = trend([w["cpu_s"] for w in whole]), trend([w["reference_s"] for w in whole])
    wall_time = trend(relative_job_times(results))
    checks = {
        "rss": growth <= TARGETS["rss_growth"],
        "fds": _other_files(after) == _other_files(before)
        and after["control_connections"] <= TARGETS["control_connections"],
        "threads": after["threads"] <= ceiling,
        "lost": not lost and not duplicated,
        "trend": cpu["change"] <= TARGETS["cpu_trend"],
    }
    return {
        "jobs": len(results), "planned": jobs, "warm_up_jobs": WARM_UP_WAVES * len(KINDS),
        "wall_seconds": round(wall, 1), **stats, "thread_ceiling": ceiling,
        "fds_changed": _changed(before["open"], after["open"]), "rss_growth": round(growth, 4),
        "lost": len(lost), "duplicated": len(duplicated),
        "unexpected_status": [{k: r[k] for k in ("n", "kind", "status")} for r in wrong][:20],
        "by_kind": {kind: dict(Counter(r["status"] for r in results if r["kind"] == kind)) for kind in KINDS},
        "cpu_per_wave": cpu, "reference_cpu": reference,
        "relative_job_time": wall_time, "targets": TARGETS,
        "waves": waves,
        "checks": checks, "targets_met": all(checks.values()) and not wrong,
    }  # fmt: skip


def _other_files(stats: dict) -> dict:
    return {target: count for target, count in stats["open"].items() if target != CONTROL}


def _changed(before: dict, after: dict) -> dict:
    return {key: after.get(key, 0) - before.get(key, 0) for key in sorted({*before, *after})
            if after.get(key, 0) != before.get(key, 0)}  # fmt: skip


def relative_job_times(results: list[dict]) -> list[float]:
    """Each completed job's execution time over its kind's median, in job order (so the mix of
    kinds does not read as a trend)."""
    timed = sorted((r for r in results if r["kind"] not in EXPECTED and r["status"] == "COMPLETED"),
                   key=lambda r: r["n"])  # fmt: skip
    medians = {kind: statistics.median(r["ms"] for r in timed if r["kind"] == kind) or 1
               for kind in {r["kind"] for r in timed}}  # fmt: skip
    return [r["ms"] / medians[r["kind"]] for r in timed]


def trend(values: list[float]) -> dict:
    """Robust trend of a series: medians of its first and last fifth, and the Theil-Sen slope (the
    median of all pairwise slopes) as a change over the whole series, with its 90 % interval."""
    if len(values) < 5:
        return {"first_fifth": 0.0, "last_fifth": 0.0, "change": 0.0, "change_90": [0.0, 0.0], "n": len(values)}
    fifth = len(values) // 5
    first, last = statistics.median(values[:fifth]), statistics.median(values[-fifth:])
    n = len(values)
    slopes = sorted((values[j] - values[i]) / (j - i) for i in range(n) for j in range(i + 1, n))
    # Sen's interval: the ranks around the median slope that Kendall's S allows at 90 % (z = 1.645).
    spread = 1.645 * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    low = slopes[max(0, math.floor((len(slopes) - spread) / 2))]
    high = slopes[min(len(slopes) - 1, math.ceil((len(slopes) + spread) / 2))]
    scale = (n - 1) / (statistics.median(values) or 1)  # slope per item -> fraction of the median over the series
    return {"first_fifth": float(f"{first:.4g}"), "last_fifth": float(f"{last:.4g}"),
            "change": round(statistics.median(slopes) * scale, 3),
            "change_90": [round(low * scale, 3), round(high * scale, 3)], "n": n}  # fmt: skip


def write(result: dict) -> None:
    (ROOT / "bench" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    b, m, a, targets = result["before"], result["middle"], result["after"], result["targets"]
    cpu, job = result["cpu_per_wave"], result["relative_job_time"]
    reference = result["reference_cpu"]
    changed = ", ".join(f"{target} {count:+d}" for target, count in result["fds_changed"].items()) or "none"
    rows = [
        ("worker RSS (MB)", b["rss_mb"], m["rss_mb"], a["rss_mb"], f"{result['rss_growth']:+.1%}", "<= +10 %"),
        ("open file descriptors", b["fds"], m["fds"], a["fds"], changed,
         f"others back to baseline; control-plane connections <= {targets['control_connections']}"),
        ("threads", b["threads"], m["threads"], a["threads"], f"{a['threads'] - b['threads']:+d}",
         f"<= {result['thread_ceiling']}: idle {result['idle']['threads']} + "
         f"(pool {thread_pool_size(CONCURRENCY)} + decode) x torch threads"),
        ("jobs lost / duplicated", "", "", "", f"{result['lost']} / {result['duplicated']}", "0 / 0"),
        ("worker CPU s per wave of 11 jobs, first / last fifth (median)", cpu["first_fifth"], "", cpu["last_fifth"],
         _change(cpu), f"trend <= +{targets['cpu_trend']:.0%}"),
        ("reference work's CPU s (the machine's load)", reference["first_fifth"], "", reference["last_fifth"],
         _change(reference), "reported"),
        ("job time / its kind's median, first / last fifth (median)", job["first_fifth"], "", job["last_fifth"],
         _change(job), "reported (wall time: other load on the machine shows in it)"),
    ]  # fmt: skip
    lines = [
        "# Soak (`make soak`)",
        "",
        f"{result['jobs']} mixed jobs, after {result['warm_up_jobs']} warm-up jobs, through the RunPod API emulator "
        f"and one worker (SDK production loop, tiny checkpoint on CPU, {CONCURRENCY} jobs at a time) in "
        f"{result['wall_seconds']} s. Targets met: **{'yes' if result['targets_met'] else 'NO'}**.",
        "",
        "| measure | after warm-up | middle | end | change | target |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows),
        "",
        "Open files at the end: " + ", ".join(f"{target} x{count}" for target, count in a["open"].items()) + ".",
        "",
        "Jobs by kind and final status: "
        + "; ".join(f"{kind} {dict(statuses)}" for kind, statuses in result["by_kind"].items())
        + ".",
        "",
    ]
    (ROOT / "bench" / "soak.md").write_text("\n".join(lines))


def _change(trend: dict) -> str:
    low, high = trend["change_90"]
    return f"trend {trend['change']:+.1%} over the run (90 %: {low:+.1%} to {high:+.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    try:
        result = soak(args.jobs)
    except urllib.error.URLError as exc:
        raise SystemExit(f"soak: the emulator stopped answering ({exc})") from None
    shown = ("jobs", "before", "after", "fds_changed", "rss_growth", "lost", "duplicated", "cpu_per_wave",
             "reference_cpu", "relative_job_time", "checks", "unexpected_status")  # fmt: skip
    print(json.dumps({key: result[key] for key in shown}, indent=1))
    if not args.no_write:
        write(result)
    if not result["targets_met"]:
        raise SystemExit("soak: targets missed (see above)")


if __name__ == "__main__":
    main()
