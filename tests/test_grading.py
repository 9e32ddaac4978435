"""The coursework autograder: assign, grade, feedback, timeouts, and no kernel left behind.

One grading run of assignment 1 over the master, the untouched stub and one fixture
per failure mode (tests/fixtures/grading, written by make_fixtures.py) is shared by
most tests (module-scoped fixture). Timeouts are short (3 s) so the suite stays fast.
"""

from __future__ import annotations

import csv
import json
import pathlib
import nbformat
import psutil
import pytest

from attention_lib import softmax as lib_softmax
from attention_lib.grading import PUBLIC, check, checker
from attention_lib.grading.__main__ import main
from attention_lib.grading.assign import AssignError, assign, strip_solutions
from attention_lib.grading.grader import Autograder, grade_all, read_submission

ROOT = pathlib.Path(__file__).resolve().parents[1]
COURSEWORK = ROOT / "coursework"
FIXTURES = ROOT / "tests" / "fixtures" / "grading"
ASSIGNMENTS = ["a1_softmax", "a2_attention", "a3_tiled"]
TIMEOUT = 3.0  # seconds per test: the checks of assignment 1 take milliseconds


def _kernels_of_this_process() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any("ipykernel" in a for a in p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _scores(res: dict) -> dict[str, float]:
    return {q: v["score"] for q, v in res["extra_data"]["questions"].items()}


def _outputs(res: dict, question: str) -> str:
    return "\n".join(t["output"] for t in res["tests"] if t["name"].startswith(question + " "))


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
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    assert "HIDDEN TESTS" not in text and "def test_" not in text and "ASSIGNMENT CONFIG" not in text
    code = "\n".join(c.source for c in student.cells if c.cell_type == "code")
    assert code.count("...  # YOUR CODE HERE") == 3
    for q in ("q1", "q2", "q3"):
        assert f'check("{q}")' in text  # the public checks stay
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in student.cells if c.cell_type == "code")
    ag = Autograder.load(paths["autograder"])
    assert [q.name for q in ag.questions] == ["q1", "q2", "q3"]
    assert all(q.n_public >= 2 and q.n_hidden >= 2 for q in ag.questions)
    # the committed student version and autograder are what `assign` produces today
    committed = nbformat.read(COURSEWORK / name / "student" / f"{name}.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in student.cells], f"re-run assign for {name}"
    for f in (paths["autograder"] / "tests").iterdir():
        assert f.read_text() == (COURSEWORK / name / "autograder" / "tests" / f.name).read_text(), f"re-run assign for {name}"


def test_assign_rejects_a_question_without_hidden_tests(tmp_path):
    nb = nbformat.read(COURSEWORK / "a1_softmax" / "master.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if not c.source.startswith("# HIDDEN TESTS q2")]
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nb, bad)
    with pytest.raises(AssignError, match="q2 has no hidden tests"):
        assign(bad, tmp_path / "out")


# ---------------------------------------------------------------------------
# check("q1") in the student's notebook (in process: it is the student's own code)
# ---------------------------------------------------------------------------
def test_check_reports_each_public_check():
    ok = check("q2", "a1_softmax", {"softmax": lib_softmax})
    assert ok.passed and "3/3 public checks passed" in repr(ok)
    missing = check("q3", "a1_softmax", {})
    assert not missing.passed and "`masked_softmax` is not defined" in repr(missing)
    bound = checker("a1_softmax")  # binds this module's globals, like a notebook's
    assert not bound("q1").passed  # no dot_scores here
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


# ---------------------------------------------------------------------------
# One grading run of assignment 1, shared by the tests below
# ---------------------------------------------------------------------------
FAILURES = {
    # fixture: (scores per question, question, text the feedback must contain)
    "exception": ({"q1": 2.0, "q2": 0.0, "q3": 3.0}, "q2", "`softmax` raised TypeError: unsupported operand"),
    "infinite_loop": ({"q1": 2.0, "q2": 3.0, "q3": 0.0}, "q3", "timed out after 3 s"),
    "stubborn_loop": ({"q1": 2.0, "q2": 3.0, "q3": 0.0}, "q3", "timed out after 3 s"),
    "wrong_shape": ({"q1": 0.0, "q2": 3.0, "q3": 3.0}, "q1", "has shape (5, 3), expected (3, 5)"),
    "nan": ({"q1": 2.0, "q2": 3.0, "q3": 2.0}, "q3", "contains NaN"),
    "in_place": ({"q1": 2.0, "q2": 0.0, "q3": 3.0}, "q2", "modified its argument 1 in place"),
    "missing_function": ({"q1": 2.0, "q2": 3.0, "q3": 0.0}, "q3", "`masked_softmax` is not defined"),
    "kernel_crash": ({"q1": 2.0, "q2": 0.0, "q3": 3.0}, "q2", "the kernel crashed"),
    "invalid_json": ({"q1": 0.0, "q2": 0.0, "q3": 0.0}, "q1", "the notebook could not be read"),
}


@pytest.fixture(scope="module")
def a1_graded(tmp_path_factory):
    out = tmp_path_factory.mktemp("a1")
    subs = [COURSEWORK / "a1_softmax" / "master.ipynb", COURSEWORK / "a1_softmax" / "student" / "a1_softmax.ipynb"]
    subs += [FIXTURES / f"{name}.ipynb" for name in FAILURES]
    kernels_before = len(_kernels_of_this_process())
    results = grade_all(COURSEWORK / "a1_softmax" / "autograder", [str(s) for s in subs], out / "graded",
                        timeout=TIMEOUT, progress=False)
    kernels_after = len(_kernels_of_this_process())
    return {r["_name"]: r for r in results}, out / "graded", kernels_before, kernels_after


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
    assert _scores(res) == scores, res["output"]
    assert text in _outputs(res, question), _outputs(res, question)


def test_results_json_follows_the_gradescope_schema(a1_graded):
    results, folder, _, _ = a1_graded
    data = json.loads((folder / "nan" / "results.json").read_text())
    assert {"score", "output", "tests", "execution_time"} <= set(data)
    for t in data["tests"]:
        assert set(t) == {"name", "score", "max_score", "output", "visibility"}
        assert 0 <= t["score"] <= t["max_score"]
        assert t["visibility"] in ("visible", "after_published")
    assert abs(sum(t["score"] for t in data["tests"]) - data["score"]) < 1e-3
    assert {t["visibility"] for t in data["tests"]} == {"visible", "after_published"}  # hidden tests stay hidden
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["submission"] for r in rows] == list(results)
    assert {r["submission"]: float(r["score"]) for r in rows}["nan"] == 7.0


