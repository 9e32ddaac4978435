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
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "CheckFailure",
    "get_function",
    "call",
    "expect_tensor",
    "expect_close",
    "oracle_tolerance",
    "random_qkv",
    "measure_call",
    "weight",
    "nan_diagnosis",
    "renormalise_hint",
]


class CheckFailure(AssertionError):
    """A check failed; the message is shown to the student as is."""


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


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


def measure_call(fn: Callable, *args, **kwargs) -> tuple[Any, int]:
    """``(result, peak_bytes)`` of ``fn(*args, **kwargs)``, through :func:`call`'s messages.

    In the notebook this is :func:`attention_lib.memory.peak_memory`; the grader's
    proxies of the student's functions measure in the student's kernel (``fn.measure``).
    """
    from ..memory import peak_memory

    measure = getattr(fn, "measure", None)
    if measure is not None:
        return measure(*args, **kwargs)
    box = {}

    def measured(*a, **k):
        out, box["peak"] = peak_memory(fn, *a, **k)
        return out

    measured.__name__ = getattr(fn, "__name__", "your function")
    return call(measured, *args, allow_none=True, **kwargs), box.get("peak", 0)


def weight(w: float):
    """``@weight(3)``: this check counts 3 times as much as a plain one in its question's score."""

    def mark(fn):
        fn.weight = float(w)
        return fn

    return mark


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
        more = ""
        if out.numel() > max(1, _numel(shape)) or len(out.shape) > len(tuple(shape)):
            more = (" A larger shape usually means broadcasting went wrong: a reduction without "
                    "keepdim=True, or a mask or bias of the wrong shape.")
        raise CheckFailure(f"{what} has shape {_shape(out.shape)}, expected {_shape(shape)}.{more}")
    if dtype is not None and out.dtype != dtype:
        raise CheckFailure(f"{what} has dtype {out.dtype}, expected {dtype} (the inputs' dtype).")
    if finite and out.is_floating_point():
        message = nan_diagnosis(out, what)
        if message:
            raise CheckFailure(message)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def nan_diagnosis(out: torch.Tensor, what: str, ref: torch.Tensor | None = None) -> str:
    """A sentence on the NaN or inf in ``out`` and its likely cause, or "" if there is none.

    The causes told apart (with ``ref``, the expected values, when it is known):

    * a row whose keys are all masked: max = -inf, sum = 0, so 0/0 = NaN in the whole row,
      where the expected row is all 0;
    * exp overflowing (a score above ~88 in float32): inf / inf = NaN at the row's largest
      entries and 0 elsewhere, or inf, in a row whose expected values are ordinary numbers.
    """
    nan, inf = torch.isnan(out), torch.isinf(out)
    if not (nan.any() or inf.any()):
        return ""
    bad = nan | inf
    head = (f"{what} contains {'NaN' if nan.any() else 'inf'} ({int(bad.sum())} of {out.numel()} entries"
            f"{f', in {int(_rows(bad).any(-1).sum())} of {_rows(bad).shape[0]} rows' if out.dim() >= 2 else ''}). ")
    masked = ("A row in which every key is masked has max = -inf and sum 0, so the softmax is 0/0 = NaN there: "
              "shift such rows by 0 instead of -inf and return 0 for them (divide by the sum only where it is > 0).")
    overflow = ("exp overflowed: a score above ~88 gives exp = inf in float32, and inf / inf = NaN. Subtract "
                "the row maximum before exp (x - x.amax(dim, keepdim=True)); without keepdim=True the maximum "
                "broadcasts against the wrong axis.")
    if out.dim() >= 1 and out.numel():
        rows, bad_rows = _rows(out), _rows(bad).any(-1)
        if ref is not None and ref.shape == out.shape:
            empty = (_rows(ref) == 0).all(-1)  # the expected row is all 0: a fully masked row
            if bool(empty[bad_rows].all()):
                return head + masked
            return head + overflow
        whole = torch.isnan(rows[bad_rows]).all(-1)
        if bool(whole.all()) and not inf.any():
            return head + masked + " (If no key of those rows is masked, the cause is overflow: " + overflow + ")"
    return head + overflow


def renormalise_hint(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1):
    """A hint for :func:`expect_close`: did the student zero the masked weights *after* the softmax?"""

    def hint(out: torch.Tensor) -> str:
        s64 = scores.detach().double()
        after = torch.softmax(s64, dim) * mask.to(torch.float64)  # masked after, not renormalised
        try:
            if out.shape == after.shape and torch.allclose(out.double(), after, rtol=1e-4, atol=1e-6):
                return ("You set the masked weights to 0 after the softmax, so the rows no longer sum to 1. "
                        "Mask the scores before the softmax (masked_fill with -inf), or renormalise: divide each "
                        "row by its new sum.")
            # rows that should sum to 1 but do not: a reduction without keepdim broadcast wrongly
            keep = mask.to(torch.bool).expand_as(s64).any(dim)
            sums = out.double().sum(dim)
            off = keep & ~torch.isclose(sums, torch.ones_like(sums), rtol=0, atol=1e-3)
            if out.shape == after.shape and bool(off.any()):
                first = tuple(int(i) for i in off.nonzero()[0])
                return (f"The rows of your weights do not sum to 1 (row {first} sums to {sums[first].item():.4g}). "
                        "If you divided by a sum (or subtracted a maximum) without keepdim=True, the reduced tensor "
                        "broadcast against the wrong axis: keep the reduced axis, e.g. e / e.sum(dim, keepdim=True).")
        except RuntimeError:
            pass
        return ""

    return hint


def oracle_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing with the float64 oracle cast back to ``dtype``."""
    return {
        torch.float64: (1e-7, 1e-9),
        torch.float32: (1e-4, 1e-5),
        torch.bfloat16: (2e-2, 2e-2),
        torch.float16: (5e-3, 5e-3),
    }.get(dtype, (1e-4, 1e-5))


def expect_close(out: torch.Tensor, ref: torch.Tensor, what: str, *, rtol=None, atol=None, hint=None) -> None:
    """``out`` matches ``ref`` (shape, NaN, values); the message says where and by how much.

    ``hint(out) -> str``, if given, may add a sentence on the likely cause of a mismatch.
    """
    try:
        _expect_close(out, ref, what, rtol=rtol, atol=atol)
    except CheckFailure as exc:
        extra = hint(out) if hint is not None and isinstance(out, torch.Tensor) else ""
        if extra:
            raise CheckFailure(f"{exc} {extra}") from None
        raise


def _expect_close(out, ref, what, *, rtol, atol) -> None:
    expect_tensor(out, what, shape=ref.shape, finite=False)
    if ref.is_floating_point() and out.is_floating_point() and torch.isfinite(ref).all():
        message = nan_diagnosis(out, what, ref)
        if message:
            raise CheckFailure(message)
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
