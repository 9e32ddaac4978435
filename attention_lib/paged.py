"""A paged KV cache and PagedAttention (Kwon et al. 2023, vLLM), chapter 13.

Chapter 11's :class:`~attention_lib.kv_cache.KVCache` keeps each sequence's keys in
one contiguous tensor. A server that holds many sequences at once must then reserve,
for each, room for the longest sequence it might become: it does not know in advance
how many tokens a request will generate. Most of that room is never used.

PagedAttention manages the cache the way an operating system manages memory. One
shared **pool** of ``num_blocks`` physical blocks, each holding the keys and values
of ``block_size`` tokens, ``(num_blocks, block_size, Hkv, D)``; and per sequence a
**block table**, the list of physical blocks that hold its logical blocks 0, 1, 2...
A sequence takes a new block only when its last one is full, so at most one
partially filled block per sequence is wasted::

    pool:  [ b0 | b1 | b2 | b3 | b4 | b5 | b6 | b7 ]          block_size = 4
    seq 0: table [3, 0, 6]   length 10 -> b3 full, b0 full, b6 holds 2 tokens
    seq 1: table [1, 5]      length  5 -> b1 full, b5 holds 1 token

Blocks have **reference counts**, so sequences can share them. ``fork`` gives a new
sequence the table of its parent (parallel sampling, beam search: one prompt, many
continuations) without copying a single key. A shared block is copied only when one
of its owners *writes* into it, **copy-on-write**: that can only happen to a
partially filled last block, since full blocks are never written again.

:func:`paged_attention` computes attention for new queries by walking each
sequence's block table, one logical block at a time, and merging the blocks with
the online-softmax rule (:func:`attention_lib.merge_attention`), as the PagedAttention
kernel does; the keys are never copied into a contiguous tensor.

:func:`simulate_serving` replays a stream of requests against three allocators
(contiguous with the maximum length reserved, contiguous with the exact length
reserved, paged) to measure how much memory each wastes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ._checks import _check_mask_tensor, _shape, compute_dtype, resolve_scale
from .online_softmax import attention_block, merge_attention

__all__ = [
    "OutOfBlocksError",
    "BlockAllocator",
    "PagedKVCache",
    "paged_attention",
    "Request",
    "random_requests",
    "ServingTrace",
    "simulate_serving",
    "POLICIES",
]


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than an operation needs (nothing was changed)."""


# ----------------------------------------------------------------------------------
# Blocks: a free list and reference counts
# ----------------------------------------------------------------------------------


class BlockAllocator:
    """Physical block ids ``0 .. num_blocks - 1``: a free list and a reference count per block.

    ``allocate(n)`` takes ``n`` free blocks (reference count 1), ``share(b)`` adds an
    owner, ``release(b)`` removes one and returns the block to the free list when no
    owner is left. Used by :class:`PagedKVCache` and by :func:`simulate_serving`.
    """

    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be an int in 0 .. {self.num_blocks - 1}, got {block!r}")
        return self._ref[block]

    def allocate(self, n: int = 1, what: str = "") -> list[int]:
        """``n`` fresh blocks, or :class:`OutOfBlocksError` (and none taken) if fewer are free."""
        if n > len(self._free):
            raise OutOfBlocksError(
                f"{what or 'the request'} needs {n} free block(s) but only {len(self._free)} of "
                f"{self.num_blocks} are free; free a sequence or make the pool larger"
            )
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._ref[b] = 1
        return blocks

    def share(self, block: int) -> None:
        self._ref[block] += 1

    def release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._free.append(block)


# ----------------------------------------------------------------------------------
# The paged cache
# ----------------------------------------------------------------------------------


