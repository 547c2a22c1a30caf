# The README's commands. Everything runs inside .venv, which `make install` creates.
PY ?= .venv/bin/python
RUN_DIR ?= runs/train-$(shell date +%Y%m%d-%H%M%S)
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install corpus train test lint bench plan slurm-test

install:
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build from the local wheel, never a CUDA build from the registry.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,wandb,mpi]"
	# Test-only: Megatron-Core's indexed dataset, for the data interop tests (its CUDA deps are not needed).
	$(PY) -m pip install --quiet --no-deps megatron-core==0.16.1 packaging
	$(MAKE) corpus

# The default data: a corpus from the Python standard library, a byte-level BPE tokenizer trained on it, and
# both splits prepared into memory-mapped Megatron-format shards. Every step keeps what is already built.
corpus:
	$(PY) -m moetron.data.corpus data/corpus
	$(PY) -m moetron.data.train_tokenizer data/corpus/train.jsonl --out data/corpus/tokenizer.json --vocab-size 4096
	$(PY) -m moetron.data.prepare data/corpus/train.jsonl --tokenizer data/corpus/tokenizer.json \
		--out data/corpus/prepared/train --shard-mb 4 --quiet
	$(PY) -m moetron.data.prepare data/corpus/val.jsonl --tokenizer data/corpus/tokenizer.json \
		--out data/corpus/prepared/val --quiet

# The embedded distributed default: 4 CPU processes acting as 2 nodes x 2 ranks (parallel/cpu_2x2.yaml):
# DualPipe pp=2 x ZeRO-1 dp=2, EP=2 across the two nodes with node-limited routing, MTP on, and FP8
# (fp8/emulated.yaml: the fine-grained recipe, emulated exactly on CPU; FP8 dispatch payload). One thread
# per rank; micro-batches of 1 sequence so each replica has the >= 2 x pp micro-batches DualPipe needs.
train:
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node=4 -m moetron.train \
		parallel=cpu_2x2 fp8=emulated train.micro_batch_size=1 run.dir=$(RUN_DIR) $(ARGS)

test:
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check src parallel comm tests benchmarks

# Will a layout fit, and what will it cost? e.g. make plan ARGS="model=v3_671b hardware=h800 parallel.pp=16"
plan:
	$(PY) -m moetron.plan $(ARGS)

# Every benchmark at small sizes; each prints its headline figures last and writes benchmarks/results/<name>.json.
bench:
	OMP_NUM_THREADS=1 $(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/pipeline_schedules.py
	$(PY) benchmarks/ep_dispatch.py
	$(PY) benchmarks/overlap.py
	$(PY) benchmarks/fp8_loss.py
	$(PY) benchmarks/plan_vs_report.py
	$(PY) benchmarks/plan_vs_measured.py --steps 12 --layout both
	OMP_NUM_THREADS=1 $(PY) benchmarks/data_loader.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/checkpoint.py

# A real two-node Slurm cluster on this machine (root; installs slurm-wlm and munge if missing), the Slurm
# tests on it (opt-in: `make test` skips them), then the cluster is stopped whatever the result.
slurm-test:
	slurm/local-cluster.sh start
	SLURM_CONF=/tmp/moetron-slurm/slurm.conf MOETRON_REQUIRE_SLURM=1 $(PY) -m pytest -q -m slurm tests/slurm $(PYTEST_ARGS); \
		rc=$$?; slurm/local-cluster.sh stop; exit $$rc
