"""``gradescope``: the autograder zip that Gradescope runs, as otter-grader's ``otter generate``.

The zip holds::

    setup.sh            installs bubblewrap, Python packages, attention_lib and this grader
    run_autograder      grades /autograder/submission/*.ipynb into /autograder/results/results.json
    requirements.txt    the pinned versions this course is tested with
    autograder/         assignment.json and tests/ (the hidden tests)
    attention_lib_src/  the course package (pyproject.toml and attention_lib/), to install
    grader/             this package (source), to install

Gradescope unpacks it into ``/autograder/source``. ``run_autograder`` honours two
environment variables so that it can be tried locally against a copy of Gradescope's
layout: ``AUTOGRADER_ROOT`` (default ``/autograder``) and ``AUTOGRADER_PYTHON`` (default
``python3``); ``GRADER_FLAGS`` adds options to ``grade`` (``--timeout 60``, say).
"""

from __future__ import annotations

import pathlib
import zipfile

from .autograder import Autograder

__all__ = ["write_zip", "SETUP_SH", "RUN_AUTOGRADER"]

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image.
set -euo pipefail
cd /autograder/source
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3 python3-pip python3-venv >/dev/null
python3 -m pip install -q --break-system-packages torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \\
  || python3 -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install -q --break-system-packages -r requirements.txt || python3 -m pip install -q -r requirements.txt
python3 -m pip install -q --break-system-packages --no-deps ./attention_lib_src ./grader \\
  || python3 -m pip install -q --no-deps ./attention_lib_src ./grader
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission: it grades the first notebook found in
# $ROOT/submission and writes $ROOT/results/results.json (Gradescope's schema).
set -u
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PY="${AUTOGRADER_PYTHON:-python3}"
mkdir -p "$ROOT/results"
fail() {  # a results.json that says what went wrong, with score 0
  "$PY" - "$ROOT/results/results.json" "$1" <<'PYEOF'
import json, sys
json.dump({"score": 0.0, "output": sys.argv[2], "stdout_visibility": "hidden", "tests": []},
          open(sys.argv[1], "w"), indent=2)
PYEOF
  exit 0
}
SUB="$(find "$ROOT/submission" -maxdepth 3 -type f -name '*.ipynb' 2>/dev/null | LC_ALL=C sort | head -n 1)"
[ -n "$SUB" ] || fail "No .ipynb file was found in your submission: upload the notebook itself."
OUT="$(mktemp -d)"
"$PY" -m attention_grader grade "$ROOT/source/autograder" "$SUB" --out "$OUT" ${GRADER_FLAGS:-} \\
  > "$OUT/grader-stdout.txt" 2> "$OUT/grader-stderr.txt"
RES="$(find "$OUT" -mindepth 2 -maxdepth 2 -name results.json | head -n 1)"
[ -n "$RES" ] || fail "The autograder could not run ($(tail -n 3 "$OUT/grader-stderr.txt" | tr '\\n' ' ')). Please tell your instructor."
cp "$RES" "$ROOT/results/results.json"
"""


def _add_tree(z: zipfile.ZipFile, src: pathlib.Path, dest: str) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts and not f.name.endswith((".pyc", ".egg-info")) \
                and not any(p.endswith(".egg-info") for p in f.parts):
            z.write(f, f"{dest}/{f.relative_to(src).as_posix()}")


def _exec(z: zipfile.ZipFile, name: str, text: str) -> None:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o755 << 16
    z.writestr(info, text)


def write_zip(autograder, out) -> pathlib.Path:
    """Write the Gradescope autograder zip of the folder ``autograder``; return its path."""
    import attention_lib

    ag = Autograder.load(autograder)  # refuses a folder that is not an autograder folder
    lib_root = pathlib.Path(attention_lib.__file__).resolve().parents[1]
    grader_root = pathlib.Path(__file__).resolve().parents[1]
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        _exec(z, "setup.sh", SETUP_SH)
        _exec(z, "run_autograder", RUN_AUTOGRADER)
        req = lib_root / "requirements.txt"
        if req.exists():
            keep = [l for l in req.read_text().splitlines()
                    if l.split("==")[0].strip() in {"numpy", "ipykernel", "nbformat", "jupyter_client", "pyzmq",
                                                      "psutil", "PyYAML", "pyyaml", "matplotlib"}]
            z.writestr("requirements.txt", "\n".join(keep) + "\n")
        z.write(ag.folder / "assignment.json", "autograder/assignment.json")
        _add_tree(z, ag.folder / "tests", "autograder/tests")
        _add_tree(z, lib_root / "attention_lib", "attention_lib_src/attention_lib")
        for f in ("pyproject.toml", "README.md", "LICENSE"):
            if (lib_root / f).exists():
                z.write(lib_root / f, f"attention_lib_src/{f}")
        z.write(grader_root / "pyproject.toml", "grader/pyproject.toml")
        _add_tree(z, grader_root / "attention_grader", "grader/attention_grader")
    return out
