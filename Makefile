# chatbot-api: everything the project needs is installed from pyproject.toml by these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run migrate test lint typecheck format clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
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

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
