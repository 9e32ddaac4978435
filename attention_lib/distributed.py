"""Ring attention over ``torch.distributed`` (chapter 13).

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

Launching: :func:`launch` runs a function on N local processes (the chapter and the
tests use it); under ``torchrun``, call :func:`init_from_env` instead, or run the
self-check ``torchrun --standalone --nproc-per-node 4 -m attention_lib.distributed``.
Importing this module initialises nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from ._checks import check_attention_args, check_no_dropout
from .online_softmax import attention_block, merge_attention

__all__ = [
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
    "sequence_positions",
    "RingStats",
    "get_ring_stats",
    "reset_ring_stats",
    "launch",
    "init_from_env",
    "local_device",
    "case_inputs",
    "ring_check_worker",
    "raise_on_rank_worker",
    "sleep_worker",
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, is_causal, scale, layout):
        ring = _Ring(group)
        B, Hq, L, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        acc = _acc_dtype(q.dtype)
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
        acc = _acc_dtype(q.dtype)
        q_g = q.to(acc).unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, G, L, D)
        dout_g = dout.to(acc).unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, G, L, Dv)
        delta = (dout_g * out.to(acc).unflatten(1, (Hkv, Hq // Hkv))).sum(-1)  # (B, Hkv, G, L)
        dq = torch.zeros_like(q_g)

        kv = _pack(k, v)  # K/V travel in their own dtype; the dK/dV accumulators in ``acc``
        dkv_handle = None
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            if step + 1 < ring.size:
                kv_handle, kv_next = ring.exchange(kv, _KV_TAG, "backward")
            k_cur, v_cur = (t.to(acc) for t in _unpack(kv, (k, v)))  # (B, Hkv, L, D), (B, Hkv, L, Dv)
            dk_blk, dv_blk = torch.zeros_like(k_cur), torch.zeros_like(v_cur)  # (B, Hkv, L, D), (B, Hkv, L, Dv)
            pairs = _pairs(ring.rank, src, ring.size, L, ctx.layout, ctx.is_causal, q.device)
            _backward_step(q_g, k_cur, v_cur, dout_g, lse, delta, pairs, ctx.scale, dq, dk_blk, dv_blk)
            if dkv_handle is not None:  # the accumulator for block ``src``, from the previous rank
                ring.wait(dkv_handle)
                dk_in, dv_in = _unpack(dkv_in, (dk_blk, dv_blk))
                dk_blk += dk_in
                dv_blk += dv_in
            if ring.size == 1:  # the accumulator is already home
                dk, dv = dk_blk, dv_blk
                break
            # pass block src's accumulator on; after the last step it arrives home at rank src
            dkv_handle, dkv_in = ring.exchange(_pack(dk_blk, dv_blk), _DKV_TAG, "backward")
            if step + 1 < ring.size:
                ring.wait(kv_handle)
                kv = kv_next
        if ring.size > 1:
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
            "ring_attention needs torch.distributed: run it under attention_lib.distributed.launch, "
            "or torchrun with init_from_env(), or call torch.distributed.init_process_group first"
        )
    return _RingAttention.apply(q_local.contiguous(), k_local.contiguous(), v_local.contiguous(), group, is_causal, scale, layout)


# --------------------------------------------------------------------------------------
# Launching: N local processes, or torchrun
# --------------------------------------------------------------------------------------


def local_device() -> torch.device:
    """The device this rank should compute on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(timeout: float = 300.0) -> None:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...).

    Uses NCCL when this machine has at least as many GPUs as local ranks, else gloo.
    """
    if dist.is_initialized():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= local_size
    if use_nccl:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_nccl else "gloo", timeout=datetime.timedelta(seconds=timeout))


def _run_rank(rank, fn, args, world_size, port, backend, timeout, threads, outdir) -> None:
    """Entry point of each process started by :func:`launch`."""
    torch.set_num_threads(threads)
    td = datetime.timedelta(seconds=timeout)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=td)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)
    try:
        result = fn(*args)
        torch.save(result, pathlib.Path(outdir) / f"rank{rank}.pt")
        dist.barrier()
    except Exception:
        # Number the failures: when one rank raises, its peers fail next ("connection closed"),
        # and the launcher reports the first one, the cause.
        n = store.add("failures", 1)
        store.set(f"failure/{n}", f"rank {rank} raised:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    device: str = "cpu",
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes joined in one process group.

    The processes are started with ``torch.multiprocessing`` (spawn) on 127.0.0.1 and
    rendezvous through a ``TCPStore`` that this process opens on a free port. They use
    gloo on the CPU (``device="cpu"``) and NCCL, one GPU per rank, for ``device="cuda"``.
    ``fn`` must be importable (defined in a module, not a notebook) so that it can be
    pickled; inside it, ``torch.distributed.get_rank()`` says which rank it is.

    ``start_method`` defaults to ``"forkserver"`` where the platform has it: a server
    process imports torch and this module once, and every rank is forked from it, which
    saves N imports of torch per launch. ``"spawn"`` (a fresh interpreter per rank) is
    the portable alternative.

    Returns:
        ``[result of rank 0, ..., result of rank N-1]`` (results travel via ``torch.save``).

    Raises:
        RuntimeError: a rank raised; the others are stopped. The message holds the
            traceback of the first rank that raised (its peers fail after it).
        TimeoutError: the ranks did not all finish within ``timeout`` seconds (the process
            group uses the same timeout, so a rank blocked on a dead peer gives up too).
    """
    import torch.multiprocessing as mp

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"device='cuda' needs one GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPUs")
    backend = "nccl" if device == "cuda" else "gloo"
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method == "forkserver":
        # import torch once, fork N times; torch._dynamo too, which torch's dispatch modes (and so
        # attention_lib.memory.peak_memory) import on first use: seconds per rank otherwise
        mp.get_context("forkserver").set_forkserver_preload([__name__, "torch._dynamo"])
    td = datetime.timedelta(seconds=timeout)
    # The store binds port 0 (the OS picks a free port) and keeps it: no race with other launches.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=td, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="ring_") as outdir:
        ctx = mp.start_processes(
            _run_rank,
            args=(fn, args, world_size, store.port, backend, timeout, threads_per_rank, outdir),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                    raise TimeoutError(f"launch: ranks {alive} of {world_size} still running after {timeout:g} s")
        except mp.ProcessRaisedException as e:
            if store.check(["failure/1"]):
                first = store.get("failure/1").decode()
                raise RuntimeError(f"launch: the first failure of {world_size} ranks: {first}") from e
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        results = [torch.load(pathlib.Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    del store
    return results


# --------------------------------------------------------------------------------------
# Workers (importable, so that spawn can pickle them): used by the tests and chapter 13
# --------------------------------------------------------------------------------------


def case_inputs(case: dict, device) -> tuple[torch.Tensor, ...]:
    """The full-sequence ``(q, k, v, dout)`` of a :func:`ring_check_worker` case.

    Seeded by ``case["seed"]``, so every rank (and the process that checks the
    results) builds the same tensors: q (B, H, L, D), k (B, Hkv, L, D),
    v (B, Hkv, L, Dv), dout (B, H, L, Dv).
    """
    g = torch.Generator().manual_seed(case.get("seed", 0))
    B, Hq, L, D = case["B"], case["H"], case["L"], case["D"]
    Hkv, Dv = case.get("Hkv", Hq), case.get("Dv", D)
    dtype = case.get("dtype", torch.float32)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, Dv, generator=g)
    dout = torch.randn(B, Hq, L, Dv, generator=g)
    return tuple(t.to(dtype).to(device) for t in (q, k, v, dout))


def ring_check_worker(cases: list[dict]) -> list[dict]:
    """Worker: for each case, run ring attention forward and backward on this rank's shard.

    A case is a dict with ``B, H, L, D`` (L is the *global* length) and optionally
    ``Hkv, Dv, dtype, seed, is_causal, scale, layout, grad`` (default True) and ``memory``
    (measure this rank's peak tensor memory of the forward pass with
    :func:`attention_lib.memory.peak_memory`). Every rank builds the same global
    tensors from ``seed`` and keeps its shard.

    Returns, per case: this rank's ``out`` and (if ``grad``) ``dq, dk, dv`` shards on the
    CPU, the :class:`RingStats` of the forward and of the backward pass as dicts, and
    ``peak_bytes`` (or None).
    """
    from .memory import peak_memory

    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = local_device()
    results = []
    for case in cases:
        layout, is_causal = case.get("layout", "contiguous"), case.get("is_causal", False)
        q, k, v, dout = (shard_sequence(t, rank, world_size, layout) for t in case_inputs(case, device))
        kw = dict(is_causal=is_causal, scale=case.get("scale"), layout=layout, enable_gqa=q.shape[1] != k.shape[1])
        res: dict[str, Any] = {"peak_bytes": None}
        if case.get("memory", False):
            with torch.no_grad():
                _, res["peak_bytes"] = peak_memory(ring_attention, q, k, v, **kw)
        q, k, v = (t.requires_grad_(case.get("grad", True)) for t in (q, k, v))
        reset_ring_stats()
        out = ring_attention(q, k, v, **kw)
        res["forward"] = dataclasses.asdict(get_ring_stats())
        res["out"] = out.detach().cpu()
        if case.get("grad", True):
            reset_ring_stats()
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
            res["backward"] = dataclasses.asdict(get_ring_stats())
            res["dq"], res["dk"], res["dv"] = dq.cpu(), dk.cpu(), dv.cpu()
        results.append(res)
    return results


def raise_on_rank_worker(bad_rank: int) -> int:
    """Worker: rank ``bad_rank`` raises; the others wait for it in a collective (which never comes)."""
    if dist.get_rank() == bad_rank:
        raise RuntimeError(f"rank {bad_rank} failed on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # blocks: the failed rank never joins
    return int(t.item())


def sleep_worker(seconds: float) -> float:
    """Worker: every rank sleeps (a stand-in for a hang, to test :func:`launch`'s timeout)."""
    time.sleep(seconds)
    return seconds


def _main(argv: list[str] | None = None) -> int:
    """Self-check: ``torchrun --standalone --nproc-per-node N -m attention_lib.distributed``
    (or ``python -m attention_lib.distributed --nproc N`` to start the processes here)."""
    import argparse

    from .attention import attention_ref

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--nproc", type=int, default=2, help="processes to start when not under torchrun")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=LAYOUTS, default="contiguous")
    a = parser.parse_args(argv)
    case = dict(B=1, H=4, L=a.seq_len, D=16, dtype=torch.float64, is_causal=a.causal, layout=a.layout)
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        init_from_env()
        shards = [ring_check_worker([case])[0]]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, shards[0])
        shards, rank = gathered, dist.get_rank()
        dist.destroy_process_group()
    else:
        shards, rank = [r[0] for r in launch(ring_check_worker, a.nproc, [case])], 0
    if rank == 0:
        q, k, v, dout = case_inputs(case, "cpu")
        ref = attention_ref(q, k, v, is_causal=a.causal)
        out = unshard_sequence([s["out"] for s in shards], a.layout)
        err = (out - ref).abs().max().item()
        print(f"ring attention on {len(shards)} ranks, L={a.seq_len}, causal={a.causal}, layout={a.layout}: "
              f"max |ring - attention_ref| = {err:.2e}, forward rotations = {shards[0]['forward']['forward_rotations']}")
        if not err < 1e-10:
            return 1
    return 0


if __name__ == "__main__":
    # Run the copy imported as attention_lib.distributed (the package imported it already), so
    # that the workers pickle under their importable name, not as __main__.
    from attention_lib.distributed import _main as _package_main

    raise SystemExit(_package_main())
