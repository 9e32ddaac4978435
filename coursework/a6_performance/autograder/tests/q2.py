import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q2
from attention_lib.grading.public_a6 import expected_tflops


def _expect_tflops(ns, args, kw):
    got = call(get_function(ns, "tflops"), *args, **kw)
    want = expected_tflops(*args, **kw)
    if not (isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * want):
        raise CheckFailure(f"tflops{args} with {kw} = {got!r:.20}, expected {want:.6g}.")


def test_odd_shapes_and_lq_not_lk(ns):
    for args in [(1, 1, 1, 1, 1, 1.0), (3, 5, 7, 1000, 80, 0.37), (8, 32, 4096, 512, 128, 12.5)]:
        _expect_tflops(ns, args, {})


@weight(2)
def test_causal_and_backward(ns):
    """Causal attention counts half; bwd is x2.5 and fwd_bwd x3.5."""
    for kw in [{"causal": True}, {"mode": "bwd"}, {"mode": "fwd_bwd", "causal": True}]:
        _expect_tflops(ns, (2, 16, 2048, 2048, 64, 3.0), kw)
