"""``python -m bench`` runs every suite end to end (``--smoke``: a few iterations per
row) and writes well-formed records with the baselines it promises. The figures of a
smoke run mean nothing and are not checked against any threshold."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: (suite, transport) -> the baselines its records must name.
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("transport", "tcp"): {"socket", "socket-asyncio"},
    ("transport", "shm"): {"mp.Pipe", "mpi4py"},
    ("transport", "mpi"): {"mpi4py", "mpi4py-pickle", "asyncio-floor"},
    ("transport", "ucx"): {"ucxx"},
    ("process", "tcp"): {
        "raw tcp transport",
        "raw tcp one-way",
        "asyncio.Queue",
        "asyncio task",
        "target",
        "1 / process rtt",
    },
    ("otp", "tcp"): {
        "process rtt",
        "1 caller: 1 / process rtt",
        "16 callers: target",
        "target",
        "ProcessPoolExecutor",
    },
}

NEEDS = {"mpi": "mpi4py", "ucx": "ucxx", "shm": "mpi4py"}


def run_bench(suite: str, transport: str, out: Path, *extra: str) -> list[dict[str, Any]]:
    # A clean environment: no UCX_* variables of this process (importing ucxx sets
    # some) and no scheduler variables, as a user's shell would have.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCX_", "SLURM_", "PMI_"))}
    argv = ["-m", "bench", suite, "--transport", transport, "--smoke", "--json", str(out), *extra]
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records: list[dict[str, Any]] = json.loads(out.read_text())
    return records


@pytest.mark.parametrize(("suite", "transport"), sorted(EXPECTED))
def test_bench_suite_runs_and_writes_records_against_its_baselines(
    suite: str, transport: str, tmp_path: Path
) -> None:
    module = NEEDS.get(transport)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"the {transport} benchmark needs {module}")
    records = run_bench(suite, transport, tmp_path / "out.json")
    assert records
    assert {r["baseline"] for r in records} == EXPECTED[(suite, transport)]
    for r in records:
        assert r["suite"] == suite
        assert r["value"] > 0 and math.isfinite(r["value"]), r
        assert r["baseline_value"] > 0 and math.isfinite(r["baseline_value"]), r
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    if suite == "transport":
        rtt_sizes = {r["size"] for r in records if r["metric"] == "rtt"}
        assert rtt_sizes == {8, 32768}
        # Every baseline but the round-trip-only floor also has a bandwidth row.
        assert {r["baseline"] for r in records if r["metric"] == "bandwidth"} >= (
            EXPECTED[(suite, transport)] - {"asyncio-floor"}
        )
    elif suite == "otp":
        assert {(r["transport"], r["metric"]) for r in records} >= {
            ("local", "rtt"),
            ("tcp", "rtt"),
            ("shm", "rtt"),
            ("tcp", "call_rate"),
            ("local", "restart_latency"),
            ("tcp", "task_rate"),
        }
    else:
        assert {r["metric"] for r in records} == {
            "rtt",
            "msg_rate",
            "spawn_rate",
            "bytes_per_process",
        }
        # The round trip of a small message, and of one with a 4 KiB array.
        assert sorted(r["size"] for r in records if r["metric"] == "rtt") == [8, 4096]


def test_cluster_suite_runs_locally_against_mpi4py_collectives(tmp_path: Path) -> None:
    """``--np 4``: four ranks here under mpiexec (not srun, even where a Slurm cluster
    answers), the collectives beside mpi4py's, the same-host round trip beside the
    process suite's shm one, node RSS, and start-up beside bare interpreters."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("the cluster benchmark needs mpi4py")
    records = run_bench("cluster", "auto", tmp_path / "out.json", "--np", "4")
    assert {(r["metric"], r["baseline"]) for r in records} == {
        ("op_time", "mpi4py Alltoall"),
        ("op_time", "mpi4py Scatter+Gather"),
        ("op_time", "mpi4py Allreduce"),
        ("node_rss", "1 peer connected"),
        ("node_rss", "0 peers connected"),
        ("rtt", "process suite, shm"),
        ("startup", "bare python"),
    }
    for r in records:
        assert r["suite"] == "cluster"
        assert r["transport"].startswith("auto (local, 4 ranks"), r
        assert r["value"] > 0 and math.isfinite(r["value"]), r
        assert r["baseline_value"] > 0 and math.isfinite(r["baseline_value"]), r
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r


