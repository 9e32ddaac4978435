"""Shared test helpers: the mask registry, random inputs and the tolerance rule.

Every attention variant is tested against ``attention_ref`` (float64) with
flash-attention's rule: the error of the variant must be at most twice the error of
the naive implementation in the same dtype, plus a small floor.

    from helpers import MASKS, make_qkv, dense_mask, assert_matches_ref
"""

from __future__ import annotations

from typing import Callable

import torch

from attention_lib import attention_ref, masks, scaled_dot_product_attention

# name -> factory(B, Lq, Lk) returning a mask_mod, or None for "no mask".
# Every mask in the course is here; tests parametrise over MASKS by name.
MASKS: dict[str, Callable[[int, int, int], Callable | None]] = {
    "none": lambda B, Lq, Lk: None,
    "causal": lambda B, Lq, Lk: masks.causal,
    "causal_lower_right": lambda B, Lq, Lk: masks.causal_lower_right(Lq, Lk),
    "sliding_window": lambda B, Lq, Lk: masks.sliding_window(3),
    # batch 0 keeps 0 keys (every row fully masked), the rest keep about half
    "padding": lambda B, Lq, Lk: masks.padding(torch.tensor([0] + [max(1, Lk // 2)] * (B - 1))),
    "prefix_lm": lambda B, Lq, Lk: masks.prefix_lm(min(2, Lk)),
    "window_or_prefix": lambda B, Lq, Lk: masks.or_masks(masks.sliding_window(2), masks.prefix_lm(1)),
}

# Absolute floor added to the "2 x naive error" rule, per dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def dense_mask(name: str, B: int, Lq: int, Lk: int) -> torch.Tensor | None:
    """The registry mask ``name`` as a dense bool tensor of shape (B, 1, Lq, Lk)."""
    mod = MASKS[name](B, Lq, Lk)
    if mod is None:
        return None
    return masks.create_mask(mod, B, None, Lq, Lk)


def make_qkv(
    B: int = 2,
    H: int = 4,
    Lq: int = 7,
    Lk: int = 9,
    D: int = 16,
    Hkv: int | None = None,
    Dv: int | None = None,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    seed: int = 0,
):
    """Random (q, k, v) in the (B, H, L, D) layout; never zeros."""
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_ref(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad: bool = True,
    floor: float | None = None,
    **kwargs,
) -> None:
    """Check ``fn(q, k, v, **kwargs)`` against the float64 oracle, output and gradients.

    The oracle is :func:`attention_ref` on float64 copies of the inputs. The baseline
    is :func:`scaled_dot_product_attention` on the inputs in their own dtype (which,
    like PyTorch's math path on CPU, computes float16/bfloat16 in float32 and rounds
    the results): a variant may be at most ``2 * err(baseline) + floor`` away from the
    oracle (flash-attention's rule).
    """
    floor = FLOOR[q.dtype] if floor is None else floor

    def run(f, inputs):
        ins = [t.detach().clone().requires_grad_(grad) for t in inputs]
        mask = kwargs.get("attn_mask")
        kw = dict(kwargs)
        if mask is not None and mask.is_floating_point():
            kw["attn_mask"] = mask.to(ins[0].dtype)
        out = f(*ins, **kw)
        grads = []
        if grad:
            g = torch.Generator().manual_seed(1)
            dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
            grads = list(torch.autograd.grad(out, ins, dout))
        return out, grads

    ref_out, ref_grads = run(attention_ref, [t.double() for t in (q, k, v)])
    base_out, base_grads = run(scaled_dot_product_attention, (q, k, v))
    out, grads = run(fn, (q, k, v))

    assert out.shape == ref_out.shape, f"output shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    assert out.dtype == q.dtype, f"output dtype {out.dtype} != input dtype {q.dtype}"
    assert torch.isfinite(out).all(), "output has NaN or inf"
    err, base = max_err(out, ref_out), max_err(base_out, ref_out)
    assert err <= 2 * base + floor, f"output error {err:.3g} > 2 x naive {base:.3g} + {floor:g}"
    for name, g, bg, rg in zip("qkv", grads, base_grads, ref_grads):
        assert torch.isfinite(g).all(), f"d{name} has NaN or inf"
        err, base = max_err(g, rg), max_err(bg, rg)
        assert err <= 2 * base + 2 * floor, f"d{name} error {err:.3g} > 2 x naive {base:.3g} + {2 * floor:g}"
