"""Helpers for writing checks: each failure becomes one line a student understands.

Public checks (in :mod:`attention_lib.grading.public`) and the hidden tests of the
master notebooks use the same helpers. A check is a function ``check(ns)`` that
receives the student's namespace (the notebook's globals) and raises
:class:`CheckFailure` with a readable message when something is wrong::

    def test_rows_sum_to_one(ns):
        softmax = get_function(ns, "softmax")
        x = torch.randn(3, 5)
        out = call(softmax, x)                      # exception / in-place edits / None
        expect_tensor(out, "softmax(x)", shape=(3, 5), dtype=x.dtype)  # shape, dtype, NaN
        expect_close(out.sum(-1), torch.ones(3), "softmax(x).sum(-1)")

Only torch is imported here, so the checks run wherever attention_lib runs (Colab too).
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

import torch

__all__ = [
    "CheckFailure",
    "get_function",
    "call",
    "expect_tensor",
    "expect_close",
    "oracle_tolerance",
    "random_qkv",
]


class CheckFailure(AssertionError):
    """A check failed; the message is shown to the student as is."""


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def get_function(ns: dict, name: str) -> Callable:
    """The student's function ``name``, or a clear failure if it is missing."""
    if name not in ns:
        raise CheckFailure(
            f"`{name}` is not defined. Run the cell that defines it, and keep the name `{name}`."
        )
    fn = ns[name]
    if not callable(fn):
        raise CheckFailure(f"`{name}` should be a function, but it is a {type(fn).__name__}.")
    return fn


def _where(exc: BaseException) -> str:
    """'line N of your code' for the innermost frame that comes from the notebook."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<ipython-input") or "ipykernel_" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (in `{f.name}`, line {f.lineno}: `{(f.line or '').strip()}`)"


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _modified(before: Any, after: Any) -> bool:
    if isinstance(before, torch.Tensor):
        return before.shape != after.shape or not torch.equal(before, after.detach())
    if isinstance(before, (list, tuple)):
        return any(_modified(b, a) for b, a in zip(before, after))
    return False


def call(fn: Callable, *args, allow_none: bool = False, **kwargs) -> Any:
    """Call the student's ``fn`` and turn every way it can go wrong into a message.

    * an exception becomes "`fn` raised ValueError: ... (in `fn`, line 3: `...`)";
    * a tensor argument changed in place becomes "`fn` modified its argument ...";
    * ``None`` (a function body that is still ``...``) becomes "returned None".
    """
    name = getattr(fn, "__name__", "your function")
    before_args = [_clone(a) for a in args]
    before_kwargs = {k: _clone(v) for k, v in kwargs.items()}
    try:
        with torch.no_grad() if not _needs_grad(args, kwargs) else _nullcontext():
            out = fn(*args, **kwargs)
    except CheckFailure:
        raise
    except NotImplementedError as exc:
        raise CheckFailure(f"`{name}` is not implemented yet (it raised NotImplementedError).") from exc
    except Exception as exc:  # the student's bug, reported in one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckFailure(
            f"`{name}` raised {type(exc).__name__}: {msg}{_where(exc)}"
        ) from exc
    for i, (b, a) in enumerate(zip(before_args, args)):
        if _modified(b, a):
            raise CheckFailure(
                f"`{name}` modified its argument {i + 1} in place. Do not change the inputs: "
                "use out-of-place operations (`x = x - m`, not `x -= m` or `x.sub_(m)`)."
            )
    for k, b in before_kwargs.items():
        if _modified(b, kwargs[k]):
            raise CheckFailure(
                f"`{name}` modified its argument `{k}` in place. Do not change the inputs: "
                "use out-of-place operations (`x = x - m`, not `x -= m` or `x.sub_(m)`)."
            )
    if out is None and not allow_none:
        raise CheckFailure(f"`{name}` returned None: its body is still a stub (replace the `...`), or a `return` is missing.")
    return out


def _needs_grad(args, kwargs) -> bool:
    vals = list(args) + list(kwargs.values())
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in vals)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def expect_tensor(
    out: Any,
    what: str,
    *,
    shape=None,
    dtype: torch.dtype | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Check that ``out`` is a tensor of the expected shape and dtype, without NaN."""
    if not isinstance(out, torch.Tensor):
        raise CheckFailure(f"{what} should be a torch.Tensor, but it is a {type(out).__name__}.")
    if shape is not None and tuple(out.shape) != tuple(shape):
        raise CheckFailure(f"{what} has shape {_shape(out.shape)}, expected {_shape(shape)}.")
    if dtype is not None and out.dtype != dtype:
        raise CheckFailure(f"{what} has dtype {out.dtype}, expected {dtype} (the inputs' dtype).")
    if finite and out.is_floating_point():
        nan = torch.isnan(out)
        if nan.any():
            raise CheckFailure(
                f"{what} contains NaN ({int(nan.sum())} of {out.numel()} entries). "
                "A row where every score is -inf gives 0/0: handle fully masked rows."
            )
        inf = torch.isinf(out)
        if inf.any():
            raise CheckFailure(
                f"{what} contains inf ({int(inf.sum())} of {out.numel()} entries): "
                "something overflowed (did you subtract the row maximum before exp?)."
            )
    return out


def oracle_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing with the float64 oracle cast back to ``dtype``."""
    return {
        torch.float64: (1e-7, 1e-9),
        torch.float32: (1e-4, 1e-5),
        torch.bfloat16: (2e-2, 2e-2),
        torch.float16: (5e-3, 5e-3),
    }.get(dtype, (1e-4, 1e-5))


def expect_close(out: torch.Tensor, ref: torch.Tensor, what: str, *, rtol=None, atol=None) -> None:
    """``out`` matches ``ref`` (shape, NaN, values); the message says where and by how much."""
    expect_tensor(out, what, shape=ref.shape)
    d_rtol, d_atol = oracle_tolerance(ref.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a, b = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    bad = (a - b).abs() > atol + rtol * b.abs()
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        err = (a - b).abs().max().item()
        raise CheckFailure(
            f"{what} is wrong: {int(bad.sum())} of {bad.numel()} entries differ from the reference "
            f"(largest error {err:.3g}; first at index {idx}: got {a[idx].item():.6g}, "
            f"expected {b[idx].item():.6g})."
        )


def random_qkv(B, Hq, L, S, D, *, Hkv=None, Dv=None, dtype=torch.float32, seed=0):
    """Random (query, key, value) in the (B, H, L, D) layout, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    Hkv = Hq if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v
