import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q1
def test_batched_odd_shapes(ns):
    f = get_function(ns, "dot_scores")
    for L, S, D in [(1, 1, 1), (7, 9, 16), (33, 5, 80)]:
        q, k, _ = random_qkv(2, 3, L, S, D, seed=L)
        ref = (torch.einsum("bhld,bhsd->bhls", q.double(), k.double()) / math.sqrt(D)).float()
        expect_close(call(f, q, k), ref, f"dot_scores on shapes {tuple(q.shape)}, {tuple(k.shape)}")


def test_float64_and_scale(ns):
    import math
    f = get_function(ns, "dot_scores")
    q, k, _ = random_qkv(1, 2, 5, 6, 8, dtype=torch.float64, seed=3)
    out = expect_tensor(call(f, q, k, scale=0.25), "dot_scores(q, k, scale=0.25) in float64", dtype=torch.float64)
    expect_close(out, q @ k.transpose(-2, -1) * 0.25, "dot_scores(q, k, scale=0.25) in float64")


def test_large_head_dim_is_scaled(ns):
    import math
    f = get_function(ns, "dot_scores")
    q, k, _ = random_qkv(1, 1, 4, 4, 256, seed=4)
    out = call(f, q, k)
    expect_close(out, (q.double() @ k.double().transpose(-2, -1) / 16.0).float(), "dot_scores with D = 256 (scale 1/16)")
