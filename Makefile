# Every target that needs the virtual environment creates it first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup test test-fast train bench gpu-check gpu-check-dry clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q $(ARGS)

# The suite without the tests marked slow (multi-process and whole-benchmark runs): about half
# the time on 2 cores (3 min against 6-7, 2026-12-05), for the edit-test loop. CI runs `make test`.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

train: setup
	$(PY) -m nla_fast.train $(ARGS)

bench: setup
	$(PY) bench/loss_bench.py $(ARGS)

# On the GPU machine: its own python3 and packages as they are (no venv, no installs). Every
# SPEC 4 figure in order of value under one deadline (510 s), the summary printed last; with
# $$OUT set, the results are copied there after every step (scripts/gpu_check.py).
gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

# The same plumbing without a GPU: stand-ins replay recorded results (seconds).
gpu-check-dry: setup
	PYTHON=$(PY) bash scripts/gpu_check.sh --dry-run $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
