"""The bridge to PyTorch FlexAttention (Dong et al. 2024), chapter 10.

``torch.nn.attention.flex_attention`` takes a mask as a *function*
``mask_mod(b, h, q_idx, kv_idx) -> bool``: exactly the convention of
:mod:`attention_lib.masks`, so every mask of the course runs there unchanged.
``create_block_mask`` evaluates the mask_mod once per tile of
``BLOCK_SIZE × BLOCK_SIZE`` (128 by default) and records which tiles are empty, full
or partial; the compiled kernel skips the empty tiles, which is how a sliding window
costs ``O(L·w)`` there too.

``flex_attention`` must be compiled (``torch.compile``) to be fast; uncompiled, it
materialises the full score matrix. On CPU the first compiled call generates C++
through inductor, which takes tens of seconds; later calls with the same shapes and
mask reuse the kernel. Nothing here is imported or compiled until a function is called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import check_no_dropout, sdpa_inputs

__all__ = ["block_mask", "flex_attention"]

_COMPILED: dict[str, Callable] = {}


def block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: str | torch.device = "cpu",
    BLOCK_SIZE: int = 128,
):
    """``torch.nn.attention.flex_attention.create_block_mask`` for one of our mask_mods.

    Returns a ``BlockMask``; ``.to_dense()`` gives the (B, H, Q_blocks, KV_blocks)
    map of tiles that contain at least one allowed pair.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE)


def _flex_core(query, key, value, attn_mask, dropout_p, is_causal, scale, *, mask_mod, enable_gqa, compile, BLOCK_SIZE):
    """The 4-D core: every mask becomes a mask_mod (bool) or a score_mod (float)."""
    from torch.nn.attention.flex_attention import flex_attention as _flex

    from .masks import and_masks, causal

    B, H, L, _ = query.shape
    S = key.shape[2]
    mods = [m for m in (mask_mod, causal if is_causal else None) if m is not None]
    score_mod = None
    if attn_mask is not None:
        dense = attn_mask.expand(B, H, L, S)  # (B, H, L, S), a view: read at (b, h, q, kv)
        if dense.dtype == torch.bool:
            mods.append(lambda b, h, q_idx, kv_idx: dense[b, h, q_idx, kv_idx])
        else:
            score_mod = lambda score, b, h, q_idx, kv_idx: score + dense[b, h, q_idx, kv_idx]  # noqa: E731
    bm = None
    if mods:
        mod = mods[0] if len(mods) == 1 else and_masks(*mods)
        bm = block_mask(mod, B, H, L, S, device=query.device, BLOCK_SIZE=BLOCK_SIZE)
    fn = _flex
    if compile:
        if "flex" not in _COMPILED:
            _COMPILED["flex"] = torch.compile(_flex, dynamic=False)
        fn = _COMPILED["flex"]
    return fn(query, key, value, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=enable_gqa)


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    mask_mod: Callable | None = None,
    compile: bool = True,
    BLOCK_SIZE: int = 128,
) -> torch.Tensor:
    """Attention with a mask given as a mask_mod, through PyTorch's FlexAttention.

    SDPA's arguments first (in SDPA's order, with its defaults), then its own
    keyword-only knobs. Every mask given is combined (AND): ``mask_mod``,
    ``is_causal`` (as :data:`attention_lib.masks.causal`) and a bool ``attn_mask``
    (read inside the mask_mod); a float ``attn_mask`` becomes a score_mod that adds it.

    Args:
        query: (..., Hq, L, E).
        key: (..., Hkv, S, E).
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S); bool (True = may attend) or an
            additive float mask.
        dropout_p: must be 0 (FlexAttention has no dropout).
        is_causal: top-left causal mask.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hq % Hkv == 0``.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend), e.g.
            ``attention_lib.masks.sliding_window(256)``; None attends everywhere.
        compile: use ``torch.compile(flex_attention)`` (the fast path; compiled once
            per process and cached). False runs the unfused reference, which
            materialises the scores: fine for checking small inputs.
        BLOCK_SIZE: tile size of the block mask.

    Returns:
        (..., Hq, L, Ev). Equal to ``attention_ref`` with
        ``attn_mask=masks.create_mask(mask_mod, B, H, L, S)``, up to rounding.
    """
    if mask_mod is not None and not callable(mask_mod):
        raise ValueError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    if attn_mask is not None and callable(attn_mask) and not isinstance(attn_mask, torch.Tensor):
        raise ValueError("attn_mask is a function: pass a mask_mod as mask_mod=... (keyword-only)")
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_no_dropout("flex_attention", args.dropout_p)
    gqa = args.key.shape[1] != args.query.shape[1]
    return args.run(_flex_core, mask_mod=mask_mod, enable_gqa=gqa, compile=compile, BLOCK_SIZE=BLOCK_SIZE)
