# Thin wrappers. Every target that runs code depends on the virtualenv, so each works from a
# fresh clone: `make test` is the whole setup-and-test, `make run` the whole local stack.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --editable '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) deploy/local.py

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

bench: install
	@echo "bench/ is not built yet (see the performance issue)"; exit 1

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
