"""Every exact variant accepts what torch's SDPA accepts, and returns what it returns.

One grid: variants x calls. Each call is something
``torch.nn.functional.scaled_dot_product_attention`` accepts (rank 2 to 5, batch
dimensions that broadcast, one key/value head for many query heads, GQA with key
and value head counts of their own, zero sizes, ``scale`` negative / zero / a 0-d
tensor, ``CausalBias`` masks, masks that broadcast); the output and the gradients of
q, k, v must equal PyTorch's, and the float64 oracle ``attention_ref``.

Ported upstream tests are credited where they appear: PyTorch's
test/test_transformers.py (negative scale, is_causal with a mask, CausalBias upper
left == is_causal) and flash-attention's tests/test_flash_attn.py (the
low-precision rule: at most 2x PyTorch's error).

The Triton kernel runs in its interpreter on a CPU: every call here is tiny.
"""

import importlib.util
import os
import sys
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    # before anything imports triton (torch.nn.attention.bias does; see test_triton_flash.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right, causal_upper_left  # noqa: E402

from attention_lib import (  # noqa: E402
    attention_ref,
    attention_weights,
    chunked_attention,
    flash_attention,
    masks,
    scaled_dot_product_attention,
    sliding_window_attention,
    triton_flash_attention,
)
from helpers import make_qkv, max_err  # noqa: E402
from test_errors import CASES as REJECTED  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# torch warns that a lower-right CausalBias with L > S gives NaN; its math path (and
# every variant here) gives 0 for those rows
pytestmark = pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs:UserWarning")


