# sfa: set-up, demo, tests and benchmarks.
# `make demo` and `make test` work on a fresh machine that has only Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
# Override for a GPU machine, e.g. `make install TORCH=torch`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sfa info data/lesmis.mtx
	$(BIN)/sfa fit data/lesmis.mtx -o demo_out/lesmis_factors.npz --report demo_out/lesmis_fit.json --force
	$(BIN)/sfa compare data/lesmis.mtx

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_fit.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
