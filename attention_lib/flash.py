"""FlashAttention-2 in plain PyTorch (chapter 8).

The algorithm of FlashAttention (Dao et al. 2022) with the loop order and the
deferred normalisation of FlashAttention-2 (Dao 2024), built on the online softmax
of Milakov & Gimelshein (2018). It is written for reading, not for speed: each
``for`` loop below is what a GPU kernel runs in parallel (one program per query
block in the forward, one per key block in the backward), and each tile is a few
PyTorch operations instead of on-chip SRAM. Chapter 9 writes the same loops as a
Triton kernel.

Forward, for one block of ``BLOCK_M`` queries, over blocks of ``BLOCK_N`` keys:

    S = Q_i K_jᵀ · scale                       (BLOCK_M, BLOCK_N) scores of one tile
    m_new = max(m_i, rowmax(S))                running maximum
    P = exp(S - m_new)                         unnormalised probabilities
    l_i = exp(m_i - m_new) · l_i + rowsum(P)   running sum, rescaled
    acc = exp(m_i - m_new) · acc + P V_j       running output, rescaled
    ...
    O_i = acc / l_i,   lse_i = m_i + log(l_i)  normalise once, at the end

Only ``O`` and the log-sum-exp ``lse`` (one number per query) are saved for the
backward pass, which recomputes each tile's probabilities from them:

    P = exp(S - lse)         dV_j += Pᵀ dO_i         dP = dO_i V_jᵀ
    Δ = rowsum(dO ∘ O)       dS = P ∘ (dP - Δ)
    dQ_i += dS K_j · scale   dK_j += dSᵀ Q_i · scale

Memory: ``O(L · D)`` for inputs, outputs and statistics, plus one tile of
``BLOCK_M × BLOCK_N`` scores; never ``O(L · S)``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._checks import accumulation_dtype, check_no_dropout, check_positive_int, sdpa_inputs

__all__ = ["flash_attention"]


# ----------------------------------------------------------------------------------
# Tiles. Internally queries are (B, Hkv, n_rep, L, D) and keys/values are
# (B, Hkv, 1, S, D): query head g*n_rep + r uses key/value head g (GQA), and the
# size-1 dimension broadcasts in the tile products.
# ----------------------------------------------------------------------------------


def _tile_mask(mask, is_causal, q0, q1, k0, k1, device):
    """The mask of one tile, or None if no element of the tile is masked.

    Returns:
        None, a bool tensor (..., BLOCK_M|1, BLOCK_N|1) with True = may attend, or
        an additive float tensor of the same shape.
    """
    if is_causal:
        if k1 - 1 <= q0:
            return None  # the whole tile is on or below the diagonal
        q_idx = torch.arange(q0, q1, device=device)
        k_idx = torch.arange(k0, k1, device=device)
        return q_idx[:, None] >= k_idx[None, :]  # (BLOCK_M, BLOCK_N), top-left
    if mask is None:
        return None
    rows = mask if mask.shape[-2] == 1 else mask[..., q0:q1, :]
    return rows if rows.shape[-1] == 1 else rows[..., k0:k1]


def _tile_is_empty(tile_mask, is_causal, q0, q1, k0) -> bool:
    """True if every score of the tile is masked: the tile can be skipped."""
    if is_causal:
        return k0 > q1 - 1  # strictly above the diagonal
    if tile_mask is None:
        return False
    if tile_mask.dtype == torch.bool:
        return not bool(tile_mask.any())
    return not bool((tile_mask > float("-inf")).any())


def _tile_scores(q_i, k_j, scale, tile_mask):
    """Scores of one tile, masked: (B, Hkv, n_rep, BLOCK_M, BLOCK_N)."""
    s = (q_i @ k_j.transpose(-2, -1)) * scale  # (B, Hkv, n_rep, BLOCK_M, BLOCK_N)
    if tile_mask is None:
        return s
    if tile_mask.dtype == torch.bool:
        return s.masked_fill(~tile_mask, float("-inf"))
    return s + tile_mask


# ----------------------------------------------------------------------------------
# The inner loop of the forward: one block of queries against every block of keys.
# ----------------------------------------------------------------------------------


def _attn_fwd_inner(acc, l_i, m_i, q_i, K, V, mask, is_causal, scale, q0, BLOCK_N):
    """Online softmax over the key blocks, for the query block ``q0 : q0 + BLOCK_M``.

    Args:
        acc: (B, Hkv, n_rep, BLOCK_M, Dv) running unnormalised output, zeros.
        l_i: (B, Hkv, n_rep, BLOCK_M) running sum of exp, zeros.
        m_i: (B, Hkv, n_rep, BLOCK_M) running maximum, -inf.
        q_i: (B, Hkv, n_rep, BLOCK_M, D).
        K: (B, Hkv, 1, S, D).  V: (B, Hkv, 1, S, Dv).

    Returns:
        The updated ``(acc, l_i, m_i)``.
    """
    q1, S = q0 + q_i.shape[-2], K.shape[-2]
    hi = min(S, q1) if is_causal else S  # causal: keys at or after q1 are never seen
    for k0 in range(0, hi, BLOCK_N):
        k1 = min(k0 + BLOCK_N, S)
        tile_mask = _tile_mask(mask, is_causal, q0, q1, k0, k1, q_i.device)
        if _tile_is_empty(tile_mask, is_causal, q0, q1, k0):
            continue
        s = _tile_scores(q_i, K[..., k0:k1, :], scale, tile_mask)  # (..., BLOCK_M, BLOCK_N)
        m_new = torch.maximum(m_i, s.amax(dim=-1))  # (..., BLOCK_M)
        m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)  # row masked so far
        alpha = torch.exp(m_i - m_safe)  # (..., BLOCK_M): rescales what was accumulated
        p = torch.exp(s - m_safe.unsqueeze(-1))  # (..., BLOCK_M, BLOCK_N)
        l_i = alpha * l_i + p.sum(dim=-1)
        acc = alpha.unsqueeze(-1) * acc + p @ V[..., k0:k1, :]  # (..., BLOCK_M, Dv)
        m_i = m_new
    return acc, l_i, m_i


def _attn_fwd(q, k, v, mask, is_causal, scale, BLOCK_M, BLOCK_N):
    """The forward "kernel": one program per query block (a loop here).

    Args:
        q: (B, Hkv, n_rep, L, D), k: (B, Hkv, 1, S, D), v: (B, Hkv, 1, S, Dv), all in
            the accumulation dtype; mask: None or (..., L|1, S|1).

    Returns:
        ``o`` (B, Hkv, n_rep, L, Dv) and ``lse`` (B, Hkv, n_rep, L); fully masked
        rows have ``o = 0`` and ``lse = -inf``.
    """
    *batch, L, _ = q.shape
    o = q.new_empty(*batch, L, v.shape[-1])
    lse = q.new_empty(*batch, L)
    for q0 in range(0, L, BLOCK_M):
        q1 = min(q0 + BLOCK_M, L)
        q_i = q[..., q0:q1, :]  # (B, Hkv, n_rep, BLOCK_M, D)
        m_i = q.new_full((*batch, q1 - q0), float("-inf"))
        l_i = q.new_zeros(*batch, q1 - q0)
        acc = q.new_zeros(*batch, q1 - q0, v.shape[-1])
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q_i, k, v, mask, is_causal, scale, q0, BLOCK_N)
        seen = l_i > 0  # False only where every key of the row is masked
        l_safe = torch.where(seen, l_i, torch.ones_like(l_i))
        o[..., q0:q1, :] = acc / l_safe.unsqueeze(-1)  # normalise once (FA-2)
        lse[..., q0:q1] = torch.where(seen, m_i + torch.log(l_safe), float("-inf"))
    return o, lse


# ----------------------------------------------------------------------------------
# The backward "kernel": one program per key block; recomputes P from lse.
# ----------------------------------------------------------------------------------


def _attn_bwd(q, k, v, mask, o, lse, do, is_causal, scale, BLOCK_M, BLOCK_N, need_dmask):
    """Gradients of FlashAttention-2 by recomputation (Dao 2024, Algorithm 2).

    Shapes as in :func:`_attn_fwd`; ``do`` is (B, Hkv, n_rep, L, Dv).

    Returns:
        ``dq`` (B, Hkv, n_rep, L, D), ``dk`` (B, Hkv, S, D), ``dv`` (B, Hkv, S, Dv) and
        ``ds`` (B, Hkv, n_rep, L, S), the gradient of the scores, if ``need_dmask``
        (for a float mask that requires grad), else None.
    """
    L, S = q.shape[-2], k.shape[-2]
    delta = (do * o).sum(dim=-1)  # (B, Hkv, n_rep, L): rowsum(dO ∘ O) = rowsum(P ∘ dP)
    lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)  # masked rows: P = exp(-inf) = 0
    dq = torch.zeros_like(q)
    dk = k.new_zeros(k.shape[0], k.shape[1], S, k.shape[-1])  # (B, Hkv, S, D)
    dv = v.new_zeros(v.shape[0], v.shape[1], S, v.shape[-1])  # (B, Hkv, S, Dv)
    ds_full = q.new_zeros(*q.shape[:-1], S) if need_dmask else None  # (B, Hkv, n_rep, L, S)
    for k0 in range(0, S, BLOCK_N):
        k1 = min(k0 + BLOCK_N, S)
        k_j, v_j = k[..., k0:k1, :], v[..., k0:k1, :]  # (B, Hkv, 1, BLOCK_N, D|Dv)
        dk_j = dk.new_zeros(dk.shape[0], dk.shape[1], k1 - k0, dk.shape[-1])  # (B, Hkv, BLOCK_N, D)
        dv_j = dv.new_zeros(dv.shape[0], dv.shape[1], k1 - k0, dv.shape[-1])  # (B, Hkv, BLOCK_N, Dv)
        lo = (k0 // BLOCK_M) * BLOCK_M if is_causal else 0  # causal: earlier queries never see k0..
        for q0 in range(lo, L, BLOCK_M):
            q1 = min(q0 + BLOCK_M, L)
            tile_mask = _tile_mask(mask, is_causal, q0, q1, k0, k1, q.device)
            if _tile_is_empty(tile_mask, is_causal, q0, q1, k0):
                continue
            q_i, do_i = q[..., q0:q1, :], do[..., q0:q1, :]  # (B, Hkv, n_rep, BLOCK_M, D|Dv)
            s = _tile_scores(q_i, k_j, scale, tile_mask)  # (B, Hkv, n_rep, BLOCK_M, BLOCK_N)
            p = torch.exp(s - lse[..., q0:q1].unsqueeze(-1))  # recomputed probabilities
            dv_j += torch.einsum("bgrmn,bgrmd->bgnd", p, do_i)  # Pᵀ dO, summed over the GQA group
            dp = do_i @ v_j.transpose(-2, -1)  # (B, Hkv, n_rep, BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[..., q0:q1].unsqueeze(-1))  # softmax backward
            dq[..., q0:q1, :] += (ds @ k_j) * scale
            dk_j += torch.einsum("bgrmn,bgrmd->bgnd", ds, q_i) * scale
            if ds_full is not None:
                ds_full[..., q0:q1, k0:k1] = ds
        dk[..., k0:k1, :] = dk_j
        dv[..., k0:k1, :] = dv_j
    return dq, dk, dv, ds_full


def _sum_to_shape(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``x`` over the dimensions along which a tensor of ``shape`` was broadcast."""
    lead = x.dim() - len(shape)
    x = x.sum(dim=tuple(range(lead))) if lead else x
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x


