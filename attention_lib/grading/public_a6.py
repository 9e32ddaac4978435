"""The public checks of assignment 6, a performance report (chapter 18's methodology).

Nothing here needs a GPU. The methodology is checked **statically**: the source of the
student's ``time_kernel`` (and, where the grader passes them, every code cell of the
submission) is parsed with :mod:`ast`; nothing from it runs here. The numbers are
checked for consistency: ``report()`` returns the results table as plain data, and
every row's TFLOP/s and fraction of peak must follow from its shape, its time and the
stated peak through :func:`attention_lib.cost.flops`.

Where the source comes from:

* in the notebook (``check("q1")``): ``inspect.getsource`` of the function, and IPython's
  ``In`` (the cells run so far) for the notebook-wide clock check;
* in the grader, ``ns.cells`` when the grader provides the submission's code cells (read
  from the notebook file in the grader's process); otherwise only the names the function
  refers to (``ns.uses``, its ``co_names``), a weaker check that cannot see the warm-up.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import textwrap

from ..cost import attention_bytes, flops
from .public import public
from .testing import CheckFailure, call, get_function

__all__ = [
    "A6",
    "methodology_problems",
    "names_problems",
    "notebook_clock_problems",
    "source_cells",
    "expect_methodology",
    "expect_report_consistent",
    "expected_tflops",
    "expected_intensity",
]

A6 = "a6_performance"

HARNESS_CALLS = {"time_call", "do_bench", "Timer", "blocked_autorange", "adaptive_autorange"}
TIMING_START = {"time_call", "do_bench", "blocked_autorange", "adaptive_autorange", "timeit", "record"}
CLOCKS = {"time", "perf_counter", "monotonic", "process_time", "time_ns", "perf_counter_ns", "monotonic_ns",
          "default_timer"}
REPORT_KEYS = ("kernel", "B", "H", "Lq", "Lk", "D", "causal", "mode", "dtype", "time_ms", "tflops", "frac_peak")


# ---------------------------------------------------------------------------
# Reading source without running it
# ---------------------------------------------------------------------------
_MAGIC = re.compile(r"^(\s*)[%!].*$")


def _parse(source: str) -> ast.Module | None:
    """``ast.parse`` of a notebook cell, IPython's ``%magic`` and ``!shell`` lines made ``pass``."""
    lines = [_MAGIC.sub(r"\1pass", line) for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _called_name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _is_clock(node: ast.Call) -> bool:
    """``time.time()``, ``time.perf_counter()``, ``perf_counter()``, ``timeit.default_timer()``, ..."""
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr in CLOCKS:
        return isinstance(f.value, ast.Name) and f.value.id in ("time", "timeit", "_time")
    return isinstance(f, ast.Name) and f.id in CLOCKS - {"time"}


def _scopes(tree: ast.AST):
    """Each function body and the module body, with the calls that belong to it (not nested defs)."""
    todo = [tree]
    while todo:
        scope = todo.pop()
        calls = []
        stack = list(ast.iter_child_nodes(scope))
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                todo.append(n)
                continue
            if isinstance(n, ast.Call):
                calls.append(n)
            stack.extend(ast.iter_child_nodes(n))
        yield scope, sorted(calls, key=lambda c: (c.lineno, c.col_offset))


def _clock_problems(tree: ast.AST, where: str) -> list[str]:
    """A clock read after another one with no ``synchronize()`` between them, in the same scope."""
    problems = []
    for _scope, calls in _scopes(tree):
        last_clock, synced = None, False
        for c in calls:
            name = _called_name(c)
            if name == "synchronize":
                synced = True
            elif _is_clock(c):
                if last_clock is not None and not synced:
                    problems.append(
                        f"{where}, line {c.lineno}: `{ast.unparse(c)}` reads the wall clock again with no "
                        "`torch.cuda.synchronize()` since the previous read (line "
                        f"{last_clock.lineno}). CUDA work is asynchronous: without a synchronize this times "
                        "the launch, not the kernel. Use CUDA events or the course harness.")
                last_clock, synced = c, False
    return problems


def _find_function(trees: list[tuple[str, ast.Module]], name: str):
    found = None
    for where, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found = (where, node)  # the last definition wins, as when the notebook runs
    return found


def methodology_problems(source: str, name: str = "time_kernel") -> list[str]:
    """What is wrong with how the function ``name`` in ``source`` times its first argument.

    Empty when it (1) uses a timing harness (``attention_lib.bench.time_call``,
    ``torch.utils.benchmark.Timer``, ``triton.testing.do_bench``, or CUDA events with
    ``elapsed_time`` and a ``synchronize``), (2) calls ``fn`` at least once before the
    first timed call (a warm-up), or passes ``warmup=`` to ``do_bench``, and (3) never
    reads a wall clock twice without a ``synchronize()`` in between.
    """
    tree = _parse(source)
    if tree is None:
        return [f"the source of `{name}` could not be parsed."]
    found = _find_function([("your code", tree)], name)
    if found is None:
        return [f"`{name}` is not defined in your code cells."]
    _, fn_def = found
    problems = []
    params = [a.arg for a in fn_def.args.posonlyargs + fn_def.args.args]
    fn_param = params[0] if params else None
    _, calls = next(_scopes(fn_def))
    lambda_calls = {id(c) for n in ast.walk(fn_def) if isinstance(n, ast.Lambda) for c in ast.walk(n)
                    if isinstance(c, ast.Call)}
    called = {_called_name(c) for c in calls}
    events = "Event" in called and "elapsed_time" in called
    if not (called & HARNESS_CALLS or events):
        problems.append(
            f"`{name}` does not use a timing harness: call `attention_lib.bench.time_call`, "
            "`torch.utils.benchmark.Timer(...).blocked_autorange()`, or time with CUDA events "
            "(`torch.cuda.Event(enable_timing=True)`, `record()`, `synchronize()`, `elapsed_time`).")
    if events and "synchronize" not in called:
        problems.append(
            f"`{name}` reads `elapsed_time` of CUDA events without a `synchronize()`: the end event may not "
            "have happened yet. Call `torch.cuda.synchronize()` (or `end.synchronize()`) first.")
    starts = [c.lineno for c in calls if _called_name(c) in TIMING_START or _is_clock(c)]
    first = min(starts) if starts else math.inf
    warm = any(isinstance(c.func, ast.Name) and c.func.id == fn_param and id(c) not in lambda_calls
               and c.lineno < first for c in calls)
    warm = warm or any(_called_name(c) == "do_bench" and any(k.arg == "warmup" for k in c.keywords) for c in calls)
    if not warm:
        problems.append(
            f"`{name}` has no warm-up: call `{fn_param or 'fn'}(*args)` at least once before timing, so that "
            "compilation, autotuning and the allocator's first allocations are not timed.")
    problems += _clock_problems(fn_def, f"in `{name}`")
    return problems


def names_problems(names: list[str], name: str = "time_kernel") -> list[str]:
    """The same rules as :func:`methodology_problems`, on the names a function refers to only
    (its ``co_names``): the harness and the clock rule; the warm-up cannot be seen."""
    used = set(names)
    problems = []
    if not (used & HARNESS_CALLS or {"Event", "elapsed_time"} <= used):
        problems.append(f"`{name}` does not use a timing harness (time_call, torch.utils.benchmark.Timer, "
                        "do_bench or CUDA events with elapsed_time).")
    if used & (CLOCKS - {"time"}) or ("time" in used and "time_call" not in used and "Timer" not in used):
        if "synchronize" not in used:
            problems.append(f"`{name}` reads a wall clock (time.time / time.perf_counter) without "
                            "`torch.cuda.synchronize()`: CUDA work is asynchronous.")
    if {"Event", "elapsed_time"} <= used and "synchronize" not in used:
        problems.append(f"`{name}` reads `elapsed_time` without a `synchronize()`.")
    return problems


def notebook_clock_problems(cells: list[str]) -> list[str]:
    """The clock rule over every code cell (top level and every function of each cell)."""
    problems = []
    for i, src in enumerate(cells):
        tree = _parse(src)
        if tree is not None:
            problems += _clock_problems(tree, f"code cell {i + 1}")
    return problems


def source_cells(ns) -> list[str] | None:
    """The submission's code cells: ``ns.cells`` (the grader's copy, read from the file), or
    IPython's ``In`` in the notebook itself; None when neither is there."""
    cells = getattr(ns, "cells", None)
    if isinstance(cells, (list, tuple)) and cells and all(isinstance(c, str) for c in cells):
        return list(cells)
    if isinstance(ns, dict):
        hist = ns.get("In")
        if isinstance(hist, list) and all(isinstance(c, str) for c in hist):
            return [c for c in hist if c.strip()]
    return None


def expect_methodology(ns, name: str = "time_kernel", *, whole_notebook: bool = False) -> None:
    """Fail with every methodology problem of ``name`` (and of the whole notebook if asked)."""
    get_function(ns, name)
    cells = source_cells(ns)
    problems: list[str]
    if isinstance(ns, dict):
        try:
            src = textwrap.dedent(inspect.getsource(ns[name]))
        except (OSError, TypeError):
            src = None
        problems = methodology_problems(src, name) if src else names_problems(
            list(getattr(getattr(ns[name], "__code__", None), "co_names", ())), name)
    elif cells is not None:
        problems = methodology_problems("\n\n".join(_strip_for_join(cells)), name)
    else:
        problems = names_problems(ns.uses(name), name)
    if whole_notebook and cells is not None:
        problems += notebook_clock_problems(cells)
    if problems:
        raise CheckFailure(" ".join(dict.fromkeys(problems)))


def _strip_for_join(cells: list[str]) -> list[str]:
    """Cells that parse, so that one bad cell does not hide ``time_kernel`` in another."""
    return [c for c in cells if _parse(c) is not None]


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------
def expected_tflops(B, H, Lq, Lk, D, time_ms, *, causal=False, mode="fwd") -> float:
    """TFLOP/s of one timed call, from the course's cost model."""
    return flops(B, H, Lq, Lk, D, causal=causal, mode=mode) / (time_ms * 1e-3) / 1e12


def expected_intensity(B, H, Lq, Lk, D, *, element_size=2, scores_in_memory=False) -> float:
    """FLOPs per byte of a forward pass (:func:`flops` over :func:`attention_bytes`)."""
    return flops(B, H, Lq, Lk, D) / attention_bytes(B, H, Lq, Lk, D, element_size=element_size,
                                                       scores_in_memory=scores_in_memory)


def _close(got, want, *, rel=0.01, abs_=1e-3) -> bool:
    return isinstance(got, (int, float)) and not isinstance(got, bool) and math.isfinite(got) and \
        abs(got - want) <= max(rel * abs(want), abs_)


def expect_report_consistent(rep, *, min_rows: int = 2, all_rows: bool = True) -> None:
    """``report()``'s table: the fields, positive times, TFLOP/s = flops / time and
    fraction of peak = TFLOP/s / peak for each row (1 % or 0.001), SDPA and one other kernel."""
    if not isinstance(rep, dict):
        raise CheckFailure(f"report() should return a dict with 'device', 'peak_tflops' and 'rows', got {rep!r:.80}.")
    for k in ("device", "peak_tflops", "rows"):
        if k not in rep:
            raise CheckFailure(f"report() has no {k!r} entry; it should return 'device', 'peak_tflops' and 'rows'.")
    if not isinstance(rep["device"], str) or not rep["device"].strip():
        raise CheckFailure("report()['device'] should name the device the times come from (e.g. 'cpu: ...' or 'cuda: Tesla T4').")
    peak = rep["peak_tflops"]
    if not (isinstance(peak, (int, float)) and not isinstance(peak, bool) and peak > 0 and math.isfinite(peak)):
        raise CheckFailure(f"report()['peak_tflops'] should be the stated peak in TFLOP/s (a positive number), got {peak!r:.40}.")
    rows = rep["rows"]
    if not isinstance(rows, (list, tuple)) or len(rows) < min_rows:
        raise CheckFailure(f"report()['rows'] should hold at least {min_rows} rows, got {rows!r:.80}.")
    kernels = set()
    for i, row in enumerate(rows if all_rows else rows[:1]):
        if row is None:
            raise CheckFailure(f"row {i} of the table is None: `measure_row` returned None (is its body still a stub?).")
        if not isinstance(row, dict) or any(k not in row for k in REPORT_KEYS):
            missing = [k for k in REPORT_KEYS if not isinstance(row, dict) or k not in row]
            raise CheckFailure(f"row {i} of the table lacks {missing}; each row needs {list(REPORT_KEYS)}.")
        t = row["time_ms"]
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 and math.isfinite(t)):
            raise CheckFailure(f"row {i} ({row['kernel']}): time_ms should be a positive number, got {t!r:.40}.")
        try:
            want = expected_tflops(row["B"], row["H"], row["Lq"], row["Lk"], row["D"], t, causal=bool(row["causal"]),
                                   mode=row["mode"])
        except (ValueError, TypeError) as exc:
            raise CheckFailure(f"row {i} ({row['kernel']}): its shape or mode is not valid ({exc}).") from None
        if not _close(row["tflops"], want):
            raise CheckFailure(
                f"row {i} ({row['kernel']}, L = {row['Lq']}, causal={row['causal']}, {row['mode']}): "
                f"{row['tflops']!r:.12} TFLOP/s, but its shape and time_ms = {t:.4g} give {want:.4g} "
                "(attention_lib.cost.flops / time). Did you forget the causal half, or mix ms and s?")
        if not _close(row["frac_peak"], row["tflops"] / peak):
            raise CheckFailure(
                f"row {i} ({row['kernel']}): frac_peak is {row['frac_peak']!r:.12}, but tflops / peak_tflops = "
                f"{row['tflops'] / peak:.4g}.")
        kernels.add(row["kernel"])
    if all_rows and ("sdpa" not in kernels or len(kernels) < 2):
        raise CheckFailure(f"the table should compare 'sdpa' with your kernel; it has kernels {sorted(kernels)}.")


