"""Quantised KV caches at 8, 4 and 2 bits (chapter 14).

Chapter 11's int8 cache follows KIVI (Liu et al. 2024): keys get one scale per
*channel* (over a group of tokens), values one per *token*. This module generalises
it so that designs can be compared on equal terms:

* :func:`quantize` / :func:`dequantize`: uniform scalar quantisation with one scale
  per slice, symmetric (``x ≈ s · code``, codes ``-qmax..qmax``) or asymmetric
  (``x ≈ z + s · code``, codes ``0..2^b - 1``, KIVI's choice); every entry is within
  ``s / 2`` of its dequantised value. Codes are **bit-packed** into uint8, ``8 / b``
  per byte, so that the memory of a 2-bit cache really is a quarter of int8's.
* :func:`random_rotation`: a random orthogonal matrix ``R`` (a randomised Hadamard
  transform, or the Q of a Gaussian matrix). Rotating queries and keys by the same
  ``R`` leaves every score unchanged, ``(q R)·(k R) = q·k``, but spreads an outlier
  channel over all coordinates before they are quantised. This is the idea behind
  QuaRot (Ashkboos et al. 2024) and the first step of TurboQuant (Zandieh et al. 2025);
  both add more (QuaRot folds the rotations into the weights, TurboQuant uses an
  optimal scalar quantiser and a 1-bit correction of inner products).
* :class:`QuantizedKVCache`: a cache with any of these designs and exact byte
  accounting; :func:`bytes_per_token` is its formula.
* :func:`attention_errors`: what a quantised cache costs where attention uses it:
  on the scores, on the attention weights and on the output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import _shape, check_positive_int

__all__ = [
    "Quantized",
    "quantize",
    "dequantize",
    "pack_bits",
    "unpack_bits",
    "fake_quantize",
    "random_rotation",
    "bytes_per_token",
    "QuantizedKVCache",
    "attention_errors",
]

BITS = (2, 4, 8)  # widths that pack into whole bytes


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return int(bits)


# ----------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``0 .. 2^bits - 1`` along the last dimension, ``8 / bits`` per byte.

    Args:
        codes: (..., n) integers in ``0 .. 2^bits - 1``.
        bits: 2, 4 or 8.

    Returns:
        (..., ceil(n · bits / 8)) uint8; code ``i`` of a byte sits in bits ``i·b .. i·b + b - 1``.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() < 1 or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor (..., n), got {_shape(codes)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in 0 .. {2**bits - 1} for bits={bits}; got {int(codes.min())} .. {int(codes.max())}"
        )
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_bits` without the argument checks (codes known to be in range)."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = -n % per
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.unflatten(-1, (-1, per))  # (..., n / per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is an OR


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (..., bytes) uint8 -> (..., n) uint8 codes."""
    bits = _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() < 1:
        raise ValueError(f"packed must be a uint8 tensor (..., bytes), got {_shape(packed)}")
    per = 8 // bits
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= packed.shape[-1] * per:
        raise ValueError(f"n must be an int in 0 .. {packed.shape[-1] * per} for packed {_shape(packed)}, got {n!r}")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., bytes, per)
    return codes.flatten(-2)[..., :n]


# ----------------------------------------------------------------------------------
# Scalar quantisation
# ----------------------------------------------------------------------------------


class Quantized(NamedTuple):
    """A quantised tensor: packed codes plus one scale (and zero point) per slice.

    ``packed``: (..., ceil(n · bits / 8)) uint8 along x's last dimension (n of them);
    ``scale`` and ``zero`` (None if symmetric): x's shape with the quantised-over
    dimension reduced to 1 (per group if grouped), in ``scale_dtype``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    dim: int
    group_size: int | None
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes, scales and zero points."""
        n = self.packed.numel() + self.scale.numel() * self.scale.element_size()
        return n + (0 if self.zero is None else self.zero.numel() * self.zero.element_size())


