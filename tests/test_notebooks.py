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


def _setup_cell_module():
    """scripts/setup_cell.py, the one canonical setup cell (a script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("setup_cell", ROOT / "scripts" / "setup_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_is_the_canonical_one(path):
    setup_cell = _setup_cell_module()
    nb = json.loads(path.read_text())
    header, _ = setup_cell.split(_src(setup_cell.setup_cell(nb)))
    assert header == setup_cell.expected(nb), (
        f"{path.name}: the setup cell's header differs from scripts/setup_cell.py; "
        f"run: python scripts/setup_cell.py notebooks/{path.name}"
    )


def test_setup_cell_checks_the_extras_that_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    setup_cell = _setup_cell_module()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in setup_cell.EXTRA_MODULES.items():
        names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in extras[extra]}
        names.discard("torch")  # a floor the extra raises on the base dependency, not a new package
        assert names == set(modules), f"extra {extra!r}: pyproject.toml declares {sorted(names)}, the setup cell checks {modules}"


def test_triton_chapters_get_the_triton_setup_cell():
    setup_cell = _setup_cell_module()
    assert '"triton"' in setup_cell.canonical(needs_triton=True)
    assert "[book,triton]" in setup_cell.canonical(needs_triton=True)
    assert "triton" not in setup_cell.canonical(needs_triton=False)


def _lower_bounds(requirements):
    lower = {}
    for req in requirements:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*(.*)", req)
        bound = re.search(r">=\s*([0-9][^,;\s]*)", m.group(2))
        assert bound, f"pyproject.toml: {req!r} has no lower bound (>=)"
        lower[m.group(1).lower()] = bound.group(1)
    return lower


def _pins(path):
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_lowest_constraints_pin_the_declared_lower_bounds():
    """.ci/lowest-*constraints.txt (make test-lowest, CI) install exactly the lower bounds of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    base = _lower_bounds(list(project["dependencies"]) + list(extras["book"]))
    with_triton = {**base, **_lower_bounds(extras["triton"])}  # the extra may raise torch's floor
    for constraints, lower in (("lowest-constraints.txt", base), ("lowest-triton-constraints.txt", with_triton)):
        pins = _pins(ROOT / ".ci" / constraints)
        for name, version in lower.items():
            assert pins.get(name) == version, f"{name}: pyproject.toml says >={version}, {constraints} pins {pins.get(name)}"
    assert "triton" not in _pins(ROOT / ".ci" / "lowest-constraints.txt"), "the base lowest run is without triton"
