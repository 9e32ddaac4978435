"""Bad input gets a clear ValueError that names the argument and the shapes seen."""

import pytest
import torch

from attention_lib import MultiHeadAttention, attention_weights, masks, scaled_dot_product_attention

f32 = lambda *s: torch.randn(*s)
Q, K, V = f32(2, 4, 5, 8), f32(2, 4, 6, 8), f32(2, 4, 6, 8)

# (id, kwargs for scaled_dot_product_attention, regex the message must match)
CASES = [
    ("query rank 3", dict(query=f32(4, 5, 8)), r"query must have rank 4.*\(4, 5, 8\)"),
    ("key rank 5", dict(key=f32(1, 2, 4, 6, 8)), r"key must have rank 4.*\(1, 2, 4, 6, 8\)"),
    ("value rank 2", dict(value=f32(6, 8)), r"value must have rank 4.*\(6, 8\)"),
    ("query not a tensor", dict(query=[[1.0]]), r"query must be a torch.Tensor"),
    ("integer query", dict(query=torch.ones(2, 4, 5, 8, dtype=torch.int64)), r"query must be a floating-point.*int64"),
    ("E mismatch", dict(key=f32(2, 4, 6, 16), value=f32(2, 4, 6, 16)), r"same head dim E.*\(2, 4, 5, 8\).*\(2, 4, 6, 16\)"),
    ("batch mismatch", dict(key=f32(3, 4, 6, 8), value=f32(3, 4, 6, 8)), r"batch size mismatch.*\(3, 4, 6, 8\)"),
    ("key/value length mismatch", dict(value=f32(2, 4, 7, 8)), r"key and value must agree.*\(2, 4, 6, 8\).*\(2, 4, 7, 8\)"),
    ("key/value heads mismatch", dict(value=f32(2, 2, 6, 8)), r"key and value must agree"),
    ("heads differ without gqa", dict(key=f32(2, 2, 6, 8), value=f32(2, 2, 6, 8)), r"enable_gqa=True.*query \(2, 4, 5, 8\)"),
    ("heads not divisible", dict(key=f32(2, 3, 6, 8), value=f32(2, 3, 6, 8), enable_gqa=True), r"query heads \(4\) must be divisible.*heads \(3\)"),
    ("dtype mix", dict(key=K.double()), r"one dtype.*float32.*float64"),
    ("dtype mix half", dict(value=V.half()), r"one dtype.*float16"),
    ("device mix", dict(key=K.to("meta")), r"one device.*meta"),
    ("mask wrong shape", dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), r"attn_mask of shape \(5, 5\).*\(2, 4, 5, 6\)"),
    ("mask too many dims", dict(attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)), r"attn_mask of shape \(1, 2, 4, 5, 6\)"),
    ("mask int dtype", dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), r"attn_mask must be bool.*int32.*\(5, 6\)"),
    ("float mask dtype", dict(attn_mask=torch.zeros(5, 6, dtype=torch.float64)), r"float attn_mask.*float32.*float64"),
    ("mask not a tensor", dict(attn_mask=[[True]]), r"attn_mask must be a torch.Tensor"),
    ("mask and is_causal", dict(attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True), r"either attn_mask or is_causal"),
    ("scale zero", dict(scale=0.0), r"scale must be > 0, got 0.0"),
    ("scale negative", dict(scale=-0.5), r"scale must be > 0, got -0.5"),
    ("scale nan", dict(scale=float("nan")), r"scale must be a finite"),
    ("scale string", dict(scale="1"), r"scale must be a finite"),
    ("dropout 1", dict(dropout_p=1.0), r"dropout_p must be a float in \[0, 1\), got 1.0"),
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
    with pytest.raises(ValueError, match="scale must be > 0"):
        attention_weights(Q, K, scale=-1.0)