def _grouped(x: torch.Tensor, dim: int, group_size: int | None) -> tuple[torch.Tensor, int]:
    """x with ``dim`` split into (n / group_size, group_size); returns it and the reduced dim."""
    if group_size is None:
        return x, dim
    n = x.shape[dim]
    if n % group_size:
        raise ValueError(f"group_size ({group_size}) must divide dimension {dim} of x, shape {_shape(x)}")
    return x.unflatten(dim, (n // group_size, group_size)), (dim + 1 if dim >= 0 else dim)


def quantize(
    x: torch.Tensor,
    bits: int,
    *,
    dim: int = -1,
    group_size: int | None = None,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> Quantized:
    """Uniform quantisation with one scale per slice along ``dim`` (per group of it).

    Symmetric: ``qmax = 2^(b-1) - 1``, ``s = max|x| / qmax``, ``x̂ = s · round(x / s)``
    (2 bits give only the three levels -1, 0, 1). Asymmetric: ``s = (max x - min x) /
    (2^b - 1)``, ``z = min x``, ``x̂ = z + s · round((x - z) / s)`` (all ``2^b`` levels).
    Either way ``|x - x̂| <= s / 2`` for every entry (up to the rounding of ``s`` and
    ``z`` to ``scale_dtype``); a constant slice has ``s = 0`` and is exact (asymmetric)
    or zero-preserving (symmetric, ``s = 0`` only for a slice of zeros).

    Args:
        x: (..., n) floating point, e.g. keys (B, H, S, D).
        bits: 2, 4 or 8.
        dim: the dimension one scale covers: ``-1`` = per token (over channels) for a
            (..., S, D) tensor, ``-2`` = per channel (over tokens).
        group_size: split ``dim`` into groups of this many entries, one scale each
            (must divide it); None = the whole dimension.
        symmetric: symmetric (absmax) or asymmetric (min/max) quantisation.
        scale_dtype: dtype of the stored scales (default x's dtype).

    Returns:
        A :class:`Quantized`.
    """
    bits = _check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))} {_shape(x)}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for x of shape {_shape(x)}")
    dim = dim % x.dim() - x.dim()  # negative: stays valid after unflatten
    if group_size is not None:
        group_size = check_positive_int("group_size", group_size)
    scale_dtype = x.dtype if scale_dtype is None else scale_dtype
    xg, rdim = _grouped(x, dim, group_size)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # as quantize_absmax for float32
    xf = xg.to(work)
    tiny = torch.finfo(work).tiny
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(dim=rdim, keepdim=True) / qmax).to(scale_dtype)
        s = scale.to(work)
        codes = torch.where(s > 0, xf / s.clamp(min=tiny), 0.0).round().clamp(-qmax, qmax) + qmax
        zero = None
    else:
        levels = 2**bits - 1
        lo, hi = xf.amin(dim=rdim, keepdim=True), xf.amax(dim=rdim, keepdim=True)
        scale, zero = ((hi - lo) / levels).to(scale_dtype), lo.to(scale_dtype)
        s = scale.to(work)
        codes = torch.where(s > 0, (xf - zero.to(work)) / s.clamp(min=tiny), 0.0).round().clamp(0, levels)
    codes = codes.reshape(x.shape)  # undo the grouping
    return Quantized(_pack(codes, bits), scale, zero, bits, tuple(x.shape), dim, group_size, x.dtype)


def dequantize(q: Quantized) -> torch.Tensor:
    """The tensor that ``q`` encodes, in the original dtype and shape."""
    codes = unpack_bits(q.packed, q.bits, q.shape[-1]).reshape(q.shape)
    cg, _ = _grouped(codes, q.dim, q.group_size)
    if q.zero is None:
        qmax = 2 ** (q.bits - 1) - 1
        out = (cg.to(q.dtype) - qmax) * q.scale.to(q.dtype)
    else:
        out = q.zero.to(q.dtype) + cg.to(q.dtype) * q.scale.to(q.dtype)
    return out.reshape(q.shape)


