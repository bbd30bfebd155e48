# The verbs people type. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export AMQP_URL

.PHONY: install demo run test unit integration lint typecheck schemas check all bench bench-quick chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/python -m demo.run

run: install
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
