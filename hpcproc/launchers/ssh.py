"""Start a job's ranks over ssh: ``python -m hpcproc.run --hosts h1,h2:4,h3 app:main``.

For machines without a batch scheduler (a workstation pool, rented VMs). The launching
process runs one ``ssh`` per rank with the OpenSSH client, in ``BatchMode`` (never a
password prompt; the user's keys, agent and ``~/.ssh/config`` apply), and runs
``python -m hpcproc.run`` on the remote host with the same interpreter path and
working directory (shared file systems are the norm on clusters; set
``HPCPROC_SSH_PYTHON`` otherwise). Each rank gets the explicit ``HPCPROC_*``
description of the job (rank, size, the host of every rank, a job id, a rendezvous
port); rank 0 runs on the first host and serves the rendezvous there, as elsewhere.

The rank's standard input is its lifeline (see :mod:`.children`): the cluster cookie is
its first line (it never appears on a command line, where ``ps`` would show it),
then the signals this process receives are passed on; when this process goes away,
ssh closes the remote standard input and the rank stops. Standard output and error
come back with a ``[rank@host]`` prefix on every line. A host that cannot be reached
(ssh exits with status 255 before the rank started) stops the whole job at once,
with a message naming the host and ssh's own words.

``HPCPROC_SSH`` replaces the ssh command (for example ``ssh -F ./ssh_config``; split
like a shell would).
"""

from __future__ import annotations

import os
import random
import re
import shlex
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from .children import Children
from .info import LauncherError

__all__ = ["SSH_FAILED", "parse_hostfile", "parse_hosts", "run_over_ssh"]

#: The status ssh exits with when it could not run the command at all.
SSH_FAILED = 255

#: What a rank reads from its lifeline before anything else: the cookie, then a newline.
COOKIE_ENV = "HPCPROC_LIFELINE_COOKIE"

_HOST = re.compile(r"[A-Za-z0-9_.\-\[\]@]+")
#: Variables the launcher sets for each rank itself; the user's are not forwarded.
_OWN = {
    "HPCPROC_RANK",
    "HPCPROC_SIZE",
    "HPCPROC_HOSTS",
    "HPCPROC_LOCAL_RANK",
    "HPCPROC_LOCAL_SIZE",
    "HPCPROC_JOB_ID",
    "HPCPROC_PORT",
    "HPCPROC_COOKIE",
    "HPCPROC_LIFELINE_FD",
    "HPCPROC_LIFELINE_OWNER",
    COOKIE_ENV,
}


def _host_entry(item: str, slots: int, where: str) -> list[str]:
    if not _HOST.fullmatch(item):
        raise LauncherError(f"{where}: {item!r} is not a host name")
    if slots < 1:
        raise LauncherError(f"{where}: {item!r} has {slots} slots; give at least 1")
    return [item] * slots


def parse_hosts(text: str) -> list[str]:
    """``"h1,h2:4,h3"`` -> one host per rank: ``[h1, h2, h2, h2, h2, h3]``.

    Raises:
        LauncherError: an empty list, a malformed host or slot count.
    """
    hosts: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise LauncherError(f"--hosts {text!r}: empty host name")
        name, sep, count = item.rpartition(":") if ":" in item else (item, "", "1")
        if sep and not count.isdigit():
            raise LauncherError(f"--hosts {text!r}: {item!r} is not HOST or HOST:SLOTS")
        hosts += _host_entry(name, int(count), f"--hosts {text!r}")
    return hosts


