"""Ranks that this process starts itself (``--np N`` here, ``--hosts`` over ssh).

:class:`Children` starts each rank as a child process with a *lifeline*: a pipe whose
write end only this process holds. The rank reads it (``HPCPROC_LIFELINE_FD``, see
``hpcproc.run``): optional first bytes (the ssh launcher sends the cookie that way, so
it never shows on a command line), then one byte per signal passed on, and end of file
when this process is gone, however it died. Signals are passed on through the
lifeline rather than as signals, because a Ctrl-C in a terminal reaches local ranks
directly too, and a second signal means "stop at once".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO

__all__ = ["Children", "read_lifeline_line", "watch_lifeline"]

log = logging.getLogger("hpcproc.run")

#: How long ranks get to stop after a signal before they are killed.
GRACE = 10.0


class Children:
    """Child ranks, their lifelines and their exit statuses.

    Use :meth:`start` for each rank, then :meth:`wait`. SIGTERM / SIGINT received
    while waiting are passed on to every rank through its lifeline; a second one kills
    the ranks at once. Every child is reaped (and killed first if need be) by
    :meth:`wait` or :meth:`kill_all`, whatever happens.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._lifelines: list[int | None] = []
        self._pumps: list[threading.Thread] = []
        #: Signals received while waiting, in order.
        self.received: list[int] = []
        self._exits: queue.Queue[tuple[int, int]] = queue.Queue()
        self._timer: threading.Timer | None = None

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        owner: str,
        lifeline_on_stdin: bool = False,
        first: bytes = b"",
        prefix: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start one rank.

        Args:
            owner: names this process in the rank's message when it is gone.
            lifeline_on_stdin: the lifeline is the child's standard input (ssh carries
                nothing else to the remote rank); otherwise an extra descriptor named
                by ``HPCPROC_LIFELINE_FD`` in ``env`` (added here).
            first: bytes written to the lifeline before anything else.
            prefix: if set, the child's stdout and stderr lines are copied to ours,
                each line starting with it; otherwise the child shares ours.
        """
        read_end, write_end = os.pipe()
        env = {**env, "HPCPROC_LIFELINE_OWNER": owner}
        if not lifeline_on_stdin:
            env["HPCPROC_LIFELINE_FD"] = str(read_end)
        out = subprocess.PIPE if prefix is not None else None
        try:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                stdin=read_end if lifeline_on_stdin else subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=() if lifeline_on_stdin else (read_end,),
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        index = len(self.procs)
        self.procs.append(proc)
        self._lifelines.append(write_end)
        if first:
            self._write(index, first)
        if self.received:
            # A signal came while starting: pass it on to the late ones too.
            self._write(index, bytes([self.received[0]]))
        if prefix is not None:
            assert proc.stdout is not None and proc.stderr is not None
            for stream, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                pump = threading.Thread(target=_copy_lines, args=(stream, sink, prefix))
                pump.daemon = True
                pump.start()
                self._pumps.append(pump)
        threading.Thread(target=self._reap, args=(index, proc), daemon=True).start()
        return proc

    def _reap(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        self._exits.put((index, proc.wait()))

    def _write(self, index: int, data: bytes) -> None:
        fd = self._lifelines[index]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, data)

    def cut_lifelines(self) -> None:
        """Close every lifeline: the ranks stop as if this process had died."""
        for index, fd in enumerate(self._lifelines):
            if fd is not None:
                self._lifelines[index] = None
                os.close(fd)

    def kill_all(self) -> None:
        """SIGKILL every child still running, reap it, and close its lifeline."""
        if self._timer is not None:
            self._timer.cancel()
        self._kill_running()
        for proc in self.procs:
            proc.wait()
        self.cut_lifelines()
        for pump in self._pumps:
            pump.join(GRACE)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            _write_line(
                sys.stderr,
                f"hpcproc.run: second {signal.Signals(signum).name}, killing the ranks at once",
            )
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            return
        for index in range(len(self.procs)):
            self._write(index, bytes([signum]))
        self._timer = threading.Timer(GRACE, self._kill_running)
        self._timer.daemon = True
        self._timer.start()

    def _kill_running(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def handle_signals(self) -> Callable[[], None]:
        """Pass SIGTERM / SIGINT on from now; returns the function that stops it."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, handler in old.items():
                signal.signal(s, handler)

        return restore

    def wait(self, on_exit: Callable[[int, int], None] | None = None) -> list[int]:
        """Wait for every child; their statuses (``-N`` for death by signal N).

        ``on_exit(index, status)`` is called as each one ends, in the order they end
        (the ssh launcher cuts the lifelines when one could not even be started).
        After a signal, ranks still running after :data:`GRACE` seconds are killed.
        """
        statuses: dict[int, int] = {}
        try:
            while len(statuses) < len(self.procs):
                index, status = self._exits.get()
                statuses[index] = status
                if on_exit is not None:
                    on_exit(index, status)
        finally:
            self.kill_all()
        return [statuses[i] for i in range(len(self.procs))]

    def job_status(self, status: int) -> int:
        """The status to exit with for a job whose rank 0 ended with ``status``."""
        if len(self.received) > 1:
            return 128 + self.received[-1]  # a second signal killed the ranks
        return 128 - status if status < 0 else status


def watch_lifeline(
    loop: asyncio.AbstractEventLoop,
    on_signal: Callable[[int], None],
    on_gone: Callable[[str], None],
) -> int | None:
    """The rank's side: follow the lifeline of the process that started this rank.

    The parent passes the read end of a pipe whose write end only it holds
    (``HPCPROC_LIFELINE_FD``): each byte on it is a signal the parent received and
    passes on (``on_signal(signum)``); end of file means the parent died
    (``on_gone()``). The variable is removed from the environment, so that the
    application's own children do not inherit it. Returns the descriptor watched (to
    be closed by the caller), or None.
    """
    value = os.environ.pop("HPCPROC_LIFELINE_FD", None)
    owner = os.environ.pop("HPCPROC_LIFELINE_OWNER", "launcher")
    if value is None:
        return None
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError):
        log.warning("ignoring HPCPROC_LIFELINE_FD=%r: not an open descriptor", value)
        return None

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            on_gone(owner)
        for signum in data:
            on_signal(signum)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    return fd


def read_lifeline_line() -> str:
    """The rank's side: the first line of its lifeline (``HPCPROC_LIFELINE_FD``, else
    standard input), read a byte at a time (what follows is signals)."""
    fd = int(os.environ.get("HPCPROC_LIFELINE_FD", "0"))
    data = bytearray()
    while (byte := os.read(fd, 1)) not in (b"", b"\n"):
        data += byte
    return data.decode()


def _write_line(stream: IO[str], text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def _copy_lines(source: IO[bytes], sink: IO[str], prefix: str) -> None:
    """Copy ``source``'s lines to ``sink``, each as one write starting with ``prefix``."""
    with source:
        for raw in source:
            line = raw.decode(errors="replace").rstrip("\n")
            _write_line(sink, f"{prefix}{line}")
