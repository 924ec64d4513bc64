"""`make bench`: every figure against its baseline, measured in the same run, on this machine.

    python -m bench.run              # all figures; writes bench/results.json and bench/results.md
    python -m bench.run --only a,f   # some of them (the files are then not written)

a  weight bytes read per second of audio (7B on a GPU, modelled from calls counted on the tiny model)
b  wall time of an 8-chunk text: own batched loop vs stock generate chunk by chunk
c  post-processing + upload per minute of audio vs the design's ffmpeg/FFT way
d  peak memory of a ~10-minute job
e  cold start and import time
f  streaming: time to first audio / total time
g  word alignment: CPU time per minute of audio, and a job's wall time with word timestamps / without
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
}
RESULTS_JSON = ROOT / "bench" / "results.json"
RESULTS_MD = ROOT / "bench" / "results.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated figure letters (a-g)")
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
                figure_rows, detail = importlib.import_module(FIGURES[letter]).measure(workspace)
            except Exception as exc:  # one failing figure must not hide the others
                traceback.print_exc()
                failures[letter] = f"{type(exc).__name__}: {exc}"
                continue
            rows += figure_rows
            details[letter] = {**detail, "seconds": round(time.perf_counter() - figure_started, 1)}
    finally:
        workspace.close()

    table = markdown_table(rows, failures)
    print(table)
    if args.only is None:
        import torch

        RESULTS_JSON.write_text(
            json.dumps(
                {
                    "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "machine": {
                        "cpu_count": __import__("os").cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "torch_threads": TORCH_THREADS,
                    },
                    "seconds": round(time.perf_counter() - started, 1),
                    "rows": [row.as_dict() for row in rows],
                    "failures": failures,
                    "details": details,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
        RESULTS_MD.write_text(table + "\n")
        print(f"\nwrote {RESULTS_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}", file=sys.stderr)
    if failures:
        raise SystemExit(1)


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