# ---------------------------------------------------------------------------
# The public checks
# ---------------------------------------------------------------------------
@public(A6, "q1")
def time_kernel_methodology(ns):
    """time_kernel uses a timing harness, warms up, and never reads a clock without a synchronize."""
    expect_methodology(ns)


@public(A6, "q2")
def tflops_one_shape(ns):
    """tflops(2, 8, 1024, 1024, 64, 1.5) is the cost model's FLOPs over 1.5 ms, in TFLOP/s."""
    f = get_function(ns, "tflops")
    got = call(f, 2, 8, 1024, 1024, 64, 1.5)
    want = expected_tflops(2, 8, 1024, 1024, 64, 1.5)
    if not _close(got, want, rel=1e-6, abs_=1e-9):
        raise CheckFailure(f"tflops(2, 8, 1024, 1024, 64, 1.5) = {got!r:.20}, expected {want:.6g} "
                           "(4·B·H·Lq·Lk·D FLOPs, divided by the seconds, over 1e12).")


@public(A6, "q3")
def report_first_row(ns):
    """report() returns a table whose first row's TFLOP/s and fraction of peak follow from its time."""
    expect_report_consistent(call(get_function(ns, "report")), min_rows=1, all_rows=False)


@public(A6, "q4")
def intensity_one_shape(ns):
    """arithmetic_intensity of a tiled forward pass (B=1, H=1, L=1024, D=64, bf16) matches the cost model."""
    f = get_function(ns, "arithmetic_intensity")
    got = call(f, 1, 1, 1024, 1024, 64)
    want = expected_intensity(1, 1, 1024, 1024, 64)
    if not _close(got, want, rel=1e-6, abs_=1e-9):
        raise CheckFailure(f"arithmetic_intensity(1, 1, 1024, 1024, 64) = {got!r:.20}, expected {want:.6g} FLOP/byte "
                           "(attention_lib.cost.flops over attention_bytes with scores_in_memory=False).")
