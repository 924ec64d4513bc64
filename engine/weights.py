"""WEIGHTS: the language model's linear layers as loaded (bf16), or in 8 bits (int8, fp8), quantized at load time.

Decoding reads every weight once per frame, so a frame costs what its weights weigh in bytes (figure
a). The language model's linear layers are its largest part that every frame reads whole; weight-only
8-bit quantization (torchao's `Int8WeightOnlyConfig`, `Float8WeightOnlyConfig`) stores each of them in
one byte per weight with one scale per output row, and multiplies in the model's own dtype:

    bf16   the checkpoint as loaded (bf16 on a GPU; float32 on the CPU, where the model runs in float32)
    int8   symmetric int8 per output row, on any device. On the CPU the scales and the arithmetic are
           float32: the weights take a quarter of their float32 bytes, and the error seen there is
           the quantization's own, without bf16's rounding on top
    fp8    float8 e4m3 per output row; only on a CUDA GPU of compute capability 8.9 or newer (Ada,
           Hopper, Blackwell), whose kernels handle float8. Elsewhere the worker says so and runs int8

Only the decoder layers' linear layers of the language model are quantized (q/k/v/o, gate/up/down).
The embeddings and lm_head (the decode loop reads four of its rows, in full precision, so a near tie
between tokens is not decided by rounding), the diffusion head, the connectors and the codecs stay as
loaded: community 8-bit builds of VibeVoice keep them at full precision too. Nothing is stored: the
checkpoint stays as it is, and quantizing takes seconds at each start.

Each layer proves itself as it is quantized (`quantize_layer`): a fixed random probe goes through it
before and after, and a layer whose output moves by more than LAYER_ERROR_BOUND, or is not finite,
keeps its loaded weights, and the log names it. If no layer can be quantized (torchao missing, its
kernels failing on this device), the model stays as loaded and the log says why, in one sentence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("vibevoice.weights")

MODES = ("bf16", "int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # float8 tensor-core and conversion support: Ada (8.9), Hopper (9.0), Blackwell
# Relative RMS output error a quantized layer may show on the probe before it keeps its loaded weights.
# Per-row int8 rounds each weight by at most half a step of max|row| / 127: on Gaussian-like rows of
# 1-20k inputs that is about 1 % of a layer's output (fp8's 3-bit mantissa: about 2.5 %). 10 % is far
# above both, and far below a broken kernel (unrelated output: about 100 %, or not finite).
LAYER_ERROR_BOUND = 0.10
PROBE_ROWS = 8
PROBE_SEED = 20240827
# Bytes per output row besides the 8-bit weights, in the layout torchao 0.14 keeps (its inner tensors):
# int8 keeps a scale in the model's dtype and an int64 zero point; fp8 a float32 scale.
_ROW_EXTRA = {"int8": lambda dtype: torch.finfo(dtype).bits // 8 + 8, "fp8": lambda dtype: 4}


# --- data types ---------------------------------------------------------------------------------


class QuantizationFailed(RuntimeError):
    """A layer's quantized output failed its check; the layer keeps its loaded weights."""


@dataclass(frozen=True)
class WeightsReport:
    """What WEIGHTS did at load time: the mode asked for, the mode in use, and why they differ."""

    asked: str
    used: str  # "bf16" (as loaded), "int8" or "fp8"
    note: str  # one sentence when `used` is not `asked`, or when layers kept their loaded weights
    quantized: int  # linear layers in 8 bits
    kept: tuple[str, ...]  # layers whose check failed: they stay as loaded
    resident_bytes: int  # every weight and buffer of the model, as it sits in memory
    largest_error: float  # the largest relative output error of a quantized layer on the probe

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.used == "bf16":
            text = f"weights: as loaded, {self.resident_bytes / 1e9:.2f} GB"
        else:
            text = (f"weights: {self.used} for {self.quantized} linear layers of the language model, "
                    f"{self.resident_bytes / 1e9:.2f} GB in all; largest layer error on the start-up probe "
                    f"{100 * self.largest_error:.2f} %")  # fmt: skip
        return f"{text}{'; ' + self.note if self.note else ''}"

    def log(self) -> None:
        """The start-up log line: INFO; WARNING when the mode changed or layers stayed as loaded; ERROR
        when 8-bit weights were asked for and none could be used (the GPU may then not hold the batch)."""
        level = logging.INFO
        if self.note:
            level = logging.ERROR if self.used == "bf16" and self.asked != "bf16" else logging.WARNING
        log.log(level, "%s", self.describe())


# --- which mode runs ----------------------------------------------------------------------------


