"""Public checks of assignment 4 (FlashAttention-2 in Triton), and the helpers its hidden tests share.

The error rule is the one of the library's tests (tests/test_sdpa_parity.py,
after flash-attention's): against the float64 oracle, the student's error is at
most twice the error of the naive implementation computed in the inputs' own
dtype, plus a floor. The shapes are tiny: in Triton's interpreter on a CPU each
check takes well under a second.
"""

from __future__ import annotations

import torch

from ..attention import attention_ref
from .public import public
from .testing import CheckFailure, call, expect_tensor, get_function, random_qkv

__all__ = ["FLOOR", "expect_rule", "naive_same_dtype", "ref_forward", "ref_backward", "rule_errors"]

A4 = "a4_flash_triton"

#: The absolute floor added to "2 x the naive error", per dtype (tests/helpers.py and test_sdpa_parity).
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def naive_same_dtype(q, k, v, is_causal=False, scale=None):
    """SDPA's math in the inputs' own dtype (no upcast): the baseline of the error rule."""
    from .._checks import sdpa_inputs
    from ..attention import _sdpa_core

    gqa = k.shape[1] != q.shape[1]
    return sdpa_inputs(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa).run(_sdpa_core, dtype=q.dtype)


def ref_forward(q, k, v, is_causal=False, scale=None):
    """float64 ``(o, lse)``: the oracle's output and the log-sum-exp of each row's scores."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    gqa = k.shape[1] != q.shape[1]
    o = attention_ref(q64, k64, v64, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    kk = k64.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, S, D)
    s = (q64 @ kk.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, Hq, L, S)
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return o, torch.logsumexp(s, dim=-1)  # (B, Hq, L, Dv), (B, Hq, L)


def _grads(fn, q, k, v, do, **kw):
    xs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*xs, **kw)
    return torch.autograd.grad(out, xs, do.to(out.dtype))


def ref_backward(q, k, v, do, is_causal=False, scale=None):
    """float64 ``(dq, dk, dv)`` of the oracle for the output gradient ``do``."""
    gqa = k.shape[1] != q.shape[1]
    return _grads(attention_ref, q.double(), k.double(), v.double(), do.double(),
                  is_causal=is_causal, scale=scale, enable_gqa=gqa)


def rule_errors(got, naive, ref):
    """Max absolute errors of ``got`` and of ``naive`` against ``ref`` (float64)."""
    err = lambda a: (a.detach().double() - ref.double()).abs().max().item() if a.numel() else 0.0  # noqa: E731
    return err(got), err(naive)


def expect_rule(got, naive, ref, what, dtype):
    """The error rule: ``err(got) <= 2 * err(naive) + FLOOR[dtype]``; NaN or a wrong shape fails."""
    expect_tensor(got, what, shape=ref.shape, dtype=dtype)
    e, base = rule_errors(got, naive, ref)
    bound = 2 * base + FLOOR[dtype]
    if not e <= bound:  # also catches NaN
        raise CheckFailure(
            f"{what} is off by up to {e:.3g} from the float64 oracle; the rule allows {bound:.3g} "
            f"(2 x the naive {dtype} error {base:.3g} + {FLOOR[dtype]:g})."
        )


def check_forward(f, q, k, v, is_causal=False, scale=None):
    """Run the student's ``flash_fwd`` and hold ``o`` and ``lse`` to the rule."""
    args = f"L={q.shape[2]}, S={k.shape[2]}, Hq={q.shape[1]}, Hkv={k.shape[1]}, {str(q.dtype)[6:]}, is_causal={is_causal}"
    res = call(f, q, k, v, is_causal=is_causal, scale=scale)
    if not isinstance(res, tuple) or len(res) != 2:
        raise CheckFailure(f"flash_fwd should return a tuple (o, lse), got {type(res).__name__}.")
    o, lse = res
    ref_o, ref_lse = ref_forward(q, k, v, is_causal, scale)
    expect_rule(o, naive_same_dtype(q, k, v, is_causal, scale), ref_o, f"the output o of flash_fwd({args})", q.dtype)
    expect_tensor(lse, f"the lse of flash_fwd({args})", shape=ref_lse.shape, dtype=torch.float32)
    e = (lse.double() - ref_lse).abs().max().item()
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2  # the scores are exact products of the inputs
    if not e <= tol:
        raise CheckFailure(f"the lse of flash_fwd({args}) is off by up to {e:.3g} (allowed {tol:g}); "
                           "lse = m_i + log(l_i), in natural-log units, for every query row.")