def test_transport_summary_names_the_worst_ratio_of_each_baseline_over_all_sizes() -> None:
    from bench._records import record, worst_ratios

    records = [
        record("transport", "tcp", "rtt", 8, 20.0, "socket", 10.0),
        record("transport", "tcp", "rtt", 32768, 30.0, "socket", 10.0),
        record("transport", "tcp", "bandwidth", 1 << 20, 1.0, "socket", 2.5),
        record("transport", "tcp", "rtt", 8, 12.0, "mp.Pipe", 10.0),
    ]
    assert worst_ratios(records) == [
        "worst ratio tcp vs mp.Pipe over all sizes: 1.20 (rtt at 8 B)",
        "worst ratio tcp vs socket over all sizes: 3.00 (rtt at 32 KiB)",
    ]


def test_bench_transport_tls_reports_tls_beside_plain_tcp(tmp_path: Path) -> None:
    """``--tls``: the same run measures tcp over mutual TLS (certificates made for the
    run), reported as ``tcp+tls`` against plain hpcproc tcp, at every size tcp has."""
    pytest.importorskip("cryptography", reason="pip install hpcproc[tls] to make certificates")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCX_", "HPCPROC_TLS_"))}
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "transport", "--transport", "tcp", "--tls", "--smoke",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records: list[dict[str, Any]] = json.loads(out.read_text())
    tls = [r for r in records if r["transport"] == "tcp+tls"]
    assert {r["baseline"] for r in tls} == {"hpcproc-tcp"}
    plain = {(r["metric"], r["size"]) for r in records if r["transport"] == "tcp"}
    assert {(r["metric"], r["size"]) for r in tls} == plain


def test_a_baton_turn_raises_when_interrupted_or_after_its_timeout(tmp_path: Path) -> None:
    """The turn-taking of ``bench.cluster``'s round-trip row: a participant whose other
    side failed (``interrupt``) or went silent (``timeout``) raises instead of
    blocking forever; ``interrupt`` once the FIFOs are gone does nothing."""
    from bench._pair import Baton, PairError

    for index in range(2):
        os.mkfifo(tmp_path / f"baton-{index}")
    interrupted = Baton(tmp_path, 0, 2, timeout=60.0)
    interrupted.interrupt()
    with pytest.raises(PairError, match="failed"), interrupted.turn():
        pass
    interrupted.close()
    silent = Baton(tmp_path, 0, 2, timeout=0.05)
    with pytest.raises(PairError, match="no turn within"), silent.turn():
        pass
    silent.close()
    for index in range(2):
        (tmp_path / f"baton-{index}").unlink()
    silent.interrupt()


def test_a_cluster_job_that_times_out_reports_what_it_wrote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung job's ranks may have logged why (a link dropped): the timeout's error
    carries the job's output, which used to be lost with it."""
    from bench import cluster

    monkeypatch.setattr(cluster, "JOB_TIMEOUT", 1.0)
    argv = [
        sys.executable,
        "-c",
        "import sys, time; print('rank 0 said this'); sys.stdout.flush();"
        " print('and logged that', file=sys.stderr); sys.stderr.flush(); time.sleep(30)",
    ]
    with pytest.raises(RuntimeError) as info:
        cluster._run(argv, dict(os.environ), "the test job")
    message = str(info.value)
    assert "did not finish within 1.0 s" in message
    assert "rank 0 said this" in message and "and logged that" in message


def test_a_cluster_rank_whose_link_to_a_peer_drops_fails_at_once() -> None:
    """A measuring process waiting for a peer's message fails with the link's
    exception when the connection to the peer drops, instead of waiting
    ``JOB_TIMEOUT`` (seen: a job hung 600 s after an shm link dropped in an allreduce).
    Two in-memory nodes; the bundle is broken with the transport's fault injection."""
    import hpcproc as hp
    from bench import cluster

    from ._two_nodes import run_two_nodes

    async def peer() -> None:
        await hp.expect(type(None))  # waits until the test ends

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        pids = [hp.self_pid(), await hp.spawn(b.node_id, peer)]
        await cluster._link_to_peers(pids, 0)
        await transport.break_connection(a.node_id.address, b.node_id.address)
        with pytest.raises(hp.ProcessLinkException) as info:
            await cluster._take("rs", 0, 0)  # the peer's step that will never come
        return info.value

    # Far below JOB_TIMEOUT: without the links, the wait would time out here.
    error = run_two_nodes(body, 20.0)
    assert isinstance(error.reason, hp.DiedDisconnect)
