"""`make gpu-bench`: VibeVoice-7B and VibeVoice-1.5B at full size, with random weights, on one GPU.

No download: both models are built from their real configurations directly on the GPU in bf16, and
their weights are drawn there (the tiny checkpoint's rules, which keep every output finite). Their
shapes, and so their costs, are exactly the real models'. Random weights never choose to speak, so
the generation config allows only the "next frame" token, as in the tests: every step is a frame.

For each model it first checks the GPU's numbers, and fails loudly (exit status 1, the reason on
stderr and in the report) when one is off:
  finite      a batch of prompts of different lengths decodes with every row's hidden state and
              audio finite;
  stock       the own loop (decoder.BatchDecoder) agrees with transformers' `generate` over the
              first frames (the error seen is reported: bf16 kernels differ between the two);
  compiled    the compiled frame step agrees with the eager loop (on the first compiled row's batch).
Then the rows of ROWS, in order: the own loop eager at batch 1, compiled at batch 1 and 16 (the
headline numbers, first), stock `generate`, then the rest. Each gives the real-time factor, the
aggregate real-time multiple, the time to the first frame, the step time, the bytes one step moves
and the share of the GPU's memory bandwidth that is, and the peak memory; a compiled row also the
seconds its bucket took to compile, the graphs recompiled while it ran and the CUDA graphs inductor
skipped (any skip fails the row, and the run, loudly). A time budget (GPU_BUDGET_S: the run stays
near 6 minutes on one H100, so a second one fits) skips the rows that no longer fit, with a note.

Without CUDA the same code runs the tiny configuration on the CPU in float32 in seconds (a test does).

    python -m bench.gpu_bench                     # CUDA: writes bench/gpu_results.md and .json
    python -m bench.gpu_bench --out /tmp/r        # writes /tmp/r/gpu_results.md and .json
    python -m bench.gpu_bench --rows eager:1,compiled:1 --compiled   # some rows (here compiling on the CPU)
    python -m bench.gpu_bench --models 1.5b --device cpu --dtype bfloat16 --frames 3   # a real size on the CPU
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.step_counters import frame_bytes  # noqa: E402
from bench.weights import CallCounter, module_bytes, real_1_5b_config, real_7b_config  # noqa: E402
from engine.batch import DecodeRequest, NonFiniteStateError  # noqa: E402
from engine.decoder import BatchDecoder  # noqa: E402
from engine.framestep import FrameStep, bucket_for, capacity_for  # noqa: E402
from tools.tiny_checkpoint import build_config, build_generation_config, build_tokenizer, randomize_weights  # noqa: E402

RESULTS = ROOT / "bench" / "gpu_results"  # .md and .json, where a run on CUDA writes without --out
# The kinds of row (an id, its label; ModelBench.<id>_row fills one), and the rows in the order they run:
# the headline numbers first, so that a run its budget cuts short still has them. Add a kind here.
LOOPS = {"eager": "own loop, eager", "compiled": "own loop, compiled", "stock": "stock generate"}
ROWS = (("eager", 1), ("compiled", 1), ("compiled", 16), ("stock", 1), ("eager", 4), ("eager", 8), ("eager", 16),
        ("compiled", 4), ("compiled", 8))  # fmt: skip
# After a model's bf16 rows: the same model with 8-bit weights (bench/gpu_weights.py), at these batches.
WEIGHT_MODES = ("int8", "fp8")
WEIGHT_BATCHES = (1, 16)
SAMPLE_RATE = 24000  # the codec's rate: 3200 samples (one frame) are 133 ms
DIFFUSION_STEPS = 10
CFG_SCALE = 1.3
CHECK_FRAMES = 3  # frames compared between loops: bf16 differences grow as frames feed back
CHECK_PROMPT_LENGTHS = (12, 57, 140, 301)  # a left-padded batch
TIMED_PROMPT_LENGTHS = (96, 120, 144, 168)  # a chunk of text without a voice prompt is ~100 tokens
# Agreement: the largest sample difference / the reference's peak. float32 on the CPU is the tests'
# standard; bf16 kernels differ between batch shapes, while a real fault (other noise, a wrong mask)
# gives unrelated audio, an error near 1 or more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}
# Model builds included; with imports and the wheels' install about 6 minutes on one H100: two runs and
# the machine's start fit in 15 minutes of GPU time.
GPU_BUDGET_S = 330
MODEL_SHARE = {"7b": 0.75, "1.5b": 0.25}  # of the budget, in order: a fast 7B leaves the 1.5B what it saved
COMPILE_RESERVE_S = 120  # compiling the step is started only with this much of a model's part left
# HBM bandwidth (bytes/s) by device name; the first entry whose words all appear in the name wins.
KNOWN_BANDWIDTH = (
    (("H200",), 4.8e12),
    (("H100", "PCIe"), 2.0e12),
    (("H100", "NVL"), 3.9e12),
    (("H100",), 3.35e12),
    (("A100", "40GB"), 1.555e12),
    (("A100",), 2.0e12),
    (("L40S",), 0.864e12),
    (("A6000",), 0.768e12),
    (("RTX 4090",), 1.008e12),
)


# --- data types ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What one run measures, carried down to every step."""

    models: tuple[str, ...]  # "7b", "1.5b", "tiny"
    device: str
    dtype: torch.dtype
    frames: int  # frames per timed sequence
    budget_s: float
    compiled: bool  # measure the compiled step (where this build has one)
    out: Path | None  # the folder of gpu_results.md and .json; None: print only
    rows: tuple[tuple[str, int], ...] = ()  # (loop id, batch) in the order they run; default ROWS
    weights: tuple[str, ...] = WEIGHT_MODES  # 8-bit modes measured after the bf16 rows (fp8 where the GPU has it)
    inject: str | None = None  # "nan" | "mismatch": make a check fail (the tests prove it fails loudly)


