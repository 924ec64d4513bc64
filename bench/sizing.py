"""The GPU table of docs/operations.md: which RunPod tier holds which batch, how fast, at what price.

Every memory figure comes from the worker's own code: the weights are the parameters of the real 7B
and 1.5B configurations (bench/weights.py) built on the meta device, and the memory a row takes and
the batch that fits come from the decode scheduler's budget (`inference.memory_budget`: KV cache,
codec state, one prefill, the share of the memory it may plan with), asked as the worker asks it at
start-up (`typical_request`). When the budget changes, the table follows; tests/test_docs.py keeps the
document equal to `markdown_tables()`.

The speed is an estimate until `make gpu-bench` has run on the GPU: per frame (133 ms of audio), the
bytes a frame step reads (each module's weights once per call: bench/weights.py's module sizes times
FRAME_CALLS, which figure a counted; plus every row's budgeted memory) at the GPU's memory bandwidth,
plus a fixed FRAME_OVERHEAD_S that no bandwidth explains (kernel launches and small kernels), taken
from the one published CUDA-graph VibeVoice decode (PUBLISHED_RTF). Prices are RunPod's flex prices
per second (mid-2026); check the live page before quoting them.

A column set per weight format (WEIGHT_FORMATS): another format (8-bit weights, say) is one more
`WeightFormat` with its own weight bytes and frame reads, and the tables gain its columns.

    python -m bench.sizing     # prints the tables (paste them into docs/operations.md)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.weights import module_bytes, real_1_5b_config, real_7b_config  # noqa: E402
from engine.scheduler import AUTO_BATCH_MEMORY_SHARE  # noqa: E402
from inference import memory_budget, typical_request  # noqa: E402

FRAME_SECONDS = 3200 / 24000  # one frame of audio: the codec's hop at 24 kHz
DIFFUSION_STEPS = 10  # DEFAULT_DIFFUSION_STEPS
# Module calls per frame of the own loop at any batch (both guidance branches in one pass): what figure a
# counts on the tiny model (bench/results.json, "own loop, batch 1"; tests/test_docs.py compares them).
FRAME_CALLS = {
    "language_model": 1,
    "diffusion_head": DIFFUSION_STEPS,
    "acoustic_decoder": 1,
    "semantic_encoder": 1,
    "acoustic_connector": 1,
    "semantic_connector": 1,
}
# Device memory that is neither weights nor the budget's: the CUDA context and the libraries' workspaces.
# An allowance, not a measurement.
RUNTIME_BYTES = 1.0e9
# The published speed the estimate is anchored to: vllm-omni's VibeVoice-1.5B port with CUDA graphs,
# batch 1 on an H100 (docs/operations.md names it). Its frame time less its bytes at the H100's bandwidth
# is FRAME_OVERHEAD_S, added to every estimated frame.
PUBLISHED_RTF = 0.189
PUBLISHED_BANDWIDTH = 3.35e12  # H100 SXM


@dataclass(frozen=True)
class Gpu:
    """A card as its maker sells it, and RunPod's flex price for it."""

    name: str
    memory_bytes: float  # as sold (decimal GB): no card of that name has less
    bandwidth: float  # memory bandwidth, bytes per second
    flops: float  # dense bf16 tensor throughput with FP32 accumulation, per second
    price_per_second: float  # RunPod serverless flex price, dollars (mid-2026)


GPUS = {
    gpu.name: gpu
    for gpu in (
        Gpu("RTX A4500", 20e9, 0.640e12, 94.6e12, 0.00019),
        Gpu("RTX A5000", 24e9, 0.768e12, 111.1e12, 0.00019),
        Gpu("RTX 3090", 24e9, 0.936e12, 35.6e12, 0.00019),
        Gpu("L4", 24e9, 0.300e12, 121e12, 0.00019),
        Gpu("RTX 4090", 24e9, 1.008e12, 82.6e12, 0.00031),
        Gpu("A40", 48e9, 0.696e12, 149.7e12, 0.00034),
        Gpu("RTX A6000", 48e9, 0.768e12, 154.8e12, 0.00034),
        Gpu("L40S", 48e9, 0.864e12, 362e12, 0.00053),
        Gpu("L40", 48e9, 0.864e12, 181e12, 0.00053),
        Gpu("RTX 6000 Ada", 48e9, 0.960e12, 364e12, 0.00053),
        Gpu("A100 80GB", 80e9, 1.935e12, 312e12, 0.00076),  # the PCIe card; SXM 2.04 TB/s
        Gpu("H100", 80e9, 2.000e12, 756e12, 0.00116),  # the PCIe card; SXM 3.35 TB/s, 989 TFLOPS
        Gpu("H200", 141e9, 4.800e12, 989e12, 0.00155),
    )
}


