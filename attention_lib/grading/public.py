"""The public checks of the three assignments, shipped inside attention_lib.

They live in the package (not next to the notebooks) so that ``check("q1")`` works
in Colab without uploading any file. The grader runs them too, as the visible part
of each question's score; the hidden tests (in the master notebooks, moved to the
autograder folder by ``assign``) go further: random shapes, odd lengths, GQA, fully
masked rows, all against the float64 oracle.

    PUBLIC["a1_softmax"]["q2"]  ->  [check_fn, ...]    each check_fn(ns) raises CheckFailure
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..attention import attention_ref
from ..softmax import softmax as _softmax_ref
from .testing import (
    CheckFailure,
    call,
    expect_close,
    expect_tensor,
    get_function,
    measure_call,
    random_qkv,
    renormalise_hint,
    weight,
)

__all__ = ["PUBLIC", "public"]

PUBLIC: dict[str, dict[str, list[Callable[[dict], None]]]] = {}


def public(assignment: str, question: str):
    """Register a public check of ``assignment``/``question`` (in definition order)."""

    def register(fn):
        PUBLIC.setdefault(assignment, {}).setdefault(question, []).append(fn)
        return fn

    return register


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Assignment 1: dot products, softmax, a numerically stable masked softmax
# ---------------------------------------------------------------------------
A1 = "a1_softmax"


@public(A1, "q1")
def dot_scores_shape(ns):
    """dot_scores of a (3, 4) query and a (5, 4) key is a (3, 5) score matrix."""
    f = get_function(ns, "dot_scores")
    q, k = torch.randn(3, 4, generator=_gen(0)), torch.randn(5, 4, generator=_gen(1))
    expect_tensor(call(f, q, k), "dot_scores(q, k)", shape=(3, 5), dtype=q.dtype)


@public(A1, "q1")
def dot_scores_values(ns):
    """dot_scores equals q @ k.T / sqrt(D) by default, and uses scale= when given."""
    f = get_function(ns, "dot_scores")
    q, k = torch.randn(3, 4, generator=_gen(0)), torch.randn(5, 4, generator=_gen(1))
    expect_close(call(f, q, k), (q.double() @ k.double().T / 2.0).float(), "dot_scores(q, k)")
    expect_close(call(f, q, k, scale=1.0), (q.double() @ k.double().T).float(), "dot_scores(q, k, scale=1.0)")


@public(A1, "q2")
def softmax_small(ns):
    """softmax matches torch.softmax on a small example, and each row sums to 1."""
    f = get_function(ns, "softmax")
    x = torch.randn(4, 6, generator=_gen(2))
    out = expect_tensor(call(f, x), "softmax(x)", shape=x.shape, dtype=x.dtype)
    expect_close(out, torch.softmax(x.double(), -1).float(), "softmax(x)")


@public(A1, "q2")
@weight(3)  # the point of the question: a softmax without the max shift loses most of q2
def softmax_large_inputs(ns):
    """softmax of [1000, 1001, 1002] does not overflow (subtract the row max)."""
    f = get_function(ns, "softmax")
    x = torch.tensor([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1002.0]])
    expect_close(call(f, x), torch.softmax(x.double(), -1).float(), "softmax([[1000, 1001, 1002], ...])")


@public(A1, "q2")
def softmax_dim(ns):
    """softmax(x, dim=0) normalises the columns."""
    f = get_function(ns, "softmax")
    x = torch.randn(3, 5, generator=_gen(3))
    expect_close(call(f, x, dim=0), torch.softmax(x.double(), 0).float(), "softmax(x, dim=0)")


@public(A1, "q3")
def masked_softmax_causal(ns):
    """masked_softmax with a causal mask matches the reference; masked weights are exactly 0."""
    f = get_function(ns, "masked_softmax")
    s = torch.randn(4, 4, generator=_gen(4))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    out = expect_tensor(call(f, s, mask), "masked_softmax(s, causal_mask)", shape=s.shape, dtype=s.dtype)
    ref = _softmax_ref(s.double().masked_fill(~mask, float("-inf"))).float()
    expect_close(out, ref, "masked_softmax(s, causal_mask)", hint=renormalise_hint(s, mask))
    if (out[~mask] != 0).any():
        raise CheckFailure("masked_softmax gives non-zero weight to masked positions (mask False).")


@public(A1, "q3")
@weight(2)  # the point of the question: never NaN
def masked_softmax_fully_masked_row(ns):
    """A row in which every key is masked gives weights 0, not NaN."""
    f = get_function(ns, "masked_softmax")
    s = torch.randn(3, 4, generator=_gen(5))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out = call(f, s, mask)
    ref = _softmax_ref(s.double().masked_fill(~mask, float("-inf"))).float()
    expect_close(out, ref, "masked_softmax with a fully masked row")
    if (out[1] != 0).any():
        raise CheckFailure("a fully masked row should give all-zero weights, got " f"{out[1].tolist()}.")
    expect_close(out[0], torch.softmax(s[0].double(), -1).float(), "an unmasked row of masked_softmax")


# ---------------------------------------------------------------------------
# Assignment 2: scaled, masked and multi-head attention with GQA
# ---------------------------------------------------------------------------
A2 = "a2_attention"


@public(A2, "q1")
def attention_shape(ns):
    """attention maps (B, H, L, D), (B, H, S, D), (B, H, S, Dv) to (B, H, L, Dv)."""
    f = get_function(ns, "attention")
    q, k, v = random_qkv(2, 3, 5, 7, 8, Dv=6)
    expect_tensor(call(f, q, k, v), "attention(q, k, v)", shape=(2, 3, 5, 6), dtype=q.dtype)


@public(A2, "q1")
def attention_matches_oracle(ns):
    """attention matches attention_ref, without a mask and with scale=0.5."""
    f = get_function(ns, "attention")
    q, k, v = random_qkv(1, 2, 5, 7, 8, seed=1)
    expect_close(call(f, q, k, v), attention_ref(q, k, v), "attention(q, k, v)")
    expect_close(call(f, q, k, v, scale=0.5), attention_ref(q, k, v, scale=0.5), "attention(q, k, v, scale=0.5)")


@public(A2, "q1")
def attention_masks(ns):
    """attention applies a bool attn_mask (True = may attend) and is_causal (top-left)."""
    f = get_function(ns, "attention")
    q, k, v = random_qkv(1, 2, 5, 5, 8, seed=2)
    mask = torch.rand(1, 1, 5, 5, generator=_gen(6)) > 0.3
    mask[..., 0] = True
    expect_close(call(f, q, k, v, attn_mask=mask), attention_ref(q, k, v, attn_mask=mask), "attention(..., attn_mask=mask)")
    expect_close(call(f, q, k, v, is_causal=True), attention_ref(q, k, v, is_causal=True), "attention(..., is_causal=True)")


@public(A2, "q2")
def gqa_matches_oracle(ns):
    """gqa_attention with 4 query heads and 2 key/value heads matches the oracle."""
    f = get_function(ns, "gqa_attention")
    q, k, v = random_qkv(2, 4, 5, 6, 8, Hkv=2, seed=3)
    out = expect_tensor(call(f, q, k, v), "gqa_attention(q, k, v)", shape=(2, 4, 5, 8), dtype=q.dtype)
    expect_close(out, attention_ref(q, k, v, enable_gqa=True), "gqa_attention(q, k, v)")


@public(A2, "q2")
def gqa_causal(ns):
    """gqa_attention with is_causal=True matches the oracle."""
    f = get_function(ns, "gqa_attention")
    q, k, v = random_qkv(1, 4, 6, 6, 8, Hkv=1, seed=4)
    expect_close(call(f, q, k, v, is_causal=True), attention_ref(q, k, v, is_causal=True, enable_gqa=True), "gqa_attention(..., is_causal=True)")


def mha_reference(x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads, is_causal=False):
    """Multi-head attention with GQA from the oracle, in float64: (B, L, E) -> (B, L, E)."""
    B, L, E = x.shape
    hd = E // num_heads
    x64 = x.double()
    q = (x64 @ w_q.double()).view(B, L, num_heads, hd).transpose(1, 2)  # (B, H, L, hd)
    k = (x64 @ w_k.double()).view(B, L, num_kv_heads, hd).transpose(1, 2)  # (B, Hkv, L, hd)
    v = (x64 @ w_v.double()).view(B, L, num_kv_heads, hd).transpose(1, 2)  # (B, Hkv, L, hd)
    y = attention_ref(q, k, v, is_causal=is_causal, enable_gqa=num_kv_heads != num_heads)  # (B, H, L, hd)
    y = y.transpose(1, 2).reshape(B, L, E)  # (B, L, E)
    return (y @ w_o.double()).to(x.dtype)


def mha_inputs(B, L, E, H, Hkv, seed=0):
    g = _gen(seed)
    hd = E // H
    x = torch.randn(B, L, E, generator=g)
    w_q = torch.randn(E, E, generator=g) / math.sqrt(E)
    w_k = torch.randn(E, Hkv * hd, generator=g) / math.sqrt(E)
    w_v = torch.randn(E, Hkv * hd, generator=g) / math.sqrt(E)
    w_o = torch.randn(E, E, generator=g) / math.sqrt(E)
    return x, w_q, w_k, w_v, w_o


@public(A2, "q3")
def mha_shape_and_values(ns):
    """multi_head_attention with 4 heads (no GQA) gives (B, L, E) and matches the reference."""
    f = get_function(ns, "multi_head_attention")
    args = mha_inputs(2, 5, 16, 4, 4)
    out = expect_tensor(call(f, *args, 4, 4), "multi_head_attention(x, ..., 4, 4)", shape=(2, 5, 16))
    expect_close(out, mha_reference(*args, 4, 4), "multi_head_attention(x, ..., 4, 4)")


@public(A2, "q3")
def mha_gqa_causal(ns):
    """multi_head_attention with 4 query heads, 2 key/value heads and is_causal=True."""
    f = get_function(ns, "multi_head_attention")
    args = mha_inputs(1, 6, 16, 4, 2, seed=1)
    out = call(f, *args, 4, 2, is_causal=True)
    expect_close(out, mha_reference(*args, 4, 2, is_causal=True), "multi_head_attention(x, ..., 4, 2, is_causal=True)")


# ---------------------------------------------------------------------------
# Assignment 3: tiled online-softmax attention, with its memory measured
# ---------------------------------------------------------------------------
A3 = "a3_tiled"


def online_reference(s, v):
    """Statistics of one pass over all keys: (m, l, acc) with acc = exp(s - m) @ v."""
    s64, v64 = s.double(), v.double()
    m = s64.amax(-1)  # (..., L)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s64 - m_safe.unsqueeze(-1))  # (..., L, N)
    return m, p.sum(-1), p @ v64


def run_online(f, s, v, block, Dv):
    """Feed ``s``/``v`` to the student's update in blocks of ``block`` keys."""
    L = s.shape[-2]
    m = torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype)  # (..., L)
    l = torch.zeros(s.shape[:-1], dtype=s.dtype)  # (..., L)
    acc = torch.zeros(*s.shape[:-2], L, Dv, dtype=s.dtype)  # (..., L, Dv)
    for j in range(0, s.shape[-1], block):
        res = call(f, m, l, acc, s[..., j:j + block], v[..., j:j + block, :])
        if not isinstance(res, tuple) or len(res) != 3:
            raise CheckFailure(f"online_softmax_update should return a tuple (m_i, l_i, acc), got {type(res).__name__}.")
        m, l, acc = res
    return m, l, acc


