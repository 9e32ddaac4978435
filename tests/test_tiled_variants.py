"""The tiled exact variants, chunked_attention and flash_attention, on one grid.

Both are checked against the float64 oracle with the rule of tests/helpers.py, output
and gradients: odd lengths, Lq != Lk, head dims, dtypes, every mask of the registry as
bool and as float, broadcast biases and GQA. Tile sizes are chosen so that they do not
divide the lengths, and small enough that every test crosses several query and key
tiles. What is particular to each variant (checkpointing, the saved tensors of the
FlashAttention backward, peak memory) is tested in its own file.
"""

from functools import partial

import pytest
import torch

from attention_lib import chunked_attention, flash_attention
from helpers import MASKS, assert_matches_ref, dense_mask, make_qkv

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LENGTHS = [(1, 1), (7, 9), (97, 33), (33, 129)]
HEAD_DIMS = [16, 64, 80]

# variant -> make(tile_q, tile_k): the function with those query and key tile sizes
TILED = {
    "chunked": lambda tq=5, tk=7: partial(chunked_attention, q_chunk=tq, kv_chunk=tk),
    "flash": lambda tq=5, tk=7: partial(flash_attention, block_q=tq, block_k=tk),
}
DEFAULT_TILES = {"chunked": (1024, 4096), "flash": (128, 128)}

pytestmark = pytest.mark.parametrize("variant", list(TILED))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_grid(variant, dtype, Lq, Lk, is_causal):
    make = TILED[variant]
    D = HEAD_DIMS[(Lq + Lk) % 3]  # every head dim appears; the full product is in test_grid_full
    q, k, v = make_qkv(2, 2, Lq, Lk, D, dtype=dtype)
    assert_matches_ref(make(16, 24), q, k, v, is_causal=is_causal)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", LENGTHS + [(129, 97), (128, 128)])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("tiles", [(5, 7), (32, 64), "defaults"])
def test_grid_full(variant, dtype, Lq, Lk, D, is_causal, tiles):
    make = TILED[variant]
    q, k, v = make_qkv(2, 2, Lq, Lk, D, dtype=dtype)
    assert_matches_ref(make(*(DEFAULT_TILES[variant] if tiles == "defaults" else tiles)), q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("Lq,Lk", [(7, 9), (9, 7)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_one_row_and_one_key_per_tile(variant, Lq, Lk, is_causal):
    make = TILED[variant]
    q, k, v = make_qkv(2, 2, Lq, Lk, 8)
    assert_matches_ref(make(1, 1), q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("Lq,Lk", [(7, 9), (13, 6)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_mask(variant, mask_name, Lq, Lk, kind):
    make = TILED[variant]
    q, k, v = make_qkv(3, 2, Lq, Lk, 16)
    mask = dense_mask(mask_name, 3, Lq, Lk)
    if mask is not None and kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert_matches_ref(make(4, 3), q, k, v, attn_mask=mask)


@pytest.mark.slow
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_every_mask_low_and_high_precision(variant, mask_name, dtype):
    make = TILED[variant]
    q, k, v = make_qkv(3, 2, 19, 23, 16, dtype=dtype)
    assert_matches_ref(make(4, 5), q, k, v, attn_mask=dense_mask(mask_name, 3, 19, 23))


@pytest.mark.parametrize("shape", [(23,), (1, 23), (11, 1), (3, 1, 11, 23), (3, 4, 11, 23)])
def test_additive_bias_broadcasts(variant, shape):
    make = TILED[variant]
    q, k, v = make_qkv(3, 4, 11, 23, 8)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    assert_matches_ref(make(4, 5), q, k, v, attn_mask=bias)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1), (6, 3), (8, 2)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(variant, Hq, Hkv, is_causal):
    make = TILED[variant]
    q, k, v = make_qkv(2, Hq, 11, 13, 16, Hkv=Hkv)
    assert_matches_ref(make(4, 5), q, k, v, is_causal=is_causal, enable_gqa=True)


def test_gqa_with_a_per_head_mask(variant):
    make = TILED[variant]
    q, k, v = make_qkv(2, 6, 9, 10, 8, Hkv=2)
    mask = torch.rand(2, 6, 9, 10, generator=torch.Generator().manual_seed(4)) > 0.4
    assert_matches_ref(make(4, 3), q, k, v, attn_mask=mask, enable_gqa=True)


def test_fully_masked_rows_give_zero_output_and_zero_gradient(variant):
    q, k, v = make_qkv(2, 2, 9, 10, 8, requires_grad=True)
    mask = torch.ones(2, 1, 9, 10, dtype=torch.bool)
    mask[0, :, 3] = False  # one row of batch 0 sees nothing (in every key tile)
    mask[1] = False  # batch 1 sees nothing at all: flash skips every tile of it
    out = TILED[variant](4, 3)(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, :, 3], torch.zeros_like(q.grad[0, :, 3]))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))


def test_non_contiguous_inputs_and_value_dim(variant):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, 3, 8, generator=g).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    k = torch.randn(2, 13, 3, 8, generator=g).transpose(1, 2)
    v = torch.randn(2, 13, 3, 12, generator=g).transpose(1, 2)
    assert_matches_ref(TILED[variant](4, 5), q, k, v, is_causal=True)
