"""SinkKVCache: decoding token by token through the cache equals attention with the
streaming mask (sinks + window) over the whole stream, against the oracle; eviction
keeps exactly the sinks and the window; positions are slots in the cache."""

import pytest
import torch

from attention_lib import attention_ref, masks, scaled_dot_product_attention
from attention_lib.sinks import SinkKVCache, streaming_mask
from helpers import make_qkv


def dense(n_sink, window, L, S=None):
    return masks.create_mask(streaming_mask(n_sink, window), None, None, L, L if S is None else S)


def test_streaming_mask_picture():
    assert dense(1, 2, 5)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    # no sinks: the causal sliding window of chapter 10
    assert torch.equal(dense(0, 3, 9), masks.create_mask(masks.sliding_window(3), None, None, 9, 9))


@pytest.mark.parametrize("n_sink,window", [(0, 1), (0, 5), (4, 5), (1, 8), (4, 40)])
@pytest.mark.parametrize("Hkv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_decoding_through_the_sink_cache_equals_the_streaming_mask(n_sink, window, Hkv, chunk):
    L = 29
    q, k, v = make_qkv(2, 4, L, L, 8, Hkv=Hkv, dtype=torch.float64)
    cache = SinkKVCache(2, Hkv, 8, n_sink=n_sink, window=window, dtype=torch.float64)
    outs = []
    for t in range(0, L, chunk):
        ks, vs = cache.update(k[:, :, t : t + chunk], v[:, :, t : t + chunk])
        mask = cache.new_mask(min(chunk, L - t))
        outs.append(scaled_dot_product_attention(q[:, :, t : t + chunk], ks, vs, attn_mask=mask, enable_gqa=Hkv != 4))
        assert ks.shape[2] == len(cache) <= n_sink + window - 1 + chunk
    ref = attention_ref(q, k, v, attn_mask=dense(n_sink, window, L), enable_gqa=Hkv != 4)
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=0, atol=1e-12)


def test_eviction_keeps_the_sinks_and_the_window():
    k, v = make_qkv(1, 1, 20, 20, 4)[1:]
    cache = SinkKVCache(1, 1, 4, n_sink=2, window=3)
    for t in range(20):
        ks, vs = cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert cache.token_positions.tolist() == [0, 1, 17, 18, 19]
    assert torch.equal(ks, k[:, :, [0, 1, 17, 18, 19]]) and torch.equal(vs, v[:, :, [0, 1, 17, 18, 19]])
    assert cache.positions.tolist() == [0, 1, 2, 3, 4]  # StreamingLLM: positions within the cache
    assert cache.new_mask(1) is None and cache.seen == 20 and cache.cache.nbytes == 5 * 2 * 4 * 4


def test_short_streams_are_not_evicted():
    k, v = make_qkv(1, 2, 6, 6, 4)[1:]
    cache = SinkKVCache(1, 2, 4, n_sink=4, window=8)
    ks, vs = cache.update(k, v)
    assert torch.equal(ks, k) and len(cache) == 6  # nothing evicted
    assert torch.equal(cache.new_mask(6)[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())  # causal in the block


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        SinkKVCache(1, 1, 4, window=0)
    with pytest.raises(ValueError, match="n_sink"):
        SinkKVCache(1, 1, 4, n_sink=-1, window=4)
    with pytest.raises(ValueError, match="expects key"):
        SinkKVCache(1, 1, 4, window=4).update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    cache = SinkKVCache(1, 1, 4, window=4)
    cache.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="q_len must be a positive integer"):
        cache.new_mask(-1)
    with pytest.raises(ValueError, match=r"q_len \(4\) exceeds the 3 tokens"):
        cache.new_mask(4)
