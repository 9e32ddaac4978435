"""The autograder folder written by ``assign``: ``assignment.json`` and ``tests/<question>.py``.

The hidden tests are loaded into the *grader's* process (they are the instructor's code)
and never sent to a kernel. Each test is a function ``test_*(ns)`` that receives a
:class:`~attention_grader.remote.RemoteNamespace`; it raises ``CheckFailure`` to fail.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

from attention_lib.grading.public import PUBLIC

__all__ = ["Autograder", "Question", "Test", "test_name"]


def test_name(fn) -> str:
    """The first line of the docstring, else the function name made readable."""
    doc = (fn.__doc__ or "").strip()
    if doc:
        return doc.splitlines()[0]
    return fn.__name__.removeprefix("test_").replace("_", " ")


@dataclass
class Test:
    question: str
    kind: str  # "public" | "hidden"
    index: int
    fn: Callable
    name: str
    weight: float


@dataclass
class Question:
    name: str
    points: float
    functions: list[str]
    tests: list[Test] = field(default_factory=list)


def load_tests(source: str, filename: str) -> list[Callable]:
    env: dict = {"__name__": f"hidden_tests_{pathlib.Path(filename).stem}"}
    exec(compile(source, filename, "exec"), env)
    return [v for k, v in env.items() if k.startswith("test_") and callable(v)]


@dataclass
class Autograder:
    assignment: str
    title: str
    questions: list[Question]
    folder: pathlib.Path

    @property
    def max_score(self) -> float:
        return sum(q.points for q in self.questions)

    @classmethod
    def load(cls, folder) -> Autograder:
        folder = pathlib.Path(folder).resolve()
        meta = json.loads((folder / "assignment.json").read_text())
        name = meta["assignment"]
        if name not in PUBLIC:
            raise ValueError(f"attention_lib has no public checks for assignment {name!r}")
        questions = []
        for q in meta["questions"]:
            qn = str(q["name"])
            question = Question(qn, float(q["points"]), [str(f) for f in q.get("functions", [])])
            path = folder / "tests" / f"{qn}.py"
            hidden = load_tests(path.read_text(), str(path))
            for kind, fns in (("public", PUBLIC[name].get(qn, [])), ("hidden", hidden)):
                for i, fn in enumerate(fns):
                    question.tests.append(Test(qn, kind, i, fn, test_name(fn), float(getattr(fn, "weight", 1.0))))
            if not question.tests:
                raise ValueError(f"{qn} has no tests")
            questions.append(question)
        return cls(name, meta.get("title", name), questions, folder)
