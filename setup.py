"""The optional compiled parts of hpcproc (everything else is in pyproject.toml).

All are ``optional=True``: where no C compiler (or no Python headers) is found, the
build goes on without them.

* ``hpcproc.transports._ring_accel``: the shm transport's ring in C; without it the
  pure-Python ring (``hpcproc/transports/_shm_ring.py``) is used.
* ``hpcproc.transports._socket_accel``: the tcp transport's read of a socket that may
  have nothing to read (-1 instead of raising ``BlockingIOError``), a spinning
  receiver's read and hand-over of small messages, and the send of one small frame;
  without it ``hpcproc/transports/tcp.py`` does that work in Python.
* ``hpcproc.transports._mpi_accel``: the mpi transport's hand-over of a small message
  to a spinning receiver (no MPI call: it builds without MPI); without it
  ``hpcproc/transports/mpi.py`` does that work in Python.
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

from typing import Any

from setuptools import Extension, setup


#: The headers the transports' compiled parts share.
_TRANSPORT_HEADERS = [
    "hpcproc/transports/_accel_handover.h",
    "hpcproc/transports/_accel_util.h",
]


def _optional(name: str, **extra: Any) -> Extension:
    """The C part ``hpcproc.<name>`` from ``hpcproc/<name path>.c``, skipped where it
    cannot be built."""
    source = "hpcproc/" + name.replace(".", "/") + ".c"
    return Extension(
        f"hpcproc.{name}",
        [source],
        extra_compile_args=["-O2", "-std=c11", "-Wall"],
        optional=True,
        **extra,
    )


setup(
    ext_modules=[
        _optional("transports._ring_accel"),
        _optional("transports._socket_accel", depends=_TRANSPORT_HEADERS),
        _optional("transports._mpi_accel", depends=_TRANSPORT_HEADERS),
        _optional("_pickle_accel", depends=["hpcproc/_accel_pid.h"]),
        _optional("_compact_accel", depends=["hpcproc/_accel_pid.h"]),
        _optional("_ucx_address_pad", libraries=["dl", "pthread"]),
    ]
)
