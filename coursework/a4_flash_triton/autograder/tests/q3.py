import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q3
from attention_lib import attention_ref
from attention_lib.grading.public_a4 import _grads, expect_rule, naive_same_dtype, ref_backward


def _autograd_case(f, q, k, v, is_causal, seed):
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = call(f, *xs, is_causal=is_causal)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailure("flash_attention's output has no gradient.")
    expect_rule(out, naive_same_dtype(q, k, v, is_causal), attention_ref(q, k, v, is_causal=is_causal, enable_gqa=True),
                "flash_attention", q.dtype)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    grads = torch.autograd.grad((out * w).sum(), xs)
    naive = _grads(naive_same_dtype, q, k, v, w, is_causal=is_causal)
    for name, g, nv, r in zip(("query", "key", "value"), grads, naive, ref_backward(q, k, v, w, is_causal)):
        expect_rule(g, nv, r, f"the gradient of flash_attention with respect to {name}", q.dtype)


def test_gqa_odd_lengths_float32(ns):
    _autograd_case(get_function(ns, "flash_attention"), *random_qkv(1, 4, 21, 33, 16, Hkv=2, seed=15), False, 1)


def test_gqa_causal_bfloat16(ns):
    _autograd_case(get_function(ns, "flash_attention"), *random_qkv(1, 4, 33, 21, 16, Hkv=2, dtype=torch.bfloat16, seed=16), True, 2)
