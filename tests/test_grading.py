"""The coursework autograder (``attention_grader``): assign, grade in a sandbox, feedback, results.

One grading run of assignment 1 over the master, the untouched stub and one fixture per
failure mode (tests/fixtures/grading, written by make_fixtures.py) is shared by most tests
(module-scoped fixture). Timeouts are short (3 s) so the suite stays fast. Attacks on the
grader live in tests/test_redteam.py.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import nbformat
import psutil
import pytest

from attention_lib import softmax as lib_softmax
from attention_lib.grading import PUBLIC, check, checker
from attention_grader import sandbox
from attention_grader.__main__ import main
from attention_grader.assign import AssignError, assign, strip_solutions
from attention_grader.autograder import Autograder
from attention_grader.grader import Options, grade_all, read_submission, result_names

ROOT = pathlib.Path(__file__).resolve().parents[1]
COURSEWORK = ROOT / "coursework"
FIXTURES = ROOT / "tests" / "fixtures" / "grading"
ASSIGNMENTS = ["a1_softmax", "a2_attention", "a3_tiled", "a4_flash_triton", "a5_decoding", "a6_performance"]
TIMEOUT = 3.0
HAVE_BWRAP = True
try:
    sandbox.check_bwrap()
except sandbox.SandboxUnavailable:
    HAVE_BWRAP = False
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not usable here (make bwrap)")


def _opts(**kw) -> Options:
    o = Options(**{"timeout": TIMEOUT, "sandbox": HAVE_BWRAP, **kw})
    if HAVE_BWRAP:
        o.bwrap = sandbox.check_bwrap()
    return o


def _kernels() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any("ipykernel" in a for a in p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _scores(res: dict) -> dict[str, float]:
    return {q: v["score"] for q, v in res["extra_data"]["questions"].items()}


def _outputs(res: dict, question: str) -> str:
    return "\n".join(t["output"] for t in res["tests"] if t["extra_data"]["question"] == question)


# ---------------------------------------------------------------------------
# assign
# ---------------------------------------------------------------------------
def test_strip_solutions_keeps_indentation_and_checks_markers():
    src = "def f(x):\n    '''doc'''\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION\n"
    assert strip_solutions(src) == "def f(x):\n    '''doc'''\n    ...  # YOUR CODE HERE\n"
    with pytest.raises(AssignError, match="never closed"):
        strip_solutions("# BEGIN SOLUTION\nx = 1\n")
    with pytest.raises(AssignError, match="without BEGIN"):
        strip_solutions("x = 1\n# END SOLUTION\n")


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_assign_hides_solutions_and_hidden_tests(name, tmp_path):
    paths = assign(COURSEWORK / name / "master.ipynb", tmp_path)
    student = nbformat.read(paths["student"], as_version=4)
    text = "\n".join(c.source for c in student.cells)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "def test_" not in text
    assert "ASSIGNMENT CONFIG" not in text
    code = "\n".join(c.source for c in student.cells if c.cell_type == "code")
    ag = Autograder.load(paths["autograder"])
    questions = [q.name for q in ag.questions]
    assert questions == [f"q{i + 1}" for i in range(len(questions))] and len(questions) >= 3
    assert code.count("...  # YOUR CODE HERE") >= len(questions)  # at least one stub per question
    for q in questions:
        assert f'check("{q}")' in text
    assert all(q.functions for q in ag.questions)
    assert all(sum(t.kind == "hidden" for t in q.tests) >= 2 for q in ag.questions)
    committed = nbformat.read(COURSEWORK / name / "student" / f"{name}.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in student.cells], f"re-run assign for {name}"
    for f in (paths["autograder"] / "tests").iterdir():
        assert f.read_text() == (COURSEWORK / name / "autograder" / "tests" / f.name).read_text(), f"re-run assign for {name}"
    assert (paths["autograder"] / "assignment.json").read_text() == (COURSEWORK / name / "autograder" / "assignment.json").read_text()


def test_assign_rejects_a_question_without_hidden_tests(tmp_path):
    nb = nbformat.read(COURSEWORK / "a1_softmax" / "master.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if not c.source.startswith("# HIDDEN TESTS q2")]
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nb, bad)
    with pytest.raises(AssignError, match="q2 has no hidden tests"):
        assign(bad, tmp_path / "out")


def test_a3_student_notebook_runs_all_cells(tmp_path):
    """'Run all' on the a3 handout reaches every check (no cell raises on the stubs)."""
    from nbclient import NotebookClient

    nb = nbformat.read(COURSEWORK / "a3_tiled" / "student" / "a3_tiled.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


# ---------------------------------------------------------------------------
# check("q1") in the student's notebook, and the feedback helpers
# ---------------------------------------------------------------------------
def test_check_reports_each_public_check():
    ok = check("q2", "a1_softmax", {"softmax": lib_softmax})
    assert ok.passed and "3/3 public checks passed" in repr(ok)
    missing = check("q3", "a1_softmax", {})
    assert not missing.passed and "`masked_softmax` is not defined" in repr(missing)
    bound = checker("a1_softmax")
    assert not bound("q1").passed
    with pytest.raises(ValueError, match="no question"):
        check("q9", "a1_softmax", {})
    assert set(PUBLIC) == set(ASSIGNMENTS)


def test_unreadable_notebooks_get_a_message(tmp_path):
    nb, msg = read_submission(FIXTURES / "invalid_json.ipynb")
    assert nb is None and "not valid JSON" in msg and "line" in msg
    (tmp_path / "list.ipynb").write_text("[1, 2]")
    assert "not a Jupyter notebook" in read_submission(tmp_path / "list.ipynb")[1]
    (tmp_path / "bin.ipynb").write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in read_submission(tmp_path / "bin.ipynb")[1]


def test_result_names_are_safe_and_unique():
    names = result_names(["a/hw.ipynb", "b/hw.ipynb", "...ipynb", "summary.csv.ipynb", "x/../y.ipynb", "c/hw.ipynb",
                          "summary.ipynb", "ok name!.ipynb"])
    assert names[:2] == ["a_hw", "b_hw"] and names[5] == "c_hw"
    assert len(set(names)) == len(names)
    for n in names:
        assert n not in (".", "..", "summary", "summary.csv") and "/" not in n and "." not in n and n


# ---------------------------------------------------------------------------
# One grading run of assignment 1, shared by the tests below
# ---------------------------------------------------------------------------
FAILURES = {
    # fixture: (scores per question, question, text the feedback must contain)
    "exception": ({"q1": 2.0, "q2": 0.0, "q3": 3.0}, "q2", "`softmax` raised TypeError: unsupported operand"),
    "infinite_loop": ({"q1": 2.0, "q2": 3.0, "q3": 0.0}, "q3", "timed out after 3 s"),
    "stubborn_loop": ({"q1": 2.0, "q2": 3.0, "q3": 0.0}, "q3", "timed out after 3 s"),
    "wrong_shape": ({"q1": 0.0, "q2": 3.0, "q3": 3.0}, "q1", "has shape (5, 3), expected (3, 5)"),
    "nan": ({"q1": 2.0, "q2": 3.0}, "q3", "every key is masked has max = -inf"),
    "in_place": ({"q1": 2.0, "q2": 0.0, "q3": 3.0}, "q2", "modified its argument 1 in place"),
    "missing_function": ({"q1": 2.0, "q2": 3.0, "q3": 0.0}, "q3", "`masked_softmax` is not defined"),
    "kernel_crash": ({"q1": 2.0, "q2": 0.0, "q3": 3.0}, "q2", "the kernel crashed"),
    "invalid_json": ({"q1": 0.0, "q2": 0.0, "q3": 0.0}, "q1", "the notebook could not be read"),
    "no_max_shift": ({"q1": 2.0, "q3": 3.0}, "q2", "exp overflowed"),
    "mask_after_softmax": ({"q1": 2.0, "q2": 3.0}, "q3", "renormalise"),
    "uses_broken_softmax": ({"q1": 2.0}, "q3", "`masked_softmax` calls your `softmax`, which fails tests of q2"),
    "keyboard_interrupt": ({"q1": 0.0, "q2": 3.0, "q3": 3.0}, "q1", "raised KeyboardInterrupt"),
}


@pytest.fixture(scope="module")
def a1_graded(tmp_path_factory):
    out = tmp_path_factory.mktemp("a1") / "graded"
    subs = [COURSEWORK / "a1_softmax" / "master.ipynb", COURSEWORK / "a1_softmax" / "student" / "a1_softmax.ipynb"]
    subs += [FIXTURES / f"{name}.ipynb" for name in FAILURES]
    seen = []
    rows = grade_all(COURSEWORK / "a1_softmax" / "autograder", [str(s) for s in subs], out, opts=_opts(), jobs=2,
                     progress=lambda done, total, name, res: seen.append((done, name)))
    return dict(rows), out, seen, _kernels()


def test_master_scores_full_marks(a1_graded):
    res = a1_graded[0]["master"]
    assert res["score"] == res["extra_data"]["max_score"] == 8.0, json.dumps(res, indent=1)
    assert res["output"] == "Your notebook ran without errors."


def test_untouched_stub_scores_zero(a1_graded):
    res = a1_graded[0]["a1_softmax"]
    assert res["score"] == 0.0 and set(_scores(res).values()) == {0.0}
    assert "returned None: its body is still a stub" in _outputs(res, "q1")


@pytest.mark.parametrize("name", list(FAILURES))
def test_failure_mode_costs_only_its_question(a1_graded, name):
    scores, question, text = FAILURES[name]
    res = a1_graded[0][name]
    got = _scores(res)
    assert {q: got[q] for q in scores} == scores, res["output"]
    assert got[question] < res["extra_data"]["questions"][question]["max_score"]
    assert text in _outputs(res, question), _outputs(res, question)


def test_core_tests_carry_the_weight(a1_graded):
    # a softmax without the max shift keeps under half of q2 (it used to keep most of it)
    assert _scores(a1_graded[0]["no_max_shift"])["q2"] < 1.5
    assert _scores(a1_graded[0]["nan"])["q3"] < 2.0  # NaN on fully masked rows loses the core of q3


def test_results_json_follows_the_gradescope_schema(a1_graded):
    results, folder, _, _ = a1_graded
    data = json.loads((folder / "nan" / "results.json").read_text())
    assert {"score", "output", "tests", "execution_time", "stdout_visibility"} <= set(data)
    for t in data["tests"]:
        assert {"name", "score", "max_score", "output", "visibility", "status"} <= set(t)
        assert 0 <= t["score"] <= t["max_score"] and t["status"] in ("passed", "failed")
        assert t["visibility"] in ("visible", "after_published")
    assert abs(sum(t["score"] for t in data["tests"]) - data["score"]) < 1e-3
    assert {t["visibility"] for t in data["tests"]} == {"visible", "after_published"}
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["submission"] for r in rows] == list(results)
    assert float({r["submission"]: r["score"] for r in rows}["nan"]) == data["score"]


def test_progress_and_no_kernel_left(a1_graded):
    results, _, seen, kernels = a1_graded
    assert [d for d, _ in seen] == list(range(1, len(results) + 1))
    assert sorted(n for _, n in seen) == sorted(results)
    assert kernels == []
    pids = [pid for r in results.values() for pid in r["extra_data"]["kernel_pids"]]
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_a_stubborn_loop_costs_one_timeout(a1_graded):
    res = a1_graded[0]["stubborn_loop"]
    q3 = [t for t in res["tests"] if t["extra_data"]["question"] == "q3"]
    assert sum(t["output"].startswith("timed out after") for t in q3) == 1
    assert sum(t["extra_data"]["seconds"] for t in q3) < TIMEOUT + 5


# ---------------------------------------------------------------------------
# Assignments 2 and 3: masters get full marks, stubs zero
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a2_attention", "a3_tiled"])
def test_other_assignments_master_full_stub_zero(name, tmp_path):
    subs = [str(COURSEWORK / name / "master.ipynb"), str(COURSEWORK / name / "student" / f"{name}.ipynb")]
    (_, master), (_, stub) = grade_all(COURSEWORK / name / "autograder", subs, tmp_path,
                                       opts=_opts(timeout=30), jobs=2)
    assert master["score"] == master["extra_data"]["max_score"] == 10.0, master["tests"]
    assert stub["score"] == 0.0, _scores(stub)
    assert not _kernels()


# ---------------------------------------------------------------------------
# The command line and Gradescope
# ---------------------------------------------------------------------------
def test_command_line_exit_codes(tmp_path, capsys, monkeypatch):
    assert main(["assign", str(COURSEWORK / "a1_softmax" / "master.ipynb"), str(tmp_path / "out")]) == 0
    assert main(["assign", str(FIXTURES / "invalid_json.ipynb"), str(tmp_path / "bad")]) == 2
    ag = str(tmp_path / "out" / "autograder")
    flags = ["--timeout", "5", "--out", str(tmp_path / "graded")] + ([] if HAVE_BWRAP else ["--no-sandbox"])
    # an unreadable notebook and a mistyped path: results written, exit code 1
    assert main(["grade", ag, str(FIXTURES / "invalid_json.ipynb"), str(tmp_path / "nope.ipynb")] + flags) == 1
    captured = capsys.readouterr()
    assert "invalid_json  0 / 8" in captured.out and "[2/2]" in captured.err
    assert (tmp_path / "graded" / "invalid_json" / "results.json").exists()
    assert (tmp_path / "graded" / "summary.csv").exists()
    assert main(["grade", str(tmp_path), str(FIXTURES / "invalid_json.ipynb"), "--out", str(tmp_path / "g2")]) == 2
    assert "not an autograder folder" in capsys.readouterr().err
    # no bubblewrap: refuse, and say how to install it
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    assert main(["grade", ag, str(FIXTURES / "invalid_json.ipynb"), "--out", str(tmp_path / "g3")]) == 2
    assert "apt-get install bubblewrap" in capsys.readouterr().err


@needs_bwrap
def test_gradescope_zip_runs_against_gradescope_layout(tmp_path):
    zpath = tmp_path / "autograder.zip"
    assert main(["gradescope", str(COURSEWORK / "a1_softmax" / "autograder"), str(zpath)]) == 0
    root = tmp_path / "autograder"
    with zipfile.ZipFile(zpath) as z:
        names = z.namelist()
        assert {"setup.sh", "run_autograder", "autograder/assignment.json", "autograder/tests/q1.py"} <= set(names)
        z.extractall(root / "source")
    (root / "submission").mkdir()
    (root / "submission" / "hw.ipynb").write_bytes((COURSEWORK / "a1_softmax" / "master.ipynb").read_bytes())
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), AUTOGRADER_PYTHON=sys.executable, GRADER_FLAGS="--timeout 30")
    subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, check=True, timeout=300)
    res = json.loads((root / "results" / "results.json").read_text())
    assert res["score"] == 8.0 and res["tests"]
