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

from ._checks import check_attention_args, repeat_kv
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


def _attention_math(query, key, value, attn_mask, dropout_p, is_causal, scale):
    weights = softmax(_masked_scores(query, key, attn_mask, is_causal, scale), dim=-1)  # (B, H, L, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ value  # (B, H, L, Ev)


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

    Args:
        query: (B, Hq, L, E).
        key: (B, Hkv, S, E); ``Hkv == Hq``, or ``Hq % Hkv == 0`` with ``enable_gqa``.
        value: (B, Hkv, S, Ev).
        attn_mask: broadcastable to (B, Hq, L, S). Bool: True = may attend.
            Float (the query's dtype): added to the scores.
        dropout_p: dropout probability applied to the attention weights.
        is_causal: top-left causal mask (query ``i`` sees keys ``0..i``).
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq`` (grouped-query attention).

    Returns:
        (B, Hq, L, Ev), in the inputs' dtype.

    Raises:
        ValueError: on inputs of the wrong rank, shape, dtype or device.
    """
    scale = check_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    Hq = query.shape[1]
    key, value = repeat_kv(key, Hq), repeat_kv(value, Hq)  # (B, Hq, S, E), (B, Hq, S, Ev)
    return _attention_math(query, key, value, attn_mask, dropout_p, is_causal, scale)


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
    scale = check_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if dropout_p != 0.0:
        raise ValueError(f"attention_ref is deterministic: dropout_p must be 0, got {dropout_p}")
    Hq = query.shape[1]
    q64, k64, v64 = (t.to(torch.float64) for t in (query, key, value))
    k64, v64 = repeat_kv(k64, Hq), repeat_kv(v64, Hq)
    mask64 = attn_mask
    if attn_mask is not None and attn_mask.is_floating_point():
        mask64 = attn_mask.to(torch.float64)
    out = _attention_math(q64, k64, v64, mask64, 0.0, is_causal, scale)
    return out.to(query.dtype)


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The attention weights ``softmax(Q Kᵀ · scale + mask)``: (B, Hq, L, S).

    Each row sums to 1 (or is all 0 where every key is masked). The chapters use it
    to draw heatmaps; the attention functions never materialise it for you.
    """
    scale = check_attention_args(query, key, key, attn_mask, 0.0, is_causal, scale, enable_gqa)
    key = repeat_kv(key, query.shape[1])
    return softmax(_masked_scores(query, key, attn_mask, is_causal, scale), dim=-1)
