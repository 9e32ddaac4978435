"""Multi-head latent attention: the unabsorbed form against the oracle, the absorbed
form against the unabsorbed one (exact in float64), decoding with the latent cache,
and the cache size at DeepSeek-V2's published dimensions."""

import pytest
import torch

from attention_lib import attention_ref, kv_cache_bytes, masks
from attention_lib.mla import MultiHeadLatentAttention, mla_cache_bytes
from attention_lib.positional import apply_rotary


def make_mla(q_latent_dim=None, v_head_dim=None, seed=0, E=24, H=3, D=8, dc=10, dR=4):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(E, H, D, dc, dR, q_latent_dim=q_latent_dim, v_head_dim=v_head_dim).double()


def reference(m, x, attn_mask=None, is_causal=False):
    """MLA written from the paper's equations, with the float64 oracle."""
    B, L, _ = x.shape
    H, D, Dv, dR = m.num_heads, m.head_dim, m.v_head_dim, m.rope_dim
    h = x if m.q_latent_dim is None else x @ m.q_down.weight.T
    q = (h @ m.q_proj.weight.T).view(B, L, H, D + dR).transpose(1, 2)
    q_c, q_r = q[..., :D], apply_rotary(q[..., D:])
    c = x @ m.kv_down.weight.T  # (B, L, d_c)
    k_c = (c @ m.k_up.weight.T).view(B, L, H, D).transpose(1, 2)
    v = (c @ m.v_up.weight.T).view(B, L, H, Dv).transpose(1, 2)
    k_r = apply_rotary(x @ m.k_rope.weight.T).unsqueeze(1).expand(B, H, L, dR)
    o = attention_ref(torch.cat([q_c, q_r], -1), torch.cat([k_c, k_r], -1), v,
                      attn_mask=attn_mask, is_causal=is_causal, scale=(D + dR) ** -0.5)
    return o.transpose(1, 2).reshape(B, L, H * Dv) @ m.out_proj.weight.T


@pytest.mark.parametrize("L", [1, 7, 33])
@pytest.mark.parametrize("q_latent_dim,v_head_dim", [(None, None), (12, 6)])
@pytest.mark.parametrize("mask", ["none", "causal", "padding"])
def test_both_forms_equal_the_paper_equations(L, q_latent_dim, v_head_dim, mask):
    m = make_mla(q_latent_dim, v_head_dim)
    x = torch.randn(2, L, 24, dtype=torch.float64)
    attn_mask = None
    if mask == "padding":
        attn_mask = masks.create_mask(masks.padding(torch.tensor([L, max(1, L // 2)])), 2, None, L, L)
    kw = dict(attn_mask=attn_mask, is_causal=mask == "causal")
    ref = reference(m, x, **kw)
    with torch.no_grad():
        naive, absorbed = m(x, **kw), m(x, **kw, absorb=True)
    torch.testing.assert_close(naive, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prefill", [0, 1, 5])
@pytest.mark.parametrize("absorb", [False, True])
def test_decoding_with_the_latent_cache_equals_the_full_causal_pass(prefill, absorb):
    m = make_mla(q_latent_dim=12)
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    cache = m.new_cache(2, dtype=torch.float64)
    with torch.no_grad():
        full = m(x, is_causal=True)
        outs = [m(x[:, :prefill], is_causal=True, kv_cache=cache, absorb=absorb)] if prefill else []
        outs += [m(x[:, t : t + 1], is_causal=True, kv_cache=cache, absorb=absorb) for t in range(prefill, 13)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)
    assert len(cache) == 13 and cache.keys().shape == (2, 1, 13, 4) and cache.values().shape == (2, 1, 13, 10)
    assert cache.nbytes == 2 * 13 * (10 + 4) * 8  # only c and k_R, float64


def test_absorption_is_not_trivially_equal():
    # The check can fail: a wrong fold (W_UV without W_O, say) changes the output.
    m = make_mla()
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    with torch.no_grad():
        good = m(x, is_causal=True, absorb=True)
        m.v_up.weight.mul_(1.01)
        assert (m(x, is_causal=True, absorb=True) - good).abs().max() > 1e-4


def test_float32_forms_agree_to_rounding():
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(64, 4, 16, 32, 8)
    x = torch.randn(2, 29, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x, is_causal=True, absorb=True), m(x, is_causal=True), rtol=1e-4, atol=1e-5)


def test_cache_bytes_at_deepseek_v2_size():
    # DeepSeek-V2: 60 layers, 128 heads of 128, d_c = 512, d_R = 64 (DeepSeek-AI 2024, section 3.1.2)
    S = 128 * 1024
    mla = mla_cache_bytes(60, 512, 64, S)
    mha = kv_cache_bytes(60, 128, 128, S)
    assert mla == 60 * S * 576 * 2
    assert mha / mla == pytest.approx(32768 / 576)  # about 57x smaller than MHA
    assert mla == kv_cache_bytes(60, 1, 128, S) * 2.25  # as GQA with 2.25 groups (the paper's Table 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rope_dim"):
        MultiHeadLatentAttention(16, 2, 8, 4, 3)
    with pytest.raises(ValueError, match="kv_latent_dim"):
        MultiHeadLatentAttention(16, 2, 8, 0, 4)
    m = MultiHeadLatentAttention(16, 2, 8, 4, 2)
    with pytest.raises(ValueError, match=r"\(B, L, E=16\)"):
        m(torch.zeros(1, 3, 15))
    from attention_lib import KVCache
    with pytest.raises(ValueError, match="new_cache"):
        m(torch.zeros(1, 3, 16), kv_cache=KVCache(1, 2, 8))
    with pytest.raises(ValueError, match="floating-point"):
        m(torch.zeros(1, 3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="v_head_dim must be a positive integer, got 0"):
        MultiHeadLatentAttention(16, 2, 8, 4, 2, v_head_dim=0)
    with pytest.raises(ValueError, match="q_latent_dim must be a positive integer, got 2.5"):
        MultiHeadLatentAttention(16, 2, 8, 4, 2, q_latent_dim=2.5)
    from attention_lib.mla import mla_cache_bytes
    with pytest.raises(ValueError, match="num_layers"):
        mla_cache_bytes(0, 512, 64, 10)
    with pytest.raises(ValueError, match="rope_dim"):
        mla_cache_bytes(2, 512, -1, 10)
