"""Assignment 5 (decoding): the shipped model, the checks, and the sandboxed grader on it.

The master scores full marks and the untouched student notebook 0 under the sandboxed
grader (one run, both notebooks). The checks are also run in this process on the master's
code and on broken copies of it, so that each question is shown to catch a typical bug.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest
import torch

import attention_lib.grading.public_a5 as p5  # registers the public checks of a5 (until public.py imports it)
from attention_grader import sandbox
from attention_grader.assign import assign
from attention_grader.autograder import Autograder
from attention_grader.grader import Options, grade_all
from attention_lib.gpt import GPT, GPTConfig, generate
from attention_lib.grading import PUBLIC

ROOT = pathlib.Path(__file__).resolve().parents[1]
A5 = ROOT / "coursework" / "a5_decoding"
# every prompt the checks decode from, with its number of new tokens
PROMPTS = [("Anne said", 12), ("Elizabeth was", 60), ("Captain Wentworth", 40), ("Elizabeth", 20)]

try:
    sandbox.check_bwrap()
    HAVE_BWRAP = True
except sandbox.SandboxUnavailable:
    HAVE_BWRAP = False


@pytest.fixture(scope="module")
def model_file():
    return p5.load_a5_model()


def _master_code() -> str:
    nb = nbformat.read(A5 / "master.ipynb", as_version=4)
    cells = [c.source for c in nb.cells[1:] if c.cell_type == "code"]
    keep = [s for s in cells if not s.startswith("# HIDDEN TESTS") and not s.startswith("check(")]
    return "\n\n".join(s.replace('%pip install', 'pass  # %pip install') for s in keep)


def _scores(ns) -> dict[str, float]:
    ag = Autograder.load(A5 / "autograder")
    out = {}
    for q in ag.questions:
        got = 0.0
        for t in q.tests:
            try:
                t.fn(ns)
                got += t.weight
            except AssertionError:
                pass
        out[q.name] = got / sum(t.weight for t in q.tests)
    return out


def _loses_points(ns, question: str) -> bool:
    """Some test of ``question`` fails on ``ns`` (stops at the first that does)."""
    (q,) = [q for q in Autograder.load(A5 / "autograder").questions if q.name == question]
    for t in q.tests:
        try:
            t.fn(ns)
        except AssertionError:
            return True
    return False


def test_the_model_ships_as_package_data(model_file):
    path = ROOT / "attention_lib" / "data" / p5.MODEL_FILE
    assert 100_000 < path.stat().st_size < 800_000  # a few hundred KB
    assert set(model_file) == {"config", "chars", "state_dict", "trained"}
    cfg = GPTConfig(**model_file["config"])
    assert cfg.n_kv_head is not None and cfg.n_kv_head < cfg.n_head  # GQA
    assert len(model_file["chars"]) == cfg.vocab_size
    model = GPT(cfg)
    model.load_state_dict(model_file["state_dict"])  # strict: every name, every shape
    assert all(v.dtype == torch.float32 for v in model_file["state_dict"].values())


@pytest.mark.parametrize("text,n", PROMPTS)
def test_reference_tokens_are_unambiguous(model_file, text, n):
    """The reference (float64, cached) equals decoding without a cache, and no greedy step is
    closer than 1e-4 to a tie, so a float32 cache that is right gives exactly these tokens."""
    prompt = p5.prompt_tokens(model_file, text)
    ref = p5.reference_greedy(model_file, prompt, n)
    model = p5._model64(model_file)
    assert torch.equal(ref, generate(model, prompt, n, temperature=0, use_cache=False))
    assert p5.greedy_margin(model_file, ref, prompt.shape[1]) > 1e-4


def test_assign_output_is_current(tmp_path):
    paths = assign(A5 / "master.ipynb", tmp_path)
    student = nbformat.read(paths["student"], as_version=4)
    text = "\n".join(c.source for c in student.cells)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "def test_" not in text
    committed = nbformat.read(A5 / "student" / "a5_decoding.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in student.cells], "re-run assign for a5"
    for f in (paths["autograder"] / "tests").iterdir():
        assert f.read_text() == (A5 / "autograder" / "tests" / f.name).read_text(), "re-run assign for a5"
    ag = Autograder.load(paths["autograder"])
    assert [q.name for q in ag.questions] == ["q1", "q2", "q3", "q4"] and ag.max_score == 10
    assert all(PUBLIC["a5_decoding"][q.name] for q in ag.questions)
    assert all(sum(t.kind == "hidden" for t in q.tests) >= 3 for q in ag.questions)


BUGS = {  # a typical mistake -> (the master's line, the broken line, the question that must lose points)
    "top-left causal mask": ("<= torch.arange(L).view(L, 1) + (S - L)", "<= torch.arange(L).view(L, 1)", "q2"),
    "nbytes counts the capacity": ("self.length * D * self.k.element_size()", "self.k.shape[2] * D * self.k.element_size()", "q1"),
    "a cache that loses a position when it grows": (
        "k[:, :, : self.length] = self.k[:, :, : self.length]", "k[:, :, 1: self.length] = self.k[:, :, 1: self.length]", "q1"),
    "quantised with floor, not round": ("(x / safe).round()", "(x / safe).floor()", "q3"),
    "attention that ignores attn_mask": ("allowed = allowed & attn_mask", "allowed = allowed", "q4"),
}


def test_checks_pass_the_master_and_catch_bugs():
    code = _master_code()
    ns: dict = {}
    exec(compile(code, "master", "exec"), ns)
    assert _scores(ns) == {"q1": 1.0, "q2": 1.0, "q3": 1.0, "q4": 1.0}
    for bug, (good, bad, question) in BUGS.items():
        assert good in code, bug
        broken: dict = {}
        exec(compile(code.replace(good, bad), "broken", "exec"), broken)
        assert _loses_points(broken, question), f"{question} does not catch: {bug}"


@pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not usable here (make bwrap)")
def test_master_full_marks_stub_zero_sandboxed(tmp_path):
    opts = Options(timeout=30.0, sandbox=True)
    opts.bwrap = sandbox.check_bwrap()
    subs = [str(A5 / "master.ipynb"), str(A5 / "student" / "a5_decoding.ipynb")]
    (_, master), (_, stub) = grade_all(A5 / "autograder", subs, tmp_path, opts=opts, jobs=2)
    assert master["score"] == master["extra_data"]["max_score"] == 10.0, [
        (t["name"], t["output"]) for t in master["tests"] if t["score"] < t["max_score"]]
    assert stub["score"] == 0.0, {q: v["score"] for q, v in stub["extra_data"]["questions"].items()}