def resolve(asked: str, device: torch.device | str) -> tuple[str, str]:
    """The mode that runs on `device` for WEIGHTS=`asked`, and the sentence why when it is another."""
    if asked not in MODES:
        raise ValueError(f"WEIGHTS must be one of {', '.join(MODES)}, not {asked!r}")
    device = torch.device(device)
    if asked != "fp8":
        return asked, ""
    if device.type != "cuda":
        return "int8", f"WEIGHTS=fp8 needs a CUDA GPU of compute capability 8.9 or newer; on {device.type} int8 runs"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return "int8", (f"WEIGHTS=fp8 needs compute capability 8.9 or newer (Ada, Hopper); {name} has "
                        f"{capability[0]}.{capability[1]}, so int8 runs")  # fmt: skip
    return "fp8", ""


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The language model's decoder-layer linear layers (name, module): what int8 and fp8 quantize."""
    language_model = model.model.language_model
    for index, layer in enumerate(language_model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                yield f"language_model.layers.{index}.{name}", module


# --- quantizing ---------------------------------------------------------------------------------


def apply(model: nn.Module, asked: str) -> WeightsReport:
    """Quantize the model's language-model linear layers in place for WEIGHTS=`asked`; say what runs.

    fp8 that no layer passes falls back to int8; int8 that no layer passes leaves the model as loaded."""
    used, note = resolve(asked, model.device)
    if used == "bf16":
        return WeightsReport(asked, used, note, 0, (), resident_bytes(model), 0.0)
    try:
        quantized, kept, largest, failure = quantize_all(model, torchao_config(used))
        if not quantized and used == "fp8":
            note = f"WEIGHTS=fp8 failed its check on every layer ({failure}), so int8 runs"
            used = "int8"
            quantized, kept, largest, failure = quantize_all(model, torchao_config(used))
    except ImportError as exc:
        reason = f"WEIGHTS={asked} needs torchao, which did not import ({_first_line(exc)}); weights stay as loaded"
        return WeightsReport(asked, "bf16", reason, 0, (), resident_bytes(model), 0.0)
    if not quantized:
        reason = f"WEIGHTS={asked} failed its check on every layer ({failure}); the weights stay as loaded"
        return WeightsReport(asked, "bf16", reason, 0, tuple(kept), resident_bytes(model), 0.0)
    if kept:
        kept_note = f"{len(kept)} layer(s) failed their check and stay as loaded (first: {kept[0]}: {failure})"
        note = f"{note}; {kept_note}" if note else kept_note
    return WeightsReport(asked, used, note, quantized, tuple(kept), resident_bytes(model), largest)


def quantize_all(model: nn.Module, config) -> tuple[int, list[str], float, str]:
    """Each quantizable layer through `quantize_layer`: (layers quantized, names of those kept as
    loaded, the largest error on the probe, the first failure's reason)."""
    quantized, kept, largest, failure = 0, [], 0.0, ""
    with torch.no_grad():
        for name, layer in quantized_layers(model):
            try:
                error = quantize_layer(layer, config)
            except QuantizationFailed as exc:
                kept.append(name)
                failure = failure or str(exc)
                continue
            quantized += 1
            largest = max(largest, error)
    return quantized, kept, largest, failure


def torchao_config(mode: str):
    """torchao's weight-only config for `mode`. set_inductor_config=False: torchao would otherwise
    change process-wide settings (float32 matmul precision, inductor tuning) for every model."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    if mode == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if mode == "fp8":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"no 8-bit config for {mode!r}")


def quantize_layer(layer: nn.Linear, config) -> float:
    """Quantize one linear layer in place and check it against its loaded weights on a fixed probe;
    returns the relative output error. On a failure the layer gets its loaded weights back."""
    from torchao.quantization import quantize_

    original = layer.weight
    probe = probe_input(layer)
    reference = layer(probe)
    try:
        quantize_(layer, config)
        error = relative_error(layer(probe), reference)
    except Exception as exc:  # a kernel this device lacks, an unsupported shape: the layer stays as loaded
        layer.weight = original
        raise QuantizationFailed(_first_line(exc)) from None
    if not error <= LAYER_ERROR_BOUND:  # also catches NaN
        layer.weight = original
        raise QuantizationFailed(f"output error {error:.3g} on the probe, above {LAYER_ERROR_BOUND}")
    return error


def probe_input(layer: nn.Linear) -> torch.Tensor:
    """[PROBE_ROWS, in_features] standard normal, the same for every layer of a width (drawn on the CPU)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probe = torch.randn(PROBE_ROWS, layer.in_features, generator=generator)
    return probe.to(layer.weight.device, layer.weight.dtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float32 (RMS error relative to the RMS output)."""
    want = want.float()
    return float(torch.linalg.vector_norm(got.float() - want) / torch.linalg.vector_norm(want).clamp_min(1e-30))


# --- sizes --------------------------------------------------------------------------------------


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer as they sit in memory (a quantized weight: its inner
    tensors, the 8-bit values and the scales). A shared tensor (tied embeddings) counts once."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a torchao tensor subclass
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def planned_bytes(model: nn.Module, mode: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """What `resident_bytes` gives once the model's parameters are in `dtype` and quantized for `mode`,
    from the shapes alone (buffers count as they are): works on the meta device, so the 7B's sizes
    need no weights (figure a, GPU sizing)."""
    if mode not in MODES:
        raise ValueError(f"WEIGHTS must be one of {', '.join(MODES)}, not {mode!r}")
    element = torch.finfo(dtype).bits // 8
    parameters = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * (element if p.is_floating_point() else p.element_size()) for p in parameters.values())
    total += sum(tensor_bytes(b) for b in {id(b): b for b in model.buffers()}.values())
    if mode == "bf16":
        return total
    for _, layer in quantized_layers(model):
        rows, columns = layer.weight.shape
        total += rows * columns * (1 - element) + rows * _ROW_EXTRA[mode](dtype)
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
