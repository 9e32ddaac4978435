"""FlashAttention-2 as a Triton kernel, forward and backward (chapter 9).

The algorithm is FlashAttention-2 (Dao 2024): each program owns a block of
``BLOCK_M`` queries, keeps them on chip, streams the keys and values past them in
blocks of ``BLOCK_N``, and maintains the online softmax (``m_i`` running max,
``l_i`` running sum, ``acc`` unnormalised output). Only the output and the
log-sum-exp are written back; the backward pass recomputes the probabilities
from them. The layout of the code follows Triton's fused-attention tutorial
(the OpenAI kernel team, after Tillet et al. 2019): the inner loop, the forward
kernel, the backward kernels, the ``torch.autograd.Function``, one public function.

What this version adds to the tutorial, and what it inherits:

* SDPA semantics: top-left ``is_causal``, a dense bool or additive float
  ``attn_mask`` (loaded tile by tile with broadcast strides), ``scale``, GQA by
  mapping query head ``h`` to key/value head ``h // (Hq // Hkv)`` inside the
  kernel (no ``repeat_interleave``), any lengths (``Lq != Lk``, odd lengths) by
  boundary masks, head dims up to 128 (padded to a power of two), and a value
  head dim of its own. A query row whose keys are all masked gives 0, never NaN.
  The front-end of :mod:`attention_lib._checks` turns every call PyTorch accepts
  (rank >= 2, broadcast batch, zero sizes, ``CausalBias``) into the 4-D kernel call.
* Tuning for the GPU: ``exp2`` with ``log2(e)`` folded into the scale, causal
  block skipping (key blocks above the diagonal are never loaded), and a loop
  split so that only the blocks that need a mask pay for it; ``triton.autotune``
  over ``BLOCK_M``, ``BLOCK_N``, ``num_warps`` and ``num_stages``.

Where it runs. Triton decides when a ``@triton.jit`` decorator runs whether the
function is compiled for the GPU or run in its interpreter: it reads
``TRITON_INTERPRET`` then (triton 3.x). triton.language's own helpers
(``tl.zeros``, ``tl.max``...) are decorated when ``import triton`` runs, so the
variable must be set before triton is first imported, and stay set. The wrapper
``attention_lib.triton_flash_attention`` imports this module on its first call; if
the inputs are on the CPU and ``TRITON_INTERPRET`` is unset, it sets it to ``1``
first. In the interpreter the kernels run as NumPy code, one program at a time,
with one fixed small configuration (:func:`interpreter_config`): slow, exact, and
good for reading and testing. :data:`INTERPRET` says which mode this process got;
switching needs a fresh process. If triton was already imported for the GPU,
CPU inputs raise a ``RuntimeError`` that says so.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import check_no_dropout, sdpa_inputs

__all__ = ["INTERPRET", "gpu_configs", "interpreter_config", "triton_flash_attention"]


def _interpreting() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)  # triton >= 3.4
    except AttributeError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: True if this module's kernels run in Triton's interpreter (fixed at import).
INTERPRET: bool = _interpreting()
# The same flag, visible inside the kernels (a global must be a constexpr there).
_INTERPRET = tl.constexpr(INTERPRET)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e)); the wrapper folds it into the scale
_LOG2E = tl.constexpr(LOG2E)  # the same number inside the kernels (a global must be a constexpr there)
MAX_HEAD_DIM = 128

# Which attn_mask the kernels read: the values of their ``MASK_KIND`` constexpr.
MASK_NONE = tl.constexpr(0)  # no attn_mask
MASK_BOOL = tl.constexpr(1)  # a bool mask, True = may attend (read as uint8)
MASK_ADD = tl.constexpr(2)  # an additive float mask, added to the scores


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot`` accumulating in fp32.

    Triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bits, so
    there we upcast first (exact: a bf16 x bf16 product fits in fp32). Compiled
    for the GPU, this ``if`` vanishes.
    """
    if _INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest (ties to even), as the GPU does.

    Triton 3.9's interpreter truncates float32 -> bfloat16 casts (it drops the low
    16 bits: round toward zero), which doubles the rounding error of every
    bfloat16 tile and output; there we round by hand on the bits. Compiled for the
    GPU, this ``if`` vanishes and the cast is the hardware's round-to-nearest.
    """
    y = x.to(dtype)
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on bit 16
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def _mask_scores(
    s, q_idx, k_idx,  # a tile of scores (log2 units), the query and key index of its rows/columns
    Mask_base, stride_mm, stride_mn, Lq, Lk,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
):
    """Set the scores that may not be attended to ``-inf``; add an additive mask.

    One rule for all three kernels. ``q_idx`` and ``k_idx`` broadcast to the tile:
    ``(BLOCK_M, 1)`` and ``(1, BLOCK_N)`` for a tile of S, or ``(1, BLOCK_M)`` and
    ``(BLOCK_N, 1)`` for a tile of Sᵀ (the dK/dV kernel). A pair is allowed if both
    indices are in range, if it is on or below the diagonal (``IS_CAUSAL``, top-left),
    and if a bool ``attn_mask`` allows it. The mask is read only where allowed so far.
    """
    allowed = (q_idx < Lq) & (k_idx < Lk)  # the ragged edges of the last blocks
    if IS_CAUSAL:
        allowed = allowed & (q_idx >= k_idx)  # top-left: query i sees keys j <= i
    if MASK_KIND != MASK_NONE:
        mask_ptrs = Mask_base + q_idx * stride_mm + k_idx * stride_mn
        if MASK_KIND == MASK_BOOL:  # True = may attend
            allowed = allowed & (tl.load(mask_ptrs, mask=allowed, other=0) != 0)
        else:  # MASK_ADD, converted to log2 units like the scores
            s += tl.load(mask_ptrs, mask=allowed, other=0.0).to(tl.float32) * _LOG2E
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _key_range(start_m, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """The key blocks that query block ``start_m`` visits: ``[0, mid)`` unmasked, ``[mid, hi)`` masked.

    Causal: no key block past the diagonal is visited (block skipping), and only the
    blocks that cross it need the mask. Otherwise only the ragged last block does.
    With an ``attn_mask`` every block needs it: ``mid = 0``. Shared by the forward
    kernel and the dQ kernel, which visit the same keys.
    """
    if IS_CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, Lk)
        mid = tl.minimum(start_m * BLOCK_M, Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        mid = Lk // BLOCK_N * BLOCK_N
    if MASK_KIND != MASK_NONE:
        mid = 0
    return mid, hi


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # the running state of one query block, and its queries
    K_base, V_base, Mask_base,  # pointers to this (batch, head)'s keys, values, mask
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, offs_d, offs_dv,  # query rows, head-dim columns of K and of V
    lo, hi,  # the key range [lo, hi) this stage visits
    qk_scale, Lq, Lk, D, Dv,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Stream key/value blocks ``[lo, hi)`` past one query block (online softmax).

    Scores are kept in log2 units: ``s = q·k · scale · log2(e)``, so ``exp2(s - m)``
    is the softmax numerator. ``MASKED`` stages apply the boundary, causal and
    ``attn_mask`` masks; the other stage visits only blocks that need none.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # -- scores of this tile: (BLOCK_M, BLOCK_N) --
        kT = tl.load(
            K_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0,
        )  # (BLOCK_D, BLOCK_N): the tile of Kᵀ
        s = _dot(q, kT, PRECISION) * qk_scale
        if MASKED:  # boundary, causal and attn_mask masks
            s = _mask_scores(
                s, offs_m[:, None], offs_n[None, :], Mask_base, stride_mm, stride_mn, Lq, Lk, IS_CAUSAL, MASK_KIND,
            )
        # -- online softmax: new running max, rescale the old state --
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # a row that has seen no allowed key yet has m_ij = -inf; subtract 0 instead
            # so that exp2(-inf - (-inf)) = NaN never happens (the row stays all 0)
            m_ij_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_ij_safe = m_ij
        p = tl.exp2(s - m_ij_safe[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_ij_safe)  # (BLOCK_M,): how much the old max overestimated
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Dv), other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + _dot(_to(p, v.dtype), v, PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


def gpu_configs(kind: str) -> list:
    """The autotuning search space on a GPU for one kernel (``"fwd"``, ``"dkdv"``, ``"dq"``).

    ``BLOCK_M`` tiles the queries, ``BLOCK_N`` the keys; ``num_warps`` is the number
    of 32-thread warps per program; ``num_stages`` the depth of the software
    pipeline that prefetches the next K/V tiles while the current one is used.
    """
    if kind == "fwd":
        blocks = [(64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)]
        stages = [2, 3, 4]
    elif kind == "dkdv":  # one program per key block: a small query tile streams past it
        blocks = [(32, 64), (32, 128), (64, 64), (64, 128)]
        stages = [2, 3]
    elif kind == "dq":  # one program per query block: a small key tile streams past it
        blocks = [(64, 32), (128, 32), (64, 64), (128, 64)]
        stages = [2, 3]
    else:
        raise ValueError(f"kind must be 'fwd', 'dkdv' or 'dq', got {kind!r}")
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in blocks
        for w in (4, 8)
        for s in stages
        if w == 4 or bm * bn >= 128 * 64  # 8 warps only pay off on big tiles
    ]


def interpreter_config(kind: str) -> list:
    """The single configuration used in the interpreter, where autotuning is pointless.

    Small tiles, so that short test sequences still span several blocks, and of the
    same aspect as on the GPU (BLOCK_M > BLOCK_N for "fwd" and "dq", < for "dkdv").
    """
    bm, bn = (16, 32) if kind == "dkdv" else (32, 16)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]


def _stdlib_interpreted() -> bool:
    """Whether triton.language's own jit helpers (tl.zeros, tl.max...) run in the interpreter.

    They are decorated when ``import triton`` runs: if triton was imported before
    ``TRITON_INTERPRET=1`` was set, our interpreted kernels cannot call them.
    """
    return not isinstance(tl.zeros, triton.runtime.jit.JITFunction)


def _configs(kind: str) -> list:
    return interpreter_config(kind) if INTERPRET else gpu_configs(kind)


# Re-tuned for every new (lengths, head dim, causal, mask kind, dtype).
_TUNE_KEY = ["Lq", "Lk", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND"]


@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY)
@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, Lq, Lk, D, Dv, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: one block of ``BLOCK_M`` queries of one (batch, head).

    Grid: ``(cdiv(Lq, BLOCK_M), B * Hq)``. Writes ``Out`` (B, Hq, Lq, Dv) and the
    log-sum-exp ``LSE`` (B, Hq, Lq), in log2 units, for the backward pass.
    """
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    off_hkv = off_h // GROUP  # GQA: query head h reads key/value head h // (Hq // Hkv)

    Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    K_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    Mask_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # the online-softmax state: running max, running sum, unnormalised output
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # the query block stays on chip for the whole loop: (BLOCK_M, BLOCK_D)
    q = tl.load(
        Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0,
    )

    # Which key blocks to visit: [0, mid) needs no mask at all; [mid, hi) gets the
    # boundary/causal/attn_mask masks. Causal: none past the diagonal (block skipping).
    mid, hi = _key_range(start_m, Lk, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND)

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, Mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, 0, mid, qk_scale, Lq, Lk, D, Dv,
        BLOCK_N, IS_CAUSAL, MASK_KIND, False, PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, Mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, mid, hi, qk_scale, Lq, Lk, D, Dv,
        BLOCK_N, IS_CAUSAL, MASK_KIND, True, PRECISION,
    )

    # epilogue: normalise; a row with no allowed key has l_i = 0 and acc = 0 -> output 0
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))  # log2 Σ exp2(s)

    tl.store(LSE + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)
    O_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(
        O_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        _to(acc, Out.dtype.element_ty),
        mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Dv),
    )


