"""Coursework for the course: public checks for students, and an autograder for instructors.

In a student notebook::

    from attention_lib.grading import checker
    check = checker("a1_softmax")
    check("q1")          # runs the public checks of question 1 on this notebook's functions

This package is the student side only: the public checks (``public.py``) and the
helpers that checks are written with (``testing.py``). The instructors' autograder,
with the hidden tests, the sandbox and Gradescope, is its own package,
``attention_grader`` in ``grader/`` (see book/coursework.md)::

    python -m attention_grader assign coursework/a1_softmax/master.ipynb out/
    python -m attention_grader grade out/autograder submissions/*.ipynb --out graded/

Importing this package needs only torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .public import PUBLIC
from .testing import CheckFailure

__all__ = ["check", "checker", "CheckResult", "CheckFailure", "PUBLIC"]


@dataclass
class CheckResult:
    """The outcome of ``check("qN")``; its repr is the report shown in the notebook."""

    question: str
    lines: list[tuple[bool, str, str]] = field(default_factory=list)  # (passed, name, message)

    @property
    def passed(self) -> bool:
        return bool(self.lines) and all(ok for ok, _, _ in self.lines)

    def __repr__(self) -> str:
        n_ok = sum(ok for ok, _, _ in self.lines)
        head = f"{self.question}: {n_ok}/{len(self.lines)} public checks passed"
        if self.passed:
            head += ". Well done (the hidden tests go further: odd shapes, masks, edge cases)."
        out = [head]
        for ok, name, msg in self.lines:
            out.append(f"  {'✔' if ok else '✘'} {name}" + ("" if ok else f"\n      {msg}"))
        return "\n".join(out)


def check(question: str, assignment: str, ns: dict | None = None) -> CheckResult:
    """Run the public checks of ``assignment``/``question`` on the functions in ``ns``.

    ``ns`` defaults to the caller's globals, i.e. the notebook's namespace.
    """
    if ns is None:
        ns = sys._getframe(1).f_globals
    questions = PUBLIC.get(assignment)
    if questions is None:
        raise ValueError(f"unknown assignment {assignment!r}; known: {sorted(PUBLIC)}")
    if question not in questions:
        raise ValueError(f"{assignment} has no question {question!r}; it has {sorted(questions)}")
    result = CheckResult(question)
    for fn in questions[question]:
        doc = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        try:
            fn(ns)
            result.lines.append((True, doc, ""))
        except CheckFailure as exc:
            result.lines.append((False, doc, str(exc)))
        except Exception as exc:  # never let a check crash the student's notebook
            result.lines.append((False, doc, f"the check could not run: {type(exc).__name__}: {exc}"))
    return result


def checker(assignment: str):
    """``check = checker("a1_softmax")`` gives a ``check("q1")`` bound to this notebook."""
    if assignment not in PUBLIC:
        raise ValueError(f"unknown assignment {assignment!r}; known: {sorted(PUBLIC)}")
    ns = sys._getframe(1).f_globals

    def check_question(question: str) -> CheckResult:
        return check(question, assignment, ns)

    check_question.__doc__ = f"Run the public checks of {assignment}, question `question` (e.g. 'q1')."
    return check_question
