"""attention_lib.masks: mask_mods, composition, and agreement with FlexAttention."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask as flex_create_mask

from attention_lib import masks
from helpers import MASKS


@pytest.mark.parametrize("name", [n for n in MASKS if n != "none"])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 9), (9, 7), (16, 16)])
def test_agrees_with_flex_create_mask(name, Lq, Lk):
    mod = MASKS[name](3, Lq, Lk)
    ours = masks.create_mask(mod, 3, 2, Lq, Lk)
    theirs = flex_create_mask(mod, 3, 2, Lq, Lk, device="cpu")
    assert ours.dtype == torch.bool and ours.shape == (3, 2, Lq, Lk)
    assert torch.equal(ours, theirs)


def test_none_batch_and_heads_broadcast():
    m = masks.create_mask(masks.causal, None, None, 4, 4)
    assert m.shape == (1, 1, 4, 4)
    assert torch.equal(m[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_docstring_examples():
    m = lambda mod, L, S: masks.create_mask(mod, None, None, L, S)[0, 0].int().tolist()
    assert m(masks.causal, 3, 4) == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert m(masks.causal_lower_right(2, 4), 2, 4) == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert m(masks.sliding_window(2), 4, 4) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert m(masks.prefix_lm(2), 4, 4) == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    pad = masks.create_mask(masks.padding(torch.tensor([3, 1])), 2, None, 2, 4)
    assert pad[0, 0].int().tolist() == [[1, 1, 1, 0]] * 2
    assert pad[1, 0].int().tolist() == [[1, 0, 0, 0]] * 2


def test_causal_matches_torch_is_causal_convention():
    # is_causal in PyTorch is top-left: torch.ones(L, S).tril()
    for L, S in [(3, 5), (5, 3), (4, 4)]:
        assert torch.equal(masks.create_mask(masks.causal, None, None, L, S)[0, 0], torch.ones(L, S, dtype=torch.bool).tril())


def test_lower_right_equals_torch_causal_lower_right():
    from torch.nn.attention.bias import causal_lower_right

    for L, S in [(3, 5), (5, 5), (1, 8)]:
        ours = masks.create_mask(masks.causal_lower_right(L, S), None, None, L, S)[0, 0]
        theirs = causal_lower_right(L, S)._materialize(torch.device("cpu"))
        assert torch.equal(ours, theirs)


def test_and_or():
    c = masks.create_mask(masks.causal, None, None, 6, 6)
    w = masks.create_mask(masks.sliding_window(2), None, None, 6, 6)
    p = masks.create_mask(masks.prefix_lm(3), None, None, 6, 6)
    assert torch.equal(masks.create_mask(masks.and_masks(masks.causal, masks.sliding_window(2)), None, None, 6, 6), c & w)
    assert torch.equal(masks.create_mask(masks.or_masks(masks.sliding_window(2), masks.prefix_lm(3)), None, None, 6, 6), w | p)
    with pytest.raises(ValueError):
        masks.and_masks()
    with pytest.raises(ValueError):
        masks.or_masks()


@pytest.mark.parametrize("bad", [2.5, "3", 0, -1, True, None])
def test_sliding_window_rejects_bad_window(bad):
    with pytest.raises(ValueError, match="window"):
        masks.sliding_window(bad)


def test_padding_and_prefix_reject_bad_arguments():
    with pytest.raises(ValueError, match="lengths"):
        masks.padding(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="lengths"):
        masks.padding(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="prefix_len"):
        masks.prefix_lm(-1)


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 12), S=st.integers(1, 12), w=st.integers(1, 12), p=st.integers(0, 12))
def test_property_masks_against_definitions(L, S, w, p):
    i = torch.arange(L).view(L, 1)
    j = torch.arange(S).view(1, S)
    dense = lambda mod: masks.create_mask(mod, None, None, L, S)[0, 0]
    assert torch.equal(dense(masks.causal), j <= i)
    assert torch.equal(dense(masks.causal_lower_right(L, S)), j <= i + S - L)
    assert torch.equal(dense(masks.sliding_window(w)), (j <= i) & (j > i - w))
    assert torch.equal(dense(masks.prefix_lm(p)), (j < p) | (j <= i))
    # every row of a causal window sees min(i + 1, w) keys when S >= L
    if S >= L:
        assert dense(masks.sliding_window(w)).sum(-1).tolist() == [min(r + 1, w) for r in range(L)]


# score_mods (score, b, h, q_idx, kv_idx) -> score, in the style of the ones in PyTorch's
# test/inductor/test_flex_attention.py: create_mask keeps the pairs whose score is not -inf
SCORE_MODS = {
    "causal as -inf": lambda score, b, h, q, kv: torch.where(q >= kv, score, float("-inf")),
    "relative bias": lambda score, b, h, q, kv: score + (q - kv),  # never -inf: everything allowed
    "alibi per head, banded": lambda score, b, h, q, kv: torch.where(
        (q - kv).abs() <= h + 1, score - (h + 1) * (q - kv).abs(), float("-inf")),
    "batch 0 sees nothing": lambda score, b, h, q, kv: torch.where(b > 0, score, float("-inf")),
    "+inf is allowed": lambda score, b, h, q, kv: torch.where(q == kv, float("inf"), score),
}


@pytest.mark.parametrize("name", list(SCORE_MODS))
@pytest.mark.parametrize("B,H", [(None, None), (2, 3)])
def test_score_mod_agrees_with_flex_create_mask(name, B, H):
    mod = SCORE_MODS[name]
    ours = masks.create_mask(mod, B, H, 7, 9)
    theirs = flex_create_mask(mod, B, H, 7, 9, device="cpu")
    assert ours.dtype == torch.bool and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_create_mask_rejects_other_arities():
    with pytest.raises(ValueError, match="4 arguments.*5 for a score_mod.*got 3"):
        masks.create_mask(lambda b, q, kv: q >= kv, None, None, 3, 3)
    with pytest.raises(ValueError, match="mask_mod must be a function"):
        masks.create_mask(3, None, None, 3, 3)


def test_create_mask_ignores_parameters_with_defaults():
    """As PyTorch counts them: parameters with defaults do not count."""
    mod = lambda b, h, q, kv, offset=1: q + offset >= kv  # noqa: E731
    assert torch.equal(masks.create_mask(mod, None, None, 3, 4), flex_create_mask(mod, None, None, 3, 4, device="cpu"))


def test_cache_causal_mask_is_bottom_right():
    m = masks.cache_causal_mask(2, 4)
    assert m[0, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(m, masks.create_mask(masks.causal_lower_right(2, 4), None, None, 2, 4))
    assert masks.cache_causal_mask(1, 5) is None  # one new query sees every key
    pad = torch.tensor([True, True, False, True])
    assert masks.cache_causal_mask(2, 4, pad)[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 1]]
    additive = torch.zeros(2, 4)
    got = masks.cache_causal_mask(2, 4, additive)[0, 0]
    assert got.dtype == torch.float32 and torch.isneginf(got).tolist() == [[False] * 3 + [True], [False] * 4]