def _triton_reason() -> str | None:
    """Why the Triton kernel cannot run in this process, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    tr = sys.modules.get("triton")
    if DEVICE == "cpu" and tr is not None and isinstance(tr.language.zeros, tr.runtime.jit.JITFunction):
        return "triton was imported before TRITON_INTERPRET=1 was set (run this file alone)"
    return None


# The exact variants, with tiles small enough that every call crosses several.
# sliding_window: a window wider than every sequence here is full attention.
VARIANTS = {
    "sdpa": scaled_dot_product_attention,
    "chunked": partial(chunked_attention, q_chunk=2, kv_chunk=3),
    "flash": partial(flash_attention, block_q=2, block_k=3),
    "triton": triton_flash_attention,
    "sliding_window": partial(sliding_window_attention, window=128, block_q=4),
}
DEFAULT_TILES = {"chunked": chunked_attention, "flash": flash_attention}
VARIANT_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(name == "triton" and _triton_reason() is not None,
                                                 reason=str(_triton_reason())))
    for name in VARIANTS
]

r = torch.randn


def _seeded(fn):
    def make():
        torch.manual_seed(0)
        return fn()
    return make


# name -> () -> (query, key, value, kwargs): calls PyTorch's SDPA accepts.
CALLS = {
    "rank 2 (L, E)": lambda: (r(5, 8), r(6, 8), r(6, 8), {}),
    "rank 3 (H, L, E)": lambda: (r(3, 5, 8), r(3, 6, 8), r(3, 6, 8), {}),
    "rank 5, batch dims broadcast": lambda: (r(2, 3, 2, 5, 8), r(1, 3, 1, 6, 8), r(1, 3, 1, 6, 8), {}),
    "key/value batch 1, query batch 2": lambda: (r(2, 2, 5, 8), r(1, 2, 6, 8), r(1, 2, 6, 8), {}),
    "query batch 1, key/value batch 2": lambda: (r(1, 2, 5, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), {}),
    "key batch 1, value batch 2": lambda: (r(2, 2, 5, 8), r(1, 2, 6, 8), r(2, 2, 6, 8), {}),
    "query rank 3, key/value rank 4": lambda: (r(2, 5, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), {}),
    "one kv head, no enable_gqa": lambda: (r(2, 4, 5, 8), r(2, 1, 6, 8), r(2, 1, 6, 8), {}),
    "one query head, 4 kv heads": lambda: (r(2, 1, 5, 8), r(2, 4, 6, 8), r(2, 4, 6, 8), {}),
    "gqa": lambda: (r(2, 4, 5, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), dict(enable_gqa=True)),
    "gqa, key 2 heads, value 4": lambda: (r(1, 4, 5, 8), r(1, 2, 6, 8), r(1, 4, 6, 8), dict(enable_gqa=True)),
    "gqa, rank 3": lambda: (r(4, 5, 8), r(2, 6, 8), r(2, 6, 8), dict(enable_gqa=True)),
    "is_causal, L < S": lambda: (r(2, 2, 4, 8), r(2, 2, 7, 8), r(2, 2, 7, 8), dict(is_causal=True)),
    "is_causal, L > S": lambda: (r(2, 2, 7, 8), r(2, 2, 4, 8), r(2, 2, 4, 8), dict(is_causal=True)),
    "B = 0": lambda: (r(0, 2, 5, 8), r(0, 2, 6, 8), r(0, 2, 6, 8), {}),
    "H = 0": lambda: (r(2, 0, 5, 8), r(2, 0, 6, 8), r(2, 0, 6, 8), {}),
    "L = 0": lambda: (r(2, 2, 0, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), {}),
    "S = 0 (no keys: zeros)": lambda: (r(2, 2, 5, 8), r(2, 2, 0, 8), r(2, 2, 0, 8), {}),
    "E = 0 (uniform weights)": lambda: (r(2, 2, 5, 0), r(2, 2, 6, 0), r(2, 2, 6, 8), {}),
    "E = 0, causal": lambda: (r(2, 2, 5, 0), r(2, 2, 6, 0), r(2, 2, 6, 8), dict(is_causal=True)),
    "Ev = 0": lambda: (r(2, 2, 5, 8), r(2, 2, 6, 8), r(2, 2, 6, 0), {}),
    "scale negative": lambda: (r(1, 2, 5, 8), r(1, 2, 6, 8), r(1, 2, 6, 8), dict(scale=-0.5)),
    "scale 0": lambda: (r(1, 2, 5, 8), r(1, 2, 6, 8), r(1, 2, 6, 8), dict(scale=0.0)),
    "scale 0-d tensor": lambda: (r(1, 2, 5, 8), r(1, 2, 6, 8), r(1, 2, 6, 8), dict(scale=torch.tensor(0.7))),
    "scale int": lambda: (r(1, 2, 5, 8), r(1, 2, 6, 8), r(1, 2, 6, 8), dict(scale=1)),
    "CausalBias upper left, L > S": lambda: (r(1, 2, 5, 8), r(1, 2, 3, 8), r(1, 2, 3, 8), dict(attn_mask=causal_upper_left(5, 3))),
    "CausalBias lower right, L > S": lambda: (r(1, 2, 5, 8), r(1, 2, 3, 8), r(1, 2, 3, 8), dict(attn_mask=causal_lower_right(5, 3))),
    "CausalBias lower right, L < S": lambda: (r(1, 2, 3, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), dict(attn_mask=causal_lower_right(3, 7))),
    "CausalBias lower right, rank 3": lambda: (r(2, 4, 8), r(2, 6, 8), r(2, 6, 8), dict(attn_mask=causal_lower_right(4, 6))),
    "bool mask, rank 3": lambda: (r(2, 5, 8), r(2, 3, 8), r(2, 3, 8), dict(attn_mask=r(2, 5, 3) > 0)),
    "bool mask, batch broadcast": lambda: (r(2, 2, 5, 8), r(1, 2, 3, 8), r(1, 2, 3, 8), dict(attn_mask=r(2, 1, 5, 3) > 0)),
    "bool mask, rank 5": lambda: (r(2, 3, 2, 5, 8), r(2, 3, 2, 3, 8), r(2, 3, 2, 3, 8), dict(attn_mask=r(2, 1, 2, 5, 3) > 0)),
    "float mask, one row all -inf": lambda: (r(1, 2, 5, 8), r(1, 2, 3, 8), r(1, 2, 3, 8),
                                             dict(attn_mask=r(5, 3).index_fill(0, torch.tensor([1]), float("-inf")))),
}
CALLS = {name: _seeded(fn) for name, fn in CALLS.items()}


def run_with_grads(fn, q, k, v, kwargs):
    """``fn(q, k, v, **kwargs)`` and the gradients of q, k, v for a fixed random dO."""
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*ins, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).to(out.device)
    return out, torch.autograd.grad(out, ins, dout)


def _on(device, q, k, v, kwargs):
    kw = {n: (x.to(device) if type(x) is torch.Tensor and x.dim() else x) for n, x in kwargs.items()}
    return q.to(device), k.to(device), v.to(device), kw


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_same_result_as_torch(variant, call):
    q, k, v, kw = _on(DEVICE, *CALLS[call]())
    with sdpa_kernel([SDPBackend.MATH]):  # PyTorch's reference path, on any device
        want, want_grads = run_with_grads(F.scaled_dot_product_attention, q, k, v, kw)
    got, grads = run_with_grads(VARIANTS[variant], q, k, v, kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    ref = attention_ref(q.double(), k.double(), v.double(), **kw)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=2e-5)
    for name, g, wg in zip("qkv", grads, want_grads):
        assert g.shape == wg.shape, f"d{name}"
        torch.testing.assert_close(g, wg, rtol=1e-4, atol=5e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case_id,override,pattern", REJECTED, ids=[c[0] for c in REJECTED])
def test_what_we_reject_pytorch_rejects(case_id, override, pattern):
    """test_errors.py's table: each input raises in PyTorch's math path too.

    One deliberate difference: PyTorch accepts a NaN or infinite scale (and returns
    NaN or garbage); here it is a ValueError.
    """
    kwargs = dict(query=r(2, 4, 5, 8), key=r(2, 4, 6, 8), value=r(2, 4, 6, 8))
    kwargs.update(override)
    if case_id in ("scale nan", "scale inf"):
        pytest.skip("PyTorch accepts a non-finite scale; we reject it on purpose")
    rejected = []
    for backends in (None, [SDPBackend.MATH]):  # the default dispatch, and the math path
        try:
            if backends is None:
                F.scaled_dot_product_attention(**kwargs)
            else:
                with sdpa_kernel(backends):
                    F.scaled_dot_product_attention(**kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            rejected.append(e)
    # (the default CPU dispatch misses some: is_causal with a mask, key and value of
    # different lengths; its math path misses a negative dropout_p)
    assert rejected, "PyTorch accepts this input"


SOME_REJECTED = [c for c in REJECTED if c[0] in (
    "query rank 1", "integer query", "batch mismatch", "key/value length mismatch", "heads differ without gqa",
    "mask wrong shape", "half mask, float query", "CausalBias of other lengths", "scale 1-d tensor", "dropout above 1",
)]


@pytest.mark.parametrize("case_id,override,pattern", SOME_REJECTED, ids=[c[0] for c in SOME_REJECTED])
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_every_variant_rejects_with_the_same_message(variant, case_id, override, pattern):
    kwargs = dict(query=r(2, 4, 5, 8), key=r(2, 4, 6, 8), value=r(2, 4, 6, 8))
    kwargs.update(override)
    with pytest.raises(ValueError, match=pattern):
        VARIANTS[variant](**kwargs)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_dropout_one_drops_everything_or_is_refused(variant):
    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 2, 5, 6, 8))
    if variant in ("sdpa", "sliding_window"):  # the two with attention dropout
        out, grads = run_with_grads(VARIANTS[variant], q, k, v, dict(dropout_p=1.0))
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
        assert torch.equal(out, torch.zeros_like(out))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    else:
        with pytest.raises(ValueError, match="dropout"):
            VARIANTS[variant](q, k, v, dropout_p=1.0)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_negative_scale(variant):
    """Ported from PyTorch's test/test_transformers.py,
    test_scaled_dot_product_attention_math_with_negative_scale (issue 105190); smaller."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16, device=DEVICE)
    v1 = torch.matmul(x, x.transpose(-1, -2))
    want = torch.matmul((v1 / -0.0001).softmax(dim=-1), x)
    torch.testing.assert_close(VARIANTS[variant](x, x, x, scale=-1.0 / 0.0001), want)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_causal_upper_left_is_is_causal(variant):
    """After PyTorch's test/test_transformers.py TestAttnMasks.test_is_causal_equals_upper_left."""
    q, k, v = (t.to(DEVICE) for t in make_qkv(2, 2, 7, 11, 16))
    f = VARIANTS[variant]
    want = f(q, k, v, is_causal=True)
    torch.testing.assert_close(f(q, k, v, attn_mask=causal_upper_left(7, 11)), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="CausalBias"):  # TestAttnMasks.test_is_causal_and_mask_fails
        f(q, k, v, attn_mask=causal_upper_left(7, 11), is_causal=True)


