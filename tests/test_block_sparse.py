"""block_sparse_attention against the oracle with the dense mask of the same mask_mod.

Exact: attention_ref with ``create_mask(mask_mod)`` over odd lengths, Lq != Lk, tile
sizes that do and do not divide them, GQA, extra masks, fully masked rows; outputs and
gradients; a Hypothesis sweep. And the point of the variant: the tiles it skips are
really skipped (block visits are counted), and the patterns' densities match their
formulas.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_lib.block_sparse as bs
from attention_lib import attention_ref, masks
from attention_lib.block_sparse import (
    BlockTable,
    bigbird_mask_mod,
    block_mask_from_mask_mod,
    block_sparse_attention,
    block_sparse_flops,
    fixed_mask_mod,
    strided_mask_mod,
)
from helpers import MASKS, make_qkv, max_err

# name -> factory(L) of a pattern's mask_mod
PATTERNS = {
    "strided": lambda L: strided_mask_mod(4),
    "fixed": lambda L: fixed_mask_mod(5, 2),
    "bigbird_tokens": lambda L: bigbird_mask_mod(2, 1, 2, torch.Generator().manual_seed(0), seq_len=L),
    "bigbird_blocks": lambda L: bigbird_mask_mod(1, 1, 1, torch.Generator().manual_seed(1), seq_len=L, block_size=8),
}
LENGTHS = [(1, 1), (7, 9), (97, 33), (33, 129)]


def ref_with(mod, q, k, v, **kw):
    Lq, Lk = q.shape[-2], k.shape[-2]
    return attention_ref(q, k, v, attn_mask=masks.create_mask(mod, q.shape[0], None, Lq, Lk), **kw)


@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("BLOCK_SIZE", [16, (8, 32)])
def test_equals_attention_ref_with_the_dense_mask(Lq, Lk, pattern, BLOCK_SIZE):
    q, k, v = make_qkv(2, 2, Lq, Lk, 16, Dv=8, dtype=torch.float64)
    mod = PATTERNS[pattern](max(Lq, Lk))
    ours = block_sparse_attention(q, k, v, mask_mod=mod, BLOCK_SIZE=BLOCK_SIZE)
    torch.testing.assert_close(ours, ref_with(mod, q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", [m for m in MASKS if m != "none"])
def test_registry_masks_and_fully_masked_rows(mask):
    """Every mask of the course (the padding mask leaves batch 0 with no key: output 0)."""
    q, k, v = make_qkv(3, 2, 33, 29, 16, dtype=torch.float64)
    mod = MASKS[mask](3, 33, 29)
    ours = block_sparse_attention(q, k, v, mask_mod=mod, BLOCK_SIZE=8)
    torch.testing.assert_close(ours, ref_with(mod, q, k, v), rtol=1e-12, atol=1e-12)
    if mask == "padding":
        assert (ours[0] == 0).all()


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_and_is_causal(Hq, Hkv, is_causal):
    q, k, v = make_qkv(2, Hq, 37, 37, 16, Hkv=Hkv, dtype=torch.float64)
    mod = PATTERNS["bigbird_tokens"](37)
    ours = block_sparse_attention(q, k, v, is_causal=is_causal, enable_gqa=True, mask_mod=mod, BLOCK_SIZE=16)
    both = masks.and_masks(mod, masks.causal) if is_causal else mod
    torch.testing.assert_close(ours, ref_with(both, q, k, v, enable_gqa=True), rtol=1e-12, atol=1e-12)


def test_is_causal_alone_and_no_mask():
    q, k, v = make_qkv(1, 2, 45, 45, 8, dtype=torch.float64)
    torch.testing.assert_close(block_sparse_attention(q, k, v, is_causal=True, BLOCK_SIZE=16),
                               attention_ref(q, k, v, is_causal=True))
    torch.testing.assert_close(block_sparse_attention(q, k, v, BLOCK_SIZE=16), attention_ref(q, k, v))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_extra_attn_mask(kind):
    q, k, v = make_qkv(2, 2, 30, 30, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    extra = torch.rand(2, 1, 30, 30, generator=g) > 0.3
    if kind == "float":
        extra = torch.randn(1, 2, 30, 30, generator=g, dtype=torch.float64)
    mod = strided_mask_mod(3)
    ours = block_sparse_attention(q, k, v, extra, mask_mod=mod, BLOCK_SIZE=8)
    dense = masks.create_mask(mod, None, None, 30, 30)
    full = (dense & extra) if kind == "bool" else extra.masked_fill(~dense, float("-inf"))
    torch.testing.assert_close(ours, attention_ref(q, k, v, attn_mask=full), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_and_gradients(dtype):
    """Outputs and gradients within flash-attention's rule: 2 x the naive error + a floor."""
    q, k, v = make_qkv(2, 2, 41, 41, 16, dtype=dtype)
    mod = PATTERNS["fixed"](41)
    dense = masks.create_mask(mod, None, None, 41, 41)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    base_ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*ins, mask_mod=mod, BLOCK_SIZE=16)
    ref = attention_ref(*ref_ins, attn_mask=dense)
    base = torch.nn.functional.scaled_dot_product_attention(*base_ins, attn_mask=dense)
    floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert out.dtype == dtype
    assert max_err(out, ref) <= 2 * max_err(base, ref) + floor
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, ins, dout.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_ins, dout.double())
    base_grads = torch.autograd.grad(base, base_ins, dout.to(dtype))
    for g, rg, bg in zip(grads, ref_grads, base_grads):
        assert torch.isfinite(g).all()
        assert max_err(g, rg) <= 2 * max_err(bg, rg) + 2 * floor


