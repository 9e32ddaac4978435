"""Multi-head latent attention (chapter 14), as introduced by DeepSeek-V2 (DeepSeek-AI 2024).

Multi-head attention caches, per token and layer, ``2 · H · D`` numbers: every head's
key and value. MLA caches one small **latent** vector instead, from which every
head's key and value are linear functions::

    c_t   = W_DKV h_t                  (d_c,)    the joint KV latent: this is cached
    k_t,i = W_UK,i c_t                 (D,)      head i's key   (up-projection)
    v_t,i = W_UV,i c_t                 (Dv,)     head i's value (up-projection)

Because the up-projections are linear, they can be *absorbed*: the score
``q_i · W_UK,i c_j = (W_UK,iᵀ q_i) · c_j`` is the score of a query projected into the
latent space against the latent itself, and ``W_O,i W_UV,i`` folds the value
up-projection into the output projection. The absorbed form never materialises a
key or a value: attention runs with all H query heads against one shared "head"
``c`` (d_c wide), like multi-query attention with wide heads.

RoPE does not commute with the absorption (a rotation that depends on the key's
position would sit between ``W_UK`` and ``c``), so MLA uses a **decoupled** rotary
part: a small key ``k_R = RoPE(W_KR h)`` (d_R,), shared by all heads and cached next
to ``c``, and per-head rotary queries ``q_R,i``. The score of head i is
``q_C,i · k_C,i + q_R,i · k_R`` with scale ``1 / sqrt(D + d_R)``. The cache per token
and layer holds ``d_c + d_R`` numbers: 576 in DeepSeek-V2 (d_c = 512, d_R = 64),
against 2 · 128 · 128 = 32 768 for multi-head attention with its 128 heads of 128.

Omitted from DeepSeek-V2's layer: the RMSNorms after the two down-projections and
YaRN's context extension; neither changes the algebra.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_positive_int
from .attention import scaled_dot_product_attention
from .kv_cache import KVCache
from .masks import cache_causal_mask
from .positional import apply_rotary

__all__ = ["MultiHeadLatentAttention", "mla_cache_bytes"]


def mla_cache_bytes(
    num_layers: int,
    kv_latent_dim: int,
    rope_dim: int,
    seq_len: int,
    batch_size: int = 1,
    bytes_per_value: float = 2,
) -> int:
    """Bytes of an MLA cache: ``layers · B · S · (d_c + d_R) · bytes``.

    Compare :func:`attention_lib.kv_cache_bytes`, ``2 · layers · B · Hkv · S · D · bytes``:
    MLA caches as many numbers per token as GQA with ``(d_c + d_R) / (2 D)`` key/value
    heads (2.25 for DeepSeek-V2).
    """
    sizes = dict(num_layers=num_layers, kv_latent_dim=kv_latent_dim, seq_len=seq_len, batch_size=batch_size)
    for name, value in sizes.items():
        check_positive_int(name, value)
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 0:
        raise ValueError(f"rope_dim must be a non-negative int, got {rope_dim!r}")
    if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, (int, float)) or not bytes_per_value > 0:
        raise ValueError(f"bytes_per_value must be a positive number, got {bytes_per_value!r}")
    return int(num_layers * batch_size * seq_len * (kv_latent_dim + rope_dim) * bytes_per_value)


class MultiHeadLatentAttention(nn.Module):
    """Causal self-attention with a low-rank joint KV latent and a decoupled RoPE key.

    Args:
        embed_dim: model width E.
        num_heads: H.
        head_dim: D, the width of each head's (non-rotary) query and key.
        kv_latent_dim: d_c, the width of the cached latent ``c``.
        rope_dim: d_R, the width of the shared rotary key and of each head's rotary
            query (even).
        q_latent_dim: d_c' for query compression (``h -> c_Q -> q``), or None for a
            plain query projection.
        v_head_dim: Dv, each head's value width (default ``head_dim``).
        rope_base: RoPE's base.

    The projections have no bias, as in DeepSeek-V2 (a bias after ``W_UV`` would not
    fold into the output projection as simply). A cache for decoding is
    :meth:`new_cache`: a :class:`attention_lib.KVCache` with one "head" whose keys are
    ``k_R`` (B, 1, S, d_R) and whose values are ``c`` (B, 1, S, d_c); nothing else is
    cached, in either form.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        kv_latent_dim: int,
        rope_dim: int,
        *,
        q_latent_dim: int | None = None,
        v_head_dim: int | None = None,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        sizes = dict(embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim, kv_latent_dim=kv_latent_dim)
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 2 or rope_dim % 2:
            raise ValueError(f"rope_dim must be a positive even int (RoPE rotates pairs), got {rope_dim!r}")
        for name, optional in (("q_latent_dim", q_latent_dim), ("v_head_dim", v_head_dim)):
            if optional is not None:
                check_positive_int(name, optional)
        H, D = num_heads, head_dim
        Dv = D if v_head_dim is None else int(v_head_dim)
        self.embed_dim, self.num_heads, self.head_dim, self.v_head_dim = embed_dim, H, D, Dv
        self.kv_latent_dim, self.rope_dim, self.rope_base = kv_latent_dim, rope_dim, rope_base
        self.q_latent_dim = q_latent_dim
        if q_latent_dim is None:
            self.q_proj = nn.Linear(embed_dim, H * (D + rope_dim), bias=False)  # q_C and q_R of every head
        else:
            self.q_down = nn.Linear(embed_dim, q_latent_dim, bias=False)  # W_DQ
            self.q_proj = nn.Linear(q_latent_dim, H * (D + rope_dim), bias=False)  # W_UQ and W_QR
        self.kv_down = nn.Linear(embed_dim, kv_latent_dim, bias=False)  # W_DKV
        self.k_rope = nn.Linear(embed_dim, rope_dim, bias=False)  # W_KR: the shared rotary key
        self.k_up = nn.Linear(kv_latent_dim, H * D, bias=False)  # W_UK
        self.v_up = nn.Linear(kv_latent_dim, H * Dv, bias=False)  # W_UV
        self.out_proj = nn.Linear(H * Dv, embed_dim, bias=False)  # W_O

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim + self.rope_dim)

    def new_cache(self, batch_size: int, *, dtype: torch.dtype = torch.float32, device="cpu") -> KVCache:
        """An empty latent cache: keys ``k_R`` (B, 1, S, d_R), values ``c`` (B, 1, S, d_c)."""
        return KVCache(batch_size, 1, self.rope_dim, value_dim=self.kv_latent_dim, dtype=dtype, device=device)

    # -- the pieces shared by both forms ------------------------------------------------
    def _queries(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        h = x if self.q_latent_dim is None else self.q_down(x)  # (B, L, E) or c_Q (B, L, d_c')
        q = self.q_proj(h).view(B, L, self.num_heads, self.head_dim + self.rope_dim).transpose(1, 2)
        q_c, q_r = q.split([self.head_dim, self.rope_dim], dim=-1)  # (B, H, L, D), (B, H, L, d_R)
        return q_c, apply_rotary(q_r, positions, base=self.rope_base)

    def _latents(self, x, positions, kv_cache):
        """The new tokens' ``c`` and ``k_R``, appended to the cache if there is one."""
        c = self.kv_down(x).unsqueeze(1)  # (B, 1, L, d_c)
        k_r = apply_rotary(self.k_rope(x).unsqueeze(1), positions, base=self.rope_base)  # (B, 1, L, d_R)
        if kv_cache is not None:
            k_r, c = kv_cache.update(k_r, c)  # (B, 1, S, d_R), (B, 1, S, d_c): past and new
        return c, k_r

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` per head, (H, D, d_c), and ``W_UV,i`` folded into ``W_O``, (H, d_c, E).

        Head i's query in latent space is ``q_C,i @ W_UK[i]`` (d_c,); its output
        contribution is ``o_i @ W_VO[i]`` with ``W_VO[i] = W_UV,iᵀ W_O,iᵀ``.
        """
        H, D, Dv, dc = self.num_heads, self.head_dim, self.v_head_dim, self.kv_latent_dim
        w_uk = self.k_up.weight.view(H, D, dc)  # (H, D, d_c)
        w_uv = self.v_up.weight.view(H, Dv, dc)  # (H, Dv, d_c)
        w_o = self.out_proj.weight.view(self.embed_dim, H, Dv)  # (E, H, Dv)
        w_vo = torch.einsum("hvc,ehv->hce", w_uv, w_o)  # (H, d_c, E)
        return w_uk, w_vo

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        *,
        absorb: bool = False,
    ) -> torch.Tensor:
        """Self-attention over ``x`` (B, L, E), optionally after the tokens in ``kv_cache``.

        Args:
            x: (B, L, E), the new tokens; their positions continue after the cache.
            attn_mask: broadcastable to (B, H, L, S), SDPA convention (True = may attend).
            is_causal: causal mask (bottom-right aligned with a cache).
            kv_cache: from :meth:`new_cache`; the new tokens' ``k_R`` and ``c`` are appended.
            absorb: False materialises every head's keys and values from ``c``
                (the training form); True folds ``W_UK`` into the queries and ``W_UV``
                into the output projection (the decoding form). Both give the same result.

        Returns:
            (B, L, E).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, E={self.embed_dim}), got shape {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if kv_cache is not None and (kv_cache.num_kv_heads, kv_cache.head_dim, kv_cache.value_dim) != (
            1, self.rope_dim, self.kv_latent_dim
        ):
            raise ValueError(
                f"kv_cache must hold k_R (1 head, {self.rope_dim}) and c ({self.kv_latent_dim}); got "
                f"{kv_cache!r}: make it with new_cache()"
            )
        B, L, _ = x.shape
        start = 0 if kv_cache is None else len(kv_cache)
        positions = torch.arange(start, start + L, device=x.device)  # (L,)
        q_c, q_r = self._queries(x, positions)  # (B, H, L, D), (B, H, L, d_R)
        c, k_r = self._latents(x, positions, kv_cache)  # (B, 1, S, d_c), (B, 1, S, d_R)
        S = c.shape[2]
        if is_causal and S != L:  # new queries after a cache: bottom-right
            attn_mask, is_causal = cache_causal_mask(L, S, attn_mask, x.device), False
        H, D, Dv = self.num_heads, self.head_dim, self.v_head_dim
        if not absorb:
            k_c = self.k_up(c.squeeze(1)).view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
            v = self.v_up(c.squeeze(1)).view(B, S, H, Dv).transpose(1, 2)  # (B, H, S, Dv)
            q = torch.cat([q_c, q_r], dim=-1)  # (B, H, L, D + d_R)
            k = torch.cat([k_c, k_r.expand(B, H, S, self.rope_dim)], dim=-1)  # (B, H, S, D + d_R)
            o = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
            return self.out_proj(o.transpose(1, 2).reshape(B, L, H * Dv))  # (B, L, E)
        w_uk, w_vo = self.absorbed_weights()  # (H, D, d_c), (H, d_c, E)
        q_lat = torch.einsum("bhld,hdc->bhlc", q_c, w_uk)  # (B, H, L, d_c): W_UKᵀ q_C
        q = torch.cat([q_lat, q_r], dim=-1)  # (B, H, L, d_c + d_R)
        k = torch.cat([c, k_r], dim=-1)  # (B, 1, S, d_c + d_R): one head shared by all
        o_lat = scaled_dot_product_attention(
            q, k, c, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale, enable_gqa=True
        )  # (B, H, L, d_c): each head's weighted average of latents
        return torch.einsum("bhlc,hce->ble", o_lat, w_vo)  # (B, L, E)
