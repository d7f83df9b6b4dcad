"""``python -m bench report --smoke`` runs every suite available here and writes the
report it promises: a JSON file that parses, PNG plots that open, a Markdown report
naming every suite run and every peer left out. The Erlang baseline stops every node
and the epmd it starts. Smoke figures mean nothing and are not checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ERLANG_PROGRAMS = {"epmd", "beam", "beam.smp", "erl_child_setup", "inet_gethost"}


def _erlang_pids() -> set[int]:
    """Pids of the Erlang runtime's live processes (nodes, epmd) on this machine.

    Zombies are left out: a node's helpers (erl_child_setup, inet_gethost) outlive it
    only as exit statuses, reparented to init, which reaps them when it will.
    """
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            name, _, rest = stat.partition("(")[2].rpartition(")")
            if name in ERLANG_PROGRAMS and rest.split()[0] != "Z":
                pids.add(int(entry.name))
    return pids


def _need_erlang() -> None:
    if shutil.which("erl") is None:
        if os.environ.get("HPCPROC_REQUIRE_ERLANG") == "1":
            pytest.fail(
                "HPCPROC_REQUIRE_ERLANG=1 but erl is not on PATH (apt-get install erlang-base)"
            )
        pytest.skip("Erlang/OTP not installed (apt-get install erlang-base)")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("report")
    # A clean environment: no UCX_*/scheduler variables of this process, as in a shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCX_", "SLURM_", "PMI_"))}
    before = _erlang_pids()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "report", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _erlang_pids() <= before, "the report left Erlang processes running"
    data = json.loads((out / "report.json").read_text())
    return out, data, (out / "report.md").read_text()


@pytest.mark.timeout(960)
def test_report_json_parses_and_holds_every_suite(
    report: tuple[Path, dict[str, Any], str],
) -> None:
    _, data, _ = report
    suites = {s["suite"] for s in data["suites"]}
    assert suites == {"transport", "process", "peers"}
    assert {s["transport"] for s in data["suites"] if s["suite"] == "transport"} >= {"tcp"}
    for suite in data["suites"]:
        assert suite["error"] is None, suite
        assert suite["records"] > 0, suite
    assert len(data["records"]) == sum(s["records"] for s in data["suites"])
    assert {r["suite"] for r in data["records"]} == suites
    assert data["machine"]["python"] and data["machine"]["cores"]


@pytest.mark.timeout(960)
def test_report_markdown_names_every_suite_and_every_peer_left_out(
    report: tuple[Path, dict[str, Any], str],
) -> None:
    _, data, markdown = report
    for suite in data["suites"]:
        assert f"## {suite['suite']} ({suite['transport']})" in markdown
    for what, why in data["skipped"].items():
        assert f"- {what}: {why}" in markdown
    assert "## Machine" in markdown


@pytest.mark.timeout(960)
def test_report_plots_open_as_png_images(report: tuple[Path, dict[str, Any], str]) -> None:
    from PIL import Image

    out, _, markdown = report
    plots = sorted(out.glob("*.png"))
    names = {p.name for p in plots}
    assert {"transport-tcp.png", "peers-rtt.png", "peers-rate.png", "spawn.png"} <= names
    for plot in plots:
        with Image.open(plot) as image:
            assert image.format == "PNG"
            image.load()  # decodes every pixel: a truncated file fails here
            assert image.width > 100 and image.height > 100
        assert f"]({plot.name})" in markdown


@pytest.mark.timeout(960)
def test_report_compares_hpcproc_with_erlang_over_shm_and_tcp(
    report: tuple[Path, dict[str, Any], str],
) -> None:
    _need_erlang()
    _, data, _ = report
    erlang = {
        (r["transport"], r["metric"])
        for r in data["records"]
        if r["suite"] == "peers" and r["baseline"].startswith("erlang")
    }
    for transport in ("shm", "tcp"):
        assert {(transport, "rtt"), (transport, "msg_rate"), (transport, "bandwidth")} <= erlang
    assert {("local", "rtt"), ("local", "spawn_rate")} <= erlang


def test_erlang_baseline_stops_every_node_and_epmd_it_starts() -> None:
    _need_erlang()
    from bench.peers import erlang

    before = _erlang_pids()
    figures = erlang.measure([5, 1, 1, 1 << 16, 1, 50, 1, 5, 50], timeout=120)
    assert _erlang_pids() <= before
    assert set(figures) == {
        "rtt_remote",
        "rtt_remote_big",
        "rate_remote",
        "spawn_remote",
        "rtt_local",
        "rate_local",
        "spawn_local",
    }
    assert all(len(values) == 1 and values[0] > 0 for values in figures.values())


@pytest.mark.parametrize("spec", ["inmemory", "tcp,bogus", ""])
def test_peers_suite_rejects_a_transport_it_cannot_measure_naming_the_choices(spec: str) -> None:
    from bench import SuiteOptions
    from bench.peers import run

    with pytest.raises(ValueError, match="comma-separated list of tcp, shm, mpi, ucx"):
        run(SuiteOptions(transport=spec, smoke=True))
