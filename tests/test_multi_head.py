"""MultiHeadAttention: equality with torch.nn.MultiheadAttention, GQA/MQA, cross-attention."""

import pytest
import torch
from torch import nn

from attention_lib import MultiHeadAttention, attention_ref, masks, scaled_dot_product_attention


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch_multihead_attention(bias, is_causal):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, bias=bias, batch_first=True).double().eval()
    ours = MultiHeadAttention.from_torch(theirs).eval()
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    # torch's bool masks are the opposite convention: True = NOT allowed
    allowed = masks.create_mask(masks.causal, None, None, 10, 10)[0, 0]
    kw = dict(attn_mask=~allowed, is_causal=True) if is_causal else {}
    expected, _ = theirs(x, x, x, need_weights=False, **kw)
    got = ours(x, is_causal=is_causal)
    torch.testing.assert_close(got, expected)


def test_cross_attention_matches_torch():
    torch.manual_seed(1)
    theirs = nn.MultiheadAttention(16, 2, batch_first=True).double()
    ours = MultiHeadAttention.from_torch(theirs)
    x, mem = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x, mem), theirs(x, mem, mem, need_weights=False)[0])


def test_cross_attention_with_other_feature_sizes():
    mha = MultiHeadAttention(16, 4, kdim=6, vdim=10)
    out = mha(torch.randn(2, 5, 16), torch.randn(2, 9, 6), torch.randn(2, 9, 10))
    assert out.shape == (2, 5, 16)


@pytest.mark.parametrize("num_kv_heads", [8, 4, 2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(num_kv_heads):
    """GQA is MHA whose K/V projections repeat per group: build that MHA and compare."""
    torch.manual_seed(2)
    E, H = 64, 8
    gqa = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads).double()
    mha = MultiHeadAttention(E, H).double()
    hs, rep = E // H, H // num_kv_heads
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for src, dst in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            w = src.weight.view(num_kv_heads, hs, E).repeat_interleave(rep, 0).reshape(E, E)
            b = src.bias.view(num_kv_heads, hs).repeat_interleave(rep, 0).reshape(E)
            dst.weight.copy_(w)
            dst.bias.copy_(b)
    x = torch.randn(2, 7, E, dtype=torch.float64)
    torch.testing.assert_close(gqa(x, is_causal=True), mha(x, is_causal=True))
    kv_params = sum(p.numel() for p in gqa.k_proj.parameters())
    assert kv_params == E * num_kv_heads * hs + num_kv_heads * hs


def test_attn_fn_can_be_swapped():
    torch.manual_seed(3)
    a = MultiHeadAttention(16, 2, num_kv_heads=1).double()
    b = MultiHeadAttention(16, 2, num_kv_heads=1, attn_fn=attention_ref).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    c = MultiHeadAttention(16, 2, attn_fn=torch.nn.functional.scaled_dot_product_attention).double()
    c.load_state_dict(MultiHeadAttention(16, 2).double().state_dict())


def test_dropout_only_in_training():
    torch.manual_seed(4)
    mha = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 6, 16)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


def test_padding_mask_and_backward():
    mha = MultiHeadAttention(16, 4, num_kv_heads=2)
    x = torch.randn(2, 6, 16, requires_grad=True)
    mask = masks.create_mask(masks.padding(torch.tensor([6, 3])), 2, None, 6, 6)
    y = mha(x, attn_mask=mask)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # keys beyond each sequence's length get no gradient through attention
    assert torch.equal(x.grad[1, 3:] != 0, (x.grad[1, 3:] != 0))  # shape sanity
    y2 = mha(torch.cat([x[:, :3], torch.randn(2, 3, 16)], 1), attn_mask=mask)
    torch.testing.assert_close(y2[1, :3], y[1, :3])  # padded keys do not change batch 1


def test_chapter_6_imports_nothing_from_later_chapters():
    # STYLE.md point 7: multi_head (chapter 6) may accept a KVCache (chapter 11) but not import it
    import ast
    import inspect

    import attention_lib.multi_head

    tree = ast.parse(inspect.getsource(attention_lib.multi_head))
    runtime = [n for n in tree.body if isinstance(n, ast.ImportFrom)]  # `if TYPE_CHECKING:` is an ast.If
    imported = {n.module for n in runtime}
    assert "kv_cache" not in imported and imported >= {"masks", "attention"}, imported
