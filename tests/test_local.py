"""sliding_window_attention against the oracle with the sliding_window mask.

The grid: odd lengths with Lq != Lk, windows smaller and larger than the sequence,
block sizes that do and do not divide L, GQA, dtypes, an extra attn_mask, fully
masked rows; outputs and gradients. And the point of the variant: its scores are
O(L·w), never L × L.
"""

from functools import partial

import pytest
import torch

from attention_lib import attention_ref, masks, sliding_window_attention
from helpers import assert_matches_ref, dense_mask, make_qkv, MASKS

LENGTHS = [(1, 1), (7, 9), (97, 33), (33, 129), (64, 64)]
WINDOWS = [1, 3, 16, 200]


def band_mask(window, Lq, Lk, is_causal=True):
    if is_causal:
        return masks.create_mask(masks.sliding_window(window), None, None, Lq, Lk)
    return masks.create_mask(lambda b, h, q, k: (q - k).abs() < window, None, None, Lq, Lk)


@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("is_causal", [True, False])
def test_equals_full_attention_with_the_band_mask(Lq, Lk, window, is_causal):
    q, k, v = make_qkv(2, 2, Lq, Lk, 16, dtype=torch.float64)
    ours = sliding_window_attention(q, k, v, is_causal=is_causal, window=window)
    ref = attention_ref(q, k, v, attn_mask=band_mask(window, Lq, Lk, is_causal))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Lq,Lk", [(7, 9), (97, 33), (33, 129)])
@pytest.mark.parametrize("window,block_q", [(3, None), (5, 4), (17, 7), (40, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_ref_forward_and_backward(Lq, Lk, window, block_q, dtype):
    q, k, v = make_qkv(2, 3, Lq, Lk, 16, dtype=dtype)
    mask = band_mask(window, Lq, Lk)
    fn = partial(sliding_window_attention, is_causal=True, window=window, block_q=block_q)
    # the rule compares fn(q, k, v) with the oracle on the same call, so hand the
    # oracle the band mask and let fn re-apply it (AND-ing a band with itself)
    assert_matches_ref(fn, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_gqa(Hq, Hkv, is_causal):
    q, k, v = make_qkv(2, Hq, 19, 23, 16, Hkv=Hkv)
    assert_matches_ref(partial(sliding_window_attention, is_causal=is_causal, window=4), q, k, v, attn_mask=band_mask(4, 19, 23, is_causal), enable_gqa=True)


@pytest.mark.parametrize("mask_name", [n for n in MASKS if n != "none"])
def test_extra_attn_mask_is_anded_with_the_band(mask_name):
    q, k, v = make_qkv(3, 2, 13, 11, 8, dtype=torch.float64)
    extra = dense_mask(mask_name, 3, 13, 11)
    ours = sliding_window_attention(q, k, v, extra, is_causal=True, window=5, block_q=4)
    ref = attention_ref(q, k, v, attn_mask=extra & band_mask(5, 13, 11))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_float_attn_mask_is_added():
    q, k, v = make_qkv(2, 2, 10, 10, 8, dtype=torch.float64)
    bias = torch.randn(1, 2, 10, 10, dtype=torch.float64)
    ours = sliding_window_attention(q, k, v, bias, is_causal=True, window=4, block_q=3)
    ref = attention_ref(q, k, v, attn_mask=bias.masked_fill(~band_mask(4, 10, 10), float("-inf")))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_give_zero_output_and_gradient():
    # Lq > Lk: queries 9.. see no key of their window of 3 (keys 0..5 only)
    q, k, v = make_qkv(1, 2, 12, 6, 8, requires_grad=True)
    pad = masks.create_mask(masks.padding(torch.tensor([0])), 1, None, 12, 6)  # batch 0 sees nothing
    for mask, dead in ((None, slice(8, 12)), (pad, slice(0, 12))):
        out = sliding_window_attention(q, k, v, mask, is_causal=True, window=3)
        assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
        (gq,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(gq).all()
        assert torch.equal(gq[:, :, dead], torch.zeros_like(gq[:, :, dead]))


def test_window_of_the_whole_sequence_is_causal_attention():
    q, k, v = make_qkv(1, 2, 21, 21, 8, dtype=torch.float64)
    torch.testing.assert_close(sliding_window_attention(q, k, v, is_causal=True, window=21), attention_ref(q, k, v, is_causal=True))


def test_scores_are_banded_not_quadratic(monkeypatch):
    """The largest score tensor holds L·(block_q + window - 1) numbers, not L²."""
    seen = []
    real = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda x, dim: seen.append(x.numel()) or real(x, dim))
    L, w, bq = 1024, 32, 32
    q, k, v = make_qkv(1, 1, L, L, 8)
    sliding_window_attention(q, k, v, is_causal=True, window=w, block_q=bq)
    assert seen == [L * (bq + w - 1)]
    assert seen[0] * 16 < L * L


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4", None])
def test_bad_window_raises(bad):
    q, k, v = make_qkv(1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, is_causal=True, window=bad)


def test_bad_shapes_raise():
    q, k, v = make_qkv(1, 4, 4, 4, 8, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        sliding_window_attention(q, k, v, is_causal=True, window=2)
    with pytest.raises(ValueError, match="block_q"):
        sliding_window_attention(q, k, v, enable_gqa=True, window=2, block_q=0)


def test_sdpa_signature_and_defaults():
    """SDPA's arguments first with SDPA's defaults (is_causal=False: the symmetric band);
    window is keyword-only, so an old positional call fails loudly instead of silently."""
    q, k, v = make_qkv(1, 2, 9, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=3),
                               attention_ref(q, k, v, attn_mask=band_mask(3, 9, 9, is_causal=False)))
    with pytest.raises(TypeError, match="window"):  # the old call: window is now keyword-only
        sliding_window_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="attn_mask must be a torch.Tensor"):
        sliding_window_attention(q, k, v, 3, window=3)


@pytest.mark.parametrize("shape", [(9, 8), (2, 9, 8), (3, 2, 2, 9, 8)])
def test_any_rank_and_float16(shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).half() for _ in range(3))
    ours = sliding_window_attention(q, k, v, is_causal=True, window=4, block_q=4)
    mask = masks.create_mask(masks.sliding_window(4), None, None, 9, 9)[0, 0]
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
