import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q3
from attention_lib.grading.public_a5 import expect_quantised_replay, random_chunks, run_replay


@weight(2)  # the stated error bound, on every entry
def test_error_bound_odd_chunks_with_outliers(ns):
    chunks = random_chunks(2, 2, [1, 7, 1, 20], 32, seed=31, outliers=True)
    expect_quantised_replay(run_replay(ns, chunks, quantized=True), chunks, "a QuantCache(2, 2, 32)", ratio=0.3)


def test_bytes_after_many_steps(ns):
    chunks = random_chunks(1, 2, [1] * 40 + [33], 64, seed=32)
    expect_quantised_replay(run_replay(ns, chunks, quantized=True), chunks, "a QuantCache(1, 2, 64) after 40 single steps and 33 more", ratio=0.3)


def test_zero_tokens_and_large_values(ns):
    chunks = random_chunks(1, 1, [4, 3], 64, dtype=torch.float64, seed=33)
    chunks[0][0][0, 0, 1] = 0.0  # a key of zeros: scale 0, codes 0, no NaN
    chunks[1][1].mul_(1e4)  # values near 10^4
    steps = run_replay(ns, chunks, quantized=True)
    expect_quantised_replay(steps, chunks, "a float64 QuantCache(1, 1, 64) with a zero key and large values", ratio=0.3)
    if (steps[-1][0][0, 0, 1] != 0).any():
        raise CheckFailure("a key of zeros should come back as exactly zeros.")
