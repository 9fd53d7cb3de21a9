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

.PHONY: install demo demo-quick test test-fast gpu-wheels clean

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

# What the GPU machine (Python 3.12, torch with CUDA, no network) lacks, as wheels in .whl/ for
# benchmarks/gpu_check.py's one-line command (its docstring): DeepSpeed (a pure-Python wheel built
# here against the venv's torch, its ops compiled on first use there) and the packages it needs
# that the machine does not have, at the versions this venv has. .whl/ is git-ignored.
GPU_WHEELS := .whl
GPU_WHEEL_PY := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_WHEEL_PKGS := hjson pydantic pydantic-core annotated-types typing-inspection

gpu-wheels:
	@test -x $(PY) || { echo "gpu-wheels: no $(VENV) yet (pip wheel needs its torch); run make install first"; exit 1; }
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) deepspeed==0.19.8
	for p in $(GPU_WHEEL_PKGS); do \
		v=$$($(PY) -m pip show $$p | sed -n 's/^Version: //p'); \
		test -n "$$v" || { echo "gpu-wheels: $$p is not installed in $(VENV)"; exit 1; }; \
		$(PY) -m pip download -q $(GPU_WHEEL_PY) -d $(GPU_WHEELS) "$$p==$$v" || exit 1; \
	done
	ls -l $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info
