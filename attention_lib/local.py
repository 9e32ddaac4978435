"""Sliding-window (local) attention in O(L·w) time and memory (chapter 10).

Longformer (Beltagy et al. 2020) and Mistral let each query attend only to the
``window`` most recent keys. The result equals full attention under the mask
:func:`attention_lib.masks.sliding_window`, but a dense ``L × L`` mask would spend
``O(L²)`` work and memory on scores that are thrown away. Here the queries are cut
into blocks of ``block_q``; block ``n`` needs only the keys of its band,

    keys  n·block_q - (window - 1)  ...  n·block_q + block_q - 1      (causal)

that is ``block_q + window - 1`` of them. A strided view (``Tensor.unfold``) of the
zero-padded keys gives every block its band without a Python loop, so the scores
have shape (B, H, n_blocks, block_q, band): ``O(L·(block_q + window))`` numbers,
never ``O(L²)``.

Alignment is top-left, like ``is_causal`` and ``masks.sliding_window``: query ``i``
sees keys ``j`` with ``i - window < j <= i``. With ``is_causal=False`` the band is
symmetric: ``|i - j| < window`` (``2·window - 1`` keys, as in Longformer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import accumulation_dtype, check_positive_int, check_window, is_causal_bias, repeat_kv, sdpa_inputs

__all__ = ["sliding_window_attention"]


def _band(x: torch.Tensor, left: int, n_blocks: int, block: int, band: int) -> torch.Tensor:
    """Every block's band of ``x`` along dim 2, as a strided view.

    ``x``: (B, H, S, D). Position ``p`` of the band of block ``n`` is sequence index
    ``n·block - left + p``; indices outside ``0..S-1`` read zeros (they are masked).
    Returns (B, H, n_blocks, band, D).
    """
    S = x.shape[2]
    needed = (n_blocks - 1) * block - left + band  # one past the last index any band reads
    x = x[:, :, : min(S, needed)]  # keys no query can reach are dropped
    x = F.pad(x, (0, 0, left, needed - x.shape[2]))  # (B, H, left + needed, D)
    return x.unfold(2, band, block).transpose(-1, -2)  # (B, H, n_blocks, band, D), a view


def _sliding_window_core(query, key, value, attn_mask, dropout_p, is_causal, scale, *, window, block_q):
    """The 4-D core: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev);
    ``is_causal`` picks the causal band."""
    out_dtype = query.dtype
    if block_q is None:
        block_q = min(128, max(16, window))
    B, Hq, L, E = query.shape
    S = key.shape[2]
    dtype = accumulation_dtype(query.dtype)  # float16/bfloat16 are computed in float32
    query = query.to(dtype)
    key, value = repeat_kv(key.to(dtype), Hq), repeat_kv(value.to(dtype), Hq)  # (B, Hq, S, E), (B, Hq, S, Ev)
    left = window - 1  # how far back a query reaches
    right = 0 if is_causal else window - 1  # how far forward
    band = block_q + left + right  # keys per block of queries
    n_blocks = -(-L // block_q)

    q = F.pad(query, (0, 0, 0, n_blocks * block_q - L))  # (B, H, n_blocks·block_q, E)
    q = q.view(B, Hq, n_blocks, block_q, E)  # (B, H, n, bq, E)
    k = _band(key, left, n_blocks, block_q, band)  # (B, H, n, band, E)
    v = _band(value, left, n_blocks, block_q, band)  # (B, H, n, band, Ev)

    # Global indices: query i = n·bq + r, key j = n·bq - left + c.
    device = query.device
    i = torch.arange(n_blocks * block_q, device=device).view(n_blocks, block_q, 1)  # (n, bq, 1)
    j = i[:, :1] - left + torch.arange(band, device=device)  # (n, 1, band)
    d = i[:1] - j[:1]  # (1, bq, band): query minus key, the same in every block
    in_band = (d < window) & ((d >= 0) if is_causal else (d > -window))  # (1, bq, band)
    allowed = in_band & (j >= 0) & (j < S)  # (n, bq, band)

    scores = torch.einsum("bhnqd,bhnkd->bhnqk", q * scale, k)  # (B, H, n, bq, band)
    if attn_mask is not None:
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + attn_mask.shape)  # (b, h, ·, ·)
        m = m.expand(*m.shape[:2], L, S)  # (b, h, L, S), a view
        qi = i.clamp(max=L - 1)  # (n, bq, 1); padded queries are dropped below
        kj = j.clamp(0, S - 1)  # (n, 1, band); out-of-range keys are masked by `allowed`
        m = m[:, :, qi, kj]  # (b, h, n, bq, band): only the band is gathered
        if m.dtype == torch.bool:
            allowed = allowed & m  # (b, h, n, bq, band)
        else:
            scores = scores + m.to(scores.dtype)
    scores.masked_fill_(~allowed, float("-inf"))
    # torch.softmax is one fused pass, but a row with no visible key would give NaN:
    # give such rows finite scores and zero their weights afterwards (output 0, grad 0).
    if attn_mask is None:
        dead = i >= S + window - 1  # (n, bq, 1): the band lies past the last key
    elif attn_mask.dtype == torch.bool:
        dead = ~allowed.any(dim=-1, keepdim=True)  # (b, h, n, bq, 1)
    else:
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, n, bq, 1)
    has_dead = bool(dead.any())
    if has_dead:
        scores.masked_fill_(dead, 0.0)
    weights = torch.softmax(scores, dim=-1)  # (B, H, n, bq, band)
    if has_dead:
        weights = weights.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    out = torch.einsum("bhnqk,bhnkd->bhnqd", weights, v)  # (B, H, n, bq, Ev)
    out = out.reshape(B, Hq, n_blocks * block_q, -1)  # (B, H, n·bq, Ev)
    return out[:, :, :L].to(out_dtype)  # (B, H, L, Ev)


def sliding_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: int,
    block_q: int | None = None,
) -> torch.Tensor:
    """Attention restricted to a band of ``window`` keys, in O(L·w) time and memory.

    SDPA's arguments, in SDPA's order and with its defaults, then its own knobs
    (keyword-only). Equal to ``scaled_dot_product_attention(query, key, value,
    attn_mask=create_mask(sliding_window(window), ...))`` for ``is_causal=True``.
    Inputs are normalised as in SDPA (:mod:`attention_lib._checks`).

    Args:
        query: (..., Hq, L, E).
        key: (..., Hkv, S, E); ``Hkv == Hq`` or 1, or ``Hq % Hkv == 0`` with ``enable_gqa``.
        value: (..., Hkv, S, Ev).
        attn_mask: optional extra mask broadcastable to (..., Hq, L, S), combined
            with the band (bool: True = may attend, AND-ed; float: added). Only its
            entries inside the band are read.
        dropout_p: dropout probability on the attention weights.
        is_causal: False (default, as in SDPA): the symmetric band ``|i - j| < window``
            (Longformer). True: query ``i`` sees keys ``i - window < j <= i``
            (top-left aligned, like ``masks.sliding_window``). Unlike SDPA, it may be
            combined with ``attn_mask``: here it selects the shape of the band.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hq % Hkv == 0`` (grouped-query attention).
        window: how many keys each query may see, counting itself (``>= 1``;
            keyword-only, required).
        block_q: queries per block (keyword-only). The work is
            ``L · (block_q + band)`` scores; the default ``min(128, max(16, window))``
            balances wasted scores against per-block overhead.

    Returns:
        (..., Hq, L, Ev), in the inputs' dtype (computed in float32 for float16 and
        bfloat16). A query with no key in its band (e.g.
        ``i >= S + window - 1``, or everything masked) gives 0.

    Raises:
        ValueError: on bad shapes, dtypes or devices, or a ``window`` that is not a
            positive integer.
    """
    window = check_window(window)
    if block_q is not None:
        block_q = check_positive_int("block_q", block_q)
    # is_causal here picks the shape of the band, so it may come with an attn_mask:
    # the front-end sees is_causal=False and the two are combined below.
    if is_causal and is_causal_bias(attn_mask):
        raise ValueError("attn_mask is a CausalBias: it already is the causal mask, so pass is_causal=False")
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, False, scale, enable_gqa)
    # (a CausalBias upper-left mask comes back as is_causal=True: the band becomes causal)
    args = args._replace(is_causal=bool(is_causal) or args.is_causal)
    return args.run(_sliding_window_core, window=window, block_q=block_q)
