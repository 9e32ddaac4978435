"""The tiled exact variants, chunked_attention and flash_attention, on one grid.

Both are checked against the float64 oracle with the rule of tests/helpers.py, output
and gradients: odd lengths, Lq != Lk, head dims, dtypes, every mask of the registry as
bool and as float, broadcast biases and GQA. Tile sizes are chosen so that they do not
divide the lengths, and small enough that every test crosses several query and key
tiles. The same file checks what both promise beyond the numbers: a peak memory far
below naive attention, the default tiles, Hypothesis over random shapes, masks and
tiles, and clear errors. What is particular to each variant (checkpointing, the
saved tensors and gradcheck of the FlashAttention backward) is tested in its own file.
"""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import attention_ref, chunked_attention, flash_attention, peak_memory, scaled_dot_product_attention
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
FUNCTIONS = {"chunked": chunked_attention, "flash": flash_attention}
# variant -> the names of its query and key tile-size arguments
TILE_ARGS = {"chunked": ("q_chunk", "kv_chunk"), "flash": ("block_q", "block_k")}

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


def _tiles(variant: str, tile_q: int, tile_k: int) -> dict:
    """The tile sizes as the variant's own keyword arguments."""
    return dict(zip(TILE_ARGS[variant], (tile_q, tile_k)))


def test_default_tiles_and_no_grad_path(variant):
    q, k, v = make_qkv(1, 2, 137, 141, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(FUNCTIONS[variant](q, k, v), attention_ref(q, k, v))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dropout_p": 0.1}, "dropout"),
        ({"tile_q": 0}, "tile_q"),
        ({"tile_q": True}, "tile_q"),
        ({"tile_k": 2.5}, "tile_k"),
        ({"tile_k": True}, "tile_k"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": float("inf")}, "scale"),
    ],
)
def test_bad_arguments_raise_value_error(variant, kwargs, match):
    names = dict(zip(("tile_q", "tile_k"), TILE_ARGS[variant]))  # the generic name -> the variant's
    kwargs = {names.get(k, k): v for k, v in kwargs.items()}
    q, k, v = make_qkv(1, 2, 5, 5, 8)
    with pytest.raises(ValueError, match=names.get(match, match)):
        FUNCTIONS[variant](q, k, v, **kwargs)


@pytest.mark.parametrize("Hkv,enable_gqa,match", [(2, False, "enable_gqa"), (3, True, "divisible")])
def test_shape_errors_come_from_the_shared_checks(variant, Hkv, enable_gqa, match):
    q, k, v = make_qkv(1, 4, 5, 5, 8, Hkv=Hkv)
    with pytest.raises(ValueError, match=match):
        FUNCTIONS[variant](q, k, v, enable_gqa=enable_gqa)


# tiles of the memory test, and how far below naive the training peak must be: chunked
# checkpoints whole query chunks (O(q_chunk · S) in the backward), flash recomputes tiles
MEMORY = {"chunked": ((128, 256), 5), "flash": ((128, 128), 10)}


def test_memory_is_far_below_naive_forward_and_backward(variant):
    L = 1024
    q, k, v = make_qkv(1, 1, L, L, 64)
    (tile_q, tile_k), train_factor = MEMORY[variant]
    ours_fn = partial(FUNCTIONS[variant], **_tiles(variant, tile_q, tile_k))
    naive = peak_memory(scaled_dot_product_attention, q, k, v)[1]
    ours = peak_memory(ours_fn, q, k, v)[1]
    assert naive >= L * L * 4  # at least the score matrix
    assert ours * 10 < naive, f"{variant} forward peak {ours} B vs naive {naive} B"

    def train_step(f):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = f(qg, kg, vg)
        out.backward(torch.ones_like(out))
        return out

    naive_train = peak_memory(train_step, scaled_dot_product_attention)[1]
    ours_train = peak_memory(train_step, ours_fn)[1]
    assert ours_train * train_factor < naive_train, f"{variant} training peak {ours_train} B vs naive {naive_train} B"


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.integers(1, 3),
    Lq=st.integers(1, 24), Lk=st.integers(1, 24), D=st.sampled_from([1, 4, 8]),
    tile_q=st.integers(1, 30), tile_k=st.integers(1, 30),
    mask_name=st.sampled_from(list(MASKS)), seed=st.integers(0, 2**16),
)
def test_property_random_shapes_masks_and_tiles(variant, B, Hkv, rep, Lq, Lk, D, tile_q, tile_k, mask_name, seed):
    q, k, v = make_qkv(B, Hkv * rep, Lq, Lk, D, Hkv=Hkv, seed=seed, dtype=torch.float64)
    mask = dense_mask(mask_name, B, Lq, Lk)
    out = FUNCTIONS[variant](q, k, v, attn_mask=mask, enable_gqa=True, **_tiles(variant, tile_q, tile_k))
    torch.testing.assert_close(out, attention_ref(q, k, v, attn_mask=mask, enable_gqa=True))
