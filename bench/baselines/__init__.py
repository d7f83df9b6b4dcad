"""Baselines: the same ping-pong as the transport suite, written against raw libraries.

Each module has role functions for :func:`bench.run_pair` returning, from role 0, the
seconds per round trip of every run of every step of :func:`bench.plan` (role 1
echoes and returns ``None``). They do not use hpcproc at all.

* :mod:`.socket_tcp`: raw Python sockets, 8-byte length prefix, ``sendmsg`` gather,
  ``recv_into`` a preallocated buffer, TCP_NODELAY (the ``tcp`` baseline);
* :mod:`.socket_asyncio`: the same over an asyncio loop, the floor of asyncio transports;
* :mod:`.pipe`: ``multiprocessing.Pipe`` ``send_bytes`` / ``recv_bytes_into`` (``shm``);
* :mod:`.mpi`: mpi4py buffer ``Send``/``Recv`` and pickle ``send``/``recv`` under
  ``mpiexec -n 2`` (``shm``, ``mpi``);
* :mod:`.ucxx_raw`: the ucxx asyncio API (``ucx``).
"""