# --------------------------------------------------------------------------------------
# Backward (FlashAttention-2: recompute P from the saved log-sum-exp, never store it)
#
#   P = exp2(S - LSE),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - Δ),  Δ = rowsum(dO ∘ O),
#   dQ = dS K · scale,  dK = dSᵀ Q · scale
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, Lq, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Δ = rowsum(dO ∘ O): (B, Hq, Lq) in fp32. Grid: ``(cdiv(Lq, BLOCK_M), B * Hq)``."""
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (offs_m[:, None] < Lq) & (offs_dv[None, :] < Dv)
    o = tl.load(
        Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        mask=inside, other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=inside, other=0.0,
    ).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,  # the state of one key block: (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV)
    Q_base, DO_base, LSE_base, Delta_base, Mask_base,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
    offs_n, offs_d, offs_dv, lo, hi, qk_scale, Lq, Lk, D, Dv,
    BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Stream query blocks ``[lo, hi)`` past one key block; accumulate its dK and dV.

    Works on transposed tiles (keys are rows), so that dK and dV come out row-wise.
    """
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < Lq
        qT = tl.load(
            Q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
            mask=in_q[None, :] & (offs_d[:, None] < D), other=0.0,
        )  # (BLOCK_D, BLOCK_M)
        do = tl.load(
            DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
            mask=in_q[:, None] & (offs_dv[None, :] < Dv), other=0.0,
        )  # (BLOCK_M, BLOCK_DV)
        lse = tl.load(LSE_base + offs_m, mask=in_q, other=0.0)
        # a fully masked row has lse = -inf: use +inf so that its P is exp2(-inf) = 0
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(Delta_base + offs_m, mask=in_q, other=0.0)

        sT = _dot(k, qT, PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        if MASKED:  # the same masks, on the transposed tile: queries are columns
            sT = _mask_scores(
                sT, offs_m[None, :], offs_n[:, None], Mask_base, stride_mm, stride_mn, Lq, Lk, IS_CAUSAL, MASK_KIND,
            )
        pT = tl.exp2(sT - lse[None, :])  # (BLOCK_N, BLOCK_M): Pᵀ, recomputed
        dv += _dot(_to(pT, do.dtype), do, PRECISION)  # dV += Pᵀ dO
        dpT = _dot(v, tl.trans(do), PRECISION)  # (BLOCK_N, BLOCK_M): (dO Vᵀ)ᵀ
        dsT = pT * (dpT - delta[None, :])  # dSᵀ, in units of the natural-log scores
        dk += _dot(_to(dsT, qT.dtype), tl.trans(qT), PRECISION)  # dK += dSᵀ Q (scale applied later)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, Delta, Mask, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Hkv, GROUP, Lq, Lk, D, Dv, sm_scale, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dK and dV of one block of ``BLOCK_N`` keys of one (batch, kv head).

    Grid: ``(cdiv(Lk, BLOCK_N), B * Hkv)``. With GQA the program loops over the
    ``GROUP`` query heads that share this key/value head, so dK and dV are
    summed in registers: no atomics, no (B, Hq, Lk, D) temporary.
    """
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hkv
    off_hkv = off_bh % Hkv

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_k = offs_n < Lk
    K_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    k = tl.load(
        K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=in_k[:, None] & (offs_d[None, :] < D), other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=in_k[:, None] & (offs_dv[None, :] < Dv), other=0.0,
    )  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Which query blocks see this key block. Causal: none above the diagonal.
    # [lo, mid) needs the masks; [mid, Lq) sees every key of the block.
    if IS_CAUSAL:
        lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.cdiv((start_n + 1) * BLOCK_N, BLOCK_M) * BLOCK_M, Lq)
    else:
        lo = 0
        mid = 0
    if MASK_KIND != MASK_NONE:
        mid = Lq

    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        off_bh_q = off_b * Hq + off_h
        Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        DO_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        LSE_base = LSE + off_bh_q.to(tl.int64) * Lq
        Delta_base = Delta + off_bh_q.to(tl.int64) * Lq
        Mask_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, Mask_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
            offs_n, offs_d, offs_dv, lo, mid, qk_scale, Lq, Lk, D, Dv,
            BLOCK_M, IS_CAUSAL, MASK_KIND, True, PRECISION,
        )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, Mask_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
            offs_n, offs_d, offs_dv, mid, Lq, qk_scale, Lq, Lk, D, Dv,
            BLOCK_M, IS_CAUSAL, MASK_KIND, False, PRECISION,
        )

    # DK and DV have the layout of K and V (and their strides: see the wrapper)
    DK_base = DK + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    DV_base = DV + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    tl.store(
        DK_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        _to(dk * sm_scale, DK.dtype.element_ty),
        mask=in_k[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        _to(dv, DV.dtype.element_ty),
        mask=in_k[:, None] & (offs_dv[None, :] < Dv),
    )


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,  # the state of one query block
    K_base, V_base, Mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, offs_d, offs_dv, lo, hi, qk_scale, Lq, Lk, D, Dv,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Stream key/value blocks ``[lo, hi)`` past one query block; accumulate its dQ."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n < Lk
        kT = tl.load(
            K_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=in_k[None, :] & (offs_d[:, None] < D), other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        vT = tl.load(
            V_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
            mask=in_k[None, :] & (offs_dv[:, None] < Dv), other=0.0,
        )  # (BLOCK_DV, BLOCK_N)
        s = _dot(q, kT, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            s = _mask_scores(
                s, offs_m[:, None], offs_n[None, :], Mask_base, stride_mm, stride_mn, Lq, Lk, IS_CAUSAL, MASK_KIND,
            )
        p = tl.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N): P, recomputed
        dp = _dot(do, vT, PRECISION)  # (BLOCK_M, BLOCK_N): dO Vᵀ
        ds = p * (dp - delta[:, None])
        dq += _dot(_to(ds, kT.dtype), tl.trans(kT), PRECISION)  # dQ += dS K (scale applied later)
    return dq


@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, Delta, Mask, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, GROUP, Lq, Lk, D, Dv, sm_scale, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dQ of one block of ``BLOCK_M`` queries. Grid as in the forward."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    off_hkv = off_h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < Lq
    Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    DO_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    K_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    Mask_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh

    q = tl.load(
        Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    do = tl.load(
        DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=in_q[:, None] & (offs_dv[None, :] < Dv), other=0.0,
    )  # (BLOCK_M, BLOCK_DV)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Lq + offs_m, mask=in_q, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked row: P = 0
    delta = tl.load(Delta + off_bh.to(tl.int64) * Lq + offs_m, mask=in_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    mid, hi = _key_range(start_m, Lk, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND)  # the forward's key ranges

    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K_base, V_base, Mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, 0, mid, qk_scale, Lq, Lk, D, Dv,
        BLOCK_N, IS_CAUSAL, MASK_KIND, False, PRECISION,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K_base, V_base, Mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, mid, hi, qk_scale, Lq, Lk, D, Dv,
        BLOCK_N, IS_CAUSAL, MASK_KIND, True, PRECISION,
    )

    DQ_base = DQ + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    tl.store(
        DQ_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        _to(dq * sm_scale, DQ.dtype.element_ty),
        mask=in_q[:, None] & (offs_d[None, :] < D),
    )


# --------------------------------------------------------------------------------------
# The autograd.Function and the public function
# --------------------------------------------------------------------------------------


def _block(d: int) -> int:
    """Head dims are padded to a power of two (at least 16, the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(d))


def _strides_ok(t: torch.Tensor) -> bool:
    """Unit stride in the head dim, and strides that ``torch.empty_like`` reproduces."""
    return t.stride(-1) == 1 and torch.empty_like(t).stride() == t.stride()


def _mask_args(attn_mask, query, key):
    """(pointer tensor, 4 strides, MASK_KIND) for a mask broadcast to (B, Hq, Lq, Lk)."""
    if attn_mask is None:
        return query, (0, 0, 0, 0), MASK_NONE.value  # the pointer is never read
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[2]
    is_bool = attn_mask.dtype == torch.bool
    mask = attn_mask.view(torch.uint8) if is_bool else attn_mask
    mask = mask.expand(B, Hq, Lq, Lk)  # (B, Hq, Lq, Lk), stride 0 where broadcast: no copy
    return mask, mask.stride(), MASK_BOOL.value if is_bool else MASK_ADD.value


class _TritonFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale):
        # the last dim must be contiguous, and dQ, dK, dV are allocated with Q, K, V's strides
        query, key, value = (t if _strides_ok(t) else t.contiguous() for t in (query, key, value))
        B, Hq, Lq, D = query.shape
        Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
        out = torch.empty(B, Hq, Lq, Dv, dtype=query.dtype, device=query.device)  # (B, Hq, Lq, Dv)
        lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=query.device)  # (B, Hq, Lq), log2 units
        mask, mask_strides, mask_kind = _mask_args(attn_mask, query, key)
        precision = "ieee" if query.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32)

        def grid(meta):
            return (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)

        with torch.cuda.device_of(query):
            _attn_fwd[grid](
                query, key, value, mask, out, lse,
                *query.stride(), *key.stride(), *value.stride(), *mask_strides, *out.stride(),
                Hq, Hq // Hkv, Lq, Lk, D, Dv, scale * LOG2E,
                BLOCK_D=_block(D), BLOCK_DV=_block(Dv),
                IS_CAUSAL=is_causal, MASK_KIND=mask_kind, PRECISION=precision,
            )
        ctx.save_for_backward(query, key, value, out, lse, attn_mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        B, Hq, Lq, D = query.shape
        Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
        dout = dout.contiguous()  # (B, Hq, Lq, Dv)
        # dQ, dK, dV are written with the strides of Q, K, V (the kernels read one set of strides)
        dq, dk, dv = (torch.empty_like(t) for t in (query, key, value))
        delta = torch.empty_like(lse)  # (B, Hq, Lq)
        mask, mask_strides, mask_kind = _mask_args(attn_mask, query, key)
        precision = "ieee" if query.dtype == torch.float32 else "tf32"
        consts = {
            "BLOCK_D": _block(D), "BLOCK_DV": _block(Dv),
            "IS_CAUSAL": ctx.is_causal, "MASK_KIND": mask_kind, "PRECISION": precision,
        }

        with torch.cuda.device_of(query):
            _attn_bwd_preprocess[(triton.cdiv(Lq, 64), B * Hq)](
                out, dout, delta, *out.stride(), *dout.stride(), Hq, Lq, Dv,
                BLOCK_M=64, BLOCK_DV=_block(Dv),
            )
            _attn_bwd_dkdv[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)](
                query, key, value, dout, lse, delta, mask, dk, dv,
                *query.stride(), *key.stride(), *value.stride(), *dout.stride(), *mask_strides,
                Hq, Hkv, Hq // Hkv, Lq, Lk, D, Dv, ctx.scale, ctx.scale * LOG2E, **consts,
            )
            _attn_bwd_dq[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
                query, key, value, dout, lse, delta, mask, dq,
                *query.stride(), *key.stride(), *value.stride(), *dout.stride(), *mask_strides,
                Hq, Hq // Hkv, Lq, Lk, D, Dv, ctx.scale, ctx.scale * LOG2E, **consts,
            )
        return dq, dk, dv, None, None, None


