import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q2
from attention_lib import attention_ref, masks as _masks


def test_odd_lengths_and_block_sizes(ns):
    f = get_function(ns, "tiled_attention")
    for L, S, block_n in [(1, 1, 64), (7, 9, 1), (33, 97, 16), (9, 7, 100)]:
        q, k, v = random_qkv(2, 2, L, S, 16, seed=L * S)
        out = expect_tensor(call(f, q, k, v, block_n=block_n), f"tiled_attention with L={L}, S={S}, block_n={block_n}", shape=(2, 2, L, 16), dtype=q.dtype)
        expect_close(out, attention_ref(q, k, v), f"tiled_attention with L={L}, S={S}, block_n={block_n}")


def test_causal_L_not_S(ns):
    f = get_function(ns, "tiled_attention")
    for L, S in [(7, 20), (20, 7)]:
        q, k, v = random_qkv(1, 2, L, S, 16, seed=2)
        expect_close(call(f, q, k, v, is_causal=True, block_n=4), attention_ref(q, k, v, is_causal=True), f"tiled_attention(is_causal=True) with L={L}, S={S}")


def test_fully_masked_rows(ns):
    f = get_function(ns, "tiled_attention")
    q, k, v = random_qkv(3, 2, 6, 20, 8, seed=6)
    mask = _masks.create_mask(_masks.padding(torch.tensor([0, 3, 20])), 3, None, 6, 20)  # (3, 1, 6, 20)
    out = expect_tensor(call(f, q, k, v, attn_mask=mask, block_n=8), "tiled_attention with a padding mask", shape=(3, 2, 6, 8))
    if (out[0] != 0).any():
        raise CheckFailure("rows whose keys are all masked should give output 0.")
    expect_close(out, attention_ref(q, k, v, attn_mask=mask), "tiled_attention with a padding mask (a whole block masked)")


def test_gqa_and_float64(ns):
    f = get_function(ns, "tiled_attention")
    q, k, v = random_qkv(2, 6, 9, 13, 16, Hkv=2, dtype=torch.float64, seed=8)
    out = expect_tensor(call(f, q, k, v, enable_gqa=True, block_n=5), "tiled_attention(enable_gqa=True) in float64", shape=(2, 6, 9, 16), dtype=torch.float64)
    expect_close(out, attention_ref(q, k, v, enable_gqa=True), "tiled_attention(enable_gqa=True) in float64")


def test_gradients_match_the_oracle(ns):
    """The gradients with respect to query, key and value match the float64 oracle's."""
    f = get_function(ns, "tiled_attention")
    q, k, v = random_qkv(1, 2, 5, 7, 8, dtype=torch.float64, seed=21)
    w = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = call(f, *xs, is_causal=True, block_n=3)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailure("the output of tiled_attention does not depend on query, key and value through autograd (no gradient).")
    grads = torch.autograd.grad((out * w).sum(), xs)
    rs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    refs = torch.autograd.grad((attention_ref(*rs, is_causal=True) * w).sum(), rs)
    for name, g, r in zip(("query", "key", "value"), grads, refs):
        expect_close(g, r, f"the gradient of tiled_attention(..., is_causal=True) with respect to {name}")
