"""attention_block and merge_attention: attention over key blocks, merged, equals attention over all keys."""

import pytest
import torch

from attention_lib import attention_block, attention_ref, logsumexp, merge_attention, scaled_dot_product_attention
from helpers import make_qkv


@pytest.mark.parametrize("splits", [[9], [4, 5], [1, 3, 5], [2, 2, 2, 3]])
def test_merging_blocks_equals_full_attention(splits):
    q, k, v = make_qkv(2, 3, 7, 9, 8, dtype=torch.float64)
    scale = 8 ** -0.5
    o, lse = None, None
    for kb, vb in zip(k.split(splits, dim=2), v.split(splits, dim=2)):
        ob, lb = attention_block(q, kb, vb, scale)
        o, lse = (ob, lb) if o is None else merge_attention(o, lse, ob, lb)
    torch.testing.assert_close(o, attention_ref(q, k, v))
    torch.testing.assert_close(lse, logsumexp(q @ k.transpose(-2, -1) * scale))


def test_fully_masked_blocks_contribute_nothing_and_empty_rows_stay_zero():
    q, k, v = make_qkv(1, 2, 4, 6, 8, dtype=torch.float64)
    allowed = torch.ones(4, 6, dtype=torch.bool)
    allowed[0] = False  # query 0 sees no key at all
    allowed[1, :3] = False  # query 1 sees nothing in the first block
    o1, l1 = attention_block(q, k[:, :, :3], v[:, :, :3], 0.5, allowed[:, :3])
    o2, l2 = attention_block(q, k[:, :, 3:], v[:, :, 3:], 0.5, allowed[:, 3:])
    assert torch.isinf(l1[..., 0]).all() and torch.equal(o1[..., 0, :], torch.zeros_like(o1[..., 0, :]))
    o, lse = merge_attention(o1, l1, o2, l2)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.5))
    assert torch.isinf(lse[..., 0]).all()


def test_low_precision_block_keeps_float32_statistics():
    q, k, v = make_qkv(1, 1, 5, 5, 16, dtype=torch.bfloat16)
    o, lse = attention_block(q, k, v, 0.25)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_float16_block_computes_its_scores_in_float32():
    """q·k = 256 · 256 · 80 overflows float16 (max 65504): the block must not form float16 scores."""
    x = torch.full((1, 2, 7, 80), 256.0, dtype=torch.float16)
    o, lse = attention_block(x, x, x, 80**-0.5)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert torch.equal(o, x)  # every key is the same: the output is that value
    torch.testing.assert_close(lse, torch.full_like(lse, 256.0 * 256.0 * 80**0.5 + torch.log(torch.tensor(7.0)).item()))
