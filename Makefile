# hpcproc: `make demo` and `make test` work on a fresh machine (they create .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,dev,mpi,ucx

.PHONY: venv test lint pytest demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
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
