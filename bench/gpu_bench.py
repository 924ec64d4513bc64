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
  compiled    the compiled frame step agrees with the eager one (where this build has one).
Then it measures: the real-time factor at batch 1 of stock `generate`, the own loop eager and the
own loop compiled; the aggregate real-time multiple at 4, 8 and 16 concurrent sequences; the time
to the first frame; the peak GPU memory; and the share of the GPU's memory bandwidth used (weight
bytes one frame step reads / its time / the GPU's bandwidth). A time budget (GPU_BUDGET_S: the run
stays under 8 minutes on one H100 or H200) skips the rows that no longer fit, with a note.

Without CUDA the same code runs the tiny configuration on the CPU in float32 in seconds (a test does).

    python -m bench.gpu_bench                     # CUDA: writes bench/gpu_results.md and .json
    python -m bench.gpu_bench --out /tmp/r        # writes /tmp/r.md and /tmp/r.json
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

from bench.weights import CallCounter, module_bytes, real_1_5b_config, real_7b_config  # noqa: E402
from engine.batch import DecodeRequest, NonFiniteStateError  # noqa: E402
from engine.decoder import BatchDecoder  # noqa: E402
from tools.tiny_checkpoint import build_config, build_generation_config, build_tokenizer, randomize_weights  # noqa: E402

RESULTS = ROOT / "bench" / "gpu_results"  # .md and .json, written only by a run on CUDA
SAMPLE_RATE = 24000  # the codec's rate: 3200 samples (one frame) are 133 ms
CONCURRENCY = (4, 8, 16)
DIFFUSION_STEPS = 10
CFG_SCALE = 1.3
CHECK_FRAMES = 3  # frames compared between loops: bf16 differences grow as frames feed back
CHECK_PROMPT_LENGTHS = (12, 57, 140, 301)  # a left-padded batch
TIMED_PROMPT_LENGTHS = (96, 120, 144, 168)  # a chunk of text without a voice prompt is ~100 tokens
# Agreement: the largest sample difference / the reference's peak. float32 on the CPU is the tests'
# standard; bf16 kernels differ between batch shapes, while a real fault (other noise, a wrong mask)
# gives unrelated audio, an error near 1 or more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}
GPU_BUDGET_S = 420  # model builds included; with imports and the wheels' install, under 8 minutes
MODEL_SHARE = {"7b": 0.6, "1.5b": 0.4}  # of the budget, in order: a slow 7B leaves the 1.5B its part
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
    out: Path | None  # PREFIX of PREFIX.md / PREFIX.json; None: print only
    inject: str | None = None  # "nan" | "mismatch": make a check fail (the tests prove it fails loudly)