def _expect_stats(got, ref, what):
    m, l, acc = got
    rm, rl, racc = ref
    expect_tensor(l, f"l_i after {what}", shape=rl.shape)
    expect_tensor(acc, f"acc after {what}", shape=racc.shape)
    if not isinstance(m, torch.Tensor) or m.shape != rm.shape:
        raise CheckFailure(f"m_i after {what} should have shape {tuple(rm.shape)}.")
    # m_i may be -inf only where the whole row is masked; compare where finite.
    fin = torch.isfinite(rm)
    if not torch.equal(torch.isfinite(m), fin):
        raise CheckFailure(f"m_i after {what} should be -inf exactly where every score so far is -inf.")
    # l and acc are only defined up to the common factor exp(m_ref - m); compare their ratio.
    expect_close(acc / torch.where(l > 0, l, torch.ones_like(l)).unsqueeze(-1),
                 (racc / torch.where(rl > 0, rl, torch.ones_like(rl)).unsqueeze(-1)).to(acc.dtype),
                 f"acc / l_i after {what}")
    expect_close(m[fin], rm[fin].to(m.dtype), f"m_i after {what}")
    expect_close(l, rl.to(l.dtype), f"l_i after {what}")


@public(A3, "q1")
def online_one_block(ns):
    """One update over all keys gives m = row max, l = sum exp(s - m), acc = exp(s - m) @ v."""
    f = get_function(ns, "online_softmax_update")
    s, v = torch.randn(4, 6, generator=_gen(7)), torch.randn(6, 3, generator=_gen(8))
    _expect_stats(run_online(f, s, v, 6, 3), online_reference(s, v), "one block")


