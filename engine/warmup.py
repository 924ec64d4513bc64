"""The start-up warm-up: compile the decode step, check every fast path against the plain one, and
fall back loudly, or fail the worker where a setting asks for the fast path (VibeVoiceEngine.warm_up
runs it, in the decode thread, as RunPod's fitness check, before the worker takes a job).

    attention   the language model's own attention (flash_attention_2 where it is installed) against
                sdpa through the eager loop (fitness.compare_attention); disagreeing or raising: sdpa
                everywhere. ATTENTION=flash_attention_2 makes that a failed start instead.
    compile     (COMPILE on, or auto on CUDA) a C compiler and Python's headers (toolchain.problem);
                the shapes of framestep.warm_up_shapes whose buffers fit the memory left, compiled
                (FrameStep.warm_up); then the compiled step against the eager loop
                (fitness.compare_compiled). Any failure: the eager loop decodes (with the model's own
                attention). COMPILE=on makes that a failed start instead.

Every outcome is logged: the comparisons with their measured difference and tolerance at INFO, a
fallback at ERROR with its reason, and it is kept in `FastPaths.fallbacks` for the engine's report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine import fitness, toolchain
from engine.decoder import BatchDecoder
from engine.framestep import warm_up_shapes
from engine.scheduler import AUTO_BATCH_MEMORY_SHARE, BatchBudget

log = logging.getLogger("vibevoice.engine")


class StartupError(RuntimeError):
    """A fast path a setting asks for (COMPILE=on, ATTENTION=flash_attention_2) cannot be used: the
    fitness check fails, and RunPod replaces the worker. The message is one line for the operator."""


@dataclass
class FastPaths:
    """What the start-up check decided."""

    attention: str  # the language model's attention for the prefill and the eager loop
    compile_mode: str  # COMPILE: on (strict), auto, off
    attention_mode: str  # ATTENTION: flash_attention_2 (strict), auto, sdpa
    fallbacks: list[str] = field(default_factory=list)  # one line per fast path given up, with its reason
    compile_seconds: dict[tuple[int, int, int], float] = field(default_factory=dict)  # per compiled shape


def check_fast_paths(decoder: BatchDecoder, budget: BatchBudget, prompt_ids: torch.Tensor, paths: FastPaths) -> None:
    """Run every check above, in the thread that decodes (CUDA graphs belong to the thread that records
    them); raises StartupError where a strict setting cannot be honoured."""
    check_attention(decoder, prompt_ids, paths)
    if decoder.frame_step is not None or decoder.compile_error is not None:  # COMPILE resolved to on
        compile_and_check(decoder, budget, prompt_ids, paths)


def check_attention(decoder: BatchDecoder, prompt_ids: torch.Tensor, paths: FastPaths) -> None:
    if paths.attention == "sdpa":
        return
    agreement = fitness.compare_attention(decoder, prompt_ids, paths.attention)
    if agreement.ok:
        log.info(agreement.describe())
        return
    strict = paths.attention_mode not in ("auto", "sdpa")
    _give_up(paths, agreement.describe(), f"ATTENTION={paths.attention_mode}", strict, "using sdpa attention")
    use_sdpa(decoder.model)
    paths.attention = "sdpa"


def compile_and_check(decoder: BatchDecoder, budget: BatchBudget, prompt_ids: torch.Tensor, paths: FastPaths) -> None:
    """Compile the warm-up's shapes and compare the compiled step with the eager loop; on any failure
    the eager loop decodes (or, with COMPILE=on, the start fails)."""
    reason = decoder.compile_error or toolchain.problem(decoder.device.type) or compile_shapes(decoder, budget, paths)
    if reason is None:
        agreement = fitness.compare_compiled(decoder, prompt_ids)
        reason = None if agreement.ok else agreement.describe()
        if agreement.ok:
            log.info(agreement.describe())
    if reason is None:
        return
    _give_up(paths, reason, f"COMPILE={paths.compile_mode}", paths.compile_mode == "on", "decoding uncompiled")
    decoder.frame_step = None  # the eager loop, with the model's own attention
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_shapes(decoder: BatchDecoder, budget: BatchBudget, paths: FastPaths) -> str | None:
    """Compile the shapes the memory left affords (`paths.compile_seconds` keeps each one's seconds);
    why compiling failed, or None."""
    started = time.perf_counter()
    paths.compile_seconds = decoder.compile_shapes(affordable_shapes(decoder, budget))
    if not decoder.compiled:
        return f"compiling the decode step failed: {decoder.frame_step.failure}"
    if not decoder.frame_step.compiled_shapes:
        return "no shape of the decode step was compiled (the memory left holds none of their buffers)"
    shapes = ", ".join(f"{b}x{c}" for b, c, _ in paths.compile_seconds)
    log.info("decode step compiled for %d shapes (rows x cache columns: %s; %d diffusion steps) in %.1f s",
             len(paths.compile_seconds), shapes, decoder.diffusion_steps, time.perf_counter() - started)  # fmt: skip
    _say_uncompiled_batches(budget)
    return None


def affordable_shapes(decoder: BatchDecoder, budget: BatchBudget) -> list[tuple[int, int, int]]:
    """framestep.warm_up_shapes for the batch cap, as far as their buffers (kept for the process) fit in
    AUTO_BATCH_MEMORY_SHARE of the memory left on CUDA; the log names the shapes left out."""
    shapes = warm_up_shapes(budget.cap(), budget.device, decoder.diffusion_steps)
    if budget.device.type != "cuda":
        return shapes
    room, kept = AUTO_BATCH_MEMORY_SHARE * budget.memory_left() - budget.prefill_bytes, []
    for shape in shapes:
        room -= decoder.frame_step.slot_bytes(*shape)
        if room < 0:
            log.warning("the memory left holds the compiled step's buffers for %d of its %d shapes; "
                        "batches of the others run uncompiled", len(kept), len(shapes))  # fmt: skip
            break
        kept.append(shape)
    return kept


def use_sdpa(model) -> None:
    """The language model computes attention with sdpa from now on (only it has a choice: switching the
    whole model would also hand sdpa to the codecs, which have none)."""
    model.model.language_model.set_attn_implementation("sdpa")


def _say_uncompiled_batches(budget: BatchBudget) -> None:
    """BATCH_SIZE above the largest compiled bucket is the operator's choice; the log says what it costs."""
    largest = max(bucket for bucket, _, _ in budget.decoder.frame_step.compiled_shapes)
    if budget.batch_size > largest:
        log.warning("BATCH_SIZE %d is above the largest compiled batch (%d rows): larger batches run uncompiled",
                    budget.batch_size, largest)  # fmt: skip


def _give_up(paths: FastPaths, reason: str, setting: str, strict: bool, instead: str) -> None:
    if strict:
        raise StartupError(f"{setting}, but {reason}")
    message = f"{reason}; {instead} ({setting})"
    log.error(message)
    paths.fallbacks.append(message)
