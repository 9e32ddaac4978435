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

from typing import Callable

import torch

from ._checks import check_attention_args

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


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask_mod: Callable | None = None,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    compile: bool = True,
    BLOCK_SIZE: int = 128,
) -> torch.Tensor:
    """Attention with a mask given as a mask_mod, through PyTorch's FlexAttention.

    Args:
        query: (B, Hq, L, E).
        key: (B, Hkv, S, E).
        value: (B, Hkv, S, Ev).
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend), e.g.
            ``attention_lib.masks.sliding_window(256)``; None attends everywhere.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq``.
        compile: use ``torch.compile(flex_attention)`` (the fast path; compiled once
            per process and cached). False runs the unfused reference, which
            materialises the scores: fine for checking small inputs.
        BLOCK_SIZE: tile size of the block mask.

    Returns:
        (B, Hq, L, Ev). Equal to ``attention_ref`` with
        ``attn_mask=masks.create_mask(mask_mod, B, H, L, S)``, up to rounding.
    """
    scale = check_attention_args(query, key, value, None, 0.0, False, scale, enable_gqa)
    from torch.nn.attention.flex_attention import flex_attention as _flex

    B, H, L, _ = query.shape
    S = key.shape[2]
    bm = None
    if mask_mod is not None:
        bm = block_mask(mask_mod, B, H, L, S, device=query.device, BLOCK_SIZE=BLOCK_SIZE)
    fn = _flex
    if compile:
        if "flex" not in _COMPILED:
            _COMPILED["flex"] = torch.compile(_flex, dynamic=False)
        fn = _COMPILED["flex"]
    return fn(query, key, value, block_mask=bm, scale=scale, enable_gqa=enable_gqa)