def test_attention_weights_accept_the_same_inputs():
    torch.manual_seed(0)
    q, k = r(2, 4, 5, 0), r(1, 1, 6, 0)  # E = 0, broadcast batch and head
    w = attention_weights(q, k, is_causal=True)
    assert w.shape == (2, 4, 5, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    q, k = r(3, 5, 8), r(3, 6, 8)
    lr = causal_lower_right(5, 6)
    torch.testing.assert_close(attention_weights(q, k, attn_mask=lr), attention_weights(q, k, attn_mask=lr._materialize()))


# ----------------------------------------------------------------------------------
# Low precision: computed in float32, as PyTorch's math path does on CPU
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_float16_scores_that_overflow_float16(variant):
    """q·k = 256 · 256 · 80 overflows float16 (max 65504): the scores must not be float16."""
    x = torch.full((1, 32, 23, 80), 256.0, dtype=torch.float16, device=DEVICE)
    # default tiles: with scores of 6e5 the float32 log-sum-exp that merges tiles keeps
    # only ~0.06 of absolute precision (as in FlashAttention), so tiny tiles would blur
    out = DEFAULT_TILES.get(variant, VARIANTS[variant])(x, x, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(x, x, x))
    assert torch.isfinite(attention_weights(x, x)).all()


def _grad_errors(fn, q, k, v, kwargs):
    ref_out, ref_grads = run_with_grads(attention_ref, q.double(), k.double(), v.double(), kwargs)
    out, grads = run_with_grads(fn, q, k, v, kwargs)
    return [max_err(out, ref_out)] + [max_err(g, rg) for g, rg in zip(grads, ref_grads)]


BF16_CALLS = {
    # the failing Triton case: dQ error 0.0186 against 0.0156 allowed
    "Lq=79 Lk=3 D=40 bottom-right causal": lambda B, H: (
        *make_qkv(B, H, 79, 3, 40, dtype=torch.bfloat16, seed=1),
        dict(attn_mask=masks.create_mask(masks.causal_lower_right(79, 3), B, None, 79, 3)),
    ),
    "causal D=72": lambda B, H: (*make_qkv(B, H, 33, 33, 72, dtype=torch.bfloat16, seed=0), dict(is_causal=True)),
}


@pytest.mark.parametrize("call", list(BF16_CALLS))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_bfloat16_error_at_most_twice_pytorchs(variant, call):
    """flash-attention's rule (tests/test_flash_attn.py): each error against the float64
    oracle is at most twice PyTorch's own bfloat16 error (plus float32 rounding)."""
    q, k, v, kw = _on(DEVICE, *BF16_CALLS[call](1, 1))
    with sdpa_kernel([SDPBackend.MATH]):
        torch_errs = _grad_errors(F.scaled_dot_product_attention, q, k, v, kw)
    errs = _grad_errors(VARIANTS[variant], q, k, v, kw)
    for name, e, te in zip(["out", "dq", "dk", "dv"], errs, torch_errs):
        assert e <= 2 * te + 1e-5, f"{name}: error {e:.4g} > 2 x PyTorch's {te:.4g}"


# ----------------------------------------------------------------------------------
# The big grid: every call in every low-precision dtype
# ----------------------------------------------------------------------------------


def naive_same_dtype(q, k, v, **kwargs):
    """SDPA's math computed in the inputs' own dtype, without upcasting: flash-attention's
    ``attention_ref(..., upcast=False)``, the baseline of its rule."""
    from attention_lib._checks import sdpa_inputs
    from attention_lib.attention import _sdpa_core

    return sdpa_inputs(q, k, v, **kwargs).run(_sdpa_core, dtype=q.dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_slow_low_precision_grid(variant, call, dtype):
    """Every call in float16 and bfloat16. The variants that compute in float32 are
    held to 2x PyTorch's error (PyTorch's CPU math path upcasts too). The Triton
    kernel multiplies float16/bfloat16 tiles (P and dS are rounded before tl.dot, as
    in FlashAttention), so it is held to flash-attention's own rule: 2x the error of
    the same math in the inputs' dtype."""
    q, k, v, kw = _on(DEVICE, *CALLS[call]())
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if variant == "triton":
        base_errs = _grad_errors(naive_same_dtype, q, k, v, kw)
    else:
        with sdpa_kernel([SDPBackend.MATH]):
            base_errs = _grad_errors(F.scaled_dot_product_attention, q, k, v, kw)
    errs = _grad_errors(VARIANTS[variant], q, k, v, kw)
    floor = 1e-3 if dtype == torch.float16 else 8e-3  # one rounding of a value near 1
    for name, e, be in zip(["out", "dq", "dk", "dv"], errs, base_errs):
        assert e <= 2 * be + floor, f"{name}: error {e:.4g} > 2 x the baseline's {be:.4g} + {floor}"


# ----------------------------------------------------------------------------------
# One signature
# ----------------------------------------------------------------------------------

SDPA_SIGNATURE = [("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False)]


def _all_variants():
    import attention_lib
    from attention_lib import flex
    from attention_lib.ring import ring_attention

    return {
        "scaled_dot_product_attention": attention_lib.scaled_dot_product_attention,
        "attention_ref": attention_ref,
        "chunked_attention": chunked_attention,
        "flash_attention": flash_attention,
        "triton_flash_attention": triton_flash_attention,
        "sliding_window_attention": sliding_window_attention,
        "linear_attention": attention_lib.linear_attention,
        "flex_attention": flex.flex_attention,
        "ring_attention": ring_attention,
    }


@pytest.mark.parametrize("name", list(_all_variants()))
def test_every_variant_has_sdpas_signature(name):
    """SDPA's arguments first, in its order, with its defaults; own knobs keyword-only,
    so any variant can replace F.scaled_dot_product_attention without an adapter."""
    import inspect

    params = list(inspect.signature(_all_variants()[name]).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert len(positional) == 8, [p.name for p in positional]
    assert [(p.name, p.default) for p in positional[3:]] == SDPA_SIGNATURE
    assert all(p.default is inspect.Parameter.empty for p in positional[:3])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[8:])
