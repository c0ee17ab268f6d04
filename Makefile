# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Inductor's compile cache lives inside the checkout so repeated runs (and CI re-runs) reuse it.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton

.PHONY: setup demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned to the CPU wheel, so that pyproject's torch range finds it installed and no CUDA
	# packages are downloaded; triton pinned to the version the suite runs (the attention kernels, code emission).
	$(BIN)/pip install --quiet torch==2.13.0 triton==3.9.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# The demo trains the example GPT as a 2-rank pipeline (one thread per rank) and draws its measured timeline.
demo: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node 2 examples/train_gpt.py --timeline timeline

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache *.egg-info
