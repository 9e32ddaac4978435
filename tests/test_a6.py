"""Assignment 6, a performance report: the static methodology checks, the consistency checks,
and the master (full marks) and its stub (0) under the sandboxed grader.

The grader never needs a GPU: the methodology is read from the submission's source with
``ast`` (nothing runs), and the numbers are recomputed from the table. Two grading runs:
the grader as it is (the hidden tests see only the names ``time_kernel`` refers to) and
the grader with the submission's code cells passed to the tests (``ns.cells``, the patch
described in attention_lib/grading/public_a6.py), where a notebook that times with
``time.perf_counter()`` and no synchronize loses question 1.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest

import attention_lib.grading.public_a6  # noqa: F401  (registers a6 until public.py imports it)
from attention_grader import grader as grader_mod
from attention_grader import sandbox
from attention_grader.assign import assign
from attention_grader.grader import Options, grade_all
from attention_lib.cost import attention_bytes, flops
from attention_lib.grading import PUBLIC, CheckFailure, check
from attention_lib.grading.public_a6 import (
    expect_report_consistent,
    expected_intensity,
    expected_tflops,
    methodology_problems,
    names_problems,
    notebook_clock_problems,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
A6 = ROOT / "coursework" / "a6_performance"
NAME = "a6_performance"

try:
    BWRAP = sandbox.check_bwrap()
except sandbox.SandboxUnavailable:
    BWRAP = None


def _opts() -> Options:
    o = Options(timeout=60, sandbox=BWRAP is not None)
    o.bwrap = BWRAP
    return o


# ---------------------------------------------------------------------------
# The static checks, on sources written to pass or to fail
# ---------------------------------------------------------------------------
GOOD = {
    "time_call": """
def time_kernel(fn, *args, warmup=3):
    for _ in range(warmup):
        fn(*args)
    t = time_call(lambda: fn(*args), "cuda")
    return {"median_ms": t["median_s"] * 1e3}
""",
    "timer": """
def time_kernel(fn, *args):
    fn(*args)
    return torch.utils.benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}).blocked_autorange()
""",
    "events": """
