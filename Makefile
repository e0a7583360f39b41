# Set-up and entry points. `make pretrain` and `make test` work on a fresh machine with Python >= 3.10:
# each creates .venv (CPU torch by default), installs blip_fast with its native extension, and runs.
#
#   make pretrain          pretrain the tiny BLIP on built-in synthetic scenes, evaluate retrieval (CPU, minutes)
#   make test              the test suite (CI runs this through .ci/run)
#   TORCH="torch==2.11.0"  choose another torch (a CUDA machine keeps the torch it has: TORCH=)

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup setup-test pretrain test parity clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

# torch first: the native extension is compiled against it (hence --no-build-isolation)
setup: $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q --no-build-isolation -e .

setup-test: $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q --no-build-isolation -e ".[test,triton,dali]"

pretrain: setup
	$(BIN)/blip-fast pretrain

# BLIP_FAST_REQUIRE_NATIVE: the CPU twin of the CUDA kernels must have been built and tested.
test: setup-test
	BLIP_FAST_REQUIRE_NATIVE=1 $(BIN)/python -m pytest tests -q -ra

parity: setup
	$(BIN)/blip-fast parity

clean:
	rm -rf $(VENV) build *.egg-info blip_fast/_C*.so
