# One-command set-up: every target installs what it needs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UNAME  := $(shell uname -s)
ifeq ($(UNAME),Darwin)
  MLX := mlx
else
  MLX := mlx[cpu]
endif

.PHONY: install test test-all chat serve bench selectors serve-load clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(MLX)"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,torch]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# Chat with the shipped demo model (converted to .cache/demo-bundle on first use).
chat: install
	$(VENV)/bin/ifprune chat

# The OpenAI-compatible server on http://127.0.0.1:8080/v1 (docs/SERVER.md).
serve: install
	$(VENV)/bin/ifprune serve

test-all: install
	$(PY) -m pytest -q -m ""

# Linux: preload OpenBLAS when present (the mlx[cpu] wheel's reference BLAS makes prefill ~20x slower).
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
WITH_BLAS = if [ "$(UNAME)" = Linux ] && [ -f $(OPENBLAS) ]; then export LD_PRELOAD=$(OPENBLAS); \
	elif [ "$(UNAME)" = Linux ]; then echo "note: no OpenBLAS (apt-get install libopenblas0-pthread); prefill will be slow" >&2; fi;

bench: install
	@$(WITH_BLAS) $(VENV)/bin/ifprune bench --out docs/BENCHMARKS.md --plot docs/benchmarks.png --json docs/benchmarks.json

# Trained predictor vs training-free selector: writes the tables of docs/SELECTORS.md.
selectors: install
	@$(WITH_BLAS) $(PY) -m examples.selector_study

# The server under concurrent load, mask affinity off and on: the table of docs/SERVER.md.
serve-load: install
	@$(WITH_BLAS) $(PY) -m examples.serve_load

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .cache
