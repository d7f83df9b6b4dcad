"""Test support that ships with hpcproc, so that third-party transports can use it.

* :mod:`hpcproc.testing.conformance`: the transport conformance suite (Haskell's
  network-transport-tests, ported, plus zero-copy, large-frame and two-process
  scenarios), run through a :class:`~hpcproc.testing.conformance.Harness`.
* :mod:`hpcproc.testing.peer`: an endpoint in a separate OS process, driven over
  stdin/stdout (``python -m hpcproc.testing.peer --transport NAME``).

Importing this package imports no optional dependency.
"""
