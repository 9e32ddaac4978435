import math

import torch

from attention_lib.grading.testing import *  # noqa: F403

# HIDDEN TESTS q1
from attention_lib.grading.public import online_reference, run_online, _expect_stats


def test_batched_random_blocks(ns):
    f = get_function(ns, "online_softmax_update")
    g = torch.Generator().manual_seed(3)
    for L, N, block in [(1, 1, 1), (7, 33, 5), (9, 16, 16), (5, 20, 3)]:
        s = 4 * torch.randn(2, 3, L, N, generator=g)
        v = torch.randn(2, 3, N, 6, generator=g)
        _expect_stats(run_online(f, s, v, block, 6), online_reference(s, v), f"blocks of {block} over {N} keys")


@weight(2)  # the case the online softmax must get right
def test_masked_first_block_and_empty_rows(ns):
    f = get_function(ns, "online_softmax_update")
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 12, generator=g)
    s[0, :4] = float("-inf")  # row 0: the first block is fully masked
    s[1] = float("-inf")  # row 1: every key is masked
    s[2, 4:] = float("-inf")  # row 2: only the first block is visible
    v = torch.randn(12, 3, generator=g)
    m, l, acc = run_online(f, s, v, 4, 3)
    _expect_stats((m, l, acc), online_reference(s, v), "blocks with masked keys")
    if not (m[1] == float("-inf") and l[1] == 0 and (acc[1] == 0).all()):
        raise CheckFailure("a row whose keys are all masked should end with m = -inf, l = 0, acc = 0.")


def test_huge_scores(ns):
    f = get_function(ns, "online_softmax_update")
    s = torch.tensor([[1e4, 0.0, -1e4, 2e4], [-5e3, -5e3, -5e3, -5e3]])
    v = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    _expect_stats(run_online(f, s, v, 1, 2), online_reference(s, v), "blocks of 1 key with scores near ±20000")
