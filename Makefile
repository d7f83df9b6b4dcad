# hpcproc: `make demo` and `make test` work on a fresh machine (they create .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,dev,mpi,ucx

.PHONY: venv test lint pytest demo bench bench-report clean

venv: $(STAMP)

# tests/plugin_transport: the test transport `teststreams`, registered through a real
# `hpcproc.transports` entry point as a third party's transport would be.
# setup.py builds the optional C parts (the shm ring, the pickler glue, the compact
# format, the UCX address pad, the tcp socket paths, the mpi hand-over) in place.
$(STAMP): pyproject.toml setup.py hpcproc/transports/_ring_accel.c hpcproc/_ucx_address_pad.c \
		hpcproc/transports/_socket_accel.c hpcproc/transports/_mpi_accel.c \
		hpcproc/transports/_accel_handover.h hpcproc/transports/_accel_util.h \
		hpcproc/_pickle_accel.c hpcproc/_compact_accel.c hpcproc/_accel_pid.h \
		tests/plugin_transport/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --disable-pip-version-check -e tests/plugin_transport
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check hpcproc bench tests examples
	$(VENV)/bin/mypy

# Then the shm transport again on the pure-Python ring and serializer
# (HPCPROC_RING_ACCEL=0, HPCPROC_PICKLE_ACCEL=0), the fallbacks where no C compiler
# was found at install (tests/test_serialization.py runs every serializer itself; here the
# pid's pickling functions are Python's too, and tests/test_compact.py's node in this
# process writes pickles and reads compact frames in Python); then the tcp transport
# reading, parsing and sending in Python (HPCPROC_SOCKET_ACCEL=0), and the mpi transport's
# small messages in Python (HPCPROC_MPI_ACCEL=0, the two-rank scenarios included), the
# fallbacks of those compiled parts.
pytest: venv
	$(PY) -m pytest -q -p no:cacheprovider
	HPCPROC_RING_ACCEL=0 HPCPROC_PICKLE_ACCEL=0 $(PY) -m pytest -q -p no:cacheprovider -k "shm or ring" \
		tests/test_shm.py tests/test_shm_ring.py tests/test_transport_conformance.py
	HPCPROC_PICKLE_ACCEL=0 $(PY) -m pytest -q -p no:cacheprovider tests/test_serialization.py \
		tests/test_compact.py
	HPCPROC_SOCKET_ACCEL=0 $(PY) -m pytest -q -p no:cacheprovider -k "tcp or socket" \
		tests/test_tcp.py tests/test_socket_accel.py tests/test_transport_conformance.py
	HPCPROC_MPI_ACCEL=0 $(PY) -m pytest -q -p no:cacheprovider -k "mpi" \
		tests/test_mpi.py tests/test_mpi_accel.py tests/test_mpi_two_ranks.py \
		tests/test_transport_conformance.py

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
