"""Additive and multiplicative attention scores, before the Transformer (chapter 0).

Bahdanau, Cho and Bengio (2015) let a translation decoder look back at every encoder
state, with weights from a small network, the *additive* score

    e_ij = vᵀ tanh(W_q q_i + W_k k_j),        W_q (h, Eq), W_k (h, Ek), v (h,)

Luong, Pham and Manning (2015) compared it with *multiplicative* scores:

    "dot":      e_ij = q_iᵀ k_j
    "general":  e_ij = q_iᵀ W k_j,             W (Eq, Ek)

Every variant then does the same thing with its scores, written once here
(:func:`_attend`): add the mask, softmax over the keys, average the values. A query
whose keys are all masked gets weights 0 and output 0, never NaN.

The functions take SDPA's arguments, in SDPA's order, plus their parameters as
keyword-only tensors, and accept what :func:`attention_lib.attention.scaled_dot_product_attention`
accepts (rank >= 2 with layout (..., L, E), broadcast batch, GQA, bool or float masks,
``is_causal``). Two differences, both from the papers: ``scale`` defaults to 1 (neither
paper scales its scores), and additive attention lets queries and keys have different
sizes (``Eq != Ek``), as does "general".

The additive score materialises a (..., L, S, h) tensor of tanh, where the dot product
needs one matrix product: chapter 0 measures what that costs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import _shape, accumulation_dtype, repeat_kv, sdpa_inputs
from .softmax import softmax

__all__ = [
    "additive_scores",
    "additive_attention",
    "additive_attention_weights",
    "multiplicative_scores",
    "multiplicative_attention",
    "multiplicative_attention_weights",
    "AdditiveAttention",
    "LuongAttention",
]


# ----------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------


def _check_inputs(query, key) -> None:
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have rank >= 2 with layout (..., L, E); got rank {t.dim()} with shape {_shape(t)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if key.dtype != query.dtype or key.device != query.device:
        raise ValueError(
            f"query and key must share one dtype and device; got query {query.dtype} on {query.device}, "
            f"key {key.dtype} on {key.device}"
        )


def _check_weight(name: str, w, shape: tuple, like: torch.Tensor, what: str) -> None:
    """``w`` must be a tensor of ``shape`` (None entries are free) with ``like``'s dtype/device."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}, got {type(w).__name__}")
    if w.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, w.shape)):
        raise ValueError(f"{name} must have shape {what}; got {_shape(w)}")
    if w.dtype != like.dtype or w.device != like.device:
        raise ValueError(
            f"{name} must have the query's dtype {like.dtype} on {like.device}; got {w.dtype} on {w.device}"
        )


def _check_additive(query, key, w_q, w_k, w_v) -> None:
    _check_inputs(query, key)
    Eq, Ek = query.shape[-1], key.shape[-1]
    if not isinstance(w_v, torch.Tensor) or w_v.dim() != 1 or w_v.shape[0] < 1:
        got = _shape(w_v) if isinstance(w_v, torch.Tensor) else type(w_v).__name__
        raise ValueError(f"w_v must be a tensor of shape (h,) with h >= 1 hidden units; got {got}")
    h = w_v.shape[0]
    _check_weight("w_q", w_q, (h, Eq), query, f"(h, Eq) = ({h}, {Eq}) for query {_shape(query)}")
    _check_weight("w_k", w_k, (h, Ek), query, f"(h, Ek) = ({h}, {Ek}) for key {_shape(key)}")
    _check_weight("w_v", w_v, (h,), query, f"(h,) = ({h},)")


def _check_multiplicative(query, key, weight) -> None:
    _check_inputs(query, key)
    if weight is None:
        if query.shape[-1] != key.shape[-1]:
            raise ValueError(
                f'the "dot" score needs query and key of one size E (pass weight= for "general"): '
                f"query {_shape(query)}, key {_shape(key)}"
            )
        return
    Eq, Ek = query.shape[-1], key.shape[-1]
    _check_weight("weight", weight, (Eq, Ek), query, f"(Eq, Ek) = ({Eq}, {Ek}) for query {_shape(query)}, key {_shape(key)}")


