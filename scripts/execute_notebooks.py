"""Execute notebooks in place and save their outputs, the way nbval will re-run them.

    python scripts/execute_notebooks.py notebooks/03_softmax.ipynb [...]
    python scripts/execute_notebooks.py            # every notebook under notebooks/

Runs each notebook in a fresh kernel of this environment with the working directory
set to the notebook's folder (as nbval does), without per-cell timing metadata, and
prints how long each took. Commit the result: `make test` checks that a fresh run
reproduces it.
"""

from __future__ import annotations

import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def execute(path: pathlib.Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata.pop("widgets", None)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    paths = [pathlib.Path(a) for a in argv] or sorted((ROOT / "notebooks").rglob("*.ipynb"))
    paths = [p for p in paths if ".ipynb_checkpoints" not in p.parts]
    total = 0.0
    for p in paths:
        t = execute(p.resolve())
        total += t
        print(f"{t:7.1f} s  {p}")
    print(f"{total:7.1f} s  total ({len(paths)} notebooks)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