@dataclass
class Row:
    """One timed configuration of one model."""

    loop: str  # a label of LOOPS
    batch: int
    frames: int = 0
    wall_s: float | None = None
    rtf: float | None = None  # wall time / one sequence's audio
    realtime_multiple: float | None = None  # all sequences' audio / wall time
    first_frame_s: float | None = None  # from the call to the first frame's samples on the host
    step_ms: float | None = None  # one frame step of the whole batch, steady state
    step_gb: float | None = None  # bytes one step moves: eager and stock, weight reads; compiled, every operator's
    bandwidth_fraction: float | None = None  # step_gb / step time / GPU bandwidth
    compile_s: float | None = None  # compiling this row's bucket (on the first row of each bucket)
    recompiles: int | None = None  # graphs dynamo captured during the row (compiled rows: 0 expected)
    cudagraph_skips: int | None = None  # CUDA graphs inductor skipped for this bucket (CUDA; 0 or the row fails)
    peak_gib: float | None = None
    note: str = ""


@dataclass
class Timing:
    wall_s: float
    first_frame_s: float | None
    step_s: float | None
    peak_bytes: int | None
    audio: list[np.ndarray] = field(repr=False)


class CheckFailed(RuntimeError):
    """A correctness check on the device failed: the run's numbers cannot be trusted."""


# --- models ---------------------------------------------------------------------------------------


MODEL_CONFIGS: dict[str, Callable] = {
    "7b": real_7b_config,
    "1.5b": real_1_5b_config,
    "tiny": lambda: build_config(build_tokenizer()),
}


def build_model(name: str, options: Options):
    """The model with random weights drawn on its device, in its dtype, allowed only to speak."""
    from transformers import VibeVoiceForConditionalGeneration

    config = MODEL_CONFIGS[name]()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(options.dtype)
    try:
        with torch.device(options.device):
            model = VibeVoiceForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    randomize_weights(model, seed=0, device=options.device)
    model.generation_config = build_generation_config(config)  # suppresses every token but "next frame"
    return model.eval()


def prompt_ids(config, length: int, seed: int) -> torch.Tensor:
    """Random ordinary tokens ending in speech-start, as a chunk's prompt ends: [length]."""
    first_special = min(config.pad_token_id, config.eos_token_id, config.audio_bos_token_id, config.audio_token_id)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, first_special, (length - 1,), generator=generator)
    return torch.cat([ids, torch.tensor([config.audio_bos_token_id])])


def requests(config, lengths: tuple[int, ...], count: int, frames: int, seed: int = 1000) -> list[DecodeRequest]:
    return [
        DecodeRequest(index=i, input_ids=prompt_ids(config, lengths[i % len(lengths)], seed + i), max_frames=frames,
                      seed=seed + i, cfg_scale=CFG_SCALE, diffusion_steps=DIFFUSION_STEPS)
        for i in range(count)
    ]  # fmt: skip


def compiled_unavailable() -> str | None:
    """Why this build cannot measure a compiled step (None: it can)."""
    if "compile_mode" not in inspect.signature(BatchDecoder).parameters or not hasattr(BatchDecoder, "warm_up"):
        return "not available in this build (decoder.BatchDecoder has no compile_mode)"
    return None


# --- timing ---------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def run_own(decoder: BatchDecoder, batch: list[DecodeRequest], device: str) -> Timing:
    """The own loop over `batch` to the end; frames are timed as they reach the host."""
    stamps: list[float] = []
    _sync(device)
    _reset_peak(device)
    started = time.perf_counter()
    results = decoder.decode(batch, on_frame=lambda index, samples: stamps.append(time.perf_counter()))
    _sync(device)
    wall = time.perf_counter() - started
    steps = max(r.frames for r in results)
    step = (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else None
    first = stamps[0] - started if stamps else None
    return Timing(wall, first, step, _peak(device), [r.audio for r in results])


def run_stock(model, request: DecodeRequest, device: str) -> Timing:
    """transformers' `generate` for one request, seeded as the engine seeds it. Its frames are timed
    when its acoustic decoder has run (one added sync per frame, beside the ~14 it has)."""
    stamps: list[float] = []

    def frame_done(module, args, output) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    input_ids = request.input_ids[None].to(device)
    _sync(device)
    _reset_peak(device)
    handle = model.model.audio_tower.decoder.register_forward_hook(frame_done)
    started = time.perf_counter()
    torch.manual_seed(request.seed)
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=request.max_frames,
                guidance_scale=request.cfg_scale,
                num_diffusion_steps=request.diffusion_steps,
                return_dict_in_generate=True,
            )
        audio = output.audio[0].reshape(-1).float().cpu().numpy()
    finally:
        handle.remove()
    wall = time.perf_counter() - started
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return Timing(wall, stamps[0] - started if stamps else None, step, _peak(device), [audio])


