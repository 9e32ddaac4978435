"""Scaled dot-product attention, written out from matmul + softmax (chapter 4),
and the float64 oracle every other variant is tested against.

    Attention(Q, K, V) = softmax(Q Kᵀ · scale + mask) V,   scale = 1/√E by default

Signature and semantics follow ``torch.nn.functional.scaled_dot_product_attention``:
layout (B, H, L, E); a bool mask means True = may attend, a float mask is added to
the scores; masks broadcast; ``is_causal`` is top-left aligned; ``enable_gqa`` lets
key/value have fewer heads than query. A query row whose keys are all masked gives
output 0 and gradient 0, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import accumulation_dtype, repeat_kv, sdpa_inputs
from .softmax import softmax

__all__ = ["scaled_dot_product_attention", "attention_ref", "attention_weights"]


def _masked_scores(query, key, attn_mask, is_causal, scale):
    """Scores ``Q Kᵀ · scale`` with the mask applied: (B, H, L, S)."""
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scale  # (B, H, L, S)
    L, S = scores.shape[-2:]
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()  # top-left
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores


def _weights(query, key, attn_mask, is_causal, scale, dtype):
    """softmax(Q Kᵀ · scale + mask) in ``dtype``, for 4-D inputs: (B, Hq, L, S)."""
    q, k = query.to(dtype), repeat_kv(key.to(dtype), query.shape[1])  # (B, Hq, L|S, E)
    return softmax(_masked_scores(q, k, attn_mask, is_causal, scale), dim=-1)


def _sdpa_core(query, key, value, attn_mask, dropout_p, is_causal, scale, dtype=None):
    """The 4-D core, computed in ``dtype`` (default: float32 for float16/bfloat16 inputs,
    as PyTorch's math path does) and cast back to the inputs' dtype."""
    dtype = accumulation_dtype(query.dtype) if dtype is None else dtype
    weights = _weights(query, key, attn_mask, is_causal, scale, dtype)  # (B, Hq, L, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    v = repeat_kv(value.to(dtype), query.shape[1])  # (B, Hq, S, Ev)
    return (weights @ v).to(query.dtype)  # (B, Hq, L, Ev)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention ``softmax(Q Kᵀ · scale + mask) V``, written out so it can be read.

    Accepts what ``torch.nn.functional.scaled_dot_product_attention`` accepts (see
    :mod:`attention_lib._checks`): leading dimensions that broadcast, any rank >= 2,
    zero sizes, a ``CausalBias`` as ``attn_mask``.

    Args:
        query: (..., Hq, L, E).
        key: (..., Hkv, S, E); ``Hkv == Hq`` or 1, or ``Hq % Hkv == 0`` with ``enable_gqa``.
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S). Bool: True = may attend.
            Float (the query's dtype or float32): added to the scores.
        dropout_p: dropout probability applied to the attention weights, in [0, 1].
        is_causal: top-left causal mask (query ``i`` sees keys ``0..i``).
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hq % Hkv == 0`` (grouped-query attention).

    Returns:
        (..., Hq, L, Ev), in the inputs' dtype; float16/bfloat16 are computed in float32.

    Raises:
        ValueError: on inputs PyTorch rejects, naming the argument and the shapes.
    """
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return args.run(_sdpa_core)


def attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The oracle: :func:`scaled_dot_product_attention` computed in float64, cast back.

    Every other variant is tested against it (flash-attention's ``attention_ref``).
    It is differentiable, so gradients can be compared too. It is deterministic:
    ``dropout_p`` must be 0.
    """
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if args.dropout_p != 0.0:
        raise ValueError(f"attention_ref is deterministic: dropout_p must be 0, got {dropout_p}")
    return args.run(_sdpa_core, dtype=torch.float64)


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The attention weights ``softmax(Q Kᵀ · scale + mask)``: (..., Hq, L, S).

    Each row sums to 1 (or is all 0 where every key is masked). The chapters use it
    to draw heatmaps; the attention functions never materialise it for you.
    Computed in float32 for float16/bfloat16 inputs, returned in their dtype.
    """
    if not isinstance(key, torch.Tensor):
        raise ValueError(f"key must be a torch.Tensor, got {type(key).__name__}")
    value = key.new_zeros(()).expand(*key.shape[:-1], 1)  # (..., S, 1): only its shape is used
    args = sdpa_inputs(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)
    S = args.key.shape[-2]
    if args.empty:
        return args.zeros(S)
    w = _weights(args.query, args.key, args.attn_mask, args.is_causal, args.scale, accumulation_dtype(query.dtype))
    return args.finish(w.to(query.dtype))
