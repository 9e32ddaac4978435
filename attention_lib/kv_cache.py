"""The key/value cache for autoregressive decoding (chapter 11).

A decoder generates one token at a time. Without a cache, step ``t`` recomputes the
keys and values of all ``t`` previous tokens; with one, it computes them for the new
token only and appends them, so a step costs ``O(t·D)`` instead of ``O(t²·D)``
(Pope et al. 2022). The price is memory: per layer, two tensors of shape
(B, Hkv, S, D). That is why multi-query (Shazeer 2019) and grouped-query attention
(Ainslie et al. 2023) share key/value heads, and why caches are quantised: the int8
cache follows KIVI (Liu et al. 2024), keys per channel and values per token.

The new queries sit at the *end* of the sequence, so causal masking is
bottom-right aligned (:func:`attention_lib.masks.causal_lower_right`): with ``T``
new queries and ``S`` cached keys, query ``i`` sees keys ``j <= i + S - T``.
"""

from __future__ import annotations

import torch

from ._checks import _shape
from .masks import cache_causal_mask  # re-exported: it lives with the other masks (chapter 5)

__all__ = ["KVCache", "kv_cache_bytes", "cache_causal_mask", "quantize_absmax", "quantize_minmax"]


def kv_cache_bytes(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch_size: int = 1,
    bytes_per_value: float = 2,
) -> int:
    """Bytes held by the keys and values of a whole model: ``2 · layers · B · Hkv · S · D · bytes``.

    ``bytes_per_value`` is 2 for fp16/bf16, 1 for int8 (add the scales yourself: for
    :class:`KVCache` with ``quantize="int8"``, ``4 / group_size`` bytes per key entry and
    4 bytes per value vector for fp16 scales and zero points, half that with
    ``symmetric=True``).
    """
    return int(2 * num_layers * batch_size * num_kv_heads * seq_len * head_dim * bytes_per_value)


