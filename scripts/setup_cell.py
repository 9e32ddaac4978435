"""The one setup cell of the chapters, and a tool that writes it into notebooks.

    python scripts/setup_cell.py notebooks/05_masking.ipynb [...]   # rewrite the setup cells
    python scripts/setup_cell.py --check notebooks/*.ipynb          # exit 1 if one differs
    python scripts/setup_cell.py --print [--triton]                 # show the canonical header

The first code cell of every chapter starts with a header that makes the chapter run
wherever it is opened: on Colab it always installs ``attention-lib[book]`` from the
course repository; anywhere else it installs the same thing only when the package or
one of the book's extras is missing, so a student who ran ``pip install
"attention-lib[book]"`` (README) installs nothing. Chapters that import triton get the
``[book,triton]`` header, in every environment where triton is missing, not only on
Colab. The header ends at ``_ = torch.manual_seed(0)``; what follows it in the cell
(the chapter's own imports and helpers) is kept as it is.

Only the cell's source changes: the header prints nothing, so the committed outputs
stay valid and no re-execution is needed. ``tests/test_notebooks.py`` checks that every
notebook's header is the canonical one.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADER_END = "_ = torch.manual_seed(0)"
# The modules of the extras, as pyproject.toml declares them (a test checks they agree).
EXTRA_MODULES = {"book": ("matplotlib", "tqdm"), "triton": ("triton",)}
TRITON_IMPORT = re.compile(r"^\s*(import triton|from triton\b)", re.M)


def repository_url() -> str:
    """The course repository, from _config.yml (read without PyYAML: one key)."""
    text = (ROOT / "_config.yml").read_text()
    match = re.search(r"^repository:\s*\n(?:[ \t]+.*\n)*?[ \t]+url:\s*(\S+)", text, re.M)
    if match is None:
        raise SystemExit("_config.yml has no repository.url")
    return match.group(1).rstrip("/")


def canonical(needs_triton: bool = False) -> str:
    """The header of the setup cell (no final newline)."""
    extras = ["book", "triton"] if needs_triton else ["book"]
    modules = ("attention_lib",) + tuple(m for e in extras for m in EXTRA_MODULES[e])
    needed = "(" + ", ".join(f'"{m}"' for m in modules) + ")"
    spec = f'"attention-lib[{",".join(extras)}] @ git+{repository_url()}"'
    return (
        "# Setup: on Colab, or wherever attention_lib or a package the book uses is missing,\n"
        "# install them from the course repository (the README's install line).\n"
        "import importlib.util\n"
        "import sys\n"
        "\n"
        f"_needed = {needed}\n"
        'if "google.colab" in sys.modules or not all(map(importlib.util.find_spec, _needed)):\n'
        f"    %pip install -q {spec}\n"
        "\n"
        "import torch\n"
        "import attention_lib\n"
        f"{HEADER_END}"
    )


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def setup_cell(nb: dict) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "code")


def needs_triton(nb: dict) -> bool:
    return any(c["cell_type"] == "code" and TRITON_IMPORT.search(_source(c)) for c in nb["cells"])


def split(source: str) -> tuple[str, str]:
    """(header, rest) of a setup cell's source; the header ends at ``HEADER_END``."""
    end = source.find(HEADER_END)
    if not source.startswith("# Setup") or end < 0:
        raise ValueError(f"not a setup cell: it must start with '# Setup' and contain {HEADER_END!r}")
    end += len(HEADER_END)
    return source[:end], source[end:]  # the rest starts with a newline, or is empty


def expected(nb: dict) -> str:
    return canonical(needs_triton(nb))


def rewrite(path: pathlib.Path) -> bool:
    """Replace the header of ``path``'s setup cell; True if the file changed."""
    text = path.read_text()
    nb = json.loads(text)
    cell = setup_cell(nb)
    header, rest = split(_source(cell))
    new = expected(nb)
    if header == new:
        return False
    lines = (new + rest).splitlines(keepends=True)
    cell["source"] = lines
    # nbformat's layout (indent 1, a final newline), so the diff is the cell's source only.
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a header differs")
    parser.add_argument("--print", action="store_true", help="print the canonical header")
    parser.add_argument("--triton", action="store_true", help="with --print: the header of chapters that import triton")
    args = parser.parse_args(argv)
    if args.print:
        print(canonical(args.triton))
        return 0
    bad = 0
    for path in args.notebooks:
        nb = json.loads(path.read_text())
        header, _ = split(_source(setup_cell(nb)))
        if args.check:
            if header != expected(nb):
                print(f"{path}: setup cell differs from scripts/setup_cell.py")
                bad += 1
        elif rewrite(path):
            print(f"{path}: setup cell rewritten")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
