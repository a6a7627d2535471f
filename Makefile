# Two commands do all the set-up on a fresh machine (Python 3.11+): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## Run the agent against the built-in sandbox fileX (Ctrl-C to stop).
demo: $(STAMP)
	$(BIN)/filex-agent run --sandbox --data-dir $(or $(DATA_DIR),./demo-data)

## Run the whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Benchmarks (parts 1-6, SQLite and, when installed, PostgreSQL journals): rewrites bench/RESULTS.md and the
## README's targets table. ~30-40 min on 2 cores; BENCH_ARGS="--parts 2,4 --runs 1" etc. (python -m bench --help).
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-data .pytest_cache