def fake_quantize(x: torch.Tensor, bits: int, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(x, bits, **kwargs))``: x as the cache would return it."""
    return dequantize(quantize(x, bits, **kwargs))


# ----------------------------------------------------------------------------------
# Rotation
# ----------------------------------------------------------------------------------


def random_rotation(dim: int, *, seed: int = 0, kind: str = "hadamard", dtype=torch.float32) -> torch.Tensor:
    """A random orthogonal matrix ``R`` (dim, dim); rotate row vectors as ``x @ R``.

    ``kind="hadamard"``: ``R = diag(σ) H / sqrt(dim)`` with random signs ``σ`` and the
    Sylvester-Hadamard matrix ``H`` (dim a power of 2; ``x @ R`` costs O(dim log dim)
    with a fast transform, done here as a plain matmul). ``kind="qr"``: the Q factor
    of a Gaussian matrix, with signs fixed so that it is Haar-distributed.
    """
    dim = check_positive_int("dim", dim)
    g = torch.Generator().manual_seed(int(seed))
    if kind == "hadamard":
        if dim & (dim - 1):
            raise ValueError(f"kind='hadamard' needs dim to be a power of 2, got {dim}; use kind='qr'")
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < dim:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)  # Sylvester
        signs = torch.randint(0, 2, (dim, 1), generator=g).double() * 2 - 1  # (dim, 1)
        return (signs * H / math.sqrt(dim)).to(dtype)
    if kind == "qr":
        Q, Rr = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        return (Q * torch.sign(torch.diagonal(Rr))).to(dtype)
    raise ValueError(f"kind must be 'hadamard' or 'qr', got {kind!r}")


# ----------------------------------------------------------------------------------
# A cache with any of the designs
# ----------------------------------------------------------------------------------


def bytes_per_token(
    head_dim: int,
    bits: int | None,
    *,
    key_axis: str = "channel",
    group_size: int = 32,
    symmetric: bool = False,
    scale_bytes: int = 2,
    num_kv_heads: int = 1,
    num_layers: int = 1,
) -> float:
    """Bytes a token costs in a :class:`QuantizedKVCache` (keys and values, all heads and layers).

    Per head: keys ``D · b / 8`` bytes of codes plus, per channel, one scale (and one
    zero point if asymmetric) shared by ``group_size`` tokens (``key_axis="channel"``),
    or one per token (``key_axis="token"``); values ``D · b / 8`` plus one scale (and
    zero point) per token. ``bits=None``: unquantised, ``2 · D · scale_bytes``. The
    full-precision tail of an incomplete key group is not counted (it is at most
    ``group_size - 1`` tokens). A rotation costs nothing per token.
    """
    check_positive_int("head_dim", head_dim)
    check_positive_int("num_kv_heads", num_kv_heads)
    check_positive_int("num_layers", num_layers)
    check_positive_int("scale_bytes", scale_bytes)
    if bits is not None and key_axis == "channel":
        check_positive_int("group_size", group_size)
    if bits is None:
        per_head: float = 2 * head_dim * scale_bytes
    else:
        bits = _check_bits(bits)
        params = scale_bytes * (1 if symmetric else 2)  # scale (and zero point)
        codes = head_dim * bits / 8
        if key_axis == "channel":
            keys = codes + head_dim * params / group_size
        elif key_axis == "token":
            keys = codes + params
        else:
            raise ValueError(f"key_axis must be 'channel' or 'token', got {key_axis!r}")
        per_head = keys + codes + params
    return per_head * num_kv_heads * num_layers


class QuantizedKVCache:
    """A growing KV cache, quantised to ``bits`` with a choice of design.

    Args:
        batch_size, num_kv_heads, head_dim: B, Hkv, D (values have D too).
        bits: 2, 4 or 8.
        key_axis: ``"channel"`` (KIVI: one scale per channel over each group of
            ``group_size`` tokens; the incomplete group waits in full precision) or
            ``"token"`` (one scale per token, over its channels; no waiting).
        group_size: tokens per key group for ``key_axis="channel"``.
        symmetric: absmax (True) or min/max with a zero point (False, KIVI).
        rotation: an orthogonal (D, D) matrix ``R`` (:func:`random_rotation`) or None.
            Keys and values are stored as ``k R`` and ``v R`` and rotated back on the
            way out, so the cache is a drop-in replacement: ``(q R)·(k̂ R)`` and
            ``q·(k̂ R Rᵀ)`` are the same score.
        dtype, device: of the tensors handed in and out; scales are stored in
            ``scale_dtype`` (default float16, as in practice).

    Values are always one scale per token (per head): each output row is a weighted
    sum of value rows, so a row's error stays in that row.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        bits: int,
        key_axis: str = "channel",
        group_size: int = 32,
        symmetric: bool = False,
        rotation: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        scale_dtype: torch.dtype = torch.float16,
    ):
        self.bits = _check_bits(bits)
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check_positive_int(name, value)
        if key_axis not in ("channel", "token"):
            raise ValueError(f"key_axis must be 'channel' or 'token', got {key_axis!r}")
        if rotation is not None and tuple(rotation.shape) != (head_dim, head_dim):
            raise ValueError(f"rotation must be (head_dim, head_dim) = ({head_dim}, {head_dim}), got {_shape(rotation)}")
        self.batch_size, self.num_kv_heads, self.head_dim = int(batch_size), int(num_kv_heads), int(head_dim)
        self.key_axis, self.symmetric = key_axis, bool(symmetric)
        self.group_size = check_positive_int("group_size", group_size) if key_axis == "channel" else 1
        self.dtype, self.device, self.scale_dtype = dtype, torch.device(device), scale_dtype
        self.rotation = None if rotation is None else rotation.to(device=self.device, dtype=dtype)
        self._k_chunks: list[Quantized] = []
        self._v_chunks: list[Quantized] = []
        self._k_tail = torch.zeros(batch_size, num_kv_heads, 0, head_dim, dtype=dtype, device=self.device)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def _q(self, x, dim, group_size=None):
        return quantize(x, self.bits, dim=dim, group_size=group_size, symmetric=self.symmetric,
                        scale_dtype=self.scale_dtype)

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, T, D) keys and values; return all of them, dequantised."""
        want = (self.batch_size, self.num_kv_heads, key.shape[2] if key.dim() == 4 else -1, self.head_dim)
        if key.dim() != 4 or tuple(key.shape) != want or tuple(value.shape) != want:
            raise ValueError(
                f"QuantizedKVCache.update expects key and value (B, Hkv, T, D) = ({self.batch_size}, "
                f"{self.num_kv_heads}, T, {self.head_dim}); got key {_shape(key)}, value {_shape(value)}"
            )
        if key.dtype != self.dtype or value.dtype != self.dtype:
            raise ValueError(f"QuantizedKVCache holds {self.dtype}; got key {key.dtype}, value {value.dtype}")
        if self.rotation is not None:
            key, value = key @ self.rotation, value @ self.rotation  # (B, Hkv, T, D)
        self._v_chunks.append(self._q(value, dim=-1))  # per token
        if self.key_axis == "token":
            self._k_chunks.append(self._q(key, dim=-1))
        else:
            pending = torch.cat([self._k_tail, key], dim=2)  # (B, Hkv, tail + T, D)
            n_full = pending.shape[2] // self.group_size * self.group_size
            if n_full:  # complete groups: one scale per channel each, quantised once
                self._k_chunks.append(self._q(pending[:, :, :n_full], dim=-2, group_size=self.group_size))
            self._k_tail = pending[:, :, n_full:]
        self.length += key.shape[2]
        return self.keys(), self.values()

    def _out(self, parts: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(parts, dim=2) if parts else self._k_tail[:, :, :0]
        return x if self.rotation is None else x @ self.rotation.T

    def keys(self) -> torch.Tensor:
        """Every cached key, dequantised: (B, Hkv, S, D)."""
        return self._out([dequantize(q) for q in self._k_chunks] + [self._k_tail])

    def values(self) -> torch.Tensor:
        """Every cached value, dequantised: (B, Hkv, S, D)."""
        return self._out([dequantize(q) for q in self._v_chunks])

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales, zero points and the full-precision key tail."""
        n = sum(q.nbytes for q in self._k_chunks + self._v_chunks)
        return n + self._k_tail.numel() * self._k_tail.element_size()

    def __repr__(self) -> str:
        rot = ", rotated" if self.rotation is not None else ""
        return (f"QuantizedKVCache(B={self.batch_size}, Hkv={self.num_kv_heads}, D={self.head_dim}, "
                f"len={self.length}, bits={self.bits}, keys per {self.key_axis}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}{rot})")


