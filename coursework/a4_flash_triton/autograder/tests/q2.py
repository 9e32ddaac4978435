import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q2
from attention_lib.grading.public_a4 import check_backward


def test_odd_lengths(ns):
    f = get_function(ns, "flash_bwd")
    for B, H, L, S, D in [(1, 2, 37, 45, 16), (2, 1, 1, 33, 32)]:
        check_backward(f, *random_qkv(B, H, L, S, D, seed=L * S + 1), seed=L)


def test_causal_L_not_S(ns):
    f = get_function(ns, "flash_bwd")
    for L, S in [(45, 37), (37, 45)]:
        check_backward(f, *random_qkv(1, 1, L, S, 16, seed=L - S + 100), is_causal=True, seed=3)


@weight(2)  # GQA: each key/value head sums the gradients of the query heads that read it
def test_gqa(ns):
    f = get_function(ns, "flash_bwd")
    check_backward(f, *random_qkv(2, 4, 19, 23, 16, Hkv=2, seed=11), seed=4)
    check_backward(f, *random_qkv(1, 4, 23, 19, 16, Hkv=2, seed=12), is_causal=True, seed=5)


def test_bfloat16(ns):
    f = get_function(ns, "flash_bwd")
    check_backward(f, *random_qkv(1, 4, 37, 45, 16, Hkv=2, dtype=torch.bfloat16, seed=13), is_causal=True, seed=6)


def test_scale(ns):
    check_backward(get_function(ns, "flash_bwd"), *random_qkv(1, 1, 20, 30, 16, seed=14), scale=0.3, seed=7)