def time_kernel(f, *args):
    f(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        f(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[10]
""",
    "do_bench": """
def time_kernel(fn, *args):
    return do_bench(lambda: fn(*args), warmup=25, quantiles=[0.5])
""",
}
BAD = {
    "perf_counter, no synchronize": ("""
import time
def time_kernel(fn, *args):
    fn(*args)
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
""", ["does not use a timing harness", "reads the wall clock again"]),
    "no warm-up": ("""
def time_kernel(fn, *args):
    return time_call(lambda: fn(*args), "cuda")
""", ["no warm-up"]),
    "warm-up after timing": ("""
def time_kernel(fn, *args):
    t = time_call(lambda: fn(*args), "cuda")
    fn(*args)
    return t
""", ["no warm-up"]),
    "events without synchronize": ("""
def time_kernel(fn, *args):
    fn(*args)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); fn(*args); e.record()
    return s.elapsed_time(e)
""", ["without a `synchronize()`"]),
    "stub": ("""
def time_kernel(fn, *args, warmup=3, min_run_time=0.2):
    ...  # YOUR CODE HERE
""", ["does not use a timing harness", "no warm-up"]),
    "missing": ("def other():\n    pass\n", ["is not defined"]),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_methodology_passes(name):
    assert methodology_problems(GOOD[name]) == []


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_methodology_is_named(name):
    src, wanted = BAD[name]
    problems = " ".join(methodology_problems(src))
    for w in wanted:
        assert w in problems, (name, problems)


def test_clock_rule_over_cells_and_magics():
    cells = ["%pip install x\nif 1:\n    !ls\nimport time\nt = time.time()\nf()\nprint(time.time() - t)",
             "import time\nt = time.perf_counter()\nf()\ntorch.cuda.synchronize()\ndt = time.perf_counter() - t",
             "def g():\n    a = perf_counter()\n    b = perf_counter()\n"]
    problems = notebook_clock_problems(cells)
    assert len(problems) == 2 and problems[0].startswith("code cell 1, line 7") and "code cell 3" in problems[1]


def test_names_fallback():
    assert names_problems(["torch", "time_call", "range"]) == []
    assert "harness" in " ".join(names_problems(["time", "perf_counter"]))
    assert "synchronize" in " ".join(names_problems(["time", "perf_counter", "Timer"]))


# ---------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------
def _row(kernel, L, causal, ms, peak, **change):
    tf = flops(2, 4, L, L, 64, causal=causal) / (ms * 1e-3) / 1e12
    row = {"kernel": kernel, "B": 2, "H": 4, "Lq": L, "Lk": L, "D": 64, "causal": causal, "mode": "fwd",
           "dtype": "bfloat16", "time_ms": ms, "tflops": round(tf, 3), "frac_peak": round(tf / peak, 4)}
    row.update(change)
    return row


def _report(**change):
    rows = [_row("sdpa", 1024, False, 0.5, 100.0), _row("a4", 1024, True, 0.4, 100.0)]
    rows[1].update(change)
    return {"device": "cuda: a made-up GPU for this test", "peak_tflops": 100.0, "rows": rows}


def test_consistent_report_passes():
    expect_report_consistent(_report())


@pytest.mark.parametrize("change, message", [
    ({"tflops": round(flops(2, 4, 1024, 1024, 64) / 0.4e-3 / 1e12, 3)}, "forget the causal half"),  # causal not halved
    ({"frac_peak": 0.5}, "frac_peak is"),
    ({"time_ms": -1.0}, "positive number"),
    ({"kernel": "sdpa"}, "compare 'sdpa' with your kernel"),
    ({"mode": "forward"}, "not valid"),
])
def test_inconsistent_report_fails(change, message):
    with pytest.raises(CheckFailure, match=message):
        expect_report_consistent(_report(**change))


def test_stub_rows_say_measure_row_is_a_stub():
    with pytest.raises(CheckFailure, match="`measure_row` returned None"):
        expect_report_consistent({"device": "cpu", "peak_tflops": 1.0, "rows": [None, None]})


def test_expected_numbers_follow_the_cost_model():
    assert expected_tflops(1, 1, 1000, 1000, 100, 1.0) == pytest.approx(4e8 / 1e-3 / 1e12)
    assert expected_intensity(1, 1, 64, 64, 64, element_size=4) == pytest.approx(
        flops(1, 1, 64, 64, 64) / attention_bytes(1, 1, 64, 64, 64, element_size=4, scores_in_memory=False))


def test_public_checks_on_plain_functions():
    """check("qN") in a notebook: the functions of the master, and wrong ones."""
    ns = {}
    exec(GOOD["time_call"], ns)  # no source file: falls back to the names the function uses
    ns["tflops"] = lambda B, H, Lq, Lk, D, ms, causal=False, mode="fwd": expected_tflops(B, H, Lq, Lk, D, ms,
                                                                                         causal=causal, mode=mode)
    ns["report"] = _report
    ns["arithmetic_intensity"] = lambda *a, **k: expected_intensity(*a, **k)
    for q in ("q1", "q2", "q3", "q4"):
        assert check(q, NAME, ns).passed, check(q, NAME, ns)
    ns["tflops"] = lambda B, H, Lq, Lk, D, ms, causal=False, mode="fwd": 4 * B * H * Lq * Lk * D / ms / 1e12
    assert "expected" in repr(check("q2", NAME, ns))
    assert set(PUBLIC[NAME]) == {"q1", "q2", "q3", "q4"}


# ---------------------------------------------------------------------------
# The master, its stub, and a notebook that times with perf_counter
# ---------------------------------------------------------------------------
def test_assign_is_up_to_date(tmp_path):
    paths = assign(A6 / "master.ipynb", tmp_path)
    student = nbformat.read(paths["student"], as_version=4)
    text = "\n".join(c.source for c in student.cells)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "def test_" not in text
    committed = nbformat.read(A6 / "student" / f"{NAME}.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in student.cells], "re-run assign for a6"
    for f in (paths["autograder"] / "tests").iterdir():
        assert f.read_text() == (A6 / "autograder" / "tests" / f.name).read_text(), "re-run assign for a6"
    assert (paths["autograder"] / "assignment.json").read_text() == (A6 / "autograder" / "assignment.json").read_text()


def _perf_counter_submission(tmp_path) -> str:
    """The master with time_kernel timed by perf_counter without a synchronize."""
    nb = nbformat.read(A6 / "master.ipynb", as_version=4)
    for c in nb.cells:
        if c.cell_type == "code" and c.source.startswith("def time_kernel"):
            c.source = ("import time\n\n\ndef time_kernel(fn, *args, warmup=3, min_run_time=0.2):\n"
                        "    fn(*args)\n    ts = []\n    for _ in range(5):\n        t0 = time.perf_counter()\n"
                        "        fn(*args)\n        ts.append((time.perf_counter() - t0) * 1e3)\n"
                        "    ts.sort()\n    return {'median_ms': ts[2], 'iqr_ms': ts[3] - ts[1], 'timer': 'perf_counter'}\n")
    path = tmp_path / "perf_counter.ipynb"
    nbformat.write(nb, path)
    return str(path)


@pytest.fixture
def cells_to_tests(monkeypatch):
    """The grader patch: the tests see the submission's code cells as ``ns.cells``."""
    start = grader_mod._Runner._start

    def _start(self):
        start(self)
        if self.ns is not None:
            self.ns.cells = tuple(self.cells)

    monkeypatch.setattr(grader_mod._Runner, "_start", _start)


def _q(res):
    return {q: v["score"] for q, v in res["extra_data"]["questions"].items()}


@pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not usable here")
def test_master_full_stub_zero_with_cells(tmp_path, cells_to_tests):
    subs = [str(A6 / "master.ipynb"), str(A6 / "student" / f"{NAME}.ipynb"), _perf_counter_submission(tmp_path)]
    (_, master), (_, stub), (_, bad) = grade_all(A6 / "autograder", subs, tmp_path / "out", opts=_opts(), jobs=2)
    assert master["score"] == master["extra_data"]["max_score"] == 10.0, master["tests"]
    assert stub["score"] == 0.0, _q(stub)
    assert _q(bad) == {"q1": 0.0, "q2": 2.0, "q3": 3.0, "q4": 2.0}, bad["tests"]
    msgs = " ".join(t["output"] for t in bad["tests"] if t["extra_data"]["question"] == "q1")
    assert "timing harness" in msgs and "reads the wall clock again" in msgs


@pytest.mark.slow
@pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not usable here")
def test_master_full_stub_zero_grader_as_is(tmp_path):
    """The grader without the patch: q1 falls back to the names time_kernel refers to."""
    subs = [str(A6 / "master.ipynb"), str(A6 / "student" / f"{NAME}.ipynb"), _perf_counter_submission(tmp_path)]
    (_, master), (_, stub), (_, bad) = grade_all(A6 / "autograder", subs, tmp_path / "out", opts=_opts(), jobs=2)
    assert master["score"] == 10.0, master["tests"]
    assert stub["score"] == 0.0, _q(stub)
    assert _q(bad)["q1"] == 0.0, bad["tests"]
