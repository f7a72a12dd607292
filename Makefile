# Two entry points: `make demo` (the default study, end to end) and `make test`.
# Each creates .venv and installs what it needs. The CPU torch wheel is pinned here only;
# users with their own (CUDA) torch install with `pip install -e .` instead.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
TORCH_INDEX ?=
OUT     ?= storage/default
CONFIG  ?= experiments/default.yaml
PAPER_OUT ?= paper
ANALYSIS ?=

MIN_VENV ?= .venv-min

.PHONY: demo test test-min paper install clean bench

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(TORCH_INDEX)
	# the rest through uv: parallel downloads and byte-compiling, ~55 s from a cold cache instead of pip's ~80 s here
	# (torch, already installed, is kept); plain pip where uv cannot be had
	$(BIN)/pip install -q uv && $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[test]" \
		|| $(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/gradtrace sweep "$(CONFIG)" --out "$(OUT)"
	$(BIN)/gradtrace stats "$(OUT)"
	$(BIN)/gradtrace predict "$(OUT)"
	$(BIN)/gradtrace report "$(OUT)"

# The suite in one single-thread pytest worker per CPU this process may use (pytest-xdist; at most 4, ~1 GB of memory
# each): 9 min instead of 16 on 2 vCPUs. The CPUs it may use, not the machine's: a cluster job or container pinned to
# 2 of 64 gets 2. TEST_WORKERS=0 runs it in this process, as a plain `pytest` does.
TEST_WORKERS ?= $(shell $(PY) -c "import os; print(min(4, len(os.sched_getaffinity(0)) \
	if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The tests with every dependency at the lowest release pyproject.toml allows (torch stays $(TORCH)), in a venv of
# their own: checks the lower bounds (uv keeps an installed package, so torch's filelock is reinstalled at its lowest)
test-min:
	$(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q "$(TORCH)" $(TORCH_INDEX) uv
	$(MIN_VENV)/bin/uv pip install -q --python $(MIN_VENV)/bin/python --resolution lowest-direct \
		--reinstall-package filelock -e ".[test]"
	OMP_NUM_THREADS=1 $(MIN_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS)

paper: install
	$(MAKE) -C paper PY="$(abspath $(BIN))/python" STORE="$$(realpath "$(OUT)")" PAPER_OUT="$$(realpath "$(PAPER_OUT)")" \
		$(if $(ANALYSIS),ANALYSIS="$$(realpath "$(ANALYSIS)")")

bench: install
	$(BIN)/python benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) $(MIN_VENV) *.egg-info
