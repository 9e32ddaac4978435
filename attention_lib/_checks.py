"""Argument checks shared by every public attention function.

Public functions validate at the boundary and raise ``ValueError`` that names the
argument and the shapes seen; internals trust their inputs (STYLE.md, point 6).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_attention_args", "check_positive_int", "check_window", "repeat_kv"]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _broadcastable(mask_shape: torch.Size, target: tuple[int, ...]) -> bool:
    if len(mask_shape) > len(target):
        return False
    for m, t in zip(reversed(mask_shape), reversed(target)):
        if m != 1 and m != t:
            return False
    return True


def check_attention_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> float:
    """Validate the arguments of an SDPA-style call and return the resolved scale.

    Shapes (the layout used throughout the course):
        query: (B, Hq, L, E)
        key:   (B, Hkv, S, E)
        value: (B, Hkv, S, Ev)
        attn_mask: broadcastable to (B, Hq, L, S); bool (True = may attend) or an
            additive float mask of the query's dtype.

    Returns:
        The softmax scale: ``scale`` if given, else ``1 / sqrt(E)``.

    Raises:
        ValueError: naming the argument and the shapes seen.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 with layout (B, H, L, E); got rank {t.dim()} "
                f"with shape {_shape(t)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")

    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            "query, key and value must share one dtype; got "
            f"query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "query, key and value must be on one device; got "
            f"query on {query.device}, key on {key.device}, value on {value.device}"
        )

    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    Bv, Hv, Sv, _ = value.shape
    if Bk != B or Bv != B:
        raise ValueError(
            f"batch size mismatch: query {_shape(query)}, key {_shape(key)}, "
            f"value {_shape(value)} (dimension 0 must agree)"
        )
    if Ek != E:
        raise ValueError(
            f"query and key must have the same head dim E: query {_shape(query)}, "
            f"key {_shape(key)}"
        )
    if Sv != S or Hv != Hkv:
        raise ValueError(
            f"key and value must agree in heads and length: key {_shape(key)}, "
            f"value {_shape(value)}"
        )
    if Hkv != Hq:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads but key/value have {Hkv}: pass enable_gqa=True "
                f"for grouped-query attention (query {_shape(query)}, key {_shape(key)})"
            )
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(
                f"for GQA the number of query heads ({Hq}) must be divisible by the "
                f"number of key/value heads ({Hkv}): query {_shape(query)}, key {_shape(key)}"
            )

    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                f"attn_mask must be bool (True = may attend) or an additive float mask; "
                f"got dtype {attn_mask.dtype} with shape {_shape(attn_mask)}"
            )
        if attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
            raise ValueError(
                f"a float attn_mask must have the query's dtype {query.dtype}; got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise ValueError(
                f"attn_mask is on {attn_mask.device} but query is on {query.device}"
            )
        if not _broadcastable(attn_mask.shape, (B, Hq, L, S)):
            raise ValueError(
                f"attn_mask of shape {_shape(attn_mask)} does not broadcast to "
                f"(B, H, L, S) = ({B}, {Hq}, {L}, {S})"
            )
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both")

    if not isinstance(dropout_p, numbers.Real) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")

    if scale is None:
        return 1.0 / math.sqrt(E)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    return float(scale)


def check_positive_int(name: str, value) -> int:
    """Validate a size argument (a window, a chunk or tile size): a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    return int(value)


def check_window(window) -> int:
    """Validate a sliding-window size: a positive integer (number of keys a query sees)."""
    return check_positive_int("window", window)


def repeat_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat key/value heads for GQA: (B, Hkv, S, D) -> (B, Hq, S, D).

    Query head ``h`` uses key/value head ``h // (Hq // Hkv)``, as in PyTorch's
    ``enable_gqa=True`` (``repeat_interleave`` along the head dimension).
    """
    n_rep = num_q_heads // x.shape[1]
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)  # (B, Hq, S, D)
