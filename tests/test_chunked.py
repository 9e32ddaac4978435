"""chunked_attention (Rabe & Staats 2021) against the float64 oracle, forward and backward.

Chunk sizes are chosen so that they do not divide the lengths, and small enough that
every test crosses several query and key chunks.

The grid shared with the other tiled variant (lengths, dtypes, masks, GQA) is in
tests/test_tiled_variants.py.
"""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import attention_ref, chunked_attention, peak_memory, scaled_dot_product_attention
from helpers import MASKS, assert_matches_ref, dense_mask, make_qkv


def chunked(q_chunk=5, kv_chunk=7):
    return partial(chunked_attention, q_chunk=q_chunk, kv_chunk=kv_chunk)


def test_default_chunks_and_no_grad_path():
    q, k, v = make_qkv(1, 2, 37, 41, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(chunked_attention(q, k, v), attention_ref(q, k, v))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dropout_p=0.1), "dropout"),
        (dict(q_chunk=0), "q_chunk"),
        (dict(kv_chunk=2.5), "kv_chunk"),
        (dict(q_chunk=True), "q_chunk"),
        (dict(scale=float("nan")), "scale"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    q, k, v = make_qkv(1, 2, 5, 5, 8)
    with pytest.raises(ValueError, match=match):
        chunked_attention(q, k, v, **kwargs)


def test_shape_errors_come_from_the_shared_checks():
    q, k, v = make_qkv(1, 4, 5, 5, 8, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        chunked_attention(q, k, v)


def test_memory_is_far_below_naive_forward_and_backward():
    L = 1024
    q, k, v = make_qkv(1, 1, L, L, 64)
    naive = peak_memory(scaled_dot_product_attention, q, k, v)[1]
    ours = peak_memory(chunked(128, 256), q, k, v)[1]
    assert naive >= L * L * 4  # at least the score matrix
    assert ours * 10 < naive, f"chunked forward peak {ours} B vs naive {naive} B"

    def train_step(f):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = f(qg, kg, vg)
        out.backward(torch.ones_like(out))
        return out

    naive_train = peak_memory(train_step, scaled_dot_product_attention)[1]
    ours_train = peak_memory(train_step, chunked(128, 256))[1]
    assert ours_train * 5 < naive_train, f"chunked training peak {ours_train} B vs naive {naive_train} B"


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.integers(1, 3),
    Lq=st.integers(1, 24), Lk=st.integers(1, 24), D=st.sampled_from([1, 4, 8]),
    q_chunk=st.integers(1, 30), kv_chunk=st.integers(1, 30),
    mask_name=st.sampled_from(list(MASKS)), seed=st.integers(0, 2**16),
)
def test_property_random_shapes_masks_and_chunks(B, Hkv, rep, Lq, Lk, D, q_chunk, kv_chunk, mask_name, seed):
    q, k, v = make_qkv(B, Hkv * rep, Lq, Lk, D, Hkv=Hkv, seed=seed, dtype=torch.float64)
    mask = dense_mask(mask_name, B, Lq, Lk)
    out = chunked_attention(q, k, v, attn_mask=mask, enable_gqa=True, q_chunk=q_chunk, kv_chunk=kv_chunk)
    torch.testing.assert_close(out, attention_ref(q, k, v, attn_mask=mask, enable_gqa=True))
