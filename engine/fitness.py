"""Start-up checks that a fast path computes what the plain path computes, on the hardware it runs on.

Neither the compiled step (torch.compile, CUDA graphs) nor flash-attention 2 can be tested where the
worker is developed (no GPU), and both can go wrong only on some GPUs or builds. So the worker checks
them where they land, before it takes a job: the same prompt, the same forced speech frames, the same
seed and so the same noise go through the fast path and through the plain one, and what each frame
produced is compared (`Agreement`): its speech latent (the diffusion head's result, which the codec
turns into audio) and the language model's state after it (which the next frame's tokens and
diffusion condition come from). A fault in attention shows in the state first, one in the solver or
the codecs in the latent; either feeds the next frame.

    compare_compiled(decoder, prompt)             the compiled static step against the eager loop
                                                  (both with the static step's attention, sdpa)
    compare_attention(decoder, prompt, candidate) an attention implementation (flash_attention_2)
                                                  against sdpa, both through the eager loop

Forced tokens make the check independent of which token the model would pick, so a disagreement
is a difference in what the frames compute. A fast path that raises is a failed check too; the plain
path raising is not a check's result but a broken worker: it propagates. What a failure means (fall
back, or fail the worker with COMPILE=on) is VibeVoiceEngine.warm_up's decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.attention import use_attention
from engine.batch import DecodeRequest
from engine.decoder import BatchDecoder

# Forced speech frames the checks decode: each feeds the next (its latent becomes the next input), so a
# few frames test the loop and not only one pass.
PROBE_FRAMES = 4


def tolerance_for(dtype: torch.dtype) -> float:
    """How far the fast path's results may lie from the plain path's: the RMS of the difference over the
    RMS of the plain path's values, over all probe frames (`Agreement.difference`).

    float32 (the CPU): the paths do the same arithmetic in another order (fused kernels, the unrolled
    solver, the slot cache). Measured on the tiny checkpoint: eager vs sdpa attention differ by 8e-8
    (speech latents) and 3e-7 (language-model states), the static step vs the eager loop by 2e-7 and
    3e-7, compiled or not. 1e-4 leaves a margin of hundreds, and still catches the faults the tests
    plant, small as the tiny model's random weights keep them: attention over doubled values moves
    the states by 7.5e-2, a guidance scale 1.5x too large the latents by 2.4e-3.

    bfloat16 (a GPU): every operation rounds at 2^-8 (0.4 %), and the paths round in different places
    (inductor keeps fused intermediates in float32 where eager rounds each one; flash-attention and
    sdpa accumulate in other orders), through the language model, 10-20 diffusion steps and the codecs,
    whose output feeds the next frame. Measured on the tiny checkpoint (2 layers) in bfloat16 on the CPU:
    eager vs sdpa attention 2e-3 on the latents, and all of bfloat16's rounding (float32 against
    bfloat16) 6.5e-3, steady over the four frames. Rounding grows about with the square root of depth,
    so the 7B's 28 layers give about 3e-2. 0.1 is above that, and under any wrong result worth the name:
    latents of equal scale that share nothing differ by about 1.4, and a fault that spoils a tenth of
    them already by about 0.45. The language model's states are not judged in bfloat16 (`states_judged`).
    """
    return 1e-4 if dtype == torch.float32 else 0.1


def states_judged(dtype: torch.dtype) -> bool:
    """Whether the language model's states count beside the latents. In float32 they do: they show a
    fault in attention that a random-weight model's latents barely show. In bfloat16 their rounding
    differences grow frame by frame through the feedback (float32 against bfloat16 on the tiny
    checkpoint: 8 % after the first frame, 28 % after the fourth), so no fixed bound tells rounding from
    a fault there; they are reported, and the latents, which stay within 1 %, decide."""
    return dtype == torch.float32


@dataclass(frozen=True)
class Agreement:
    """One start-up comparison of a fast path with the plain one."""

    fast: str  # "the compiled step", "flash_attention_2 attention"
    plain: str  # "the eager loop", "sdpa attention"
    tolerance: float
    judge_states: bool  # states_judged(dtype)
    frames: int = PROBE_FRAMES
    difference: float | None = None  # what is judged: the latents' (and the states' where judged); None: not run
    latents: float | None = None  # relative RMS difference of the speech latents
    states: float | None = None  # relative RMS difference of the language model's states after each frame
    error: str | None = None  # why the fast path could not be compared (it raised, or did not run)

    @property
    def ok(self) -> bool:
        difference = self.difference
        measured = self.error is None and difference is not None and math.isfinite(difference)
        return measured and difference <= self.tolerance

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.error is not None:
            return f"{self.fast} failed the start-up check against {self.plain}: {self.error}"
        verdict = "agrees with" if self.ok else "DISAGREES with"
        states = f"language-model states {self.states:.1e}" + ("" if self.judge_states else ", not judged")
        return (
            f"{self.fast} {verdict} {self.plain} over {self.frames} forced speech frames: difference "
            f"{self.difference:.1e} of their scale (speech latents {self.latents:.1e}, {states}), "
            f"tolerance {self.tolerance:.0e}"
        )


def probe_request(decoder: BatchDecoder, prompt_ids: torch.Tensor, steps: int | None = None) -> DecodeRequest:
    """PROBE_FRAMES forced speech frames after `prompt_ids`, seed 0, the deployment's diffusion steps."""
    return DecodeRequest(
        index=0,
        input_ids=prompt_ids,
        max_frames=PROBE_FRAMES,
        seed=0,
        diffusion_steps=steps or decoder.diffusion_steps,
        forced_tokens=(decoder.audio_token_id,) * PROBE_FRAMES,
    )


