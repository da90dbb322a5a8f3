# vlmkit developer commands. Every target that needs Python creates .venv first when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: clip-model default-model default-model-data default-model-proxy setup demo test test-fast bench lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a local CPU build is picked up; other specs would pull CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	# the [openvino] extra (openvino, nncf: about 200 MB) so CI runs the OpenVINO export and backend tests
	$(PY) -m pip install --quiet -e ".[dev,openvino,lmms-eval]"
	# lmms-eval for the plugin's tests (docs/evaluation.md), without its declared dependencies, which would replace
	# torch; the [lmms-eval] extra holds what it imports
	$(PY) -m pip install --quiet --no-deps lmms-eval==0.7.3
	touch $(STAMP)

setup: $(STAMP)

# The built-in model (docs/default-model.md): data, training, shipping into the package, then its evaluation.
DEFAULT_TASKS := caption,exist,attribute,position,count,grounding,text
default-model-data: $(STAMP)
	rm -rf data/default
	$(PY) -m vlmkit data synth --out data/default/single --n 40000 --seed 0 --tasks $(DEFAULT_TASKS) --workers 2
	$(PY) -m vlmkit data synth --out data/default/multi --n 30000 --seed 1 --tasks multiturn --turns 4-8 --workers 2

# Batches of very different lengths make glibc's heap keep the largest one's activations: tensors over 4 MB go to
# mmap instead: peak RSS 5.9 GB over the 2,400-step stage (past 14 GB without it).
TRAIN_ENV := OMP_NUM_THREADS=2 MALLOC_MMAP_THRESHOLD_=4194304

default-model: $(STAMP)
	rm -rf runs/default
	@date +"start %s" > runs-default-time.txt
	$(MAKE) default-model-data
	$(TRAIN_ENV) $(PY) -m vlmkit train recipes/default.yaml
	@date +"end %s" >> runs-default-time.txt
	@mv runs-default-time.txt runs/default/time.txt
	rm -rf src/vlmkit/assets/default && cp -r runs/default/final src/vlmkit/assets/default
	$(PY) -m vlmkit eval --model default --suite shapesworld --n 300 --blank-images --later-turns \
		--out runs/default/eval

# The recipe's fast proxy (docs/default-model.md): one A/B arm, e.g. make default-model-proxy ARM=base SET=""
ARM ?= base
SET ?=
default-model-proxy: $(STAMP)
	test -f data/default/multi/train.jsonl || $(MAKE) default-model-data
	$(TRAIN_ENV) $(PY) bench/default_model_proxy.py --name $(ARM) $(foreach s,$(SET),--set $(s))

# The built-in embedding model `clip-shapes` (docs/clip-model.md): render, lock the built-in VLM's tower (LiT), train, ship.
clip-model: $(STAMP)
	rm -rf runs/clip
	OMP_NUM_THREADS=2 $(PY) -m vlmkit.embeddings.training recipes/clip.yaml
	rm -rf src/vlmkit/assets/clip && cp -r runs/clip/final src/vlmkit/assets/clip

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
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
