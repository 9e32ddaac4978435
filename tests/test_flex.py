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
        ours = flex.flex_attention(q, k, v, mod, compile=False, BLOCK_SIZE=16)
    ref = attention_ref(q, k, v, attn_mask=masks.create_mask(mod, 3, 2, 24, 40))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_flex_attention_runs_our_mask_mod():
    """The one compiled call: inductor generates a CPU kernel for a composed mask_mod.

    Slow: a cold compile takes 15-40 s on 2 CPU cores.
    """
    q, k, v = make_qkv(1, 4, 256, 256, 32, Hkv=2)
    mod = masks.or_masks(masks.sliding_window(64), masks.prefix_lm(16))
    out = flex.flex_attention(q, k, v, mod, enable_gqa=True)
    ref = attention_ref(q, k, v, attn_mask=masks.create_mask(mod, 1, 4, 256, 256), enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
