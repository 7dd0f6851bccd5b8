# The README's two commands: `make bench` (the main job) and `make test`.
# Each creates .venv on first use and installs what it needs into it.
# `make test-torch2.11` runs a subset of the tests on the oldest supported torch, in .venv-torch2.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# Extra arguments for the benchmark, e.g. make bench ARGS="--modules ham,se --dtype float64"
ARGS ?=
# pytest-xdist workers for the tests: one per core, at most 8 (each worker loads the library
# and takes its share of the cores' threads: tests/conftest.py); TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 8 ] && n=8; echo $$n)
# The oldest supported torch (README, setup.py), with the Triton it pulls in (3.6): the GPU
# machine's versions.
VENV_OLDEST ?= .venv-torch2.11
PY_OLDEST := $(VENV_OLDEST)/bin/python
TORCH_OLDEST ?= 2.11.0
# What test-torch2.11 runs: one pytest argument a line, each with a comment.
SUBSET_OLDEST ?= tests/torch2_11_subset.txt

# The ahead-of-time Triton check (scripts/triton_aot/): launch records and results.
AOT := build/triton_aot
TRITON_SOURCES := $(wildcard attnkernels/triton/*.py)
AOT_CHECK := scripts/triton_aot/check.py $(AOT)/test_launches.json $(AOT)/bench_launches.json

.PHONY: install bench test test-torch2.11 triton-aot triton-aot-full triton-aot-3.6 cuda-resources clean

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
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

# torch is pinned in the same pip command as the test tools, so their torch dependents
# (torchvision, through timm) resolve to 2.11's. numpy < 2.4: Triton 3.6's interpreter calls
# int() on one-element arrays, an error since numpy 2.4 (a DeprecationWarning before, which
# the target silences; Triton 3.8 no longer does it).
$(VENV_OLDEST)/.installed: setup.py
	test -x $(PY_OLDEST) || $(PYTHON) -m venv $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install -q torch==$(TORCH_OLDEST) "numpy<2.4" -e ".[test]"
	touch $@

# The Python layer (triton_op, wrap_triton, torch.compile, export) on torch 2.11 with
# Triton 3.6, on CPU. ATTNKERNELS_WITH_CUDA=0: `make test` proves the CUDA build; this step
# proves the Python layer and would only add minutes of nvcc. set -f: node ids hold [ ].
# Any failure, and pytest collecting nothing (exit 5), fails the target.
OLDEST_PYTEST := $(PY_OLDEST) -m pytest -q -n $(TEST_WORKERS) --durations=10 -Wignore::DeprecationWarning:triton.runtime.interpreter
test-torch2.11: $(VENV_OLDEST)/.installed
	@set -f; args="$$(sed -e 's/#.*//' $(SUBSET_OLDEST))"; \
	test -n "$$(echo $$args)" || { echo "$(SUBSET_OLDEST) selects no tests" >&2; exit 1; }; \
	echo ATTNKERNELS_WITH_CUDA=0 $(OLDEST_PYTEST) $$args; \
	ATTNKERNELS_WITH_CUDA=0 $(OLDEST_PYTEST) $$args

# Every Triton launch of the tests, recorded under the interpreter. `make test` records the same
# when ATTNKERNELS_TRITON_LAUNCHES names this file (CI does), which saves this rerun.
$(AOT)/test_launches.json: $(TRITON_SOURCES) | install
	rm -f $@
	ATTNKERNELS_WITH_CUDA=0 ATTNKERNELS_TRITON_LAUNCHES=$(abspath $@) \
	  $(PY) -m pytest -q -p no:cacheprovider $(wildcard tests/test_*_triton.py)

# The benchmark modules' launches at its CPU and GPU default shapes (dry: nothing executes).
$(AOT)/bench_launches.json: $(TRITON_SOURCES) scripts/triton_aot/bench_launches.py | install
	rm -f $@
	$(PY) scripts/triton_aot/bench_launches.py $@

# Compile every recorded launch for sm_90 and sm_80 with Triton 3.8 (representative subset;
# results cached in ~/.cache/attnkernels/triton_aot); fails on a compile error, shared memory
# over the limit or spills over scripts/triton_aot/limits.py's threshold.
triton-aot: $(AOT)/test_launches.json $(AOT)/bench_launches.json
	$(PY) $(AOT_CHECK)

triton-aot-full: $(AOT)/test_launches.json $(AOT)/bench_launches.json
	$(PY) $(AOT_CHECK) --full

# The same launches with Triton 3.6 (the GPU machine's), sm_90.
triton-aot-3.6: $(AOT)/test_launches.json $(AOT)/bench_launches.json $(VENV_OLDEST)/.installed
	$(PY_OLDEST) $(AOT_CHECK) --arch 90

# Rebuild the CUDA objects with ptxas -v; table of registers, spills and shared memory per kernel
# in build/cuda_resources/; fails on spills in kernels that had none (scripts/cuda_resources.py).
cuda-resources: install
	$(PY) scripts/cuda_resources.py --build

clean:
	rm -rf $(VENV) $(VENV_OLDEST) build *.egg-info benchmarks/results .pytest_cache
