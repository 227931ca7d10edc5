# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is capped at the versions on this machine's disk; a CPU-only machine may use any torch>=2.4.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# One pytest worker per core (pytest-xdist); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto

.PHONY: demo test lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[all,dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/histolite demo --out demo_output

test: $(VENV)/.installed
	$(VENV)/bin/histolite info
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check histolite tests benchmarks
	$(VENV)/bin/ruff format --check histolite tests benchmarks
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PIP) install -q -e '.[all,dev,bench]'
	$(PY) benchmarks/stain.py

clean:
	rm -rf demo_output .pytest_cache .mypy_cache .ruff_cache

format: $(VENV)/.installed
	$(VENV)/bin/ruff format histolite tests benchmarks
	$(VENV)/bin/ruff check --fix histolite tests benchmarks
