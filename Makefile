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

# blip-ci: the original BLIP code, which tests/test_original_*.py compare against. --no-deps, hence not in the test
# extra: it requires timm 0.4.12 (whose torchvision would replace the CPU torch with a CUDA one) and fairscale
# 0.4.4; benchmarks/original_blip.py supplies the few names it imports from them.
setup-test: $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q --no-build-isolation -e ".[test,triton,dali]"
	$(BIN)/pip install -q --no-deps "blip-ci==0.0.5"

pretrain: setup
	$(BIN)/blip-fast pretrain

# BLIP_FAST_REQUIRE_NATIVE: the CPU twin of the CUDA kernels must have been built and tested.
# BLIP_FAST_REQUIRE_ORIGINAL: the comparisons with the original BLIP (blip-ci) must run, not skip.
test: setup-test
	BLIP_FAST_REQUIRE_NATIVE=1 BLIP_FAST_REQUIRE_ORIGINAL=1 $(BIN)/python -m pytest tests -q -ra

parity: setup
	$(BIN)/blip-fast parity

clean:
	rm -rf $(VENV) build *.egg-info blip_fast/_C*.so
