# chatbot-api: everything the project needs is installed from pyproject.toml by these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run migrate test lint typecheck format clean

# llama.cpp (the embedded model) is compiled for the x86-64-v3 baseline (AVX2, FMA, F16C), not
# for the building CPU (`-march=native`, its default): a native build on a Xeon with AVX-512 and
# AMX crashed in its first decode (2026-11-30), and a build must run on whichever machine
# installs it next. It is compiled afresh, never taken from pip's wheel cache, which may hold a
# build made with other flags (several minutes). The flags mean nothing on other architectures.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip install --quiet --no-cache-dir -e '.[local,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## serve on http://$(HOST):$(PORT) (SQLite + embedded model unless configured)
	$(BIN)/chatbot-api serve --host $(HOST) --port $(PORT)

migrate: $(STAMP)
	$(BIN)/chatbot-api migrate

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck  ## lint, type-check, then the whole suite on SQLite and PostgreSQL
	$(BIN)/pytest --cov --cov-report=term --cov-fail-under=85 $(PYTEST_ARGS)

# Schemathesis, as two users, every check: 1,000 examples per operation, fixed seed, on SQLite
# and PostgreSQL (`make test` runs the same test with 40). Needs PostgreSQL like `make test`.
.PHONY: fuzz
fuzz: $(STAMP)  ## the long Schemathesis run; prints its figures
	FUZZ_EXAMPLES=1000 FUZZ_SEED=20261124 $(BIN)/pytest tests/test_fuzz.py -s -p no:cacheprovider

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov

# Benchmarks (bench/README.md). PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth); each
# run creates and drops its own database. BENCH_ARGS passes options, e.g. BENCH_ARGS=--quick.
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: bench bench-soak bench-peers

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[local,dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## the benchmark suite (~15 min; BENCH_ARGS=--quick: ~2 min)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-soak: $(BENCH_STAMP)  ## 10-minute memory soak of one worker
	$(BIN)/python -m bench.soak $(BENCH_ARGS)

bench-peers: $(BENCH_STAMP)  ## LiteLLM proxy beside the app, against the same fake LLM
	$(BIN)/python -m bench.peers $(BENCH_ARGS)

# Fault injection at length (tests/chaos): PostgreSQL restarted, crashed and stopped under load (it
# controls the local cluster, see tests/chaos/__init__.py) and 1,000 concurrent sends to one
# conversation. `make test` runs the short variants of the same tests.
.PHONY: chaos
chaos: $(STAMP)  ## the long chaos tests (~2.5 min; restarts, crashes and stops local PostgreSQL)
	$(BIN)/pytest -m chaos -p no:cacheprovider tests/chaos
