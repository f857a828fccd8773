# The two commands a newcomer needs: `make serve` and `make test`.
# torch is installed first and pinned, so pip never resolves a CUDA build on a CPU machine.
# GPU users: `make TORCH=torch test` (or any pip spec) installs the torch of their choice.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= models/demo-tiny
# test workers (pytest-xdist, one file per worker at a time; each worker's torch takes one thread): 2 fit CI's 2 cores
WORKERS ?= 2

.PHONY: venv test lint serve fit demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=20

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

$(DEMO)/config.json: | venv
	$(BIN)/memserve demo-model $(DEMO) --size tiny

demo: $(DEMO)/config.json

# The gateway on http://127.0.0.1:8000 serving the demo model as "demo" (loaded on the first request).
serve: venv $(DEMO)/config.json
	$(BIN)/memserve serve --model demo=$(DEMO) --port 8000

fit: venv $(DEMO)/config.json
	$(BIN)/memserve fit $(DEMO)

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
