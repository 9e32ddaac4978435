"""``assign``: turn a master notebook into a student notebook and an autograder folder.

A master notebook follows otter-grader's conventions:

* its first cell is a raw cell that starts with ``# ASSIGNMENT CONFIG`` followed by
  YAML: ``assignment`` (the name of its public checks in attention_lib), ``title`` and
  ``questions`` with their ``points`` and the ``functions`` the student writes for each
  (used for feedback: "q3 calls your softmax, which fails q2");
* solution code sits between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` lines, which
  become ``...  # YOUR CODE HERE`` in the student version;
* a code cell whose first line is ``# HIDDEN TESTS q1`` holds hidden tests of ``q1``:
  functions ``test_*(ns)`` that receive the student's namespace. These cells are moved
  to ``autograder/tests/q1.py`` and removed from the student version.

Output::

    out/student/<assignment>.ipynb      hand this out
    out/autograder/assignment.json      keep these: the grader reads them
    out/autograder/tests/q1.py ...
"""

from __future__ import annotations

import ast
import copy
import json
import pathlib
import re

import nbformat

from attention_lib.grading.public import PUBLIC

__all__ = ["assign", "strip_solutions", "AssignError"]

CONFIG_HEADER = "# ASSIGNMENT CONFIG"
BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
HIDDEN = re.compile(r"^# HIDDEN TESTS\s+(?P<q>\w+)\s*$")
PROMPT = "...  # YOUR CODE HERE"


class AssignError(ValueError):
    """The master notebook breaks a convention; the message says where."""


def count_tests(source: str) -> int:
    """Number of top-level ``def test_*`` in a hidden-test source (parsed, not run)."""
    return sum(isinstance(n, ast.FunctionDef) and n.name.startswith("test_") for n in ast.parse(source).body)


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace each ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block by a stub line."""
    out, inside = [], None
    for n, line in enumerate(source.split("\n"), 1):
        m = BEGIN.match(line)
        if m:
            if inside is not None:
                raise AssignError(f"{where}, line {n}: BEGIN SOLUTION inside another solution block")
            inside = m.group("indent")
            out.append(inside + PROMPT)
        elif END.match(line):
            if inside is None:
                raise AssignError(f"{where}, line {n}: END SOLUTION without BEGIN SOLUTION")
            inside = None
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise AssignError(f"{where}: BEGIN SOLUTION is never closed by END SOLUTION")
    return "\n".join(out)


def _config(nb) -> dict:
    import yaml

    if not nb.cells or not nb.cells[0].source.lstrip().startswith(CONFIG_HEADER):
        raise AssignError(f"the first cell must be a raw cell starting with {CONFIG_HEADER!r}")
    cfg = yaml.safe_load(nb.cells[0].source.lstrip()[len(CONFIG_HEADER):]) or {}
    for key in ("assignment", "questions"):
        if key not in cfg:
            raise AssignError(f"the ASSIGNMENT CONFIG cell has no {key!r}")
    return cfg


def assign(master: str | pathlib.Path, out: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write the student notebook and the autograder folder; return their paths."""
    master, out = pathlib.Path(master), pathlib.Path(out)
    try:
        nb = nbformat.read(master, as_version=4)
    except Exception as exc:  # not JSON, not a notebook, not there
        raise AssignError(f"cannot read the master notebook: {type(exc).__name__}: {str(exc)[:120]}") from exc
    cfg = _config(nb)
    name = cfg["assignment"]
    if name not in PUBLIC:
        raise AssignError(f"attention_lib.grading.public has no checks for assignment {name!r}")
    if not isinstance(cfg["questions"], dict):
        raise AssignError("`questions` in the ASSIGNMENT CONFIG cell should map each question to its points")
    questions = {str(q): (v or {}) for q, v in cfg["questions"].items()}
    hidden: dict[str, list[str]] = {q: [] for q in questions}
    student_cells = []
    for i, cell in enumerate(nb.cells[1:], 2):
        cell = copy.deepcopy(cell)
        if cell.cell_type == "code":
            first = cell.source.split("\n", 1)[0]
            m = HIDDEN.match(first)
            if m:
                if m.group("q") not in questions:
                    raise AssignError(f"cell {i}: hidden tests for {m.group('q')!r}, which is not in the config")
                hidden[m.group("q")].append(cell.source)
                continue
            cell.source = strip_solutions(cell.source, f"cell {i}")
            cell.outputs, cell.execution_count = [], None
        elif "BEGIN SOLUTION" in cell.source:
            raise AssignError(f"cell {i}: solution markers are supported in code cells only")
        cell.metadata.pop("execution", None)
        student_cells.append(cell)

    for q in questions:
        if not PUBLIC[name].get(q):
            raise AssignError(f"{q} has no public checks in attention_lib.grading.public[{name!r}]")
        if not hidden[q] or count_tests("\n\n".join(hidden[q])) == 0:
            raise AssignError(f"{q} has no hidden tests (a code cell starting with '# HIDDEN TESTS {q}')")

    student = nbformat.v4.new_notebook(cells=student_cells, metadata=copy.deepcopy(nb.metadata))
    for i, c in enumerate(student.cells):
        c["id"] = f"c{i:03d}"
    (out / "student").mkdir(parents=True, exist_ok=True)
    (out / "autograder" / "tests").mkdir(parents=True, exist_ok=True)
    student_path = out / "student" / f"{name}.ipynb"
    nbformat.write(student, student_path)
    for q, cells in hidden.items():
        src = "import math\n\nimport torch\n\nfrom attention_lib.grading.testing import *  # noqa: F403\n\n" + "\n\n".join(cells) + "\n"
        (out / "autograder" / "tests" / f"{q}.py").write_text(src)
    meta = {
        "assignment": name,
        "title": cfg.get("title", name),
        "questions": [{"name": q, "points": float(v.get("points", 1)), "functions": [str(f) for f in v.get("functions", [])]}
                      for q, v in questions.items()],
    }
    (out / "autograder" / "assignment.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"student": student_path, "autograder": out / "autograder"}
