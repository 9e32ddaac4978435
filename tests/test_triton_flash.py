"""triton_flash_attention against the oracle: outputs and gradients.

On a machine without a GPU the kernels run in Triton's interpreter, which is slow,
so the default grid uses small sizes; a larger grid is marked ``slow``. With a GPU
the same tests run natively.

Triton reads ``TRITON_INTERPRET`` when ``import triton`` runs (its own ``tl.zeros``,
``tl.max``... are ``@triton.jit`` functions), so this module sets it at collection,
before anything in the test session is likely to import triton.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

from attention_lib import attention_ref, triton_flash_attention  # noqa: E402
from helpers import MASKS, assert_matches_ref, dense_mask, make_qkv  # noqa: E402

if DEVICE == "cpu" and isinstance(triton.language.zeros, triton.runtime.jit.JITFunction):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run "
        "in this process; run this file alone, or set TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )


def qkv(*args, **kwargs):
    return tuple(t.to(DEVICE) for t in make_qkv(*args, **kwargs))


# (Lq, Lk): a single token, odd lengths, Lq > Lk and Lq < Lk, several blocks of 16
LENGTHS = [(1, 1), (37, 45), (97, 33), (17, 70)]


@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_the_oracle(Lq, Lk, is_causal, dtype):
    q, k, v = qkv(2, 2, Lq, Lk, 16, dtype=dtype)
    assert_matches_ref(triton_flash_attention, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("D,Dv", [(64, 64), (80, 80), (128, 128), (32, 48)])
def test_head_dims(D, Dv):
    """Head dims are padded to a power of two inside the kernel; Ev may differ from E."""
    q, k, v = qkv(1, 2, 19, 21, D, Dv=Dv)
    assert_matches_ref(triton_flash_attention, q, k, v, is_causal=D == 64)


def test_float16():
    q, k, v = qkv(2, 2, 29, 23, 32, dtype=torch.float16)
    assert_matches_ref(triton_flash_attention, q, k, v, is_causal=True)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(Hq, Hkv, is_causal):
    q, k, v = qkv(2, Hq, 21, 19, 16, Hkv=Hkv)
    assert_matches_ref(triton_flash_attention, q, k, v, is_causal=is_causal, enable_gqa=True)


@pytest.mark.parametrize("mask_name", [m for m in MASKS if m != "none"])
def test_every_mask(mask_name):
    """Dense bool masks, loaded tile by tile with broadcast strides (here (B, 1, Lq, Lk))."""
    q, k, v = qkv(3, 2, 19, 23, 16)
    mask = dense_mask(mask_name, 3, 19, 23).to(DEVICE)
    assert_matches_ref(triton_flash_attention, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("shape", [(23,), (19, 23), (1, 2, 19, 23), (3, 2, 19, 23)])
def test_additive_float_masks_broadcast(shape):
    q, k, v = qkv(3, 2, 19, 23, 16)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.3, float("-inf"))
    assert_matches_ref(triton_flash_attention, q, k, v, attn_mask=bias.to(DEVICE))


def test_fully_masked_rows_give_zero_output_and_gradient():
    q, k, v = qkv(2, 2, 21, 18, 16, requires_grad=True)
    mask = torch.ones(2, 1, 21, 18, dtype=torch.bool, device=DEVICE)
    mask[0, :, 3] = False  # query 3 of batch 0 sees nothing
    mask[1] = False  # batch 1 sees nothing at all
    out = triton_flash_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, :, 3], torch.zeros_like(q.grad[0, :, 3]))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
    assert_matches_ref(triton_flash_attention, q, k, v, attn_mask=mask)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the poisoned rows
def test_causal_block_skipping_never_reads_keys_past_the_diagonal():
    """Poison keys/values from position 128 on (128 = the largest BLOCK_M of any config).

    Dense masking multiplies the masked NaNs by 0 and gets NaN everywhere; the kernel
    never loads those key blocks for queries < 128, so their rows stay exact.
    """
    L = 160
    q, k, v = qkv(1, 1, L, L, 16, requires_grad=True)
    k.data[:, :, 128:] = float("nan")
    v.data[:, :, 128:] = float("nan")
    out = triton_flash_attention(q, k, v, is_causal=True)
    assert torch.isnan(attention_ref(q, k, v, is_causal=True)[:, :, :128]).all()  # the dense way
    ref = attention_ref(q[:, :, :128], k[:, :, :128], v[:, :, :128], is_causal=True)
    torch.testing.assert_close(out[:, :, :128], ref)
    out[:, :, :128].sum().backward()
    assert torch.isfinite(q.grad[:, :, :128]).all()


def with_blocks(monkeypatch, bm_fwd, bn_fwd, bm_dkdv, bn_dkdv):
    """Pin the kernels to one tile shape (what autotune would pick on a GPU)."""
    from attention_lib import triton_flash as tf

    def cfg(bm, bn):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=2)]

    monkeypatch.setattr(tf._attn_fwd, "configs", cfg(bm_fwd, bn_fwd))
    monkeypatch.setattr(tf._attn_bwd_dq, "configs", cfg(bm_fwd, bn_fwd))
    monkeypatch.setattr(tf._attn_bwd_dkdv, "configs", cfg(bm_dkdv, bn_dkdv))


@pytest.mark.parametrize("blocks", [(128, 64, 32, 128), (64, 64, 64, 64)])
def test_gpu_sized_tiles(monkeypatch, blocks):
    """The loop bounds (causal skipping, masked/unmasked split) with the GPU's tile shapes."""
    with_blocks(monkeypatch, *blocks)
    q, k, v = qkv(1, 2, 150, 97, 16)
    assert_matches_ref(triton_flash_attention, q, k, v, is_causal=True)


