# One virtual environment in the repo; re-running a target is fast when pyproject.toml has not changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint proto bench clean

$(STAMP): pyproject.toml
	@echo "Installing Esper into $(VENV) (first time, or after pyproject.toml changed): PyTorch (CPU build),"
	@echo "PyTorch Geometric, protobuf, DuckDB, Textual, TensorBoard and the dev tools. About 2-5 minutes."
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the CPU build lying on this machine, never the CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/esper run

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

# The fast tier: unit and component tests, no real training runs or crash loops (about a minute).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" -x

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I contracts --python_out=src/esper/leyline contracts/leyline.proto

clean:
	rm -rf $(VENV)
