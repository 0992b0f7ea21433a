# The two quickstart commands of the README: `make demo` and `make test`.
# Both create .venv with Python 3.11 and install torch 2.13.0 (the CPU wheel)
# explicitly first, so pip never resolves a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= /tmp/shardsafe-demo

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,bench,dev,lightning,torchtitan]'
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/torchrun --nproc-per-node 2 examples/fsdp2_resume.py --phase train --dir $(DEMO_DIR)
	$(BIN)/torchrun --nproc-per-node 3 examples/fsdp2_resume.py --phase resume --dir $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest
