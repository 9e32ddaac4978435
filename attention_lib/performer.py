"""Performer attention: FAVOR+ (Choromanski et al. 2021), chapter 12.

Softmax attention weighs value ``j`` for query ``i`` by the *softmax kernel*
``SM(q, k) = exp(qᵀk)`` (after the queries are multiplied by the scale). FAVOR+
writes that kernel as an expectation over Gaussian vectors ``w ~ N(0, I_D)``,

    exp(qᵀk) = E_w[ exp(wᵀq - |q|²/2) · exp(wᵀk - |k|²/2) ],

and estimates it with ``m`` samples ``w_1..w_m`` (the rows of a *projection*):

    φ(x) = exp(Wx - |x|²/2) / √m      (m positive features),    φ(q)ᵀφ(k) ≈ exp(qᵀk).

The estimate is unbiased and, unlike the sin/cos features of random Fourier
features, every feature is positive, so the estimated weights and their sum are
positive too, and its relative error is smallest where the kernel is small (where
most of attention's weights are). Drawing the ``w_r`` in blocks of ``D`` mutually
orthogonal vectors, with norms drawn as those of Gaussian vectors (chi with ``D``
degrees of freedom), keeps each ``w_r ~ N(0, I)`` (so it stays unbiased) and lowers
the variance: :func:`orthogonal_gaussian`.

With the features, attention is linear attention (chapter 10) with ``φ`` as the
feature map: ``out = φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1)``, in ``O(L·m·Dv)``, causal
through prefix sums. :func:`performer_attention` computes the features and hands
them to :func:`attention_lib.linear.linear_attention`.

Numerical stabilisation: ``exp(wᵀx - |x|²/2)`` overflows for large ``wᵀx``. Any
factor common to a query's features, or to *all* keys' features, cancels between
numerator and denominator, so the queries are shifted by their own row maximum and
the keys by one maximum over all keys of a head (the paper's code does the same).
"""

from __future__ import annotations

import math
import numbers

import torch

from ._checks import _shape, check_attention_args, check_positive_int, resolve_scale
from .linear import linear_attention

__all__ = ["favor_features", "orthogonal_gaussian", "performer_attention"]

STABILIZERS = (None, "row", "all")


def orthogonal_gaussian(
    m: int,
    d: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """``m`` Gaussian vectors in ``d`` dimensions, orthogonal in blocks of ``d``.

    Each block of ``d`` rows is a random orthonormal basis (QR of a Gaussian matrix,
    signs fixed so that it is uniform over rotations) whose rows are then scaled by
    the norms of independent ``N(0, I_d)`` vectors (chi-distributed with ``d``
    degrees of freedom). Each row is therefore marginally ``N(0, I_d)``, as in iid
    sampling, but the rows of a block are exactly orthogonal. The last block is cut
    to ``m mod d`` rows.

    Args:
        m: the number of vectors (features), >= 1.
        d: their dimension, >= 1.
        generator: the random source (``None``: PyTorch's global one).

    Returns:
        (m, d) in ``dtype`` (drawn in float64).
    """
    m = check_positive_int("m", m)
    d = check_positive_int("d", d)
    n_blocks = -(-m // d)
    g = torch.randn(n_blocks, d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)  # (n_blocks, d, d): orthonormal columns
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))  # (n_blocks, d)
    q = q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)  # uniform over rotations (Haar)
    norms = torch.randn(n_blocks, d, d, generator=generator, dtype=torch.float64).norm(dim=-1)  # chi(d)
    blocks = q.transpose(-2, -1) * norms.unsqueeze(-1)  # (n_blocks, d, d): row r of a block has norm norms[r]
    return blocks.reshape(n_blocks * d, d)[:m].to(dtype=dtype, device=device)  # (m, d)


