"""Rendezvous: every rank learns every rank's endpoint address.

Three methods, one contract (:func:`exchange` is an all-gather of one small payload
per rank, bounded by a timeout):

``store`` (the default)
    Rank 0 serves a small TCP store (:mod:`.tcpstore`) on the host the launcher says
    it runs on (``ClusterInfo.server_host``, or ``HPCPROC_RENDEZVOUS_HOST``). Its port
    is derived from the job and step ids, so concurrent jobs sharing a node pick
    different ports: :data:`PORT_BASE` + crc32(job.step) mod :data:`PORT_SPAN`, below
    the Linux ephemeral range (32768-60999) so that outgoing connections never hold
    it; when it is in use the next ones are tried (:data:`PORT_TRIES` in all), and
    clients try them in the same order. ``HPCPROC_PORT`` fixes the port. Every
    connection is authenticated with the cluster cookie, bound to the job's key.
``file``
    A shared directory (``HPCPROC_RENDEZVOUS_DIR``), see :mod:`.filestore`.
``mpi``
    ``MPI.COMM_WORLD.allgather`` when the MPI transport is used (MPI already knows
    every rank; a missing rank is MPI's to report, it aborts the job).

A rank that does not arrive within the timeout makes every rank raise
:class:`RendezvousError` naming the missing ranks and the launcher: rank 0 reports it
to every rank that did arrive; a rank that cannot reach rank 0 reports that instead.

Modules: :mod:`.exchange` (the methods, the port choice, :func:`rendezvous`),
:mod:`.tcpstore` (the store's server and client), :mod:`.filestore` (the shared
directory), :mod:`.errors`. The launchers (:mod:`hpcproc.launchers`) only read the
scheduler's environment; this package does the network and file-system work that
follows, authenticated with :mod:`hpcproc.auth`.
"""

from __future__ import annotations

from .errors import RendezvousError
from .exchange import (
    DEFAULT_TIMEOUT,
    PORT_BASE,
    PORT_SPAN,
    PORT_TRIES,
    Method,
    Roster,
    choose_method,
    exchange,
    job_key,
    rendezvous,
    store_ports,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "PORT_BASE",
    "PORT_SPAN",
    "PORT_TRIES",
    "Method",
    "RendezvousError",
    "Roster",
    "choose_method",
    "exchange",
    "job_key",
    "rendezvous",
    "store_ports",
]
