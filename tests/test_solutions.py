"""Every exercise solution's code runs, after its chapter, and asserts what it claims.

Solutions live in markdown cells as sphinx-exercise blocks, so nbval never executes them.
This test does: for each chapter of ``_toc.yml`` it collects the ```` ```python ```` code
blocks of every ``{solution}`` block, runs the chapter's own code cells in a fresh kernel of
this environment (as ``nbval --nbval-current-env`` does, with the kernel's working directory
set to ``notebooks/``), then runs the solution code in the same kernel, in the order of the
solutions in the notebook. ``make notebooks`` does the same within its nbval run
(``scripts/with_solutions.py`` appends the solutions as never-run cells), so this per-chapter
test is marked ``slow``; use it to debug one chapter's solutions (``-k 05`` selects chapter 5)::

    .venv/bin/python -m pytest -q -m slow tests/test_solutions.py -k 05      # add -s to see what each solution prints

How to write a solution's code so that this test can check it:

* Put code in a ```` ```python ```` fence inside the solution, and give the solution an
  outer fence longer than the inner one (```` ````{solution} label ```` ... ```` ```` ````),
  or a colon fence (``:::{solution}``). It may use every name the chapter defines.
* End with an assertion of what the prose claims; print what the prose quotes.
* Output to show, not to run, goes in a ```` ```text ```` fence. Any other fence (no
  language, ``py``, ``bash``...) or an indented code block fails
  ``test_solution_code_blocks_are_python_or_text``: nothing is skipped silently.
* A solution that demonstrates an error catches it itself, so that the demonstration is
  checked too (the error must happen) and the code still runs top to bottom::

      try:
          attention(q, k_wrong_shape, v)
      except ValueError as err:
          print(f"ValueError: {err}")
      else:
          raise AssertionError("expected a ValueError")

Chapter cells behave as under nbval: a ``raises-exception`` tag allows the cell to fail,
``nbval-skip`` and ``skip-execution`` skip it. A chapter without solution code is skipped
without starting a kernel.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import time

import nbformat
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
CHAPTER_CELL_TIMEOUT_S = 600  # per cell, as scripts/execute_notebooks.py
SOLUTION_CELL_TIMEOUT_S = 120  # per solution code block
RUN_LANGUAGES = {"python"}
SHOW_LANGUAGES = {"text"}
SKIP_TAGS = {"nbval-skip", "skip-execution"}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,}|:{3,})(?P<info>.*)$")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _toc_notebooks() -> list[pathlib.Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc)
    paths = [ROOT / f"{f}.ipynb" for f in files if f.startswith("notebooks/")]
    return [p for p in paths if p.exists()]


NOTEBOOKS = _toc_notebooks()


# --------------------------------------------------------------------------------------
# Parsing: fenced blocks (CommonMark / MyST rules, enough for this book)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Block:
    """A fenced block: ``info`` is the text after the fence, ``body`` its content."""

    info: str
    body: str
    line: int  # 1-based line of the opening fence within the markdown cell


@dataclasses.dataclass
class Solution:
    label: str
    cell: int  # index of the markdown cell in the notebook
    code: list[str]  # the python blocks, in order
    problems: list[str]  # blocks that would be skipped silently


def _fenced_blocks(text: str, offset: int = 0) -> tuple[list[Block], list[int]]:
    """The top-level fenced blocks of ``text`` and the lines of indented code blocks."""
    lines = text.splitlines()
    blocks: list[Block] = []
    indented: list[int] = []
    i = 0
    previous_blank, in_list = True, False
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if m and not (m["fence"][0] == "`" and "`" in m["info"]):
            fence, indent = m["fence"], len(m["indent"])
            body, j = [], i + 1
            while j < len(lines):
                close = _FENCE.match(lines[j])
                if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                    break
                body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
                j += 1
            blocks.append(Block(m["info"].strip(), "\n".join(body) + "\n", offset + i + 1))
            i, previous_blank = j + 1, False
            continue
        if not line.strip():
            previous_blank = True
        else:
            expanded = line.expandtabs(4)
            if previous_blank and expanded.startswith("    ") and not in_list:
                indented.append(offset + i + 1)
            elif not expanded.startswith(" "):
                in_list = bool(_LIST_ITEM.match(expanded))
            previous_blank = False
        i += 1
    return blocks, indented


def _directive(info: str) -> tuple[str, str] | None:
    """``{name} argument`` -> (name, argument); None for a code fence."""
    m = re.match(r"^\{([\w:-]+)\}\s*(.*)$", info)
    return (m[1], m[2].strip()) if m else None


def _collect_code(body: str, line0: int, code: list[str], problems: list[str]) -> None:
    blocks, indented = _fenced_blocks(body, line0)
    problems += [f"line {n}: an indented code block (use a ```python or ```text fence)" for n in indented]
    for b in blocks:
        d = _directive(b.info)
        if d is None:
            lang = b.info.split()[0] if b.info else ""
            if lang in RUN_LANGUAGES:
                code.append(b.body)
            elif lang not in SHOW_LANGUAGES:
                problems.append(f"line {b.line}: a code fence with language {lang!r} would not run (use python or text)")
        elif d[0] in {"code", "code-block", "sourcecode", "code-cell"}:
            if d[1].split()[:1] == ["python"]:
                code.append(re.sub(r"^(:\w[\w-]*:.*\n)+", "", b.body))
            elif d[1].split()[:1] != ["text"]:
                problems.append(f"line {b.line}: a {{{d[0]}}} block with language {d[1]!r} would not run")
        else:  # another directive ({note}, {math}...): look inside it
            _collect_code(b.body, b.line, code, problems)


def _cell_source(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def solutions(nb) -> list[Solution]:
    """Every ``{solution}`` block of the notebook, with its code, in notebook order."""
    found: list[Solution] = []

    def visit(text: str, line0: int, cell: int) -> None:
        for b in _fenced_blocks(text, line0)[0]:
            d = _directive(b.info)
            if d is None:
                continue
            if d[0] == "solution":
                label = d[1] or next(iter(re.findall(r"^:label:\s*(\S+)", b.body, re.M)), f"cell {cell}, line {b.line}")
                sol = Solution(label, cell, [], [])
                _collect_code(b.body, b.line, sol.code, sol.problems)
                found.append(sol)
            else:
                visit(b.body, b.line, cell)

    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            visit(_cell_source(cell), 0, index)
    return found


def _solution_directive_count(nb) -> int:
    pattern = re.compile(r"^ {0,3}(`{3,}|~{3,}|:{3,})\s*\{solution\}", re.M)
    return sum(len(pattern.findall(_cell_source(c))) for c in nb["cells"] if c["cell_type"] == "markdown")


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_the_parser_finds_code_and_flags_what_would_be_skipped():
    md = "\n".join([
        "````{solution} ex-a",
        ":class: dropdown",
        "Prose.",
        "```python",
        "x = 1",
        "```",
        "```text",
        "1",
        "```",
        "```",
        "no language",
        "```",
        "",
        "    indented = True",
        "",
        "- a list",
        "",
        "    continued item",
        "````",
        "",
        ":::{solution} ex-b",
        "````{note}",
        "```python",
        "y = 2",
        "```",
        "````",
        ":::",
        "```{solution} ex-c",
        "Only prose.",
        "```",
    ])
    nb = {"cells": [{"cell_type": "markdown", "source": md}]}
    found = solutions(nb)
    assert [s.label for s in found] == ["ex-a", "ex-b", "ex-c"]
    assert found[0].code == ["x = 1\n"]
    assert sorted(p.split(":")[0] for p in found[0].problems) == ["line 10", "line 14"]  # no language; indented
    assert found[1].code == ["y = 2\n"] and not found[1].problems  # inside a directive inside the solution
    assert found[2].code == [] and not found[2].problems
    assert _solution_directive_count(nb) == 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_solution_code_blocks_are_python_or_text(path):
    nb = nbformat.read(path, as_version=4)
    found = solutions(nb)
    assert len(found) == _solution_directive_count(nb), (
        f"{path.name}: {_solution_directive_count(nb)} {{solution}} fences, but only {len(found)} parse as "
        "solution blocks (is an outer fence as long as an inner one?)"
    )
    problems = [f"solution {s.label!r} (cell {s.cell}), {p}" for s in found for p in s.problems]
    assert not problems, f"{path.name}: code that would be skipped silently:\n" + "\n".join(problems)


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


def _text(cell) -> str:
    """What a solution printed (shown with ``pytest -s``, to compare with its prose)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"] + "\n")
    return _clean("".join(parts))


