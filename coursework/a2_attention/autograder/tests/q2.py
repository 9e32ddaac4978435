import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q2
from attention_lib import attention_ref, masks as _masks


def test_gqa_ratios(ns):
    f = get_function(ns, "gqa_attention")
    for H, Hkv in [(4, 4), (6, 3), (8, 2), (6, 1)]:
        q, k, v = random_qkv(2, H, 7, 9, 16, Hkv=Hkv, seed=H * 10 + Hkv)
        out = expect_tensor(call(f, q, k, v), f"gqa_attention with H={H}, Hkv={Hkv}", shape=(2, H, 7, 16), dtype=q.dtype)
        expect_close(out, attention_ref(q, k, v, enable_gqa=True), f"gqa_attention with H={H}, Hkv={Hkv}")


def test_gqa_grouping_is_interleaved(ns):
    """Query heads 0 and 1 share key/value head 0 (not heads 0 and 2)."""
    f = get_function(ns, "gqa_attention")
    q, k, v = random_qkv(1, 4, 5, 5, 8, Hkv=2, seed=9)
    q = q.clone()
    q[:, 1] = q[:, 0]  # heads 0 and 1 have the same queries: same output iff same key/value head
    out = call(f, q, k, v)
    expect_close(out, attention_ref(q, k, v, enable_gqa=True), "gqa_attention: the grouping of query heads")


def test_gqa_masked_odd(ns):
    f = get_function(ns, "gqa_attention")
    q, k, v = random_qkv(3, 4, 9, 33, 16, Hkv=2, seed=12)
    mask = _masks.create_mask(_masks.padding(torch.tensor([0, 5, 33])), 3, None, 9, 33)
    expect_close(call(f, q, k, v, attn_mask=mask), attention_ref(q, k, v, attn_mask=mask, enable_gqa=True), "gqa_attention with a padding mask")
    expect_close(call(f, q, k, v, is_causal=True), attention_ref(q, k, v, is_causal=True, enable_gqa=True), "gqa_attention with is_causal=True and L != S")
