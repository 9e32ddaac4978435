"""Multi-head attention as a module (chapter 6).

The module only projects, reshapes and calls an attention *function*; any variant
with the signature of ``scaled_dot_product_attention`` can be swapped in through
``attn_fn``. ``num_kv_heads < num_heads`` gives grouped-query attention (GQA,
Ainslie et al. 2023); ``num_kv_heads == 1`` gives multi-query attention (MQA,
Shazeer 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import scaled_dot_product_attention
from .masks import cache_causal_mask

if TYPE_CHECKING:  # chapter 11 builds the cache; this module only accepts one
    from .kv_cache import KVCache

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with optional grouped key/value heads.

    Args:
        embed_dim: model width E; split into ``num_heads`` heads of ``E // num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads (default H). Must divide H.
        bias: whether the four projections have a bias.
        dropout: dropout on the attention weights while training.
        kdim, vdim: feature sizes of key and value inputs for cross-attention
            (default ``embed_dim``).
        attn_fn: the attention function, SDPA-compatible (default
            :func:`attention_lib.scaled_dot_product_attention`).

    Masks follow SDPA's convention (bool True = may attend), *not* the opposite
    convention of ``torch.nn.MultiheadAttention``'s bool masks.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        attn_fn: Callable[..., torch.Tensor] = scaled_dot_product_attention,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.attn_fn = attn_fn
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, kv_width, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, n_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to ``key``/``value`` (default: self-attention).

        Args:
            query: (B, L, E).
            key: (B, S, kdim), default ``query``.
            value: (B, S, vdim), default ``key``.
            attn_mask: broadcastable to (B, H, L, S), SDPA convention.
            is_causal: top-left causal mask; bottom-right with ``kv_cache``.
            kv_cache: a :class:`attention_lib.KVCache` for incremental decoding
                (self-attention only): the new tokens' keys and values are appended
                to it and the queries attend to every cached position.

        Returns:
            (B, L, E).
        """
        if kv_cache is not None and (key is not None or value is not None):
            raise ValueError("kv_cache is for self-attention: pass key=None and value=None")
        key = query if key is None else key
        value = key if value is None else value
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query must be (B, L, E={self.embed_dim}), got shape {tuple(query.shape)}"
            )
        if key.dim() != 3 or value.dim() != 3 or key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"key and value must be (B, S, ·) with the query's batch size; got query "
                f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        q = self._split_heads(self.q_proj(query), self.num_heads)  # (B, H, L, hs)
        k = self._split_heads(self.k_proj(key), self.num_kv_heads)  # (B, Hkv, S, hs)
        v = self._split_heads(self.v_proj(value), self.num_kv_heads)  # (B, Hkv, S, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, Hkv, S_cached, hs): the past and the new tokens
            if is_causal:  # the new queries are the last ones: bottom-right alignment
                attn_mask = cache_causal_mask(q.shape[2], k.shape[2], attn_mask, q.device)
                is_causal = False
        y = self.attn_fn(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, L, hs)
        B, _, L, _ = y.shape
        y = y.transpose(1, 2).reshape(B, L, self.embed_dim)  # (B, L, E): heads side by side
        return self.out_proj(y)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """Build a module with the weights of a ``torch.nn.MultiheadAttention``."""
        if not mha._qkv_same_embed_dim:
            raise ValueError("from_torch supports nn.MultiheadAttention with kdim == vdim == embed_dim")
        bias = mha.in_proj_bias is not None
        ours = cls(mha.embed_dim, mha.num_heads, bias=bias, dropout=mha.dropout)
        ours = ours.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        E = mha.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * E:(i + 1) * E])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * E:(i + 1) * E])
            ours.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                ours.out_proj.bias.copy_(mha.out_proj.bias)
        return ours
