"""The bridge to torch.nn.attention.flex_attention: our mask_mods run there unchanged.

The cheap tests build block masks and run the unfused (uncompiled) flex_attention;
one test, marked slow, compiles flex_attention through inductor, once.
"""

import warnings

import pytest
import torch

from attention_lib import attention_ref, flex, masks
from helpers import MASKS, make_qkv

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


def tiles_with_an_allowed_pair(dense, block):
    """(B, H, Q_blocks, KV_blocks): does tile (i, j) of ``dense`` hold any True?"""
    B, H, L, S = dense.shape
    nq, nk = -(-L // block), -(-S // block)
    padded = torch.zeros(B, H, nq * block, nk * block, dtype=torch.bool)
    padded[:, :, :L, :S] = dense
    return padded.view(B, H, nq, block, nk, block).any(dim=3).any(dim=-1)


@pytest.mark.parametrize("name", [n for n in MASKS if n != "none"])
@pytest.mark.parametrize("L,S", [(64, 64), (40, 72)])
def test_block_mask_agrees_with_our_dense_mask(name, L, S):
    mod = MASKS[name](3, L, S)
    bm = flex.block_mask(mod, 3, 2, L, S, BLOCK_SIZE=16)
    dense = masks.create_mask(mod, 3, 2, L, S)
    assert torch.equal(bm.to_dense().bool(), tiles_with_an_allowed_pair(dense, 16))


def test_sliding_window_block_mask_is_banded():
    """A window of 128 over 1024 keys touches at most 2 of the 8 tiles per row of tiles."""
    bm = flex.block_mask(masks.sliding_window(128), None, None, 1024, 1024)
    tiles = bm.to_dense()[0, 0]
    assert tiles.shape == (8, 8)
    assert tiles.sum(dim=-1).max().item() == 2
    assert tiles.sum().item() == 15  # the diagonal and the one below it


@pytest.mark.parametrize("name", [n for n in MASKS if n != "none"])
def test_unfused_flex_attention_equals_the_oracle(name):
    q, k, v = make_qkv(3, 2, 24, 40, 16)
    mod = MASKS[name](3, 24, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        ours = flex.flex_attention(q, k, v, mask_mod=mod, compile=False, BLOCK_SIZE=16)
    ref = attention_ref(q, k, v, attn_mask=masks.create_mask(mod, 3, 2, 24, 40))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_flex_attention_runs_our_mask_mod():
    """The one compiled call: inductor generates a CPU kernel for a composed mask_mod.

    Slow: a cold compile takes 15-40 s on 2 CPU cores.
    """
    q, k, v = make_qkv(1, 4, 256, 256, 32, Hkv=2)
    mod = masks.or_masks(masks.sliding_window(64), masks.prefix_lm(16))
    out = flex.flex_attention(q, k, v, enable_gqa=True, mask_mod=mod)
    ref = attention_ref(q, k, v, attn_mask=masks.create_mask(mod, 1, 4, 256, 256), enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _flex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        return flex.flex_attention(*args, compile=False, BLOCK_SIZE=16, **kwargs)


@pytest.mark.parametrize("kind", ["is_causal", "bool attn_mask", "float attn_mask", "and mask_mod", "rank 3"])
def test_sdpa_arguments_are_combined_with_the_mask_mod(kind):
    """SDPA's arguments come first, as in every variant; mask_mod is keyword-only."""
    q, k, v = make_qkv(2, 2, 24, 40, 16)
    g = torch.Generator().manual_seed(2)
    bool_mask = torch.rand(2, 1, 24, 40, generator=g) > 0.3
    bias = torch.randn(24, 40, generator=g)
    if kind == "is_causal":
        got, want = _flex(q, k, v, is_causal=True), attention_ref(q, k, v, is_causal=True)
    elif kind == "bool attn_mask":
        got, want = _flex(q, k, v, bool_mask), attention_ref(q, k, v, bool_mask)
    elif kind == "float attn_mask":
        got, want = _flex(q, k, v, bias), attention_ref(q, k, v, bias)
    elif kind == "and mask_mod":
        mod = masks.sliding_window(5)
        got = _flex(q, k, v, bool_mask, mask_mod=mod)
        want = attention_ref(q, k, v, bool_mask & masks.create_mask(mod, None, None, 24, 40))
    else:
        got, want = _flex(q[0], k[0], v[0], is_causal=True), attention_ref(q[0], k[0], v[0], is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_mask_mod_passed_positionally_is_refused():
    q, k, v = make_qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="mask_mod=.*keyword-only"):
        flex.flex_attention(q, k, v, masks.causal)
    with pytest.raises(ValueError, match="dropout"):
        flex.flex_attention(q, k, v, dropout_p=0.1)