def weight_bytes_per_step(model, decoder: BatchDecoder, run: Callable[[int], object]) -> int:
    """Weight bytes one frame step reads: module calls counted (forward hooks) over runs of 2 and 4
    frames, each weighed by its module's parameter bytes; the difference leaves the prompt out."""
    element = next(model.parameters()).element_size()
    sizes = {name: size * element // 2 for name, size in module_bytes(model).items()}  # module_bytes: bf16
    totals = []
    for frames in (2, 4):
        with CallCounter(SimpleNamespace(model=model, decoder=decoder)) as counter:
            run(frames)
        totals.append(counter.weighted_bytes(sizes))
    return (totals[1] - totals[0]) // 2


def bandwidth_of(device_name: str) -> float | None:
    for words, bytes_per_second in KNOWN_BANDWIDTH:
        if all(word in device_name for word in words):
            return bytes_per_second
    return None


# --- checks ---------------------------------------------------------------------------------------


class _NaNInRow:
    """Injected fault: the language model's output row 1 becomes NaN in batched passes (as a fused
    kernel's fully masked padding row can), so the finite check must fail."""

    def __init__(self, model, active: bool):
        self.norm = model.model.language_model.norm
        self.active = active
        self.handle = None

    def __enter__(self) -> _NaNInRow:
        if self.active:
            self.handle = self.norm.register_forward_hook(self._poison)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()

    @staticmethod
    def _poison(module, args, output):
        if output.shape[0] > 1:
            output = output.clone()
            output[1] = float("nan")
        return output


def agreement(got: list[np.ndarray], want: list[np.ndarray], hop: int) -> dict:
    """The largest sample difference over the reference's peak: overall and per frame."""
    per_sequence = []
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            raise CheckFailed(f"the two loops gave {a.size} and {b.size} samples for the same request")
        peak = max(float(np.abs(b).max()), 1e-6)
        per_sequence.append(
            [float(np.abs(a[k : k + hop] - b[k : k + hop]).max()) / peak for k in range(0, b.size, hop)]
        )
    per_frame = [max(errors[k] for errors in per_sequence) for k in range(len(per_sequence[0]))]
    return {"max_error": max(per_frame), "per_frame": [float(f"{e:.3g}") for e in per_frame]}


def check_finite(decoder: BatchDecoder, model, options: Options, checks: dict) -> Timing:
    """A left-padded batch of prompts of different lengths: every row's hidden state and audio finite."""
    batch = requests(model.config, CHECK_PROMPT_LENGTHS, len(CHECK_PROMPT_LENGTHS), CHECK_FRAMES)
    checks["finite"] = {"prompt_lengths": list(CHECK_PROMPT_LENGTHS), "frames": CHECK_FRAMES, "ok": False}
    try:
        with _NaNInRow(model, options.inject == "nan"):
            timing = run_own(decoder, batch, options.device)
    except NonFiniteStateError as exc:
        raise CheckFailed(f"finite: a row's hidden state is not finite on {options.device} ({exc})") from exc
    bad = [row for row, audio in enumerate(timing.audio) if not np.isfinite(audio).all()]
    if bad:
        raise CheckFailed(f"finite: the audio of rows {bad} is not finite on {options.device}")
    checks["finite"]["ok"] = True
    return timing


def check_agrees(name: str, got: list[np.ndarray], want: list[np.ndarray], options: Options, hop: int, checks: dict):
    record_agreement(name, {**agreement(got, want, hop), "tolerance": TOLERANCE[options.dtype]}, options, checks)


def record_agreement(name: str, seen: dict, options: Options, checks: dict) -> None:
    """A comparison's result in the report; CheckFailed if it is beyond its tolerance."""
    tolerance = seen["tolerance"]
    checks[name] = {**seen, "frames": CHECK_FRAMES, "ok": seen["max_error"] <= tolerance}
    if not checks[name]["ok"]:
        raise CheckFailed(
            f"{name}: the audio differs by {seen['max_error']:.3g} of its peak over the first {CHECK_FRAMES} frames "
            f"(per frame {seen['per_frame']}; tolerance {tolerance} in {str(options.dtype).removeprefix('torch.')})"
        )


def check_stock(decoder: BatchDecoder, model, options: Options, checks: dict) -> None:
    """The own loop against transformers' `generate` for one prompt, over the first frames."""
    [request] = requests(model.config, CHECK_PROMPT_LENGTHS[1:2], 1, CHECK_FRAMES)
    stock = run_stock(model, request, options.device)
    if options.inject == "mismatch":  # another noise stream: a loop that lost the stock order
        request = replace(request, seed=request.seed + 1)
    own = run_own(decoder, [request], options.device)
    check_agrees("own loop vs stock generate", own.audio, stock.audio, options, model.config.audio_config.hop_length,
                 checks)  # fmt: skip


def decode_checked(decoder: BatchDecoder, batch: list[DecodeRequest], options: Options, what: str) -> Timing:
    try:
        return run_own(decoder, batch, options.device)
    except NonFiniteStateError as exc:
        raise CheckFailed(f"{what}: a row's hidden state is not finite on {options.device} ({exc})") from exc


# --- one model --------------------------------------------------------------------------------------


class ModelBench:
    """One model's checks and timed rows (`Options.rows`, in order), inside its part of the time budget;
    fills `report`. A kind of row is an id in LOOPS and a method `<id>_row(row)` that fills the row."""

    def __init__(
        self,
        name: str,
        options: Options,
        deadline: float,
        bandwidth: float | None,
        report: dict,
        save: Callable[[], None],
    ):
        self.name, self.options, self.deadline, self.bandwidth = name, options, deadline, bandwidth
        self.report, self.save = report, save  # save(): write the report so far
        self.rows: list[Row] = []
        self.compiled: BatchDecoder | None = None  # built by the first compiled row
        self.compiled_step_bytes: dict[int, int] = {}  # per bucket
        report.update(model=name, checks={}, rows=self.rows, notes=[], failures=[], compile_s={})

    def run(self) -> None:
        self.build()
        checks = self.report["checks"]
        self.eager_check = check_finite(self.eager, self.model, self.options, checks)
        self.step_estimate = self.eager_check.step_s or self.eager_check.wall_s / CHECK_FRAMES
        check_stock(self.eager, self.model, self.options, checks)
        self.count_weight_reads()
        self.save()
        for loop, batch in self.options.rows:
            row = Row(LOOPS[loop], batch, self.options.frames)
            self.rows.append(row)
            getattr(self, f"{loop}_row")(row)
            self.save()
        self.eight_bit_rows()
        peaks = [row.peak_gib for row in self.rows if row.peak_gib is not None]
        self.report["peak_gib"] = max(peaks) if peaks else None  # the largest batch's row, weights included

    def build(self) -> None:
        _reset_peak(self.options.device)
        started = time.perf_counter()
        self.model = build_model(self.name, self.options)
        self.report["build_s"] = time.perf_counter() - started
        self.report["parameters"] = sum(p.numel() for p in self.model.parameters())
        self.report["weight_gb"] = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1e9
        self.report["attention"] = self.model.config.text_config._attn_implementation
        self.frame_seconds = self.model.config.audio_config.hop_length / SAMPLE_RATE
        self.eager = BatchDecoder(self.model)

    def close(self) -> None:
        for name in ("model", "eager", "compiled"):
            self.__dict__.pop(name, None)
        torch._dynamo.reset()  # compiled graphs and CUDA graphs hold the model's tensors
        gc.collect()
        if self.options.device == "cuda":
            torch.cuda.empty_cache()

    def count_weight_reads(self) -> None:
        [request] = requests(self.model.config, TIMED_PROMPT_LENGTHS, 1, 4)
        device = self.options.device
        self.step_bytes = {
            "own": weight_bytes_per_step(self.model, self.eager,
                                         lambda f: self.eager.decode([replace(request, max_frames=f)])),
            "stock": weight_bytes_per_step(self.model, self.eager,
                                           lambda f: run_stock(self.model, replace(request, max_frames=f), device)),
        }  # fmt: skip
        self.report["weight_bytes_per_step"] = dict(self.step_bytes)

    def fits(self, row: Row, estimate_s: float) -> bool:
        """Whether the row fits in what is left of this model's budget; if not, it is noted as skipped."""
        left = self.deadline - time.monotonic()
        if estimate_s <= left:
            return True
        row.note = (
            f"skipped: {max(left, 0):.0f} s of this model's time budget left, the row needs about {estimate_s:.0f} s"
        )
        return False

    # --- the kinds of row -------------------------------------------------------------------------

    def eager_row(self, row: Row) -> None:
        self.timed(row, self.eager, self.step_bytes["own"])
        if row.batch == 1 and row.step_ms:
            self.step_estimate = row.step_ms / 1e3

    def stock_row(self, row: Row) -> None:
        frames = self.options.frames
        if not self.fits(row, 3 * (frames + 2) * self.step_estimate * 2):
            return
        [request] = requests(self.model.config, TIMED_PROMPT_LENGTHS, row.batch, frames)
        run_stock(self.model, replace(request, max_frames=2), self.options.device)  # warm-up
        self.fill(row, run_stock(self.model, request, self.options.device), self.step_bytes["stock"])

    def compiled_row(self, row: Row) -> None:
        """The compiled step at this row's batch: its bucket compiled first (timed), the compiled-vs-eager
        check on the first; the bytes one compiled frame moves; recompiles and CUDA graphs skipped."""
        decoder = self.compiled_decoder(row)
        if decoder is None:
            return
        bucket = bucket_for(row.batch)
        if str(bucket) not in self.report["compile_s"] and not self.compile_bucket(decoder, row, bucket):
            return
        if "compiled vs eager" not in self.report["checks"]:
            self.check_compiled(decoder, row.batch)
        if bucket not in self.compiled_step_bytes:
            self.compiled_step_bytes[bucket] = compiled_frame_bytes(decoder, bucket)
        graphs, skips = _compile_counters()
        self.timed(row, decoder, self.compiled_step_bytes[bucket])
        row.recompiles = _compile_counters()[0] - graphs
        if self.options.device == "cuda":
            row.cudagraph_skips = self.compile_skips.get(bucket, 0) + _compile_counters()[1] - skips
            if row.cudagraph_skips:
                self.fail_row(row, f"inductor skipped CUDA graphs {row.cudagraph_skips} time(s) "
                              "(TORCH_LOGS=perf_hints says why)")  # fmt: skip

    # --- the compiled step ---------------------------------------------------------------------------

    def compiled_decoder(self, row: Row) -> BatchDecoder | None:
        """The compiled decoder (built once), or None with the reason in the row's note."""
        reason = compiled_unavailable()
        if reason is None and not self.options.compiled:
            reason = "skipped: compiled rows run on CUDA (--compiled compiles on the CPU too)"
        if reason is not None:
            row.note = reason
            self.report["checks"].setdefault("compiled vs eager", {"ok": None, "note": reason})
            return None
        if self.compiled is None:
            self.compiled = BatchDecoder(self.model, compile_mode="on")
            self.compile_skips: dict[int, int] = {}
        return self.compiled

    def compile_bucket(self, decoder: BatchDecoder, row: Row, bucket: int) -> bool:
        """Compile (and on CUDA record) the step for the bucket, if the budget holds a compile as long
        as the longest so far; False (the row skipped, with a note) if not."""
        reserve = COMPILE_RESERVE_S if self.options.device == "cuda" else 0
        if not self.fits(row, max([reserve, *self.report["compile_s"].values()])):
            return False
        graphs, skips = _compile_counters()
        started = time.perf_counter()
        decoder.warm_up([bucket], DIFFUSION_STEPS)
        row.compile_s = self.report["compile_s"][str(bucket)] = time.perf_counter() - started
        self.compile_skips[bucket] = _compile_counters()[1] - skips
        self.report.setdefault("compile_graphs", {})[str(bucket)] = _compile_counters()[0] - graphs
        if not decoder.compiled:  # compilation failed: the static step runs as is, and every row says so
            row.note = "compilation failed: this row ran uncompiled (see the log)"
            self.report["notes"].append(f"compiling bucket {bucket} failed: the compiled rows ran uncompiled")
        return True

    def check_compiled(self, decoder: BatchDecoder, batch: int) -> None:
        """The compiled step against the eager loop on the same requests, at the first compiled batch."""
        checked = requests(self.model.config, CHECK_PROMPT_LENGTHS, batch, CHECK_FRAMES)
        frames = decoder.frame_step.compiled_frames
        seen = compiled_vs_eager(decoder, self.eager, checked, self.options)
        if decoder.compiled and decoder.frame_step.compiled_frames == frames:
            self.report["notes"].append("the compiled check ran uncompiled: its shape is not one the warm-up compiled")
        record_agreement("compiled vs eager", seen, self.options, self.report["checks"])
        self.fitness_check(decoder)
        self.save()

    def fitness_check(self, decoder: BatchDecoder) -> None:
        """The worker's own start-up comparison (engine/fitness.py: the compiled step against the eager
        loop on forced speech frames) on this GPU, with its measured difference and tolerance; one that
        disagrees fails the run, as COMPILE=on fails the worker."""
        from engine import fitness

        agreement = fitness.compare_compiled(decoder, prompt_ids(self.model.config, CHECK_PROMPT_LENGTHS[1], seed=7))
        self.report["checks"]["start-up fitness check"] = {
            "ok": agreement.ok, "note": agreement.describe(), "difference": agreement.difference,
            "latents": agreement.latents, "states": agreement.states, "tolerance": agreement.tolerance,
        }  # fmt: skip
        if not agreement.ok:
            self.report["failures"].append(f"{self.name} start-up fitness check: {agreement.describe()}")

    def eight_bit_rows(self) -> None:
        """WEIGHTS=int8, then fp8 where the GPU has float8, after the bf16 rows: RTF at WEIGHT_BATCHES,
        peak memory, compile and graph counters, and the audio against bf16's on the same requests and
        noise (bench/gpu_weights.py). Quantizing is in place, so a second mode builds the model again;
        each mode runs only while the model's part of the budget holds it."""
        from bench.gpu_weights import weights_rows
        from engine import weights

        results = self.report.setdefault("weights", {})
        modes = [mode for mode in self.options.weights if weights.resolve(mode, self.model.device)[0] == mode]
        check = requests(self.model.config, CHECK_PROMPT_LENGTHS, len(CHECK_PROMPT_LENGTHS), CHECK_FRAMES)
        reference = [r.audio for r in self.eager.decode(check)]
        timed = {n: requests(self.model.config, TIMED_PROMPT_LENGTHS, n, self.options.frames) for n in WEIGHT_BATCHES}
        compile_s = max([COMPILE_RESERVE_S if self.options.device == "cuda" else 0, *self.report["compile_s"].values()])
        for k, mode in enumerate(modes):
            needs = len(timed) * compile_s + 2 * (self.options.frames + 2) * self.step_estimate * (1 + max(timed) / 8)
            left = self.deadline - time.monotonic()
            if needs > left:
                results[mode] = {"note": f"skipped: {max(left, 0):.0f} s of this model's time budget left, "
                                 f"the rows need about {needs:.0f} s"}  # fmt: skip
                continue
            if k:  # the model holds the last mode's weights: build it again in bf16
                self.close()
                self.build()
            compiled = self.options.compiled and compiled_unavailable() is None
            results[mode] = weights_rows(self.model, mode, check, reference, timed, compiled=compiled)
            if results[mode]["cudagraph_skips"]:
                self.report["failures"].append(f"{self.name} WEIGHTS={mode}: inductor skipped CUDA graphs")
            self.save()

    def fail_row(self, row: Row, reason: str) -> None:
        row.note = f"FAILED: {reason}"
        self.report["failures"].append(f"{self.name} {row.loop} at batch {row.batch}: {reason}")

    # --- timing --------------------------------------------------------------------------------------

    def timed(self, row: Row, decoder: BatchDecoder, step_bytes: int) -> None:
        frames, n = self.options.frames, row.batch
        if not self.fits(row, 2 * (frames + 2) * self.step_estimate * (1 + n / 8)):  # a warm-up and the run
            return
        batch = requests(self.model.config, TIMED_PROMPT_LENGTHS, n, frames)
        decoder.decode([replace(r, max_frames=2) for r in batch])  # warm-up: this batch shape's kernels
        compiled_frames = decoder.frame_step.compiled_frames if decoder.frame_step is not None else 0
        self.fill(row, decode_checked(decoder, batch, self.options, f"{row.loop} at batch {n}"), step_bytes)
        if decoder.compiled and decoder.frame_step.compiled_frames == compiled_frames:
            row.note = "ran uncompiled: its shape is not one the warm-up compiled"

    def fill(self, row: Row, timing: Timing, step_bytes: int) -> None:
        audio = row.frames * self.frame_seconds
        row.wall_s, row.first_frame_s = timing.wall_s, timing.first_frame_s
        row.rtf, row.realtime_multiple = timing.wall_s / audio, row.batch * audio / timing.wall_s
        row.step_gb = step_bytes / 1e9
        if timing.step_s:
            row.step_ms = timing.step_s * 1e3
            if self.bandwidth:
                row.bandwidth_fraction = step_bytes / timing.step_s / self.bandwidth
        if timing.peak_bytes is not None:
            row.peak_gib = timing.peak_bytes / 2**30


def compiled_vs_eager(
    compiled: BatchDecoder, eager: BatchDecoder, batch: list[DecodeRequest], options: Options
) -> dict:
    """The compiled step against the eager loop on the same requests, over their first frames:
    {"max_error", "per_frame", "tolerance"} (the engine's own start-up comparison answers the same)."""
    want = decode_checked(eager, batch, options, "the eager reference")
    got = decode_checked(compiled, batch, options, "compiled")
    return {**agreement(got.audio, want.audio, compiled.hop_length), "tolerance": TOLERANCE[options.dtype]}


def compiled_frame_bytes(decoder: BatchDecoder, bucket: int) -> int:
    """Bytes one compiled frame moves at this bucket (bench/step_counters.py: every operator of the
    frame, run once as is on the model's own device, its buffers of its own)."""
    step = FrameStep(decoder, compile_frame=False)
    return frame_bytes(step, bucket, capacity_for(1, decoder.device), DIFFUSION_STEPS)


def _compile_counters() -> tuple[int, int]:
    """(graphs dynamo has captured, CUDA graphs inductor skipped) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


# --- the run ----------------------------------------------------------------------------------------


def environment(options: Options) -> dict:
    import diffusers
    import transformers

    cuda = options.device == "cuda"
    gpu = torch.cuda.get_device_name(0) if cuda else None
    bandwidth = bandwidth_of(gpu) if gpu else None
    note = None
    if bandwidth is None:
        note = f"unknown bandwidth for {gpu!r}: add it to KNOWN_BANDWIDTH" if cuda else "no GPU: not measured"
    return {
        "gpu": gpu,
        "device": options.device,
        "bandwidth_tb_s": bandwidth / 1e12 if bandwidth else None,
        "bandwidth_note": note,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "dtype": str(options.dtype).removeprefix("torch."),
        "frames": options.frames,
        "diffusion_steps": DIFFUSION_STEPS,
        "cfg_scale": CFG_SCALE,
        "budget_s": options.budget_s,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def deadlines(options: Options, started: float) -> dict[str, float]:
    """Each model's budget ends at its cumulative share: time a model leaves unused passes on."""
    shares = {name: MODEL_SHARE.get(name, 1.0) for name in options.models}
    total, end, result = sum(shares.values()), started, {}
    for name, share in shares.items():
        end += options.budget_s * share / total
        result[name] = end
    return result


def run(options: Options) -> dict:
    started = time.monotonic()
    result = environment(options)
    result.update(ok=True, failure=None, models=[])
    ends = deadlines(options, started)
    bandwidth = result["bandwidth_tb_s"] and result["bandwidth_tb_s"] * 1e12

    def save() -> None:  # after each check and row: a run stopped from outside still leaves its report
        result["elapsed_s"] = time.monotonic() - started
        save_files(result, options.out)

    try:
        for name in options.models:
            print(f"gpu-bench: {name} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
            report: dict = {}
            result["models"].append(report)
            bench = ModelBench(name, options, ends[name], bandwidth, report, save)
            try:
                bench.run()
            finally:
                bench.close()
    except CheckFailed as exc:
        result.update(ok=False, failure=str(exc))
    except Exception as exc:  # a crash on the device: what was measured before it is still reported
        traceback.print_exc()
        result.update(ok=False, failure=f"{type(exc).__name__}: {exc}")
    failed_rows = [failure for report in result["models"] for failure in report.get("failures", [])]
    if failed_rows and result["ok"]:  # every row was measured, but some did not run as they must
        result.update(ok=False, failure="; ".join(failed_rows))
    save()
    return result


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(result: dict) -> str:
    device = result["gpu"] or "CPU (no CUDA)"
    bandwidth = f"{result['bandwidth_tb_s']} TB/s" if result["bandwidth_tb_s"] else result["bandwidth_note"]
    lines = [
        "# GPU benchmark: VibeVoice at full size with random weights",
        "",
        f"{device} ({bandwidth}); torch {result['torch']}, CUDA {result['cuda']}, transformers "
        f"{result['transformers']}, diffusers {result['diffusers']}, Python {result['python']}; {result['dtype']}, "
        f"{result['diffusion_steps']} diffusion steps, guidance {result['cfg_scale']}, {result['frames']} frames "
        f"per timed sequence; {result['date']}, {result['elapsed_s']:.0f} s in all "
        f"(budget {result['budget_s']:.0f} s).",
        "Written by `make gpu-bench` (bench/gpu_bench.py); the columns are explained in docs/testing.md.",
        "",
        f"**{'All checks passed' if result['ok'] else 'FAILED: ' + result['failure']}.**",
    ]
    for report in result["models"]:
        lines += ["", *_model_markdown(report)]
    return "\n".join(lines) + "\n"


def _model_markdown(report: dict) -> list[str]:
    lines = [f"## {report['model']}", ""]
    if "parameters" in report:
        count = report["parameters"]
        count = f"{count / 1e9:.3g} B" if count >= 1e9 else f"{count / 1e6:.3g} M"
        lines.append(f"{count} parameters, {report['weight_gb']:.3g} GB of weights, built "
                     f"in {report['build_s']:.0f} s; attention {report['attention']}.")  # fmt: skip
    for name, check in report.get("checks", {}).items():
        seen = check.get("note", "")
        if "max_error" in check:
            seen = f"max error {_number(check['max_error'])} of the peak (per frame {check['per_frame']}), " \
                   f"tolerance {check['tolerance']}"  # fmt: skip
        verdict = {True: "ok", False: "FAILED", None: "not run"}[check["ok"]]
        lines.append(f"- check {name}: {verdict}{'; ' + seen if seen else ''}")
    if "weight_bytes_per_step" in report:
        reads = report["weight_bytes_per_step"]
        lines.append(f"- weight reads per frame step: own loop {reads['own'] / 1e9:.3g} GB, "
                     f"stock generate {reads['stock'] / 1e9:.3g} GB")  # fmt: skip
    if report.get("peak_gib") is not None:
        lines.append(f"- peak GPU memory: {report['peak_gib']:.3g} GiB")
    if report.get("compile_s"):
        each = ", ".join(f"bucket {bucket} {seconds:.0f} s" for bucket, seconds in report["compile_s"].items())
        lines.append(f"- compiling the step (the warm-up of each bucket): {each}")
    lines += [f"- {note}" for note in report.get("notes", [])]
    header = ("| loop | batch | RTF | x real time | first frame (s) | step (ms) | GB per step | bandwidth used "
              "| compile (s) | recompiles | CUDA graphs skipped | peak (GiB) | note |")  # fmt: skip
    lines += ["", header, "|---" * header.count(" | ") + "|---|"]
    for row in report.get("rows", []):
        share = f"{row['bandwidth_fraction']:.1%}" if row["bandwidth_fraction"] is not None else "—"
        cells = [row["loop"], row["batch"], *(_number(row[key]) for key in ("rtf", "realtime_multiple",
                 "first_frame_s", "step_ms", "step_gb")), share, *(_number(row[key]) for key in ("compile_s",
                 "recompiles", "cudagraph_skips", "peak_gib")), row["note"]]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines + _weights_markdown(report.get("weights", {}))


def _weights_markdown(results: dict) -> list[str]:
    """The 8-bit rows: per mode, what the start-up check said, then a row per batch."""
    if not results:
        return []
    lines = ["", "| weights | batch | RTF | x real time | step (ms) | peak (GiB) | vs bf16 (max, per frame) | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, result in results.items():
        if "rows" not in result:
            lines.append(f"| {mode} | | | | | | | {result.get('note', '')} |")
            continue
        note = f"{result['start_up_check']}; compile {result['compile_s']:.0f} s, graph breaks " \
               f"{result['graph_breaks']}, CUDA graphs skipped {result['cudagraph_skips']}"  # fmt: skip
        vs = f"{_number(result['vs_bf16']['max'])} ({result['vs_bf16']['per_frame']})"
        for row in result["rows"]:
            cells = [result["weights"], row["batch"], *(_number(row[key]) for key in ("rtf", "realtime_multiple",
                     "step_ms", "peak_gib")), vs, note]  # fmt: skip
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
            note = ""
    return lines


def as_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=lambda value: asdict(value) if isinstance(value, Row) else str(value))


def save_files(result: dict, out: Path | None) -> None:
    """gpu_results.json and .md in the folder `out` (nothing when None)."""
    if out is not None:
        text = as_json(result)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{RESULTS.name}.json").write_text(text + "\n")
        (out / f"{RESULTS.name}.md").write_text(markdown(json.loads(text)))


def parse_options(argv: list[str] | None) -> Options:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated from 7b, 1.5b, tiny (default: 7b,1.5b on CUDA, else tiny)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--frames", type=int, help="frames per timed sequence, at least 3 (default: 48 on CUDA, 6 on the CPU)"
    )
    parser.add_argument(
        "--budget", type=float, help=f"seconds for the whole run (default: {GPU_BUDGET_S} on CUDA, 300 on the CPU)"
    )
    parser.add_argument(
        "--compiled", action=argparse.BooleanOptionalAction, help="measure the compiled step (default: on CUDA only)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the folder to write gpu_results.md and .json in (default: bench/ on CUDA, nothing on the CPU)",
    )
    parser.add_argument(
        "--rows",
        help="the rows to run, in order, as LOOP:BATCH (LOOP one of "
        f"{', '.join(LOOPS)}; default: {','.join(f'{loop}:{batch}' for loop, batch in ROWS)})",
    )
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on the CPU"
    )
    parser.add_argument(
        "--weights",
        default=",".join(WEIGHT_MODES),
        help="8-bit WEIGHTS modes measured after each model's bf16 rows, comma-separated, or none "
        "(default: int8,fp8; fp8 only where the GPU has float8)",
    )
    parser.add_argument("--inject", choices=["nan", "mismatch"], help=argparse.SUPPRESS)  # the tests' faults
    args = parser.parse_args(argv)  # fmt: skip
    on_cuda = args.device == "cuda"
    if on_cuda and not cuda:
        parser.error("--device cuda: no CUDA device is available")
    models = tuple(args.models.split(",")) if args.models else (("7b", "1.5b") if on_cuda else ("tiny",))
    unknown = [name for name in models if name not in MODEL_CONFIGS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODEL_CONFIGS)}")
    frames = args.frames if args.frames is not None else (48 if on_cuda else 6)
    if frames < 3:
        parser.error("--frames must be at least 3")
    rows = parse_rows(args.rows) if args.rows else ROWS
    if rows is None:
        parser.error(f"--rows: give LOOP:BATCH pairs, LOOP one of {', '.join(LOOPS)} and BATCH from 1 to 64")
    weights = () if args.weights == "none" else tuple(args.weights.split(","))
    if any(mode not in WEIGHT_MODES for mode in weights):
        parser.error(f"--weights: choose from {', '.join(WEIGHT_MODES)}, or none")
    return Options(
        models=models,
        device=args.device,
        dtype=getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32")),
        frames=frames,
        budget_s=args.budget if args.budget is not None else (GPU_BUDGET_S if on_cuda else 300),
        compiled=args.compiled if args.compiled is not None else on_cuda,
        out=args.out if args.out is not None else (RESULTS.parent if on_cuda else None),
        rows=rows,
        weights=weights,
        inject=args.inject,
    )


def parse_rows(text: str) -> tuple[tuple[str, int], ...] | None:
    """ "eager:1,compiled:16" -> (("eager", 1), ("compiled", 16)); None if any pair is not one."""
    rows = []
    for pair in text.split(","):
        loop, _, batch = pair.strip().partition(":")
        if loop not in LOOPS or not batch.isdigit() or not 1 <= int(batch) <= 64:
            return None
        rows.append((loop, int(batch)))
    return tuple(rows)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    result = run(options)
    print(markdown(json.loads(as_json(result))))
    if options.out is not None:
        print(f"gpu-bench: wrote {RESULTS.name}.md and .json in {options.out}", file=sys.stderr)
    if not result["ok"]:
        print(f"gpu-bench FAILED: {result['failure']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
