"""The static frame step's attention: grouped-query attention that never copies the KV cache.

Qwen2.5 shares each key/value head between several query heads (the 7B: 28 query heads on 4 KV heads,
7 each). For one query token, transformers' sdpa integration folds each KV head's query heads into the
query length ("packing"), so `scaled_dot_product_attention` reads the shared keys and values once. It
does so only when it is not being compiled: under `torch.compile` (`is_torchdynamo_compiling()`) it calls
`repeat_kv`, which copies every layer's whole cache once per query head. For the 7B's static step at
1024 columns that is about 1.6 GB more memory traffic per sequence and frame (bench figure a).

`packed_gqa_attention` packs whether or not it is being compiled: query [B, heads, 1, hd] becomes
[B, kv_heads, groups, hd] against the unexpanded keys and values [B, kv_heads, columns, hd], with a mask
shared by all heads ([B, 1, 1, columns], the static step's) broadcast over them. The arithmetic is the
one transformers runs uncompiled, so the static step gives the same numbers compiled or not. Anything
else (several query tokens, a per-head mask, no grouping) goes to transformers' sdpa function as is.

The function is registered with transformers (`AttentionInterface`, with sdpa's mask builder) under
`PACKED_SDPA`; the static step (framestep.py) has the language model use it only while its frame
runs (`use_attention`), so the prefill and the eager loop keep the attention the model was loaded with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed_gqa"  # the name results and logs report for the static step's attention


def packed_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, heads, q, hd], key/value [B, kv_heads, columns, hd]
    -> ([B, q, heads, hd], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_length, head_dim = query.shape
    shared_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1))
    if q_length != 1 or groups == 1 or not shared_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    packed = query.reshape(batch, heads // groups, groups, head_dim)  # a KV head's query heads as its queries
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )  # [B, kv_heads, groups, hd]
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_gqa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


@contextlib.contextmanager
def use_attention(language_model: torch.nn.Module, name: str) -> Iterator[None]:
    """The language model computes attention with `name` (a transformers attention implementation, or
    PACKED_SDPA) inside this block; the model's own choice again after it. Its config is shared by its
    layers, which read the choice at every call, so switching costs one attribute. Only the thread that
    holds the model (the decode thread, or `BatchDecoder.decode` under its lock) may enter it."""
    config = language_model.config
    previous = config._attn_implementation
    if previous == name:
        yield
        return
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = previous
