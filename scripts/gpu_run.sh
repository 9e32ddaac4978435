#!/usr/bin/env bash
# One prepared run on a lent GPU (issue 13): provenance and matmul peak, the CUDA tests,
# autotuning with the chosen configs recorded, the benchmark sweep (h200.csv), an HBM-traffic
# measurement, and chapters 18 and 9 re-executed natively. Everything lands in one folder.
#
#     bash scripts/gpu_run.sh [OUT] [--budget-s 450] [--steps a,b,...]   # on the GPU machine
#     bash scripts/gpu_run.sh --dry-run [OUT]                            # every step, tiny, on a CPU
#     make gpu [OUT=...]                                                 # the same as the first
#
# OUT defaults to $OUT (the device tool's output folder), else _build/gpu. On the GPU machine,
# first `bash scripts/gpu_wheels.sh` here and carry `.whl`: the wheels (nbclient, ipykernel...)
# are installed offline into a temporary folder, never into the machine's environment.
# scripts/gpu_run.py holds the steps, their time budget and their order. The sweep's h200.csv is
# committed as attention_lib/data/h200.csv: recorded sweeps are package data (chapter 18 reads them).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

SITE=""
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import nbclient, ipykernel" 2>/dev/null; then
  SITE=$(mktemp -d /tmp/gpu_site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_run.py "$@"
