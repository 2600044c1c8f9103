# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/demo
RUN := runs/demo
# all GPUs when there are several, else one process; without a GPU that process gets every core (accelerate
# launch gives it one thread unless told: 30% slower on 2 cores, docs/benchmarks.md)
GPUS = $(shell nvidia-smi -L 2>/dev/null | grep -c ^GPU)
LAUNCH = $(if $(filter-out 0 1,$(GPUS)),--multi_gpu --num_processes $(GPUS),--num_processes 1) \
  $(if $(filter 0,$(GPUS)),--num_cpu_threads_per_process $(shell nproc))

.PHONY: setup test demo clean

setup: $(VENV)/.installed

# CPU-only machines get the CPU build of torch first (a plain `torch` requirement pulls a multi-GB CUDA
# build): the machine's own CPU wheel when pip's find-links folder holds one, else PyTorch's CPU index.
# With a GPU the normal build comes in with the project's dependencies.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  if ls "$${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0*.whl >/dev/null 2>&1; then \
	    $(BIN)/pip install -q torch==2.13.0; \
	  else \
	    $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	  fi; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# One worker per core: run serially, the suite keeps about 1.2 of 2 cores busy while it waits on subprocesses,
# Slurm and a browser, and a second worker fills that (941 s -> 771 s on 2 cores; 549 s once the workers'
# OpenMP threads wait without spinning, tests/conftest.py). --dist loadfile keeps each file on one worker, so
# its module fixtures (Slurm, Chromium, trained runs) start once.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 -n auto --dist loadfile

# The main job on the embedded default: synthetic IXI -> shards -> CycleGAN -> evaluation. Each stage is a
# file target, so a second run reuses the data, the shards and a finished run (an interrupted one resumes).
demo: setup $(RUN)/summary.json
	$(BIN)/python -m train.evaluate --checkpoint $(RUN) --data $(DATA)/shards/test --out $(RUN)/evaluation --overwrite
	@echo
	@echo "run folder: $(RUN)   (prediction grids: $(RUN)/predictions, GIF: $(RUN)/progress.gif)"
	@echo "look at it: $(BIN)/streamlit run dashboard/app.py -- --runs runs"

$(DATA)/ixi/IXI-T1.tar:
	$(BIN)/python -m shards synth --out $(DATA)/ixi --subjects 24 --seed 0 --downsample 4

$(DATA)/shards/manifest.json: $(DATA)/ixi/IXI-T1.tar
	$(BIN)/python -m shards pack --t1 $(DATA)/ixi/IXI-T1.tar --t2 $(DATA)/ixi/IXI-T2.tar --out $(DATA)/shards \
	  --size 64 --resume

$(RUN)/summary.json: $(DATA)/shards/manifest.json train/recipes/demo.yaml
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/accelerate launch $(LAUNCH) --num_machines 1 --mixed_precision no \
	  --dynamo_backend no train/main.py --config train/recipes/demo.yaml --data $(DATA)/shards --out $(RUN) --resume auto

clean:
	rm -rf $(VENV) $(DATA) $(RUN)
