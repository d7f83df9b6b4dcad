"""A child process whose merged stdout/stderr lines a test can wait for, with deadlines."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path


class LineProcess:
    """Starts ``argv`` in its own session (so its whole process group can be killed)
    and pumps its output lines into a queue from a thread."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path | str) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_lines(self, pattern: str, count: int, timeout: float) -> list[str]:
        """The first ``count`` output lines matching the regex ``pattern``.

        Raises:
            AssertionError: the process ended first.
            queue.Empty: ``timeout`` seconds passed first.
        """
        found: list[str] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"ended before {count} x {pattern!r}:\n{''.join(self.output)}")
            self.output.append(line)
            if re.search(pattern, line):
                found.append(line)
        return found

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait for the exit; its status and all its output.

        Raises:
            AssertionError: no exit within ``timeout`` seconds (with the output so far).
        """
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            while True:
                try:
                    line = self.lines.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    break
                self.output.append(line)
            raise AssertionError(
                f"{self.proc.args!r} did not exit within {timeout} s; output so far:\n"
                + "".join(self.output)
            ) from None
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.output.append(line)
        return rc, "".join(self.output)

    def kill(self, timeout: float) -> None:
        """SIGKILL the whole process group if the process still runs, and reap it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)
