"""A streaming KV cache with attention sinks (chapter 14), after StreamingLLM (Xiao et al. 2024).

A sliding window keeps memory constant: cache the last ``window`` tokens, evict the
rest. StreamingLLM observed that this fails as soon as the *first* tokens leave the
window, not because they carry information but because trained models park a large
share of their attention there (an **attention sink**: softmax weights must sum to
1, and a head with nothing to attend to puts its mass on tokens that every query can
see). Keeping the first ``n_sink`` tokens (4 in the paper) next to the window restores
the model's behaviour.

Positions follow StreamingLLM: a key's position is its *slot in the cache*, not its
position in the text, so the cache stores keys **before** RoPE and the model rotates
them with :attr:`SinkKVCache.positions` (``0 .. len - 1``) at every step; the newest
query sits at the last position. Relative offsets inside the window are then the
true ones, and no position ever exceeds ``n_sink + window``, the length the model
was trained on or below.
"""

from __future__ import annotations

import torch

from . import masks
from ._checks import check_positive_int
from .kv_cache import KVCache

__all__ = ["SinkKVCache", "streaming_mask"]


def streaming_mask(n_sink: int, window: int) -> masks.MaskMod:
    """Causal mask of a sink cache: query ``i`` sees key ``j <= i`` if ``j < n_sink`` or ``i - j < window``.

    Top-left aligned on positions in the text. For ``n_sink=1, window=2``, L = S = 5::

        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0
        1 0 1 1 0
        1 0 0 1 1
    """
    n_sink = _check_n_sink(n_sink)
    window = check_positive_int("window", window)

    def streaming_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & ((kv_idx < n_sink) | (d < window))

    return streaming_mod


def _check_n_sink(n_sink) -> int:
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be a non-negative int, got {n_sink!r}")
    return n_sink


class SinkKVCache:
    """The first ``n_sink`` tokens plus a sliding window of the last ``window``, on a :class:`KVCache`.

    Args:
        batch_size, num_kv_heads, head_dim: as for :class:`attention_lib.KVCache`.
        n_sink: tokens kept from the start of the stream (0 = a plain sliding window).
        window: recent tokens every query sees, itself included.
        value_dim, dtype, device: as for :class:`KVCache`.

    ``update(k, v)`` first evicts what no new query can see, then appends, and returns
    every key and value held (at most ``n_sink + window - 1 + T`` for ``T`` new
    tokens); :meth:`new_mask` is the mask of the new queries over them (None when a
    single query sees all). Give it un-rotated keys and apply RoPE with
    :attr:`positions`.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        n_sink: int = 4,
        window: int,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.n_sink = _check_n_sink(n_sink)
        self.window = check_positive_int("window", window)
        self.cache = KVCache(batch_size, num_kv_heads, head_dim, value_dim=value_dim, dtype=dtype, device=device,
                             capacity=self.n_sink + self.window)
        self.token_positions = torch.zeros(0, dtype=torch.long)  # (S,): each held token's position in the text
        self.seen = 0  # tokens streamed so far

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def positions(self) -> torch.Tensor:
        """StreamingLLM's positions: each held token's slot, ``0 .. len - 1``: (S,)."""
        return torch.arange(len(self), device=self.cache.device)

    def _evict(self) -> None:
        """Keep the sinks and the last ``window - 1`` tokens: all the next query may see."""
        keep = (self.token_positions < self.n_sink) | (self.token_positions > self.seen - self.window)
        if bool(keep.all()):
            return
        k, v = self.cache.keys()[:, :, keep], self.cache.values()[:, :, keep]  # (B, Hkv, kept, ·)
        self.cache.reset()
        self.cache.update(k.contiguous(), v.contiguous())
        self.token_positions = self.token_positions[keep]

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict, append ``T`` new tokens (B, Hkv, T, D), and return every held key and value."""
        self._evict()
        T = key.shape[2] if key.dim() == 4 else 0
        keys, values = self.cache.update(key, value)  # checks the shapes
        self.token_positions = torch.cat([self.token_positions, torch.arange(self.seen, self.seen + T)])
        self.seen += T
        return keys, values

    def new_mask(self, q_len: int) -> torch.Tensor | None:
        """Bool mask (1, 1, q_len, S) of the last ``q_len`` tokens over the held keys, or None if all visible."""
        check_positive_int("q_len", q_len)
        if q_len > self.seen:
            raise ValueError(f"q_len ({q_len}) exceeds the {self.seen} tokens this cache has seen")
        q_pos = torch.arange(self.seen - q_len, self.seen).view(1, 1, q_len, 1)
        k_pos = self.token_positions.view(1, 1, 1, -1)
        zero = torch.zeros((), dtype=torch.long)  # batch and head indices: the mask ignores them
        allowed = streaming_mask(self.n_sink, self.window)(zero, zero, q_pos, k_pos)  # (1, 1, q_len, S)
        return None if bool(allowed.all()) else allowed.to(self.cache.device)

    def __repr__(self) -> str:
        return f"SinkKVCache(n_sink={self.n_sink}, window={self.window}, len={len(self)}, seen={self.seen})"