def compare_compiled(decoder: BatchDecoder, prompt_ids: torch.Tensor) -> Agreement:
    """The compiled static step against the eager loop, on the probe's shape (bucket 1, one capacity
    step, the deployment's steps: a shape the warm-up compiled). The eager loop runs with the static
    step's attention, so only compilation differs."""
    frame_step = decoder.frame_step
    agreement = _agreement("the compiled step", "the eager loop", decoder)
    request = probe_request(decoder, prompt_ids, frame_step.default_steps)
    before = frame_step.compiled_frames
    try:
        fast = probe(decoder, request)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # the compiled path failed: a result of the check
        return _failed(agreement, exc)
    if not frame_step.compiled:
        return _failed(agreement, f"compilation failed ({frame_step.failure})")
    if frame_step.compiled_frames - before < PROBE_FRAMES:
        return _failed(agreement, "its frames ran uncompiled (the warm-up did not compile the probe's shape)")
    with decoder.eager_loop(), use_attention(decoder.model.model.language_model, frame_step.attention):
        plain = probe(decoder, request)
    return _compared(agreement, fast, plain)


def compare_attention(
    decoder: BatchDecoder, prompt_ids: torch.Tensor, candidate: str, reference: str = "sdpa"
) -> Agreement:
    """An attention implementation against `reference`, both through the eager loop and its prefill."""
    agreement = _agreement(f"{candidate} attention", f"{reference} attention", decoder)
    request = probe_request(decoder, prompt_ids)
    with decoder.eager_loop():
        try:
            with use_attention(decoder.model.model.language_model, candidate):
                fast = probe(decoder, request)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # kernels that do not run on this GPU, a build that does not load
            return _failed(agreement, exc)
        with use_attention(decoder.model.model.language_model, reference):
            plain = probe(decoder, request)
    return _compared(agreement, fast, plain)


def probe(decoder: BatchDecoder, request: DecodeRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """What one decode of `request` produces per frame: speech latents [speech frames, latent] and the
    language model's states [frames, hidden], float32 on the host (copied as each step makes them)."""
    latents: list[torch.Tensor] = []
    states: list[torch.Tensor] = []

    def keep(output) -> None:  # copies: the static step's state is a view of a buffer the next frame overwrites
        states.append(output.hidden.to("cpu", torch.float32, copy=True))
        if output.latent is not None:
            latents.append(output.latent.to("cpu", torch.float32, copy=True))

    decoder.decode([request], on_output=keep)
    return (torch.stack(latents) if latents else torch.zeros(0)), torch.stack(states)


def _relative(fast: torch.Tensor, plain: torch.Tensor) -> float:
    scale = float(plain.pow(2).mean().sqrt())
    return float((fast - plain).pow(2).mean().sqrt()) / max(scale, 1e-12)


def _compared(agreement: Agreement, fast: tuple, plain: tuple) -> Agreement:
    (fast_latents, fast_states), (plain_latents, plain_states) = fast, plain
    if fast_latents.shape != plain_latents.shape or fast_states.shape != plain_states.shape:
        return _failed(agreement, f"it produced {fast_latents.shape[0]} speech frames, not {plain_latents.shape[0]}")
    latents, states = _relative(fast_latents, plain_latents), _relative(fast_states, plain_states)
    difference = max(latents, states) if agreement.judge_states else latents
    measured = {"difference": difference, "latents": latents, "states": states, "frames": int(plain_latents.shape[0])}
    return Agreement(**{**agreement.__dict__, **measured})


def _agreement(fast: str, plain: str, decoder: BatchDecoder) -> Agreement:
    dtype = decoder.model.dtype
    return Agreement(fast, plain, tolerance_for(dtype), states_judged(dtype))


def _failed(agreement: Agreement, reason: BaseException | str) -> Agreement:
    if isinstance(reason, BaseException):
        text = str(reason).strip().splitlines()
        reason = f"{type(reason).__name__}: {text[0][:300]}" if text else type(reason).__name__
    return Agreement(**{**agreement.__dict__, "error": reason})
