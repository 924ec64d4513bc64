"""`make bench`: every figure against its baseline, measured in the same run, on this machine.

    python -m bench.run                   # all figures; writes bench/results.json and bench/results.md
    python -m bench.run --only a,f        # some of them (the files are then not written)
    python -m bench.run --only h --update # some of them, replacing their rows in the files

a  weight bytes read per second of audio (7B on a GPU, modelled from calls counted on the tiny model)
b  wall time of an 8-chunk text: own batched loop vs stock generate chunk by chunk
c  post-processing + upload per minute of audio vs the design's ffmpeg/FFT way
d  peak memory of a ~10-minute job
e  cold start and import time
f  streaming: time to first audio / total time
g  word alignment: CPU time per minute of audio, and a job's wall time with word timestamps / without
h  4 single-chunk jobs sent together through the worker vs one after another (wall time)
i  7B weight bytes per second of audio, 8 concurrent jobs vs 1 (modelled as in a)
j  time to first audio of a short streamed job sent while a long job runs / the long job's remaining time
k  wall time per frame, compiled static step vs the eager loop (batch 1 and 8); start-up compile, warm vs empty cache
l  operator dispatches per frame outside a compiled region, compiled step vs eager loop
m  host synchronisations per frame of the compiled step (at most one)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
import time
import traceback

from bench.common import ROOT, TORCH_THREADS, Row, Workspace

FIGURES = {
    "a": "bench.weights",
    "b": "bench.speed",
    "c": "bench.postprocess",
    "d": "bench.memory",
    "e": "bench.coldstart",
    "f": "bench.streaming",
    "g": "bench.alignment",
    "h": "bench.concurrent_jobs",
    "i": "bench.concurrent_weights",
    "j": "bench.join_latency",
    "k": "bench.compiled_step:measure_frame_time",
    "l": "bench.compiled_step:measure_dispatches",
    "m": "bench.compiled_step:measure_syncs",
}
RESULTS_JSON = ROOT / "bench" / "results.json"
RESULTS_MD = ROOT / "bench" / "results.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated figure letters ({', '.join(FIGURES)})")
    parser.add_argument("--update", action="store_true", help="with --only: replace those figures' rows in the files")
    args = parser.parse_args()
    letters = args.only.split(",") if args.only else list(FIGURES)
    unknown = [letter for letter in letters if letter not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import importlib

    workspace = Workspace()
    rows: list[Row] = []
    details: dict[str, object] = {}
    failures: dict[str, str] = {}
    started = time.perf_counter()
    try:
        for letter in letters:
            print(f"figure {letter} ...", file=sys.stderr, flush=True)
            figure_started = time.perf_counter()
            try:
                module, _, function = FIGURES[letter].partition(":")  # several figures may share a module
                figure_rows, detail = getattr(importlib.import_module(module), function or "measure")(workspace)
            except Exception as exc:  # one failing figure must not hide the others
                traceback.print_exc()
                failures[letter] = f"{type(exc).__name__}: {exc}"
                continue
            rows += figure_rows
            details[letter] = {**detail, "seconds": round(time.perf_counter() - figure_started, 1)}
    finally:
        workspace.close()

    print(markdown_table(rows, failures))
    if args.only is None or args.update:
        write_results(rows, details, failures, letters, time.perf_counter() - started, merge=args.only is not None)
    if failures:
        raise SystemExit(1)


def write_results(rows: list[Row], details: dict, failures: dict, letters: list[str], seconds: float,
                  merge: bool) -> None:  # fmt: skip
    """Write results.json and results.md; with `merge`, only the figures in `letters` are replaced."""
    import torch

    measured_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    new_rows = [row.as_dict() for row in rows]
    if merge and RESULTS_JSON.exists():
        old = json.loads(RESULTS_JSON.read_text())
        kept = [row for row in old["rows"] if row["figure"] not in letters]
        new_rows = sorted(kept + new_rows, key=lambda row: row["figure"])  # stable: each figure's order is kept
        details = {**{k: v for k, v in old["details"].items() if k not in letters}, **details}
        failures = {**{k: v for k, v in old["failures"].items() if k not in letters}, **failures}
        measured = {**old.get("figures_measured_at", dict.fromkeys(old["details"], old["measured_at"])),
                    **dict.fromkeys(letters, measured_at)}  # fmt: skip
        seconds = old["seconds"]
    else:
        measured = dict.fromkeys(letters, measured_at)
    RESULTS_JSON.write_text(
        json.dumps(
            {
                "measured_at": measured_at,
                "figures_measured_at": dict(sorted(measured.items())),
                "machine": {
                    "cpu_count": __import__("os").cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "torch_threads": TORCH_THREADS,
                },
                "seconds": round(seconds, 1),
                "rows": new_rows,
                "failures": failures,
                "details": details,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    RESULTS_MD.write_text(markdown_table([Row.from_dict(row) for row in new_rows], failures) + "\n")
    print(f"\nwrote {RESULTS_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}", file=sys.stderr)


def markdown_table(rows: list[Row], failures: dict[str, str]) -> str:
    lines = [
        "| Fig. | Measure | Ours | Baseline | Ratio | Target | Met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        ratio = "" if row.ratio is None else f"{row.ratio:.3g}"
        baseline = "" if row.baseline is None else f"{row.baseline:.4g}"
        target = "" if row.target is None else f"ratio {row.target.replace('<=', '≤').replace('>=', '≥')}"
        measure = row.measure + (f" ({row.note})" if row.note else "")
        lines.append(f"| {row.figure} | {measure} | {row.ours:.4g} | {baseline} | {ratio} | {target} | {met} |")
    for letter, reason in failures.items():
        lines.append(f"| {letter} | failed: {reason} | | | | | **no** |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
