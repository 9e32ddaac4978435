"""split_k_attention (Flash-Decoding): exact against the float64 oracle.

Split counts are chosen so that they do not divide the key lengths, exceed them
(empty splits), or equal them (one key per split); every mask of the registry, GQA,
decoding shapes (one query), and gradients.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import attention_ref, cache_causal_mask, merge_attention
from attention_lib.split_k import merge_splits, split_bounds, split_k_attention
from helpers import MASKS, assert_matches_ref, dense_mask, make_qkv


def split_k(num_splits):
    def fn(*args, **kwargs):
        return split_k_attention(*args, num_splits=num_splits, **kwargs)

    return fn


DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LENGTHS = [(1, 1), (1, 97), (7, 9), (33, 129)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_grid(dtype, Lq, Lk, is_causal):
    num_splits = {1: 3, 9: 4, 97: 16, 129: 5}[Lk]  # never a divisor of Lk > 1
    q, k, v = make_qkv(2, 2, Lq, Lk, 16, dtype=dtype)
    assert_matches_ref(split_k(num_splits), q, k, v, is_causal=is_causal)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", LENGTHS + [(128, 128)])
@pytest.mark.parametrize("num_splits", [2, 16, 200])
@pytest.mark.parametrize("D", [16, 80])
@pytest.mark.parametrize("is_causal", [False, True])
def test_grid_full(dtype, Lq, Lk, num_splits, D, is_causal):
    q, k, v = make_qkv(2, 2, Lq, Lk, D, dtype=dtype)
    assert_matches_ref(split_k(num_splits), q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_mask(mask, kind):
    q, k, v = make_qkv(3, 2, 7, 23, 8)
    m = dense_mask(mask, 3, 7, 23)
    if m is not None and kind == "float":
        m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
    assert_matches_ref(split_k(5), q, k, v, attn_mask=m)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 3), (4, 1)])
def test_gqa_decoding(Hq, Hkv):
    q, k, v = make_qkv(2, Hq, 1, 37, 16, Hkv=Hkv, Dv=8)
    assert_matches_ref(split_k(4), q, k, v, enable_gqa=True)
    q, k, v = make_qkv(2, Hq, 3, 37, 16, Hkv=Hkv)  # a prefill of 3 after 34 cached: bottom-right
    assert_matches_ref(split_k(4), q, k, v, attn_mask=cache_causal_mask(3, 37), enable_gqa=True)


def test_fully_masked_splits_and_rows_give_zero_not_nan():
    q, k, v = make_qkv(1, 2, 3, 12, 8, dtype=torch.float64)
    allowed = torch.ones(1, 1, 3, 12, dtype=torch.bool)
    allowed[..., :6] = False  # splits 0 and 1 of 4 are fully masked for every row
    allowed[..., 1, :] = False  # row 1 is fully masked
    q.requires_grad_(True)
    out = split_k_attention(q, k, v, attn_mask=allowed, num_splits=4)
    torch.testing.assert_close(out, attention_ref(q, k, v, attn_mask=allowed), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0, :, 1], torch.zeros(2, 8, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, :, 1], torch.zeros(2, 8, dtype=torch.float64))


def test_more_splits_than_keys():
    q, k, v = make_qkv(2, 2, 4, 3, 8)
    assert split_bounds(3, 7) == [0, 0, 0, 1, 1, 2, 2, 3]  # four empty splits
    assert_matches_ref(split_k(7), q, k, v)
    assert_matches_ref(split_k(7), q, k, v, is_causal=True)


def test_zero_sizes_and_broadcast_batch():
    q, k, v = make_qkv(2, 2, 3, 0, 8)
    assert torch.equal(split_k_attention(q, k, v), torch.zeros(2, 2, 3, 8))
    q, k, v = make_qkv(1, 2, 3, 9, 8)
    out = split_k_attention(q.expand(3, -1, -1, -1), k, v, num_splits=2)  # batch 3 against 1
    torch.testing.assert_close(out, attention_ref(q, k, v).expand(3, -1, -1, -1))


def test_split_bounds_cover_the_keys_in_near_equal_parts():
    for S in range(0, 40):
        for n in range(1, 12):
            b = split_bounds(S, n)
            sizes = [hi - lo for lo, hi in zip(b, b[1:])]
            assert b[0] == 0 and b[-1] == S and len(sizes) == n
            assert max(sizes) - min(sizes) <= 1


def test_the_tree_merge_equals_merging_one_split_at_a_time():
    g = torch.Generator().manual_seed(0)
    o = torch.randn(7, 3, 5, generator=g, dtype=torch.float64)  # 7 splits of (L=3, Dv=5)
    lse = torch.randn(7, 3, generator=g, dtype=torch.float64)
    lse[2] = float("-inf")  # an empty split
    o[2] = 0
    o_tree, lse_tree = merge_splits(o, lse, dim=0)
    o_seq, lse_seq = o[0], lse[0]
    for s in range(1, 7):
        o_seq, lse_seq = merge_attention(o_seq, lse_seq, o[s], lse[s])
    torch.testing.assert_close(o_tree, o_seq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_tree, lse_seq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_tree, torch.logsumexp(lse, dim=0), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    Lq=st.integers(1, 6),
    Lk=st.integers(1, 70),
    num_splits=st.integers(1, 20),
    rep=st.sampled_from([1, 2, 3]),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_exact_for_any_lengths_and_splits(Lq, Lk, num_splits, rep, is_causal, seed):
    q, k, v = make_qkv(2, 2 * rep, Lq, Lk, 8, Hkv=2, Dv=3, dtype=torch.float64, seed=seed)
    out = split_k_attention(q, k, v, is_causal=is_causal, enable_gqa=True, num_splits=num_splits)
    ref = attention_ref(q, k, v, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_num_splits(bad):
    q, k, v = make_qkv(1, 2, 1, 9, 8)
    with pytest.raises(ValueError, match="num_splits must be a positive integer"):
        split_k_attention(q, k, v, num_splits=bad)


def test_bad_inputs_raise():
    q, k, v = make_qkv(1, 4, 1, 9, 8, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        split_k_attention(q, k, v)
    with pytest.raises(ValueError, match="dropout"):
        split_k_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(ValueError, match="head dim"):
        split_k_attention(q, k[..., :4], v, enable_gqa=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        split_k_attention(q, k, v, attn_mask=torch.ones(1, 1, 1, 8, dtype=torch.bool), enable_gqa=True)


@pytest.mark.parametrize("num_splits", [2, 4, 24])
@pytest.mark.parametrize("mask", ["none", "causal", "padding"])
def test_equal_splits(num_splits, mask):
    # S divisible by num_splits: the keys are split as a view, without the gather
    q, k, v = make_qkv(2, 4, 5, 24, 8, Hkv=2)
    m = dense_mask(mask, 2, 5, 24)
    assert_matches_ref(split_k(num_splits), q, k, v, attn_mask=m, enable_gqa=True)
    assert_matches_ref(split_k(num_splits), q, k, v, is_causal=True, enable_gqa=True)


def test_split_bounds_checks_its_arguments():
    # Found in review: split_bounds(5, 0) raised ZeroDivisionError.
    with pytest.raises(ValueError, match="num_splits must be a positive integer"):
        split_bounds(5, 0)
    with pytest.raises(ValueError, match="S .* non-negative"):
        split_bounds(-1, 2)
    assert split_bounds(0, 3) == [0, 0, 0, 0]
