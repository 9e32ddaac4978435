"""Numerically stable softmax (chapter 3).

``softmax(x) = exp(x - max(x)) / sum(exp(x - max(x)))``: subtracting the row maximum
leaves the result unchanged (it cancels in the ratio) but keeps every exponent <= 0,
so nothing overflows. Half-precision inputs are computed in float32 and cast back,
as PyTorch does.

A row whose entries are all ``-inf`` (every key masked) gives all zeros, not NaN:
that is the convention of ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch

from ._checks import accumulation_dtype

__all__ = ["softmax", "naive_softmax", "logsumexp"]


def naive_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The textbook formula ``exp(x) / sum(exp(x))``. Overflows for large inputs:
    kept only to show why :func:`softmax` subtracts the max (chapter 3)."""
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Stable softmax along ``dim``; rows that are all ``-inf`` give 0.

    Args:
        x: scores of any shape, e.g. (B, H, L, S) with ``dim=-1``.
        dim: the dimension that sums to 1.

    Returns:
        A tensor of ``x``'s shape and dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"softmax expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    xc = x.to(accumulation_dtype(x.dtype))
    # The max only shifts the exponent; detaching it keeps its (exactly cancelling)
    # gradient out of autograd. A row of -inf has max -inf: shift it by 0 instead.
    m = xc.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(xc - m)  # every exponent <= 0: no overflow
    denom = e.sum(dim=dim, keepdim=True)
    # denom == 0 only for fully masked rows, where e == 0 too: output 0, gradient 0.
    out = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(x.dtype)


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Stable ``log(sum(exp(x)))`` along ``dim``; ``-inf`` for a row of ``-inf``.

    ``softmax(x) = exp(x - logsumexp(x))``; FlashAttention saves exactly this
    per-row statistic for its backward pass.
    """
    xc = x.to(accumulation_dtype(x.dtype))
    m = xc.amax(dim=dim, keepdim=True).detach()
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = m_safe + torch.log(torch.exp(xc - m_safe).sum(dim=dim, keepdim=True))
    if not keepdim:
        out = out.squeeze(dim)
    return out.to(x.dtype)
