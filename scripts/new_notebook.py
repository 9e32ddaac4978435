"""Build a notebook from a plain-text source with `# %%` cell markers (jupytext's
"percent" format, without needing jupytext), then execute it.

    python scripts/new_notebook.py draft.py notebooks/03_softmax.ipynb

`# %% [markdown]` starts a markdown cell whose lines are written as `# text`;
`# %%` starts a code cell; `# %% tags=["nbval-ignore-output"]` adds cell tags.
An authoring aid only: the committed .ipynb is the source of truth.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import nbformat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from execute_notebooks import KERNELSPEC, execute  # noqa: E402

MARKER = re.compile(r"^# %%(?P<md> \[markdown\])?(?:\s+tags=(?P<tags>\[.*\]))?\s*$")


def parse(text: str) -> nbformat.NotebookNode:
    cells, kind, tags, buf = [], None, [], []

    def flush():
        if kind is None:
            return
        src = "\n".join(buf).strip("\n")
        if kind == "markdown":
            src = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in src.split("\n"))
            cell = nbformat.v4.new_markdown_cell(src)
        else:
            cell = nbformat.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = tags
        cells.append(cell)

    for line in text.split("\n"):
        m = MARKER.match(line)
        if m:
            flush()
            kind = "markdown" if m.group("md") else "code"
            tags = json.loads(m.group("tags")) if m.group("tags") else []
            buf = []
        else:
            buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = KERNELSPEC
    return nb


def main() -> int:
    src, dst = map(pathlib.Path, sys.argv[1:3])
    nb = parse(src.read_text())
    for i, c in enumerate(nb.cells):
        c["id"] = f"c{i:03d}"
    nbformat.write(nb, dst)
    print(f"{execute(dst.resolve()):.1f} s  {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