@dataclass
class Row:
    """One timed configuration of one model."""

    loop: str  # "stock generate" | "own loop, eager" | "own loop, compiled"
    batch: int
    frames: int = 0
    wall_s: float | None = None
    rtf: float | None = None  # wall time / one sequence's audio
    realtime_multiple: float | None = None  # all sequences' audio / wall time
    first_frame_s: float | None = None  # from the call to the first frame's samples on the host
    step_ms: float | None = None  # one frame step of the whole batch, steady state
    bandwidth_fraction: float | None = None  # weight bytes per step / step time / GPU bandwidth
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
    tolerance = TOLERANCE[options.dtype]
    seen = agreement(got, want, hop)
    checks[name] = {"tolerance": tolerance, **seen, "frames": CHECK_FRAMES, "ok": seen["max_error"] <= tolerance}
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
    """One model's checks and timed rows, inside its part of the time budget; fills `report`."""

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
        report.update(model=name, checks={}, rows=self.rows, notes=[])

    def run(self) -> None:
        options = self.options
        _reset_peak(options.device)
        started = time.perf_counter()
        self.model = build_model(self.name, options)
        self.report["build_s"] = time.perf_counter() - started
        self.report["parameters"] = sum(p.numel() for p in self.model.parameters())
        self.report["weight_gb"] = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1e9
        self.report["attention"] = self.model.config.text_config._attn_implementation
        self.frame_seconds = self.model.config.audio_config.hop_length / SAMPLE_RATE
        self.eager = BatchDecoder(self.model)
        checks = self.report["checks"]
        self.eager_check = check_finite(self.eager, self.model, options, checks)
        self.step_estimate = self.eager_check.step_s or self.eager_check.wall_s / CHECK_FRAMES
        check_stock(self.eager, self.model, options, checks)
        self.count_weight_reads()
        self.save()
        self.timed("own loop, eager", self.eager, 1)
        self.stock_row()
        for n in CONCURRENCY:
            self.timed("own loop, eager", self.eager, n)
        self.compiled_rows()
        peaks = [row.peak_gib for row in self.rows if row.peak_gib is not None]
        self.report["peak_gib"] = max(peaks) if peaks else None  # the largest batch's row, weights included

    def close(self) -> None:
        self.__dict__.pop("model", None)
        self.__dict__.pop("eager", None)
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

    def timed(self, loop: str, decoder: BatchDecoder, n: int, note: str = "") -> None:
        frames = self.options.frames
        row = Row(loop, n, frames, note=note)
        self.rows.append(row)
        if not self.fits(row, 2 * (frames + 2) * self.step_estimate * (1 + n / 8)):  # a warm-up and the run
            return
        batch = requests(self.model.config, TIMED_PROMPT_LENGTHS, n, frames)
        decoder.decode([replace(r, max_frames=2) for r in batch])  # warm-up: this batch shape's kernels
        compiled_frames = decoder.frame_step.compiled_frames if decoder.frame_step is not None else 0
        self.fill(row, decode_checked(decoder, batch, self.options, f"{loop} at batch {n}"), self.step_bytes["own"])
        if decoder.compiled and decoder.frame_step.compiled_frames == compiled_frames:
            row.note = "ran uncompiled: its shape is not one the warm-up compiled"
        if loop == "own loop, eager" and n == 1 and row.step_ms:
            self.step_estimate = row.step_ms / 1e3
        self.save()

    def stock_row(self) -> None:
        frames = self.options.frames
        row = Row("stock generate", 1, frames)
        self.rows.append(row)
        if not self.fits(row, 3 * (frames + 2) * self.step_estimate * 2):
            return
        [request] = requests(self.model.config, TIMED_PROMPT_LENGTHS, 1, frames)
        run_stock(self.model, replace(request, max_frames=2), self.options.device)  # warm-up
        self.fill(row, run_stock(self.model, request, self.options.device), self.step_bytes["stock"])
        self.save()

    def fill(self, row: Row, timing: Timing, step_bytes: int) -> None:
        audio = row.frames * self.frame_seconds
        row.wall_s, row.first_frame_s = timing.wall_s, timing.first_frame_s
        row.rtf, row.realtime_multiple = timing.wall_s / audio, row.batch * audio / timing.wall_s
        if timing.step_s:
            row.step_ms = timing.step_s * 1e3
            if self.bandwidth:
                row.bandwidth_fraction = step_bytes / timing.step_s / self.bandwidth
        if timing.peak_bytes is not None:
            row.peak_gib = timing.peak_bytes / 2**30

    def compiled_rows(self) -> None:
        reason = compiled_unavailable()
        if reason is None and not self.options.compiled:
            reason = "skipped: compiled rows run on CUDA (--compiled compiles on the CPU too)"
        decoder = BatchDecoder(self.model, compile_mode="on") if reason is None else None
        warmed = self.compile(decoder) if decoder is not None else []
        if decoder is not None and not warmed:
            reason = f"skipped: less than {self._compile_reserve():.0f} s of this model's time budget left to compile"
        if reason is not None:
            self.report["checks"]["compiled vs eager"] = {"ok": None, "note": reason}
            self.rows += [Row("own loop, compiled", n, note=reason) for n in (1, *CONCURRENCY)]
            return
        note = "" if decoder.compiled else "compilation failed: this row ran eager (see the log)"
        if note:
            self.report["notes"].append(note)
        batch = requests(self.model.config, CHECK_PROMPT_LENGTHS, len(CHECK_PROMPT_LENGTHS), CHECK_FRAMES)
        frames = decoder.frame_step.compiled_frames
        timing = decode_checked(decoder, batch, self.options, "compiled")
        if decoder.compiled and decoder.frame_step.compiled_frames == frames:  # a shape the warm-up did not compile
            self.report["notes"].append("the compiled check ran uncompiled: its shape is not one the warm-up compiled")
        check_agrees("compiled vs eager", timing.audio, self.eager_check.audio, self.options,
                     self.model.config.audio_config.hop_length, self.report["checks"])  # fmt: skip
        self.save()
        for n in (1, *CONCURRENCY):
            if n in warmed:
                self.timed("own loop, compiled", decoder, n, note)
            else:
                self.rows.append(Row("own loop, compiled", n, note="skipped: not compiled within the time budget"))

    def _compile_reserve(self) -> float:
        return COMPILE_RESERVE_S if self.options.device == "cuda" else 0

    def compile(self, decoder: BatchDecoder) -> list[int]:
        """Compile the step batch size by batch size (the check's first) while the budget holds one
        more compile as long as the longest so far; returns the batch sizes compiled."""
        check = len(CHECK_PROMPT_LENGTHS)
        sizes = [check, *sorted({1, *CONCURRENCY} - {check})]
        self.report["compile_s"], longest, warmed = 0.0, self._compile_reserve(), []
        for n in sizes:
            if self.deadline - time.monotonic() < longest:
                break
            started = time.perf_counter()
            decoder.warm_up([n])
            spent = time.perf_counter() - started
            self.report["compile_s"] += spent
            longest = max(longest, spent)
            if not decoder.compiled:  # compilation failed: every row runs eager, and says so
                return sizes
            warmed.append(n)
        return warmed


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
    if report.get("compile_s") is not None:
        lines.append(f"- compiling the step (warm-up of each batch size): {report['compile_s']:.0f} s")
    lines += [f"- {note}" for note in report.get("notes", [])]
    header = "| loop | batch | RTF | x real time | first frame (s) | step (ms) | bandwidth used | peak (GiB) | note |"
    lines += ["", header, "|---|---|---|---|---|---|---|---|---|"]
    for row in report.get("rows", []):
        share = f"{row['bandwidth_fraction']:.1%}" if row["bandwidth_fraction"] is not None else "—"
        cells = [row["loop"], row["batch"], *(_number(row[key]) for key in ("rtf", "realtime_multiple",
                 "first_frame_s", "step_ms")), share, _number(row["peak_gib"]), row["note"]]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


def as_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=lambda value: asdict(value) if isinstance(value, Row) else str(value))


def save_files(result: dict, out: Path | None) -> None:
    if out is not None:
        text = as_json(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(text + "\n")
        out.with_suffix(".md").write_text(markdown(json.loads(text)))


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
        "--out", type=Path, help="write OUT.md and OUT.json (default: bench/gpu_results on CUDA, nothing on the CPU)"
    )
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on the CPU"
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
    return Options(
        models=models,
        device=args.device,
        dtype=getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32")),
        frames=frames,
        budget_s=args.budget if args.budget is not None else (GPU_BUDGET_S if on_cuda else 300),
        compiled=args.compiled if args.compiled is not None else on_cuda,
        out=args.out if args.out is not None else (RESULTS if on_cuda else None),
        inject=args.inject,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    result = run(options)
    print(markdown(json.loads(as_json(result))))
    if options.out is not None:
        print(
            f"gpu-bench: wrote {options.out.with_suffix('.md')} and {options.out.with_suffix('.json')}", file=sys.stderr
        )
    if not result["ok"]:
        print(f"gpu-bench FAILED: {result['failure']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
