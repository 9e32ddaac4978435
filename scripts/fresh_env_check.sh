#!/usr/bin/env bash
# Every chapter as a student gets it: the wheel installed into a fresh venv as the README says,
# each notebook copied ALONE into an empty folder (no repository around it) and executed there.
#
#     bash scripts/fresh_env_check.sh [NOTEBOOK...]      # default: every notebooks/*.ipynb
#
# Steps: `pip wheel --no-deps .`; a venv in $WORK (default: a new /tmp/fresh_env.XXXXXX) with
# `pip install "<wheel>[book]"` (plus $TORCH, default torch==2.13.0, and ipykernel + nbclient to
# run the notebooks); every notebook but 09 runs there; then `pip install "<wheel>[triton]"`, as
# the README says for chapter 9, and 09 runs. Each notebook runs with nbclient, cwd = its empty
# folder, in a kernel of that venv. Also checks that the grader's entry points fail with a
# message that names what to install. Prints one line per notebook (ok/FAILED, seconds) and exits
# 1 if any failed. Set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu on a machine
# without CUDA (as CI does) so that torch does not pull CUDA packages. Network: PyPI only; the
# setup cells install nothing when the package and its extras are there (which this checks:
# a setup cell that reached for git would fail here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
WORK=${WORK:-$(mktemp -d /tmp/fresh_env.XXXXXX)}
TIMEOUT=${TIMEOUT:-900}
mkdir -p "$WORK"
echo "fresh environment in $WORK"

if [ $# -gt 0 ]; then NOTEBOOKS=("$@"); else NOTEBOOKS=(notebooks/*.ipynb); fi

"$PY" -m pip wheel -q --no-deps . -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/attention_lib-*.whl | head -1)
# The recorded sweeps must be in the wheel (chapter 18 reads them with importlib.resources).
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
data = [n for n in names if n.startswith("attention_lib/data/") and n.endswith(".csv")]
assert data, f"no attention_lib/data/*.csv in {sys.argv[1]}"
print("wheel:", sys.argv[1].rsplit("/", 1)[-1], "with", ", ".join(d.rsplit("/", 1)[-1] for d in data))
EOF

"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "$WHEEL[book]" "$TORCH" ipykernel nbclient

run_notebook() {  # run_notebook NOTEBOOK: copy it alone into an empty folder, execute it there
  local nb=$1 dir
  dir=$(mktemp -d "$WORK/run.XXXXXX")
  cp "$nb" "$dir/"
  (cd "$dir" && "$VPY" - "$(basename "$nb")" "$TIMEOUT" <<'EOF'
import pathlib, sys, time
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

path, timeout = pathlib.Path(sys.argv[1]), int(sys.argv[2])
nb = nbformat.read(path, as_version=4)
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": "."}})
t0 = time.perf_counter()
try:
    client.execute()
except CellExecutionError as exc:
    print(f"FAILED {path.name} after {time.perf_counter() - t0:.1f} s: {str(exc).strip().splitlines()[-1][:300]}")
    sys.exit(1)
installs = [c for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "Successfully installed" in str(o.get("text", ""))]
if installs:  # the setup cell must not have needed to install anything: the README's install line did it
    print(f"FAILED {path.name}: its setup cell installed packages")
    sys.exit(1)
print(f"ok     {path.name} {time.perf_counter() - t0:.1f} s")
EOF
  ) && rm -rf "$dir"
}

failed=0
triton_nbs=()
for nb in "${NOTEBOOKS[@]}"; do
  if grep -qE '"(import triton|from triton)' "$nb"; then triton_nbs+=("$nb"); continue; fi
  run_notebook "$nb" || failed=1
done
if [ ${#triton_nbs[@]} -gt 0 ]; then
  "$VPY" -m pip install -q "$WHEEL[triton]"  # the README's extra for chapter 9
  for nb in "${triton_nbs[@]}"; do run_notebook "$nb" || failed=1; done
fi

# The grader is not a student's package: its entry points must say what to install.
out=$(cd "$WORK" && "$VPY" -m attention_lib.grading assign x y 2>&1) && { echo "FAILED: attention_lib.grading exited 0"; failed=1; }
if grep -q "pip install -e grader" <<<"$out"; then echo "ok     python -m attention_lib.grading names what to install";
else echo "FAILED: python -m attention_lib.grading: $out"; failed=1; fi
# the grader installed without its dependencies (a venv with nothing else in it)
"$PY" -m venv "$WORK/bare"
"$WORK/bare/bin/python" -m pip install -q --no-deps "$WHEEL" "$ROOT/grader"
out=$(cd "$WORK" && "$WORK/bare/bin/python" -m attention_grader assign x y 2>&1) && { echo "FAILED: attention_grader exited 0"; failed=1; }
if grep -q "pip install -e . -e grader" <<<"$out"; then echo "ok     python -m attention_grader without its dependencies names what to install";
else echo "FAILED: python -m attention_grader assign without its dependencies: $out"; failed=1; fi

exit $failed
