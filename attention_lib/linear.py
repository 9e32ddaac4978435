"""Linear attention (Katharopoulos et al. 2020), chapter 10.

Softmax attention weighs value ``j`` for query ``i`` by ``exp(q_i·k_j)``. Replace
that similarity by a kernel ``φ(q_i)·φ(k_j)`` with a positive feature map ``φ``
(the paper uses ``φ(x) = elu(x) + 1``) and the sums can be re-associated:

    out_i = Σ_j φ(q_i)ᵀφ(k_j) v_j / Σ_j φ(q_i)ᵀφ(k_j)
          = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / φ(q_i)ᵀ (Σ_j φ(k_j))
          = φ(q_i)ᵀ S / φ(q_i)ᵀ z,      S = φ(K)ᵀV  (D × Dv),  z = φ(K)ᵀ1  (D)

which costs ``O(L·D·Dv)`` instead of ``O(L²·D)``. It is a *different* model, not an
approximation of softmax attention that converges to it.

Causal: query ``i`` uses the prefix sums ``S_i = Σ_{j≤i} φ(k_j) v_jᵀ`` and
``z_i = Σ_{j≤i} φ(k_j)``. Written as a recurrence, ``S_i = S_{i-1} + φ(k_i) v_iᵀ``,
it is an RNN whose state does not grow with the sequence (:func:`linear_attention_step`
decodes with it). For training, :func:`linear_attention` computes the same prefix
sums chunk by chunk: exact quadratic attention inside a chunk of ``chunk_size``
tokens, plus a cumulative sum of one ``D × Dv`` state per chunk for everything before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import _shape, accumulation_dtype, check_attention_args, repeat_kv

__all__ = ["FEATURE_MAPS", "LinearAttentionState", "linear_attention", "linear_attention_step"]

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": lambda x: F.elu(x) + 1,  # the paper's choice: positive, smooth
    "relu": F.relu,  # positive but may give a zero denominator (then eps decides)
}


def _feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(feature_map):
        return feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
    return FEATURE_MAPS[feature_map]


def _check_unsupported(attn_mask, dropout_p, scale) -> None:
    if attn_mask is not None:
        raise ValueError(
            "linear_attention cannot apply an arbitrary attn_mask (it never forms the "
            f"L × S scores); got a mask of shape {_shape(attn_mask)}. Use is_causal=True."
        )
    if dropout_p != 0.0:
        raise ValueError(f"linear_attention has no attention weights to drop: dropout_p must be 0, got {dropout_p!r}")
    if scale is not None:
        raise ValueError(f"linear_attention has no softmax temperature: scale must be None, got {scale!r}")


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu1",
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Linear attention ``φ(Q) (φ(K)ᵀV) / φ(Q) (φ(K)ᵀ1)``, in O(L·D·Dv).

    The signature is SDPA's, so that it can be swapped in (e.g. as
    ``MultiHeadAttention(attn_fn=...)``); the SDPA arguments that have no meaning
    here (``attn_mask``, ``dropout_p``, ``scale``) must keep their defaults.

    Args:
        query: (B, Hq, L, D).
        key: (B, Hkv, S, D).
        value: (B, Hkv, S, Dv).
        is_causal: top-left causal: query ``i`` sums over keys ``j <= i``.
        enable_gqa: allow ``Hkv < Hq``.
        feature_map: ``"elu1"`` (``elu(x) + 1``, the paper's), ``"relu"``, or a
            callable applied elementwise to queries and keys (keyword-only).
        eps: added to the denominator, as in the paper's code.
        chunk_size: tokens per chunk of the causal prefix sum; the memory is
            ``O(L·chunk_size + (L / chunk_size)·D·Dv)`` per head.

    Returns:
        (B, Hq, L, Dv) in the inputs' dtype (accumulated in float32 for 16-bit inputs).
    """
    check_attention_args(query, key, value, None, 0.0, is_causal, None, enable_gqa)
    _check_unsupported(attn_mask, dropout_p, scale)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    phi = _feature_map(feature_map)
    acc = accumulation_dtype(query.dtype)
    B, Hq, L, _ = query.shape
    fq = phi(query.to(acc))  # (B, H, L, D)
    fk = repeat_kv(phi(key.to(acc)), Hq)  # (B, H, S, D)
    v = repeat_kv(value.to(acc), Hq)  # (B, H, S, Dv)

    if not is_causal:
        kv = torch.einsum("bhsd,bhse->bhde", fk, v)  # (B, H, D, Dv): the whole "memory"
        z = fk.sum(dim=2)  # (B, H, D)
        num = torch.einsum("bhld,bhde->bhle", fq, kv)  # (B, H, L, Dv)
        den = torch.einsum("bhld,bhd->bhl", fq, z)  # (B, H, L)
        return (num / (den.unsqueeze(-1) + eps)).to(query.dtype)

    # Top-left causal: query i sees keys 0..i, so only the first L keys matter, and
    # missing keys are zero features (they add nothing to S or z).
    fk, v = fk[:, :, :L], v[:, :, :L]
    C = chunk_size
    n = -(-L // C)
    pad_k, pad_q = n * C - fk.shape[2], n * C - L
    fq = F.pad(fq, (0, 0, 0, pad_q)).view(B, Hq, n, C, -1)  # (B, H, n, C, D)
    fk = F.pad(fk, (0, 0, 0, pad_k)).view(B, Hq, n, C, -1)  # (B, H, n, C, D)
    v = F.pad(v, (0, 0, 0, pad_k)).view(B, Hq, n, C, -1)  # (B, H, n, C, Dv)

    # Inside a chunk: the quadratic form of the paper's equation, masked causally.
    a = torch.einsum("bhncd,bhnsd->bhncs", fq, fk)  # (B, H, n, C, C)
    a = a * torch.ones(C, C, dtype=torch.bool, device=a.device).tril()
    num = torch.einsum("bhncs,bhnse->bhnce", a, v)  # (B, H, n, C, Dv)
    den = a.sum(dim=-1)  # (B, H, n, C)

    # Before a chunk: exclusive prefix sums of one (D × Dv) state per chunk.
    kv = torch.einsum("bhnsd,bhnse->bhnde", fk, v)  # (B, H, n, D, Dv)
    z = fk.sum(dim=3)  # (B, H, n, D)
    kv_before = kv.cumsum(dim=2) - kv  # (B, H, n, D, Dv)
    z_before = z.cumsum(dim=2) - z  # (B, H, n, D)
    num = num + torch.einsum("bhncd,bhnde->bhnce", fq, kv_before)
    den = den + torch.einsum("bhncd,bhnd->bhnc", fq, z_before)

    out = num / (den.unsqueeze(-1) + eps)  # (B, H, n, C, Dv)
    out = out.reshape(B, Hq, n * C, -1)[:, :, :L]  # (B, H, L, Dv)
    return out.to(query.dtype)


class LinearAttentionState(NamedTuple):
    """The recurrent state of causal linear attention after ``t`` tokens.

    S: (B, Hkv, D, Dv), ``Σ_j φ(k_j) v_jᵀ``.
    z: (B, Hkv, D), ``Σ_j φ(k_j)``.
    Its size does not depend on ``t``: that is the point.
    """

    S: torch.Tensor
    z: torch.Tensor


def linear_attention_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: LinearAttentionState | None = None,
    *,
    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu1",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One decoding step of causal linear attention, as an RNN.

    Args:
        query: (B, Hq, 1, D), the new token's query.
        key: (B, Hkv, 1, D), the new token's key; ``Hq % Hkv == 0`` (GQA allowed).
        value: (B, Hkv, 1, Dv).
        state: the state after the previous tokens, or None before the first.
        feature_map, eps: as in :func:`linear_attention`.

    Returns:
        ``(out, state)``: out (B, Hq, 1, Dv) in the inputs' dtype, equal to row ``t``
        of ``linear_attention(..., is_causal=True)``, and the updated state.
    """
    check_attention_args(query, key, value, None, 0.0, False, None, True)
    if query.shape[2] != 1 or key.shape[2] != 1:
        raise ValueError(
            f"linear_attention_step takes one token: query {_shape(query)} and key "
            f"{_shape(key)} must have length 1 in dim 2"
        )
    phi = _feature_map(feature_map)
    acc = accumulation_dtype(query.dtype)
    B, Hq, _, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    fk = phi(key.to(acc))[:, :, 0]  # (B, Hkv, D)
    v = value.to(acc)[:, :, 0]  # (B, Hkv, Dv)
    if state is None:
        state = LinearAttentionState(
            query.new_zeros(B, Hkv, D, Dv, dtype=acc), query.new_zeros(B, Hkv, D, dtype=acc)
        )
    elif state.S.shape != (B, Hkv, D, Dv) or state.z.shape != (B, Hkv, D):
        raise ValueError(
            f"state has S {_shape(state.S)} and z {_shape(state.z)}; expected "
            f"({B}, {Hkv}, {D}, {Dv}) and ({B}, {Hkv}, {D})"
        )
    S = state.S + torch.einsum("bhd,bhe->bhde", fk, v)  # (B, Hkv, D, Dv)
    z = state.z + fk  # (B, Hkv, D)
    fq = phi(query.to(acc)).view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D): query head h uses kv head h // G
    num = torch.einsum("bhgd,bhde->bhge", fq, S)  # (B, Hkv, G, Dv)
    den = torch.einsum("bhgd,bhd->bhg", fq, z)  # (B, Hkv, G)
    out = (num / (den.unsqueeze(-1) + eps)).reshape(B, Hq, 1, Dv)  # (B, Hq, 1, Dv)
    return out.to(query.dtype), LinearAttentionState(S, z)
