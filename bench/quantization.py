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

import copy
import gc
import sys
import time
from dataclasses import dataclass, field
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
    """One model's figures: int8 against the unquantized model, per layer and per frame."""

    model: str
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"int8", "bf16", "fp8"}
    hidden: list[float] = field(default_factory=list)  # per frame: the language model's output, worst row
    latents: list[float] = field(default_factory=list)  # per frame: the latents, worst row
    prompt_effect: list[float] = field(default_factory=list)  # per frame: how far the other prompt moves them
    resident_bytes: dict[str, int] = field(default_factory=dict)  # "loaded", "int8"
    start_up_check: float = 0.0  # the largest layer error on engine/weights.py's probe
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """Largest and median layer error per kind, and the largest per-frame errors."""
        by_kind: dict[str, list[float]] = {}
        for errors in self.layers.values():
            for kind, value in errors.items():
                by_kind.setdefault(kind, []).append(value)
        figures = {}
        for kind, values in sorted(by_kind.items()):
            figures[f"layer_{kind}_max"] = max(values)
            figures[f"layer_{kind}_median"] = sorted(values)[len(values) // 2]
        figures["hidden_max"] = max(self.hidden)
        figures["latent_max"] = max(self.latents)
        relative = [error / effect for error, effect in zip(self.latents, self.prompt_effect, strict=True)]
        figures["latent_over_prompt_effect_max"] = max(relative)
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


def rounded_errors(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The layer's error with bf16 weights and input, and with fp8 weights (a copy; the layer is unchanged)."""
    bias = layer.bias.bfloat16() if layer.bias is not None else None
    bf16 = torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), bias)
    fp8 = copy.deepcopy(layer)
    weights.quantize_layer(fp8, weights.torchao_config("fp8"))
    return {"bf16": weights.relative_error(bf16, y), "fp8": weights.relative_error(fp8(x), y)}


def measure(name: str, frames: int = FRAMES) -> ModelErrors:
    """Build `name`, decode it unquantized, quantize it in place to int8, decode again; compare."""
    started = time.perf_counter()
    model = build(name)
    result = ModelErrors(name, resident_bytes={"loaded": weights.resident_bytes(model)})
    reference = decode(model, frames, layers=True)
    layers = dict(weights.quantized_layers(model))
    with torch.no_grad():
        for layer_name, (x, y) in reference.layer_io.items():
            result.layers[layer_name] = rounded_errors(layers[layer_name], x, y)
    report = weights.apply(model, "int8")
    if report.used != "int8" or report.kept:
        raise RuntimeError(f"int8 did not apply to every layer: {report.describe()}")
    result.resident_bytes["int8"] = report.resident_bytes
    result.start_up_check = report.largest_error
    with torch.no_grad():
        for layer_name, (x, y) in reference.layer_io.items():
            result.layers[layer_name]["int8"] = weights.relative_error(layers[layer_name](x), y)
    quantized = decode(model, frames, layers=False)
    for want, got in zip(reference.hidden, quantized.hidden, strict=True):
        result.hidden.append(max(weights.relative_error(got[r], want[r]) for r in range(want.shape[0])))
    for want, got in zip(reference.latents, quantized.latents, strict=True):
        result.latents.append(max(weights.relative_error(got[r], want[r]) for r in range(want.shape[0])))
        result.prompt_effect.append(weights.relative_error(want[1], want[0]))
    del model, reference, layers
    gc.collect()
    result.seconds = time.perf_counter() - started
    return result