@dataclass(frozen=True)
class Tier:
    """A RunPod GPU pool: the id hub.json's gpuIds names, and the cards a worker on it may get."""

    pool: str
    gpus: tuple[str, ...]

    @property
    def cards(self) -> list[Gpu]:
        """Smallest memory first, and of those the slowest: the first is what the table sizes for."""
        return sorted((GPUS[name] for name in self.gpus), key=lambda gpu: (gpu.memory_bytes, gpu.bandwidth))

    @property
    def smallest(self) -> Gpu:
        return self.cards[0]


TIERS = (
    Tier("AMPERE_24", ("RTX A4500", "RTX A5000", "RTX 3090")),
    Tier("ADA_24", ("L4", "RTX 4090")),
    Tier("AMPERE_48", ("RTX A6000", "A40")),
    Tier("ADA_48_PRO", ("L40S", "L40", "RTX 6000 Ada")),
    Tier("AMPERE_80", ("A100 80GB",)),
    Tier("ADA_80_PRO", ("H100",)),
    Tier("HOPPER_141", ("H200",)),
)


@dataclass(frozen=True)
class Model:
    name: str
    model_id: str
    config: Callable[[], object]


MODELS = (
    Model("VibeVoice-7B", "vibevoice/VibeVoice-7B-hf", real_7b_config),
    Model("VibeVoice-1.5B", "vibevoice/VibeVoice-1.5B-hf", real_1_5b_config),
)


@dataclass(frozen=True)
class WeightFormat:
    """How the weights are held: their bytes on the GPU, and the bytes one frame step reads."""

    name: str
    weight_bytes: Callable[[torch.nn.Module], int]
    frame_bytes: Callable[[torch.nn.Module], int]


def bf16_weight_bytes(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters()) * 2


def bf16_frame_bytes(model: torch.nn.Module) -> int:
    sizes = module_bytes(model)
    return sum(calls * sizes[name] for name, calls in FRAME_CALLS.items())


WEIGHT_FORMATS = (WeightFormat("bf16", bf16_weight_bytes, bf16_frame_bytes),)


@dataclass(frozen=True)
class Sizing:
    """One model in one weight format on one tier's smallest card."""

    weights: float  # bytes
    row_bytes: float  # what the budget plans per row: KV cache at a typical chunk's width, codec state
    batch: int  # rows the budget admits at start-up (0: not even one)
    rtf_one: float  # estimated seconds of decoding per second of audio, one job alone
    real_time: float  # estimated seconds of audio per second, all `batch` rows together
    price_per_second: float

    def cost_per_audio_hour(self, real_time: float) -> float:
        return self.price_per_second * 3600 / real_time


@cache
def meta_model(config_builder: Callable[[], object]) -> torch.nn.Module:
    """The real architecture in bf16 on the meta device: shapes and sizes, no weights."""
    from transformers import VibeVoiceForConditionalGeneration

    with torch.device("meta"):
        return VibeVoiceForConditionalGeneration(config_builder()).to(torch.bfloat16)


@cache
def row_flops(config_builder: Callable[[], object]) -> float:
    """Floating-point operations of one row's frame: 2 per parameter and pass through the language model
    and the diffusion head (both guidance branches), and the codecs' convolutions counted by torch's
    FlopCounterMode on the meta model (over 16 frames, per frame)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_model(config_builder)
    inner = model.model
    sizes = {name: size // 2 for name, size in module_bytes(model).items()}  # bf16: parameters
    linear = 2 * 2 * (sizes["language_model"] + DIFFUSION_STEPS * sizes["diffusion_head"])
    frames = 16
    latent_size = int(model.config.audio_config.hidden_size)
    with torch.device("meta"):
        latents = torch.zeros(1, frames, latent_size, dtype=torch.bfloat16)
        audio = torch.zeros(1, 1, int(FRAME_SECONDS * 24000) * frames, dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        inner.audio_tower.decode(latents)
        inner.semantic_tokenizer_encoder(audio)
    return linear + counter.get_total_flops() / frames


def frame_overhead() -> float:
    """Seconds per frame that the published decode took beyond its bytes at its GPU's bandwidth."""
    published = bf16_frame_bytes(meta_model(real_1_5b_config)) / PUBLISHED_BANDWIDTH
    return PUBLISHED_RTF * FRAME_SECONDS - published


