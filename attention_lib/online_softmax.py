"""The online-softmax merge rule (Milakov & Gimelshein 2018), shared by every
variant that sees the keys one block at a time: chunked attention, FlashAttention
and ring attention.

Attention over keys split into blocks A and B can be computed per block and merged.
For one query row, with ``lse = log Σ exp(scores)`` over a block and ``o`` the
softmax-weighted average of that block's values,

    lse = log(exp(lse_A) + exp(lse_B))
    o   = exp(lse_A - lse) · o_A + exp(lse_B - lse) · o_B

A block in which every key is masked has ``lse = -inf`` and ``o = 0``; it then
contributes nothing, and a row masked in every block stays at ``o = 0``.
"""

from __future__ import annotations

import torch

from ._checks import accumulation_dtype

__all__ = ["attention_block", "merge_attention"]


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))``, -inf when both are -inf, with a NaN-free gradient
    (``torch.logaddexp``'s backward gives NaN at (-inf, -inf))."""
    m = _finite_or_zero(torch.maximum(a, b))
    total = torch.exp(a - m) + torch.exp(b - m)
    return torch.where(total > 0, m + torch.log(torch.where(total > 0, total, torch.ones_like(total))), float("-inf"))


def attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over one block of keys, with its log-sum-exp.

    Args:
        q: (..., Lq, D).
        k: (..., Lk, D).
        v: (..., Lk, Dv).
        scale: multiplies the scores.
        allowed: optional bool mask broadcastable to (..., Lq, Lk), True = may attend.
        bias: optional additive float mask broadcastable to (..., Lq, Lk), added to the
            scaled scores (``-inf`` masks a key).

    Returns:
        ``(o, lse)``: o (..., Lq, Dv) in ``q``'s dtype, and lse (..., Lq) in float32
        (float64 for float64 inputs). Fully masked rows give ``o = 0``, ``lse = -inf``.
    """
    acc_dtype = accumulation_dtype(q.dtype)
    # Low precision is computed in float32 (q·k of float16 inputs overflows easily).
    # The (Lq, Lk) block is the only large tensor here: touch it as few times as
    # possible. Scale the (smaller) queries instead of the scores, and apply the mask,
    # the shift and exp in place. In-place is safe under autograd: none of these ops
    # saves the scores it overwrites.
    s = (q.to(acc_dtype) * scale) @ k.to(acc_dtype).transpose(-2, -1)  # (..., Lq, Lk)
    if bias is not None:
        bias = bias.to(acc_dtype)
        s = s.add_(bias) if torch.broadcast_shapes(s.shape, bias.shape) == s.shape else s + bias
    if allowed is not None:
        s = s.masked_fill_(~allowed, float("-inf")) if torch.broadcast_shapes(s.shape, allowed.shape) == s.shape else s.masked_fill(~allowed, float("-inf"))
    # The running max only shifts the exponent; its gradient cancels exactly, so it is
    # detached. 0 for a fully masked row.
    m = _finite_or_zero(s.detach().amax(dim=-1, keepdim=True))  # (..., Lq, 1)
    p = s.sub_(m).exp_()  # (..., Lq, Lk)
    l = p.sum(dim=-1, keepdim=True)  # (..., Lq, 1)
    o = (p @ v.to(acc_dtype)) / torch.where(l > 0, l, torch.ones_like(l))  # (..., Lq, Dv)
    # log(0) = -inf for fully masked rows, written so that the backward has no 0/0
    lse = torch.where(l > 0, m + torch.log(torch.where(l > 0, l, torch.ones_like(l))), float("-inf"))
    lse = lse.squeeze(-1)  # (..., Lq)
    return o.to(q.dtype), lse


def merge_attention(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key blocks.

    Args:
        o_a, o_b: (..., L, Dv) outputs, each normalised over its own block.
        lse_a, lse_b: (..., L) log-sum-exp of the scores of each block.

    Returns:
        ``(o, lse)`` as if attention had been computed over both blocks at once.
    """
    lse = _logaddexp(lse_a, lse_b)  # (..., L)
    lse_safe = _finite_or_zero(lse)
    w_a = torch.exp(lse_a - lse_safe).unsqueeze(-1)  # (..., L, 1); 0 where lse_a = -inf
    w_b = torch.exp(lse_b - lse_safe).unsqueeze(-1)
    o = w_a * o_a.to(w_a.dtype) + w_b * o_b.to(w_b.dtype)
    return o.to(o_a.dtype), lse
