"""The GPU table of docs/operations.md: which RunPod tier holds which batch, how fast, at what price.

Every memory figure comes from the worker's own code, for the deployment a CUDA worker runs by
default (`COMPILE=auto`: the compiled step). The weights are the parameters of the real 7B and 1.5B
configurations (bench/weights.py) built on the meta device, as WEIGHTS holds them
(`engine/weights.planned_bytes`). The batch is what the start-up warm-up affords
(`engine/warmup.affordable_shapes`: the compiled shapes whose buffers fit the decode scheduler's share
of the memory left, `inference.memory_budget`), whose largest bucket is the batch cap; a row's memory
is the compiled step's buffers per row of that bucket (`FrameStep.slot_bytes`: both guidance
branches' KV cache at one capacity step, noise tables, codec state) and the scheduler's codec state.
When the budget or the step's buffers change, the table follows; tests/test_docs.py keeps the
document equal to `markdown_tables()`.

The speed is an estimate until `make gpu-bench` has run on the GPU: per frame (133 ms of audio), the
weight bytes a compiled frame reads (`compiled_frame_reads`: the language model once for both
branches, the diffusion head's condition and adaLN projections once and its per-step layers once per
diffusion step, the codecs and connectors once), plus every row's buffers, at the GPU's memory
bandwidth, or its arithmetic at the card's bf16 rate if that takes longer; plus a fixed overhead per
frame that no bandwidth explains (kernel launches and small kernels), taken from the one published
CUDA-graph VibeVoice decode (PUBLISHED_RTF). Prices are RunPod's flex prices per second (mid-2026);
check the live page before quoting them.

A column set per weight format (WEIGHT_FORMATS: bf16 and WEIGHTS=int8).

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

from bench.weights import meta_model as build_meta_model  # noqa: E402
from bench.weights import module_bytes, real_1_5b_config, real_7b_config  # noqa: E402
from engine.compile_cache import only_errors_from  # noqa: E402
from engine.decoder import BatchDecoder  # noqa: E402
from engine.framestep import capacity_step  # noqa: E402
from engine.scheduler import CODEC_STATE_BYTES  # noqa: E402
from engine.warmup import affordable_shapes  # noqa: E402
from engine.weights import planned_bytes  # noqa: E402
from inference import memory_budget  # noqa: E402

FRAME_SECONDS = 3200 / 24000  # one frame of audio: the codec's hop at 24 kHz
DIFFUSION_STEPS = 10  # DEFAULT_DIFFUSION_STEPS's default
FAL_PER_AUDIO_HOUR = 2.40  # hosted VibeVoice 7B on fal.ai: $0.04 per generated minute, the price to beat
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
    """How the weights are held (a WEIGHTS mode): their bytes on the GPU, and the bytes a frame reads."""

    name: str  # bf16, int8

    def weight_bytes(self, model: torch.nn.Module) -> int:
        return planned_bytes(model, self.name)

    def frame_bytes(self, model: torch.nn.Module) -> int:
        return compiled_frame_reads(model, self.name)


WEIGHT_FORMATS = (WeightFormat("bf16"), WeightFormat("int8"))


def compiled_frame_reads(model: torch.nn.Module, weights: str, steps: int = DIFFUSION_STEPS) -> int:
    """Weight bytes one compiled frame reads for the whole batch (engine/framestep.py StaticFrame): the
    language model once for both branches, the diffusion head's condition and adaLN projections once and
    its per-step layers `steps` times, the connectors and codecs once; WEIGHTS=`weights` sizes the
    language model's linear layers."""
    sizes = module_bytes(model, weights)
    head = model.model.diffusion_head

    def size(*modules) -> int:
        return 2 * sum(p.numel() for module in modules for p in module.parameters())

    once = size(head.cond_proj, head.final_layer.linear_1, *(layer.linear for layer in head.layers))
    per_step = size(head.noisy_images_proj, head.final_layer.linear_2, *(layer.ffn for layer in head.layers))
    rest = ("language_model", "acoustic_decoder", "semantic_encoder", "acoustic_connector", "semantic_connector")
    return sum(sizes[name] for name in rest) + once + steps * per_step


