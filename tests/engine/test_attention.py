"""The static step's attention (engine/attention.py): grouped-query attention without copies of the cache.

Mocked: nothing. The reference is transformers' own sdpa function, on both of its branches (packing
when run as is, `repeat_kv` when compiled); the static frame's bytes are counted by bench figure a's
counter (bench/step_counters.py), on the graph torch.compile captures.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench.step_counters import attention_as_compiled_before, counting_bytes, frame_bytes
from engine.attention import PACKED_SDPA, packed_gqa_attention, use_attention
from engine.decoder import BatchDecoder
from engine.framestep import FrameStep

STEPS = 3


def attention_inputs(batch: int = 6, kv_heads: int = 4, groups: int = 7, columns: int = 40, head_dim: int = 16):
    """One query token per row against a cache, the static step's mask ([B, 1, 1, columns], True = attend)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, kv_heads * groups, 1, head_dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, columns, head_dim, generator=generator) for _ in range(2))
    lengths = torch.randint(1, columns + 1, (batch,), generator=generator)
    mask = (torch.arange(columns)[None] < lengths[:, None])[:, None, None, :]
    return SimpleNamespace(num_key_value_groups=groups, is_causal=True), query, key, value, mask


@pytest.mark.parametrize("compiling", [False, True], ids=["transformers-packing", "transformers-repeat-kv"])
def test_packed_attention_equals_transformers_sdpa(compiling) -> None:
    module, query, key, value, mask = attention_inputs()
    want, _ = (
        _as_compiling(lambda: sdpa_attention_forward(module, query, key, value, mask, scaling=0.25))
        if compiling
        else sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    )
    got, weights = packed_gqa_attention(module, query, key, value, mask, scaling=0.25)
    assert weights is None and got.shape == want.shape == (6, 1, 28, 16) and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_several_query_tokens_or_per_head_masks_go_to_transformers_sdpa() -> None:
    module, _, key, value, _ = attention_inputs()
    query = torch.randn(6, 28, 5, 16)
    mask = torch.ones(6, 28, 5, 40, dtype=torch.bool).tril(diagonal=35)
    got, _ = packed_gqa_attention(module, query, key, value, mask)
    want, _ = sdpa_attention_forward(module, query, key, value, mask)
    assert torch.equal(got, want)


def test_the_language_model_attends_packed_only_inside_the_block(engine) -> None:
    language_model = engine.model.model.language_model
    before = language_model.config._attn_implementation
    with pytest.raises(RuntimeError, match="inside"), use_attention(language_model, PACKED_SDPA):
        assert language_model.config._attn_implementation == PACKED_SDPA
        raise RuntimeError("inside")
    assert language_model.config._attn_implementation == before == "sdpa"


@pytest.fixture(scope="module")
def frame_step(engine) -> FrameStep:
    step = FrameStep(BatchDecoder(engine.model), compile_frame=False)
    step.default_steps = STEPS
    return step


def test_the_static_frame_no_longer_copies_the_cache(engine, frame_step) -> None:
    """With transformers' compiled branch each layer copies K and V once per query head and attention
    reads the copies; packed, it reads the cache once: the difference is exactly those bytes."""
    text = engine.model.config.text_config
    bucket, capacity = 2, 256
    head_dim = text.hidden_size // text.num_attention_heads
    unit = 2 * bucket * capacity * head_dim * 4  # one head of K (or V) over both guidance rows, float32
    kv_heads, heads = text.num_key_value_heads, text.num_attention_heads
    # Per layer, K and V each: the copy reads kv_heads and writes heads, attention reads heads (not kv_heads).
    extra = text.num_hidden_layers * 2 * ((kv_heads + heads) + (heads - kv_heads)) * unit
    before = frame_bytes(frame_step, bucket, capacity, STEPS, packed=False)
    after = frame_bytes(frame_step, bucket, capacity, STEPS, packed=True)
    assert before - after == extra


def test_the_compiled_graph_moves_what_the_counted_frame_moves(engine, frame_step) -> None:
    """The graph torch.compile captures, run operator by operator under the counter: packed, it moves what
    the frame moves as is (no copies of the cache); with transformers' sdpa it moves what
    `attention_as_compiled_before` counts (so figure a's "before" is the old compiled graph)."""
    capacity = 256
    language_model = engine.model.model.language_model
    counted = {}
    for packed in (True, False):
        moved: list[int] = []

        def backend(graph, example_inputs, moved=moved):
            def run(*args):
                with counting_bytes() as counter:
                    out = graph.forward(*args)
                moved.append(counter[0])
                return out

            return run

        compiled = torch.compile(frame_step.frame, backend=backend, fullgraph=True, dynamic=False)
        slots = frame_step.allocate(1, capacity, STEPS)
        with torch.inference_mode(), use_attention(language_model, PACKED_SDPA) if packed else contextlib.nullcontext():
            compiled(slots.tensors)
        frame_step.release(slots)
        counted[packed] = moved[-1]
    assert counted[True] == frame_bytes(frame_step, 1, capacity, STEPS, packed=True)
    assert counted[False] == frame_bytes(frame_step, 1, capacity, STEPS, packed=False)
    assert counted[False] > counted[True]


def _as_compiling(function):
    with attention_as_compiled_before():
        return function()
