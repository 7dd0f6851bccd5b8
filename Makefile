# The README's two commands: `make bench` (the main job) and `make test`.
# Each creates .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# Extra arguments for the benchmark, e.g. make bench ARGS="--modules ham,se --dtype float64"
ARGS ?=

.PHONY: install bench test clean

# The stamp depends on setup.py, so a changed dependency list reinstalls.
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(PY) benchmarks/throughput.py $(ARGS)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info benchmarks/results .pytest_cache
