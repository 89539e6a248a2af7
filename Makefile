# One command each, from a fresh clone: the virtual environment is created on first use.
# torch is pinned and installed first: an unpinned torch pulled in by a dependency would
# download several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m lightning_nipq.demo

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache *.egg-info
