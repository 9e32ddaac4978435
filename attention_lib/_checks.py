"""The front-end shared by every public attention function: check, then normalise.

Public functions validate at the boundary and raise ``ValueError`` that names the
argument and the shapes seen; internals trust their inputs (STYLE.md, point 6).

:func:`sdpa_inputs` is the one place where the calling convention of
``torch.nn.functional.scaled_dot_product_attention`` is implemented, so that every
variant accepts what PyTorch accepts and each variant's core only ever sees 4-D
``(B, H, L, E)`` tensors:

* any rank >= 2, ``(..., L, E)``; dimension -3 (if any) is the head dimension;
* leading dimensions that broadcast between query, key and value (B = 1 against
  B = 2, one key/value head against many query heads), as ``torch.matmul`` does;
* ``enable_gqa``: key/value heads that divide the query heads (query head ``h``
  uses key/value head ``h // (Hq // Hkv)``, PyTorch's ``repeat_interleave``);
* ``attn_mask``: bool (True = may attend), a float mask of the query's dtype or
  float32, or a ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` /
  ``causal_lower_right``), broadcastable to the scores ``(..., L, S)``;
* ``scale``: any finite number (negative and 0 too) or a 0-d tensor; ``None`` gives
  ``1/sqrt(E)``;
* zero sizes: an empty output (B, H, L or Ev = 0), zeros when there are no keys
  (S = 0), and uniform weights when the head dim is E = 0 (every score is an empty
  sum, 0), as PyTorch does; backward works in every case.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "SDPAInputs",
    "sdpa_inputs",
    "check_attention_args",
    "check_no_dropout",
    "check_positive_int",
    "check_window",
    "accumulation_dtype",
    "compute_dtype",
    "repeat_kv",
]


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")" if isinstance(t, (tuple, torch.Size)) else _shape(t.shape)


def _broadcastable(mask_shape: torch.Size, target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``mask_shape`` broadcasts to ``target`` without enlarging it."""
    if len(mask_shape) > len(target):
        return False
    return all(m == 1 or m == t for m, t in zip(reversed(mask_shape), reversed(target)))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate in: float64 for float64, float32 for everything else.

    float16 and bfloat16 scores, sums and matmuls are computed in float32 (as PyTorch's
    math path does on CPU, and as a GPU kernel accumulates), then cast back. This is
    the one place that rule is written; every module that upcasts calls it.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


compute_dtype = accumulation_dtype  # the former name, kept for code written against it


# ----------------------------------------------------------------------------------
# One check per argument
# ----------------------------------------------------------------------------------


def _check_tensors(query, key, value, min_rank: int = 2) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < min_rank:
            raise ValueError(
                f"{name} must have rank >= {min_rank} with layout (..., L, E); got rank {t.dim()} "
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
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"query and key must have the same head dim E: query {_shape(query)}, key {_shape(key)}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"key and value must agree in length S (dimension -2): key {_shape(key)}, value {_shape(value)}"
        )


def _check_mask_tensor(attn_mask, query: torch.Tensor, scores_shape: tuple[int, ...]) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(
            f"attn_mask must be bool (True = may attend) or an additive float mask; "
            f"got dtype {attn_mask.dtype} with shape {_shape(attn_mask)}"
        )
    if attn_mask.is_floating_point() and attn_mask.dtype not in (query.dtype, torch.float32):
        raise ValueError(
            f"a float attn_mask must have the query's dtype {query.dtype} (or float32); got {attn_mask.dtype}"
        )
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if not _broadcastable(attn_mask.shape, scores_shape):
        raise ValueError(
            f"attn_mask of shape {_shape(attn_mask)} does not broadcast to the scores "
            f"(..., H, L, S) = {_shape(scores_shape)}"
        )


