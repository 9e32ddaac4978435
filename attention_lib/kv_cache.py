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

from . import masks
from ._checks import _shape

__all__ = ["KVCache", "kv_cache_bytes", "cache_causal_mask", "quantize_absmax"]


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
    :class:`KVCache` with ``quantize="int8"``, ``2 / group_size`` bytes per key entry and
    2 bytes per value vector in fp16).
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

            * Values: one scale per head and position (``absmax / 127`` over Dv), set
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
        group_size: int = 32,
        capacity: int = 16,
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

    def _alloc(self, cap: int) -> None:
        G, n = self.group_size, self.length
        cap = -(-cap // G) * G  # a whole number of key groups
        if self.quantize == "int8":
            k = torch.zeros(self._shape(cap, self.head_dim), dtype=torch.int8, device=self.device)
            ks = torch.zeros(self._shape(cap // G, self.head_dim), dtype=self.dtype, device=self.device)
            v = torch.zeros(self._shape(cap, self.value_dim), dtype=torch.int8, device=self.device)
            vs = torch.zeros(self._shape(cap, 1), dtype=self.dtype, device=self.device)
            if n:
                nq = self._n_quantized
                k[:, :, :nq], ks[:, :, : nq // G] = self._k[:, :, :nq], self._k_scale[:, :, : nq // G]
                v[:, :, :n], vs[:, :, :n] = self._v[:, :, :n], self._v_scale[:, :, :n]
        else:
            k = torch.zeros(self._shape(cap, self.head_dim), dtype=self.dtype, device=self.device)
            v = torch.zeros(self._shape(cap, self.value_dim), dtype=self.dtype, device=self.device)
            ks = vs = None
            if n:
                k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
        self._k, self._v, self._k_scale, self._v_scale = k, v, ks, vs

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
        """
        per_head = self.length * (self.head_dim + self.value_dim) * self._k.element_size()
        if self.quantize == "int8":
            elt, nq, G = self._v_scale.element_size(), self._n_quantized, self.group_size
            tail = self.length - nq
            per_head += self.length * elt + (nq // G) * self.head_dim * elt  # value and key scales
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
            self._v[:, :, pos], self._v_scale[:, :, pos] = quantize_absmax(value, dim=-1)  # per token
            self._append_keys(key)
        else:
            self._k[:, :, pos], self._v[:, :, pos] = key, value
        self.length += T
        return self.keys(), self.values()

    def _append_keys(self, key: torch.Tensor) -> None:
        """Int8 keys: complete groups are quantised per channel, the rest waits in the tail."""
        G, nq = self.group_size, self._n_quantized
        pending = torch.cat([self._k_tail[:, :, : self.length - nq], key], dim=2)  # (B, Hkv, tail + T, D)
        n_full = pending.shape[2] // G * G
        if n_full:
            groups = pending[:, :, :n_full].unflatten(2, (n_full // G, G))  # (B, Hkv, groups, G, D)
            codes, scale = quantize_absmax(groups, dim=-2)  # scale: (B, Hkv, groups, 1, D), per channel
            self._k[:, :, nq : nq + n_full] = codes.flatten(2, 3)
            self._k_scale[:, :, nq // G : (nq + n_full) // G] = scale.squeeze(-2)
        rest = pending.shape[2] - n_full
        self._k_tail[:, :, :rest] = pending[:, :, n_full:]

    def keys(self) -> torch.Tensor:
        """Every cached key: (B, Hkv, S, D)."""
        if self.quantize != "int8":
            return self._k[:, :, : self.length]
        G, nq = self.group_size, self._n_quantized
        codes = self._k[:, :, :nq].unflatten(2, (nq // G, G))  # (B, Hkv, groups, G, D)
        done = (codes.to(self.dtype) * self._k_scale[:, :, : nq // G].unsqueeze(-2)).flatten(2, 3)
        return torch.cat([done, self._k_tail[:, :, : self.length - nq]], dim=2)

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
        q = f", quantize={self.quantize}, group_size={self.group_size}" if self.quantize else ""
        return (
            f"KVCache(B={self.batch_size}, Hkv={self.num_kv_heads}, D={self.head_dim}, len={self.length}, "
            f"capacity={self.capacity}, dtype={self.dtype}{q})"
        )
