"""triton_flash_attention compiled for a GPU, forward and backward, against the oracle.

The same kernels as ``tests/test_triton_flash.py``, which runs them in Triton's
interpreter at small sizes; here they are compiled natively, at GPU sizes, over the
grid that breaks attention kernels (after flash-attention's ``tests/test_flash_attn.py``):
dtype (fp16, bf16, fp32), head dim (16, 64, 80, 128), lengths (odd, ``Lq != Lk``,
several tiles, 1k and 8k), causal or not, bool and additive masks, GQA ratios, and
every autotuning configuration of each of the three kernels.

Every test carries the ``cuda`` marker and is skipped without a GPU; ``scripts/gpu_run.sh``
runs this file on a lent GPU (``pytest -m cuda tests/test_triton_cuda.py``). Nothing
here imports triton at collection, so on a CPU it never fixes triton's mode for the
interpreter tests that run in the same session.

Autotuning every shape would take minutes, so each test pins every kernel to one
configuration taken from ``gpu_configs`` (``TEST_CONFIG``); ``test_every_configuration``
runs each configuration of each kernel once. The tolerance is the project's rule
(``helpers.assert_matches_ref``): at most twice the naive implementation's error in the
same dtype, plus a floor, checked as ``helpers.assert_matches_ref`` does, with every
tensor on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from attention_lib import attention_ref, scaled_dot_product_attention
from helpers import FLOOR, dense_mask, make_qkv, max_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in scripts/gpu_run.sh)"),
]

KERNELS = ("fwd", "dkdv", "dq")
# One configuration per kernel for the grid tests (tile sizes small enough that the
# test lengths span several tiles): (BLOCK_M, BLOCK_N, num_warps, num_stages).
TEST_CONFIG = {"fwd": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
# The sizes of gpu_configs(kind), as they are today (collection cannot import triton).
N_CONFIGS = {"fwd": 24, "dkdv": 10, "dq": 10}
_AUTOTUNER = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}


def _tf():
    from attention_lib import triton_flash

    return triton_flash


def _config(kind, blocks):
    import triton

    bm, bn, w, s = blocks
    cfg = [c for c in _tf().gpu_configs(kind)
           if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == (bm, bn, w, s)]
    assert cfg, f"{kind}: {blocks} is not among gpu_configs({kind!r})"
    return triton.Config(dict(cfg[0].kwargs), num_warps=w, num_stages=s)


def _pin(monkeypatch, **overrides):
    """Pin each kernel's autotuner to one configuration (no benchmarking: one config runs as is)."""
    tf = _tf()
    assert not tf.INTERPRET, "these tests compile for the GPU; TRITON_INTERPRET is set in this process"
    for kind in KERNELS:
        cfg = overrides.get(kind) or _config(kind, TEST_CONFIG[kind])
        monkeypatch.setattr(getattr(tf, _AUTOTUNER[kind]), "configs", [cfg])


@pytest.fixture
def pinned(monkeypatch):
    _pin(monkeypatch)


def assert_matches_ref(f, q, k, v, **kwargs):
    """``helpers.assert_matches_ref`` on the GPU: output and gradients vs the float64 oracle.

    Error of ``f`` at most ``2 * err(naive, same dtype) + floor`` (twice the floor for
    gradients); no NaN or inf.
    """
    floor = FLOOR[q.dtype]
    g = torch.Generator(device=q.device).manual_seed(1)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=g, device=q.device)  # (B, Hq, Lq, Dv)

    def run(fun, inputs):
        ins = [t.detach().clone().requires_grad_() for t in inputs]
        kw = dict(kwargs)
        mask = kw.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kw["attn_mask"] = mask.to(ins[0].dtype)
        out = fun(*ins, **kw)
        return out, torch.autograd.grad(out, ins, dout.to(out.dtype))

    ref_out, ref_grads = run(attention_ref, [t.double() for t in (q, k, v)])
    base_out, base_grads = run(scaled_dot_product_attention, (q, k, v))
    out, grads = run(f, (q, k, v))
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "output has NaN or inf"
    err, base = max_err(out, ref_out), max_err(base_out, ref_out)
    assert err <= 2 * base + floor, f"output error {err:.3g} > 2 x naive {base:.3g} + {floor:g}"
    for name, gr, bg, rg in zip("qkv", grads, base_grads, ref_grads):
        assert torch.isfinite(gr).all(), f"d{name} has NaN or inf"
        err, base = max_err(gr, rg), max_err(bg, rg)
        assert err <= 2 * base + 2 * floor, f"d{name} error {err:.3g} > 2 x naive {base:.3g} + {2 * floor:g}"