def parse_hostfile(path: str | Path) -> list[str]:
    """An MPI hostfile -> one host per rank.

    One host per line, as ``host``, ``host:N`` (MPICH) or ``host slots=N`` (Open MPI);
    ``#`` starts a comment; blank lines are ignored.

    Raises:
        LauncherError: the file cannot be read, or a line is malformed (named by
            its number).
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise LauncherError(f"cannot read hostfile {path}: {exc}") from exc
    hosts: list[str] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {path}, line {number}"
        fields = line.split()
        name, slots = fields[0], 1
        if ":" in name:
            name, _, count = name.rpartition(":")
            if not count.isdigit():
                raise LauncherError(f"{where}: {raw.strip()!r} is not HOST:SLOTS")
            slots = int(count)
        for extra in fields[1:]:
            key, _, value = extra.partition("=")
            if key in ("slots", "max_slots", "max-slots") and value.isdigit():
                if key == "slots":
                    slots = int(value)
            else:
                raise LauncherError(f"{where}: unknown field {extra!r} (expected slots=N)")
        hosts += _host_entry(name, slots, where)
    if not hosts:
        raise LauncherError(f"hostfile {path} names no host")
    return hosts


def _remote_command(env: Mapping[str, str], argv: Sequence[str]) -> str:
    """``cd DIR && exec env K=V ... PYTHON -m hpcproc.run ARGS``, quoted for the remote shell."""
    assignments = [f"{k}={v}" for k, v in env.items()]
    words = ["env", *assignments, *argv]
    return f"cd {shlex.quote(os.getcwd())} && exec " + " ".join(shlex.quote(w) for w in words)


def run_over_ssh(hosts: Sequence[str], argv: Sequence[str], cookie: bytes) -> int:
    """Run ``python -m hpcproc.run ARGV`` on ``hosts`` (one rank each); rank 0's status.

    Raises:
        LauncherError: the cookie cannot travel on a line (it holds a newline).
    """
    if b"\n" in cookie:
        raise LauncherError("the cluster cookie holds a newline; it cannot be sent to the ranks")
    ssh = shlex.split(os.environ.get("HPCPROC_SSH", "ssh"))
    python = os.environ.get("HPCPROC_SSH_PYTHON", sys.executable)
    size = len(hosts)
    job = f"ssh-{uuid.uuid4().hex[:12]}"
    # Below the ephemeral range, as the schedulers' derived ports are.
    port = random.Random(job).randrange(20000, 28192)
    forwarded = {
        k: v
        for k, v in os.environ.items()
        if (k.startswith("HPCPROC_") and k not in _OWN and not k.startswith("HPCPROC_SSH"))
        or k == "PYTHONPATH"
    }
    per_host: dict[str, int] = {}
    children = Children()
    failed: list[str] = []

    def on_exit(index: int, status: int) -> None:
        if status == SSH_FAILED and not failed:
            failed.append(f"cannot start rank {index} on {hosts[index]} over ssh")
            children.cut_lifelines()  # the others would wait for it until their timeout

    restore = children.handle_signals()
    try:
        for rank, host in enumerate(hosts):
            local_rank = per_host.get(host, 0)
            per_host[host] = local_rank + 1
            env = {
                **forwarded,
                "HPCPROC_RANK": str(rank),
                "HPCPROC_SIZE": str(size),
                "HPCPROC_HOSTS": ",".join(hosts),
                "HPCPROC_LOCAL_RANK": str(local_rank),
                "HPCPROC_LOCAL_SIZE": str(hosts.count(host)),
                "HPCPROC_JOB_ID": job,
                "HPCPROC_PORT": str(port),
                "HPCPROC_LIFELINE_FD": "0",
                "HPCPROC_LIFELINE_OWNER": "hpcproc.run --hosts launcher",
                COOKIE_ENV: "1",
            }
            command = _remote_command(env, [python, "-m", "hpcproc.run", *argv])
            children.start(
                [*ssh, "-o", "BatchMode=yes", "-T", host, command],
                os.environ,
                owner="hpcproc.run --hosts launcher",
                lifeline_on_stdin=True,
                first=cookie + b"\n",
                prefix=f"[{rank}@{host}] ",
            )
        statuses = children.wait(on_exit)
    finally:
        restore()
        children.kill_all()
    if failed:
        sys.stderr.write(
            f"hpcproc.run: {failed[0]} (ssh exited with {SSH_FAILED}; its message is above,"
            " prefixed with the rank): check that the host is up, runs sshd, and accepts"
            " your key without a prompt (ssh -o BatchMode=yes HOST true)\n"
        )
        return 1
    return children.job_status(statuses[0])
