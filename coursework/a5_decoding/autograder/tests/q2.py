import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q2
from attention_lib.grading.public_a5 import decode_reference


@weight(2)  # the alignment is the point of the question
def test_odd_lengths_bottom_right(ns):
    f = get_function(ns, "decode_attention")
    for L, S in [(1, 1), (1, 97), (5, 5), (3, 4), (7, 33), (16, 129)]:
        q, k, v = random_qkv(2, 2, L, S, 16, seed=L * 1000 + S)
        what = f"decode_attention(q, k, v, is_causal=True) with L={L}, S={S}"
        out = expect_tensor(call(f, q, k, v, is_causal=True), what, shape=(2, 2, L, 16), dtype=q.dtype)
        expect_close(out, decode_reference(q, k, v, is_causal=True), what)


def test_gqa_ratios(ns):
    f = get_function(ns, "decode_attention")
    for H, Hkv in [(8, 2), (6, 3), (4, 1)]:
        q, k, v = random_qkv(1, H, 3, 11, 16, Hkv=Hkv, seed=H * 10 + Hkv)
        what = f"decode_attention(..., is_causal=True, enable_gqa=True) with H={H}, Hkv={Hkv}, L=3, S=11"
        out = expect_tensor(call(f, q, k, v, is_causal=True, enable_gqa=True), what, shape=(1, H, 3, 16), dtype=q.dtype)
        expect_close(out, decode_reference(q, k, v, is_causal=True, enable_gqa=True), what)


def test_padding_mask_with_causal_and_empty_rows(ns):
    f = get_function(ns, "decode_attention")
    q, k, v = random_qkv(3, 2, 4, 9, 8, seed=21)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False  # padding at the start of sequence 1
    mask[2] = False  # sequence 2: every key hidden
    what = "decode_attention with a padding mask and is_causal=True (L=4, S=9)"
    out = expect_tensor(call(f, q, k, v, attn_mask=mask, is_causal=True), what, shape=(3, 2, 4, 8))
    if (out[2] != 0).any():
        raise CheckFailure("rows whose keys are all masked should give output 0.")
    expect_close(out, decode_reference(q, k, v, attn_mask=mask, is_causal=True), what)


def test_float64_scale_and_value_width(ns):
    f = get_function(ns, "decode_attention")
    q, k, v = random_qkv(2, 4, 4, 9, 16, Hkv=2, Dv=12, dtype=torch.float64, seed=22)
    what = "decode_attention(..., scale=0.3, enable_gqa=True) in float64, Dv=12, not causal"
    out = expect_tensor(call(f, q, k, v, scale=0.3, enable_gqa=True), what, shape=(2, 4, 4, 12), dtype=torch.float64)
    expect_close(out, decode_reference(q, k, v, scale=0.3, enable_gqa=True), what)
