"""The decode loop's data types, shared by the eager loop (decoder.py), the static step (framestep.py)
and the scheduler (scheduler.py).

    DecodeRequest   one chunk to decode: its prompt, voices, limits and seed (VoiceClip: one voice)
    Sequence        a request decoding: its own generator, its tokens, its state outside the batch
    RowState        a sequence's KV and codec state while it is outside the batch (prefilled, parked)
    Batch           the rows decoding together: row i is sequence i's positive branch, n + i its negative
    FrameOutput     what one sequence produced in one frame (HostFrame: its samples on the way to the host)
    ChunkAudio      a decoded chunk, the result of every decode path
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class VoiceClip:
    """One speaker's reference audio, as the processor normalised it, with a key for its content."""

    key: str  # hash of `samples`: the same voice in any chunk or job has the same key
    samples: torch.Tensor  # [frames * hop] float32 on the CPU, zero-padded to whole frames
    frames: int  # latent frames (placeholder tokens) the voice fills in the prompt

    @classmethod
    def from_processor(cls, input_values: torch.Tensor, padding_mask: torch.Tensor, hop: int) -> list[VoiceClip]:
        """The clips of one prompt's voices: `input_values` [voices, 1, samples], `padding_mask` [voices, samples]."""
        clips = []
        for row in range(input_values.shape[0]):
            frames = -(-int(padding_mask[row].sum()) // hop)
            samples = input_values[row, 0, : frames * hop].detach().to("cpu", torch.float32).contiguous()
            key = hashlib.blake2b(samples.numpy().tobytes(), digest_size=16).hexdigest()
            clips.append(cls(key, samples, frames))
        return clips


@dataclass(frozen=True)
class DecodeRequest:
    """One sequence to decode: a chunk's prompt, its voices and its limits."""

    index: int  # the chunk index, reported back with every frame
    input_ids: torch.Tensor  # [prompt_len] token ids of the prompt
    max_frames: int  # the frame cap: at most this many generated tokens
    seed: int
    cfg_scale: float = 1.3
    diffusion_steps: int = 10
    voices: tuple[VoiceClip, ...] = ()  # in prompt order; empty without a voice prompt
    expected_frames: int | None = None  # what the memory budget plans for (default: the cap)
    forced_tokens: tuple[int, ...] = ()  # emitted instead of the model's choice (tests walk speech start/end)


@dataclass
class ChunkAudio:
    """A decoded chunk: the one result type of both decode loops."""

    index: int
    audio: np.ndarray  # 24 kHz mono float32
    frames: int  # generated speech frames
    reached_cap: bool  # stopped by the frame cap while still speaking
    tokens: list[int] = field(default_factory=list)  # every generated token id
    compiled_frames: int = 0  # of its decode steps (one per token), those the compiled step ran
    uncompiled_frames: int = 0  # and those that ran uncompiled (the eager loop, or a shape not compiled)


def ended_by_cap(tokens: list[int], max_frames: int, audio_token_id: int) -> bool:
    """The sequence ran into its frame cap while still speaking (so its audio may be cut short)."""
    return len(tokens) >= max_frames and bool(tokens) and tokens[-1] == audio_token_id


@dataclass
class RowState:
    """A sequence's rows while it is outside the batch (just prefilled, or parked), batch dim 1."""

    positive_hidden: torch.Tensor  # [hidden]
    negative_hidden: torch.Tensor  # [hidden]
    positive_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [1, kv_heads, Lp, head_dim]
    negative_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [1, kv_heads, Ln, head_dim]
    positive_mask: torch.Tensor  # [Lp], 1 = visible
    negative_mask: torch.Tensor  # [Ln]
    acoustic: object | None = None  # codec conv state, 1 row (None: not started)
    semantic: object | None = None


@dataclass(eq=False)
class Sequence:
    """One chunk decoding: its request, its own generator and its progress."""

    request: DecodeRequest
    generator: torch.Generator = field(default_factory=torch.Generator)
    tokens: list[int] = field(default_factory=list)
    next_position: int = 0  # the positive row's next position id
    negative_length: int = 0  # inputs the negative branch has really seen (its next position id)
    state: RowState | None = None  # its rows while outside the batch
    spoke: bool = False  # it has produced audio
    owner: object = None  # the scheduler's job record
    compiled_frames: int = 0  # decode steps that ran through the compiled step
    uncompiled_frames: int = 0  # decode steps that ran uncompiled

    def count_frame(self, compiled: bool) -> None:
        """One decode step of this sequence, compiled or not (its job's `engine` report adds them up)."""
        if compiled:
            self.compiled_frames += 1
        else:
            self.uncompiled_frames += 1

    def fresh(self) -> Sequence:
        """The same request from the start (an out-of-memory retry of a sequence nobody has heard yet)."""
        return Sequence(self.request, owner=self.owner)


@dataclass
class Batch:
    """The rows decoding together. Row i holds sequence i's positive branch, row n + i its negative one."""

    sequences: list[Sequence] = field(default_factory=list)
    positive_hidden: torch.Tensor | None = None  # [n, hidden]: the last pass's output, tokens come from it
    negative_hidden: torch.Tensor | None = None  # [n, hidden]
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer [2n, kv_heads, L, hd]
    mask: torch.Tensor | None = None  # [2n, L] long, 1 = visible; the last column holds the latest pass
    acoustic: object | None = None  # acoustic decoder conv state, n rows
    semantic: object | None = None  # semantic encoder conv state, n rows
    static: object | None = None  # framestep.Slots: the rows in the compiled step's buffers (COMPILE on)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def kv_bytes(self) -> int:
        static = self.static.tensors.nbytes() if self.static is not None else 0
        return static + sum(keys.nbytes + values.nbytes for keys, values in self.kv)


@dataclass
class FrameOutput:
    """What one sequence produced in one frame."""

    sequence: Sequence
    token: int
    audio: HostFrame | None  # the frame's samples on their way to the host (None: no speech this frame)
    ended: bool  # end of text or frame cap: the sequence is done and leaves at the next boundary
    failed: bool = False  # its hidden state was not finite: its job fails, the others go on
    # The frame's speech latent [latent] (None: no speech) and the row's language-model state after the
    # frame [hidden], on the device. The start-up checks compare them between paths; under CUDA graphs
    # the next step overwrites them, so read them before that.
    latent: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class HostCopy:
    """A frame's samples [m, 1, hop] copied to the host without blocking the decode thread.

    On CUDA the copy goes into pinned memory behind an event; `row()` (called from the consumer's
    thread) waits for that event, so the decode thread never waits for a device-to-host copy."""

    def __init__(self, samples: torch.Tensor):
        if samples.device.type == "cuda":
            self._tensor = torch.empty(samples.shape, dtype=samples.dtype, pin_memory=True)
            self._tensor.copy_(samples, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._tensor, self._event = samples, None

    def row(self, k: int) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._tensor[k].float().numpy().reshape(-1)


@dataclass(frozen=True)
class HostFrame:
    """One sequence's samples of a frame, on their way to the host."""

    copy: HostCopy
    row: int

    def numpy(self) -> np.ndarray:
        return self.copy.row(self.row)


class NonFiniteStateError(RuntimeError):
    """A sequence's language-model state is not finite (NaN or inf); its job cannot go on."""


def codec_map(template, make) -> object:
    """A new codec conv-state cache shaped like `template`, each layer's tensor from `make(key, layer)`."""
    cache = type(template)()
    for key, layer in template.layers.items():
        copy = type(layer)()
        copy.__dict__.update(layer.__dict__)
        copy.cache = make(key, layer)
        cache.layers[key] = copy
    return cache
