# Two commands: `make run` (the gateway on an embedded Redis) and `make test` (the whole suite).
# Both create or reuse .venv: `make run` installs only the runtime lock (requirements.lock),
# `make test` the runtime and the dev lock (requirements-dev.lock); every package is checked
# against the hashes in the locks. `make lock` re-pins both after a change in pyproject.toml.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
CONFIG ?=

.PHONY: run test lint typecheck unit bench lock clean

$(RUN_STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r requirements.lock
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock examples/line/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r requirements.lock -r requirements-dev.lock
	$(PIP) --no-deps --no-build-isolation -e .
	$(PIP) --no-deps --no-build-isolation -e examples/line  # the example adapter (docs/adapters.md)
	touch $(STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/gateway serve $(if $(CONFIG),-c $(CONFIG))

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench tools examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict gateway

unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)
	$(BIN)/pytest -q examples/line  # an adapter distribution's own tests, on the kit's fixtures

bench: $(STAMP)
	$(BIN)/python -m bench

# Re-pin after changing dependencies in pyproject.toml (pip-tools; keeps existing pins unless
# they no longer fit; `make lock UPGRADE=1` moves everything to the newest releases).
COMPILE = .lockenv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links --build-deps-for=wheel $(if $(UPGRADE),--upgrade)
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet --disable-pip-version-check pip-tools
	$(COMPILE) --output-file requirements.lock pyproject.toml
	cp requirements.lock requirements-dev.lock.tmp && cat requirements-dev.lock >> requirements-dev.lock.tmp
	$(COMPILE) --extra dev --output-file requirements-dev.lock.tmp pyproject.toml
	mv requirements-dev.lock.tmp requirements-dev.lock
	$(PYTHON) tools/lock_split.py requirements.lock requirements-dev.lock
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
