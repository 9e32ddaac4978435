"""KVCache and incremental decoding with MultiHeadAttention.

Decoding token by token with the cache must equal the full causal forward pass, for
MHA, GQA and MQA; a prefill of several tokens checks the bottom-right alignment.
"""

import pytest
import torch

from attention_lib import KVCache, MultiHeadAttention, cache_causal_mask, kv_cache_bytes, masks
from attention_lib.kv_cache import quantize_absmax, quantize_minmax
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
    k, v = make_qkv(2, 4, 70, 70, 32)[1:]
    cache = KVCache(2, 4, 32, quantize="int8", group_size=32, symmetric=True)
    ks, vs = cache.update(k, v)
    # keys: symmetric absmax per channel over each group of 32 positions, |k - k̂| <= scale / 2
    groups = k[:, :, :64].unflatten(2, (2, 32))  # (B, H, 2, 32, D)
    bound = (groups.abs().amax(dim=-2, keepdim=True) / 254).expand_as(groups).flatten(2, 3)
    assert ((ks[:, :, :64] - k[:, :, :64]).abs() <= bound * (1 + 1e-5)).all()
    assert not torch.equal(ks[:, :, :64], k[:, :, :64])
    assert torch.equal(ks[:, :, 64:], k[:, :, 64:])  # the incomplete group stays in full precision
    # values: per token, over the head dim
    vbound = v.abs().amax(dim=-1, keepdim=True) / 254
    assert ((vs - v).abs() <= vbound * (1 + 1e-5)).all()
    rel = ((vs - v).norm() / v.norm()).item()
    assert 0 < rel < 0.01
    # bytes: 1 per code, float32 scales: one per value vector, D per key group, 6 keys in float32
    assert cache.nbytes == 2 * 4 * (70 * (32 + 32) + 70 * 4 + 2 * 32 * 4 + 6 * 32 * 3)


def test_int8_keys_are_per_channel_so_an_outlier_channel_costs_nothing_elsewhere():
    # KIVI's observation: a few key channels are large for every token. Per-channel
    # scales keep the other channels' error at their own scale; per-token would not.
    torch.manual_seed(0)
    k = torch.randn(1, 2, 64, 16)
    k[..., 3] *= 50  # an outlier channel
    cache = KVCache(1, 2, 16, quantize="int8", group_size=32)
    ks, _ = cache.update(k, torch.randn(1, 2, 64, 16))
    ordinary = [c for c in range(16) if c != 3]
    rel = ((ks - k)[..., ordinary].norm() / k[..., ordinary].norm()).item()
    per_token = k.abs().amax(dim=-1, keepdim=True) / 127 * torch.round(k / (k.abs().amax(dim=-1, keepdim=True) / 127))
    rel_token = ((per_token - k)[..., ordinary].norm() / k[..., ordinary].norm()).item()
    assert rel < 0.01 < rel_token


@pytest.mark.parametrize("group_size", [1, 4, 5])
def test_int8_cache_is_the_same_streamed_or_at_once(group_size):
    # groups are fixed by position: decoding one token at a time stores what one update stores
    torch.manual_seed(0)
    k, v = make_qkv(1, 2, 23, 23, 8)[1:]
    at_once = KVCache(1, 2, 8, quantize="int8", group_size=group_size, capacity=1)
    at_once.update(k, v)
    streamed = KVCache(1, 2, 8, quantize="int8", group_size=group_size, capacity=1)
    for t in range(0, 23, 3):
        ks, vs = streamed.update(k[:, :, t : t + 3], v[:, :, t : t + 3])
    assert torch.equal(ks, at_once.keys()) and torch.equal(vs, at_once.values())
    assert ks.shape == (1, 2, 23, 8) and streamed.capacity % group_size == 0
    assert streamed.nbytes == at_once.nbytes


