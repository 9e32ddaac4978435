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

test: venv unit notebooks book-strict site

unit: venv
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "not slow and not redteam" --ignore=tests/test_site.py

notebooks: venv
	$(BIN)/python -m pytest $(NBVAL) -q -p no:cacheprovider --durations=0 notebooks

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

# The autograder red-team batch: every attack graded with honest notebooks in one run.
test-redteam: venv
	$(BIN)/python -m pytest tests/test_redteam.py -q -p no:cacheprovider -s

execute: venv
	$(BIN)/python scripts/execute_notebooks.py $(NB)

clean:
	rm -rf _build

# The prepared GPU run of issue 13 (on a GPU machine; first `bash scripts/gpu_wheels.sh` here and
# carry .whl). Output in $(GPU_OUT), else $$OUT, else _build/gpu. DRY=1: every step on the CPU, tiny.
.PHONY: gpu
gpu:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bash scripts/gpu_run.sh $(if $(DRY),--dry-run) $(GPU_OUT)
