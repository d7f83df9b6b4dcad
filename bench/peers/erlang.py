"""Erlang/OTP distribution: the figures of :mod:`bench.peers` measured between two nodes.

:func:`measure` compiles ``erl/peer_bench.erl`` with ``erlc`` into a temporary directory,
starts a private ``epmd`` (its own port, loopback only, so that no epmd of the user's is
used or started) and two ``erl -name ...@127.0.0.1`` nodes with a fresh shared cookie,
and parses what node A prints. Every process it starts (both nodes and epmd) is stopped
before it returns, whether the run succeeded or not.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["ErlangError", "available", "measure"]

SOURCE = Path(__file__).with_name("erl") / "peer_bench.erl"
INSTALL_HINT = "install Erlang/OTP (Debian: apt-get install erlang-base)"


class ErlangError(RuntimeError):
    """The Erlang baseline could not be built, started or completed."""


def available() -> str | None:
    """``None`` when ``erl``, ``erlc`` and ``epmd`` are on PATH, else why not (with the fix)."""
    missing = [tool for tool in ("erl", "erlc", "epmd") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found: {INSTALL_HINT}"
    return None


def otp_release() -> str | None:
    """The OTP release of the ``erl`` on PATH (e.g. ``"25"``), or ``None``."""
    if available() is not None:
        return None
    try:
        out = subprocess.run(
            [
                "erl",
                "-noshell",
                "-eval",
                'io:format("~s", [erlang:system_info(otp_release)]), halt().',
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ErlangError(f"epmd exited with {proc.returncode} (port {port} taken?)")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise ErlangError(f"epmd did not listen on 127.0.0.1:{port} in {timeout} s")
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat.rpartition(")")[2].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Kill ``proc`` if it still runs, then whatever is left of its process group.

    A node's helpers (erl_child_setup, inet_gethost) share its group and may outlive a
    node that halted by itself for a moment: they get ``grace`` seconds to exit.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + grace
    while _group_alive(proc.pid):
        if time.monotonic() > deadline:
            # Still members of the group: the kernel has not reused its id.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.01)


def measure(args: list[int], timeout: float = 600.0) -> dict[str, list[float]]:
    """Run ``peer_bench:main`` with ``args`` (see the .erl file); figures by name.

    ``args``: iterations, runs, warm-up, big size, big iterations, message count,
    rate runs, remote spawn count, local spawn count.

    Raises:
        ErlangError: Erlang is missing, the module does not compile, a node failed or
            the run exceeded ``timeout`` seconds.
    """
    why = available()
    if why is not None:
        raise ErlangError(why)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="hpcproc-bench-erl-") as tmp:
        built = subprocess.run(
            ["erlc", "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if built.returncode != 0:
            raise ErlangError(f"erlc {SOURCE.name} failed: {built.stdout}{built.stderr}")
        port = _free_port()
        env = {**os.environ, "ERL_EPMD_PORT": str(port), "HOME": tmp}
        tag = secrets.token_hex(4)
        cookie = secrets.token_hex(16)
        other = f"peer_b_{tag}@127.0.0.1"
        common = [
            "-noshell",
            "-noinput",
            "-start_epmd",
            "false",
            "-setcookie",
            cookie,
            "-pa",
            tmp,
            "-kernel",
            "inet_dist_use_interface",
            "{127,0,0,1}",
        ]
        try:
            epmd = subprocess.Popen(
                ["epmd", "-port", str(port), "-address", "127.0.0.1"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(epmd)
            _wait_listening(port, epmd, 30.0)
            node_b = subprocess.Popen(
                ["erl", "-name", other, *common, "-run", "peer_bench", "serve"],
                env=env,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(node_b)
            node_a = subprocess.Popen(
                [
                    "erl",
                    "-name",
                    f"peer_a_{tag}@127.0.0.1",
                    *common,
                    "-run",
                    "peer_bench",
                    "main",
                    other,
                    *map(str, args),
                ],
                env=env,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            procs.append(node_a)
            try:
                out, _ = node_a.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ErlangError(f"the Erlang benchmark did not finish in {timeout} s") from None
            text = out.decode(errors="replace")
            if node_a.returncode != 0:
                raise ErlangError(f"Erlang node A exited with {node_a.returncode}: {text}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                node_b.wait(timeout=30)  # A told it to halt
            results: dict[str, list[float]] = {}
            for line in text.splitlines():
                if line.startswith("result "):
                    name, *values = line.split()[1:]
                    results[name] = [float(v) for v in values]
            return results
        finally:
            for proc in reversed(procs):
                _stop(proc)