def test_infinite_loops_are_cut_off_at_the_timeout(a1_graded):
    results = a1_graded[0]
    # KeyboardInterrupt stops an ordinary loop at the timeout ...
    assert results["infinite_loop"]["extra_data"]["slowest_test_s"] < TIMEOUT + 2.0
    assert "infinite loop" in results["infinite_loop"]["output"]
    # ... and a loop that swallows it is killed by the watchdog; grading goes on in a new kernel
    assert len(results["stubborn_loop"]["extra_data"]["kernel_pids"]) >= 2


def test_no_kernel_is_left_running(a1_graded):
    results, _, before, after = a1_graded
    assert after == before == 0
    pids = [pid for r in results.values() for pid in r["extra_data"]["kernel_pids"]]
    assert len(pids) >= len(results) - 1  # one kernel per readable submission, or more
    assert not [pid for pid in pids if _alive(pid)]


# ---------------------------------------------------------------------------
# Assignments 2 and 3: masters get full marks, stubs zero
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a2_attention", "a3_tiled"])
def test_other_assignments_master_full_stub_zero(name, tmp_path):
    subs = [str(COURSEWORK / name / "master.ipynb"), str(COURSEWORK / name / "student" / f"{name}.ipynb")]
    master, stub = grade_all(COURSEWORK / name / "autograder", subs, tmp_path, timeout=30, progress=False)
    assert master["score"] == master["extra_data"]["max_score"] == 10.0, master["output"]
    assert stub["score"] == 0.0, _scores(stub)
    assert not _kernels_of_this_process()


# ---------------------------------------------------------------------------
# The command line (no kernel needed for an unreadable notebook)
# ---------------------------------------------------------------------------
def test_command_line(tmp_path, capsys):
    assert main(["assign", str(COURSEWORK / "a1_softmax" / "master.ipynb"), str(tmp_path / "out")]) == 0
    assert "student notebook" in capsys.readouterr().out
    assert main(["assign", str(FIXTURES / "invalid_json.ipynb"), str(tmp_path / "bad")]) == 2
    capsys.readouterr()
    argv = ["grade", str(tmp_path / "out" / "autograder"), str(FIXTURES / "invalid_json.ipynb"),
            "--timeout", "5", "--out", str(tmp_path / "graded")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "invalid_json  0 / 8" in captured.out
    assert "grading a1_softmax" in captured.err and "1/1" in captured.err  # the tqdm bar
    assert (tmp_path / "graded" / "invalid_json" / "results.json").exists()
    assert (tmp_path / "graded" / "summary.csv").exists()
    assert main(["grade", str(tmp_path), str(FIXTURES / "invalid_json.ipynb")]) == 2  # not an autograder folder
    assert "not an autograder folder" in capsys.readouterr().err


def test_wall_clock_limit_per_submission(tmp_path):
    (res,) = grade_all(COURSEWORK / "a1_softmax" / "autograder", [str(FIXTURES / "infinite_loop.ipynb")], tmp_path,
                       timeout=TIMEOUT, submission_timeout=4.0, progress=False)
    # The loop costs one timeout in its notebook cell and one in the first q3 test:
    # 2 x 3 s, more than the 4 s limit whatever the machine's speed.
    messages = "\n".join(t["output"] for t in res["tests"])
    assert "hit the overall limit of 4 s" in messages
    assert res["execution_time"] < 4.0 + 15.0  # the limit, plus one kernel start and kill on a loaded machine
    assert not _kernels_of_this_process()