def test_asymmetric_int8_cache_error_is_bounded_and_counts_zero_points():
    torch.manual_seed(0)
    k, v = make_qkv(2, 4, 70, 70, 32)[1:]
    k = k + torch.linspace(-3, 3, 32)  # channels offset from 0: what the zero point is for
    cache = KVCache(2, 4, 32, quantize="int8", group_size=32)  # the default: symmetric=False
    ks, vs = cache.update(k, v)
    groups = k[:, :, :64].unflatten(2, (2, 32))  # (B, H, 2, 32, D)
    step = (groups.amax(dim=-2, keepdim=True) - groups.amin(dim=-2, keepdim=True)) / 255
    assert ((ks[:, :, :64] - k[:, :, :64]).abs() <= (step / 2 * (1 + 1e-5)).expand_as(groups).flatten(2, 3)).all()
    assert torch.equal(ks[:, :, 64:], k[:, :, 64:])
    vstep = (v.amax(dim=-1, keepdim=True) - v.amin(dim=-1, keepdim=True)) / 255
    assert ((vs - v).abs() <= vstep / 2 * (1 + 1e-5)).all()
    sym, _ = KVCache(2, 4, 32, quantize="int8", group_size=32, symmetric=True).update(k, v)
    assert (ks - k).norm() < 0.8 * (sym - k).norm()  # offset channels: the zero point wins
    # a scale and a zero point (float32) wherever the symmetric cache has a scale
    assert cache.nbytes == 2 * 4 * (70 * (32 + 32) + 2 * (70 * 4 + 2 * 32 * 4) + 6 * 32 * 3)
    codes, scale, zero = quantize_minmax(torch.tensor([[1.0, 1.0], [-1.0, 2.0]]), dim=-1)
    assert codes.tolist() == [[0, 0], [0, 255]] and zero.flatten().tolist() == [1.0, -1.0]
    assert scale.flatten().tolist() == [0.0, pytest.approx(3 / 255)]


@pytest.mark.parametrize("group_size", [1, 5])
def test_symmetric_int8_cache_streamed_or_at_once(group_size):
    k, v = make_qkv(1, 2, 23, 23, 8)[1:]
    at_once = KVCache(1, 2, 8, quantize="int8", group_size=group_size, capacity=1, symmetric=True)
    at_once.update(k, v)
    streamed = KVCache(1, 2, 8, quantize="int8", group_size=group_size, capacity=1, symmetric=True)
    for t in range(0, 23, 3):
        ks, vs = streamed.update(k[:, :, t : t + 3], v[:, :, t : t + 3])
    assert torch.equal(ks, at_once.keys()) and torch.equal(vs, at_once.values()) and streamed.nbytes == at_once.nbytes


def test_quantize_absmax():
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    codes, scale = quantize_absmax(x, dim=-1, bits=8)
    assert codes.tolist() == [[0, 0], [64, -127]]
    torch.testing.assert_close(scale, torch.tensor([[0.0], [2 / 127]]))
    codes, scale = quantize_absmax(x, dim=-2, bits=4)  # per channel, levels -7..7
    assert codes.tolist() == [[0, 0], [7, -7]]
    with pytest.raises(ValueError, match="bits"):
        quantize_absmax(x, dim=-1, bits=1)


def test_int8_cache_decoding_is_close():
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 8, num_kv_heads=2).eval()
    x = torch.randn(1, 30, 64)
    with torch.no_grad():
        full = mha(x, is_causal=True)
        step, _ = decode(mha, x, prefill=4, quantize="int8")
    rel = ((step - full).norm() / full.norm()).item()
    assert 0 < rel < 0.02


def test_cache_causal_mask_lives_in_masks_and_is_re_exported():
    # the mask itself is tested in tests/test_masks.py; the old import paths keep working
    import attention_lib.kv_cache

    assert cache_causal_mask is masks.cache_causal_mask
    assert attention_lib.kv_cache.cache_causal_mask is masks.cache_causal_mask


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
    with pytest.raises(ValueError, match="group_size"):
        KVCache(1, 2, 8, quantize="int8", group_size=0)
    mha = MultiHeadAttention(16, 2)
    x = torch.zeros(1, 3, 16)
    with pytest.raises(ValueError, match="self-attention"):
        mha(x, x, x, kv_cache=KVCache(1, 2, 8))