def run_solutions(path: pathlib.Path, cwd: pathlib.Path = NOTEBOOK_DIR) -> tuple[int, list[str]]:
    """Run the notebook's code cells, then its solution code, in one kernel.

    Returns the number of solution code blocks and one message per failed block. A failing
    chapter cell fails the test at once (its solutions could not run).
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    class CurrentEnvKernelManager(AsyncKernelManager):
        """The python of this test run, whatever kernelspecs are installed (nbval's current env)."""

        @property
        def kernel_spec(self):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3 (current env)",
                language="python",
            )

    nb = nbformat.read(path, as_version=4)
    chapter = [
        (i, c) for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and c.source.strip() and not SKIP_TAGS & set(c.metadata.get("tags", []))
    ]
    extra = [(s, k, nbformat.v4.new_code_cell(code)) for s in solutions(nb) for k, code in enumerate(s.code)]
    first = len(nb.cells)
    nb.cells += [cell for _, _, cell in extra]

    client = NotebookClient(
        nb,
        timeout=CHAPTER_CELL_TIMEOUT_S,
        kernel_manager_class=CurrentEnvKernelManager,
        resources={"metadata": {"path": str(cwd)}},
        record_timing=False,
        interrupt_on_timeout=True,
    )
    failures: list[str] = []
    with client.setup_kernel():
        start = time.perf_counter()
        for index, cell in chapter:
            try:
                client.execute_cell(cell, index)
            except (CellExecutionError, CellTimeoutError) as err:
                pytest.fail(f"{path.name}: chapter cell {index} failed, so its solutions cannot run:\n{_clean(str(err))}")
        chapter_s = time.perf_counter() - start
        client.timeout = SOLUTION_CELL_TIMEOUT_S
        for n, (s, k, cell) in enumerate(extra):
            where = f"solution {s.label!r} (markdown cell {s.cell}), code block {k + 1} of {len(s.code)}"
            try:
                client.execute_cell(cell, first + n)
                print(f"--- {where}: ok\n{_text(cell)}", end="")
            except CellTimeoutError:
                failures.append(f"{where}: timed out after {SOLUTION_CELL_TIMEOUT_S} s")
            except CellExecutionError as err:
                failures.append(f"{where} raised:\n{_clean(str(err))}")
    print(f"{path.name}: chapter cells {chapter_s:.1f} s, then {len(extra)} solution code blocks, {len(failures)} failed")
    return len(extra), failures


