"""Split-K attention, the idea of Flash-Decoding (Dao et al. 2023), chapter 13.

A FlashAttention kernel gives each (batch, head, block of queries) to one worker (a
streaming multiprocessor on a GPU) and lets it loop over all the keys. When decoding,
there is one query per sequence and head, so there are only ``B · H`` work items;
with a small batch that is fewer than the GPU has workers, and most of the chip
waits while a few of them walk through a long cache.

Flash-Decoding also splits the *keys* of each query into ``num_splits`` parts. Each
part is an independent work item that returns its partial output and its
log-sum-exp, ``(o_s, lse_s)`` (:func:`attention_lib.attention_block`); a second, small
step merges them with the online-softmax rule (:func:`attention_lib.merge_attention`)::

    keys:   [ split 0 | split 1 | split 2 | split 3 ]      work items: B · H · num_splits
              (o_0,l_0)  (o_1,l_1)  (o_2,l_2)  (o_3,l_3)
                    \\      /            \\      /
                 merge(0, 1)          merge(2, 3)           the merge is associative:
                          \\            /                   a tree of log2(num_splits) rounds
                           merge(all)  ->  o

The result is exact: the same attention, computed in a different order. Here the
splits are computed together as one batched operation (a split dimension next to
the heads), which is what the parallel work items do on a GPU.
"""

from __future__ import annotations

import torch

from ._checks import check_no_dropout, check_positive_int, compute_dtype, sdpa_inputs
from .online_softmax import attention_block, merge_attention

__all__ = ["split_k_attention", "split_bounds", "merge_splits"]


