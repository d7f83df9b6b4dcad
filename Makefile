# hpcproc: `make demo` and `make test` work on a fresh machine (they create .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,dev,mpi,ucx

.PHONY: venv test lint pytest demo bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
