import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q2
def test_random_shapes_and_dims(ns):
    f = get_function(ns, "softmax")
    g = torch.Generator().manual_seed(11)
    for shape, dim in [((7,), 0), ((2, 3, 9), -1), ((2, 3, 9), 1), ((4, 1), -1), ((3, 33), 0)]:
        x = 5 * torch.randn(*shape, generator=g)
        expect_close(call(f, x, dim=dim), torch.softmax(x.double(), dim).float(), f"softmax of shape {shape}, dim={dim}")


@weight(3)  # the point of the question
def test_extreme_values(ns):
    f = get_function(ns, "softmax")
    x = torch.tensor([[1e4, 0.0, -1e4], [3e4, 3e4, 3e4], [-3e4, -3e4 + 1, -3e4 + 2]])
    expect_close(call(f, x), torch.softmax(x.double(), -1).float(), "softmax of scores near ±30000")


def test_partial_minus_inf(ns):
    f = get_function(ns, "softmax")
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf"), 2.0, float("-inf")]])
    out = expect_tensor(call(f, x), "softmax of a row with some -inf", shape=x.shape)
    expect_close(out, torch.softmax(x.double(), -1).float(), "softmax of a row with some -inf")


def test_keeps_dtype(ns):
    f = get_function(ns, "softmax")
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = expect_tensor(call(f, x), "softmax of a float64 tensor", dtype=torch.float64)
    expect_close(out, torch.softmax(x, -1), "softmax of a float64 tensor")