def split_bounds(S: int, num_splits: int) -> list[int]:
    """Where the keys are cut: ``num_splits + 1`` offsets, ``bounds[s] = s · S // num_splits``.

    The splits' sizes differ by at most one. With ``num_splits > S`` some splits are
    empty (they contribute ``lse = -inf``, ``o = 0``, and nothing to the merge).

    >>> split_bounds(7, 3)
    [0, 2, 4, 7]
    """
    num_splits = check_positive_int("num_splits", num_splits)
    if isinstance(S, bool) or not isinstance(S, int) or S < 0:
        raise ValueError(f"S (the number of keys) must be a non-negative int, got {S!r}")
    return [s * S // num_splits for s in range(num_splits + 1)]


def merge_splits(o: torch.Tensor, lse: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results along the split dimension ``dim``, as a tree of pairwise merges.

    Args:
        o: (..., n, ..., L, Dv) partial outputs, split dimension ``dim``.
        lse: their log-sum-exps, ``o``'s shape without the last dimension.
        dim: the split dimension of ``lse`` (a non-negative index, also valid for ``o``).

    Returns:
        ``(o, lse)`` with the split dimension removed.
    """
    while o.shape[dim] > 1:
        n = o.shape[dim]
        half = n // 2
        o_a, o_b = o.narrow(dim, 0, half), o.narrow(dim, half, half)
        lse_a, lse_b = lse.narrow(dim, 0, half), lse.narrow(dim, half, half)
        o_m, lse_m = merge_attention(o_a, lse_a, o_b, lse_b)  # one round: half the partials
        if n % 2:  # the odd one out waits for the next round
            o_m = torch.cat([o_m, o.narrow(dim, n - 1, 1)], dim=dim)
            lse_m = torch.cat([lse_m, lse.narrow(dim, n - 1, 1)], dim=dim)
        o, lse = o_m, lse_m
    return o.squeeze(dim), lse.squeeze(dim)


def _split_k_core(query, key, value, attn_mask, dropout_p, is_causal, scale, *, num_splits):
    """The 4-D core: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev),
    non-empty; returns (B, Hq, L, Ev)."""
    B, Hq, L, E = query.shape
    Hkv, S, Ev = key.shape[1], key.shape[2], value.shape[-1]
    n_rep, n = Hq // Hkv, num_splits
    acc_dtype = compute_dtype(query.dtype)
    bounds = split_bounds(S, n)
    width = -(-S // n)  # the largest split
    # Key index of slot c of split s, and whether that slot holds a key of the split.
    start = torch.tensor(bounds[:-1], device=query.device).view(n, 1)  # (n, 1)
    stop = torch.tensor(bounds[1:], device=query.device).view(n, 1)
    idx = start + torch.arange(width, device=query.device).view(1, width)  # (n, width)
    valid = idx < stop  # (n, width)
    idx = idx.clamp(max=S - 1)

    q6 = query.reshape(B, Hkv, n_rep, 1, L, E).to(acc_dtype)  # (B, Hkv, n_rep, 1, L, E): split dim broadcast
    if S % n == 0:  # equal splits: a view of the keys, no copy
        k6 = key.to(acc_dtype).reshape(B, Hkv, 1, n, width, E)  # (B, Hkv, 1, n, width, E)
        v6 = value.to(acc_dtype).reshape(B, Hkv, 1, n, width, Ev)
    else:  # splits of width and width - 1 keys: gather them into (n, width) slots
        k6 = key.to(acc_dtype)[:, :, idx].unsqueeze(2)  # (B, Hkv, 1, n, width, E)
        v6 = value.to(acc_dtype)[:, :, idx].unsqueeze(2)  # (B, Hkv, 1, n, width, Ev)

    allowed = valid.view(n, 1, width)  # (n, 1, width)
    if is_causal:  # top-left, as is_causal in SDPA: query i sees keys j <= i
        q_idx = torch.arange(L, device=query.device).view(1, L, 1)
        allowed = allowed & (q_idx >= idx.view(n, 1, width))  # (n, L, width)
    bias = None
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        b, h = m.shape[:2]
        m = m.unsqueeze(2) if h == 1 else m.reshape(b, Hkv, n_rep, *m.shape[2:])  # (b, Hkv|1, n_rep|1, L|1, S|1)
        m = m[..., idx] if m.shape[-1] != 1 else m.unsqueeze(-2)  # (..., L|1, n, width) or (..., L|1, 1, 1)
        m = m.transpose(-3, -2)  # (b, Hkv|1, n_rep|1, n|1, L|1, width|1)
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            bias = m.to(acc_dtype)
    # Every split at once: (B, Hkv, n_rep, n, L, Ev) partial outputs, (..., n, L) log-sum-exps.
    o, lse = attention_block(q6, k6, v6, scale, allowed, bias)
    out, _ = merge_splits(o, lse, dim=3)  # (B, Hkv, n_rep, L, Ev)
    return out.reshape(B, Hq, L, Ev).to(query.dtype)


def split_k_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    num_splits: int = 4,
) -> torch.Tensor:
    """Exact attention with the keys of every query split into ``num_splits`` parts (Flash-Decoding).

    Same signature and semantics as ``torch.nn.functional.scaled_dot_product_attention``,
    and the same accepted inputs (rank >= 2, broadcast batch, zero sizes, ``CausalBias``):
    see :mod:`attention_lib._checks`.

    Args:
        query: (..., Hq, L, E); decoding has L = 1.
        key: (..., Hkv, S, E); ``Hkv == Hq`` or 1, or ``Hq % Hkv == 0`` with ``enable_gqa``.
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S); bool (True = may attend) or an
            additive float mask.
        dropout_p: must be 0: this function does not implement attention dropout.
        is_causal: top-left causal mask, as in SDPA (for new queries after a cache, pass
            a bottom-right mask such as :func:`attention_lib.cache_causal_mask` instead).
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq`` (grouped-query attention).
        num_splits: parts of the keys, cut by :func:`split_bounds` (sizes differ by at
            most one); more splits than keys leave some empty, which is allowed.

    Returns:
        (..., Hq, L, Ev), in the inputs' dtype. Rows whose keys are all masked, and
        splits whose keys are all masked, contribute 0 (never NaN).

    Raises:
        ValueError: on malformed inputs, a non-positive ``num_splits``, or ``dropout_p > 0``.
    """
    num_splits = check_positive_int("num_splits", num_splits)
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_no_dropout("split_k_attention", args.dropout_p)
    return args.run(_split_k_core, num_splits=num_splits)