def qkv(*args, **kwargs):
    return tuple(t.cuda() for t in make_qkv(*args, **kwargs))


def fn(*args, **kwargs):
    from attention_lib import triton_flash_attention

    return triton_flash_attention(*args, **kwargs)


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LENGTHS = [(97, 129), (129, 97), (256, 256), (1024, 1024)]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid(pinned, dtype, D, Lq, Lk, is_causal):
    q, k, v = qkv(2, 3, Lq, Lk, D, dtype=dtype, seed=Lq + D)
    assert_matches_ref(fn, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("Lq,Lk", [(97, 129), (256, 256)])
@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("mask_name", ["padding", "prefix_lm", "sliding_window", "causal_lower_right"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_masks(pinned, dtype, mask_name, additive, Lq, Lk):
    q, k, v = qkv(2, 2, Lq, Lk, 64, dtype=dtype)
    mask = dense_mask(mask_name, 2, Lq, Lk).cuda()  # (B, 1, Lq, Lk), bool
    if additive:  # a float mask in the inputs' dtype: 0 where allowed, -inf elsewhere, plus a bias
        bias = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)).cuda()
        mask = torch.where(mask, bias, float("-inf")).to(dtype)
    assert_matches_ref(fn, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1), (6, 3)])
def test_gqa(pinned, Hq, Hkv, D, is_causal):
    q, k, v = qkv(2, Hq, 200, 333, D, Hkv=Hkv, dtype=torch.bfloat16)
    assert_matches_ref(fn, q, k, v, is_causal=is_causal, enable_gqa=True)


@pytest.mark.parametrize("index", [f"{kind}-{i}" for kind in KERNELS for i in range(N_CONFIGS[kind])])
def test_every_configuration(monkeypatch, index):
    """Each autotuning configuration of each kernel computes the same function."""
    kind, i = index.split("-")
    configs = _tf().gpu_configs(kind)
    assert len(configs) == N_CONFIGS[kind], "update N_CONFIGS to the size of gpu_configs"
    _pin(monkeypatch, **{kind: configs[int(i)]})
    q, k, v = qkv(1, 4, 300, 300, 128, dtype=torch.bfloat16, seed=int(i))
    assert_matches_ref(fn, q, k, v, is_causal=True)
    q, k, v = qkv(1, 2, 173, 300, 64, dtype=torch.bfloat16, seed=int(i) + 1)
    assert_matches_ref(fn, q, k, v)


def test_long_sequence(pinned):
    """8k tokens: 64-bit offsets, many tiles, causal skipping at length."""
    q, k, v = qkv(1, 2, 8192, 8192, 128, dtype=torch.bfloat16)
    assert_matches_ref(fn, q, k, v, is_causal=True)


def test_non_contiguous_and_scale(pinned):
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(2, 4, 130, 130, 64, dtype=torch.float16))
    assert not q.is_contiguous()
    assert_matches_ref(fn, q, k, v, is_causal=True, scale=0.3)


def test_fully_masked_rows_are_zero(pinned):
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 70, 90, 64, dtype=torch.bfloat16))
    mask = torch.ones(2, 1, 70, 90, dtype=torch.bool, device="cuda")
    mask[0, :, 5] = False
    mask[1] = False
    out = fn(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, 5], torch.zeros_like(out[0, :, 5]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_output_is_written_everywhere(pinned):
    """No element of the output is left as whatever memory held before (METHOD.md: poison first)."""
    q, k, v = qkv(1, 2, 333, 333, 128, dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    poison = torch.full((1 << 24,), float("nan"), device="cuda")  # the allocator's next blocks hold NaN
    del poison
    out = fn(q, k, v)
    assert torch.isfinite(out).all()
