"""Ring attention over ``torch.distributed`` (chapter 17).

Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context") splits the *sequence* over N processes.
Rank ``r`` keeps its block of queries ``Q_r`` for the whole call, while the key/value
blocks travel around a ring: at step ``s`` rank ``r`` holds the block of rank
``(r - s) mod N``, computes attention of ``Q_r`` over it, merges the result into its
running output with the online-softmax rule (:func:`attention_lib.merge_attention`),
and passes the block on to rank ``r + 1``. After N steps and N - 1 rotations every
query has seen every key, and no rank ever held more than an ``(L/N) x (L/N)`` block
of scores. Sending the next block overlaps with computing on the current one.

    step 0:  r0: Q0·K0   r1: Q1·K1   r2: Q2·K2   r3: Q3·K3
    step 1:  r0: Q0·K3   r1: Q1·K0   r2: Q2·K1   r3: Q3·K2     (each K/V moved one rank on)
    ...

Causal attention. Query ``i`` sees keys ``j <= i`` (global positions). A block whose
keys all lie after the queries is skipped; a block whose keys all lie before is
computed without a mask; only the diagonal needs one. With the *contiguous* split,
rank ``r`` then does ``r + 1/2`` blocks of work and the last rank is the bottleneck.
The *zig-zag* split (also called head-tail or round-robin load balancing, as in
PyTorch's context parallelism) cuts the sequence into 2N chunks and gives rank ``r``
chunks ``r`` and ``2N - 1 - r``, so that every rank does the same work.

Backward. :class:`_RingAttention` saves the local output and log-sum-exp. Its
backward pass rotates K/V around the ring once more, and with them the accumulators
dK and dV, which pick up each rank's contribution and arrive back at their owner
after N hops.

Everything here is plain PyTorch: the blocks are computed by
:func:`attention_lib.attention_block`, the messages are ``torch.distributed``
point-to-point ``isend``/``irecv`` (batched with ``batch_isend_irecv``), and the
same code runs on CPU processes (gloo) and on GPUs (NCCL).

Starting the processes is not the idea, so it lives apart: :func:`attention_lib.launcher.launch`
runs a function on N local processes, :func:`attention_lib.launcher.init_from_env`
joins torchrun's group, and :mod:`attention_lib.ring_check` holds the worker that
the chapter and the tests launch (and a torchrun self-check).
Importing this module initialises nothing.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ._checks import accumulation_dtype, check_attention_args, check_no_dropout
from .online_softmax import attention_block, merge_attention

__all__ = [
    "LAYOUTS",
    "RingStats",
    "get_ring_stats",
    "reset_ring_stats",
    "ring_attention",
    "sequence_positions",
    "shard_sequence",
    "unshard_sequence",
]

LAYOUTS = ("contiguous", "zigzag")


# --------------------------------------------------------------------------------------
# Sharding the sequence: which global positions live on which rank
# --------------------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks(rank: int, world_size: int, local_len: int, layout: str) -> list[tuple[int, int, int]]:
    """The contiguous pieces of rank ``rank``'s local sequence.

    Returns a list of ``(local_start, length, global_start)``: one piece for the
    contiguous layout, two (chunks ``r`` and ``2N - 1 - r``) for zig-zag.
    """
    if layout == "contiguous":
        return [(0, local_len, rank * local_len)]
    c = local_len // 2
    return [(0, c, rank * c), (c, c, (2 * world_size - 1 - rank) * c)]


def sequence_positions(rank: int, world_size: int, seq_len: int, layout: str = "contiguous") -> torch.Tensor:
    """Global positions (a LongTensor of length ``seq_len / N``) held by ``rank``.

    Example, ``seq_len = 8`` on 2 ranks::

        contiguous: rank 0 -> [0, 1, 2, 3]   rank 1 -> [4, 5, 6, 7]
        zigzag:     rank 0 -> [0, 1, 6, 7]   rank 1 -> [2, 3, 4, 5]
    """
    _check_layout(layout)
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seq_len % parts != 0:
        raise ValueError(f"seq_len={seq_len} must be divisible by {parts} for layout={layout!r} on {world_size} ranks")
    pieces = _chunks(rank, world_size, seq_len // world_size, layout)
    return torch.cat([torch.arange(g, g + n) for _, n, g in pieces])


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The part of the full sequence ``x`` that rank ``rank`` holds.

    Args:
        x: a full-sequence tensor, e.g. (B, H, L, D) with the sequence on ``dim``.
        rank, world_size: which of the N ranks, and N.
        layout: ``"contiguous"`` (block r) or ``"zigzag"`` (chunks r and 2N-1-r of 2N).
        dim: the sequence dimension.

    Returns:
        (B, H, L/N, D): a contiguous copy.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    idx = sequence_positions(rank, world_size, x.shape[dim], layout).to(x.device)
    return x.index_select(dim, idx).contiguous()  # (B, H, L/N, D)


def unshard_sequence(shards: list[torch.Tensor], layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from the shards of ranks 0..N-1."""
    _check_layout(layout)
    world_size = len(shards)
    local_len = shards[0].shape[dim]
    pos = torch.cat([sequence_positions(r, world_size, local_len * world_size, layout) for r in range(world_size)])
    stacked = torch.cat(shards, dim=dim)  # (B, H, L, D) in rank order
    inverse = torch.empty_like(pos)
    inverse[pos] = torch.arange(pos.numel())  # where each global position sits in ``stacked``
    return stacked.index_select(dim, inverse.to(stacked.device))  # (B, H, L, D) in sequence order


