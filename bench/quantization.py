"""The error of 8-bit weights (WEIGHTS=int8, engine/weights.py) against the loaded weights, on the CPU in float32.

For the real VibeVoice-1.5B configuration at full size with random weights (bench/weights.py has it) and
for the tiny test checkpoint's configuration:

  layers   each quantized linear layer's output error on the activations it really sees: its input in
           the first frame's language-model pass of the unquantized model, put through the layer before
           and after quantization (relative RMS error, ||after - before|| / ||before||). For scale, the
           same layer with its weights and input rounded to bf16 (what every layer does on a GPU) and
           with fp8 weights (torchao's float8 path runs on the CPU too, though the worker offers fp8
           only on GPUs that have float8 kernels).
  latents  the speech latents of the first frames (the diffusion head's output, which the acoustic
           decoder turns into audio) of a batch of prompts, the quantized model against the unquantized
           one: same prompts, same seeds, every step a speech frame. Relative RMS error per frame.

Random weights are not the real checkpoint: real weights have rows with outliers, which give int8
a coarser step there; the speech quality of int8 on the real weights is not measured here.

    python -m bench.quantization                          # tiny and 1.5B; writes bench/quantization.md and .json
    python -m bench.quantization --models tiny --frames 3  # prints only

The 1.5B in float32 takes about 11 GB (its quantized copy is made layer by layer, in place); one model
is built at a time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import weights  # noqa: E402
from engine.batch import DecodeRequest  # noqa: E402
from engine.decoder import BatchDecoder  # noqa: E402

RESULTS = ROOT / "bench" / "quantization"  # .md and .json
PROMPT_LENGTHS = (48, 97)  # a batch of two prompts of different lengths (left padding in the eager loop)
FRAMES = 4
DIFFUSION_STEPS = 10
CFG_SCALE = 1.3
SEED = 7


@dataclass
class ModelErrors:
    """One model's figures, per layer and per frame, against the model as drawn (float32)."""

    model: str
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"int8", "bf16", "fp8"}
    # Per frame, the worst row: "<signal> <run>", signal "hidden" (the language model's output) or
    # "latents"; run "int8", or "bf16 weights" (the same layers' weights rounded to bf16: the yardstick),
    # or "prompt" for the latents (the other prompt's latents against this one's, same noise).
    frames: dict[str, list[float]] = field(default_factory=dict)
    resident_bytes: dict[str, int] = field(default_factory=dict)  # "loaded", "int8"
    start_up_check: float = 0.0  # the largest layer error on engine/weights.py's probe
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """Median and largest layer error per kind; first-frame and largest errors per signal and run."""
        by_kind: dict[str, list[float]] = {}
        for errors in self.layers.values():
            for kind, value in errors.items():
                by_kind.setdefault(kind, []).append(value)
        figures = {}
        for kind, values in sorted(by_kind.items()):
            figures[f"layer {kind} median"] = sorted(values)[len(values) // 2]
            figures[f"layer {kind} max"] = max(values)
        for name, values in self.frames.items():
            figures[f"{name} first frame"] = values[0]
            figures[f"{name} max"] = max(values)
        return figures


# --- the models -----------------------------------------------------------------------------------


def build(name: str):
    """The model in float32 on the CPU with random weights (the tiny checkpoint's rules), allowed only to speak."""
    from transformers import VibeVoiceForConditionalGeneration

    from bench.weights import real_1_5b_config
    from tools.tiny_checkpoint import build_config, build_generation_config, build_tokenizer, randomize_weights

    config = real_1_5b_config() if name == "1.5b" else build_config(build_tokenizer())
    torch.manual_seed(0)
    model = VibeVoiceForConditionalGeneration(config)
    randomize_weights(model, seed=0)
    model.generation_config = build_generation_config(config)  # suppresses every token but "next frame"
    return model.eval()


def requests(config, frames: int) -> list[DecodeRequest]:
    """Random ordinary tokens ending in speech-start, as a chunk's prompt ends; one seed for all, so
    their latents differ by what the prompt changes (the scale int8's error is read against)."""
    first_special = min(config.pad_token_id, config.eos_token_id, config.audio_bos_token_id, config.audio_token_id)
    made = []
    for i, length in enumerate(PROMPT_LENGTHS):
        ids = torch.randint(0, first_special, (length - 1,), generator=torch.Generator().manual_seed(100 + i))
        ids = torch.cat([ids, torch.tensor([config.audio_bos_token_id])])
        made.append(DecodeRequest(index=i, input_ids=ids, max_frames=frames, seed=SEED, cfg_scale=CFG_SCALE,
                                  diffusion_steps=DIFFUSION_STEPS))  # fmt: skip
    return made


# --- recording ------------------------------------------------------------------------------------


class Recorder:
    """Forward hooks, per frame: the language model's output rows in the frame's pass (the diffusion
    head's conditions) and the latents (the acoustic connector's input); with `layers`, each
    quantizable layer's input and output in the first frame's pass. A frame's pass is a call with one
    row per guidance branch and sequence, one position each."""

    def __init__(self, model, rows: int, layers: bool):
        self.rows = rows
        self.layer_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hidden: list[torch.Tensor] = []  # per frame [2 * rows, hidden]
        self.latents: list[torch.Tensor] = []  # per frame [rows, latent]
        language_model = model.model.language_model
        self._handles = [
            model.model.multi_modal_projector.register_forward_pre_hook(self._latent),
            language_model.norm.register_forward_hook(self._hidden),
        ]
        for name, layer in weights.quantized_layers(model) if layers else ():
            self._handles.append(layer.register_forward_hook(self._layer(name)))

    def _in_frame(self, x: torch.Tensor) -> bool:
        return x.shape[0] == 2 * self.rows and x.shape[1] == 1

    def _layer(self, name: str):
        def hook(module, args, output) -> None:
            if name not in self.layer_io and self._in_frame(args[0]):  # [2 * rows, 1, in_features]
                self.layer_io[name] = (args[0].detach().clone(), output.detach().clone())

        return hook

    def _hidden(self, module, args, output) -> None:
        if self._in_frame(output):
            self.hidden.append(output.detach()[:, 0].clone())

    def _latent(self, module, args) -> None:
        self.latents.append(args[0].detach()[:, 0].clone())  # [rows, 1, latent] -> [rows, latent]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def decode(model, frames: int, layers: bool) -> Recorder:
    """The eager loop over the prompts of `requests`, recorded."""
    batch = requests(model.config, frames)
    recorder = Recorder(model, len(batch), layers)
    try:
        with torch.inference_mode():
            BatchDecoder(model).decode(batch)
    finally:
        recorder.close()
    return recorder


# --- errors ---------------------------------------------------------------------------------------


def rounded_errors(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, scale: bool) -> dict[str, float]:
    """The layer's error with its weights rounded to bf16 (the yardstick); with `scale`, also with weights
    and input in bf16 (what a GPU computes) and with fp8 weights (a copy: the layer is unchanged)."""
    linear = torch.nn.functional.linear
    bias = layer.bias
    errors = {"bf16 weights": weights.relative_error(linear(x, layer.weight.bfloat16().float(), bias), y)}
    if scale:
        bf16 = linear(x.bfloat16(), layer.weight.bfloat16(), bias.bfloat16() if bias is not None else None)
        fp8 = copy.deepcopy(layer)
        weights.quantize_layer(fp8, weights.torchao_config("fp8"))
        errors |= {"bf16": weights.relative_error(bf16, y), "fp8": weights.relative_error(fp8(x), y)}
    return errors


def measure(name: str, frames: int = FRAMES, scale: bool = True) -> ModelErrors:
    """Build `name` and decode it as drawn; round the quantizable layers' weights to bf16 (what the real
    checkpoint holds) and decode; quantize them to int8 in place and decode; compare each with the first.
    `scale`: also each layer in bf16 arithmetic and in fp8 (the report's columns for scale)."""
    started = time.perf_counter()
    model = build(name)
    result = ModelErrors(name, resident_bytes={"loaded": weights.resident_bytes(model)})
    reference = decode(model, frames, layers=True)
    layers = dict(weights.quantized_layers(model))
    with torch.no_grad():
        for layer_name, (x, y) in reference.layer_io.items():
            result.layers[layer_name] = rounded_errors(layers[layer_name], x, y, scale)
        for layer in layers.values():
            layer.weight.copy_(layer.weight.bfloat16())  # bf16 values, still float32 tensors
    compare(result, "bf16 weights", reference, decode(model, frames, layers=False))
    report = weights.apply(model, "int8")  # from the bf16 values, as the worker quantizes the bf16 checkpoint
    if report.used != "int8" or report.kept:
        raise RuntimeError(f"int8 did not apply to every layer: {report.describe()}")
    result.resident_bytes["int8"] = report.resident_bytes
    result.start_up_check = report.largest_error
    with torch.no_grad():
        for layer_name, (x, y) in reference.layer_io.items():
            result.layers[layer_name]["int8"] = weights.relative_error(layers[layer_name](x), y)
    compare(result, "int8", reference, decode(model, frames, layers=False))
    result.frames["latents prompt"] = [weights.relative_error(want[1], want[0]) for want in reference.latents]
    del model, reference, layers
    gc.collect()
    result.seconds = time.perf_counter() - started
    return result


def compare(result: ModelErrors, run: str, reference: Recorder, other: Recorder) -> None:
    """Per frame, the worst row's relative error of `other` against `reference`, for both signals."""
    for signal in ("hidden", "latents"):
        wanted, got = getattr(reference, signal), getattr(other, signal)
        result.frames[f"{signal} {run}"] = [
            max(weights.relative_error(g[row], w[row]) for row in range(w.shape[0]))
            for w, g in zip(wanted, got, strict=True)
        ]


# --- the report -------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.3g} %"


AMPLIFICATION = (
    "Reading it: int8's per-layer error is 4-5x the yardstick's (bf16 rounding of the same weights), and",
    "the whole model's first frame moves by 3-7x the yardstick's: in proportion (0.8-1.4x the per-layer",
    "ratio), so int8 acts as a weight rounding of its measured size, nothing more. How far a model carries",
    "such a rounding to its output is the model's own: the tiny model damps it (its output moves by a fifth",
    "of a layer's error); the random 1.5B amplifies it about 24-fold by the first frame's output, and the frames",
    "after feed it back, so after 3-4 frames even bf16-rounded weights give unrelated latents (random deep",
    "networks are chaotic). Trained models are usually far less sensitive to weight rounding; that, and the",
    "speech quality of int8 on the real weights, is not measured here.",
)


def markdown(results: list[ModelErrors]) -> str:
    lines = [
        "# 8-bit weights: int8's error against the loaded weights",
        "",
        "Made by `python -m bench.quantization` (bench/quantization.py says how). CPU, float32, random weights:",
        "the speech quality of int8 on the real checkpoint is not measured here. Errors are relative RMS",
        "(||quantized - as drawn|| / ||as drawn||), each beside the yardstick of the same layers' weights rounded",
        "to bf16, the precision the real checkpoint is stored in.",
        "",
        "## Each quantized layer, on the input it gets in the first frame",
        "",
        "| model | layers | int8, median / max | bf16 weights (yardstick) | bf16 weights and input | fp8 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary()
        cells = [f"{_percent(s[f'layer {kind} median'])} / {_percent(s[f'layer {kind} max'])}"
                 for kind in ("int8", "bf16 weights", "bf16", "fp8")]  # fmt: skip
        lines.append(f"| {r.model} | {len(r.layers)} | {' | '.join(cells)} |")
    lines += [
        "",
        "## The first frames, the whole model",
        "",
        "Per frame, the worst of the batch's rows. The language model's output is the diffusion head's condition;",
        'the latents are what the acoustic decoder turns into audio. "other prompt" is how far the latents of',
        "the batch's other prompt lie from these (same noise): the scale of what the condition changes.",
        "",
        "| model | signal | int8 | bf16 weights (yardstick) | other prompt |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for signal in ("hidden", "latents"):
            runs = [", ".join(_percent(v) for v in r.frames.get(f"{signal} {run}", [])) or "-"
                    for run in ("int8", "bf16 weights", "prompt")]  # fmt: skip
            label = "language model output" if signal == "hidden" else "latents"
            lines.append(f"| {r.model} | {label} | {' | '.join(runs)} |")
    lines += ["", *AMPLIFICATION, ""]
    for r in results:
        lines.append(f"- {r.model}: {r.resident_bytes['loaded'] / 1e9:.3g} GB of weights as loaded (float32), "
                     f"{r.resident_bytes['int8'] / 1e9:.3g} GB with int8; the start-up check's largest layer error "
                     f"{_percent(r.start_up_check)}; measured in {r.seconds:.0f} s.")  # fmt: skip
    lines += [
        "",
        "What the 8-bit weights buy on each RunPod tier: the GPU table of docs/operations.md (bench/sizing.py).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,1.5b", help="comma-separated: tiny, 1.5b")
    parser.add_argument("--frames", type=int, default=FRAMES)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    results = []
    for name in names:  # one model at a time: the 1.5B in float32 is about 11 GB
        print(f"{name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, args.frames))
    text = markdown(results)
    print(text)
    if sorted(names) == ["1.5b", "tiny"] and args.frames == FRAMES:  # the full report only
        payload = {"models": [asdict(r) | {"summary": r.summary()} for r in results]}
        RESULTS.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        RESULTS.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