def check_backward(f, q, k, v, is_causal=False, scale=None, seed=0):
    """Run the student's ``flash_bwd`` on the oracle's ``o``/``lse`` and hold its gradients to the rule."""
    args = f"L={q.shape[2]}, S={k.shape[2]}, Hq={q.shape[1]}, Hkv={k.shape[1]}, {str(q.dtype)[6:]}, is_causal={is_causal}"
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(*q.shape[:3], v.shape[-1], generator=g, dtype=torch.float64).to(q.dtype)
    ref_o, ref_lse = ref_forward(q, k, v, is_causal, scale)
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    res = call(f, q, k, v, ref_o.to(q.dtype), ref_lse.float(), do, is_causal, sc)
    if not isinstance(res, tuple) or len(res) != 3:
        raise CheckFailure(f"flash_bwd should return a tuple (dq, dk, dv), got {type(res).__name__}.")
    naive = _grads(naive_same_dtype, q, k, v, do, is_causal=is_causal, scale=scale)
    for name, got, nv, ref in zip(("dq", "dk", "dv"), res, naive, ref_backward(q, k, v, do, is_causal, scale)):
        expect_rule(got, nv, ref, f"{name} of flash_bwd({args})", q.dtype)


@public(A4, "q1")
def fwd_small(ns):
    """flash_fwd on one head, L=5, S=7, D=16 (one key block, ragged) matches the oracle; lse too."""
    check_forward(get_function(ns, "flash_fwd"), *random_qkv(1, 1, 5, 7, 16, seed=40))


@public(A4, "q1")
def fwd_two_key_blocks_causal(ns):
    """flash_fwd with S=40 (several key blocks) and is_causal=True."""
    f = get_function(ns, "flash_fwd")
    q, k, v = random_qkv(1, 2, 40, 40, 16, seed=41)
    check_forward(f, q, k, v)
    check_forward(f, q, k, v, is_causal=True)


@public(A4, "q2")
def bwd_small(ns):
    """flash_bwd on one head, L=5, S=7, D=16 gives the oracle's dq, dk, dv."""
    check_backward(get_function(ns, "flash_bwd"), *random_qkv(1, 1, 5, 7, 16, seed=42))


@public(A4, "q2")
def bwd_causal_blocks(ns):
    """flash_bwd with L=S=40 (several blocks) and is_causal=True."""
    check_backward(get_function(ns, "flash_bwd"), *random_qkv(1, 1, 40, 40, 16, seed=43), is_causal=True)


@public(A4, "q3")
def autograd_matches_oracle(ns):
    """flash_attention's output and its gradients (through autograd) match the oracle."""
    f = get_function(ns, "flash_attention")
    q, k, v = random_qkv(1, 2, 9, 11, 16, seed=44)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = call(f, *xs, is_causal=True)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailure("flash_attention's output has no gradient: wrap flash_fwd/flash_bwd in a torch.autograd.Function.")
    expect_rule(out, naive_same_dtype(q, k, v, True), attention_ref(q, k, v, is_causal=True), "flash_attention(..., is_causal=True)", q.dtype)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(45))
    grads = torch.autograd.grad((out * w).sum(), xs)
    naive = _grads(naive_same_dtype, q, k, v, w, is_causal=True)
    for name, g, nv, r in zip(("query", "key", "value"), grads, naive, ref_backward(q, k, v, w, True)):
        expect_rule(g, nv, r, f"the gradient of flash_attention with respect to {name}", q.dtype)
