"""Memory-efficient attention by chunking (Rabe & Staats 2021), chapter 8.

"Self-attention does not need O(n²) memory": split the queries into chunks of
``q_chunk`` rows and the keys into chunks of ``kv_chunk`` columns. For one query
chunk, attend to each key chunk in turn and merge the partial results with the
online-softmax rule of :mod:`attention_lib.online_softmax` (a running maximum and a
running sum, carried together as the log-sum-exp). At no time does more than a
``q_chunk × kv_chunk`` block of scores exist, so the forward pass needs
``O(q_chunk · kv_chunk)`` memory on top of the inputs and the output.

Autograd through the chunks would keep every block of probabilities for the
backward pass, which is ``O(L · S)`` again. Each query chunk therefore runs under
``torch.utils.checkpoint``: the forward keeps only its inputs, and the backward
recomputes one query chunk at a time, so training needs ``O(q_chunk · S)`` memory.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ._checks import accumulation_dtype, check_no_dropout, check_positive_int, sdpa_inputs
from .online_softmax import attention_block, merge_attention

__all__ = ["chunked_attention"]


def _mask_5d(attn_mask: torch.Tensor, Hkv: int, n_rep: int) -> torch.Tensor:
    """View a mask broadcastable to (B, Hq, L, S) as (B|1, Hkv|1, n_rep|1, L|1, S|1)."""
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    b, h = attn_mask.shape[:2]
    if h == 1:
        return attn_mask.unsqueeze(2)  # (b, 1, 1, L|1, S|1)
    return attn_mask.reshape(b, Hkv, n_rep, *attn_mask.shape[2:])  # query head g*n_rep + r


def _rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Rows ``start:stop`` of a mask (the query dim, -2), unless it broadcasts there."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


def _cols(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Columns ``start:stop`` of a mask (the key dim, -1), unless it broadcasts there."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    return mask[..., start:stop]


def _query_chunk(q_c, key, value, mask_c, q_start, is_causal, scale, kv_chunk):
    """Attention of one query chunk over all keys, one key chunk at a time.

    Args:
        q_c: (B, Hkv, n_rep, M, D), the queries ``q_start .. q_start + M``.
        key: (B, Hkv, 1, S, D).
        value: (B, Hkv, 1, S, Dv).
        mask_c: None, or this chunk's rows of the 5-D mask, (..., M|1, S|1).

    Returns:
        (B, Hkv, n_rep, M, Dv).
    """
    M, S = q_c.shape[-2], key.shape[-2]
    o = lse = None
    for k_start in range(0, S, kv_chunk):
        k_stop = min(k_start + kv_chunk, S)
        if is_causal and k_start > q_start + M - 1:
            break  # top-left causal: every later key chunk is in the future of every query here
        allowed = bias = None
        if is_causal:
            q_idx = torch.arange(q_start, q_start + M, device=q_c.device)
            k_idx = torch.arange(k_start, k_stop, device=q_c.device)
            allowed = q_idx[:, None] >= k_idx[None, :]  # (M, Kc)
        mask_ij = _cols(mask_c, k_start, k_stop)
        if mask_ij is not None and mask_ij.dtype == torch.bool:
            allowed = mask_ij
        elif mask_ij is not None:
            bias = mask_ij
        o_j, lse_j = attention_block(
            q_c, key[..., k_start:k_stop, :], value[..., k_start:k_stop, :], scale, allowed, bias
        )  # (B, Hkv, n_rep, M, Dv), (B, Hkv, n_rep, M)
        o, lse = (o_j, lse_j) if o is None else merge_attention(o, lse, o_j, lse_j)
    if o is None:  # no keys at all (S == 0): every row is fully masked
        o = q_c.new_zeros(*q_c.shape[:-1], value.shape[-1])
    return o



def _chunked_core(query, key, value, attn_mask, dropout_p, is_causal, scale, *, q_chunk, kv_chunk):
    """The 4-D core: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev),
    non-empty; returns (B, Hq, L, Ev)."""
    B, Hq, L, E = query.shape
    Hkv, Ev = key.shape[1], value.shape[-1]
    n_rep = Hq // Hkv
    acc_dtype = accumulation_dtype(query.dtype)
    # Low precision is upcast chunk by chunk, as a GPU kernel accumulates in float32.
    q5 = query.reshape(B, Hkv, n_rep, L, E)  # (B, Hkv, n_rep, L, E): query head g*n_rep + r uses kv head g
    k5 = key.unsqueeze(2).to(acc_dtype)  # (B, Hkv, 1, S, E)
    v5 = value.unsqueeze(2).to(acc_dtype)  # (B, Hkv, 1, S, Ev)
    mask5 = None if attn_mask is None else _mask_5d(attn_mask, Hkv, n_rep)
    if mask5 is not None and mask5.is_floating_point():
        mask5 = mask5.to(acc_dtype)
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, attn_mask)
    )

    outs = []
    for q_start in range(0, L, q_chunk):
        q_stop = min(q_start + q_chunk, L)
        q_c = q5[..., q_start:q_stop, :].to(acc_dtype)  # (B, Hkv, n_rep, M, E)
        args = (q_c, k5, v5, _rows(mask5, q_start, q_stop), q_start, is_causal, scale, kv_chunk)
        if recompute:
            outs.append(checkpoint(_query_chunk, *args, use_reentrant=False))
        else:
            outs.append(_query_chunk(*args))
    out = torch.cat(outs, dim=-2)  # (B, Hkv, n_rep, L, Ev)
    return out.reshape(B, Hq, L, Ev).to(query.dtype)


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_chunk: int = 1024,
    kv_chunk: int = 4096,
) -> torch.Tensor:
    """Exact attention in ``O(q_chunk · kv_chunk)`` memory (Rabe & Staats 2021).

    Same signature and semantics as ``torch.nn.functional.scaled_dot_product_attention``,
    and the same accepted inputs (rank >= 2, broadcast batch, zero sizes, ``CausalBias``):
    see :mod:`attention_lib._checks`.

    Args:
        query: (..., Hq, L, E).
        key: (..., Hkv, S, E); ``Hkv == Hq`` or 1, or ``Hq % Hkv == 0`` with ``enable_gqa``.
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S); bool (True = may attend) or an
            additive float mask. It is sliced per chunk, never expanded.
        dropout_p: must be 0: this function does not implement attention dropout.
        is_causal: top-left causal mask; key chunks above the diagonal are skipped.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq`` (grouped-query attention).
        q_chunk: queries per chunk; the unit of recomputation in the backward pass.
        kv_chunk: keys per chunk.

    Returns:
        (..., Hq, L, Ev), in the inputs' dtype. Rows whose keys are all masked give 0,
        with gradient 0.

    Raises:
        ValueError: on malformed inputs, non-positive chunk sizes, or ``dropout_p > 0``.
    """
    q_chunk, kv_chunk = check_positive_int("q_chunk", q_chunk), check_positive_int("kv_chunk", kv_chunk)
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_no_dropout("chunked_attention", args.dropout_p)
    return args.run(_chunked_core, q_chunk=q_chunk, kv_chunk=kv_chunk)