@dataclass(frozen=True)
class Sizing:
    """One model in one weight format on one tier's smallest card."""

    weights: float  # bytes
    row_bytes: float  # a row's compiled-step buffers (one capacity step) and codec state
    batch: int  # the largest compiled bucket the memory left affords: the batch cap (0: not even one row)
    rtf_one: float  # estimated seconds of decoding per second of audio, one job alone
    real_time: float  # estimated seconds of audio per second, all `batch` rows together
    price_per_second: float

    def cost_per_audio_hour(self, real_time: float) -> float:
        return self.price_per_second * 3600 / real_time


@cache
def meta_model(config_builder: Callable[[], object]) -> torch.nn.Module:
    """The real architecture in bf16 on the meta device: shapes and sizes, no weights (built once)."""
    return build_meta_model(config_builder())


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


def eager_frame_reads(model: torch.nn.Module) -> int:
    """Weight bytes a frame reads when each module is called whole (FRAME_CALLS, as figure a counts
    them): the diffusion head entirely once per step, as the published decode calls it."""
    sizes = module_bytes(model)
    return sum(calls * sizes[name] for name, calls in FRAME_CALLS.items())


def frame_overhead() -> float:
    """Seconds per frame that the published decode took beyond its bytes at its GPU's bandwidth."""
    published = eager_frame_reads(meta_model(real_1_5b_config)) / PUBLISHED_BANDWIDTH
    return PUBLISHED_RTF * FRAME_SECONDS - published


def frame_seconds(model: Model, frame_bytes: float, rows: int, row_bytes: float, gpu: Gpu) -> float:
    """Estimated wall time of one frame step for `rows` rows: the fixed overhead, then the memory reads
    or the arithmetic, whichever takes longer at the card's rated figures."""
    reads = (frame_bytes + rows * row_bytes) / gpu.bandwidth
    arithmetic = rows * row_flops(model.config) / gpu.flops
    return frame_overhead() + max(reads, arithmetic)


@cache
def compiled_decoder(config_builder: Callable[[], object]) -> BatchDecoder:
    """The decoder a CUDA worker builds (COMPILE=auto: with the static step), over the meta model."""
    return BatchDecoder(meta_model(config_builder), compile_mode="on", diffusion_steps=DIFFUSION_STEPS)


def size(model: Model, weights: WeightFormat, tier: Tier) -> Sizing:
    """What the worker's start-up would afford on the tier's smallest card, and the estimated speed."""
    module = meta_model(model.config)
    gpu = tier.smallest
    weight_bytes = weights.weight_bytes(module)
    left = max(0, int(gpu.memory_bytes - weight_bytes - RUNTIME_BYTES))
    decoder = compiled_decoder(model.config)
    budget = memory_budget(module, device=torch.device("cuda"), decoder=decoder)
    budget.memory_left = lambda: left
    with only_errors_from("vibevoice.engine"):  # it would name the shapes left out
        shapes = affordable_shapes(decoder, budget)
    batch = max((bucket for bucket, _, _ in shapes), default=0)
    capacity = capacity_step(torch.device("cuda"))
    row_bytes = decoder.frame_step.slot_bytes(batch or 1, capacity, DIFFUSION_STEPS) / (batch or 1) + CODEC_STATE_BYTES
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


def markdown_table(model: Model, weights: WeightFormat) -> str:
    """One model in one weight format: a row per tier."""
    header = ["pool", "GPUs (the first is sized for)", "$/s", "weights (GB)", "per row (MB)", "batch",
              "RTF, 1 job (est.)", "$/audio h, 1 job (est.)", "audio/s, full batch (est.)",
              "$/audio h, full batch (est.)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tier in TIERS:
        gpus = ", ".join(f"{gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB)" for gpu in tier.cards)
        prices = sorted({f"{gpu.price_per_second:.5f}" for gpu in tier.cards})
        cells = [f"`{tier.pool}`", gpus, "-".join(prices), *_cells(size(model, weights, tier))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tables() -> str:
    """Every model and weight format's table under its name, as docs/operations.md holds them."""
    return "\n\n".join(
        f"**{model.name}** (`{model.model_id}`), `WEIGHTS={weights.name}`\n\n{markdown_table(model, weights)}"
        for model in MODELS
        for weights in WEIGHT_FORMATS
    )


def main() -> None:
    print(markdown_tables())
    print(f"\nframe overhead {frame_overhead() * 1000:.1f} ms; tiers that fit the 7B: {tiers_that_fit()}")


if __name__ == "__main__":
    main()