def test_scale_and_non_contiguous_inputs():
    """A (B, L, H, D) tensor transposed to (B, H, L, D) is read through its strides."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, L, 3, 16, generator=g).to(DEVICE).transpose(1, 2) for L in (13, 17, 17))
    assert not q.is_contiguous()
    assert_matches_ref(triton_flash_attention, q, k, v, scale=0.3)


def test_gradient_of_a_broadcast_output_gradient():
    """out.sum().backward() hands backward a dO with zero strides."""
    q, k, v = qkv(1, 2, 9, 11, 16, requires_grad=True)
    triton_flash_attention(q, k, v, is_causal=True).sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_ref(q2, k2, v2, is_causal=True).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad.float())


@settings(max_examples=6, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.integers(1, 3),
    Lq=st.integers(1, 40), Lk=st.integers(1, 40), D=st.sampled_from([16, 24, 32]),
    mask_name=st.sampled_from(list(MASKS)), seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_masks(B, Hkv, rep, Lq, Lk, D, mask_name, seed):
    q, k, v = qkv(B, Hkv * rep, Lq, Lk, D, Hkv=Hkv, seed=seed)
    mask = dense_mask(mask_name, B, Lq, Lk)
    mask = None if mask is None else mask.to(DEVICE)
    assert_matches_ref(triton_flash_attention, q, k, v, attn_mask=mask, enable_gqa=True)


def test_errors_name_the_problem():
    q, k, v = qkv(1, 2, 5, 5, 16)
    with pytest.raises(ValueError, match="dropout"):
        triton_flash_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="head dims up to 128"):
        triton_flash_attention(*qkv(1, 1, 4, 4, 160))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        triton_flash_attention(*qkv(1, 1, 4, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="enable_gqa"):
        triton_flash_attention(*qkv(1, 4, 4, 4, 16, Hkv=2))
    bias = torch.zeros(5, 5, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="gradients for attn_mask"):
        triton_flash_attention(q, k, v, attn_mask=bias)


def test_empty_key_sequence_gives_zeros():
    q, k, v = qkv(1, 2, 4, 0, 16)
    out = triton_flash_attention(q, k, v)
    assert out.shape == (1, 2, 4, 16) and torch.equal(out, torch.zeros_like(out))


def test_importing_attention_lib_does_not_import_triton():
    """`import attention_lib` must work without triton; the wrapper then says what is missing."""
    code = (
        "import sys; import attention_lib; assert 'triton' not in sys.modules, 'triton imported'\n"
        "sys.modules['triton'] = None  # as if triton were not installed\n"
        "import torch\n"
        "try:\n"
        "    attention_lib.triton_flash_attention(*(torch.randn(1, 1, 4, 16),) * 3)\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("Lq,Lk", [(1, 7), (7, 1), (64, 64), (129, 97), (33, 129)])
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_slow_grid(Lq, Lk, D, is_causal, dtype):
    q, k, v = qkv(2, 2, Lq, Lk, D, dtype=dtype)
    assert_matches_ref(triton_flash_attention, q, k, v, is_causal=is_causal)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [(16, 16, 16, 16), (64, 32, 32, 64), (128, 128, 64, 128), (128, 32, 32, 64)])
@pytest.mark.parametrize("Lq,Lk", [(150, 97), (97, 150), (129, 129)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_slow_tile_shapes(monkeypatch, blocks, Lq, Lk, is_causal):
    with_blocks(monkeypatch, *blocks)
    q, k, v = qkv(1, 2, Lq, Lk, 16)
    assert_matches_ref(triton_flash_attention, q, k, v, is_causal=is_causal)
    mask = dense_mask("prefix_lm", 1, Lq, Lk).to(DEVICE)
    assert_matches_ref(triton_flash_attention, q, k, v, attn_mask=mask)


@pytest.mark.slow
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("Lq,Lk", [(7, 9), (9, 7), (40, 40)])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slow_masks_with_gqa(mask_name, Lq, Lk, gqa, dtype):
    q, k, v = qkv(3, 4, Lq, Lk, 16, Hkv=2 if gqa else 4, dtype=dtype)
    mask = dense_mask(mask_name, 3, Lq, Lk)
    mask = None if mask is None else mask.to(DEVICE)
    assert_matches_ref(triton_flash_attention, q, k, v, attn_mask=mask, enable_gqa=gqa)
