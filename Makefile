# Two commands do all the set-up: `make serve` and `make test` first install whatever is missing.
#
# The install goes into $(VENV): the CPU build of torch, pinned (an unpinned torch would pull a
# multi-GB CUDA build), then the project with its test extras. A stamp file records it; it is
# redone only when pyproject.toml (where the dependencies live) is newer than the stamp.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MODEL ?= random:tiny
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The offline demo: a tiny random-weight model built in-process, no download (MODEL=... for another).
serve: $(STAMP)
	$(BIN)/beyond serve --model $(MODEL)

# Lint, then the whole suite (CPU only; it starts real servers on loopback ports).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile
