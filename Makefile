# Veil developer entry points. Every target runs the idempotent setup first.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export PATH := $(VENV)/bin:$(PATH)

.PHONY: setup demo test lint unit integration netns perf proto clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m cli.veil demo

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider tests

lint:
	$(VENV)/bin/ruff check veil controller node agent ztunnel lab cli tests perf
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff format --check .

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

netns: setup
	$(PY) -m pytest -q tests/netns

perf: setup
	$(PY) -m perf.run

proto: setup
	$(PY) -m controller.api.generate
