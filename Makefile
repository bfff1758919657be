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

test-all: install
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
