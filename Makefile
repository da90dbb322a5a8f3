# vlmkit developer commands. Every target that needs Python creates .venv first when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a local CPU build is picked up; other specs would pull CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m vlmkit demo

# Two pytest workers on two cores: one torch thread each (two threads per worker would oversubscribe the CPU).
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 tests

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -m "not slow" tests

bench: $(STAMP)
	@for f in bench/generate.py bench/serve_load.py bench/train_throughput.py bench/shapes_synth.py; do \
		echo "== $$f"; $(PY) $$f || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
