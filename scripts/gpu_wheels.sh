#!/usr/bin/env bash
# Download, here, the wheels that scripts/gpu_run.sh installs offline on the GPU machine.
#
#     bash scripts/gpu_wheels.sh            # into .whl/ (ignored by git; carried to the machine)
#
# The GPU machine (Python 3.12, torch 2.11, triton 3.6, pytest, pytest-xdist, matplotlib,
# psutil, pyyaml, jinja2, packaging, attrs, python-dateutil, typing-extensions, pygments,
# tqdm: see /work/.library/device/KINDS.md) has no Jupyter kernel packages and no network.
# These are the kernel and notebook-runner packages nbclient needs, pure Python or built
# for CPython 3.12 on manylinux x86-64, at the versions this project's own environment
# runs (requirements.txt), with nothing that the machine already has.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=${1:-.whl}
WHEELS=(
  nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  jupyter_client==8.10.0 jupyter_core==5.9.1 traitlets==5.16.1 platformdirs==4.14.9
  ipykernel==7.4.0 comm==0.2.3 debugpy==1.8.22 nest-asyncio2==1.7.4 tornado==6.6.1 pyzmq==27.3.0
  matplotlib-inline==0.2.2 ipython==9.18.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1 parso==0.8.7
  prompt_toolkit==3.0.53 wcwidth==0.9.4 pexpect==4.9.0 ptyprocess==0.7.0 stack-data==0.6.3
  executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4
)
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d "$DEST" "${WHEELS[@]}"
ls "$DEST"
du -sh "$DEST"
