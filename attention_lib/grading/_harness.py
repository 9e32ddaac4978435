"""What the grader runs *inside the student's kernel* (never in the grader's process).

The grader sends short cells such as::

    import attention_lib.grading._harness as __grading__
    __grading__.load_hidden({"q1": "<source of the hidden tests>"})
    __grading__.run(globals(), "a1_softmax", "q1", "public", 0, "NONCE")

``run`` calls one check with the student's namespace and prints a single line
``NONCE{"passed": ..., "message": ...}``. The nonce is fresh for every submission,
so a line printed by the student's own code cannot pass for a result.
"""

from __future__ import annotations

import json

import torch

from .public import PUBLIC
from .testing import CheckFailure

_HIDDEN: dict[str, list] = {}


def load_hidden(sources: dict[str, str]) -> None:
    """Execute each question's hidden-test source and collect its ``test_*`` functions."""
    _HIDDEN.clear()
    for question, src in sources.items():
        env: dict = {"__name__": f"hidden_tests_{question}"}
        exec(compile(src, f"<hidden tests {question}>", "exec"), env)
        _HIDDEN[question] = [v for k, v in env.items() if k.startswith("test_") and callable(v)]


def tests_of(assignment: str, question: str, kind: str) -> list:
    if kind == "public":
        return PUBLIC.get(assignment, {}).get(question, [])
    return _HIDDEN.get(question, [])


def test_name(fn) -> str:
    """The first line of the docstring, else the function name made readable."""
    doc = (fn.__doc__ or "").strip()
    if doc:
        return doc.splitlines()[0]
    return fn.__name__.removeprefix("test_").replace("_", " ")


def run(ns: dict, assignment: str, question: str, kind: str, index: int, nonce: str) -> None:
    fn = tests_of(assignment, question, kind)[index]
    torch.manual_seed(0)
    try:
        fn(ns)
        result = {"passed": True, "message": ""}
    except CheckFailure as exc:
        result = {"passed": False, "message": str(exc)}
    except Exception as exc:  # a bug in the test itself, or a student object it tripped on
        result = {"passed": False, "message": f"the check could not run: {type(exc).__name__}: {exc}"}
    result["name"] = test_name(fn)
    print(nonce + json.dumps(result), flush=True)