def _causal_block(q_start: int, q_len: int, k_start: int, k_len: int, device) -> tuple[str, torch.Tensor | None]:
    """Classify a (query chunk, key chunk) pair under the causal mask ``q_pos >= k_pos``.

    Returns ``("skip", None)``, ``("full", None)``, or ``("partial", allowed)`` with
    ``allowed`` a (q_len, k_len) bool mask.
    """
    if q_start + q_len - 1 < k_start:
        return "skip", None  # every key lies after every query
    if q_start >= k_start + k_len - 1:
        return "full", None  # every key lies at or before every query
    q_pos = torch.arange(q_start, q_start + q_len, device=device)
    k_pos = torch.arange(k_start, k_start + k_len, device=device)
    return "partial", q_pos[:, None] >= k_pos[None, :]  # (q_len, k_len)


# --------------------------------------------------------------------------------------
# Counting what the ring does
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RingStats:
    """What this process's ring has done since :func:`reset_ring_stats`.

    Attributes:
        forward_rotations: K/V blocks sent on in forward passes (N - 1 per call).
        backward_rotations: K/V blocks plus dK/dV accumulators sent in backward passes.
        bytes_sent: payload bytes sent to the next rank.
        score_elements: query-key pairs scored, per (batch, head): the work done.
        max_score_block: the largest (rows, cols) block of scores ever materialised.
    """

    forward_rotations: int = 0
    backward_rotations: int = 0
    bytes_sent: int = 0
    score_elements: int = 0
    max_score_block: tuple[int, int] = (0, 0)

    def _saw_block(self, rows: int, cols: int) -> None:
        self.score_elements += rows * cols
        if rows * cols > self.max_score_block[0] * self.max_score_block[1]:
            self.max_score_block = (rows, cols)


_STATS = RingStats()


def get_ring_stats() -> RingStats:
    """A copy of this process's :class:`RingStats`."""
    return dataclasses.replace(_STATS)


def reset_ring_stats() -> None:
    """Zero this process's :class:`RingStats`."""
    global _STATS
    _STATS = RingStats()


# --------------------------------------------------------------------------------------
# The ring: send to rank + 1, receive from rank - 1
# --------------------------------------------------------------------------------------

_KV_TAG, _DKV_TAG = 0, 1  # distinct tags: a K/V block and a dK/dV accumulator may be in flight together


