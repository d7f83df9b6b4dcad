"""Mutual TLS across the hosts of the multi-host Slurm cluster (tests/slurm/up.sh).

Ranks on host1..host3 (each its own network namespace and host name) run
``python -m hpcproc.run --tls``: each finds its own host's certificate in
``HPCPROC_TLS_DIR/HOSTNAME/`` (``python -m hpcproc.tls init DIR --hosts ...``), and
rank 0 checks every link it holds is TLS 1.3 with the peer host's certificate. A rank
whose certificate another CA signed is refused by both sides.

Skipped when no cluster answers, except under HPCPROC_REQUIRE_SLURM=1 (a failure then),
as tests/test_slurm_e2e.py.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_slurm_e2e import PYTHON, Step, slurm_env, srun, steps

__all__ = ["slurm_env", "steps"]  # fixtures, imported for pytest

pytestmark = pytest.mark.slurm
pytest.importorskip("cryptography", reason="pip install hpcproc[tls] to make certificates")

THIS = str(Path(__file__).resolve())


async def app_report_tls_links(cluster: Any) -> None:
    """Rank 0 spawns on every worker (so it holds a link to each), then prints, per
    link, the TLS version and the common name of the certificate the peer presented;
    every rank prints which certificate it uses."""
    import hpcproc as hp

    async def hello(master: hp.Pid) -> None:
        await hp.send(master, "hello")

    for peer in cluster.peers:
        await hp.spawn(peer, hello, hp.self_pid())
        await hp.expect(str, timeout=60)
    endpoint = cluster.node._endpoint
    for link in list(endpoint._links.values()):
        sock = link._sock
        names = dict(item[0] for item in sock.getpeercert()["subject"])
        print(f"tls-link {sock.version()} peer-cn={names['commonName']}", flush=True)


@pytest.fixture
def tls_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The job's certificates (per host), and another job's."""
    from hpcproc.tls import init_directory

    base = tmp_path_factory.mktemp("tls-cluster")
    job = init_directory(base / "job", ["host1", "host2", "host3"])
    other = init_directory(base / "other", ["host2"])
    try:
        yield job, other
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_ranks_on_three_hosts_talk_over_mutual_tls_with_their_hosts_certificates(
    steps: list[Step], slurm_env: dict[str, str], tls_dirs: tuple[Path, Path]
) -> None:
    job, _ = tls_dirs
    env = {**slurm_env, "HPCPROC_TLS_DIR": str(job)}
    rc, out = srun(
        steps, env, "-N", "3", "-n", "3",
        PYTHON, "-m", "hpcproc.run", "--tls", "--timeout", "60", f"{THIS}:app_report_tls_links",
    ).finish()  # fmt: skip
    assert rc == 0, out
    links = sorted(re.findall(r"^tls-link (\S+) peer-cn=(\S+)$", out, re.M))
    assert links == [("TLSv1.3", "host2"), ("TLSv1.3", "host3")], out
    for rank in range(3):
        assert f"rank {rank} on host{rank + 1} exits with status 0" in out, out


def test_pingpong_across_three_hosts_with_tls_exits_zero(
    steps: list[Step], slurm_env: dict[str, str], tls_dirs: tuple[Path, Path]
) -> None:
    job, _ = tls_dirs
    env = {**slurm_env, "HPCPROC_TLS_DIR": str(job)}
    rc, out = srun(
        steps, env, "-N", "3", "-n", "3",
        PYTHON, "-m", "hpcproc.run", "--tls", "examples/pingpong.py:main",
    ).finish()  # fmt: skip
    assert rc == 0, out
    assert out.count("round trips") == 2, out


def test_a_host_with_another_cas_certificate_is_refused_by_both_sides(
    steps: list[Step], slurm_env: dict[str, str], tls_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """host2's certificate comes from another job's CA: the links between it and the
    others fail, and both ends say the certificate was not signed by the job's CA.
    (Rendezvous through a shared directory, so that the links, not the store, meet
    the foreign certificate first.)"""
    job, other = tls_dirs
    shutil.rmtree(job / "host2")
    shutil.copytree(other / "host2", job / "host2")
    env = {
        **slurm_env,
        "HPCPROC_TLS_DIR": str(job),
        "HPCPROC_RENDEZVOUS_DIR": str(tmp_path / f"rdv-{uuid.uuid4().hex[:8]}"),
    }
    rc, out = srun(
        steps, env, "-N", "3", "-n", "3",
        PYTHON, "-m", "hpcproc.run", "--tls", "--timeout", "30", "examples/pingpong.py:main",
    ).finish()  # fmt: skip
    assert rc != 0, out
    # host2 refuses the others' certificates (not its CA's) when it accepts or dials...
    assert re.search(r"certificate was not signed by the job's CA", out), out
    # ... and the others learn that host2 refused theirs, or refuse host2's.
    assert re.search(
        r"refused this node's certificate|the peer's certificate was not signed", out
    ), out
