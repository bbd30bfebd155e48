# The verbs people type. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Installs are pinned with hashes (requirements/*.txt, from `make lock`); pyproject.toml keeps the ranges.
RUNTIME_LOCK := requirements/runtime.txt
DEV_LOCK     := requirements/dev.txt
OTEL_LOCK    := requirements/otel.txt
stamp = $(VENV)/.installed-$(1)-$(shell cat pyproject.toml $(2) | cksum | cut -d' ' -f1)
RUNTIME_STAMP := $(call stamp,runtime,$(RUNTIME_LOCK))
DEV_STAMP     := $(call stamp,dev,$(DEV_LOCK))
PIP_COMPILE := $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links --no-header --annotation-style=line
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export AMQP_URL

.PHONY: install install-runtime lock docs demo run test unit integration lint typecheck schemas check all bench bench-quick chaos clean

install: $(DEV_STAMP)

install-runtime: $(RUNTIME_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The package itself goes in without its dependencies: they come from the lock, with their hashes checked.
$(RUNTIME_STAMP): pyproject.toml $(RUNTIME_LOCK) | $(VENV)/bin/python
	$(BIN)/pip install --quiet --require-hashes -r $(RUNTIME_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-runtime-* && touch $@

$(DEV_STAMP): pyproject.toml $(DEV_LOCK) | $(VENV)/bin/python
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-dev-* && touch $@

# Re-pins after a change to pyproject.toml. Existing pins are kept where they still satisfy it, so only what
# changed is looked up on the package index; `make lock UPGRADE=1` moves every pin to the newest allowed.
lock: | $(VENV)/bin/python
	$(BIN)/pip install --quiet "pip-tools>=7.4"
	$(PIP_COMPILE) $(if $(UPGRADE),--upgrade) --output-file $(RUNTIME_LOCK) pyproject.toml
	$(PIP_COMPILE) $(if $(UPGRADE),--upgrade) --extra dev --output-file $(DEV_LOCK) pyproject.toml
	# The container image's lock: runtime plus the `otel` extra (seeded from the runtime pins, so they agree).
	test -f $(OTEL_LOCK) || cp $(RUNTIME_LOCK) $(OTEL_LOCK)
	$(PIP_COMPILE) $(if $(UPGRADE),--upgrade) --extra otel --output-file $(OTEL_LOCK) pyproject.toml

# Runtime dependencies only: the demo needs none of the dev tools.
demo: install-runtime
	$(BIN)/python -m demo.run $(ARGS)

run: install-runtime
	$(BIN)/atlas-worker run --tenants ./tenants

test: install
	$(BIN)/pytest -q

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

schemas: install
	$(BIN)/python -m contracts.schema_export

docs: install
	$(BIN)/python -m contracts.config_reference

# Benchmarks against a plain aio-pika baseline measured in the same run (docs/PERFORMANCE.md).
bench: install
	$(BIN)/python -m bench $(ARGS)

bench-quick: install
	$(BIN)/python -m bench --quick $(ARGS)

# A soak with faults, kills and connection cuts, then an accounting of every request (docs/RELIABILITY.md).
chaos: install
	$(BIN)/python -m chaos $(ARGS)

check: lint typecheck test

all: check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
