"""Bad input gets a clear ValueError that names the argument and the shapes seen."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # torch.nn.attention.bias imports triton: decide its mode first (see test_triton_flash.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.nn.attention.bias import causal_lower_right, causal_upper_left  # noqa: E402

from attention_lib import MultiHeadAttention, attention_weights, masks, scaled_dot_product_attention  # noqa: E402

f32 = lambda *s: torch.randn(*s)
Q, K, V = f32(2, 4, 5, 8), f32(2, 4, 6, 8), f32(2, 4, 6, 8)

# (id, kwargs for scaled_dot_product_attention, regex the message must match).
# Each is an input that torch.nn.functional.scaled_dot_product_attention rejects too
# (test_sdpa_parity.py checks that); what it accepts (rank 3, broadcast batch, one
# key/value head, zero sizes, scale <= 0, dropout_p=1) is tested there.
CASES = [
    ("query rank 1", dict(query=f32(8)), r"query must have rank >= 2.*\(8\)"),
    ("key rank 1", dict(key=f32(8)), r"key must have rank >= 2.*\(8\)"),
    ("query not a tensor", dict(query=[[1.0]]), r"query must be a torch.Tensor"),
    ("integer query", dict(query=torch.ones(2, 4, 5, 8, dtype=torch.int64)), r"query must be a floating-point.*int64"),
    ("E mismatch", dict(key=f32(2, 4, 6, 16), value=f32(2, 4, 6, 16)), r"same head dim E.*\(2, 4, 5, 8\).*\(2, 4, 6, 16\)"),
    ("batch mismatch", dict(key=f32(3, 4, 6, 8), value=f32(3, 4, 6, 8)), r"batch dimensions.*do not broadcast.*\(3, 4, 6, 8\)"),
    ("key/value length mismatch", dict(value=f32(2, 4, 7, 8)), r"key and value must agree in length.*\(2, 4, 6, 8\).*\(2, 4, 7, 8\)"),
    ("key/value heads mismatch", dict(value=f32(2, 2, 6, 8)), r"enable_gqa=True.*value \(2, 2, 6, 8\)"),
    ("heads differ without gqa", dict(key=f32(2, 2, 6, 8), value=f32(2, 2, 6, 8)), r"enable_gqa=True.*query \(2, 4, 5, 8\)"),
    ("heads not divisible", dict(key=f32(2, 3, 6, 8), value=f32(2, 3, 6, 8), enable_gqa=True), r"query heads \(4\) must be divisible.*key heads \(3\)"),
    ("fewer query heads with gqa", dict(query=f32(2, 1, 5, 8), enable_gqa=True), r"query heads \(1\) must be divisible.*key heads \(4\)"),
    ("gqa without a head dim", dict(query=f32(5, 8), key=f32(6, 8), value=f32(6, 8), enable_gqa=True), r"enable_gqa=True needs a head dimension"),
    ("dtype mix", dict(key=K.double()), r"one dtype.*float32.*float64"),
    ("dtype mix half", dict(value=V.half()), r"one dtype.*float16"),
    ("device mix", dict(key=K.to("meta")), r"one device.*meta"),
    ("mask wrong shape", dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), r"attn_mask of shape \(5, 5\).*\(2, 4, 5, 6\)"),
    ("mask too many dims", dict(attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)), r"attn_mask of shape \(1, 2, 4, 5, 6\)"),
    ("mask int dtype", dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), r"attn_mask must be bool.*int32.*\(5, 6\)"),
    ("float mask dtype", dict(attn_mask=torch.zeros(5, 6, dtype=torch.float64)), r"float attn_mask.*float32.*float64"),
    ("half mask, float query", dict(attn_mask=torch.zeros(5, 6, dtype=torch.float16)), r"float attn_mask.*float32.*float16"),
    ("mask not a tensor", dict(attn_mask=[[True]]), r"attn_mask must be a torch.Tensor"),
    ("mask and is_causal", dict(attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True), r"either attn_mask or is_causal"),
    ("CausalBias and is_causal", dict(attn_mask=causal_upper_left(5, 6), is_causal=True), r"CausalBias.*is_causal=False"),
    ("CausalBias of other lengths", dict(attn_mask=causal_lower_right(4, 6)), r"CausalBias for \(L, S\) = \(4, 6\).*\(5, 6\)"),
    ("scale nan", dict(scale=float("nan")), r"scale must be a finite"),
    ("scale inf", dict(scale=float("inf")), r"scale must be a finite"),
    ("scale string", dict(scale="1"), r"scale must be a finite"),
    ("scale 1-d tensor", dict(scale=torch.tensor([0.5])), r"scale must be a number, a 0-d.*\(1\)"),
    ("dropout above 1", dict(dropout_p=1.5), r"dropout_p must be a float in \[0, 1\], got 1.5"),
    ("dropout negative", dict(dropout_p=-0.1), r"dropout_p"),
]


@pytest.mark.parametrize("case_id,override,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case_id, override, pattern):
    kwargs = dict(query=Q, key=K, value=V)
    kwargs.update(override)
    with pytest.raises(ValueError, match=pattern):
        scaled_dot_product_attention(**kwargs)


def test_table_is_large_enough():
    assert len(CASES) + len(WINDOW_CASES) + len(MHA_CASES) >= 20


WINDOW_CASES = [1.5, "4", 0, -3, None, True]


@pytest.mark.parametrize("window", WINDOW_CASES)
def test_non_integer_window(window):
    with pytest.raises(ValueError, match=r"window must be"):
        masks.sliding_window(window)


MHA_CASES = [
    (dict(embed_dim=10, num_heads=3), r"embed_dim \(10\).*num_heads \(3\)"),
    (dict(embed_dim=8, num_heads=4, num_kv_heads=3), r"num_heads \(4\).*num_kv_heads \(3\)"),
    (dict(embed_dim=8, num_heads=0), r"embed_dim"),
]


@pytest.mark.parametrize("kwargs,pattern", MHA_CASES)
def test_mha_constructor_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MultiHeadAttention(**kwargs)


def test_mha_forward_errors():
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must be \(B, L, E=8\), got shape \(2, 5, 6\)"):
        mha(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"key and value.*\(3, 4, 8\)"):
        mha(torch.randn(2, 5, 8), torch.randn(3, 4, 8))


def test_attention_weights_checks_too():
    with pytest.raises(ValueError, match="scale must be a finite"):
        attention_weights(Q, K, scale=float("nan"))
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attention_weights(Q, f32(2, 2, 6, 8))
