"""`make gpu-bench` without CUDA: the same code runs the tiny configuration on the CPU in float32.

Nothing is mocked. The GPU itself cannot run here, so these tests check the benchmark's code path,
its report and its failures; the GPU numbers come from a run on a GPU (docs/testing.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_bench

ROOT = Path(__file__).resolve().parent.parent
EAGER, STOCK, COMPILED = "own loop, eager", "stock generate", "own loop, compiled"


def committed_results() -> dict[str, float | None]:
    paths = [gpu_bench.RESULTS.with_suffix(suffix) for suffix in (".md", ".json")]
    return {str(path): path.stat().st_mtime if path.exists() else None for path in paths}


def test_the_cpu_run_checks_and_reports_every_row(tmp_path) -> None:
    before = committed_results()
    env = {**os.environ, "GPU_BENCH_PYTHON": sys.executable, "GPU_BENCH_WHEELS": str(tmp_path / "no-wheels")}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_bench.sh"), "--out", str(tmp_path / "r"), "--frames", "4"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed_results() == before  # a CPU run never writes the committed GPU results
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["failure"] is None and report["gpu"] is None
    assert {"torch", "cuda", "transformers", "diffusers", "bandwidth_tb_s", "bandwidth_note"} <= set(report)
    [model] = report["models"]
    assert model["model"] == "tiny" and model["parameters"] > 1e6
    checks = model["checks"]
    assert checks["finite"]["ok"] and checks["finite"]["prompt_lengths"] == list(gpu_bench.CHECK_PROMPT_LENGTHS)
    agreement = checks["own loop vs stock generate"]
    assert agreement["ok"] and agreement["max_error"] <= agreement["tolerance"] == 1e-4
    assert len(agreement["per_frame"]) == gpu_bench.CHECK_FRAMES
    assert checks["compiled vs eager"]["ok"] in (True, None)
    reads = model["weight_bytes_per_step"]
    assert 0 < reads["own"] < reads["stock"]  # stock runs a third LM pass and the full lm_head
    rows = {(row["loop"], row["batch"]): row for row in model["rows"]}
    expected = [(EAGER, 1), (STOCK, 1)] + [(EAGER, n) for n in gpu_bench.CONCURRENCY]
    assert list(rows)[: len(expected)] == expected
    for key in expected:
        row = rows[key]
        assert row["rtf"] > 0 and row["step_ms"] > 0 and row["frames"] == 4, row
        assert row["realtime_multiple"] == pytest.approx(row["batch"] / row["rtf"])
        assert row["bandwidth_fraction"] is None  # no GPU, no bandwidth: said in bandwidth_note
        assert 0 < row["first_frame_s"] < row["wall_s"]
    for n in (1, *gpu_bench.CONCURRENCY):
        row = rows[(COMPILED, n)]
        assert row["rtf"] is not None or row["note"].startswith(("not available in this build", "skipped"))
    page = (tmp_path / "r.md").read_text()
    assert "All checks passed" in page and "| stock generate | 1 |" in page and "| own loop, eager | 16 |" in page


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("nan", "finite: a row's hidden state is not finite"),
        ("mismatch", "own loop vs stock generate: the audio differs"),
    ],
)
def test_a_nan_row_or_a_mismatch_fails_the_run_loudly(tmp_path, capsys, fault, reason) -> None:
    out = tmp_path / fault
    assert gpu_bench.main(["--inject", fault, "--out", str(out), "--frames", "3"]) == 1
    assert f"gpu-bench FAILED: {reason}" in capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert not report["ok"] and report["failure"].startswith(reason)
    checks = report["models"][0]["checks"]
    assert not checks["finite" if fault == "nan" else "own loop vs stock generate"]["ok"]
    assert report["models"][0]["rows"] == []  # nothing is timed on a device that computes wrong numbers
    assert "FAILED" in out.with_suffix(".md").read_text()


def test_rows_that_do_not_fit_the_time_budget_are_skipped_with_a_note(tmp_path) -> None:
    out = tmp_path / "budget"
    assert gpu_bench.main(["--budget", "0.01", "--out", str(out), "--frames", "3"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["models"][0]["rows"]
    assert report["ok"] and rows and all(row["rtf"] is None and row["note"] for row in rows)
    assert any("time budget" in row["note"] for row in rows)


def test_known_gpus_have_their_bandwidth() -> None:
    assert gpu_bench.bandwidth_of("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_bench.bandwidth_of("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_bench.bandwidth_of("NVIDIA H200") == 4.8e12
    assert gpu_bench.bandwidth_of("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert gpu_bench.bandwidth_of("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert gpu_bench.bandwidth_of("NVIDIA GeForce RTX 4090") == 1.008e12
    assert gpu_bench.bandwidth_of("NVIDIA B200") is None