# ----------------------------------------------------------------------------------
# The autograd Function: saves only O and lse (besides the inputs).
# ----------------------------------------------------------------------------------


def _to_5d(query, key, value, attn_mask, acc_dtype):
    B, Hq, L, E = query.shape
    Hkv = key.shape[1]
    n_rep = Hq // Hkv
    q = query.reshape(B, Hkv, n_rep, L, E).to(acc_dtype)  # (B, Hkv, n_rep, L, E)
    k = key.unsqueeze(2).to(acc_dtype)  # (B, Hkv, 1, S, E)
    v = value.unsqueeze(2).to(acc_dtype)  # (B, Hkv, 1, S, Ev)
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        b, h = mask.shape[:2]
        if h == 1:
            mask = mask.unsqueeze(2)  # (b, 1, 1, L|1, S|1)
        else:
            mask = mask.reshape(b, Hkv, n_rep, *mask.shape[2:])  # (b, Hkv, n_rep, L|1, S|1)
        if mask.is_floating_point():
            mask = mask.to(acc_dtype)
    return q, k, v, mask


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale, BLOCK_M, BLOCK_N):
        acc_dtype = accumulation_dtype(query.dtype)
        q, k, v, mask = _to_5d(query, key, value, attn_mask, acc_dtype)
        o, lse = _attn_fwd(q, k, v, mask, is_causal, scale, BLOCK_M, BLOCK_N)
        B, Hq, L, _ = query.shape
        out = o.reshape(B, Hq, L, v.shape[-1]).to(query.dtype)  # (B, Hq, L, Ev)
        # o is saved in the accumulation dtype: Δ = rowsum(dO ∘ O) from a float16/bfloat16
        # copy of O would add its rounding error to every dS (PyTorch's math backward has none)
        ctx.save_for_backward(query, key, value, attn_mask, o, lse)
        ctx.args = (is_causal, scale, BLOCK_M, BLOCK_N)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, attn_mask, o, lse = ctx.saved_tensors  # o: (B, Hkv, n_rep, L, Ev)
        is_causal, scale, BLOCK_M, BLOCK_N = ctx.args
        acc_dtype = lse.dtype
        q, k, v, mask = _to_5d(query, key, value, attn_mask, acc_dtype)
        do = grad_out.to(acc_dtype).reshape(o.shape)  # (B, Hkv, n_rep, L, Ev)
        need_dmask = attn_mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, ds = _attn_bwd(q, k, v, mask, o, lse, do, is_causal, scale, BLOCK_M, BLOCK_N, need_dmask)
        dmask = None
        if need_dmask:
            B, Hq, L, S = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
            dmask = _sum_to_shape(ds.reshape(B, Hq, L, S), attn_mask.shape).to(attn_mask.dtype)
        return (
            dq.reshape(query.shape).to(query.dtype),  # (B, Hq, L, E)
            dk.to(key.dtype),  # (B, Hkv, S, E)
            dv.to(value.dtype),  # (B, Hkv, S, Ev)
            dmask,
            None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------------


def _flash_core(query, key, value, attn_mask, dropout_p, is_causal, scale, *, BLOCK_M, BLOCK_N):
    """The 4-D core (see :func:`attention_lib._checks.sdpa_inputs`): (B, Hq, L, Ev)."""
    return _FlashAttention.apply(query, key, value, attn_mask, is_causal, scale, BLOCK_M, BLOCK_N)



def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    block_q: int = 128,
    block_k: int = 128,
) -> torch.Tensor:
    """Exact attention by FlashAttention-2's tiled algorithm, in plain PyTorch.

    Same signature and semantics as ``torch.nn.functional.scaled_dot_product_attention``,
    and the same accepted inputs (rank >= 2, broadcast batch, zero sizes, ``CausalBias``):
    see :mod:`attention_lib._checks`.

    Args:
        query: (..., Hq, L, E).
        key: (..., Hkv, S, E); ``Hkv == Hq`` or 1, or ``Hq % Hkv == 0`` with ``enable_gqa``.
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S); bool (True = may attend) or an
            additive float mask (which gets a gradient if it requires one). Tiles in
            which every element is masked are skipped.
        dropout_p: must be 0: this implementation has no attention dropout.
        is_causal: top-left causal mask; tiles above the diagonal are skipped.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq`` (grouped-query attention).
        block_q: ``BLOCK_M``, queries per tile.
        block_k: ``BLOCK_N``, keys per tile.

    Returns:
        (..., Hq, L, Ev), in the inputs' dtype (tiles are computed in float32 for
        half-precision inputs). Rows whose keys are all masked give 0, with gradient 0.

    Raises:
        ValueError: on malformed inputs, non-positive block sizes, or ``dropout_p > 0``.
    """
    BLOCK_M, BLOCK_N = check_positive_int("block_q", block_q), check_positive_int("block_k", block_k)
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_no_dropout("flash_attention", args.dropout_p)
    return args.run(_flash_core, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
