# The two commands of the README: `make book` and `make test`.
# Both create .venv on first use; CI (.ci/run) calls `make test` on a clean clone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
BOOK_FLAGS := -W -n --keep-going

.PHONY: test-redteam bwrap book test venv unit notebooks book-strict site chromium execute clean help

help:
	@echo "make book     build the HTML book into _build/html"
	@echo "make test     unit tests, notebooks under nbval, strict book build, browser tests"
	@echo "make execute  re-execute notebooks in place (NB=path to run one)"
	@echo "make lint     ruff over attention_lib;  make typecheck: mypy over attention_lib"
	@echo "make test-slow  the large test grids marked slow"

$(STAMP): requirements.txt pyproject.toml grader/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip install -q --no-deps -e grader
	touch $@

venv: $(STAMP) bwrap

# Debian's bubblewrap, the sandbox of the autograder; installed when missing and we are root.
bwrap:
	@if command -v bwrap >/dev/null 2>&1 || [ -x /usr/bin/bwrap ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing bubblewrap with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	else echo "no bubblewrap and no rights to install it: sandboxed grading tests will skip (apt-get install bubblewrap)"; fi

book: venv
	$(BIN)/jupyter-book build . $(BOOK_FLAGS)

test: venv lint typecheck unit test-redteam notebooks book-strict site

unit: venv
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "not slow and not redteam" --ignore=tests/test_site.py

# The large grids marked `slow` (minutes; CI runs them weekly: .github/workflows/slow.yml).
.PHONY: test-slow lint typecheck
test-slow: venv
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "slow and not redteam" --ignore=tests/test_site.py --durations=20

# Lint and type-check the package; the rules are in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: venv
	$(BIN)/ruff check attention_lib grader/attention_grader

typecheck: venv
	$(BIN)/mypy

# Every chapter under strict nbval, with its exercise solutions appended as extra cells
# (scripts/with_solutions.py): one execution checks the stored outputs and the solutions.
notebooks: venv
	rm -rf _build/nbval
	$(BIN)/python scripts/with_solutions.py _build/nbval
	$(BIN)/python -m pytest $(NBVAL) -q -p no:cacheprovider --durations=0 _build/nbval

book-strict: venv
	rm -rf _build/html _build/.doctrees _build/jupyter_execute
	$(BIN)/jupyter-book build . $(BOOK_FLAGS)

# Browser tests against the built book (run after book-strict).
site: venv chromium
	$(BIN)/python -m pytest tests/test_site.py -q -p no:cacheprovider

# Debian's Chromium for the browser tests; installed when missing and we are root.
chromium:
	@if [ -n "$$CHROMIUM_PATH" ] || [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no Chromium and no rights to install it: browser tests will skip (apt-get install chromium)"; fi

# The autograder red-team batch: every attack graded with honest notebooks in one run (part of `make test`).
test-redteam: venv
	$(BIN)/python -m pytest tests/test_redteam.py tests/test_redteam_more.py -q -p no:cacheprovider -s

execute: venv
	$(BIN)/python scripts/execute_notebooks.py $(NB)

clean:
	rm -rf _build

# The prepared GPU run of issue 13 (on a GPU machine; first `bash scripts/gpu_wheels.sh` here and
# carry .whl). Output in $(GPU_OUT), else $$OUT, else _build/gpu. DRY=1: every step on the CPU, tiny.
.PHONY: gpu
gpu:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bash scripts/gpu_run.sh $(if $(DRY),--dry-run) $(GPU_OUT)

# The lowest versions pyproject.toml declares, in venvs of their own (CI: .github/workflows/lowest.yml).
# 1. .ci/lowest-constraints.txt (the package and [book], no triton): the unit tests, then the
#    chapters whose features depend on versions, run to the end (nbval-lax: other digits may print).
# 2. .ci/lowest-triton-constraints.txt ([book,triton]: triton's floor and the torch floor it needs):
#    the tests that use triton or torch.compile, and chapters 9 and 10.
# Without CUDA, first export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (PyPI's torch
# pulls CUDA packages and pins its own triton).
LOWEST := _build/venv-lowest
LOWEST_TOOLS := pytest pytest-timeout hypothesis nbval nbclient nbformat ipykernel PyYAML
LOWEST_NOTEBOOKS := notebooks/05_masking.ipynb notebooks/06_multi_head.ipynb notebooks/10_linear_and_local.ipynb
# not here: the browser tests, the red team, the GPU run's dry run and the solutions (no version features)
LOWEST_IGNORE := --ignore=tests/test_site.py --ignore=tests/test_redteam.py --ignore=tests/test_redteam_more.py --ignore=tests/test_gpu_run.py \
                 --ignore=tests/test_solutions.py
# (not test_sdpa_parity: torch 2.12's own SDPA returns zeros for head dim 0, fixed in 2.13; the base run has it)
LOWEST_TRITON_TESTS := tests/test_triton_flash.py tests/test_flex.py tests/test_bench.py
LOWEST_TRITON_NOTEBOOKS := notebooks/09_triton_kernel.ipynb notebooks/10_linear_and_local.ipynb
.PHONY: test-lowest
test-lowest:
	rm -rf $(LOWEST) $(LOWEST)-triton
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q -c .ci/lowest-constraints.txt -e ".[book]" -e grader $(LOWEST_TOOLS)
	$(LOWEST)/bin/python -m pip list | grep -iE '^(torch|triton|numpy|matplotlib|tqdm) '
	$(LOWEST)/bin/python -m pytest tests -q -p no:cacheprovider -m "not slow and not redteam" $(LOWEST_IGNORE)
	$(LOWEST)/bin/python -m pytest --nbval-lax --nbval-current-env -q -p no:cacheprovider $(LOWEST_NOTEBOOKS)
	$(PYTHON) -m venv $(LOWEST)-triton
	$(LOWEST)-triton/bin/python -m pip install -q --upgrade pip
	$(LOWEST)-triton/bin/python -m pip install -q -c .ci/lowest-triton-constraints.txt -e ".[book,triton]" $(LOWEST_TOOLS)
	$(LOWEST)-triton/bin/python -m pip list | grep -iE '^(torch|triton|numpy|matplotlib|tqdm) '
	$(LOWEST)-triton/bin/python -m pytest $(LOWEST_TRITON_TESTS) -q -p no:cacheprovider -m "not slow"
	$(LOWEST)-triton/bin/python -m pytest --nbval-lax --nbval-current-env -q -p no:cacheprovider $(LOWEST_TRITON_NOTEBOOKS)
