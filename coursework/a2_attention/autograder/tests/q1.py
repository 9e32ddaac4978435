import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q1
from attention_lib import attention_ref, masks as _masks


def test_odd_lengths_against_oracle(ns):
    f = get_function(ns, "attention")
    for L, S, D, Dv in [(1, 1, 8, 8), (7, 9, 16, 16), (33, 5, 16, 12), (5, 33, 80, 80)]:
        q, k, v = random_qkv(2, 3, L, S, D, Dv=Dv, seed=L + S)
        out = expect_tensor(call(f, q, k, v), f"attention on L={L}, S={S}", shape=(2, 3, L, Dv), dtype=q.dtype)
        expect_close(out, attention_ref(q, k, v), f"attention on L={L}, S={S}")


def test_causal_with_L_not_S(ns):
    f = get_function(ns, "attention")
    for L, S in [(7, 9), (9, 7), (1, 5)]:
        q, k, v = random_qkv(1, 2, L, S, 16, seed=3)
        expect_close(call(f, q, k, v, is_causal=True), attention_ref(q, k, v, is_causal=True), f"attention(is_causal=True) with L={L}, S={S} (top-left)")


@weight(2)  # a fully masked row must not poison the output with NaN
def test_fully_masked_rows_give_zero(ns):
    f = get_function(ns, "attention")
    q, k, v = random_qkv(3, 2, 6, 7, 8, seed=4)
    lengths = torch.tensor([0, 3, 7])  # batch 0: every key is padding
    mask = _masks.create_mask(_masks.padding(lengths), 3, None, 6, 7)  # (3, 1, 6, 7)
    out = expect_tensor(call(f, q, k, v, attn_mask=mask), "attention with a padding mask", shape=(3, 2, 6, 8))
    if (out[0] != 0).any():
        raise CheckFailure("rows whose keys are all masked should give output 0.")
    expect_close(out, attention_ref(q, k, v, attn_mask=mask), "attention with a padding mask")


def test_mask_and_scale_float64(ns):
    f = get_function(ns, "attention")
    q, k, v = random_qkv(2, 2, 9, 9, 16, dtype=torch.float64, seed=5)
    mask = _masks.create_mask(_masks.sliding_window(3), None, None, 9, 9)  # (1, 1, 9, 9)
    out = expect_tensor(call(f, q, k, v, attn_mask=mask, scale=0.3), "attention in float64", dtype=torch.float64)
    expect_close(out, attention_ref(q, k, v, attn_mask=mask, scale=0.3), "attention with a sliding-window mask and scale=0.3")


def test_gradients_match_the_oracle(ns):
    """The gradients with respect to query, key and value match the float64 oracle's."""
    f = get_function(ns, "attention")
    q, k, v = random_qkv(1, 2, 5, 7, 8, dtype=torch.float64, seed=21)
    w = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = call(f, *xs, is_causal=True)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailure("the output of attention does not depend on query, key and value through autograd (no gradient).")
    grads = torch.autograd.grad((out * w).sum(), xs)
    rs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    refs = torch.autograd.grad((attention_ref(*rs, is_causal=True) * w).sum(), rs)
    for name, g, r in zip(("query", "key", "value"), grads, refs):
        expect_close(g, r, f"the gradient of attention(..., is_causal=True) with respect to {name}")
