# sfa: set-up, demo, tests and benchmarks.
# `make demo` and `make test` work on a fresh machine that has only Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch comes first and from PyTorch's CPU wheel index: from the plain package index a
# Linux torch is the CUDA build, with gigabytes of NVIDIA libraries. Where that index
# cannot be reached (probed for 5 s) the plain index is used instead: a local CPU wheel
# still wins there when pip has one (find-links). A CUDA build: `make install TORCH=torch`
# (the plain index), or name the index of one, `TORCH_INDEX=<PyTorch's cu126 index URL>`.
TORCH_CPU   := torch==2.13.0
TORCH       ?= $(TORCH_CPU)
TORCH_INDEX ?= $(if $(filter $(TORCH_CPU),$(TORCH)),https://download.pytorch.org/whl/cpu)
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench api-docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifneq ($(TORCH_INDEX),)
	@if $(BIN)/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
	        "$(TORCH_INDEX)/torch/" 2>/dev/null; then \
	    echo "$(PIP) install -q --index-url $(TORCH_INDEX) \"$(TORCH)\""; \
	    $(PIP) install -q --index-url "$(TORCH_INDEX)" "$(TORCH)"; \
	else \
	    echo "$(TORCH_INDEX) cannot be reached: $(TORCH) from the default package index"; \
	    $(PIP) install -q "$(TORCH)"; \
	fi
else
	$(PIP) install -q "$(TORCH)"
endif
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sfa info data/lesmis.mtx
	mkdir -p demo_out
	$(BIN)/sfa fit data/lesmis.mtx -o demo_out/lesmis_factors.npz --report demo_out/lesmis_fit.json --force
	$(BIN)/sfa compare data/lesmis.mtx

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_fit.py

# docs/api.md from the docstrings (tests/test_api_docs.py fails when it is out of date).
api-docs: $(STAMP)
	$(BIN)/python scripts/gen_api_docs.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