def check_dropout(dropout_p) -> float:
    """``dropout_p`` must be a number in [0, 1] (1 drops every weight, as in PyTorch)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not (0.0 <= float(dropout_p) <= 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    return float(dropout_p)


def check_no_dropout(name: str, dropout_p: float) -> None:
    """For variants without attention dropout: ``dropout_p`` must be 0."""
    if dropout_p != 0.0:
        raise ValueError(
            f"{name} does not implement attention dropout (got dropout_p={dropout_p}); "
            "use scaled_dot_product_attention when training with dropout"
        )


def resolve_scale(scale, E: int) -> float:
    """``scale`` as a float: ``1/sqrt(E)`` if None; any finite number or a 0-d tensor.

    PyTorch also accepts NaN and inf and returns NaN or garbage; here they raise.
    """
    if scale is None:
        return 1.0 / math.sqrt(E) if E > 0 else 1.0  # E = 0: every score is 0 anyway
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or scale.dtype == torch.bool or scale.is_complex():
            raise ValueError(
                f"scale must be a number, a 0-d real tensor or None; got a tensor of shape "
                f"{_shape(scale)} and dtype {scale.dtype}"
            )
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, a 0-d tensor or None, got {scale!r}")
    return float(scale)


def is_causal_bias(attn_mask) -> bool:
    """Whether ``attn_mask`` is a ``torch.nn.attention.bias.CausalBias``."""
    # Not imported here: torch.nn.attention.bias imports triton, which must not happen
    # before TRITON_INTERPRET is decided (see attention_lib.triton_flash). An object
    # can only be a CausalBias if its module was imported by whoever made it.
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(attn_mask, bias.CausalBias)


def _causal_bias(attn_mask, is_causal: bool, L: int, S: int, device):
    """Translate a ``torch.nn.attention.bias.CausalBias`` into (attn_mask, is_causal).

    ``causal_upper_left``: query ``i`` sees keys ``j <= i`` (``is_causal=True``).
    ``causal_lower_right``: the last query lines up with the last key, ``j <= i + S - L``;
    given as a dense bool (L, S) mask (rows with no key, ``i < L - S``, give 0).
    Returns None if ``attn_mask`` is not a CausalBias.
    """
    if not is_causal_bias(attn_mask):
        return None
    CausalVariant = sys.modules["torch.nn.attention.bias"].CausalVariant
    if is_causal:
        raise ValueError("attn_mask is a CausalBias: it already is the causal mask, so pass is_causal=False")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
        raise ValueError(
            f"attn_mask is a CausalBias for (L, S) = ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) "
            f"but query and key have (L, S) = ({L}, {S})"
        )
    if attn_mask.variant == CausalVariant.UPPER_LEFT or L == S:
        return None, True
    if attn_mask.variant == CausalVariant.LOWER_RIGHT:
        q_idx = torch.arange(L, device=device).view(L, 1)
        k_idx = torch.arange(S, device=device).view(1, S)
        return q_idx + (S - L) >= k_idx, False  # (L, S), bottom-right
    raise ValueError(f"unknown CausalBias variant {attn_mask.variant!r}")


# ----------------------------------------------------------------------------------
# The front-end
# ----------------------------------------------------------------------------------


class _ZeroAttention(torch.autograd.Function):
    """Zeros of a given shape whose gradient with respect to every input is 0.

    For empty problems (nothing to compute, or no keys): the output stays in the
    autograd graph, so ``backward`` gives zero gradients of the inputs' shapes.
    """

    @staticmethod
    def forward(ctx, shape, like, *inputs):
        ctx.shapes = [None if t is None else (t.shape, t.dtype, t.device) for t in inputs]
        return like.new_zeros(shape)

    @staticmethod
    def backward(ctx, grad):
        grads = [
            None if s is None or not need else torch.zeros(s[0], dtype=s[1], device=s[2])
            for s, need in zip(ctx.shapes, ctx.needs_input_grad[2:])
        ]
        return (None, None, *grads)


class SDPAInputs(NamedTuple):
    """An SDPA call, checked and normalised to 4-D.

    query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev) with
    ``Hq % Hkv == 0`` (query head ``h`` uses key/value head ``h // (Hq // Hkv)``);
    ``attn_mask`` None or a bool / float tensor of rank <= 4 broadcastable to
    (B, Hq, L, S) (a ``CausalBias`` has become ``is_causal`` or a dense mask);
    ``scale`` a float. ``lead`` is the output's leading shape, so that the output is
    ``(*lead, L, Ev)``.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float
    lead: tuple[int, ...]

    @property
    def empty(self) -> bool:
        """True if there is nothing to compute: an empty output, or no keys (zeros)."""
        B, H, L, _ = self.query.shape
        return 0 in (B, H, L, self.key.shape[-2], self.value.shape[-1])

    def zeros(self, last: int | None = None) -> torch.Tensor:
        """The output of an empty problem, (*lead, L, last or Ev), kept in the graph."""
        L = self.query.shape[-2]
        last = self.value.shape[-1] if last is None else last
        return _ZeroAttention.apply((*self.lead, L, last), self.query, self.query, self.key, self.value, self.attn_mask)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, L, X) from a core back to the caller's (*lead, L, X)."""
        shape = (*self.lead, *out.shape[-2:])
        return out if tuple(out.shape) == shape else out.reshape(shape)

    def run(self, core: Callable[..., torch.Tensor], **knobs) -> torch.Tensor:
        """``core(query, key, value, attn_mask, dropout_p, is_causal, scale, **knobs)`` on
        the 4-D tensors, reshaped back; empty problems never reach the core."""
        if self.empty:
            return self.zeros()
        out = core(self.query, self.key, self.value, self.attn_mask, self.dropout_p, self.is_causal, self.scale, **knobs)
        return self.finish(out)


