# The two quickstart commands of the README: `make demo` and `make test`.
# Both create .venv with Python 3.11 and install torch 2.13.0 (the CPU wheel)
# explicitly first, so pip never resolves a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= /tmp/shardsafe-demo

.PHONY: setup demo test test-quick

# The inner loop (under 3 minutes on 2 idle cores): pure planning and format tests, the storage
# conformance suite (local, memory:// and the real S3 server) and single-process save/load paths;
# nothing that spawns gloo ranks or torchrun jobs (those run in `make test`).
QUICK_TESTS := tests/test_planner.py tests/test_global_plan.py tests/test_save_planning.py \
	tests/test_placement.py tests/test_tier_placement.py tests/test_grid.py tests/test_grid_hardening.py \
	tests/test_checksums_leftovers.py tests/test_hostile_metadata.py tests/test_storage_conformance.py \
	tests/test_storage_resolution.py tests/test_redact.py tests/test_truncated_shard.py \
	tests/test_core_single_rank.py tests/test_integrity.py tests/test_direct_read_one_pass.py tests/test_writeback.py \
	tests/test_load_hardening.py tests/test_golden.py tests/test_error_classes.py \
	tests/test_hostile_input.py tests/test_import_rules.py

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e '.[test,bench,dev,lightning,torchtitan]'
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/torchrun --nproc-per-node 2 examples/fsdp2_resume.py --phase train --dir $(DEMO_DIR)
	$(BIN)/torchrun --nproc-per-node 3 examples/fsdp2_resume.py --phase resume --dir $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest

test-quick: setup
	$(BIN)/python -m pytest -m "not multiproc and not slow" $(QUICK_TESTS)