# ----------------------------------------------------------------------------------
# Scores, then one rule for what every variant does with them
# ----------------------------------------------------------------------------------


def _additive_core_scores(qp: torch.Tensor, kp: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """vᵀ tanh(qp_i + kp_j) for projected inputs qp (..., L, h), kp (..., S, h): (..., L, S)."""
    hidden = torch.tanh(qp.unsqueeze(-2) + kp.unsqueeze(-3))  # (..., L, S, h): one tanh per pair and unit
    return hidden @ w_v  # (..., L, S)


def _masked(scores: torch.Tensor, attn_mask, is_causal: bool) -> torch.Tensor:
    """The scores with a bool (True = may attend) or float mask, or top-left causal."""
    L, S = scores.shape[-2:]
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()  # top-left
        scores = scores.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores


def _attend(scores, value, attn_mask, dropout_p, is_causal, scale) -> torch.Tensor:
    """softmax(scores · scale + mask) V for 4-D inputs: (B, Hq, L, Ev)."""
    weights = softmax(_masked(scores * scale, attn_mask, is_causal), dim=-1)  # (B, Hq, L, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    v = repeat_kv(value.to(weights.dtype), scores.shape[1])  # (B, Hq, S, Ev)
    return weights @ v


def _additive_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, w_q, w_k, w_v):
    _check_additive(query, key, w_q, w_k, w_v)
    dtype = accumulation_dtype(query.dtype)
    qp = query.to(dtype) @ w_q.to(dtype).T  # (..., L, h): W_q q_i, once per query
    kp = key.to(dtype) @ w_k.to(dtype).T  # (..., S, h): W_k k_j, once per key
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"value must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != query.dtype:
        raise ValueError(f"value must have the query's dtype {query.dtype}, got {value.dtype}")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == query.dtype:
        attn_mask = attn_mask.to(dtype)  # a float16 mask for float16 inputs, as SDPA accepts
    args = sdpa_inputs(qp, kp, value.to(dtype), attn_mask, dropout_p, is_causal, 1.0 if scale is None else scale, enable_gqa)
    return args, w_v.to(dtype)


def additive_scores(query: torch.Tensor, key: torch.Tensor, *, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """Bahdanau's scores ``e_ij = w_vᵀ tanh(w_q q_i + w_k k_j)``, unmasked: (..., L, S).

    Args:
        query: (..., L, Eq).
        key: (..., S, Ek), leading dimensions broadcastable with the query's.
        w_q: (h, Eq). w_k: (h, Ek). w_v: (h,).
    """
    _check_additive(query, key, w_q, w_k, w_v)
    return _additive_core_scores(query @ w_q.T, key @ w_k.T, w_v)  # (..., L, S)


def additive_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
) -> torch.Tensor:
    """Additive attention ``softmax(scale · w_vᵀ tanh(w_q q_i + w_k k_j) + mask) V``.

    Args:
        query: (..., Hq, L, Eq), rank >= 2.
        key: (..., Hkv, S, Ek); ``Ek`` may differ from ``Eq``.
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S). Bool: True = may attend. Float: added.
        dropout_p: dropout on the attention weights, in [0, 1].
        is_causal: top-left causal mask (query ``i`` sees keys ``0..i``).
        scale: multiplies the scores; default 1 (Bahdanau et al. do not scale).
        enable_gqa: allow ``Hq % Hkv == 0`` (grouped-query attention).
        w_q: (h, Eq), w_k: (h, Ek), w_v: (h,), keyword-only: the score network.

    Returns:
        (..., Hq, L, Ev) in the inputs' dtype (float16/bfloat16 computed in float32).

    Raises:
        ValueError: naming the argument and the shapes seen.
    """
    args, v = _additive_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, w_q, w_k, w_v)
    if args.empty:
        return args.zeros().to(query.dtype)

    def core(q, k, val, mask, p, causal, s):
        scores = _additive_core_scores(q, repeat_kv(k, q.shape[1]), v)  # (B, Hq, L, S)
        return _attend(scores, val, mask, p, causal, s)

    return args.run(core).to(query.dtype)


def additive_attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
) -> torch.Tensor:
    """The weights of :func:`additive_attention`: (..., Hq, L, S), rows summing to 1 (or 0)."""
    if not isinstance(key, torch.Tensor):
        raise ValueError(f"key must be a torch.Tensor, got {type(key).__name__}")
    value = key.new_zeros(()).expand(*key.shape[:-1], 1)  # (..., S, 1): only its shape is used
    args, v = _additive_inputs(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, w_q, w_k, w_v)
    S = args.key.shape[-2]
    if args.empty:
        return args.zeros(S).to(query.dtype)
    scores = _additive_core_scores(args.query, repeat_kv(args.key, args.query.shape[1]), v)  # (B, Hq, L, S)
    w = softmax(_masked(scores * args.scale, args.attn_mask, args.is_causal), dim=-1)
    return args.finish(w).to(query.dtype)


def multiplicative_scores(query: torch.Tensor, key: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Luong's scores, unmasked and unscaled: ``q_iᵀ k_j`` ("dot") or ``q_iᵀ W k_j`` ("general").

    Args:
        query: (..., L, Eq).
        key: (..., S, Ek); ``Ek == Eq`` for "dot".
        weight: None ("dot") or (Eq, Ek) ("general").

    Returns:
        (..., L, S).
    """
    _check_multiplicative(query, key, weight)
    q = query if weight is None else query @ weight  # (..., L, Ek): q_iᵀ W, once per query
    return q @ key.transpose(-2, -1)  # (..., L, S): one matrix product


def _multiplicative_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, weight):
    _check_multiplicative(query, key, weight)
    q = query if weight is None else (query.to(accumulation_dtype(query.dtype)) @ weight.to(accumulation_dtype(query.dtype))).to(query.dtype)
    return sdpa_inputs(q, key, value, attn_mask, dropout_p, is_causal, 1.0 if scale is None else scale, enable_gqa)


def multiplicative_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Luong's multiplicative attention ``softmax(scale · q_iᵀ W k_j + mask) V``.

    With ``weight=None`` ("dot") and ``scale=1/sqrt(E)`` this is scaled dot-product
    attention, chapter 4's :func:`attention_lib.scaled_dot_product_attention`.

    Args:
        query: (..., Hq, L, Eq), rank >= 2.
        key: (..., Hkv, S, Ek); ``Ek == Eq`` unless ``weight`` is given.
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S). Bool: True = may attend. Float: added.
        dropout_p: dropout on the attention weights, in [0, 1].
        is_causal: top-left causal mask.
        scale: multiplies the scores; default 1 (Luong et al. do not scale).
        enable_gqa: allow ``Hq % Hkv == 0``.
        weight: None ("dot") or (Eq, Ek) ("general"), keyword-only.

    Returns:
        (..., Hq, L, Ev) in the inputs' dtype.

    Raises:
        ValueError: naming the argument and the shapes seen.
    """
    args = _multiplicative_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, weight)
    if args.empty:
        return args.zeros()
    dtype = accumulation_dtype(query.dtype)

    def core(q, k, val, mask, p, causal, s):
        scores = q.to(dtype) @ repeat_kv(k.to(dtype), q.shape[1]).transpose(-2, -1)  # (B, Hq, L, S)
        return _attend(scores, val.to(dtype), mask, p, causal, s)

    return args.run(core).to(query.dtype)


def multiplicative_attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights of :func:`multiplicative_attention`: (..., Hq, L, S)."""
    if not isinstance(key, torch.Tensor):
        raise ValueError(f"key must be a torch.Tensor, got {type(key).__name__}")
    value = key.new_zeros(()).expand(*key.shape[:-1], 1)  # (..., S, 1): only its shape is used
    args = _multiplicative_inputs(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, weight)
    S = args.key.shape[-2]
    if args.empty:
        return args.zeros(S)
    dtype = accumulation_dtype(query.dtype)
    scores = args.query.to(dtype) @ repeat_kv(args.key.to(dtype), args.query.shape[1]).transpose(-2, -1)
    w = softmax(_masked(scores * args.scale, args.attn_mask, args.is_causal), dim=-1)  # (B, Hq, L, S)
    return args.finish(w).to(query.dtype)


# ----------------------------------------------------------------------------------
# Thin modules: hold the parameters, call the functions
# ----------------------------------------------------------------------------------


class AdditiveAttention(nn.Module):
    """Bahdanau's additive attention with its score network as parameters.

    Args:
        query_dim: Eq, the size of a query (a decoder state in the paper).
        key_dim: Ek, the size of a key (an encoder annotation).
        hidden_dim: h, the hidden units of the score network.
        dropout: dropout on the attention weights while training.

    ``forward(query, key, value, attn_mask=None, is_causal=False)`` takes query
    (..., L, Eq), key (..., S, Ek), value (..., S, Ev) and returns (..., L, Ev);
    ``weights(query, key, attn_mask=None, is_causal=False)`` returns (..., L, S).
    Masks follow SDPA's convention (bool True = may attend).
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        for name, n in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        self.w_q = nn.Linear(query_dim, hidden_dim, bias=False)  # weight (h, Eq)
        self.w_k = nn.Linear(key_dim, hidden_dim, bias=False)  # weight (h, Ek)
        self.w_v = nn.Parameter(torch.empty(hidden_dim).uniform_(-hidden_dim**-0.5, hidden_dim**-0.5))  # (h,)
        self.dropout = dropout

    def _params(self):
        return {"w_q": self.w_q.weight, "w_k": self.w_k.weight, "w_v": self.w_v}

    def forward(self, query, key, value, attn_mask=None, is_causal=False):
        p = self.dropout if self.training else 0.0
        return additive_attention(query, key, value, attn_mask, p, is_causal, **self._params())

    def weights(self, query, key, attn_mask=None, is_causal=False):
        return additive_attention_weights(query, key, attn_mask, is_causal, **self._params())


class LuongAttention(nn.Module):
    """Luong's multiplicative attention: ``score="dot"`` (no parameters) or ``"general"``.

    Args:
        query_dim: Eq. key_dim: Ek (must equal Eq for "dot").
        score: ``"dot"`` (``q·k``) or ``"general"`` (``qᵀ W k``, W of shape (Eq, Ek)).
        dropout: dropout on the attention weights while training.

    ``forward`` and ``weights`` as in :class:`AdditiveAttention`.
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, score: str = "general", dropout: float = 0.0):
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        if score not in ("dot", "general"):
            raise ValueError(f'score must be "dot" or "general", got {score!r}')
        if score == "dot" and key_dim != query_dim:
            raise ValueError(f'the "dot" score needs key_dim == query_dim, got {key_dim} and {query_dim}')
        self.score = score
        self.weight = nn.Parameter(torch.empty(query_dim, key_dim)) if score == "general" else None  # (Eq, Ek)
        if self.weight is not None:
            nn.init.normal_(self.weight, std=(query_dim * key_dim) ** -0.25)  # q W k of the size of q·k
        self.dropout = dropout

    def forward(self, query, key, value, attn_mask=None, is_causal=False):
        p = self.dropout if self.training else 0.0
        return multiplicative_attention(query, key, value, attn_mask, p, is_causal, weight=self.weight)

    def weights(self, query, key, attn_mask=None, is_causal=False):
        return multiplicative_attention_weights(query, key, attn_mask, is_causal, weight=self.weight)
