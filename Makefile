# make demo   – create .venv, install clipjax with the examples, run the main example
# make test   – create .venv, install clipjax with the test extras, run the whole suite
#                on every core (pytest-xdist); TEST_ARGS is passed to pytest, e.g. -m 'not slow'
# make bench  – create .venv, install the benchmark extras (CPU torch), run the benchmarks:
#                bench_clip.py (run time, memory and compiled size of every clipper), then
#                bench_step.py (the whole jitted train step of a transformer with each clipper);
#                about 9 min on this 2-core machine when nothing else runs (6 + 3), up to
#                twice that while other jobs use the cores
# make bench-compile – create .venv, install flax and matplotlib, run the compile-time sweep
#                (separate from make bench; 3 repetitions of 8–16 min each on a quiet 2-core
#                machine, depending on how slowly the per-leaf transforms compile;
#                BENCH_ARGS="--budget 15" stops before a repetition that would end past 15 min)
# make bench-smoke   – the benchmark scripts with --quick, into a temporary copy of
#                benchmarks/RESULTS.md: checks that they run; the figures mean nothing
# BENCH_ARGS is passed to the scripts, e.g. make bench-compile BENCH_ARGS="--leaves 100,1000"
# make docs   – create .venv, install the docs tools, build the site into docs/_build/html

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The PyTorch release whose CPU build is installed for the benchmarks.
TORCH_VERSION ?= 2.13.0
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: demo test bench bench-compile bench-smoke docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[test,examples]"
	touch $@

$(VENV)/.examples: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[examples]"
	touch $@

$(VENV)/.docs: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[docs]"
	touch $@

$(VENV)/.bench: pyproject.toml | $(PY)
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[bench]"
	touch $@

demo: $(VENV)/.examples
	$(PY) examples/compare_clipping.py

test: $(VENV)/.test
	$(PY) -m pytest -n auto $(TEST_ARGS)

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_clip.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_step.py $(BENCH_ARGS)

bench-compile: $(VENV)/.examples
	$(PY) benchmarks/compile_time.py $(BENCH_ARGS)

bench-smoke: $(VENV)/.bench $(VENV)/.examples
	tmp=$$(mktemp -d) && cp benchmarks/RESULTS.md $$tmp/ \
	  && $(PY) benchmarks/bench_clip.py --quick --out $$tmp/RESULTS.md \
	  && $(PY) benchmarks/bench_step.py --quick --out $$tmp/RESULTS.md \
	  && $(PY) benchmarks/compile_time.py --quick --out $$tmp/RESULTS.md \
	  && echo "smoke run written to $$tmp/RESULTS.md"

# Warnings are errors and every cross-reference must resolve (-n); no network is needed.
docs: $(VENV)/.docs
	$(PY) -m sphinx -W --keep-going -n -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis docs/_build