# ----------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------


def attention_errors(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_hat: torch.Tensor,
    value_hat: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> dict[str, float]:
    """The cost of replacing (key, value) by (key_hat, value_hat), measured in float64.

    Shapes: query (B, H, L, D), key/key_hat (B, H, S, D), value/value_hat (B, H, S, Dv)
    (repeat GQA heads first); attn_mask bool, broadcastable to (B, H, L, S).

    Returns:
        ``scores``: ``‖Ŝ - S‖ / ‖S‖`` over the visible scores ``S = q·k · scale``;
        ``weights``: the total-variation distance ``½ Σ_j |p̂_j - p_j|`` per query,
        averaged (the fraction of attention mass moved, 0..1);
        ``output``: ``‖ô - o‖ / ‖o‖``.
    """
    tensors = dict(query=query, key=key, value=value, key_hat=key_hat, value_hat=value_hat)
    if any(not isinstance(t, torch.Tensor) or t.dim() < 2 for t in tensors.values()):
        raise ValueError("query, key, value, key_hat and value_hat must be tensors (..., L or S, D)")
    if (
        key_hat.shape != key.shape
        or value_hat.shape != value.shape
        or key.shape[-1] != query.shape[-1]
        or key.shape[:-1] != value.shape[:-1]
    ):
        raise ValueError(
            "attention_errors expects query (..., L, D), key and key_hat (..., S, D), value and value_hat "
            "(..., S, Dv); got " + ", ".join(f"{name} {_shape(t)}" for name, t in tensors.items())
        )
    q, k, v, kh, vh = (t.double() for t in (query, key, value, key_hat, value_hat))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s, sh = q @ k.transpose(-2, -1) * scale, q @ kh.transpose(-2, -1) * scale  # (B, H, L, S)
    visible = torch.ones_like(s, dtype=torch.bool) if attn_mask is None else attn_mask.expand_as(s)
    p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    ph = sh.masked_fill(~visible, float("-inf")).softmax(-1)
    o, oh = p @ v, ph @ vh
    return {
        "scores": ((sh - s)[visible].norm() / s[visible].norm()).item(),
        "weights": (0.5 * (ph - p).abs().sum(-1)).mean().item(),
        "output": ((oh - o).norm() / o.norm()).item(),
    }
