"""kv_quant: error bounds of quantisation per bit width, bit packing, the rotation,
per-channel vs per-token keys with an outlier channel, the cache and its bytes."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attention_lib import KVCache
from attention_lib.kv_quant import (
    QuantizedKVCache, attention_errors, bytes_per_token, dequantize, fake_quantize, pack_bits, quantize,
    random_rotation, unpack_bits,
)
from helpers import make_qkv


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 13), symmetric=st.booleans(), seed=st.integers(0, 99))
def test_pack_round_trip(bits, n, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-n * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dim,group_size", [(-1, None), (-2, None), (-2, 4), (-1, 8)])
def test_every_entry_is_within_half_a_step(bits, symmetric, dim, group_size):
    x = torch.randn(2, 3, 12, 16, dtype=torch.float64) * torch.linspace(0.1, 10, 16, dtype=torch.float64)
    q = quantize(x, bits, dim=dim, group_size=group_size, symmetric=symmetric)
    xh = dequantize(q)
    assert xh.shape == x.shape and xh.dtype == x.dtype
    # the step s of each entry's slice, broadcast back to x's shape
    xg = x if group_size is None else x.unflatten(dim, (-1, group_size))
    rdim = dim if group_size is None else dim
    s = q.scale.expand_as(xg).reshape(x.shape)
    assert ((x - xh).abs() <= s / 2 * (1 + 1e-9) + 1e-12).all()  # |err| <= s / 2, per element
    levels = 2**bits - 1 if not symmetric else 2 * (2 ** (bits - 1) - 1)
    span = xg.amax(rdim, keepdim=True) - xg.amin(rdim, keepdim=True) if not symmetric else 2 * xg.abs().amax(rdim, keepdim=True)
    torch.testing.assert_close(q.scale, span / levels)
    assert (x - xh).abs().max() > 0  # not trivially exact


def test_bytes_are_real():
    x = torch.randn(1, 2, 64, 32)
    for bits in (8, 4, 2):
        q = quantize(x, bits, dim=-1, scale_dtype=torch.float16)
        assert q.packed.numel() == x.numel() * bits // 8
        assert q.nbytes == x.numel() * bits // 8 + 2 * 64 * 2 * 2  # codes + fp16 scale and zero per token


def test_constant_and_zero_slices():
    x = torch.tensor([[0.0, 0.0, 0.0], [2.5, 2.5, 2.5]])
    assert torch.equal(fake_quantize(x, 2, dim=-1), x)  # asymmetric: s = 0, the zero point is exact
    assert torch.equal(fake_quantize(x[:1], 4, dim=-1, symmetric=True), x[:1])


@pytest.mark.parametrize("kind", ["hadamard", "qr"])
def test_rotation_is_orthogonal_and_preserves_scores_exactly(kind):
    R = random_rotation(64, seed=3, kind=kind, dtype=torch.float64)
    torch.testing.assert_close(R @ R.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    q, k, _ = make_qkv(1, 2, 5, 9, 64, dtype=torch.float64)
    torch.testing.assert_close((q @ R) @ (k @ R).transpose(-2, -1), q @ k.transpose(-2, -1), rtol=0, atol=1e-12)
    assert not torch.allclose(random_rotation(64, seed=4, kind=kind), R.float())  # the seed matters


def test_rotation_spreads_an_outlier_channel():
    k = torch.randn(1, 1, 256, 64)
    k[..., 5] *= 30
    R = random_rotation(64, seed=0)
    peak = lambda x: (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()  # max / rms per token
    assert peak(k @ R) < 0.3 * peak(k)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_per_channel_beats_per_token_on_keys_with_an_outlier_channel(bits):
    torch.manual_seed(0)
    k = torch.randn(1, 2, 128, 32)
    k[..., 3] = k[..., 3] * 20 + 10  # an outlier channel with an offset
    q = torch.randn(1, 2, 16, 32)
    v = torch.randn(1, 2, 128, 32)
    err, ordinary = {}, torch.arange(32) != 3
    for axis, dim, g in (("channel", -2, 32), ("token", -1, None)):
        kh = fake_quantize(k, bits, dim=dim, group_size=g)
        err[axis] = attention_errors(q, k, v, kh, v)
        err[axis]["ordinary"] = ((kh - k)[..., ordinary].norm() / k[..., ordinary].norm()).item()
    # per token, the outlier sets every channel's step; per channel, each has its own
    assert err["channel"]["ordinary"] < 0.3 * err["token"]["ordinary"]
    assert err["channel"]["scores"] < 0.7 * err["token"]["scores"]
    assert err["channel"]["weights"] < err["token"]["weights"]


def test_attention_errors_are_zero_for_a_lossless_cache_and_grow_with_noise():
    q, k, v = make_qkv(1, 2, 6, 10, 16)
    assert attention_errors(q, k, v, k, v) == {"scores": 0.0, "weights": 0.0, "output": 0.0}
    small = attention_errors(q, k, v, k + 0.01 * torch.randn_like(k), v)
    big = attention_errors(q, k, v, k + 0.1 * torch.randn_like(k), v)
    assert 0 < small["weights"] < big["weights"] <= 1 and small["scores"] < big["scores"]


@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bits", [8, 2])
def test_cache_streamed_equals_at_once_and_counts_its_bytes(key_axis, rotate, bits):
    k, v = make_qkv(1, 2, 70, 70, 16)[1:]
    R = random_rotation(16) if rotate else None
    kw = dict(bits=bits, key_axis=key_axis, group_size=8, rotation=R)
    at_once, streamed = QuantizedKVCache(1, 2, 16, **kw), QuantizedKVCache(1, 2, 16, **kw)
    at_once.update(k, v)
    for t in range(0, 70, 3):
        ks, vs = streamed.update(k[:, :, t : t + 3], v[:, :, t : t + 3])
    torch.testing.assert_close(ks, at_once.keys(), rtol=0, atol=1e-6)
    torch.testing.assert_close(vs, at_once.values(), rtol=0, atol=1e-6)
    assert ks.shape == (1, 2, 70, 16) and len(streamed) == 70
    tail = 70 % 8 if key_axis == "channel" else 0
    per_token = bytes_per_token(16, bits, key_axis=key_axis, group_size=8, num_kv_heads=2)
    assert at_once.nbytes == per_token * (70 - tail) + 2 * tail * (16 * 4 + 16 * bits / 8 + 4)
    rel = ((vs - v).norm() / v.norm()).item()
    assert 0 < rel < {8: 0.01, 2: 0.5}[bits]


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_library_int8_cache_is_kivi_from_this_module(symmetric):
    # chapter 11's KVCache(quantize="int8"): keys per channel in groups, values per token
    k, v = make_qkv(2, 2, 70, 70, 16)[1:]
    lib = KVCache(2, 2, 16, quantize="int8", group_size=32, symmetric=symmetric)
    ours = QuantizedKVCache(2, 2, 16, bits=8, key_axis="channel", group_size=32, symmetric=symmetric,
                            scale_dtype=torch.float32)
    kl, vl = lib.update(k, v)
    ko, vo = ours.update(k, v)
    assert torch.equal(kl, ko) and torch.equal(vl, vo)
    assert lib.nbytes == ours.nbytes  # the same bytes: codes, float32 scales and zero points, the tail


def test_bytes_per_token_formula():
    D = 128
    assert bytes_per_token(D, None) == 512  # fp16 keys and values
    assert bytes_per_token(D, 8, symmetric=True) == D + 2 * D / 32 + D + 2  # chapter 11's int8
    assert bytes_per_token(D, 2) == D / 4 + 4 * D / 32 + D / 4 + 4  # KIVI-2: scale and zero point
    assert bytes_per_token(D, 4, key_axis="token", num_kv_heads=8, num_layers=32) == 32 * 8 * (2 * (64 + 4))


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize(x, 4, dim=-1, group_size=3)
    with pytest.raises(ValueError, match="dim"):
        quantize(x, 4, dim=2)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(3, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="power of 2"):
        random_rotation(48)
    with pytest.raises(ValueError, match="kind"):
        random_rotation(16, kind="fft")
    with pytest.raises(ValueError, match="key_axis"):
        QuantizedKVCache(1, 1, 8, bits=4, key_axis="head")
    with pytest.raises(ValueError, match="rotation"):
        QuantizedKVCache(1, 1, 8, bits=4, rotation=torch.eye(4))
    with pytest.raises(ValueError, match="expects key"):
        QuantizedKVCache(1, 1, 8, bits=4).update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    with pytest.raises(ValueError, match="head_dim must be a positive integer, got 0"):
        QuantizedKVCache(1, 2, 0, bits=4)
    with pytest.raises(ValueError, match=r"codes must lie in 0 \.\. 15 for bits=4; got 0 \.\. 20"):
        pack_bits(torch.tensor([0, 20]), 4)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.zeros(4), 4)
    with pytest.raises(ValueError, match=r"n must be an int in 0 \.\. 4"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 10)
    with pytest.raises(ValueError, match="head_dim"):
        bytes_per_token(0, 4)
    with pytest.raises(ValueError, match="group_size"):
        bytes_per_token(16, 4, group_size=0)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"key_hat \(1, 2, 6, 4\)"):
        attention_errors(q, k, k, torch.randn(1, 2, 6, 4), k)
    with pytest.raises(ValueError, match="attention_errors expects"):
        attention_errors(torch.randn(1, 2, 3, 8), k, k, k, k)
