"""Copies of the chapters with their exercise solutions appended, for one nbval run.

    python scripts/with_solutions.py OUT_DIR [notebooks/NN_name.ipynb ...]

Solutions live in markdown ``{solution}`` blocks, so nbval alone never runs them, and
running each chapter a second time only for its solutions (tests/test_solutions.py does
that, one chapter at a time, for debugging) doubles the time of the notebook tests. This
script writes, for every chapter (all of ``notebooks/`` by default), a copy in ``OUT_DIR``
whose extra code cells at the end are the solutions' ```` ```python ```` blocks, in
notebook order, never run (``execution_count`` None, no outputs). nbval runs those cells
after the chapter's own, compares nothing for them (there are no stored outputs), and
fails on any exception: one execution checks both the stored outputs and the solutions.

Any folder will do for ``OUT_DIR`` (the Makefile uses ``_build/nbval``): no chapter reads
files relative to its own folder, and the package data travel with ``attention_lib``.
"""

from __future__ import annotations

import pathlib
import sys

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_solutions import solutions  # noqa: E402  (the one parser of solution blocks)

TAG = "appended-solution"


def with_solutions(path: pathlib.Path, out_dir: pathlib.Path) -> int:
    """Write ``out_dir/<name>.ipynb``; return the number of solution cells appended."""
    nb = nbformat.read(path, as_version=4)
    cells = []
    for sol in solutions(nb):
        for k, code in enumerate(sol.code):
            header = f"# solution {sol.label!r} (markdown cell {sol.cell}), code block {k + 1} of {len(sol.code)}\n"
            cells.append(nbformat.v4.new_code_cell(header + code, metadata={"tags": [TAG]}))
    nb.cells += cells
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    return len(cells)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = pathlib.Path(argv[0])
    paths = [pathlib.Path(p) for p in argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    total = 0
    for p in paths:
        n = with_solutions(p, out_dir)
        total += n
    print(f"{len(paths)} chapters with {total} solution code cells appended -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
