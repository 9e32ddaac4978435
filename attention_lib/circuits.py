"""Induction heads and the circuits that read them (chapter 15).

A two-layer, attention-only transformer trained on sequences that repeat a random
segment learns an *induction head* (Elhage et al. 2021; Olsson et al. 2022): a
first-layer head copies each token's predecessor into its residual stream (a
previous-token head), and a second-layer head whose keys read that copy attends,
from a token ``A``, to the token that followed the last ``A``, and copies it.

Layout: a token sequence is (B, L); the model's attention patterns are
(n_layers, B, H, L, L), rows are queries and columns keys.

Circuits use the column-vector convention of Elhage et al.: a head reads the
residual stream ``x`` (E,) through ``W_Q, W_K, W_V`` (hs, E) and writes through
``W_O`` (E, hs), so

    score(x_q, x_k) = x_qᵀ (W_Qᵀ W_K) x_k   (the QK circuit, E × E, before 1/√hs)
    write(x_k)      = (W_O W_V) x_k         (the OV circuit, E × E).

The *full* circuits put token embeddings on both ends: ``W_Eᵀ W_Qᵀ W_K W_E`` (V × V:
query token by key token) and ``W_U W_O W_V W_E`` (V × V: output logit by attended
token). The model has no biases and, by default, no LayerNorm, so these matrices
are exactly what the model computes along each path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_int
from .attention import attention_weights, scaled_dot_product_attention
from .multi_head import MultiHeadAttention

__all__ = [
    "AttentionOnlyTransformer",
    "HeadAttention",
    "composition_score",
    "InContextLoss",
    "copying_score",
    "head_weights",
    "in_context_loss",
    "ov_circuit",
    "prefix_matching_score",
    "previous_token_score",
    "qk_circuit",
    "repeated_tokens",
]


# ----------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------


class HeadAttention:
    """An SDPA-compatible ``attn_fn`` that can record its weights and silence heads.

    ``record = True`` keeps the attention weights of the last call in ``weights``
    (B, H, L, S); ``ablate`` is a set of head indices whose output is replaced by 0
    (a knock-out: the head still computes, but writes nothing to the residual stream).
    """

    def __init__(self) -> None:
        self.record = False
        self.weights: torch.Tensor | None = None
        self.ablate: set[int] = set()

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if self.record:
            self.weights = attention_weights(q, k, attn_mask, is_causal, scale, enable_gqa).detach()
        out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)  # (B, H, L, hs)
        if self.ablate:
            keep = torch.ones(out.shape[-3], 1, 1, dtype=out.dtype, device=out.device)  # (H, 1, 1)
            keep[sorted(self.ablate)] = 0
            out = out * keep
        return out


class AttentionOnlyTransformer(nn.Module):
    """Token + learned position embeddings, ``n_layers`` causal attention blocks on a
    residual stream, and an unembedding: no MLPs, no biases.

    ``x ← x + Attn_l(LN_l(x))`` for each layer, then ``logits = W_U LN(x)``. With
    ``layer_norm=False`` (the default) the LNs are identities, so every path through
    the model is a product of weight matrices that can be read as a circuit.

    Args:
        vocab_size: V.
        max_len: the longest sequence (number of learned positions).
        dim: residual-stream width E.
        n_layers: attention blocks.
        n_heads: heads per block, each of width ``dim // n_heads``.
        layer_norm: put a LayerNorm before each block and before the unembedding.

    Attributes:
        embed: ``nn.Embedding(V, E)``: its weight is ``W_Eᵀ`` (row t = token t's vector).
        pos: ``nn.Embedding(max_len, E)``.
        attn: the ``MultiHeadAttention`` blocks (``bias=False``).
        attn_fns: their :class:`HeadAttention` functions (recording, ablation).
        unembed: ``nn.Linear(E, V, bias=False)``: its weight is ``W_U`` (V, E).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        *,
        layer_norm: bool = False,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("dim", dim),
                            ("n_layers", n_layers), ("n_heads", n_heads)):
            check_positive_int(name, value)
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.attn_fns = [HeadAttention() for _ in range(n_layers)]
        self.attn = nn.ModuleList(MultiHeadAttention(dim, n_heads, bias=False, attn_fn=fn) for fn in self.attn_fns)
        norm = (lambda: nn.LayerNorm(dim)) if layer_norm else nn.Identity
        self.norms = nn.ModuleList(norm() for _ in range(n_layers))
        self.final_norm = norm()
        self.unembed = nn.Linear(dim, vocab_size, bias=False)
        for p in self.parameters():  # every matrix N(0, 1/E): embeddings of norm ~1, projections
            if p.dim() == 2:  # that keep the residual stream at that scale
                nn.init.normal_(p, std=1.0 / dim**0.5)

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    @property
    def n_heads(self) -> int:
        return cast(MultiHeadAttention, self.attn[0]).num_heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 -> logits (B, L, V); position ``i`` predicts token ``i + 1``."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64 of shape (B, L), got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")
        vocab = self.embed.num_embeddings
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(
                f"tokens must lie in 0 .. {vocab - 1} (vocab_size={vocab}); got {int(tokens.min())} .. {int(tokens.max())}"
            )
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]  # (B, L, E): the residual stream
        for norm, attn in zip(self.norms, self.attn):
            x = x + attn(norm(x), is_causal=True)  # each head adds what it read
        return self.unembed(self.final_norm(x))  # (B, L, V)

    @torch.no_grad()
    def patterns(self, tokens: torch.Tensor, ablate: Iterable[tuple[int, int]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``tokens`` (B, L) and return (logits (B, L, V), patterns (n_layers, B, H, L, L)).

        ``ablate``: (layer, head) pairs knocked out for this call.
        """
        with self.ablated(ablate):
            for fn in self.attn_fns:
                fn.record = True
            try:
                logits = self(tokens)
            finally:
                for fn in self.attn_fns:
                    fn.record = False
        weights = [fn.weights for fn in self.attn_fns]
        recorded = [w for w in weights if w is not None]
        assert len(recorded) == len(weights), "every layer records its weights when record is True"
        return logits, torch.stack(recorded)

    @contextlib.contextmanager
    def ablated(self, heads: Iterable[tuple[int, int]]):
        """Context manager: zero the output of each (layer, head) in ``heads``.

        ``with model.ablated([(0, 2)]): model(tokens)`` runs the model with head 2 of
        the first layer knocked out; the previous set of knocked-out heads is restored
        on exit.
        """
        heads = list(heads)
        for layer, head in heads:
            if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
                raise ValueError(f"no head (layer {layer}, head {head}) in a model of "
                                 f"{self.n_layers} layers x {self.n_heads} heads")
        saved = [set(fn.ablate) for fn in self.attn_fns]
        for layer, head in heads:
            self.attn_fns[layer].ablate.add(head)
        try:
            yield self
        finally:
            for fn, before in zip(self.attn_fns, saved):
                fn.ablate = before


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------


def repeated_tokens(
    batch: int,
    period: int,
    vocab_size: int,
    length: int | None = None,
    generator: torch.Generator | None = None,
    *,
    distinct: bool = False,
    bos: int | None = None,
) -> torch.Tensor:
    """Random tokens whose first ``period`` repeat: ``[bos?, r, r, fresh random tokens]``.

    Args:
        batch, period, vocab_size: B, T, V; tokens are drawn from ``[0, V)``.
        length: L, the length without ``bos``; default ``2 * T``.
        generator: for reproducible draws.
        distinct: draw the T tokens of ``r`` without replacement (needs ``T <= V``),
            so that no token of the first copy occurs twice by chance.
        bos: a beginning-of-sequence token to put in front, or None.

    Returns:
        (B, L) int64, or (B, 1 + L) with ``bos``. With ``start`` = 1 if ``bos`` else
        0, token ``start + T + i`` equals token ``start + i`` for ``0 <= i < T``
        (as far as the sequence goes).
    """
    check_positive_int("period", period)
    check_positive_int("vocab_size", vocab_size)
    length = 2 * period if length is None else length
    if length < period:
        raise ValueError(f"length ({length}) must be at least period ({period})")
    if distinct and period > vocab_size:
        raise ValueError(f"distinct tokens need period <= vocab_size, got {period} > {vocab_size}")
    tokens = torch.randint(0, vocab_size, (batch, length), generator=generator)  # (B, L)
    if distinct:
        tokens[:, :period] = torch.rand(batch, vocab_size, generator=generator).argsort(-1)[:, :period]
    end = min(2 * period, length)
    tokens[:, period:end] = tokens[:, : end - period]
    if bos is not None:
        tokens = torch.cat([torch.full((batch, 1), bos, dtype=tokens.dtype), tokens], dim=1)  # (B, 1 + L)
    return tokens


# ----------------------------------------------------------------------------------
# Scores of attention patterns
# ----------------------------------------------------------------------------------


def _check_pattern(attn: torch.Tensor) -> int:
    if not isinstance(attn, torch.Tensor) or attn.dim() < 2 or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be self-attention weights of shape (..., L, L), got {shape}")
    return attn.shape[-1]


def previous_token_score(attn: torch.Tensor) -> torch.Tensor:
    """Mean weight each query puts on the token just before it.

    Args:
        attn: attention weights (..., L, L), rows summing to 1.

    Returns:
        (...,): the mean over queries ``i = 1..L-1`` of ``attn[..., i, i - 1]``. A
        previous-token head scores 1; uniform weights over all ``L`` keys score ``1/L``.
    """
    L = _check_pattern(attn)
    if L < 2:
        raise ValueError(f"previous_token_score needs L >= 2, got attn of shape {tuple(attn.shape)}")
    return attn.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)  # entries (i, i - 1)


def prefix_matching_score(attn: torch.Tensor, period: int, start: int = 0) -> torch.Tensor:
    """Mean weight on the token *after* the previous occurrence of the current token.

    On a sequence that repeats with ``period`` T from position ``start`` (token
    ``i`` equals token ``i - T`` for ``i >= start + T``, as :func:`repeated_tokens`
    makes), the query at ``i`` holds a token last seen at ``i - T``; an induction
    head attends to what came next, key ``i - T + 1`` (Olsson et al.'s prefix
    matching).

    Args:
        attn: attention weights (..., L, L) on such a sequence, ``start + T < L``.
        period: T.
        start: where the first copy begins (1 after a beginning-of-sequence token).

    Returns:
        (...,): the mean over queries ``i = start+T .. L-1`` of ``attn[..., i, i - T + 1]``.
        An induction head scores 1; uniform weights over ``L`` keys score ``1/L``.
    """
    L = _check_pattern(attn)
    check_positive_int("period", period)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + period >= L:
        raise ValueError(f"need start >= 0 and start + period < L = {L}; got start={start!r}, period={period}")
    diag = attn.diagonal(offset=-(period - 1), dim1=-2, dim2=-1)  # (..., L - T + 1): entries (i, i - T + 1)
    return diag[..., start + 1 :].mean(-1)  # queries i = T - 1 + index >= start + T


def copying_score(circuit: torch.Tensor) -> torch.Tensor:
    """How much a square circuit copies: ``Re(Σ λ) / Σ |λ|`` over its eigenvalues.

    Elhage et al.'s summary of an OV circuit ``W_U W_O W_V W_E`` (V × V): a head that
    copies the token it attends to raises that token's logit, so its circuit has
    mostly positive eigenvalues and the score is near 1; a circuit that suppresses
    the token scores near -1; a random matrix scores near 0.

    Args:
        circuit: (..., N, N).

    Returns:
        (...,) in [-1, 1], in the circuit's real dtype.
    """
    if not isinstance(circuit, torch.Tensor) or circuit.dim() < 2 or circuit.shape[-1] != circuit.shape[-2]:
        shape = tuple(circuit.shape) if isinstance(circuit, torch.Tensor) else type(circuit).__name__
        raise ValueError(f"circuit must be a square matrix (..., N, N), got {shape}")
    eig = torch.linalg.eigvals(circuit.double())  # (..., N), complex
    return (eig.sum(-1).real / eig.abs().sum(-1)).to(circuit.dtype)


class InContextLoss(NamedTuple):
    """Mean cross-entropy (nats) on the first copy and on the repeated part."""

    first: torch.Tensor  # targets inside the first copy: nothing to look up, ln V at best
    repeated: torch.Tensor  # targets after the repeat starts: their prefix was seen T tokens earlier

    @property
    def difference(self) -> torch.Tensor:
        """``repeated - first``: negative when the model learns from its context."""
        return self.repeated - self.first


def in_context_loss(logits: torch.Tensor, tokens: torch.Tensor, period: int, start: int = 0) -> InContextLoss:
    """Cross-entropy of next-token predictions in the first copy and in the repeat.

    Args:
        logits: (B, L, V); position ``i`` predicts token ``i + 1``.
        tokens: (B, L) that repeat with ``period`` T from ``start`` (see
            :func:`repeated_tokens`).
        period: T >= 2.
        start: where the first copy begins (1 after a beginning-of-sequence token).

    Returns:
        :class:`InContextLoss`: ``first`` averages the targets ``start+1 .. start+T-1``
        (inside the first copy), ``repeated`` the targets ``start+T+1 .. L-1``. The
        first token of each copy is left out: nothing before it announces it.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(tokens, torch.Tensor) or logits.dim() != 3 \
            or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, L, V) and tokens (B, L); got {_shapes(logits, tokens)}")
    L = tokens.shape[1]
    check_positive_int("period", period)
    if isinstance(start, bool) or not isinstance(start, int) or period < 2 or start < 0 or start + period + 1 >= L:
        raise ValueError(f"need period >= 2, start >= 0 and start + period + 1 < L = {L}; "
                         f"got period={period}, start={start!r}")
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, L-1): target i+1
    first = nll[:, start : start + period - 1]  # targets start+1 .. start+T-1
    repeated = nll[:, start + period :]  # targets start+T+1 .. L-1
    return InContextLoss(first=first.mean(), repeated=repeated.mean())