def frame_seconds(model: Model, frame_bytes: float, rows: int, row_bytes: float, gpu: Gpu) -> float:
    """Estimated wall time of one frame step for `rows` rows: the fixed overhead, then the memory reads
    or the arithmetic, whichever takes longer at the card's rated figures."""
    reads = (frame_bytes + rows * row_bytes) / gpu.bandwidth
    arithmetic = rows * row_flops(model.config) / gpu.flops
    return frame_overhead() + max(reads, arithmetic)


def size(model: Model, weights: WeightFormat, tier: Tier) -> Sizing:
    module = meta_model(model.config)
    gpu = tier.smallest
    weight_bytes = weights.weight_bytes(module)
    budget = memory_budget(module, device=torch.device("cuda"))
    left = max(0, int(gpu.memory_bytes - weight_bytes - RUNTIME_BYTES))
    budget.memory_left = lambda: left
    request = typical_request(frame_rate=1 / FRAME_SECONDS)
    row_bytes = budget.estimate([request] * 2) - budget.estimate([request])
    batch = budget.fits(request) if budget.estimate([request]) <= AUTO_BATCH_MEMORY_SHARE * left else 0
    frame_bytes = weights.frame_bytes(module)
    rtf_one = frame_seconds(model, frame_bytes, 1, row_bytes, gpu) / FRAME_SECONDS
    full = frame_seconds(model, frame_bytes, batch, row_bytes, gpu) if batch else math.inf
    return Sizing(weight_bytes, row_bytes, batch, rtf_one, batch * FRAME_SECONDS / full, gpu.price_per_second)


def tiers_that_fit(model: Model = MODELS[0], weights: WeightFormat = WEIGHT_FORMATS[0]) -> list[str]:
    """The pools whose smallest card holds the model and at least one row, cheapest per hour of audio
    for one job first (hub.json's gpuIds, in RunPod's order of preference)."""
    sized = [(tier, size(model, weights, tier)) for tier in TIERS]
    fitting = [(s.cost_per_audio_hour(1 / s.rtf_one), tier.pool) for tier, s in sized if s.batch > 0]
    return [pool for _, pool in sorted(fitting)]


# --- the tables --------------------------------------------------------------------------------------


def _cells(sizing: Sizing) -> list[str]:
    weights, row = f"{sizing.weights / 1e9:.1f}", f"{sizing.row_bytes / 1e6:.0f}"
    if not sizing.batch:
        return [weights, row, "does not fit", "", "", "", ""]
    return [
        weights,
        row,
        str(sizing.batch),
        f"{sizing.rtf_one:.2f}",
        f"${sizing.cost_per_audio_hour(1 / sizing.rtf_one):.2f}",
        f"{sizing.real_time:.0f}x",
        f"${sizing.cost_per_audio_hour(sizing.real_time):.3f}",
    ]


def markdown_table(model: Model) -> str:
    """One model: a row per tier, a column set per weight format."""
    header = ["pool", "GPUs (the first is sized for)", "$/s"]
    for weights in WEIGHT_FORMATS:
        header += [
            f"{weights.name}: weights (GB)",
            "per row (MB)",
            "batch",
            "RTF, 1 job (est.)",
            "$/audio h, 1 job (est.)",
            "audio/s, full batch (est.)",
            "$/audio h, full batch (est.)",
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tier in TIERS:
        gpus = ", ".join(f"{gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB)" for gpu in tier.cards)
        prices = sorted({f"{gpu.price_per_second:.5f}" for gpu in tier.cards})
        cells = [f"`{tier.pool}`", gpus, "-".join(prices)]
        for weights in WEIGHT_FORMATS:
            cells += _cells(size(model, weights, tier))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tables() -> str:
    """Every model's table under its name, as docs/operations.md holds them."""
    return "\n\n".join(f"**{model.name}** (`{model.model_id}`)\n\n{markdown_table(model)}" for model in MODELS)


def main() -> None:
    print(markdown_tables())
    print(f"\nframe overhead {frame_overhead() * 1000:.1f} ms; tiers that fit the 7B: {tiers_that_fit()}")


if __name__ == "__main__":
    main()