def _triton_core(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """The 4-D core (see :func:`attention_lib._checks.sdpa_inputs`): (B, Hq, L, Ev)."""
    return _TritonFlashAttention.apply(query, key, value, attn_mask, is_causal, scale)


def triton_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """FlashAttention-2 in Triton: ``softmax(Q Kᵀ · scale + mask) V``, forward and backward.

    SDPA's signature and accepted inputs (rank >= 2, broadcast batch, zero sizes,
    ``CausalBias``; see :mod:`attention_lib._checks`). Tiles are multiplied with
    float16/bfloat16 ``tl.dot`` inputs and float32 accumulation; the softmax state,
    the log-sum-exp and the gradients accumulate in float32.

    Args:
        query: (..., Hq, L, E), float16, bfloat16 or float32; E <= 128.
        key: (..., Hkv, S, E); ``Hkv == Hq`` or 1, or ``Hq % Hkv == 0`` with ``enable_gqa``.
        value: (..., Hkv, S, Ev); Ev <= 128.
        attn_mask: broadcastable to (..., Hq, L, S). Bool: True = may attend.
            Float (the query's dtype or float32): added to the scores; no gradient flows to it.
        dropout_p: must be 0 (this kernel has no dropout).
        is_causal: top-left causal mask; key blocks past the diagonal are skipped.
        scale: multiplies the scores; defaults to ``1/sqrt(E)``.
        enable_gqa: allow ``Hkv < Hq``; the kernel maps heads, nothing is repeated.

    Returns:
        (..., Hq, L, Ev), in the inputs' dtype. Rows with every key masked are 0.

    Raises:
        ValueError: on bad shapes, dtypes or devices (see ``sdpa_inputs``),
            dropout, or head dims over 128.
        RuntimeError: CPU inputs in a process where triton was imported before
            ``TRITON_INTERPRET=1`` was set.
    """
    args = sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    check_no_dropout("triton_flash_attention", args.dropout_p)
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query, key and value must be float16, bfloat16 or float32; got {query.dtype}")
    if args.query.shape[-1] > MAX_HEAD_DIM or args.value.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"head dims up to {MAX_HEAD_DIM} are supported: query {tuple(query.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if query.device.type == "cpu" and not (INTERPRET and _stdlib_interpreted()):
        raise RuntimeError(
            "query is on the CPU, which needs Triton's interpreter, but this process has "
            "triton compiled for the GPU: TRITON_INTERPRET=1 must be set before `import triton` "
            "(and before attention_lib.triton_flash is imported). Set it at the top of your "
            "script or notebook, or in the shell, and restart the process."
        )
    if attn_mask is not None and getattr(attn_mask, "requires_grad", False) and torch.is_grad_enabled():
        raise ValueError("triton_flash_attention does not compute gradients for attn_mask")
    return args.run(_triton_core)