def _shapes(*ts) -> str:
    return ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in ts)


# ----------------------------------------------------------------------------------
# Circuits
# ----------------------------------------------------------------------------------


def head_weights(mha: MultiHeadAttention, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head's slices of the projections of a ``MultiHeadAttention``.

    ``q_proj`` maps (E,) to the H heads side by side, so head ``h`` owns rows
    ``h*hs:(h+1)*hs`` of ``q_proj.weight`` (and of ``k_proj``, ``v_proj``), and columns
    ``h*hs:(h+1)*hs`` of ``out_proj.weight``.

    Returns:
        ``(W_Q, W_K, W_V, W_O)`` with shapes (hs, E), (hs, E), (hs, E), (E, hs).
    """
    if not isinstance(mha, MultiHeadAttention):
        raise ValueError(f"mha must be an attention_lib.MultiHeadAttention, got {type(mha).__name__}")
    if mha.num_kv_heads != mha.num_heads:
        raise ValueError(f"head_weights needs num_kv_heads == num_heads, got {mha.num_kv_heads} and {mha.num_heads}")
    if not 0 <= head < mha.num_heads:
        raise ValueError(f"head must be in [0, {mha.num_heads}), got {head}")
    rows = slice(head * mha.head_dim, (head + 1) * mha.head_dim)
    return (mha.q_proj.weight[rows], mha.k_proj.weight[rows], mha.v_proj.weight[rows], mha.out_proj.weight[:, rows])


def qk_circuit(
    mha: MultiHeadAttention,
    head: int,
    queries: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """The QK circuit ``W_Qᵀ W_K`` of one head, optionally read between residual vectors.

    Args:
        mha, head: the head.
        queries: (Nq, E) residual-stream vectors on the query side (e.g. token
            embeddings, ``model.embed.weight``); None gives the identity.
        keys: (Nk, E) vectors on the key side; None gives the identity.

    Returns:
        (Nq, Nk): ``queries W_Qᵀ W_K keysᵀ``, the attention score (before the
        ``1/√hs`` scale) of each query vector for each key vector; (E, E) with no
        vectors.
    """
    W_Q, W_K, _, _ = head_weights(mha, head)
    circuit = W_Q.T @ W_K  # (E, E)
    return _sandwich(circuit, queries, keys)


def ov_circuit(
    mha: MultiHeadAttention,
    head: int,
    inputs: torch.Tensor | None = None,
    readout: torch.Tensor | None = None,
) -> torch.Tensor:
    """The OV circuit ``W_O W_V`` of one head, optionally read from inputs to a readout.

    Args:
        mha, head: the head.
        inputs: (Nin, E) vectors the head may attend to (e.g. token embeddings).
        readout: (Nout, E) directions it is read along (e.g. the unembedding ``W_U``).

    Returns:
        (Nout, Nin): ``readout W_O W_V inputsᵀ``, what attending to input ``j`` adds
        along direction ``i``; with ``W_U`` and ``W_E`` it is the full OV circuit
        ``W_U W_O W_V W_E`` (output logit by attended token). (E, E) with neither.
    """
    _, _, W_V, W_O = head_weights(mha, head)
    circuit = W_O @ W_V  # (E, E)
    return _sandwich(circuit, readout, inputs)


def _sandwich(circuit: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    E = circuit.shape[0]
    for name, t in (("left", left), ("right", right)):
        if t is not None and (t.dim() != 2 or t.shape[1] != E):
            raise ValueError(f"{name} residual vectors must be (N, E={E}), got {tuple(t.shape)}")
    out = circuit if left is None else left @ circuit  # (Nl, E)
    return out if right is None else out @ right.T  # (Nl, Nr)


def composition_score(later: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """How much a later head's circuit reads what an earlier head writes.

    Elhage et al.'s composition score ``‖A B‖_F / (‖A‖_F ‖B‖_F)`` with ``A = later``
    and ``B = earlier`` (the earlier head's OV circuit ``W_O W_V``). The three kinds:

    * K-composition: ``A = W_Qᵀ W_K`` of the later head (its keys read B's output);
    * Q-composition: ``A = (W_Qᵀ W_K)ᵀ`` (its queries read it);
    * V-composition: ``A = W_O W_V`` of the later head (its values read it).

    Args:
        later: (..., E, E).
        earlier: (..., E, E).

    Returns:
        (...,) in [0, 1]: 1 when B's whole output lies where A reads most; about
        ``1/√E`` for unrelated random matrices.
    """
    if later.dim() < 2 or earlier.dim() < 2 or later.shape[-1] != earlier.shape[-2]:
        raise ValueError(f"later (..., E, E) and earlier (..., E, E) must chain; got {_shapes(later, earlier)}")
    norm = torch.linalg.matrix_norm
    return norm(later @ earlier) / (norm(later) * norm(earlier))
