"""The instructors' autograder of the attention course (``python -m attention_grader``).

    python -m attention_grader assign coursework/a1_softmax/master.ipynb out/
    python -m attention_grader grade out/autograder submissions/*.ipynb --out graded/
    python -m attention_grader gradescope out/autograder a1_autograder.zip

Students never need this package: ``check("q1")`` lives in ``attention_lib.grading``.
See book/coursework.md for what the sandbox protects and what it does not.
"""

__version__ = "0.1.0"