@public(A3, "q1")
def online_two_blocks(ns):
    """Two updates (keys 0-3, then 4-7) give the same statistics as one."""
    f = get_function(ns, "online_softmax_update")
    s, v = 3 * torch.randn(4, 8, generator=_gen(9)), torch.randn(8, 3, generator=_gen(10))
    _expect_stats(run_online(f, s, v, 4, 3), online_reference(s, v), "two blocks")


@public(A3, "q2")
def tiled_matches_oracle(ns):
    """tiled_attention with block_n=4 over 10 keys (a ragged last block) matches the oracle."""
    f = get_function(ns, "tiled_attention")
    q, k, v = random_qkv(1, 2, 5, 10, 8, seed=5)
    out = expect_tensor(call(f, q, k, v, block_n=4), "tiled_attention(q, k, v, block_n=4)", shape=(1, 2, 5, 8), dtype=q.dtype)
    expect_close(out, attention_ref(q, k, v), "tiled_attention(q, k, v, block_n=4)")


@public(A3, "q2")
def tiled_causal(ns):
    """tiled_attention with is_causal=True matches the oracle."""
    f = get_function(ns, "tiled_attention")
    q, k, v = random_qkv(1, 2, 7, 7, 8, seed=6)
    expect_close(call(f, q, k, v, is_causal=True, block_n=3), attention_ref(q, k, v, is_causal=True), "tiled_attention(..., is_causal=True, block_n=3)")


