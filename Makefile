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

.PHONY: install test test-all chat bench clean

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

test-all: install
	$(PY) -m pytest -q -m ""

# Linux: preload OpenBLAS when present (the mlx[cpu] wheel's reference BLAS makes prefill ~20x slower).
bench: install
	@blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3; \
	if [ "$(UNAME)" = Linux ] && [ -f $$blas ]; then export LD_PRELOAD=$$blas; \
	elif [ "$(UNAME)" = Linux ]; then echo "note: no OpenBLAS (apt-get install libopenblas0-pthread); prefill will be slow" >&2; fi; \
	$(VENV)/bin/ifprune bench --out docs/BENCHMARKS.md --plot docs/benchmarks.png --json docs/benchmarks.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .cache
