"""The key/value cache for autoregressive decoding (chapter 11).

A decoder generates one token at a time. Without a cache, step ``t`` recomputes the
keys and values of all ``t`` previous tokens; with one, it computes them for the new
token only and appends them, so a step costs ``O(t·D)`` instead of ``O(t²·D)``
(Pope et al. 2022). The price is memory: per layer, two tensors of shape
(B, Hkv, S, D). That is why multi-query (Shazeer 2019) and grouped-query attention
(Ainslie et al. 2023) share key/value heads, and why caches are quantised.

The new queries sit at the *end* of the sequence, so causal masking is
bottom-right aligned (:func:`attention_lib.masks.causal_lower_right`): with ``T``
new queries and ``S`` cached keys, query ``i`` sees keys ``j <= i + S - T``.
"""

from __future__ import annotations

import torch

from . import masks
from ._checks import _shape

__all__ = ["KVCache", "kv_cache_bytes", "cache_causal_mask"]


def kv_cache_bytes(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch_size: int = 1,
    bytes_per_value: float = 2,
) -> int:
    """Bytes held by the keys and values of a whole model: ``2 · layers · B · Hkv · S · D · bytes``.

    ``bytes_per_value`` is 2 for fp16/bf16, 1 for int8 (add the scales yourself).
    """
    return int(2 * num_layers * batch_size * num_kv_heads * seq_len * head_dim * bytes_per_value)


def cache_causal_mask(
    q_len: int, kv_len: int, attn_mask: torch.Tensor | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor | None:
    """Bottom-right causal mask for ``q_len`` new queries over ``kv_len`` keys, AND-ed with ``attn_mask``.

    Returns a mask broadcastable to (B, H, q_len, kv_len): bool if ``attn_mask`` is
    None or bool, additive float if ``attn_mask`` is float. With one new query every
    key is visible, so ``attn_mask`` is returned unchanged (possibly None).
    """
    if q_len == 1 and kv_len >= 1:
        return attn_mask
    allowed = masks.create_mask(masks.causal_lower_right(q_len, kv_len), None, None, q_len, kv_len, device)
    if attn_mask is None:
        return allowed  # (1, 1, q_len, kv_len)
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return attn_mask.masked_fill(~allowed, float("-inf"))


def _quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8: one scale per (batch, head, position), over the head dim.

    x: (B, H, T, D) -> (int8 (B, H, T, D), scale (B, H, T, 1) in x's dtype).
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # (B, H, T, 1)
    scale = (amax / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)  # (B, H, T, D)
    return q, scale.to(x.dtype)


class KVCache:
    """A growing cache of keys and values, stored as (B, Hkv, S, D).

    Args:
        batch_size: B.
        num_kv_heads: key/value heads Hkv (``== H`` for MHA, ``< H`` for GQA, 1 for MQA).
        head_dim: D of the keys.
        value_dim: Dv of the values (default ``head_dim``).
        dtype, device: of the keys and values handed in and out.
        quantize: None (store in ``dtype``) or ``"int8"``: store int8 with one
            scale per head and position (``absmax / 127`` over the head dim). A single
            scale per head for the whole sequence cannot work for a cache that grows:
            a later token with a larger magnitude would force re-quantising the past.
        capacity: positions to allocate up front; the storage doubles when full, so
            appending is amortised O(1) per position.

    ``update(k, v)`` appends ``T >= 1`` positions and returns every key and value so
    far, ready for attention; ``len(cache)`` is the number of cached positions.
    """

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
        capacity: int = 16,
    ):
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.batch_size, self.num_kv_heads = int(batch_size), int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.value_dim = self.head_dim if value_dim is None else int(value_dim)
        self.dtype, self.device, self.quantize = dtype, torch.device(device), quantize
        self.length = 0
        self._alloc(max(1, int(capacity)))

    # -- storage -------------------------------------------------------------
    def _empty(self, cap: int, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (self.batch_size, self.num_kv_heads, cap, dim)
        if self.quantize == "int8":
            data = torch.zeros(shape, dtype=torch.int8, device=self.device)
            return data, torch.zeros(shape[:3] + (1,), dtype=self.dtype, device=self.device)
        return torch.zeros(shape, dtype=self.dtype, device=self.device), None

    def _alloc(self, cap: int) -> None:
        k, ks = self._empty(cap, self.head_dim)
        v, vs = self._empty(cap, self.value_dim)
        if self.length:
            n = self.length
            k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
            if ks is not None:
                ks[:, :, :n], vs[:, :, :n] = self._k_scale[:, :, :n], self._v_scale[:, :, :n]
        self._k, self._v, self._k_scale, self._v_scale = k, v, ks, vs

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def __len__(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        """Bytes used by the cached positions (data plus scales), not the spare capacity."""
        per_pos = (self.head_dim + self.value_dim) * self._k.element_size()
        if self._k_scale is not None:
            per_pos += 2 * self._k_scale.element_size()
        return self.batch_size * self.num_kv_heads * self.length * per_pos

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
            self._k[:, :, pos], self._k_scale[:, :, pos] = _quantize_int8(key)
            self._v[:, :, pos], self._v_scale[:, :, pos] = _quantize_int8(value)
        else:
            self._k[:, :, pos], self._v[:, :, pos] = key, value
        self.length += T
        return self.keys(), self.values()

    def keys(self) -> torch.Tensor:
        """Every cached key: (B, Hkv, S, D)."""
        k = self._k[:, :, : self.length]
        if self.quantize == "int8":
            return k.to(self.dtype) * self._k_scale[:, :, : self.length]
        return k

    def values(self) -> torch.Tensor:
        """Every cached value: (B, Hkv, S, Dv)."""
        v = self._v[:, :, : self.length]
        if self.quantize == "int8":
            return v.to(self.dtype) * self._v_scale[:, :, : self.length]
        return v

    def reset(self) -> None:
        """Forget every position (the storage is kept)."""
        self.length = 0

    def __repr__(self) -> str:
        return (
            f"KVCache(B={self.batch_size}, Hkv={self.num_kv_heads}, D={self.head_dim}, len={self.length}, "
            f"capacity={self.capacity}, dtype={self.dtype}, quantize={self.quantize})"
        )