@settings(max_examples=20, deadline=None)
@given(
    Lq=st.integers(1, 70),
    Lk=st.integers(1, 70),
    bm=st.integers(1, 40),
    bn=st.integers(1, 40),
    stride=st.integers(1, 9),
    pattern=st.sampled_from(["strided", "fixed", "bigbird"]),
    seed=st.integers(0, 100),
)
def test_hypothesis_shapes_and_tiles(Lq, Lk, bm, bn, stride, pattern, seed):
    q, k, v = make_qkv(1, 2, Lq, Lk, 8, dtype=torch.float64, seed=seed)
    if pattern == "strided":
        mod = strided_mask_mod(stride)
    elif pattern == "fixed":
        mod = fixed_mask_mod(stride, 1 + seed % stride)
    else:
        mod = bigbird_mask_mod(stride, seed % 3, seed % 4, torch.Generator().manual_seed(seed), seq_len=max(Lq, Lk),
                               block_size=1 + seed % 5)
    ours = block_sparse_attention(q, k, v, mask_mod=mod, BLOCK_SIZE=(bm, bn))
    torch.testing.assert_close(ours, ref_with(mod, q, k, v), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------
# The tiles: skipped ones are skipped
# ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_visits_exactly_the_nonempty_tiles(pattern, monkeypatch):
    L, BLOCK = 128, 16
    mod = PATTERNS[pattern](L)
    table = block_mask_from_mask_mod(mod, None, None, L, L, BLOCK)
    visits = []
    real = bs.attention_block

    def counting(q, k, v, scale, allowed=None, bias=None):
        visits.append((q.shape[-2], k.shape[-2], allowed is None))
        return real(q, k, v, scale, allowed, bias)

    monkeypatch.setattr(bs, "attention_block", counting)
    q, k, v = make_qkv(1, 2, L, L, 8, dtype=torch.float64)
    out = block_sparse_attention(q, k, v, block_mask=table)
    n_full, n_partial = int(table.full.sum()), int(table.partial.sum())
    assert len(visits) == n_full + n_partial < (L // BLOCK) ** 2  # something was skipped
    assert sum(no_mask for *_, no_mask in visits) == n_full  # full tiles skip the mask_mod too
    torch.testing.assert_close(out, ref_with(mod, q, k, v))


def test_table_classifies_tiles():
    mod = masks.causal
    table = block_mask_from_mask_mod(mod, None, None, 40, 40, 16)
    # 3 x 3 tiles: diagonal ones partial, below them full, above them empty
    assert table.partial[0, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert table.full[0, 0].tolist() == [[False, False, False], [True, False, False], [True, True, False]]
    assert table.density() == pytest.approx(6 / 9)


def test_table_matches_flex_create_block_mask():
    """FlexAttention's create_block_mask marks the same tiles non-empty (lengths a multiple of 64)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from attention_lib import flex

    L = 256
    for mod in (strided_mask_mod(16), fixed_mask_mod(32, 4), bigbird_mask_mod(2, 1, 1, torch.Generator().manual_seed(0),
                                                                             seq_len=L, block_size=64)):
        ours = block_mask_from_mask_mod(mod, None, None, L, L, 64).nonempty
        assert torch.equal(flex.block_mask(mod, None, None, L, L, BLOCK_SIZE=64).to_dense().bool(), ours)


def test_flops_count():
    table = block_mask_from_mask_mod(lambda b, h, q, kv: q >= 0, None, None, 50, 70, (16, 32))
    assert block_sparse_flops(table, 8, 4) == 2 * 50 * 70 * (8 + 4)  # every tile, edges at their real size
    assert block_sparse_flops(table, 8, heads=3, batch=2) == 6 * 2 * 50 * 70 * 16
    causal_t = block_mask_from_mask_mod(masks.causal, None, None, 64, 64, 16)
    assert block_sparse_flops(causal_t, 8) == 10 * 16 * 16 * 2 * 16  # 10 of 16 tiles


# ------------------------------------------------------------------------------
# The patterns: densities match their formulas
# ------------------------------------------------------------------------------


@pytest.mark.parametrize("L,stride", [(64, 8), (100, 7), (33, 1), (20, 40)])
def test_strided_density(L, stride):
    dense = masks.create_mask(strided_mask_mod(stride), None, None, L, L)[0, 0]
    rows = [min(i + 1, stride) + i // stride for i in range(L)]  # the window, then one key per stride
    assert dense.sum(-1).tolist() == rows


@pytest.mark.parametrize("L,stride,c", [(64, 8, 1), (100, 7, 3), (30, 5, 5)])
def test_fixed_density(L, stride, c):
    dense = masks.create_mask(fixed_mask_mod(stride, c), None, None, L, L)[0, 0]
    rows = [i % stride + 1 + c * (i // stride) for i in range(L)]  # own block so far + earlier summaries
    assert dense.sum(-1).tolist() == rows


@pytest.mark.parametrize("n,window,g,r", [(40, 3, 2, 3), (16, 1, 0, 20), (25, 5, 1, 0)])
def test_bigbird_density(n, window, g, r):
    mod = bigbird_mask_mod(window, g, r, torch.Generator().manual_seed(0), seq_len=n)
    rows = []
    for u in range(n):
        band = set(range(max(0, u - window + 1), min(n, u + window)))
        fixed = set(range(n)) if u < g else band | set(range(min(g, n)))
        rows.append(len(fixed) + min(r, n - len(fixed)))  # random units are drawn among the others
    assert mod.table.sum(-1).tolist() == rows
    dense = masks.create_mask(mod, None, None, n, n)[0, 0]
    assert torch.equal(dense, mod.table)
    again = bigbird_mask_mod(window, g, r, torch.Generator().manual_seed(0), seq_len=n)
    assert torch.equal(again.table, mod.table)  # the generator decides the draw


def test_bigbird_blocks_are_blocks():
    mod = bigbird_mask_mod(1, 1, 2, torch.Generator().manual_seed(0), seq_len=60, block_size=8)
    dense = masks.create_mask(mod, None, None, 60, 60)[0, 0]
    table = block_mask_from_mask_mod(mod, None, None, 60, 60, 8)
    assert not table.partial.any()  # every tile is all or nothing
    assert torch.equal(table.full[0, 0], mod.table)
    assert dense.sum().item() == block_sparse_flops(table, 1, 0) // 2


# ------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: strided_mask_mod(0), "stride"),
        (lambda: fixed_mask_mod(4, 5), "c"),
        (lambda: bigbird_mask_mod(2, -1, 0, seq_len=8), "n_global"),
        (lambda: bigbird_mask_mod(2, 1, 0), "seq_len"),
        (lambda: block_mask_from_mask_mod(masks.causal, None, None, 8, 8, 0), "BLOCK_SIZE"),
        (lambda: block_mask_from_mask_mod("causal", None, None, 8, 8), "mask_mod"),
    ],
)
def test_bad_pattern_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_attention_arguments():
    q, k, v = make_qkv(1, 2, 8, 8, 4)
    table = block_mask_from_mask_mod(masks.causal, None, None, 8, 8, 4)
    with pytest.raises(ValueError, match="mask_mod"):
        block_sparse_attention(q, k, v, mask_mod="causal")
    with pytest.raises(ValueError, match="block_mask alone"):
        block_sparse_attention(q, k, v, block_mask=table, mask_mod=masks.causal)
    with pytest.raises(ValueError, match="built for"):
        block_sparse_attention(*make_qkv(1, 2, 9, 9, 4), block_mask=table)
    with pytest.raises(ValueError, match="BlockTable"):
        block_sparse_attention(q, k, v, block_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="dropout"):
        block_sparse_attention(q, k, v, dropout_p=0.1, mask_mod=masks.causal)
    assert isinstance(table, BlockTable)


def test_argument_checks_found_in_review():
    # A BigBird pattern drawn for 10 positions used on 20 raised an IndexError deep in
    # create_mask; a negative length raised torch's "upper bound and lower bound" error;
    # a 3-tuple BLOCK_SIZE said "too many values to unpack"; block_sparse_flops took D = 0.
    short = bigbird_mask_mod(1, 1, 1, torch.Generator().manual_seed(0), seq_len=10)
    q, k, v = make_qkv(1, 1, 20, 20, 4)
    with pytest.raises(ValueError, match=r"seq_len=10.*\(L, S\) = \(20, 20\)"):
        block_sparse_attention(q, k, v, mask_mod=short)
    with pytest.raises(ValueError, match="seq_len=10"):
        block_mask_from_mask_mod(short, None, None, 20, 20, 4)
    with pytest.raises(ValueError, match="Q_LEN must be a non-negative int"):
        block_mask_from_mask_mod(masks.causal, None, None, -1, 8, 4)
    with pytest.raises(ValueError, match=r"BLOCK_SIZE must be an int or a pair"):
        block_mask_from_mask_mod(masks.causal, None, None, 8, 8, (2, 2, 2))
    table = block_mask_from_mask_mod(masks.causal, None, None, 8, 8, 4)
    with pytest.raises(ValueError, match="D must be a non-negative int"):
        block_sparse_flops(table, -1)
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        block_sparse_flops(table, 4, heads=0)
    with pytest.raises(ValueError, match="BlockTable"):
        block_sparse_flops(torch.ones(2, 2), 4)
    # The pattern still works on lengths up to its seq_len.
    out = block_sparse_attention(*make_qkv(1, 1, 10, 10, 4), mask_mod=short, BLOCK_SIZE=4)
    assert torch.isfinite(out).all()
