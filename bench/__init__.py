"""hpcproc benchmarks: ``python -m bench SUITE [--transport NAME] [--quick] [--json PATH]``.

Each suite measures hpcproc and, in the same run, the baselines it is compared with,
and returns :class:`Record` rows (printed as a table, optionally written as JSON).

Harness API, for writing a suite (``bench/<name>.py``, registered in :data:`SUITES`):

* ``run(options: SuiteOptions) -> list[Record]`` is the suite's entry point.
* :func:`run_pair` (``bench._pair``) runs a role function ``"module:function"`` as two
  OS processes (``launch="local"``), as two MPI ranks (``launch="mpiexec"``), or as one
  process that starts its own partner (``launch="solo"``), and returns each role's
  JSON result. Role functions take a :class:`Peer` (``role``, ``params``,
  ``publish(key, value)``, ``lookup(key)`` / ``await alookup(key)``) and may be
  ``async``. :func:`run_pairs` runs several such jobs at once, their timed runs
  taking turns (pass ``peer.turn`` to the timing functions), for steady ratios on a
  busy machine.
* :func:`plan`, :func:`time_steps`, :func:`atime_steps` (``bench._timing``): sizes,
  warm-up, repeated timed runs; :func:`median` reduces the runs.
* :func:`record` builds a row from a metric name (``rtt``, ``bandwidth``,
  ``msg_rate``, ``spawn_rate``, ``task_rate``, ``bytes_per_process``), deriving the
  unit and a ratio oriented so that lower is better (1.0 = parity); :func:`format_table`
  and :func:`write_json` are what ``python -m bench`` prints and writes.
"""

from ._pair import Baton, Job, Launch, PairError, Peer, find_mpiexec, run_pair, run_pairs
from ._records import METRICS, Record, format_table, median, record, write_json
from ._suites import SUITES, SuiteOptions, load_suite
from ._timing import SIZES, Step, atime_steps, echo_counts, plan, time_steps

__all__ = [
    "METRICS",
    "SIZES",
    "SUITES",
    "Baton",
    "Job",
    "Launch",
    "PairError",
    "Peer",
    "Record",
    "Step",
    "SuiteOptions",
    "atime_steps",
    "echo_counts",
    "find_mpiexec",
    "format_table",
    "load_suite",
    "median",
    "plan",
    "record",
    "run_pair",
    "run_pairs",
    "time_steps",
    "write_json",
]