class _Ring:
    """Point-to-point exchange with the two neighbours of this rank in ``group``."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # send/recv take global ranks; translate from the group's ranks
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) if group is not None else (self.rank + 1) % self.size
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) if group is not None else (self.rank - 1) % self.size

    def exchange(self, buf: torch.Tensor, tag: int, phase: str):
        """Start sending ``buf`` to the next rank and receiving its twin from the previous one.

        Returns ``(requests, received)``; call :meth:`wait` before reading ``received``.
        """
        received = torch.empty_like(buf)
        ops = [
            dist.P2POp(dist.isend, buf, self.next, self.group, tag),
            dist.P2POp(dist.irecv, received, self.prev, self.group, tag),
        ]
        requests = dist.batch_isend_irecv(ops)
        if phase == "forward":
            _STATS.forward_rotations += 1
        else:
            _STATS.backward_rotations += 1
        _STATS.bytes_sent += buf.numel() * buf.element_size()
        return (requests, buf), received

    @staticmethod
    def wait(handle) -> None:
        requests, _ = handle  # ``buf`` is kept alive until its send completed
        for req in requests:
            req.wait()


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])  # one flat buffer: one message per step


def _unpack(buf: torch.Tensor, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        out.append(buf[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


# --------------------------------------------------------------------------------------
# One step of the ring: the local queries against the key/value block now held
# --------------------------------------------------------------------------------------


def _pairs(rank: int, src: int, world_size: int, local_len: int, layout: str, is_causal: bool, device):
    """The (query piece, key piece, allowed) pairs to compute at a step.

    Pieces are ``(local_start, length)``; ``allowed`` is None (no mask) or a bool mask.
    Pairs that the causal mask hides completely are left out: that is block skipping.
    """
    if not is_causal:
        return [((0, local_len), (0, local_len), None)]  # everything, in one block
    pairs = []
    for q0, qn, qg in _chunks(rank, world_size, local_len, layout):
        for k0, kn, kg in _chunks(src, world_size, local_len, layout):
            kind, allowed = _causal_block(qg, qn, kg, kn, device)
            if kind != "skip":
                pairs.append(((q0, qn), (k0, kn), allowed))
    return pairs


def _forward_step(q, k, v, pairs, scale, o, lse) -> None:
    """Merge attention of ``q`` over the block (k, v) into ``(o, lse)``, in place.

    Shapes: q (B, Hkv, G, Lq, D) (query heads grouped by their key/value head),
    k (B, Hkv, 1, Lk, D), v (B, Hkv, 1, Lk, Dv), o (B, Hkv, G, Lq, Dv), lse (B, Hkv, G, Lq).
    """
    for (q0, qn), (k0, kn), allowed in pairs:
        _STATS._saw_block(qn, kn)
        o_blk, lse_blk = attention_block(
            q[..., q0 : q0 + qn, :], k[..., k0 : k0 + kn, :], v[..., k0 : k0 + kn, :], scale, allowed
        )  # (B, Hkv, G, qn, Dv), (B, Hkv, G, qn)
        rows = slice(q0, q0 + qn)
        o[..., rows, :], lse[..., rows] = merge_attention(o[..., rows, :], lse[..., rows], o_blk, lse_blk)


def _backward_step(q, k, v, dout, lse, delta, pairs, scale, dq, dk, dv) -> None:
    """Add this block's contributions to dq, dk, dv (in place; all in the accumulation dtype).

    With P = exp(S - lse) the attention weights of the final (merged) softmax:
    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - delta), dQ = dS K · scale, dK = dSᵀ Q · scale,
    where delta = rowsum(dO ∘ O) (FlashAttention-2's backward, one block at a time).

    Shapes: q (B, Hkv, G, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), dout (B, Hkv, G, Lq, Dv),
    lse and delta (B, Hkv, G, Lq); dq like q, dk like k, dv like v.
    """
    for (q0, qn), (k0, kn), allowed in pairs:
        _STATS._saw_block(qn, kn)
        rows, cols = slice(q0, q0 + qn), slice(k0, k0 + kn)
        q_b, k_b, v_b = q[..., rows, :], k[..., cols, :], v[..., cols, :]
        s = torch.einsum("bhgqd,bhkd->bhgqk", q_b, k_b) * scale  # (B, Hkv, G, qn, kn)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        lse_b = lse[..., rows]
        lse_b = torch.where(torch.isfinite(lse_b), lse_b, torch.zeros_like(lse_b))  # fully masked rows: P = 0
        p = torch.exp(s - lse_b.unsqueeze(-1))  # (B, Hkv, G, qn, kn)
        dout_b = dout[..., rows, :]
        dv[..., cols, :] += torch.einsum("bhgqk,bhgqe->bhke", p, dout_b)
        dp = torch.einsum("bhgqe,bhke->bhgqk", dout_b, v_b)  # (B, Hkv, G, qn, kn)
        ds = p * (dp - delta[..., rows].unsqueeze(-1))
        dq[..., rows, :] += torch.einsum("bhgqk,bhkd->bhgqd", ds, k_b) * scale
        dk[..., cols, :] += torch.einsum("bhgqk,bhgqd->bhkd", ds, q_b) * scale


# --------------------------------------------------------------------------------------
# The autograd Function: forward and backward both walk the ring
# --------------------------------------------------------------------------------------

class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, is_causal, scale, layout):
        ring = _Ring(group)
        B, Hq, L, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        acc = accumulation_dtype(q.dtype)
        q_g = q.unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, G, L, D): query head h uses kv head h // G
        o = torch.zeros(B, Hkv, Hq // Hkv, L, Dv, dtype=acc, device=q.device)  # running output
        lse = torch.full((B, Hkv, Hq // Hkv, L), float("-inf"), dtype=acc, device=q.device)  # running log-sum-exp

        kv = _pack(k, v)
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size  # whose K/V block we hold now
            if step + 1 < ring.size:
                handle, kv_next = ring.exchange(kv, _KV_TAG, "forward")  # overlaps with the compute below
            k_cur, v_cur = _unpack(kv, (k, v))  # (B, Hkv, L, D), (B, Hkv, L, Dv)
            pairs = _pairs(ring.rank, src, ring.size, L, layout, is_causal, q.device)
            _forward_step(q_g, k_cur.unsqueeze(2), v_cur.unsqueeze(2), pairs, scale, o, lse)
            if step + 1 < ring.size:
                ring.wait(handle)
                kv = kv_next

        out = o.to(q.dtype).flatten(1, 2)  # (B, Hq, L, Dv)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.is_causal, ctx.scale, ctx.layout = group, is_causal, scale, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        B, Hq, L, D = q.shape
        Hkv = k.shape[1]
        acc = accumulation_dtype(q.dtype)
        q_g = q.to(acc).unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, G, L, D)
        dout_g = dout.to(acc).unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, G, L, Dv)
        delta = (dout_g * out.to(acc).unflatten(1, (Hkv, Hq // Hkv))).sum(-1)  # (B, Hkv, G, L)
        dq = torch.zeros_like(q_g)

        kv = _pack(k, v)  # K/V travel in their own dtype; the dK/dV accumulators in ``acc``
        dkv_pending = None  # (handle, buffer): the dK/dV accumulator on its way from the previous rank
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            if step + 1 < ring.size:
                kv_handle, kv_next = ring.exchange(kv, _KV_TAG, "backward")
            k_cur, v_cur = (t.to(acc) for t in _unpack(kv, (k, v)))  # (B, Hkv, L, D), (B, Hkv, L, Dv)
            dk_blk, dv_blk = torch.zeros_like(k_cur), torch.zeros_like(v_cur)  # (B, Hkv, L, D), (B, Hkv, L, Dv)
            pairs = _pairs(ring.rank, src, ring.size, L, ctx.layout, ctx.is_causal, q.device)
            _backward_step(q_g, k_cur, v_cur, dout_g, lse, delta, pairs, ctx.scale, dq, dk_blk, dv_blk)
            if dkv_pending is not None:  # the accumulator for block ``src``, from the previous rank
                dkv_handle, dkv_in = dkv_pending
                ring.wait(dkv_handle)
                dk_in, dv_in = _unpack(dkv_in, (dk_blk, dv_blk))
                dk_blk += dk_in
                dv_blk += dv_in
            if ring.size == 1:  # the accumulator is already home
                dk, dv = dk_blk, dv_blk
                break
            # pass block src's accumulator on; after the last step it arrives home at rank src
            dkv_pending = ring.exchange(_pack(dk_blk, dv_blk), _DKV_TAG, "backward")
            if step + 1 < ring.size:
                ring.wait(kv_handle)
                kv = kv_next
        if dkv_pending is not None:  # N > 1: our own accumulator, home after N hops
            dkv_handle, dkv_in = dkv_pending
            ring.wait(dkv_handle)
            dk, dv = _unpack(dkv_in, (dk_blk, dv_blk))
        dq = dq.flatten(1, 2)  # (B, Hq, L, D)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


# --------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------


def ring_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """Attention over a sequence split across the ranks of ``group``, by ring attention.

    Call it on every rank of the group, each with its own shard of the sequence (see
    :func:`shard_sequence`). The result on each rank is that rank's shard of
    ``scaled_dot_product_attention(Q, K, V, is_causal=is_causal, scale=scale)`` over
    the full sequence. Differentiable: gradients flow to the local shards.

    Args:
        q_local: (B, Hq, L/N, E), this rank's queries.
        k_local: (B, Hkv, L/N, E), this rank's keys; ``Hkv == Hq``, or ``Hq % Hkv == 0``
            with ``enable_gqa`` (only the Hkv heads travel around the ring).
        v_local: (B, Hkv, L/N, Ev), this rank's values.
        attn_mask: must be None (SDPA's argument; ring attention takes no dense mask:
            a mask of the full sequence would defeat the sharding).
        dropout_p: must be 0.
        is_causal: causal mask over *global* positions (query i sees keys j <= i).
            Blocks above the diagonal are skipped.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq`` (grouped-query attention).
        group: the process group (keyword-only; default: the whole world). Every
            rank holds the same number of positions.
        layout: how the sequence was split: ``"contiguous"`` (rank r holds block r of
            N) or ``"zigzag"`` (rank r holds chunks r and 2N-1-r of 2N, which balances
            the causal work). Must match the :func:`shard_sequence` call.

    Returns:
        (B, Hq, L/N, Ev), in the inputs' dtype.

    Raises:
        ValueError: on inputs of the wrong rank, shape, dtype or device, or an unknown layout.
        RuntimeError: if ``torch.distributed`` is not initialised.
    """
    if attn_mask is not None:
        raise ValueError(
            f"ring_attention takes no attn_mask (got {type(attn_mask).__name__}); use is_causal=True "
            "for a causal mask over the global positions"
        )
    scale = check_attention_args(q_local, k_local, v_local, None, dropout_p, is_causal, scale, enable_gqa)
    check_no_dropout("ring_attention", dropout_p)
    _check_layout(layout)
    if q_local.shape[2] != k_local.shape[2]:
        raise ValueError(
            "each rank must hold the same positions for queries and keys: q_local has "
            f"{q_local.shape[2]} positions {tuple(q_local.shape)}, k_local {k_local.shape[2]} {tuple(k_local.shape)}"
        )
    if layout == "zigzag" and q_local.shape[2] % 2 != 0:
        raise ValueError(f"layout='zigzag' holds two equal chunks per rank: the local length must be even, got {q_local.shape[2]}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ring_attention needs torch.distributed: run it under attention_lib.launcher.launch, "
            "or torchrun with init_from_env(), or call torch.distributed.init_process_group first"
        )
    return _RingAttention.apply(q_local.contiguous(), k_local.contiguous(), v_local.contiguous(), group, is_causal, scale, layout)
