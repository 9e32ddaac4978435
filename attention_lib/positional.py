"""Position encodings (chapter 7): sinusoidal (Vaswani et al. 2017) and rotary
(RoPE, Su et al. 2021).

Attention is permutation-equivariant: shuffle the keys and values together and the
output does not change. Order has to be put in by hand.

* **Sinusoidal** encodings are *added* to the token embeddings once, at the input::

      PE[pos, 2i]     = sin(pos · ω_i)
      PE[pos, 2i + 1] = cos(pos · ω_i),      ω_i = base^(-2i / d)

* **Rotary** embeddings *rotate* each query and key inside every attention layer.
  The feature pairs ``(x[2i], x[2i+1])`` of a vector at position ``m`` turn by the
  angle ``m · ω_i``. A rotation keeps norms, and ``R(m)ᵀ R(n) = R(n - m)``, so the
  score ``(R(m) q) · (R(n) k) = q · R(n - m) k`` depends on the positions only
  through the offset ``n - m``.

Pairs are adjacent features ``(2i, 2i+1)``, as in the RoFormer paper. Some codebases
(GPT-NeoX, Hugging Face LLaMA) pair feature ``i`` with ``i + d/2`` instead: the same
idea with the features permuted, so weights are not interchangeable between the two.
"""

from __future__ import annotations

import torch

from ._checks import accumulation_dtype

__all__ = ["sinusoidal_encoding", "rotary_angles", "apply_rotary"]


def _check_even_dim(dim: int, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2 != 0:
        raise ValueError(f"{name} must be a positive even int (features come in pairs), got {dim!r}")
    return dim


def _frequencies(dim: int, base: float, device=None) -> torch.Tensor:
    """ω_i = base^(-2i/d) for i = 0 .. d/2 - 1, in float64: (dim/2,)."""
    if not base > 1.0:
        raise ValueError(f"base must be > 1, got {base!r}")
    two_i = torch.arange(0, dim, 2, dtype=torch.float64, device=device)  # (d/2,)
    return base ** (-two_i / dim)  # (d/2,)


def _positions(positions, length: int | None, device) -> torch.Tensor:
    """Integer or float positions as a 1-D float64 tensor: (L,)."""
    if positions is None:
        if length is None:
            raise ValueError("give positions or a length")  # internal: the callers pass one of them
        return torch.arange(length, dtype=torch.float64, device=device)  # (L,)
    positions = torch.as_tensor(positions, device=device)
    if positions.dim() != 1 or positions.dtype == torch.bool:
        raise ValueError(
            f"positions must be a 1-D tensor of shape (L,), got dtype {positions.dtype} "
            f"and shape {tuple(positions.shape)}"
        )
    if length is not None and positions.shape[0] != length:
        raise ValueError(f"positions has length {positions.shape[0]}, but the input has L = {length}")
    return positions.to(torch.float64)


def sinusoidal_encoding(
    num_positions: int,
    dim: int,
    *,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The sinusoidal position encoding of "Attention Is All You Need" (section 3.5).

    ``PE[pos, 2i] = sin(pos / base^(2i/d))`` and ``PE[pos, 2i+1] = cos(pos / base^(2i/d))``.
    Add it to token embeddings of shape (B, L, dim): ``x + sinusoidal_encoding(L, dim)``.

    Args:
        num_positions: L, the number of positions 0 .. L-1.
        dim: d, the embedding width; must be even.
        base: the wavelength scale (10000 in the paper); wavelengths run from 2π
            to ``base · 2π``.
        dtype, device: of the result (computed in float64, then cast).

    Returns:
        (L, dim).

    Raises:
        ValueError: if ``dim`` is not a positive even int, ``num_positions`` is
            negative, or ``base <= 1``.
    """
    dim = _check_even_dim(dim, "dim")
    if isinstance(num_positions, bool) or not isinstance(num_positions, int) or num_positions < 0:
        raise ValueError(f"num_positions must be a non-negative int, got {num_positions!r}")
    angles = rotary_angles(num_positions, dim, base=base, device=device)  # (L, d/2), float64
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (L, d/2, 2): sin, cos per pair
    return pe.reshape(num_positions, dim).to(dtype)  # (L, d): sin at 2i, cos at 2i+1


def rotary_angles(
    positions: int | torch.Tensor,
    dim: int,
    *,
    base: float = 10000.0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The angles ``pos · ω_i`` shared by both encodings, in float64.

    Args:
        positions: an int L (positions 0 .. L-1) or a 1-D tensor of positions (L,).
        dim: d, the feature width; must be even.
        base: ω_i = ``base^(-2i/d)``.

    Returns:
        (L, dim/2) in float64: row ``pos``, column ``i`` holds ``pos · ω_i``.
    """
    dim = _check_even_dim(dim, "dim")
    if isinstance(positions, int) and not isinstance(positions, bool):
        pos = _positions(None, positions, device)  # (L,)
    else:
        pos = _positions(positions, None, device)  # (L,)
    return pos[:, None] * _frequencies(dim, base, pos.device)[None, :]  # (L, d/2)


def apply_rotary(
    x: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    base: float = 10000.0,
) -> torch.Tensor:
    """Rotary position embedding (RoPE): rotate each feature pair of ``x`` by ``pos · ω_i``.

    Apply it to queries and keys (not values) after their projections and before
    the scores: ``attn(apply_rotary(q), apply_rotary(k), v)``. For a pair
    ``(a, b) = (x[..., 2i], x[..., 2i+1])`` at position ``pos`` and ``θ = pos · ω_i``::

        a' = a cos θ - b sin θ
        b' = a sin θ + b cos θ

    Args:
        x: (..., L, D), e.g. (B, H, L, D); D must be even.
        positions: (L,) positions of the L rows, default ``0 .. L-1``. Pass
            ``offset + arange(L)`` for new tokens after a KV cache of length ``offset``.
        base: ω_i = ``base^(-2i/D)``.

    Returns:
        Same shape and dtype as ``x``. The angles are computed in float64 and the
        rotation in float32 (or float64 for float64 inputs).

    Raises:
        ValueError: if ``x`` has fewer than 2 dimensions, an odd last dimension, or
            ``positions`` is not a 1-D tensor of length L.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (..., L, D), got {getattr(x, 'shape', type(x))}")
    L, D = x.shape[-2:]
    _check_even_dim(D, f"the last dimension of x (shape {tuple(x.shape)})")
    pos = _positions(positions, L, x.device)  # (L,)
    angles = rotary_angles(pos, D, base=base)  # (L, D/2)
    work = accumulation_dtype(x.dtype)
    cos, sin = angles.cos().to(work), angles.sin().to(work)  # (L, D/2) each
    pairs = x.to(work).unflatten(-1, (D // 2, 2))  # (..., L, D/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]  # (..., L, D/2) each
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (..., L, D/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (..., L, D)
