"""``python -m hpcproc.run --hosts`` / ``--hostfile``: ranks started over real ssh.

Each test host gets a real OpenSSH server with keys made by the test. On the
multi-host test cluster (``tests/slurm/up.sh``) there is one sshd per host, inside the
host's network namespace under its host name, so the ranks really run on separate
network stacks with their own host names; without it (a developer's machine) the
tests use one sshd on 127.0.0.1 and names that resolve to it.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcproc.launchers import LauncherError
from hpcproc.launchers.ssh import parse_hostfile, parse_hosts
from tests._lines import LineProcess

ROOT = Path(__file__).resolve().parent.parent
THIS = f"{Path(__file__).resolve()}"
WAIT = 60.0
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


# ------------------------------------------------------------ parsing


def test_hosts_list_gives_one_entry_per_slot() -> None:
    assert parse_hosts("h1,h2:3,h3") == ["h1", "h2", "h2", "h2", "h3"]


@pytest.mark.parametrize("bad", ["", "h1,,h2", "h1:x", "h1:0", "h 1", "h1:-2"])
def test_malformed_hosts_list_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(LauncherError, match="--hosts"):
        parse_hosts(bad)


def test_hostfile_reads_mpich_and_open_mpi_forms(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# comment\nh1\n\nh2:2  # two\nh3 slots=3 max_slots=8\n")
    assert parse_hostfile(path) == ["h1", "h2", "h2", "h3", "h3", "h3"]


def test_malformed_hostfile_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("h1\nh2 cores=4\n")
    with pytest.raises(LauncherError, match=r"line 2.*cores=4"):
        parse_hostfile(path)


def test_missing_hostfile_says_so(tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="cannot read hostfile"):
        parse_hostfile(tmp_path / "nope")


# ------------------------------------------------------------ real sshds


@dataclass
class SshHosts:
    names: list[str]
    config: Path
    env: dict[str, str]


def _start_sshd(workdir: Path, address: str, port: int, netns: str | None) -> LineProcess:
    """A real sshd on ``address``:``port`` (in network namespace ``netns``), listening."""
    config = workdir / f"sshd-{address}.conf"
    config.write_text(
        f"Port {port}\nListenAddress {address}\nHostKey {workdir / 'hostkey'}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile none\n"
    )
    argv = [SSHD, "-D", "-e", "-f", str(config)]
    if netns is not None:
        # Inside the host's network namespace, under its own host name and in an IPC
        # namespace of its own (as its slurmd: tests/slurm/up.sh).
        name = netns.removeprefix("hpcproc-h")
        script = f"hostname host{name} && exec {' '.join(argv)}"
        argv = ["nsenter", f"--net=/run/netns/{netns}", "unshare", "-u", "-i", "sh", "-c", script]
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = LineProcess(argv, os.environ, workdir)
    try:
        sshd.wait_for_lines("Server listening on", 1, WAIT)
    except BaseException:
        sshd.kill(WAIT)  # reaped, whether it ended or hangs
        raise
    return sshd


def _cluster_hosts() -> list[tuple[str, str, str]]:
    """``(host name, address, network namespace)`` of the multi-host test cluster's
    first three hosts when it is up (``tests/slurm/up.sh``), else ``[]``.

    Raises (through pytest.fail): ``HPCPROC_REQUIRE_SLURM`` is set but it is not up.
    """
    state = Path(os.environ.get("HPCPROC_SLURM_STATE", "/tmp/hpcproc-slurm"))
    if not (state / "cluster.env").exists():
        if os.environ.get("HPCPROC_REQUIRE_SLURM"):
            pytest.fail(f"the multi-host test cluster is not up ({state}/cluster.env missing)")
        return []
    return [(f"host{n}", f"127.1.0.{n}", f"hpcproc-h{n}") for n in (1, 2, 3)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_sshd(workdir: Path, address: str, netns: str | None) -> tuple[LineProcess, int]:
    """:func:`_start_sshd` on a port free here; another one when the host's own network
    namespace has that port in use (seen in CI: ``Bind to port ... on 127.1.0.1 failed:
    Address already in use``, a port free in this namespace but not in the host's)."""
    for _ in range(4):
        port = _free_port()
        try:
            return _start_sshd(workdir, address, port, netns), port
        except AssertionError as exc:
            if "Address already in use" not in str(exc):
                raise
    port = _free_port()
    return _start_sshd(workdir, address, port, netns), port


@pytest.fixture
def ssh_hosts(tmp_path: Path) -> Iterator[SshHosts]:
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        missing = "OpenSSH server and client are not installed (apt-get install openssh-server)"
        if os.environ.get("HPCPROC_REQUIRE_SSH"):
            pytest.fail(missing)
        pytest.skip(missing)
    for name in ("hostkey", "userkey"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)],
            check=True,
        )
    shutil.copy(tmp_path / "userkey.pub", tmp_path / "authorized_keys")
    host_key = (tmp_path / "hostkey.pub").read_text().split()[:2]
    (tmp_path / "known_hosts").write_text(f"hpcproc-test-host {' '.join(host_key)}\n")
    cluster = _cluster_hosts()
    # Without the multi-host cluster: three names that resolve to this machine.
    hosts = [(name, address) for name, address, _ in cluster] or [
        ("localhost", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.1"),
        ("127.0.0.3", "127.0.0.1"),
    ]
    sshds: list[LineProcess] = []
    try:
        ports: dict[str, int] = {}
        if cluster:
            for name, address, netns in cluster:
                sshd, ports[name] = _listening_sshd(tmp_path, address, netns)
                sshds.append(sshd)
        else:
            sshd, port = _listening_sshd(tmp_path, "127.0.0.1", None)
            sshds.append(sshd)
            ports = {name: port for name, _ in hosts}
        lines = [
            f"Host {name}\n  HostName {address}\n  Port {ports[name]}\n"
            f"  IdentityFile {tmp_path / 'userkey'}\n  IdentitiesOnly yes\n"
            f"  HostKeyAlias hpcproc-test-host\n  UserKnownHostsFile {tmp_path / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n  ConnectTimeout 10\n"
            for name, address in hosts
        ]
        lines.append(f"Host refusing\n  HostName 127.0.0.1\n  Port {_free_port()}\n")
        config = tmp_path / "ssh_config"
        config.write_text("".join(lines))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
        env.update(
            HPCPROC_SSH=f"ssh -F {config}",
            HPCPROC_COOKIE="test-ssh-cookie",
            PYTHONPATH=str(ROOT),
        )
        yield SshHosts([n for n, _ in hosts], config, env)
    finally:
        for sshd in sshds:
            sshd.kill(WAIT)


def run_job(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    job = LineProcess([sys.executable, "-m", "hpcproc.run", *args], env, ROOT)
    try:
        return job.finish(WAIT)
    finally:
        job.kill(10)


def test_hosts_start_every_rank_over_ssh_and_prefix_their_output(ssh_hosts: SshHosts) -> None:
    h1, h2, h3 = ssh_hosts.names
    rc, out = run_job(["--hosts", f"{h1},{h2}:2,{h3}", "examples/pingpong.py:main"], ssh_hosts.env)
    assert rc == 0, out
    assert f"[0@{h1}] pingpong with rank 1 on {h2}" in out, out
    assert f"pingpong with rank 3 on {h3}" in out, out


def test_hostfile_starts_the_ranks_it_lists(ssh_hosts: SshHosts, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    h1, h2, _ = ssh_hosts.names
    hostfile.write_text(f"{h1}\n{h2} slots=1\n")
    rc, out = run_job(["--hostfile", str(hostfile), "examples/pingpong.py:main"], ssh_hosts.env)
    assert rc == 0, out
    assert f"pingpong with rank 1 on {h2}" in out, out


def test_refusing_host_fails_the_job_at_once_naming_it(ssh_hosts: SshHosts) -> None:
    hosts = f"{ssh_hosts.names[0]},refusing"
    rc, out = run_job(["--hosts", hosts, "examples/pingpong.py:main"], ssh_hosts.env)
    assert rc == 1, out
    assert "cannot start rank 1 on refusing over ssh" in out, out
    assert "Connection refused" in out, out
    assert "timed out" not in out, out  # rank 0 did not wait for it


async def app_ready_then_sleep(cluster: object) -> None:
    sys.stdout.write(f"ready pid={os.getpid()}\n")
    sys.stdout.flush()
    await asyncio.sleep(3600)


def start_sleepers(ssh_hosts: SshHosts) -> tuple[LineProcess, list[int]]:
    """Two ranks (SPMD) over ssh, both in main; their pids."""
    hosts = ",".join(ssh_hosts.names[:2])
    argv = [sys.executable, "-m", "hpcproc.run", "--spmd", "--hosts", hosts]
    job = LineProcess([*argv, f"{THIS}:app_ready_then_sleep"], ssh_hosts.env, ROOT)
    lines = job.wait_for_lines(r"ready pid=\d+", 2, WAIT)
    return job, [int(line.rsplit("=", 1)[1]) for line in lines]


def wait_gone(pid: int) -> None:
    """Return once process ``pid`` has exited (bounded), without polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], WAIT)
        assert ready, f"rank process {pid} still runs {WAIT} s after its launcher went"
    finally:
        os.close(fd)


def test_ctrl_c_to_the_launcher_stops_every_remote_rank(ssh_hosts: SshHosts) -> None:
    job, pids = start_sleepers(ssh_hosts)
    try:
        job.proc.send_signal(signal.SIGINT)
        rc, out = job.finish(WAIT)
        for pid in pids:
            wait_gone(pid)
    finally:
        job.kill(10)
    assert rc == 128 + signal.SIGINT, out
    assert out.count("stopped by SIGINT") == 2, out


def test_losing_the_launcher_stops_every_remote_rank(ssh_hosts: SshHosts) -> None:
    job, pids = start_sleepers(ssh_hosts)
    try:
        job.proc.kill()  # the launcher alone: nothing is passed on, its pipes close
        for pid in pids:
            wait_gone(pid)
    finally:
        job.kill(10)
