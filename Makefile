# Two commands: `make run` (the gateway on an embedded Redis) and `make test` (the whole suite).
# Both create or reuse .venv with the pinned dependencies of requirements.lock.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?=

.PHONY: run test lint typecheck unit bench lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gateway serve $(if $(CONFIG),-c $(CONFIG))

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict gateway

unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

# Re-pin after changing dependencies in pyproject.toml.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet --disable-pip-version-check '.[dev]' setuptools wheel
	.lockenv/bin/pip freeze --all --exclude gateway --exclude pip > requirements.lock
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
