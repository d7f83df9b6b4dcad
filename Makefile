# hpcproc: `make demo` and `make test` work on a fresh machine (they create .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,dev,mpi,ucx

.PHONY: venv test lint pytest demo bench bench-report clean

venv: $(STAMP)

# tests/plugin_transport: the test transport `teststreams`, registered through a real
# `hpcproc.transports` entry point as a third party's transport would be.
$(STAMP): pyproject.toml tests/plugin_transport/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --disable-pip-version-check -e tests/plugin_transport
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check hpcproc bench tests examples
	$(VENV)/bin/mypy

pytest: venv
	$(PY) -m pytest -q -p no:cacheprovider

test: lint pytest

demo: venv
	$(PY) examples/pingpong.py

bench: venv
	$(PY) -m bench transport --transport tcp --quick

# Every suite and peer available here; JSON, Markdown and plots in bench-report/.
# Ray and Dask are peers only where installed: $(VENV)/bin/pip install -e '.[bench]'
bench-report: venv
	$(PY) -m bench report --quick --out bench-report

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
