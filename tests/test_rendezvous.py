"""Rendezvous over real loopback sockets and a real directory: every rank learns every
address, and a missing rank fails every rank with a named error instead of hanging."""

from __future__ import annotations

import asyncio
import random
import re
import socket
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hpcproc.launchers import ClusterInfo, LauncherError
from hpcproc.rendezvous import (
    PORT_BASE,
    PORT_SPAN,
    RendezvousError,
    Roster,
    exchange,
    rendezvous,
    store_ports,
)
from hpcproc.rendezvous.tcpstore import gather_as_client, serve
from hpcproc.transports.base import EndPointAddress

COOKIE = "rendezvous-test-cookie"
T = TypeVar("T")


@pytest.fixture(autouse=True)
def cookie(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCPROC_COOKIE", COOKIE)


def infos(size: int, job: str | None = None) -> list[ClusterInfo]:
    job = job or uuid.uuid4().hex
    return [
        ClusterInfo(
            launcher="explicit",
            rank=r,
            size=size,
            local_rank=r,
            local_size=size,
            node_index=0,
            num_nodes=1,
            hostname=f"h{r}",
            job_id=job,
            server_host="127.0.0.1",
        )
        for r in range(size)
    ]


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run ``coro`` on a fresh loop, bounded by ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_store_gives_every_rank_every_address_in_rank_order() -> None:
    ranks = infos(4)

    async def main() -> list[Roster]:
        return await asyncio.gather(
            *(rendezvous(i, EndPointAddress(b"ep-%d" % i.rank), timeout=10, env={}) for i in ranks)
        )

    for roster in run(main()):
        assert roster.addresses == tuple(EndPointAddress(b"ep-%d" % r) for r in range(4))
        assert roster.hosts == ("h0", "h1", "h2", "h3")


def test_clients_wait_for_a_server_that_starts_late() -> None:
    ranks = infos(3)

    async def main() -> list[list[bytes]]:
        clients = [
            asyncio.ensure_future(exchange(i, b"%d" % i.rank, timeout=10, env={}))
            for i in ranks[1:]
        ]
        await asyncio.sleep(0.3)  # not synchronisation: the server must simply start late
        server = await exchange(ranks[0], b"0", timeout=10, env={})
        return [server, *await asyncio.gather(*clients)]

    assert run(main()) == [[b"0", b"1", b"2"]] * 3


def test_missing_rank_fails_every_rank_naming_it_and_the_launcher() -> None:
    ranks = infos(4)

    async def main() -> list[BaseException | list[bytes]]:
        return await asyncio.gather(
            *(exchange(i, b"x", timeout=1.0, env={}) for i in ranks[:3]), return_exceptions=True
        )

    results = run(main())
    assert isinstance(results, list)
    for result in results:
        assert isinstance(result, RendezvousError)
        assert "ranks 3 of 4 did not arrive" in str(result)
        assert "launcher explicit" in str(result)


def test_unreachable_rank_zero_fails_naming_the_store_and_launcher() -> None:
    (_, rank1) = infos(2)
    with pytest.raises(RendezvousError, match=r"rank 0's store on 127\.0\.0\.1.*launcher explicit"):
        run(exchange(rank1, b"x", timeout=0.5, env={}))


def test_wrong_cookie_fails_both_sides_at_once_naming_authentication_peer_and_fix() -> None:
    """A rank with another cookie does not wait out the rendezvous timeout (600 s here;
    the test's own bound is 60 s): the store and the rank both fail with an error
    that says authentication failed, names the other side and the fix."""
    rank0, rank1 = infos(2)

    async def main() -> tuple[BaseException | list[bytes], BaseException | list[bytes]]:
        server = asyncio.ensure_future(exchange(rank0, b"0", timeout=600, env={}))
        await asyncio.sleep(0)
        ports = store_ports(rank1, {})
        intruder = gather_as_client(
            "127.0.0.1",
            ports,
            rank=1,
            payload=b"evil",
            cookie=b"not-the-cookie",
            key=b"hpcproc-rendezvous|explicit|" + str(rank1.job_id).encode() + b"|-|2",
            timeout=600,
            describe="intruder",
        )
        got = await asyncio.gather(server, intruder, return_exceptions=True)
        return got[0], got[1]

    server_result, intruder_result = run(main(), timeout=60)
    for result in (server_result, intruder_result):
        assert isinstance(result, RendezvousError), result
        text = str(result)
        assert "authentication failed" in text, text
        assert "HPCPROC_COOKIE" in text and "~/.hpcproc/cookie" in text, text
    # Each names the other side: the store names rank 1 and its address, the rank
    # names rank 0's store and its port.
    assert re.search(r"rank 1 at 127\.0\.0\.1:\d+", str(server_result)), server_result
    assert re.search(r"rank 0's store at 127\.0\.0\.1:\d+", str(intruder_result)), intruder_result


def test_store_takes_next_port_when_derived_one_is_in_use() -> None:
    ranks = infos(2)
    first = store_ports(ranks[0], {})[0]
    squatter = socket.socket()
    try:
        squatter.bind(("", first))
        squatter.listen()

        async def main() -> list[list[bytes]]:
            return await asyncio.gather(
                *(exchange(i, b"%d" % i.rank, timeout=5, env={}) for i in ranks)
            )

        assert run(main()) == [[b"0", b"1"], [b"0", b"1"]]
    finally:
        squatter.close()


def _bindable(port: int) -> bool:
    """Whether a server could listen on ``port`` on every interface (as ``serve`` does)."""
    families = [socket.AF_INET] + ([socket.AF_INET6] if socket.has_ipv6 else [])
    for family in families:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError:
                return False
    return True


def two_free_ports() -> int:
    """A port ``p`` such that ``p`` and ``p + 1`` are free, below the ephemeral range
    (32768 and up on Linux), where no client connection of another test can take one
    meanwhile."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        if _bindable(base) and _bindable(base + 1):
            return base
    raise AssertionError("no two consecutive free ports in 20000..32000")


def test_client_skips_another_jobs_store_on_the_same_port() -> None:
    async def main() -> list[bytes]:
        base = two_free_ports()
        ports = [base, base + 1]
        other = await serve(ports, size=2, cookie=COOKIE.encode(), key=b"job-A", describe="A")
        ours = await serve(ports, size=2, cookie=COOKIE.encode(), key=b"job-B", describe="B")
        try:
            assert (other.port, ours.port) == (base, base + 1)
            gathered = asyncio.ensure_future(ours.gather(b"b0", 5))
            client = await gather_as_client(
                "127.0.0.1",
                ports,
                rank=1,
                payload=b"b1",
                cookie=COOKIE.encode(),
                key=b"job-B",
                timeout=5,
                describe="B",
            )
            assert await gathered == [b"b0", b"b1"]
            return client
        finally:
            await other.close()
            await ours.close()

    assert run(main()) == [b"b0", b"b1"]


def test_derived_ports_are_below_ephemeral_range_and_differ_per_step() -> None:
    (info,) = infos(1, job="1234")
    from dataclasses import replace

    ports0 = store_ports(replace(info, step_id="0"), {})
    ports1 = store_ports(replace(info, step_id="1"), {})
    assert ports0 != ports1
    assert ports0 == store_ports(replace(info, step_id="0"), {})
    for port in ports0 + ports1:
        assert PORT_BASE <= port < PORT_BASE + PORT_SPAN < 32768
    assert len(set(ports0)) == len(ports0)


def test_hpcproc_port_overrides_the_derived_port() -> None:
    (info,) = infos(1)
    assert store_ports(info, {"HPCPROC_PORT": "31000"}) == [31000]
    with pytest.raises(LauncherError):
        store_ports(info, {"HPCPROC_PORT": "70000"})


def test_file_mode_gathers_and_cleans_up(tmp_path: Path) -> None:
    ranks = infos(3)
    env = {"HPCPROC_RENDEZVOUS_DIR": str(tmp_path)}

    async def main() -> list[list[bytes]]:
        return await asyncio.gather(
            *(exchange(i, b"%d" % i.rank, timeout=5, env=env) for i in ranks)
        )

    assert run(main()) == [[b"0", b"1", b"2"]] * 3
    assert list(tmp_path.iterdir()) == []


def test_file_mode_missing_rank_fails_naming_it(tmp_path: Path) -> None:
    ranks = infos(3)
    env = {"HPCPROC_RENDEZVOUS_DIR": str(tmp_path)}

    async def main() -> list[BaseException | list[bytes]]:
        return await asyncio.gather(
            *(exchange(i, b"x", timeout=0.5, env=env) for i in (ranks[0], ranks[2])),
            return_exceptions=True,
        )

    for result in run(main()):
        assert isinstance(result, RendezvousError)
        assert "ranks [1] of 3" in str(result)


def test_auto_without_server_host_says_what_to_set() -> None:
    (_, rank1) = infos(2)
    from dataclasses import replace

    with pytest.raises(RendezvousError, match="HPCPROC_RENDEZVOUS_HOST"):
        run(exchange(replace(rank1, server_host=None), b"x", timeout=1, env={}))
