# Two entry points: `make demo` and `make test`. Both create .venv when missing, install into it,
# start the local stack (Kafka, Redis, S3 API) and run. A second run reuses what is there.
# `make test` runs `make lint` (ruff and mypy) first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ENV := eval "$$(ops/stack env)" &&

.PHONY: demo test bench install stack-up stack-down lint

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	$(VENV)/bin/python -m pip check
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

stack-up: $(STAMP)
	ops/stack up

stack-down:
	ops/stack down

demo: stack-up
	$(ENV) $(VENV)/bin/zimage topics apply && $(VENV)/bin/zimage demo

# ruff and mypy, pinned in the `test` extra; their settings are in pyproject.toml.
LINT_PATHS := streams connectors processors schemas bench tests

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy $(LINT_PATHS)

test: lint stack-up
	if [ -f ../shared/tools/check_layout.py ]; then $(VENV)/bin/python ../shared/tools/check_layout.py .; fi
	$(ENV) $(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: stack-up
	$(ENV) $(VENV)/bin/python -m bench.run
	$(ENV) $(VENV)/bin/python -m bench.topology
	$(ENV) $(VENV)/bin/python -m bench.replay
	$(ENV) $(VENV)/bin/python -m bench.api
	$(ENV) $(VENV)/bin/python -m bench.processors
	$(ENV) $(VENV)/bin/python -m bench.state
