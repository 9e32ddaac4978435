"""KVCache and incremental decoding with MultiHeadAttention.

Decoding token by token with the cache must equal the full causal forward pass, for
MHA, GQA and MQA; a prefill of several tokens checks the bottom-right alignment.
"""

import pytest
import torch

from attention_lib import KVCache, MultiHeadAttention, cache_causal_mask, kv_cache_bytes, masks
from helpers import make_qkv, max_err


def decode(mha, x, prefill=0, quantize=None):
    """Run ``x`` (B, L, E) through ``mha`` with a cache: a prefill, then one token a step."""
    B, L, _ = x.shape
    cache = KVCache(B, mha.num_kv_heads, mha.head_dim, dtype=x.dtype, quantize=quantize, capacity=2)
    outs = []
    if prefill:
        outs.append(mha(x[:, :prefill], is_causal=True, kv_cache=cache))
    for t in range(prefill, L):
        outs.append(mha(x[:, t : t + 1], is_causal=True, kv_cache=cache))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("prefill", [0, 1, 6])
def test_decoding_with_the_cache_equals_the_full_causal_pass(num_kv_heads, prefill):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=num_kv_heads).double().eval()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mha(x, is_causal=True)
        step, cache = decode(mha, x, prefill)
    torch.testing.assert_close(step, full, rtol=1e-12, atol=1e-12)
    assert len(cache) == 13
    assert cache.keys().shape == (2, num_kv_heads, 13, 8)
    assert cache.capacity >= 13


def test_float32_decoding_and_growth():
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 8, num_kv_heads=2).eval()
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        step, cache = decode(mha, x, prefill=3)
        full = mha(x, is_causal=True)
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert cache.capacity == 64  # 2 -> 4 -> 8 -> 16 -> 32 -> 64: doubling, amortised O(1)
    assert cache.nbytes == 1 * 2 * 40 * (8 + 8) * 4


def test_update_returns_everything_so_far():
    k, v = make_qkv(2, 3, 5, 5, 4)[1:]
    cache = KVCache(2, 3, 4, capacity=1)
    cache.update(k[:, :, :2], v[:, :, :2])
    ks, vs = cache.update(k[:, :, 2:], v[:, :, 2:])
    assert torch.equal(ks, k) and torch.equal(vs, v)
    cache.reset()
    assert len(cache) == 0


def test_int8_cache_error_is_small_and_bounded():
    torch.manual_seed(0)
    k, v = make_qkv(2, 4, 64, 64, 32)[1:]
    cache = KVCache(2, 4, 32, quantize="int8")
    ks, vs = cache.update(k, v)
    # symmetric absmax: |x - x̂| <= scale / 2 = max|x| / 254, per head and position
    bound = k.abs().amax(dim=-1, keepdim=True) / 254
    assert ((ks - k).abs() <= bound * (1 + 1e-5)).all()
    rel = ((vs - v).norm() / v.norm()).item()
    assert 0 < rel < 0.01
    # one byte per value plus one float32 scale per (head, position) for K and for V
    assert cache.nbytes == 2 * 4 * 64 * (32 + 32 + 2 * 4)


def test_int8_cache_decoding_is_close():
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 8, num_kv_heads=2).eval()
    x = torch.randn(1, 30, 64)
    with torch.no_grad():
        full = mha(x, is_causal=True)
        step, _ = decode(mha, x, prefill=4, quantize="int8")
    rel = ((step - full).norm() / full.norm()).item()
    assert 0 < rel < 0.02


def test_cache_causal_mask_is_bottom_right():
    m = cache_causal_mask(2, 4)
    assert m[0, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(m, masks.create_mask(masks.causal_lower_right(2, 4), None, None, 2, 4))
    assert cache_causal_mask(1, 5) is None  # one new query sees every key
    pad = torch.tensor([True, True, False, True])
    assert cache_causal_mask(2, 4, pad)[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 1]]


def test_kv_cache_bytes_for_a_7b_class_model():
    # 32 layers, 32 heads of 128 dims, 32k context, fp16
    mha = kv_cache_bytes(32, 32, 128, 32768, bytes_per_value=2)
    assert mha == 16 * 2**30
    assert kv_cache_bytes(32, 8, 128, 32768) == mha // 4  # GQA with 8 KV heads
    assert kv_cache_bytes(32, 1, 128, 32768) == mha // 32  # MQA


def test_bad_inputs_raise():
    cache = KVCache(1, 2, 8)
    with pytest.raises(ValueError, match="expects key"):
        cache.update(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
    with pytest.raises(ValueError, match="float32"):
        cache.update(torch.zeros(1, 2, 1, 8, dtype=torch.float64), torch.zeros(1, 2, 1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="quantize"):
        KVCache(1, 2, 8, quantize="int4")
    mha = MultiHeadAttention(16, 2)
    x = torch.zeros(1, 3, 16)
    with pytest.raises(ValueError, match="self-attention"):
        mha(x, x, x, kv_cache=KVCache(1, 2, 8))
