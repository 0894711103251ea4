# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format clean bench

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftsweep run examples/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# Benchmarks (bench/README.md): ground-truth grid, search replay, throughput, overhead. Hours on 2 cores.
bench: $(STAMP)
	nice -n 19 $(PY) bench/grid.py
	nice -n 19 $(PY) bench/search_efficiency.py
	nice -n 19 $(PY) bench/throughput.py
	nice -n 19 $(PY) bench/overhead.py

lint: $(STAMP)
	$(VENV)/bin/ruff check peftsweep tests scripts
	$(VENV)/bin/ruff format --check peftsweep tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format peftsweep tests scripts

clean:
	rm -rf peftsweep-runs .pytest_cache
