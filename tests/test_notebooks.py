"""Policy checks on the committed notebooks (cheap: nothing is executed here).

nbval skips cells that were never executed, so an unexecuted cell would be a hole in
the notebook check: this test makes such a notebook fail.
"""

import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO_URL = CONFIG["repository"]["url"].rstrip("/")
INSTALL = re.compile(r"git\+(https://[^\s\"'@]+)")


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_was_executed(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] == "code" and _src(cell).strip():
            assert cell.get("execution_count") is not None, f"{path.name}: code cell {i} was never executed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_execution_counts_are_in_order(path):
    counts = [c["execution_count"] for c in _cells(path) if c["cell_type"] == "code" and _src(c).strip()]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: cells were run out of order: {counts}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_installs_from_the_configured_repository(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    first = _src(code[0])
    assert "import attention_lib" in first or "from attention_lib" in first, f"{path.name}: first code cell must import attention_lib"
    urls = INSTALL.findall(first)
    assert urls, f"{path.name}: first code cell must %pip install attention_lib from the repository on Colab"
    for url in urls:
        assert url.rstrip("/") == REPO_URL, f"{path.name}: installs from {url}, _config.yml says {REPO_URL}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_svg_outputs_and_no_errors(path):
    for i, cell in enumerate(_cells(path)):
        tags = cell.get("metadata", {}).get("tags", [])
        for out in cell.get("outputs", []):
            assert "image/svg+xml" not in out.get("data", {}), f"{path.name}: cell {i} has an SVG figure (use PNG)"
            if out.get("output_type") == "error":
                assert "raises-exception" in tags, f"{path.name}: cell {i} raised {out.get('ename')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_the_table_of_contents(path):
    toc = (ROOT / "_toc.yml").read_text()
    assert f"notebooks/{path.stem}" in toc, f"{path.name} is not listed in _toc.yml"
