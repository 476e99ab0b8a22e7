# `make test` and `make demo` build .venv from scratch on a fresh machine (Python 3.11).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The released POLAR stack, for the tests that run POLAR's own code (tests/released_polar.py):
# xtuner 0.2.0 (the released triplet encoding and the remote code of released checkpoints,
# installed --no-deps: we only read its files) and, beside the venv's transformers 5, the 4.x
# release that remote code needs (xtuner pins 4.48; the code also imports einops), in a
# directory put first on PYTHONPATH only by those tests' subprocesses.
TF4 := $(VENV)/transformers4
TF4_PACKAGES := transformers==4.48.3 tokenizers==0.21.4 huggingface_hub==0.36.2 einops==0.8.2 \
	requests urllib3 idna charset_normalizer certifi

.PHONY: test demo demo-synthetic bench venv clean gpu-check

$(STAMP): setup.py requirements/cpu.txt Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q -e '.[test,demo,rlhf-test]'
	$(PY) -m pip install -q --no-deps nemo-aligner==0.7.0
	$(PY) -m pip install -q --no-deps xtuner==0.2.0
	rm -rf $(TF4)
	$(PY) -m pip install -q --no-deps --target $(TF4) $(TF4_PACKAGES)
	touch $(STAMP)

venv: $(STAMP)

# Two workers, one test file each at a time (module fixtures, such as a file's shared trainer
# runs, stay in one process).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The whole pipeline on tiny models (docs/demo.md); re-running reuses finished stages.
demo: $(STAMP)
	$(PY) tools/demo.py --workdir runs/demo

# The one-minute synthetic policy-discrimination task (no sampling, no tokenizer).
demo-synthetic: $(STAMP)
	$(PY) tools/demo_synthetic.py --save runs/demo_synthetic/checkpoint \
		--report runs/demo_synthetic/report.json

bench: $(STAMP)
	$(PY) tools/benchmark_step.py --model-preset tiny --micro-batch-tokens 1024
	$(PY) tools/benchmark_step.py --model-preset small --micro-batch-tokens 2048
	$(PY) tools/benchmark_data.py

# What to run first on a GPU node (docs/performance.md, "GPU check"), inside the training
# container with its CUDA torch, TE and apex, not .venv (whose torch is the CPU build).
# `make gpu-check NPROC=8` runs it on every GPU of the node.
GPU_PYTHON ?= python3
NPROC ?= 1
gpu-check:
ifeq ($(NPROC),1)
	$(GPU_PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)
else
	$(GPU_PYTHON) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) tools/gpu_check.py $(GPU_CHECK_ARGS)
endif

clean:
	rm -rf $(VENV) runs
