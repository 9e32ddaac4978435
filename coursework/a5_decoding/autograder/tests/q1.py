import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q1
from attention_lib.grading.public_a5 import expect_exact_replay, random_chunks, run_replay


def test_odd_chunks_with_gqa_heads(ns):
    chunks = random_chunks(2, 2, [1, 7, 1, 13, 2], 16, seed=11)
    expect_exact_replay(run_replay(ns, chunks), chunks, "a Cache(2, 2, 16) fed chunks of 1, 7, 1, 13 and 2")


@weight(2)  # the cache must survive growing past any first allocation
def test_many_single_steps_then_a_long_chunk(ns):
    chunks = random_chunks(1, 1, [1] * 40 + [70, 1], 8, seed=12)
    expect_exact_replay(run_replay(ns, chunks), chunks, "a Cache(1, 1, 8) fed 40 single tokens, then 70, then 1")


def test_float64_multi_query(ns):
    chunks = random_chunks(3, 1, [5, 1, 1], 80, dtype=torch.float64, seed=13)
    expect_exact_replay(run_replay(ns, chunks), chunks, "a float64 Cache(3, 1, 80)")
