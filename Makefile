# llmctl — the README's commands. `make demo` and `make test` set themselves up.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime
PRESET  ?= small
OUT     ?= out
BUILD    = $(MAKE) -f recipes/build.mk PRESET=$(PRESET) OUT=$(OUT) LLMCTL=$(BIN)/llmctl

.PHONY: setup runtime demo test test-fast install-check chain-check report-check lint format \
	bench clean-out mutate

setup: $(STAMP)
runtime: $(RUNTIME)

# torch==2.13.0 first: the CPU wheel lies on this machine's disk, so pip finds torch>=2.6
# already satisfied instead of downloading a multi-GB CUDA build. The runtime dependencies
# alone are what `make demo` needs; the test oracles (transformers, peft, ...) come with setup.
$(RUNTIME): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole chain of recipes/build.mk; ends by printing the report's path. JOBS=2 runs
# independent branches side by side (the decode timings in the report then share the cores).
JOBS ?= 1
demo: runtime
	$(BUILD) -j$(JOBS) all

test: setup
	$(BIN)/pytest -n 2 --dist loadgroup -q
	$(MAKE) install-check

# The tiny chain end to end (also tests/test_build.py, in `make test`), a second make that has
# nothing to do, and the lineage of a quantized model back to the raw files.
chain-check: runtime
	$(MAKE) demo PRESET=tiny OUT=$(OUT)-tiny JOBS=2
	$(MAKE) -f recipes/build.mk PRESET=tiny OUT=$(OUT)-tiny LLMCTL=$(BIN)/llmctl -q \
		$(OUT)-tiny/report/manifest.json && echo "chain-check: a second make has nothing to do"
	$(BIN)/llmctl lineage $(OUT)-tiny/q-int4 > /dev/null

# Render the report as a browser would (headless Chromium) to REPORT_DIR.png, to look at.
REPORT_DIR ?= $(OUT)/report
CHROMIUM   ?= $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
report-check:
	@test -f $(REPORT_DIR)/report.html || { echo "report-check: no $(REPORT_DIR)/report.html; \
	run make demo (or REPORT_DIR=...)"; exit 1; }
	$(BIN)/python -c "import html.parser, sys; html.parser.HTMLParser().feed(open(sys.argv[1]).read())" \
		$(REPORT_DIR)/report.html
	@if [ -n "$(CHROMIUM)" ]; then \
		$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars \
			--window-size=1200,6000 --screenshot=$(abspath $(REPORT_DIR)).png \
			file://$(abspath $(REPORT_DIR))/report.html 2>/dev/null && \
		echo "report-check: rendered $(REPORT_DIR).png with $(CHROMIUM)"; \
	else echo "report-check: Chromium not installed, page not rendered (apt-get install chromium)"; fi

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
