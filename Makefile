# The README's commands. Everything runs inside .venv, which `make install` creates.
PY ?= .venv/bin/python
RUN_DIR ?= runs/train-$(shell date +%Y%m%d-%H%M%S)
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install corpus train test lint bench

install:
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build from the local wheel, never a CUDA build from the registry.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,wandb]"
	$(MAKE) corpus

corpus:
	$(PY) -m moetron.data.corpus data/corpus

train:
	OMP_NUM_THREADS=2 $(PY) -m moetron.train run.dir=$(RUN_DIR) $(ARGS)

test:
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check src parallel comm tests benchmarks

# Every benchmark at small sizes; each prints its headline figures last and writes benchmarks/results/<name>.json.
bench:
	OMP_NUM_THREADS=1 $(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/pipeline_schedules.py
	$(PY) benchmarks/ep_dispatch.py
