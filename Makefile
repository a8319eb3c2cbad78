# One entry point for users and CI. `make test` builds .venv from scratch when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.actlab-installed

.PHONY: test test-slow test-all bench demo speed figures gpu-check venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision first, pinned: pip takes them from the local wheel cache when present.
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	# what setup.py needs to compile actlab's C++ kernels against that torch at install
	$(PY) -m pip install "setuptools>=68" wheel ninja

$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The default suite, one worker per core (at most 4): 2 min 10 s on 2 cores (2026-12-08).
test: $(STAMP)
	$(PY) -m pytest tests -n auto --maxprocesses 4 --dist loadscope --durations=25

# The end-to-end and multi-process tests (Ray, kills and resumes, compiled training, two-process DDP, ...):
# 5 min 14 s on 2 cores (2026-12-08), one at a time (they start processes of their own).
test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow --durations=10

# Before a release: everything, the whole conversion matrix included (about 20 minutes on 2 cores).
test-all: $(STAMP)
	$(PY) -m pytest tests -m "slow or matrix or not (slow or matrix)"

# The main job: the default activation comparison on the offline digits data, report in bench/digits/.
bench: $(STAMP)
	$(PY) -m actlab bench --grid configs/grids/digits.yaml --out bench/digits --jobs 2 --speed-repeats 5

demo: $(STAMP)
	$(PY) -m actlab.demo

speed: $(STAMP)
	$(PY) -m actlab.perf.speed

# This machine's figures in docs/figures/<machine>.md, each table written by the tool that measured it
# (about half an hour on 2 cores): the CPU benchmarks, the harness overhead, compile times, the GPU cost
# model's counts of the CUDA path (on CPU tensors) and the conversion matrix.
figures: $(STAMP)
	bash scripts/figures.sh

# On a machine with one CUDA GPU and torch/triton/timm/pytest installed (no registry needed): GPU tests and
# the whole-model GPU speed benchmark, table last. Uses that machine's python3, not .venv.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/actlab/activations/kernels/_cpu_kernels*
