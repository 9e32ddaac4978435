"""Block-sparse attention: fixed sparsity patterns computed tile by tile (chapter 12).

Sparse Transformer (Child et al. 2019) and BigBird (Zaheer et al. 2020) keep
softmax attention but allow each query only a fixed set of keys, chosen so that
every position can still reach every other in a few layers:

* :func:`strided_mask_mod`: the previous ``stride`` keys plus every
  ``stride``-th key before them (Sparse Transformer, "strided");
* :func:`fixed_mask_mod`: the query's own block of ``stride`` keys plus the last
  ``c`` keys of every earlier block, the "summary" columns (Sparse Transformer,
  "fixed");
* :func:`bigbird_mask_mod`: a window, a few global tokens, and random keys
  (BigBird), at the granularity of tokens or of blocks.

They are mask_mods (``mask_mod(b, h, q_idx, kv_idx) -> bool``, True = may attend),
like those of :mod:`attention_lib.masks`, so they run in ``create_mask`` (for the
oracle) and in FlexAttention unchanged.

To *save* work, the ``L × S`` score matrix is cut into tiles of
``BLOCK_M × BLOCK_N``. :func:`block_mask_from_mask_mod` records which tiles are
empty (skipped), full (no mask needed) or partial (the mask_mod is evaluated on
that tile only): the same bookkeeping as FlexAttention's ``create_block_mask``.
:func:`block_sparse_attention` then visits only the non-empty tiles of each row
of query blocks and merges them with the online softmax of chapter 8
(:func:`attention_lib.online_softmax.attention_block` and ``merge_attention``).
The work is proportional to the number of non-empty tiles:
:func:`block_sparse_flops`.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Protocol, cast

import torch

from ._checks import _shape, check_no_dropout, check_positive_int, compute_dtype, repeat_kv, sdpa_inputs
from .masks import MaskMod, and_masks, causal, create_mask
from .online_softmax import attention_block, merge_attention

__all__ = [
    "BlockTable",
    "strided_mask_mod",
    "fixed_mask_mod",
    "bigbird_mask_mod",
    "block_mask_from_mask_mod",
    "block_sparse_attention",
    "block_sparse_flops",
]


# ----------------------------------------------------------------------------------
# The patterns, as mask_mods
# ----------------------------------------------------------------------------------


def strided_mask_mod(stride: int) -> MaskMod:
    """Sparse Transformer's strided pattern (causal, top-left aligned).

    Query ``i`` sees key ``j <= i`` if ``i - j < stride`` (the recent keys) or
    ``(i - j) % stride == 0`` (every ``stride``-th key before them): about
    ``stride + i / stride`` keys, ``O(L·√L)`` in all for ``stride ≈ √L``. Any key
    is reached in two steps: first by a stride, then within the window. For
    ``stride=2`` and L = S = 5::

        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0
        0 1 1 1 0
        1 0 1 1 1
    """
    stride = check_positive_int("stride", stride)

    def strided_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & ((d < stride) | (d % stride == 0))

    return strided_mod


def fixed_mask_mod(stride: int, c: int = 1) -> MaskMod:
    """Sparse Transformer's fixed pattern (causal, top-left aligned).

    Query ``i`` sees key ``j <= i`` if both are in the same block of ``stride``
    positions, or if ``j`` is one of the last ``c`` positions of its block (a
    "summary" column that every later query reads). Row ``i`` has
    ``i mod stride + 1 + c·⌊i / stride⌋`` keys. For ``stride=3, c=1`` and L = S = 6::

        1 0 0 0 0 0
        1 1 0 0 0 0
        1 1 1 0 0 0
        0 0 1 1 0 0
        0 0 1 1 1 0
        0 0 1 1 1 1

    Raises:
        ValueError: unless ``1 <= c <= stride``.
    """
    stride = check_positive_int("stride", stride)
    c = check_positive_int("c", c)
    if c > stride:
        raise ValueError(f"c (summary columns per block) must be at most stride={stride}, got {c}")

    def fixed_mod(b, h, q_idx, kv_idx):
        same_block = (q_idx // stride) == (kv_idx // stride)
        summary = (kv_idx % stride) >= stride - c
        return (q_idx >= kv_idx) & (same_block | summary)

    return fixed_mod


class TableMaskMod(Protocol):
    """A mask_mod that carries its unit-level pattern: ``table`` (n, n) bool (BigBird's draw)."""

    table: torch.Tensor
    seq_len: int

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor: ...


def bigbird_mask_mod(
    window: int,
    n_global: int,
    n_random: int,
    generator: torch.Generator | None = None,
    *,
    seq_len: int,
    block_size: int = 1,
) -> TableMaskMod:
    """BigBird's pattern: window + global + random, not causal (an encoder's).

    Positions are grouped into units of ``block_size`` tokens (1: tokens; BigBird
    uses blocks of 64). Unit ``u`` of a query sees unit ``t`` of a key if

    * ``|u - t| < window`` (a symmetric band of ``2·window - 1`` units),
    * or ``u < n_global`` or ``t < n_global`` (global units see and are seen by all),
    * or ``t`` is one of ``n_random`` units drawn for ``u`` uniformly among those
      not already allowed (so every row gains exactly ``min(n_random, free)`` units).

    The random units are drawn now, from ``generator``, into a table of
    ``⌈seq_len / block_size⌉²`` bools that the mask_mod reads; query and key
    indices must be below ``seq_len``. For ``window=1, n_global=1, n_random=1``
    and ``seq_len=5`` one draw gives::

        1 1 1 1 1
        1 1 0 1 0
        1 0 1 0 1
        1 1 0 1 0
        1 0 1 0 1

    Returns:
        A mask_mod; its attribute ``table`` is the (units, units) bool table.
    """
    window = check_positive_int("window", window)
    block_size = check_positive_int("block_size", block_size)
    seq_len = check_positive_int("seq_len", seq_len)
    for name, v in (("n_global", n_global), ("n_random", n_random)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    n = -(-seq_len // block_size)  # units
    u = torch.arange(n).view(n, 1)
    t = torch.arange(n).view(1, n)
    table = ((u - t).abs() < window) | (u < n_global) | (t < n_global)  # (n, n)
    if n_random > 0:
        draw = torch.rand(n, n, generator=generator)  # (n, n): uniform priorities
        draw = draw.masked_fill(table, -1.0)  # allowed units are never drawn again
        k = min(n_random, n)
        top = draw.topk(k, dim=1)  # (n, k)
        picked = torch.zeros(n, n, dtype=torch.bool).scatter_(1, top.indices, top.values >= 0)
        table = table | picked

    def bigbird_mod(b, h, q_idx, kv_idx):
        tab = table.to(q_idx.device) if isinstance(q_idx, torch.Tensor) else table
        return tab[q_idx // block_size, kv_idx // block_size]

    mod = cast(TableMaskMod, bigbird_mod)  # a plain function, so that flex_attention can trace it
    mod.table = table
    mod.seq_len = seq_len
    return mod


def _check_pattern_length(mask_mod, Q_LEN: int, KV_LEN: int) -> None:
    """A mask_mod drawn for ``seq_len`` positions (BigBird's) cannot cover longer sequences."""
    seq_len = getattr(mask_mod, "seq_len", None)
    if seq_len is not None and max(Q_LEN, KV_LEN) > seq_len:
        raise ValueError(
            f"mask_mod was drawn for seq_len={seq_len} positions but the lengths are "
            f"(L, S) = ({Q_LEN}, {KV_LEN}); draw it again with seq_len >= {max(Q_LEN, KV_LEN)}"
        )


# ----------------------------------------------------------------------------------
# The block table
# ----------------------------------------------------------------------------------


class BlockTable(NamedTuple):
    """Which tiles of the (L, S) scores a mask_mod leaves non-empty.

    full: (B, H, n_q, n_k) bool, every pair of the tile is allowed (no mask needed).
    partial: (B, H, n_q, n_k) bool, some but not all pairs are allowed (the
        mask_mod is evaluated on that tile). Tiles in neither are skipped.
    ``B`` and ``H`` are 1 when the mask does not depend on them (broadcast).
    """

    mask_mod: MaskMod
    full: torch.Tensor
    partial: torch.Tensor
    BLOCK_M: int
    BLOCK_N: int
    q_len: int
    kv_len: int

    @property
    def nonempty(self) -> torch.Tensor:
        """(B, H, n_q, n_k) bool: the tiles that are computed."""
        return self.full | self.partial

    def density(self) -> float:
        """The fraction of tiles computed (1 - FlexAttention's ``sparsity()/100``)."""
        return self.nonempty.float().mean().item()


def block_mask_from_mask_mod(
    mask_mod: MaskMod,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    device: str | torch.device = "cpu",
) -> BlockTable:
    """Evaluate ``mask_mod`` on every pair once and classify its tiles.

    The arguments are those of FlexAttention's ``create_block_mask`` (``B`` or
    ``H`` None: the mask does not depend on it). Tiles at the end of the sequence
    are smaller when a length is not a multiple of the block size; they are
    classified on their real pairs only.

    Returns:
        A :class:`BlockTable` of shape (B or 1, H or 1, ⌈Q_LEN/BLOCK_M⌉, ⌈KV_LEN/BLOCK_N⌉).
    """
    if not callable(mask_mod):
        raise ValueError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    if isinstance(BLOCK_SIZE, tuple) and len(BLOCK_SIZE) != 2:
        raise ValueError(f"BLOCK_SIZE must be an int or a pair (BLOCK_M, BLOCK_N), got {BLOCK_SIZE!r}")
    bm, bn = (BLOCK_SIZE, BLOCK_SIZE) if not isinstance(BLOCK_SIZE, tuple) else BLOCK_SIZE
    bm, bn = check_positive_int("BLOCK_SIZE", bm), check_positive_int("BLOCK_SIZE", bn)
    for name, n in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    _check_pattern_length(mask_mod, Q_LEN, KV_LEN)
    dense = create_mask(mask_mod, B, H, Q_LEN, KV_LEN, device)  # (B, H, L, S) bool
    nq, nk = -(-Q_LEN // bm), -(-KV_LEN // bn)
    pad = (0, nk * bn - KV_LEN, 0, nq * bm - Q_LEN)
    anyp = torch.nn.functional.pad(dense, pad, value=False)  # (B, H, nq·bm, nk·bn)
    allp = torch.nn.functional.pad(dense, pad, value=True)  # padding never makes a tile partial
    shape = (*dense.shape[:2], nq, bm, nk, bn)
    any_ = anyp.view(shape).any(dim=5).any(dim=3)  # (B, H, nq, nk)
    all_ = allp.view(shape).all(dim=5).all(dim=3)  # (B, H, nq, nk)
    return BlockTable(mask_mod, all_, any_ & ~all_, bm, bn, Q_LEN, KV_LEN)


def block_sparse_flops(table: BlockTable, D: int, Dv: int | None = None, heads: int = 1, batch: int = 1) -> int:
    """Forward FLOPs of :func:`block_sparse_attention` counted from the table.

    Each computed tile of ``m × n`` pairs costs ``2·m·n·D`` for ``QKᵀ`` and
    ``2·m·n·Dv`` for ``PV`` (multiply-adds count 2). Edge tiles are counted at
    their real size. ``heads``/``batch`` multiply a table that broadcasts over them.
    """
    if not isinstance(table, BlockTable):
        raise ValueError(f"table must be a BlockTable from block_mask_from_mask_mod, got {type(table).__name__}")
    Dv = D if Dv is None else Dv
    for name, n in (("D", D), ("Dv", Dv)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name} must be a non-negative int (0 counts the other product only), got {n!r}")
    check_positive_int("heads", heads)
    check_positive_int("batch", batch)
    ne = table.nonempty  # (B, H, nq, nk)
    nq, nk = ne.shape[-2:]
    rows = torch.full((nq,), table.BLOCK_M)
    rows[-1] = table.q_len - (nq - 1) * table.BLOCK_M
    cols = torch.full((nk,), table.BLOCK_N)
    cols[-1] = table.kv_len - (nk - 1) * table.BLOCK_N
    pairs = (ne.long() * rows.view(-1, 1) * cols.view(1, -1)).sum().item()
    rep = (heads // ne.shape[1] if ne.shape[1] == 1 else 1) * (batch // ne.shape[0] if ne.shape[0] == 1 else 1)
    return int(2 * pairs * (D + Dv) * rep)


# ----------------------------------------------------------------------------------
# The computation
# ----------------------------------------------------------------------------------


def _tile_mask(mask_mod, Bt: int, Ht: int, qs: int, qe: int, ks: int, ke: int, device) -> torch.Tensor:
    """The mask_mod on one tile: (Bt, Ht, qe - qs, ke - ks) bool."""
    b = torch.arange(Bt, device=device).view(Bt, 1, 1, 1)
    h = torch.arange(Ht, device=device).view(1, Ht, 1, 1)
    q = torch.arange(qs, qe, device=device).view(1, 1, -1, 1)
    kv = torch.arange(ks, ke, device=device).view(1, 1, 1, -1)
    return torch.as_tensor(mask_mod(b, h, q, kv), device=device).to(torch.bool).expand(Bt, Ht, qe - qs, ke - ks)


def _slice_mask(m: torch.Tensor, qs: int, qe: int, ks: int, ke: int) -> torch.Tensor:
    """One tile of a broadcastable (b, h, L|1, S|1) mask; size-1 dims stay as they are."""
    if m.shape[-2] > 1:
        m = m[..., qs:qe, :]
    if m.shape[-1] > 1:
        m = m[..., ks:ke]
    return m


def _block_sparse_core(query, key, value, attn_mask, dropout_p, is_causal, scale, *, table):
    """The 4-D core: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev)."""
    out_dtype = query.dtype
    dtype = compute_dtype(query.dtype)
    B, Hq, L, _ = query.shape
    q = query.to(dtype)
    k, v = repeat_kv(key.to(dtype), Hq), repeat_kv(value.to(dtype), Hq)  # (B, Hq, S, E), (B, Hq, S, Ev)
    BLOCK_M, BLOCK_N = table.BLOCK_M, table.BLOCK_N
    Bt, Ht = table.full.shape[:2]
    full = table.full.any(dim=(0, 1)) & table.full.all(dim=(0, 1))  # (nq, nk): full for every (b, h)
    visit = table.nonempty.any(dim=(0, 1))  # (nq, nk): computed for some (b, h)
    outs = []
    for n in range(visit.shape[0]):
        qs, qe = n * BLOCK_M, min((n + 1) * BLOCK_M, L)
        q_blk = q[:, :, qs:qe]  # (B, H, BLOCK_M, E)
        acc, lse = None, None  # m_i and l_i live in lse, the running log-sum-exp
        for j in visit[n].nonzero().flatten().tolist():  # only the non-empty tiles
            ks, ke = j * BLOCK_N, min((j + 1) * BLOCK_N, k.shape[2])
            allowed, bias = None, None
            if not full[n, j]:
                allowed = _tile_mask(table.mask_mod, Bt, Ht, qs, qe, ks, ke, q.device)  # (Bt, Ht, BLOCK_M, BLOCK_N)
            if attn_mask is not None:
                m = _slice_mask(attn_mask, qs, qe, ks, ke)  # (b|1, h|1, BLOCK_M|1, BLOCK_N|1)
                if m.dtype == torch.bool:
                    allowed = m if allowed is None else allowed & m
                else:
                    bias = m
            o_blk, lse_blk = attention_block(q_blk, k[:, :, ks:ke], v[:, :, ks:ke], scale, allowed, bias)
            if acc is None:
                acc, lse = o_blk, lse_blk  # (B, H, BLOCK_M, Ev), (B, H, BLOCK_M)
            else:
                acc, lse = merge_attention(acc, lse, o_blk, lse_blk)
        if acc is None:  # no tile in this row of blocks: every query sees nothing
            acc = q.new_zeros(B, Hq, qe - qs, v.shape[-1]) + 0 * q_blk.sum() + 0 * v.sum()  # 0, in the graph
        outs.append(acc)
    return torch.cat(outs, dim=2).to(out_dtype)  # (B, H, L, Ev)


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    mask_mod: MaskMod | None = None,
    block_mask: BlockTable | None = None,
    BLOCK_SIZE: int | tuple[int, int] = 64,
) -> torch.Tensor:
    """Attention under a sparse mask, computed only on the tiles it leaves non-empty.

    SDPA's arguments first, then its own (keyword-only). The mask is the AND of
    ``mask_mod`` (or ``block_mask.mask_mod``), ``is_causal`` (top-left) and a
    bool ``attn_mask``; a float ``attn_mask`` is added to the scores. Only the
    mask_mod (and ``is_causal``) decide which tiles are skipped; ``attn_mask`` is
    read on the visited tiles only.

    Args:
        query: (..., Hq, L, E).
        key: (..., Hkv, S, E).
        value: (..., Hkv, S, Ev).
        attn_mask: broadcastable to (..., Hq, L, S); bool (True = may attend) or
            an additive float mask.
        dropout_p: must be 0.
        is_causal: AND the top-left causal mask (and skip the tiles above it).
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hq % Hkv == 0``.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``; None attends everywhere.
        block_mask: a :class:`BlockTable` from :func:`block_mask_from_mask_mod`
            for these lengths (reuse it across calls); exclusive with ``mask_mod``
            and ``is_causal``.
        BLOCK_SIZE: tile size ``BLOCK_M`` (or ``(BLOCK_M, BLOCK_N)``) used to build
            the table from ``mask_mod``.

    Returns:
        (..., Hq, L, Ev) in the inputs' dtype (computed in float32 for 16-bit
        inputs). Equal to ``attention_ref`` with the dense mask
        ``create_mask(mask_mod, ...)``; rows with no allowed key give 0.
    """
    if mask_mod is not None and not callable(mask_mod):
        raise ValueError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    if block_mask is not None:
        if not isinstance(block_mask, BlockTable):
            raise ValueError(f"block_mask must be a BlockTable from block_mask_from_mask_mod, got {type(block_mask).__name__}")
        if mask_mod is not None or is_causal:
            raise ValueError("pass block_mask alone: its mask_mod already decides the pattern (no mask_mod, is_causal)")
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, False, scale, enable_gqa)
    check_no_dropout("block_sparse_attention", args.dropout_p)
    if args.is_causal:  # a CausalBias became is_causal
        is_causal = True
    B, H, L, _ = args.query.shape
    S = args.key.shape[2]
    if block_mask is None:
        if mask_mod is not None:
            _check_pattern_length(mask_mod, L, S)
        mods = [m for m in (mask_mod, causal if is_causal else None) if m is not None]
        if not mods:
            mods = [lambda b, h, q_idx, kv_idx: torch.ones((), dtype=torch.bool)]
        mod = mods[0] if len(mods) == 1 else and_masks(*mods)
        # A user's mask_mod may depend on b and h (padding): evaluate it on all of them.
        Bt, Ht = (B, H) if mask_mod is not None else (None, None)
        block_mask = block_mask_from_mask_mod(mod, Bt, Ht, L, S, BLOCK_SIZE, args.query.device)
    else:
        Bt, Ht = block_mask.full.shape[:2]
        if (block_mask.q_len, block_mask.kv_len) != (L, S) or Bt not in (1, B) or Ht not in (1, H):
            raise ValueError(
                f"block_mask was built for (B, H, L, S) = ({Bt}, {Ht}, {block_mask.q_len}, {block_mask.kv_len}) "
                f"but the inputs have ({B}, {H}, {L}, {S}) (query {_shape(query)}, key {_shape(key)})"
            )
    return args._replace(is_causal=False).run(_block_sparse_core, table=block_mask)
