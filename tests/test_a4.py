"""Assignment 4 (FlashAttention-2 in Triton): the master scores full marks and the stub 0
under the sandboxed grader, with the kernels in Triton's interpreter; the hidden tests
catch the classic mistakes (a (L, S) matrix built in PyTorch, GQA gradients not summed).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported (see tests/test_triton_flash.py): set it
# at collection, before anything imports triton. The in-process tests need the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attention_lib.grading.public_a4  # noqa: F401  (registers the a4 public checks)
from attention_grader import sandbox
from attention_grader.autograder import Autograder
from attention_grader.grader import Options, grade_all
from attention_lib.grading import PUBLIC
from attention_lib.grading.testing import CheckFailure

ROOT = pathlib.Path(__file__).resolve().parents[1]
A4 = ROOT / "coursework" / "a4_flash_triton"
try:
    BWRAP = sandbox.check_bwrap()
except sandbox.SandboxUnavailable:
    BWRAP = None


def _master_namespace() -> dict:
    """The master's code cells, run in this process (the kernels in the interpreter)."""
    nb = json.loads((A4 / "master.ipynb").read_text())
    ns: dict = {}
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] != "code" or src.startswith(("check(", "# HIDDEN", "# Try it")):
            continue
        exec(compile(src.replace("%pip install", "pass  #"), "master", "exec"), ns)
    return ns


def _hidden(question: str) -> dict:
    ag = Autograder.load(A4 / "autograder")
    g: dict = {}
    exec(compile((A4 / "autograder" / "tests" / f"{question}.py").read_text(), question, "exec"), g)
    assert [q.name for q in ag.questions] == ["q1", "q2", "q3"]
    return g


@pytest.fixture(scope="module")
def master_ns():
    triton = pytest.importorskip("triton", reason="triton is not installed")
    if isinstance(triton.language.zeros, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process: run this file alone")
    return _master_namespace()


def test_public_checks_registered():
    assert set(PUBLIC["a4_flash_triton"]) == {"q1", "q2", "q3"}


def test_scores_in_pytorch_fail_the_memory_test(master_ns):
    """A flash_fwd that builds the (L, S) scores in PyTorch is caught by the hidden memory test."""

    def naive_fwd(q, k, v, is_causal=False, scale=None):
        s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    test = _hidden("q1")["test_does_not_materialise_scores"]
    test({"flash_fwd": master_ns["flash_fwd"]})  # the master passes
    with pytest.raises(CheckFailure, match="allocated"):
        test({"flash_fwd": naive_fwd})


def test_gqa_gradients_must_be_summed(master_ns):
    """A flash_bwd that keeps only the first query head of each group fails the GQA test."""

    def first_head_only(q, k, v, o, lse, do, is_causal, scale):
        G = q.shape[1] // k.shape[1]
        dq, dk, dv = master_ns["flash_bwd"](q, k, v, o, lse, do, is_causal, scale)
        dq1, dk1, dv1 = master_ns["flash_bwd"](q[:, ::G], k, v, o[:, ::G], lse[:, ::G], do[:, ::G], is_causal, scale)
        return dq, dk1, dv1

    hidden = _hidden("q2")
    hidden["test_gqa"]({"flash_bwd": master_ns["flash_bwd"]})
    with pytest.raises(CheckFailure, match="dk"):
        hidden["test_gqa"]({"flash_bwd": first_head_only})


def test_bfloat16_rounding_matters(master_ns):
    """The rule is not vacuous in bfloat16: an output rounded to 2 mantissa bits fails it."""
    from attention_lib.grading.public_a4 import check_forward
    from attention_lib.grading.testing import random_qkv

    def coarse(q, k, v, is_causal=False, scale=None):
        o, lse = master_ns["flash_fwd"](q, k, v, is_causal, scale)
        return (o.float() * 4).round().div(4).to(o.dtype), lse

    q, k, v = random_qkv(1, 2, 37, 45, 16, dtype=torch.bfloat16, seed=8)
    check_forward(master_ns["flash_fwd"], q, k, v, is_causal=True)
    with pytest.raises(CheckFailure, match="the rule allows"):
        check_forward(coarse, q, k, v, is_causal=True)


def test_student_notebook_runs_all_cells(tmp_path):
    """'Run all' on the a4 handout reaches every check (no cell raises on the stubs)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(A4 / "student" / "a4_flash_triton.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


@pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not usable here (make bwrap)")
def test_master_full_stub_zero(tmp_path):
    """Grading the master (all kernels in the interpreter, in the sandbox) gives 12/12, the stub 0."""
    subs = [str(A4 / "master.ipynb"), str(A4 / "student" / "a4_flash_triton.ipynb")]
    opts = Options(timeout=60, sandbox=True)
    opts.bwrap = BWRAP
    t0 = time.perf_counter()
    (_, master), (_, stub) = grade_all(A4 / "autograder", subs, tmp_path, opts=opts, jobs=2)
    seconds = time.perf_counter() - t0
    assert master["score"] == master["extra_data"]["max_score"] == 12.0, [
        (t["name"], t["output"]) for t in master["tests"] if t["score"] < t["max_score"]]
    assert stub["score"] == 0.0, stub["tests"]
    assert seconds < 180, f"grading the master and the stub took {seconds:.0f} s"