def test_a_failing_solution_is_reported_by_label(tmp_path):
    nb = nbformat.v4.new_notebook()
    bad = nbformat.v4.new_code_cell("raise KeyError('allowed')", metadata={"tags": ["raises-exception"]})
    nb.cells = [
        nbformat.v4.new_code_cell("import pathlib\nx = 1\nhere = pathlib.Path.cwd()"),
        bad,
        nbformat.v4.new_markdown_cell(
            f"````{{solution}} ex-good\n```python\nassert x == 1 and here.resolve() == pathlib.Path({str(tmp_path.resolve())!r})\n```\n````"
        ),
        nbformat.v4.new_markdown_cell("````{solution} ex-bad\n```python\nassert x == 2, 'x is not 2'\n```\n````"),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    n, failures = run_solutions(path, cwd=tmp_path)
    assert n == 2 and len(failures) == 1
    assert "'ex-bad'" in failures[0] and "AssertionError" in failures[0] and "x is not 2" in failures[0]


def test_nbval_runs_the_appended_solutions_and_fails_on_a_wrong_one(tmp_path):
    """`make notebooks` checks the solutions through scripts/with_solutions.py: a failing one must fail nbval."""
    import subprocess

    nb = nbformat.v4.new_notebook()
    first = nbformat.v4.new_code_cell("x = 1\nprint(x)", execution_count=1,
                                      outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")])
    nb.cells = [
        first,
        nbformat.v4.new_markdown_cell("````{solution} ex-good\n```python\nassert x == 1\nprint('shown, not compared')\n```\n````"),
        nbformat.v4.new_markdown_cell("````{solution} ex-bad\n```python\nassert x == 2, 'x is not 2'\n```\n````"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "src"
    src.mkdir()
    nbformat.write(nb, src / "nb.ipynb")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "with_solutions.py"), str(tmp_path / "out"),
                    str(src / "nb.ipynb")], check=True, capture_output=True)
    out = nbformat.read(tmp_path / "out" / "nb.ipynb", as_version=4)
    assert len(out.cells) == 5 and out.cells[-1].execution_count is None and not out.cells[-1].outputs
    r = subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-q", "-p", "no:cacheprovider",
                        str(tmp_path / "out" / "nb.ipynb")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and "1 failed, 2 passed" in r.stdout, r.stdout[-2000:]
    assert "x is not 2" in r.stdout


# `make notebooks` runs the solutions within its one nbval execution (scripts/with_solutions.py);
# this test runs them chapter by chapter, for debugging a solution (-k 05 -s).
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_solutions_run_after_their_chapter(path):
    if not any(s.code for s in solutions(nbformat.read(path, as_version=4))):
        pytest.skip(f"{path.name} has no solution code")
    n, failures = run_solutions(path)
    assert not failures, f"{path.name}: {len(failures)} of {n} solution code blocks failed\n\n" + "\n\n".join(failures)