def favor_features(
    x: torch.Tensor,
    projection: torch.Tensor,
    *,
    stabilizer: str | None = None,
) -> torch.Tensor:
    """FAVOR+ positive random features ``φ(x) = exp(Wx - |x|²/2) / √m``.

    ``E[φ(x)ᵀφ(y)] = exp(xᵀy)`` when the rows of ``W`` are ``N(0, I)``.

    Args:
        x: (..., L, D) queries or keys, already multiplied by the square root of
            the attention scale.
        projection: (m, D), the random vectors ``w_r`` as rows.
        stabilizer: ``None`` (the exact features), ``"row"`` (divide each row by
            its largest feature: for queries) or ``"all"`` (divide by the largest
            feature over dims -2 and -1: for the keys of one head). Both factors
            cancel in attention; only ``None`` keeps the kernel estimate itself.

    Returns:
        (..., L, m), positive (or 0 where ``exp`` underflows), in ``x``'s dtype.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(projection, torch.Tensor):
        raise ValueError("x and projection must be tensors")
    if projection.dim() != 2 or x.dim() < 1 or projection.shape[1] != x.shape[-1]:
        raise ValueError(
            f"projection must have shape (m, D) with D = x.shape[-1]; got projection "
            f"{_shape(projection)} and x {_shape(x)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if stabilizer not in STABILIZERS:
        raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")
    m = projection.shape[0]
    wx = x @ projection.to(x.dtype).T  # (..., L, m)
    logits = wx - 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (..., L, m): log of √m·φ(x)
    if logits.numel() == 0:  # no rows (or no features): nothing to shift
        pass
    elif stabilizer == "row":
        logits = logits - logits.amax(dim=-1, keepdim=True)
    elif stabilizer == "all":
        logits = logits - logits.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(logits) / math.sqrt(m)


def performer_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    num_features: int | None = None,
    projection: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    orthogonal: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Softmax attention estimated with FAVOR+ random features, in O(L·m·Dv).

    SDPA's signature; ``attn_mask`` and ``dropout_p`` must keep their defaults
    (the ``L × S`` weights are never formed). An unbiased estimate of the kernel
    ``exp(scale·qᵀk)``, not of the output: the ratio of two estimates has a small
    bias that shrinks like ``1/m``.

    Args:
        query: (B, Hq, L, D).
        key: (B, Hkv, S, D).
        value: (B, Hkv, S, Dv).
        is_causal: top-left causal, by prefix sums (:func:`linear_attention`).
        scale: the softmax scale (default ``1/√D``); the features see
            ``√|scale|·q`` and ``√|scale|·k`` (the sign goes to the queries).
        enable_gqa: allow ``Hq % Hkv == 0``.
        num_features: ``m``, the number of random features (keyword-only); default
            ``projection.shape[0]`` if a projection is given, else ``round(D·ln D)``
            (at least ``D``), the paper's choice.
        projection: (m, D) random vectors to use (e.g. from
            :func:`orthogonal_gaussian`); drawn from ``generator`` if None.
        generator: the random source for drawing a projection.
        orthogonal: draw block-orthogonal vectors (FAVOR+) rather than iid ones.
        eps: added to the denominator (as in :func:`linear_attention`).
        chunk_size: chunk length of the causal prefix sums.

    Returns:
        (B, Hq, L, Dv) in the inputs' dtype (features in float32 for 16-bit inputs).
    """
    check_attention_args(query, key, value, None, 0.0, is_causal, None, enable_gqa)
    if attn_mask is not None:
        raise ValueError(
            "performer_attention cannot apply an arbitrary attn_mask (it never forms the "
            f"L × S weights); got a mask of shape {_shape(attn_mask)}. Use is_causal=True."
        )
    if dropout_p != 0.0:
        raise ValueError(f"performer_attention has no attention weights to drop: dropout_p must be 0, got {dropout_p!r}")
    D = query.shape[-1]
    s = resolve_scale(scale, D)
    if projection is not None:
        if not isinstance(projection, torch.Tensor) or projection.dim() != 2 or projection.shape[1] != D:
            raise ValueError(
                f"projection must be a tensor of shape (num_features, D) = (m, {D}); got "
                f"{_shape(projection) if isinstance(projection, torch.Tensor) else type(projection).__name__}"
            )
        if num_features is not None and num_features != projection.shape[0]:
            raise ValueError(
                f"num_features={num_features!r} disagrees with the projection's {projection.shape[0]} rows"
            )
    else:
        num_features = max(D, round(D * math.log(D))) if num_features is None else check_positive_int("num_features", num_features)
        if orthogonal:
            projection = orthogonal_gaussian(num_features, D, generator, device=query.device)
        else:
            projection = torch.randn(num_features, D, generator=generator, dtype=torch.float64).float()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")

    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    root = math.sqrt(abs(s))
    q = query.to(acc) * (root if s >= 0 else -root)  # (B, Hq, L, D)
    k = key.to(acc) * root  # (B, Hkv, S, D)
    w = projection.to(device=query.device, dtype=acc)  # (m, D)
    fq = favor_features(q, w, stabilizer="row")  # (B, Hq, L, m)
    fk = favor_features(k, w, stabilizer="all")  # (B, Hkv, S, m): one shift per head
    out = linear_attention(
        fq, fk, value.to(acc), is_causal=is_causal, enable_gqa=enable_gqa,
        feature_map=_identity, eps=eps, chunk_size=chunk_size,
    )  # (B, Hq, L, Dv)
    return out.to(query.dtype)


def _identity(x: torch.Tensor) -> torch.Tensor:
    """The features are computed already: linear attention uses them as they are."""
    return x
