# `make setup` installs the stack into .venv (CPU or CUDA, chosen by whether an NVIDIA
# driver answers), `make test` lints and runs the suite, `make demo` trains small models,
# `make bench` runs the benchmarks and rewrites docs/benchmarks.md, `make wheel` builds
# dist/torchrec_lowprec-*.whl (pip users: see the README's `pip install` section).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STACK ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP := $(VENV)/.setup-$(STACK)
EXTRA_REQS := $(if $(filter cpu,$(STACK)),-r requirements/triton-cpu.txt,)
PYTEST_ARGS ?=

.PHONY: setup test lint format demo bench bench-quick gpu-check wheel clean

setup: $(STAMP)

$(STAMP): requirements/$(STACK).txt requirements/common.txt requirements/triton-cpu.txt pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/$(STACK).txt
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q -r requirements/common.txt $(EXTRA_REQS)
	$(PIP) install -q --no-deps -e .
	$(VENV)/bin/torchrec-lowprec build-kernels
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) examples/dlrm/demo.py

# The step benchmarks (~20-25 min on 2 quiet cores): each rewrites its generated section of
# docs/benchmarks.md. `make bench-quick` runs the same scripts on small sizes and writes nothing.
bench: setup
	$(PY) -m torchrec_lowprec.kernels.cpu_native --build
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/embedding_step.py --write docs/benchmarks.md
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/profile_step.py --write docs/benchmarks.md
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/sharded_step.py --write docs/benchmarks.md

bench-quick: setup
	$(PY) -m torchrec_lowprec.kernels.cpu_native --build
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/embedding_step.py --quick
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/profile_step.py --quick
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/sharded_step.py --quick

# The CUDA path on one GPU (setup, kernel tests, DMP + checkpoint, CUDA benchmark) within the
# device budget; OUT=dir collects logs and summary.md. GPU_CHECK_DRY=1: the CPU dry run.
gpu-check:
	bash scripts/gpu_check.sh

wheel: setup
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
