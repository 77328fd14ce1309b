# make demo   – create .venv, install clipjax with the examples, run the main example
# make test   – create .venv, install clipjax with the test extras, run the whole suite
# make bench  – create .venv, install the benchmark extras (CPU torch), run the benchmarks

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The PyTorch release whose CPU build is installed for the benchmarks.
TORCH_VERSION ?= 2.13.0

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[test,examples]"
	touch $@

$(VENV)/.examples: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[examples]"
	touch $@

$(VENV)/.bench: pyproject.toml | $(PY)
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[bench]"
	touch $@

demo: $(VENV)/.examples
	$(PY) examples/compare_clipping.py

test: $(VENV)/.test
	$(PY) -m pytest

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_clip.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
