# Two commands set up everything on a fresh machine:
#   make demo   builds the venv, installs megadalle, runs the end-to-end demo
#   make test   builds the venv, installs megadalle, runs the test suite
# TORCH_SPEC installs torch before anything else, so that the `torch>=2.5` range in pyproject
# is already met and pip never pulls a multi-GB CUDA build on a CPU machine. GPU clusters set
# TORCH_SPEC to their own build (or to "" to keep the torch already in the venv).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megadalle-installed
# One thread per process: tests start several ranks on 2 cores.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

.PHONY: install demo demo-quick test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	# No build isolation: the csrc/ extension builds against the torch installed above.
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/megadalle demo

demo-quick: install
	$(VENV)/bin/megadalle demo --quick

test: install
	$(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info
