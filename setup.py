"""The optional compiled parts of hpcproc (everything else is in pyproject.toml).

All are ``optional=True``: where no C compiler (or no Python headers) is found, the
build goes on without them.

* ``hpcproc.transports._ring_accel``: the shm transport's ring in C; without it the
  pure-Python ring (``hpcproc/transports/_shm_ring.py``) is used.
* ``hpcproc._pickle_accel``: the bookkeeping of ``serialize``'s small-message path in
  C (see ``hpcproc/serialization.py``); without it small messages go through
  ``pickle.dumps``.
* ``hpcproc._compact_accel``: the compact message format's writer and reader in C
  (see ``hpcproc/_compact.py``); without it messages are pickled (and compact ones
  from other nodes read in Python).
* ``hpcproc._ucx_address_pad``: not a Python module but a plain shared library that
  ``hpcproc.mpi_init.pad_ucx_address`` loads with ctypes (see there); without it MPI
  may fail to start under ``srun --mpi=pmi2``.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hpcproc.transports._ring_accel",
            ["hpcproc/transports/_ring_accel.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        ),
        Extension(
            "hpcproc._pickle_accel",
            ["hpcproc/_pickle_accel.c"],
            depends=["hpcproc/_accel_pid.h"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        ),
        Extension(
            "hpcproc._compact_accel",
            ["hpcproc/_compact_accel.c"],
            depends=["hpcproc/_accel_pid.h"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        ),
        Extension(
            "hpcproc._ucx_address_pad",
            ["hpcproc/_ucx_address_pad.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            libraries=["dl", "pthread"],
            optional=True,
        ),
    ]
)