def measured_peaks(f, L, D=64, block_n=64):
    """Peak bytes of the oracle-free naive attention and of ``f`` at length ``L``."""
    from ..attention import scaled_dot_product_attention
    from ..memory import peak_memory

    q, k, v = random_qkv(1, 1, L, L, D, seed=7)
    _, naive = peak_memory(scaled_dot_product_attention, q, k, v)
    res = measure_call(f, q, k, v, block_n=block_n)
    out, tiled = res
    if out is None:
        raise CheckFailure(f"`{getattr(f, '__name__', 'tiled_attention')}` returned None: its body is still a stub (replace the `...`), or a `return` is missing.")
    # Memory only counts for a correct result: a stub that returns None uses none.
    expect_close(out, attention_ref(q, k, v), f"tiled_attention at L = {L}")
    return naive, tiled


@public(A3, "q3")
def tiled_memory_is_small(ns):
    """At L = 1024, tiled_attention (block_n=64) needs under 1/4 of naive attention's peak memory."""
    f = get_function(ns, "tiled_attention")
    naive, tiled = measured_peaks(f, 1024)
    if not tiled < naive / 4:
        raise CheckFailure(
            f"tiled_attention used {tiled / 2**20:.2f} MiB at L = 1024, naive attention "
            f"{naive / 2**20:.2f} MiB: the tiled version should need under a quarter. "
            "Is an (L, L) matrix built somewhere?"
        )


@public(A3, "q3")
def memory_table_format(ns):
    """measure_peaks([256, 512]) returns one (L, naive_bytes, tiled_bytes) row per length."""
    f = get_function(ns, "measure_peaks")
    rows = call(f, [256, 512])
    if not isinstance(rows, (list, tuple)) or len(rows) != 2:
        raise CheckFailure(f"measure_peaks([256, 512]) should return 2 rows, got {rows!r:.80}.")
    for L, row in zip((256, 512), rows):
        if not (isinstance(row, (list, tuple)) and len(row) == 3 and row[0] == L):
            raise CheckFailure(f"each row should be (L, naive_bytes, tiled_bytes); got {row!r:.80} for L = {L}.")
        if not all(isinstance(b, (int, float)) and b > 0 for b in row[1:]):
            raise CheckFailure(f"the byte counts should be positive numbers; got {row!r:.80}.")
    if not rows[1][1] > rows[0][1]:
        raise CheckFailure("naive attention's peak memory should grow with L; measure it with peak_memory.")


# The checks of assignments 4-6 live in their own modules; importing them registers them.
from . import public_a4, public_a5, public_a6  # noqa: E402,F401
