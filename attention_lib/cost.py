"""The cost model of attention: the FLOPs it does and the bytes it must move (chapter 18).

:func:`flops` counts exact attention as FlashAttention's benchmarks do (``4·B·H·Lq·Lk·D``
forward, half of it causal, ×2.5 backward); :func:`linear_flops` counts linear
attention's own matmuls; :func:`attention_bytes` is the compulsory memory traffic of a
forward pass, with or without the score matrix in main memory. Their ratio is the
arithmetic intensity that places a kernel on the roofline. Pure arithmetic: nothing
here runs attention or times anything (that is :mod:`attention_lib.bench`).
"""

from __future__ import annotations

import torch

__all__ = ["flops", "linear_flops", "performer_flops", "attention_bytes"]


def flops(
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    D: int,
    *,
    causal: bool = False,
    mode: str = "fwd",
    window: int | None = None,
) -> float:
    """Floating-point operations of attention, as FlashAttention's benchmarks count them.

    The forward pass is two matmuls, ``S = Q Kᵀ`` (``2·Lq·Lk·D`` per head) and
    ``O = P V`` (the same again): ``4·B·H·Lq·Lk·D``. Causal attention does half of that;
    the backward pass does five matmuls to the forward's two, so ×2.5.

    Args:
        B, H: batch size and number of (query) heads.
        Lq, Lk: query and key lengths.
        D: head dimension.
        causal: halve the count (FlashAttention's convention, not ``L(L+1)/2``).
        mode: ``"fwd"``, ``"bwd"`` or ``"fwd_bwd"`` (×1, ×2.5, ×3.5).
        window: count only the (query, key) pairs inside a sliding window of this many
            keys: the causal band ``i - window < j <= i``, or with ``causal=False`` the
            symmetric band ``|i - j| < window``. The count is exact, not halved.

    Returns:
        The number of FLOPs (a float).
    """
    if mode not in ("fwd", "bwd", "fwd_bwd"):
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
    if window is None:
        pairs = Lq * Lk / (2 if causal else 1)
    else:
        i = torch.arange(Lq, dtype=torch.int64)
        lo = (i - window + 1).clamp(min=0)
        hi = i if causal else (i + window - 1).clamp(max=Lk - 1)
        pairs = float((hi.clamp(max=Lk - 1) - lo + 1).clamp(min=0).sum())
    f = 4.0 * B * H * D * pairs
    return {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode] * f


def linear_flops(
    B: int, H: int, Lq: int, Lk: int, D: int, *, causal: bool = False, mode: str = "fwd", chunk_size: int = 64,
    feature_dim: int | None = None,
) -> float:
    """Matmul FLOPs of :func:`attention_lib.linear_attention`, counted as :func:`flops` counts them.

    Not causal: ``φ(K)ᵀV`` (``2·Lk·D²`` per head) and ``φ(Q)(φ(K)ᵀV)`` (``2·Lq·D²``).
    Causal, in chunks of ``C = chunk_size``: the masked ``C × C`` scores and their
    product with ``V`` inside each chunk (``4·Lq·C·D``, the whole chunk is computed),
    plus one ``D × D`` state per chunk, built and applied (``4·Lq·D²``). The
    normalisers and feature maps are left out, as the softmax is for exact
    attention. The backward pass of a matmul costs twice its forward (no
    recomputation here), so ``fwd_bwd`` is ×3 and ``bwd`` ×2.

    Counting linear attention with the exact-attention formula would credit it with
    work it never does (a "fraction of peak" above 1 on a CPU).

    ``feature_dim``: the size ``m`` of the features ``φ(x)`` when it is not ``D``
    (Performer's random features): each ``D²`` above is then ``m·D`` (a state is
    ``m × D``) and the chunk's scores cost ``2·Lq·C·m`` instead of ``2·Lq·C·D``.
    """
    if mode not in ("fwd", "bwd", "fwd_bwd"):
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
    m = D if feature_dim is None else feature_dim
    if causal:
        C = min(chunk_size, Lq)
        n = -(-Lq // C)
        f = 2.0 * n * C * C * (m + D) + 4.0 * n * C * m * D
    else:
        f = 2.0 * Lk * m * D + 2.0 * Lq * m * D
    return {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}[mode] * B * H * f


def performer_flops(
    B: int, H: int, Lq: int, Lk: int, D: int, *, causal: bool = False, mode: str = "fwd", num_features: int = 256,
    chunk_size: int = 64,
) -> float:
    """Matmul FLOPs of :func:`attention_lib.performer_attention` with ``m = num_features``.

    The features, ``W q`` and ``W k`` with ``W`` of shape ``m × D``: ``2·(Lq + Lk)·m·D``
    per head; then linear attention on ``m``-dimensional features
    (:func:`linear_flops` with ``feature_dim=m``). The exponentials and the
    stabilising maxima are left out, as the softmax is for exact attention. Backward:
    ×2 for every matmul, as in :func:`linear_flops`.
    """
    if mode not in ("fwd", "bwd", "fwd_bwd"):
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
    features = 2.0 * (Lq + Lk) * num_features * D * B * H * {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}[mode]
    return features + linear_flops(B, H, Lq, Lk, D, causal=causal, mode=mode, chunk_size=chunk_size,
                                   feature_dim=num_features)


def attention_bytes(
    B: int, H: int, Lq: int, Lk: int, D: int, *, element_size: int = 2, scores_in_memory: bool = True
) -> float:
    """Bytes a forward pass must move to and from main memory, in a simple model.

    ``Q``, ``K``, ``V`` are read and ``O`` written once: ``(2·Lq + 2·Lk)·D`` elements per
    head. With ``scores_in_memory`` (naive attention), the ``Lq × Lk`` score matrix is
    written and read back, and so are the probabilities: ``4·Lq·Lk`` elements more.
    A tiled kernel (FlashAttention) keeps them on chip, so ``scores_in_memory=False``.
    This is the compulsory traffic; a real kernel re-reads ``K`` and ``V`` once per
    query tile, from the L2 cache if it is lucky.
    """
    elems = (2 * Lq + 2 * Lk) * D + (4 * Lq * Lk if scores_in_memory else 0)
    return float(B * H * elems * element_size)