def _flatten(t: torch.Tensor, n: int, batch: tuple[int, ...], heads: int) -> torch.Tensor:
    """(..., h, L, E) with ``n`` leading dims (after padding) -> (prod(batch), heads, L, E)."""
    target = (math.prod(batch), heads, *t.shape[-2:]) if n else (1, 1, *t.shape[-2:])
    if tuple(t.shape) == target:
        return t  # already 4-D: no view in the autograd graph
    t = t.reshape((1,) * (n + 2 - t.dim()) + tuple(t.shape))
    if n == 0:
        return t.reshape(1, 1, *t.shape[-2:])
    t = t.expand(*batch, heads, *t.shape[-2:])
    return t.reshape(math.prod(batch), heads, *t.shape[-2:])  # a view unless batch dims broadcast


def sdpa_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> SDPAInputs:
    """Check the arguments of an SDPA-style call and normalise them to 4-D.

    Shapes (PyTorch's convention; ``...`` are batch dimensions that broadcast):
        query: (..., Hq, L, E), rank >= 2.
        key:   (..., Hkv, S, E).
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S); bool (True = may attend), an
            additive float mask (the query's dtype or float32), or a CausalBias.

    Returns:
        An :class:`SDPAInputs`; its ``run(core)`` calls a 4-D core and reshapes back.

    Raises:
        ValueError: naming the argument and the shapes seen.
    """
    _check_tensors(query, key, value)
    dropout_p = check_dropout(dropout_p)
    is_causal = bool(is_causal)
    L, E, S = query.shape[-2], query.shape[-1], key.shape[-2]
    shapes = f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"

    # Leading dimensions, padded to one rank n: (..., heads).
    n = max(query.dim(), key.dim(), value.dim()) - 2
    lq, lk, lv = ((1,) * (n + 2 - t.dim()) + tuple(t.shape[:-2]) for t in (query, key, value))
    hq, hk, hv = (lead[-1] if n else 1 for lead in (lq, lk, lv))
    if enable_gqa:
        if n == 0:
            raise ValueError(f"enable_gqa=True needs a head dimension (rank >= 3): {shapes}")
        for name, h in (("key", hk), ("value", hv)):
            if (h == 0 and hq != 0) or (h != 0 and hq % h != 0):
                raise ValueError(
                    f"for GQA the number of query heads ({hq}) must be divisible by the "
                    f"number of {name} heads ({h}): {shapes}"
                )
        H = hq
    else:
        try:
            (H,) = torch.broadcast_shapes((hq,), (hk,), (hv,))
        except RuntimeError:
            raise ValueError(
                f"query has {hq} heads but key/value have {hk}/{hv}: pass enable_gqa=True for "
                f"grouped-query attention, or give them equal head counts (or 1): {shapes}"
            ) from None
    try:
        batch = tuple(torch.broadcast_shapes(lq[:-1], lk[:-1], lv[:-1])) if n else ()
    except RuntimeError:
        raise ValueError(f"the batch dimensions of query, key and value do not broadcast: {shapes}") from None
    lead = (*batch, H) if n else ()

    # Key/value heads: shared by groups of query heads (GQA, or one head broadcast)
    # if key and value agree; otherwise both are given H heads.
    q4 = _flatten(query, n, batch, hq)  # (B, hq, L, E)
    if hq != H:  # one query head broadcast over the key/value heads
        q4 = q4.expand(-1, H, -1, -1)  # (B, H, L, E)
    k4 = _flatten(key, n, batch, hk)  # (B, hk, S, E)
    v4 = _flatten(value, n, batch, hv)  # (B, hv, S, Ev)
    if hk != hv:
        k4, v4 = repeat_kv(k4, H), repeat_kv(v4, H)  # (B, H, S, E), (B, H, S, Ev)

    # The mask, in the scores' shape (*lead, L, S) -> 4-D.
    translated = _causal_bias(attn_mask, is_causal, L, S, query.device) if attn_mask is not None else None
    if translated is not None:
        attn_mask, is_causal = translated
    m4 = None
    if attn_mask is not None:
        _check_mask_tensor(attn_mask, query, (*lead, L, S))
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both")
        m = attn_mask.reshape((1,) * (len(lead) + 2 - attn_mask.dim()) + tuple(attn_mask.shape))
        if attn_mask.dim() <= 4 and len(lead) == 2:
            m4 = attn_mask  # rank <= 4 broadcasts against (B, H, L, S) as it is
        elif n == 0:
            m4 = m.reshape(1, 1, *m.shape)
        elif all(b == 1 for b in m.shape[: len(batch)]):
            m4 = m.reshape(1, *m.shape[len(batch):])  # (1, H|1, L|1, S|1), a view
        else:
            m4 = m.expand(*batch, *m.shape[len(batch):]).reshape(-1, *m.shape[len(batch):])

    scale = resolve_scale(scale, E)
    inputs = SDPAInputs(q4, k4, v4, m4, dropout_p, is_causal, scale, lead)
    if E == 0 and not inputs.empty:
        # Every score is an empty sum, 0: the same as E = 1 with zeros, and the sums
        # below are exactly that while keeping query and key in the autograd graph.
        inputs = inputs._replace(query=q4.sum(-1, keepdim=True), key=k4.sum(-1, keepdim=True), scale=1.0)
    return inputs


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
    """Validate a 4-D SDPA-style call with equal batch sizes and return the scale.

    For functions whose core is not broadcast through :func:`sdpa_inputs` (linear
    attention, ring attention). Shapes: query (B, Hq, L, E), key (B, Hkv, S, E),
    value (B, Hkv, S, Ev); attn_mask broadcastable to (B, Hq, L, S).

    Raises:
        ValueError: naming the argument and the shapes seen.
    """
    _check_tensors(query, key, value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 with layout (B, H, L, E); got rank {t.dim()} with shape {_shape(t)}"
            )
    B, Hq, L, E = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"batch size mismatch: query {_shape(query)}, key {_shape(key)}, value {_shape(value)} "
            "(dimension 0 must agree)"
        )
    Hkv = key.shape[1]
    if value.shape[1] != Hkv:
        raise ValueError(f"key and value must agree in heads: key {_shape(key)}, value {_shape(value)}")
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
        _check_mask_tensor(attn_mask, query, (B, Hq, L, key.shape[2]))
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both")
    check_dropout(dropout_p)
    return resolve_scale(scale, E)


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
    if x.shape[1] in (0, num_q_heads):
        return x
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)  # (B, Hq, S, D)
