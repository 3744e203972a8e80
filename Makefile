# llmctl — the README's commands. `make demo` and `make test` set themselves up.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PRESET  ?= small
OUT     ?= out

.PHONY: setup demo test test-fast install-check lint format bench clean-out

setup: $(STAMP)

# torch==2.13.0 first: the CPU wheel lies on this machine's disk, so pip finds torch>=2.6
# already satisfied instead of downloading a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(MAKE) -f recipes/build.mk PRESET=$(PRESET) OUT=$(OUT) LLMCTL=$(BIN)/llmctl all

test: setup
	$(BIN)/pytest -n 2 --dist loadgroup -q
	$(MAKE) install-check

# Every command after a plain `pip install` (no dev extras), in a fresh venv: what users meet.
install-check:
	PY=$(PY) bash tests/install/runtime_only.sh

test-fast: setup
	$(BIN)/pytest -n 2 -q -m "not slow"

# Mutation testing of the critical modules (tests/mutate/modules.py, docs/testing.md); not part
# of `make test`. `make mutate MODULES=train/loop.py SAMPLE=10` runs one module, smaller.
mutate: setup
	nice -n 10 $(BIN)/python tests/mutate/run.py $(MODULES) $(if $(SAMPLE),--sample $(SAMPLE))

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

# The peers run from their own venvs so their pins never touch ours (datatrove: bench/clean.py).
PEER_VENV := bench/out/datatrove-venv
$(PEER_VENV)/bin/python:
	$(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet datatrove spacy

bench: setup $(PEER_VENV)/bin/python
	for b in bench/*.py; do $(BIN)/python $$b --markdown || exit 1; done

clean-out:
	rm -rf $(OUT)
