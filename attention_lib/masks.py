"""Attention masks as functions (chapter 5), in the style of PyTorch FlexAttention.

A *mask_mod* is a function ``mask_mod(b, h, q_idx, kv_idx) -> bool`` that says
whether query ``q_idx`` of batch ``b`` and head ``h`` **may attend** to key
``kv_idx``. The arguments are integer tensors; a mask_mod uses only elementwise
tensor operations, so the same function runs

* here, on broadcast index grids, in :func:`create_mask` (dense masks for the
  oracle and for the plain attention functions), and
* unchanged inside ``torch.nn.attention.flex_attention`` (``create_block_mask``).

Compose them with :func:`and_masks` and :func:`or_masks`.

Causal alignment. With ``L`` queries and ``S`` keys and ``L != S``:

* **top-left** (PyTorch's ``is_causal=True``, :data:`causal`): query ``i`` sees keys
  ``0..i``;
* **bottom-right** (decoding with a KV cache, :func:`causal_lower_right`): the last
  query is aligned with the last key, so query ``i`` sees keys ``0..i + S - L``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import cast

import torch

from ._checks import check_window

__all__ = [
    "MaskMod",
    "causal",
    "causal_lower_right",
    "sliding_window",
    "padding",
    "prefix_lm",
    "and_masks",
    "or_masks",
    "create_mask",
    "cache_causal_mask",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# FlexAttention's score_mod(score, b, h, q_idx, kv_idx) -> score; create_mask accepts one too
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(b, h, q_idx, kv_idx):
    """Top-left causal mask: query ``i`` sees keys ``j <= i``.

    Materialised for L = 3 queries, S = 4 keys (row = query, 1 = may attend)::

        1 0 0 0
        1 1 0 0
        1 1 1 0
    """
    return q_idx >= kv_idx


def causal_lower_right(q_len: int, kv_len: int) -> MaskMod:
    """Bottom-right causal mask: the last query lines up with the last key.

    Query ``i`` sees keys ``j <= i + (kv_len - q_len)``. This is the mask for new
    tokens appended after a KV cache. For ``q_len=2, kv_len=4``::

        1 1 1 0
        1 1 1 1
    """
    offset = int(kv_len) - int(q_len)

    def causal_lower_right_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_lower_right_mod


def sliding_window(window: int) -> MaskMod:
    """Causal sliding window of ``window`` keys: query ``i`` sees ``i - window < j <= i``.

    Top-left aligned, like :data:`causal`. For ``window=2`` and L = S = 4::

        1 0 0 0
        1 1 0 0
        0 1 1 0
        0 0 1 1

    Raises:
        ValueError: if ``window`` is not a positive integer.
    """
    window = check_window(window)

    def sliding_window_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d < window)

    return sliding_window_mod


def padding(lengths: torch.Tensor) -> MaskMod:
    """Key padding: in batch ``b`` only the first ``lengths[b]`` keys are real.

    ``lengths`` is an integer tensor of shape (B,). For ``lengths=[3, 1]`` and S = 4,
    every query row of batch 0 is ``1 1 1 0`` and of batch 1 is ``1 0 0 0``.
    A length of 0 masks every key: those rows give output 0.
    """
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D integer tensor of shape (B,), got dtype {lengths.dtype} "
            f"and shape {tuple(lengths.shape)}"
        )

    def padding_mod(b, h, q_idx, kv_idx):
        return kv_idx < lengths.to(kv_idx.device)[b]

    return padding_mod


def prefix_lm(prefix_len: int) -> MaskMod:
    """Prefix-LM: every query sees the first ``prefix_len`` keys (bidirectional
    prefix), and is causal (top-left) after it. For ``prefix_len=2``, L = S = 4::

        1 1 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1
    """
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be a non-negative int, got {prefix_len!r}")

    def prefix_lm_mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)

    return prefix_lm_mod


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod that allows a pair only if every one of ``mask_mods`` allows it."""
    if not mask_mods:
        raise ValueError("and_masks needs at least one mask_mod")

    def and_mod(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return and_mod


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask_mod that allows a pair if any one of ``mask_mods`` allows it."""
    if not mask_mods:
        raise ValueError("or_masks needs at least one mask_mod")

    def or_mod(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return or_mod


def _num_positional(fn: Callable) -> int:
    """Positional parameters without a default: 4 for a mask_mod, 5 for a score_mod."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise ValueError(f"mask_mod must be a function, got {type(fn).__name__}") from None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def create_mask(
    mask_mod: MaskMod | ScoreMod,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Materialise ``mask_mod`` as a dense bool tensor of shape (B, H, Q_LEN, KV_LEN).

    ``B`` or ``H`` may be ``None``, giving a dimension of size 1 that broadcasts, as in
    ``torch.nn.attention.flex_attention.create_mask``, with which it agrees. Like it,
    it also takes a 5-argument *score_mod* ``score_mod(score, b, h, q_idx, kv_idx)``:
    it is applied to scores of 0, and a pair is allowed unless the result is ``-inf``.

    Raises:
        ValueError: if ``mask_mod`` takes neither 4 nor 5 positional arguments.
    """
    B = 1 if B is None else int(B)
    H = 1 if H is None else int(H)
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(Q_LEN, device=device).view(1, 1, Q_LEN, 1)
    kv = torch.arange(KV_LEN, device=device).view(1, 1, 1, KV_LEN)
    n_args = _num_positional(mask_mod)
    fn = cast(Callable[..., torch.Tensor], mask_mod)  # which of the two it is, we know at run time
    if n_args == 4:
        out = torch.as_tensor(fn(b, h, q, kv), device=device)
    elif n_args == 5:  # a score_mod: which scores does it leave finite (or +inf)?
        score = fn(torch.zeros(B, H, Q_LEN, KV_LEN, device=device), b, h, q, kv)
        out = ~torch.isneginf(torch.as_tensor(score, device=device))
    else:
        raise ValueError(
            f"mask_mod must take 4 arguments (b, h, q_idx, kv_idx), or 5 for a score_mod "
            f"(score, b, h, q_idx, kv_idx); got {n_args}"
        )
    return out.to(torch.bool).expand(B, H, Q_LEN, KV_LEN).contiguous()


def cache_causal_mask(
    q_len: int, kv_len: int, attn_mask: torch.Tensor | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor | None:
    """Bottom-right causal mask for ``q_len`` new queries over ``kv_len`` keys, AND-ed with ``attn_mask``.

    The mask of decoding with a KV cache (chapter 11): the new queries are the last
    ``q_len`` positions, so query ``i`` sees keys ``j <= i + kv_len - q_len``
    (:func:`causal_lower_right`). For ``q_len=2, kv_len=4``::

        1 1 1 0
        1 1 1 1

    Returns a mask broadcastable to (B, H, q_len, kv_len): bool if ``attn_mask`` is
    None or bool, additive float if ``attn_mask`` is float. With one new query every
    key is visible, so ``attn_mask`` is returned unchanged (possibly None).
    """
    if q_len == 1 and kv_len >= 1:
        return attn_mask
    allowed = create_mask(causal_lower_right(q_len, kv_len), None, None, q_len, kv_len, device)
    if attn_mask is None:
        return allowed  # (1, 1, q_len, kv_len)
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return attn_mask.masked_fill(~allowed, float("-inf"))
