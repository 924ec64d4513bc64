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


def test_the_cpu_run_checks_and_reports_every_row_in_order(tmp_path) -> None:
    before = committed_results()
    env = {**os.environ, "GPU_BENCH_PYTHON": sys.executable, "GPU_BENCH_WHEELS": str(tmp_path / "no-wheels")}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_bench.sh"), "--out", str(tmp_path / "out"), "--frames", "4"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed_results() == before  # a CPU run never writes the committed GPU results
    report = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert report["ok"] and report["failure"] is None and report["gpu"] is None
    assert {"torch", "cuda", "transformers", "diffusers", "bandwidth_tb_s", "bandwidth_note"} <= set(report)
    [model] = report["models"]
    assert model["model"] == "tiny" and model["parameters"] > 1e6 and model["failures"] == []
    checks = model["checks"]
    assert checks["finite"]["ok"] and checks["finite"]["prompt_lengths"] == list(gpu_bench.CHECK_PROMPT_LENGTHS)
    agreement = checks["own loop vs stock generate"]
    assert agreement["ok"] and agreement["max_error"] <= agreement["tolerance"] == 1e-4
    assert len(agreement["per_frame"]) == gpu_bench.CHECK_FRAMES
    assert checks["compiled vs eager"]["ok"] is None  # the CPU compiles only when asked (next test)
    reads = model["weight_bytes_per_step"]
    assert 0 < reads["own"] < reads["stock"]  # stock runs a third LM pass and the full lm_head
    # The headline rows first: eager at batch 1, compiled at 1 and 16; then the rest.
    order = [(row["loop"], row["batch"]) for row in model["rows"]]
    assert order[:3] == [(EAGER, 1), (COMPILED, 1), (COMPILED, 16)]
    assert order == [(gpu_bench.LOOPS[loop], batch) for loop, batch in gpu_bench.ROWS]
    for row in model["rows"]:
        if row["loop"] == COMPILED:
            assert row["rtf"] is None and row["note"].startswith("skipped: compiled rows run on CUDA"), row
            continue
        assert row["rtf"] > 0 and row["step_ms"] > 0 and row["frames"] == 4, row
        assert row["realtime_multiple"] == pytest.approx(row["batch"] / row["rtf"])
        assert row["step_gb"] * 1e9 == pytest.approx(reads["own" if row["loop"] == EAGER else "stock"])
        assert row["bandwidth_fraction"] is None  # no GPU, no bandwidth: said in bandwidth_note
        assert row["compile_s"] is None and row["recompiles"] is None and row["cudagraph_skips"] is None
        assert 0 < row["first_frame_s"] < row["wall_s"]
    # Then the same model with 8-bit weights (fp8 only where the GPU has float8: not on the CPU).
    [(mode, eight_bit)] = model["weights"].items()
    assert mode == "int8" and eight_bit["weights"] == "int8" and eight_bit["start_up_check"].startswith("weights: int8")
    assert [row["batch"] for row in eight_bit["rows"]] == list(gpu_bench.WEIGHT_BATCHES)
    assert all(row["rtf"] > 0 and row["frames"] == 4 for row in eight_bit["rows"])
    assert 0 < eight_bit["vs_bf16"]["max"] < 0.01 and eight_bit["graph_breaks"] == 0
    page = (tmp_path / "out" / "gpu_results.md").read_text()
    assert "All checks passed" in page and "| stock generate | 1 |" in page and "| own loop, eager | 16 |" in page
    assert "| int8 | 1 |" in page and "| int8 | 16 |" in page
    assert "| GB per step | bandwidth used | compile (s) | recompiles | CUDA graphs skipped |" in page


@pytest.mark.timeout(1800)  # compiling from scratch: minutes, more on busy shared cores
def test_a_compiled_row_reports_its_compile_recompiles_and_bytes(tmp_path) -> None:
    """The compiled step on the CPU (torch.compile, no CUDA graphs), bucket 1 only: a minute or two."""
    out = tmp_path / "compiled"
    options = ["--compiled", "--rows", "eager:1,compiled:1", "--frames", "3", "--weights", "none"]
    assert gpu_bench.main([*options, "--out", str(out)]) == 0
    [model] = json.loads((out / "gpu_results.json").read_text())["models"]
    check = model["checks"]["compiled vs eager"]
    assert check["ok"] and check["max_error"] <= check["tolerance"] == 1e-4
    # The worker's own start-up comparison (engine/fitness.py), run on the same compiled step.
    fitness = model["checks"]["start-up fitness check"]
    assert fitness["ok"] and fitness["difference"] <= fitness["tolerance"] == 1e-4
    assert fitness["note"].startswith("the compiled step agrees with the eager loop over 4 forced speech frames")
    assert "weights" not in model or model["weights"] == {}
    assert set(model["compile_s"]) == {"1"} and model["compile_s"]["1"] > 0 and model["compile_graphs"] == {"1": 1}
    eager, compiled = model["rows"]
    assert compiled["loop"] == COMPILED and compiled["rtf"] > 0 and compiled["note"] == ""
    assert compiled["compile_s"] == model["compile_s"]["1"] and compiled["recompiles"] == 0
    assert compiled["cudagraph_skips"] is None  # no CUDA: no graphs to skip
    # Its own count (every operator of the static frame, KV and activations too), not the eager loop's weights.
    assert compiled["step_gb"] > 0 and compiled["step_gb"] != eager["step_gb"]
    assert "compiling the step (the warm-up of each bucket): bucket 1" in (out / "gpu_results.md").read_text()


def test_eight_bit_modes_are_named(capsys) -> None:
    assert gpu_bench.parse_options([]).weights == ("int8", "fp8")
    assert gpu_bench.parse_options(["--weights", "none"]).weights == ()
    with pytest.raises(SystemExit):
        gpu_bench.parse_options(["--weights", "int4"])
    assert "--weights: choose from int8, fp8, or none" in capsys.readouterr().err


def test_rows_are_named_by_loop_and_batch(capsys) -> None:
    assert gpu_bench.parse_options(["--rows", "compiled:16, eager:1"]).rows == (("compiled", 16), ("eager", 1))
    for wrong in ("warp:1", "eager", "eager:0", "eager:65"):
        with pytest.raises(SystemExit):
            gpu_bench.parse_options(["--rows", wrong])
        assert "--rows: give LOOP:BATCH pairs" in capsys.readouterr().err


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
    report = json.loads((out / "gpu_results.json").read_text())
    assert not report["ok"] and report["failure"].startswith(reason)
    checks = report["models"][0]["checks"]
    assert not checks["finite" if fault == "nan" else "own loop vs stock generate"]["ok"]
    assert report["models"][0]["rows"] == []  # nothing is timed on a device that computes wrong numbers
    assert "FAILED" in (out / "gpu_results.md").read_text()


def test_rows_that_do_not_fit_the_time_budget_are_skipped_with_a_note(tmp_path) -> None:
    out = tmp_path / "budget"
    assert gpu_bench.main(["--budget", "0.01", "--out", str(out), "--frames", "3"]) == 0
    report = json.loads((out / "gpu_results.json").read_text())
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
