"""The per-node logger process behind ``say``.

Every node starts one logger process registered as ``"logger"``. ``say(text)`` sends
it a :class:`LogRecord` (timestamp, node, pid, text) and never waits; the logger
writes one formatted line per record to the node's sink (``sys.stderr`` unless
``Node(log_sink=...)`` says otherwise). Because ``say`` resolves the *name*
``"logger"`` on its own node, re-registering that name on a node to another node's
logger (``redirect_logs``) sends all of that node's logs there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._ids import NodeId, Pid

__all__ = ["LOGGER_NAME", "LogRecord", "format_record", "logger_main", "stderr_sink"]

LOGGER_NAME = "logger"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One ``say``: when (seconds since the epoch), where, who, what."""

    time: float
    node: NodeId
    pid: Pid
    text: str
    #: The host the record was made on.
    host: str = ""


def format_record(rec: LogRecord) -> str:
    """``12:00:00.123 host1 <rank1.42>: text`` (local time, host, the short pid)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(rec.time))
    millis = int((rec.time % 1) * 1000)
    host = f" {rec.host}" if rec.host else ""
    return f"{stamp}.{millis:03d}{host} {rec.pid!r}: {rec.text}"


def stderr_sink(line: str) -> None:
    """The default sink: one line on standard error, flushed."""
    print(line, file=sys.stderr, flush=True)


async def logger_main(sink: Callable[[str], object]) -> None:
    """Body of the logger process: format and emit records until killed."""
    from ._process import current

    proc = current()
    while True:
        rec = await proc.receive((), None, LogRecord)
        try:
            sink(format_record(rec))
        except Exception as exc:  # a broken sink must not kill logging for good
            print(f"hpcproc logger sink failed: {exc!r}", file=sys.stderr)