class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size blocks.

    Args:
        num_blocks: physical blocks in the pool.
        block_size: tokens per block.
        num_kv_heads: key/value heads Hkv.
        head_dim: D of the keys.
        value_dim: Dv of the values (default ``head_dim``).
        dtype, device: of the pool.

    Attributes:
        k_pool: (num_blocks, block_size, Hkv, D), the keys of every block.
        v_pool: (num_blocks, block_size, Hkv, Dv).
        num_copies: blocks copied so far by copy-on-write.

    Sequences are named by int ids: ``add_sequence()`` makes an empty one, ``append``
    adds tokens (taking blocks as needed), ``fork`` shares a sequence's blocks with a
    new one, ``free`` gives its blocks back, and ``gather`` returns its keys and
    values as contiguous (Hkv, S, D) tensors, as a :class:`KVCache` would hold them.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        for name, n in (("block_size", block_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.blocks = BlockAllocator(num_blocks)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        if value_dim is not None and (isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 1):
            raise ValueError(f"value_dim must be a positive int or None (= head_dim), got {value_dim!r}")
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k_pool = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=self.device)
        self.v_pool = torch.zeros(num_blocks, block_size, num_kv_heads, self.value_dim, dtype=dtype, device=self.device)
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self.num_copies = 0

    # -- bookkeeping ---------------------------------------------------------------
    def _check_seq(self, seq_id: int) -> None:
        if seq_id not in self._tables:
            raise ValueError(f"unknown sequence {seq_id!r}; live sequences: {sorted(self._tables)}")

    @property
    def sequences(self) -> list[int]:
        return sorted(self._tables)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.blocks.num_free

    def ref_count(self, block: int) -> int:
        """How many sequences' tables hold physical block ``block``."""
        return self.blocks.ref_count(block)

    def seq_len(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self._lengths[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        """The physical blocks of ``seq_id``, in logical order (a copy)."""
        self._check_seq(seq_id)
        return list(self._tables[seq_id])

    def block_tables(self, seq_ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of several sequences as tensors, as a kernel receives them.

        Returns:
            ``(tables, lengths)``: tables (B, max_blocks) int64, padded with block 0
            (any valid block: the positions past a sequence's length are masked), and
            lengths (B,) int64.
        """
        seq_ids = list(seq_ids)
        for s in seq_ids:
            self._check_seq(s)
        n = max((len(self._tables[s]) for s in seq_ids), default=0)
        tables = torch.zeros(len(seq_ids), n, dtype=torch.int64)
        for i, s in enumerate(seq_ids):
            tables[i, : len(self._tables[s])] = torch.tensor(self._tables[s], dtype=torch.int64)
        lengths = torch.tensor([self._lengths[s] for s in seq_ids], dtype=torch.int64)
        return tables.to(self.device), lengths.to(self.device)

    @property
    def stored_tokens(self) -> int:
        """Tokens held, counting a shared token once per physical copy (not per sequence)."""
        seen: dict[int, int] = {}
        for s, table in self._tables.items():
            for i, b in enumerate(table):
                filled = min(self.block_size, self._lengths[s] - i * self.block_size)
                seen[b] = max(seen.get(b, 0), filled)
        return sum(seen.values())

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables, reference counts and free list disagree."""
        owners = [0] * self.num_blocks
        for s, table in self._tables.items():
            assert len(table) == -(-self._lengths[s] // self.block_size), f"sequence {s}: table size"
            assert len(set(table)) == len(table), f"sequence {s} holds a block twice"
            for b in table:
                owners[b] += 1
        free = self.blocks._free
        assert len(set(free)) == len(free), "a block is free twice"
        for b in range(self.num_blocks):
            assert owners[b] == self.blocks.ref_count(b), f"block {b}: {owners[b]} owners, ref count {self.blocks.ref_count(b)}"
            assert (owners[b] == 0) == (b in free), f"block {b}: free list disagrees with its owners"

    # -- the interface -------------------------------------------------------------
    def add_sequence(self, seq_id: int | None = None) -> int:
        """Register an empty sequence (no blocks yet) and return its id."""
        if seq_id is None:
            while self._next_id in self._tables:
                self._next_id += 1
            seq_id = self._next_id
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._tables[seq_id], self._lengths[seq_id] = [], 0
        return seq_id

    def append(self, seq_id: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append ``T`` tokens to sequence ``seq_id``.

        Args:
            key: (Hkv, T, D), one row of a :class:`KVCache` update.
            value: (Hkv, T, Dv).

        Fills the last block, then takes as many new blocks as the rest needs; if the
        last block is partially filled and shared with another sequence, it is first
        copied (copy-on-write). Raises :class:`OutOfBlocksError`, leaving everything
        unchanged, if the pool has too few free blocks.
        """
        self._check_seq(seq_id)
        H, D, Dv = self.num_kv_heads, self.head_dim, self.value_dim
        if (
            not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor)
            or key.dim() != 3 or value.dim() != 3 or key.shape[0] != H or key.shape[2] != D
            or tuple(value.shape) != (H, key.shape[1], Dv)
        ):
            raise ValueError(
                f"PagedKVCache.append expects key (Hkv, T, D) = ({H}, T, {D}) and value (Hkv, T, Dv) = "
                f"({H}, T, {Dv}); got key {_shape(key) if isinstance(key, torch.Tensor) else type(key).__name__}, "
                f"value {_shape(value) if isinstance(value, torch.Tensor) else type(value).__name__}"
            )
        if key.dtype != self.dtype or value.dtype != self.dtype or key.device != self.device or value.device != self.device:
            raise ValueError(
                f"PagedKVCache holds {self.dtype} on {self.device}; got key {key.dtype} on {key.device}, "
                f"value {value.dtype} on {value.device}"
            )
        T, bs = key.shape[1], self.block_size
        if T == 0:
            return
        table, n = self._tables[seq_id], self._lengths[seq_id]
        cow = n % bs != 0 and self.blocks.ref_count(table[-1]) > 1  # writing into a shared block
        need = -(-(n + T) // bs) - len(table) + int(cow)
        fresh = self.blocks.allocate(need, what=f"appending {T} token(s) to sequence {seq_id} (length {n})")
        if cow:
            new = fresh.pop(0)
            self.k_pool[new], self.v_pool[new] = self.k_pool[table[-1]], self.v_pool[table[-1]]
            self.blocks.release(table[-1])
            table[-1] = new
            self.num_copies += 1
        table.extend(fresh)
        t = 0
        while t < T:  # fill the last block, then the fresh ones
            blk, off = table[(n + t) // bs], (n + t) % bs
            m = min(bs - off, T - t)
            self.k_pool[blk, off : off + m] = key[:, t : t + m].transpose(0, 1)  # (m, Hkv, D)
            self.v_pool[blk, off : off + m] = value[:, t : t + m].transpose(0, 1)
            t += m
        self._lengths[seq_id] = n + T

    def fork(self, parent: int, child: int | None = None) -> int:
        """A new sequence that shares every block of ``parent`` (no copy); returns its id."""
        self._check_seq(parent)
        child = self.add_sequence(child)
        self._tables[child] = list(self._tables[parent])
        self._lengths[child] = self._lengths[parent]
        for b in self._tables[child]:
            self.blocks.share(b)
        return child

    def free(self, seq_id: int) -> None:
        """Forget sequence ``seq_id``; blocks no other sequence holds return to the pool."""
        self._check_seq(seq_id)
        for b in self._tables.pop(seq_id):
            self.blocks.release(b)
        del self._lengths[seq_id]

    def gather(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``seq_id`` as contiguous tensors: (Hkv, S, D), (Hkv, S, Dv)."""
        self._check_seq(seq_id)
        table, n = self._tables[seq_id], self._lengths[seq_id]
        idx = torch.tensor(table, dtype=torch.int64, device=self.device)
        k = self.k_pool[idx].flatten(0, 1)[:n]  # (S, Hkv, D): the blocks end to end
        v = self.v_pool[idx].flatten(0, 1)[:n]
        return k.transpose(0, 1), v.transpose(0, 1)  # (Hkv, S, D), (Hkv, S, Dv)

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(blocks={self.num_blocks} x {self.block_size} tokens, Hkv={self.num_kv_heads}, "
            f"D={self.head_dim}, sequences={len(self._tables)}, free blocks={self.num_free_blocks}, dtype={self.dtype})"
        )


# ----------------------------------------------------------------------------------
# Attention through the block tables
# ----------------------------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,
    cache: PagedKVCache,
    seq_ids: Iterable[int],
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention of new queries over the cached keys of each sequence, read through its block table.

    Sequence ``b`` of the batch is ``seq_ids[b]``, of length ``S_b`` (its new tokens
    already appended); its queries attend to its keys ``0 .. S_b - 1`` only. Logical
    block ``n`` of every sequence is computed at once (one gather from the pool per
    block), and the blocks are merged with the online-softmax rule.

    Args:
        query: (B, Hq, T, E): the last ``T`` positions of each sequence (``T = 1`` when decoding).
        cache: the :class:`PagedKVCache`; ``E == cache.head_dim``.
        seq_ids: B sequence ids.
        attn_mask: optional, broadcastable to (B, Hq, T, S) with ``S = max S_b``; bool
            (True = may attend) or an additive float mask. Column ``j`` is key position ``j``.
        is_causal: bottom-right causal, as with chapter 11's cache: query ``i`` of
            sequence ``b`` is position ``S_b - T + i`` and sees keys ``j <= S_b - T + i``.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq`` (query head ``h`` uses key/value head ``h // (Hq // Hkv)``).

    Returns:
        (B, Hq, T, Dv) in the query's dtype; rows with no visible key give 0.

    Raises:
        ValueError: naming the argument and the shapes seen.
    """
    if not isinstance(cache, PagedKVCache):
        raise ValueError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    seq_ids = list(seq_ids)
    if not isinstance(query, torch.Tensor) or query.dim() != 4:
        got = _shape(query) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"query must have shape (B, Hq, T, E), got {got}")
    B, Hq, T, E = query.shape
    Hkv, bs = cache.num_kv_heads, cache.block_size
    if B != len(seq_ids):
        raise ValueError(f"query has batch size {B} but {len(seq_ids)} seq_ids were given: {seq_ids}")
    if E != cache.head_dim:
        raise ValueError(f"query has head dim E = {E} but the cache holds keys of D = {cache.head_dim}: query {_shape(query)}")
    if query.dtype != cache.dtype or query.device != cache.device:
        raise ValueError(f"the cache holds {cache.dtype} on {cache.device}; got query {query.dtype} on {query.device}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads but the cache has {Hkv} key/value heads: pass enable_gqa=True "
                f"for grouped-query attention (query {_shape(query)})"
            )
        if Hq % Hkv != 0:
            raise ValueError(f"for GQA the number of query heads ({Hq}) must be divisible by the number of key/value heads ({Hkv})")
    tables, lengths = cache.block_tables(seq_ids)  # (B, N), (B,)
    S = int(lengths.max()) if B else 0
    if attn_mask is not None:
        _check_mask_tensor(attn_mask, query, (B, Hq, T, S))
    scale = resolve_scale(scale, E)
    Dv, n_rep = cache.value_dim, Hq // Hkv
    if 0 in (B, Hq, T, S):
        return query.new_zeros(B, Hq, T, Dv)

    acc_dtype = compute_dtype(query.dtype)
    q5 = query.reshape(B, Hkv, n_rep, T, E).to(acc_dtype)  # (B, Hkv, n_rep, T, E): head g*n_rep + r uses g
    mask5 = None
    if attn_mask is not None:
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        b, h = m.shape[:2]
        mask5 = m.unsqueeze(2) if h == 1 else m.reshape(b, Hkv, n_rep, *m.shape[2:])  # (b, Hkv|1, n_rep|1, T|1, S|1)
    last_pos = (lengths - T).view(B, 1, 1) + torch.arange(T, device=query.device).view(1, T, 1)  # (B, T, 1)

    o = lse = None
    for n in range(tables.shape[1]):  # logical block n of every sequence
        lo = n * bs
        width = min(bs, S - lo)
        ids = tables[:, n]  # (B,) physical blocks
        k = cache.k_pool[ids, :width].to(acc_dtype).permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, width, E)
        v = cache.v_pool[ids, :width].to(acc_dtype).permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, width, Dv)
        k_pos = lo + torch.arange(width, device=query.device).view(1, 1, width)  # (1, 1, width)
        allowed = k_pos < lengths.view(B, 1, 1)  # (B, 1, width): this sequence's keys only
        if is_causal:
            allowed = allowed & (k_pos <= last_pos)  # (B, T, width), bottom-right
        allowed = allowed.view(B, 1, 1, -1, width)  # (B, 1, 1, T|1, width)
        bias = None
        if mask5 is not None:
            m_n = mask5 if mask5.shape[-1] == 1 else mask5[..., lo : lo + width]
            if m_n.dtype == torch.bool:
                allowed = allowed & m_n
            else:
                bias = m_n.to(acc_dtype)
        o_n, lse_n = attention_block(q5, k, v, scale, allowed, bias)  # (B, Hkv, n_rep, T, Dv), (..., T)
        if o is None or lse is None:
            o, lse = o_n, lse_n
        else:
            o, lse = merge_attention(o, lse, o_n, lse_n)
    assert o is not None  # S > 0, so there is at least one block
    return o.reshape(B, Hq, T, Dv).to(query.dtype)


# ----------------------------------------------------------------------------------
# Fragmentation: a stream of requests against three allocators
# ----------------------------------------------------------------------------------

POLICIES = ("contiguous_max", "contiguous_exact", "paged")


@dataclass(frozen=True)
class Request:
    """A request: a prompt of ``prompt_len`` tokens, then ``output_len`` generated ones."""

    prompt_len: int
    output_len: int

    @property
    def total(self) -> int:
        return self.prompt_len + self.output_len


def random_requests(n: int, max_len: int, *, seed: int = 0) -> list[Request]:
    """``n`` requests with prompt and output lengths uniform in ``1 .. max_len // 2`` each.

    So every request fits in ``max_len`` tokens; deterministic for a given ``seed``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (the number of requests) must be a non-negative int, got {n!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (a prompt and an output of at least 1 token), got {max_len!r}")
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len // 2 + 1, (n, 2), generator=g)
    return [Request(int(p), int(o)) for p, o in lens]


@dataclass
class ServingTrace:
    """What :func:`simulate_serving` recorded, one entry per decoding step.

    ``stored``: tokens in the cache; ``allocated``: token slots taken from the pool
    (reserved regions, or whole blocks); ``running``: requests in the batch;
    ``blocked_by_holes``: 1 where the next request waited although enough slots were
    free in total (external fragmentation: no hole was large enough).
    ``max_slack``: the largest ``allocated - stored`` of one sequence ever seen (for
    the paged policy, always less than one block). ``steps``: steps to serve every
    request; ``preemptions``: sequences evicted (paged policy) to let others grow;
    ``recomputed_tokens``: tokens the preempted requests prefilled again when readmitted.
    """

    policy: str
    capacity: int
    stored: list[int] = field(default_factory=list)
    allocated: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    blocked_by_holes: list[int] = field(default_factory=list)
    max_slack: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0

    @property
    def steps(self) -> int:
        return len(self.stored)

    def mean(self, name: str) -> float:
        xs = getattr(self, name)
        return sum(xs) / len(xs) if xs else 0.0


@dataclass
class _Seq:
    """A request being served: its progress and its memory (blocks, or one reserved region)."""

    request: Request
    generated: int = 0
    blocks: list[int] = field(default_factory=list)
    region: tuple[int, int] | None = None

    @property
    def length(self) -> int:
        return self.request.prompt_len + self.generated

    def slots(self, block_size: int) -> int:
        return len(self.blocks) * block_size if self.region is None else self.region[1]


def _first_fit(allocs: list[tuple[int, int]], size: int, capacity: int) -> int | None:
    """Start of the first hole of ``size`` slots in ``[0, capacity)``; ``allocs`` sorted (start, size)."""
    pos = 0
    for start, n in allocs:
        if start - pos >= size:
            return pos
        pos = start + n
    return pos if capacity - pos >= size else None


def simulate_serving(
    requests: list[Request],
    capacity: int,
    policy: str,
    *,
    block_size: int = 16,
    max_len: int | None = None,
    watermark: float = 0.05,
) -> ServingTrace:
    """Serve ``requests`` (all waiting at step 0, first come first served) from ``capacity`` token slots.

    Each step, every running request generates one token; a request is admitted when
    its memory can be found, and leaves when it has generated ``output_len`` tokens.

    Policies:
        ``"contiguous_max"``: reserve ``max_len`` contiguous slots per request (the
            output length is unknown in advance): internal fragmentation.
        ``"contiguous_exact"``: reserve exactly ``prompt_len + output_len`` contiguous
            slots (an oracle that knows the output length), first fit: holes between
            requests are external fragmentation.
        ``"paged"``: blocks of ``block_size`` slots, taken when the last one is full
            (capacity // block_size blocks). If a running request needs a block and
            none is free, the most recently admitted request is preempted: its blocks
            are freed and it waits at the head of the queue, to be recomputed later
            with the tokens it had generated (vLLM's recompute preemption). A request
            is admitted only if ``watermark · num_blocks`` blocks stay free after its
            prompt, room for the running requests to grow (fewer preemptions).

    Returns:
        A :class:`ServingTrace`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not 0.0 <= watermark < 1.0:
        raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    requests = list(requests)
    if not all(isinstance(r, Request) for r in requests):
        bad = next(r for r in requests if not isinstance(r, Request))
        raise ValueError(f"requests must be Request objects (see random_requests), got a {type(bad).__name__}: {bad!r}")
    if max_len is None:
        max_len = max((r.total for r in requests), default=1)
    if any(r.total > max_len for r in requests) or any(r.prompt_len < 1 or r.output_len < 1 for r in requests):
        raise ValueError(f"every request needs prompt_len, output_len >= 1 and prompt_len + output_len <= max_len = {max_len}")
    if capacity < max_len:
        raise ValueError(f"capacity ({capacity} slots) must hold at least one request of max_len = {max_len}")
    if policy == "paged" and capacity // block_size * block_size < max_len:
        raise ValueError(
            f"capacity // block_size = {capacity // block_size} blocks of {block_size} cannot hold a request of max_len = {max_len}"
        )
    trace = ServingTrace(policy, capacity)
    queue = [_Seq(r) for r in requests]  # waiting, first come first served
    running: list[_Seq] = []  # in admission order
    allocs: list[tuple[int, int]] = []  # contiguous: the reserved regions, sorted (start, size)
    blocks = BlockAllocator(max(1, capacity // block_size))  # paged: the pool

    def need(r: Request) -> int:
        return max_len if policy == "contiguous_max" else r.total

    def release(seq: _Seq) -> None:
        for b in seq.blocks:
            blocks.release(b)
        seq.blocks = []
        if seq.region is not None:
            allocs.remove(seq.region)
            seq.region = None

    while queue or running:
        # 1. admit from the head of the queue while it fits
        blocked = 0
        while queue:
            seq = queue[0]
            if policy == "paged":
                n_blocks = -(-seq.length // block_size)  # prefill the prompt (and what was generated)
                if blocks.num_free - n_blocks < watermark * blocks.num_blocks and running:
                    break
                seq.blocks = blocks.allocate(n_blocks)
            else:
                start = _first_fit(allocs, need(seq.request), capacity)
                if start is None:
                    blocked = int(capacity - sum(n for _, n in allocs) >= need(seq.request))
                    break
                seq.region = (start, need(seq.request))
                bisect.insort(allocs, seq.region)
            running.append(queue.pop(0))
        # 2. one decoding step: every running request writes one more token
        i = 0
        while i < len(running):
            seq = running[i]
            if policy == "paged" and seq.length % block_size == 0:  # its last block is full
                while blocks.num_free == 0:  # preempt the newest request, possibly this one
                    victim = running.pop()
                    release(victim)
                    queue.insert(0, victim)
                    trace.preemptions += 1
                    trace.recomputed_tokens += victim.length  # to prefill again
                    if victim is seq:
                        break
                if i == len(running):
                    break  # this request was the newest and was preempted
                seq.blocks.extend(blocks.allocate(1))
            seq.generated += 1
            i += 1
        # 3. record, then retire the finished requests
        trace.stored.append(sum(seq.length for seq in running))
        trace.allocated.append(sum(seq.slots(block_size) for seq in running))
        trace.running.append(len(running))
        trace.blocked_by_holes.append(blocked)
        trace.max_slack = max([trace.max_slack] + [seq.slots(block_size) - seq.length for seq in running])
        for seq in running:
            if seq.generated == seq.request.output_len:
                release(seq)
        running = [seq for seq in running if seq.generated < seq.request.output_len]
    return trace