def quantize_absmax(x: torch.Tensor, dim: int | tuple[int, ...], bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation with one scale per slice reduced over ``dim``.

    ``scale = max|x| / qmax`` over ``dim`` with ``qmax = 2**(bits-1) - 1`` (127 for
    int8, 7 for int4), ``codes = round(x / scale)`` in ``-qmax..qmax``, and
    ``x ≈ codes · scale`` with ``|x - codes · scale| <= scale / 2``. ``dim=-1`` gives one
    scale per token (over the channels of a (..., T, D) tensor); ``dim=-2`` gives one
    scale per channel (over the tokens).

    Args:
        x: (..., T, D) floating point.
        dim: the dimension(s) one scale covers.
        bits: 2..8.

    Returns:
        ``(codes, scale)``: int8 codes of x's shape, and the scale in x's dtype with
        ``dim`` kept as size 1. A slice of zeros has scale 0 and codes 0.
    """
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    qmax = 2 ** (int(bits) - 1) - 1
    scale = (x.abs().amax(dim=dim, keepdim=True).float() / qmax).to(x.dtype)  # stored precision
    s = scale.float()
    codes = torch.where(s > 0, x.float() / s.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return codes.round().clamp(-qmax, qmax).to(torch.int8), scale


def quantize_minmax(x: torch.Tensor, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit quantisation (KIVI's): a scale and a zero point per slice over ``dim``.

    ``zero = min x``, ``scale = (max x - min x) / 255``, ``codes = round((x - zero) / scale)``
    in ``0..255`` and ``x ≈ zero + codes · scale`` with ``|error| <= scale / 2``. Unlike
    absmax it uses all 256 levels on the range the slice actually covers, which pays
    when a channel is offset from 0 (chapter 14 measures it).

    Returns:
        ``(codes, scale, zero)``: uint8 codes of x's shape; scale and zero in x's dtype
        with ``dim`` kept as size 1. A constant slice has scale 0 and is stored exactly.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    lo, hi = x.to(work).amin(dim=dim, keepdim=True), x.to(work).amax(dim=dim, keepdim=True)
    scale, zero = ((hi - lo) / 255).to(x.dtype), lo.to(x.dtype)  # stored precision
    s = scale.to(work)
    codes = torch.where(s > 0, (x.to(work) - zero.to(work)) / s.clamp(min=torch.finfo(work).tiny), 0.0)
    return codes.round().clamp(0, 255).to(torch.uint8), scale, zero


class KVCache:
    """A growing cache of keys and values, stored as (B, Hkv, S, D).

    Args:
        batch_size: B.
        num_kv_heads: key/value heads Hkv (``== H`` for MHA, ``< H`` for GQA, 1 for MQA).
        head_dim: D of the keys.
        value_dim: Dv of the values (default ``head_dim``).
        dtype, device: of the keys and values handed in and out.
        quantize: None (store in ``dtype``) or ``"int8"``, KIVI's asymmetric design
            (Liu et al. 2024): keys per *channel*, values per *token*.

            * Values: one scale (and zero point) per head and position, over Dv, set
              when the token arrives.
            * Keys: a few channels carry large magnitudes for every token (outlier
              channels), so a scale per token would be set by them and coarsen every
              other channel. Keys get one scale per channel instead. A per-channel
              scale must cover many tokens, and the cache grows, so keys are
              quantised in groups of ``group_size`` positions: scales of shape
              (B, Hkv, S // group_size, D). The last ``len % group_size`` keys, whose
              group is not complete, stay in ``dtype`` (KIVI's full-precision
              residual); when a group fills up it is quantised once and never again.
        group_size: tokens per key group for ``quantize="int8"`` (KIVI uses 32).
        symmetric: for ``quantize="int8"``: as KIVI, a scale and a zero point per slice
            (False, the default, :func:`quantize_minmax`: it measured best in chapter 14),
            or absmax scales alone (True, :func:`quantize_absmax`, chapter 11's design).
        capacity: positions to allocate up front; the storage doubles when full, so
            appending is amortised O(1) per position.

    ``update(k, v)`` appends ``T >= 1`` positions and returns every key and value so
    far, ready for attention; ``len(cache)`` is the number of cached positions.
    """

    # storage: codes (int8/uint8) or values in ``dtype``; the scales exist for "int8",
    # the zero points for "int8" with symmetric=False (see _scales and _zeros)
    _k: torch.Tensor
    _v: torch.Tensor
    _k_scale: torch.Tensor | None
    _v_scale: torch.Tensor | None
    _k_zero: torch.Tensor | None
    _v_zero: torch.Tensor | None
    _k_tail: torch.Tensor

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        quantize: str | None = None,
        group_size: int = 32,
        capacity: int = 16,
        symmetric: bool = False,
    ):
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        if int(group_size) < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size}")
        self.batch_size, self.num_kv_heads = int(batch_size), int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.value_dim = self.head_dim if value_dim is None else int(value_dim)
        self.dtype, self.device, self.quantize = dtype, torch.device(device), quantize
        self.group_size = int(group_size) if quantize else 1
        self.symmetric = bool(symmetric)
        self.length = 0
        if quantize:  # keys of the incomplete group, in full precision
            self._k_tail = torch.zeros(self._shape(self.group_size, self.head_dim), dtype=dtype, device=self.device)
        self._alloc(max(1, int(capacity)))

    # -- storage -------------------------------------------------------------
    def _shape(self, n: int, dim: int) -> tuple[int, int, int, int]:
        return (self.batch_size, self.num_kv_heads, n, dim)

    @property
    def _n_quantized(self) -> int:
        """Keys stored as int8: the complete groups."""
        return self.length - self.length % self.group_size if self.quantize else 0

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value scales of an int8 cache."""
        assert self._k_scale is not None and self._v_scale is not None, "only an int8 cache has scales"
        return self._k_scale, self._v_scale

    def _zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value zero points of an asymmetric int8 cache."""
        assert self._k_zero is not None and self._v_zero is not None, "only symmetric=False has zero points"
        return self._k_zero, self._v_zero

    def _alloc(self, cap: int) -> None:
        G, n = self.group_size, self.length
        cap = -(-cap // G) * G  # a whole number of key groups
        if self.quantize == "int8":
            code = torch.int8 if self.symmetric else torch.uint8
            k = torch.zeros(self._shape(cap, self.head_dim), dtype=code, device=self.device)
            ks = torch.zeros(self._shape(cap // G, self.head_dim), dtype=self.dtype, device=self.device)
            v = torch.zeros(self._shape(cap, self.value_dim), dtype=code, device=self.device)
            vs = torch.zeros(self._shape(cap, 1), dtype=self.dtype, device=self.device)
            kz, vz = (None, None) if self.symmetric else (torch.zeros_like(ks), torch.zeros_like(vs))  # zero points
            if n:
                nq = self._n_quantized
                old_ks, old_vs = self._scales()
                k[:, :, :nq], ks[:, :, : nq // G] = self._k[:, :, :nq], old_ks[:, :, : nq // G]
                v[:, :, :n], vs[:, :, :n] = self._v[:, :, :n], old_vs[:, :, :n]
                if kz is not None and vz is not None:
                    old_kz, old_vz = self._zeros()
                    kz[:, :, : nq // G], vz[:, :, :n] = old_kz[:, :, : nq // G], old_vz[:, :, :n]
            self._k, self._v, self._k_scale, self._v_scale = k, v, ks, vs
            self._k_zero, self._v_zero = kz, vz
        else:
            k = torch.zeros(self._shape(cap, self.head_dim), dtype=self.dtype, device=self.device)
            v = torch.zeros(self._shape(cap, self.value_dim), dtype=self.dtype, device=self.device)
            if n:
                k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
            self._k, self._v, self._k_scale, self._v_scale = k, v, None, None

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def __len__(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        """Bytes used by the cached positions (data plus scales), not the spare capacity.

        For ``"int8"``: per position ``D + Dv`` one-byte codes and one value scale; per
        complete key group ``D`` key scales; the keys of the incomplete group in ``dtype``.
        With ``symmetric=False`` every scale has a zero point beside it.
        """
        per_head = self.length * (self.head_dim + self.value_dim) * self._k.element_size()
        if self.quantize == "int8":
            elt, nq, G = self._scales()[1].element_size(), self._n_quantized, self.group_size
            tail = self.length - nq
            params = 1 if self.symmetric else 2  # a scale, and a zero point if asymmetric
            per_head += params * (self.length * elt + (nq // G) * self.head_dim * elt)  # value and key scales
            per_head += tail * self.head_dim * (elt - 1)  # the tail's keys are in dtype, not int8
        return self.batch_size * self.num_kv_heads * per_head

    # -- the interface ---------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys and values and return all of them.

        Args:
            key: (B, Hkv, T, D), the new positions' keys.
            value: (B, Hkv, T, Dv).

        Returns:
            ``(keys, values)``: (B, Hkv, S, D) and (B, Hkv, S, Dv) with ``S = len(self)``,
            in ``dtype`` (dequantised for an int8 cache).
        """
        want_k = (self.batch_size, self.num_kv_heads, key.shape[2] if key.dim() == 4 else -1, self.head_dim)
        if key.dim() != 4 or tuple(key.shape) != want_k or value.dim() != 4 or tuple(value.shape) != want_k[:3] + (self.value_dim,):
            raise ValueError(
                f"KVCache.update expects key (B, Hkv, T, D) = ({self.batch_size}, {self.num_kv_heads}, T, "
                f"{self.head_dim}) and value (..., {self.value_dim}); got key {_shape(key)}, value {_shape(value)}"
            )
        if key.dtype != self.dtype or value.dtype != self.dtype or key.device != self.device:
            raise ValueError(
                f"KVCache holds {self.dtype} on {self.device}; got key {key.dtype} on {key.device}, "
                f"value {value.dtype}"
            )
        T = key.shape[2]
        if self.length + T > self.capacity:
            self._alloc(max(2 * self.capacity, self.length + T))
        pos = slice(self.length, self.length + T)
        if self.quantize == "int8":
            v_scale = self._scales()[1]
            if self.symmetric:
                self._v[:, :, pos], v_scale[:, :, pos] = quantize_absmax(value, dim=-1)  # per token
            else:
                self._v[:, :, pos], v_scale[:, :, pos], self._zeros()[1][:, :, pos] = quantize_minmax(value, dim=-1)
            self._append_keys(key)
        else:
            self._k[:, :, pos], self._v[:, :, pos] = key, value
        self.length += T
        return self.keys(), self.values()

    def _append_keys(self, key: torch.Tensor) -> None:
        """Int8 keys: complete groups are quantised per channel, the rest waits in the tail."""
        G, nq = self.group_size, self._n_quantized
        k_scale = self._scales()[0]
        pending = torch.cat([self._k_tail[:, :, : self.length - nq], key], dim=2)  # (B, Hkv, tail + T, D)
        n_full = pending.shape[2] // G * G
        if n_full:
            groups = pending[:, :, :n_full].unflatten(2, (n_full // G, G))  # (B, Hkv, groups, G, D)
            if self.symmetric:
                codes, scale = quantize_absmax(groups, dim=-2)  # scale: (B, Hkv, groups, 1, D), per channel
            else:
                codes, scale, zero = quantize_minmax(groups, dim=-2)
                self._zeros()[0][:, :, nq // G : (nq + n_full) // G] = zero.squeeze(-2)
            self._k[:, :, nq : nq + n_full] = codes.flatten(2, 3)
            k_scale[:, :, nq // G : (nq + n_full) // G] = scale.squeeze(-2)
        rest = pending.shape[2] - n_full
        self._k_tail[:, :, :rest] = pending[:, :, n_full:]

    def keys(self) -> torch.Tensor:
        """Every cached key: (B, Hkv, S, D)."""
        if self.quantize != "int8":
            return self._k[:, :, : self.length]
        G, nq = self.group_size, self._n_quantized
        codes = self._k[:, :, :nq].unflatten(2, (nq // G, G))  # (B, Hkv, groups, G, D)
        done = codes.to(self.dtype) * self._scales()[0][:, :, : nq // G].unsqueeze(-2)  # (B, Hkv, groups, G, D)
        if not self.symmetric:
            done = self._zeros()[0][:, :, : nq // G].unsqueeze(-2) + done
        done = done.flatten(2, 3)
        return torch.cat([done, self._k_tail[:, :, : self.length - nq]], dim=2)

    def values(self) -> torch.Tensor:
        """Every cached value: (B, Hkv, S, Dv)."""
        v = self._v[:, :, : self.length]
        if self.quantize == "int8":
            out = v.to(self.dtype) * self._scales()[1][:, :, : self.length]
            return out if self.symmetric else self._zeros()[1][:, :, : self.length] + out
        return v

    def reset(self) -> None:
        """Forget every position (the storage is kept)."""
        self.length = 0

    def __repr__(self) -> str:
        q = f", quantize={self.quantize}, group_size={self.group_size}, symmetric={self.symmetric}" if self.quantize else ""
        return (
            f"KVCache(B={self.batch_size}, Hkv={self.num_kv_heads}, D={self.head_dim}, len={self.length}, "
            f"capacity={self.capacity}, dtype={self.dtype}{q})"
        )
