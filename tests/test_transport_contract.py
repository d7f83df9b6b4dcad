"""The transport contract itself: what ``base.py`` declares, what is optional, and the
test transport that proves the declared part is enough.

The behaviour is checked elsewhere: the conformance suite and the process-layer suites
run on ``teststreams`` (``tests/plugin_transport``), which implements the abstract
methods of ``base.py`` and nothing else.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from hpcproc import transports
from hpcproc.transports.base import Connection, EndPoint, Transport
from hpcproc.transports.faults import (
    FaultInjection,
    NoFaultInjectionError,
    require_fault_injection,
)

BUILTIN_CLASSES = {
    "inmemory": "InMemoryTransport",
    "tcp": "TcpTransport",
    "shm": "ShmTransport",
    "mpi": "MpiTransport",
    "ucx": "UcxTransport",
}


def _teststreams() -> Any:
    if importlib.util.find_spec("hpcproc_teststreams") is None:
        pytest.skip(
            "teststreams: the test transport's distribution is not installed"
            " (make venv installs tests/plugin_transport)"
        )
    return importlib.import_module("hpcproc_teststreams")


def test_a_transport_implements_only_the_blocking_calls() -> None:
    """The abstract surface: the non-blocking calls are not in it (they have defaults)."""
    assert Transport.__abstractmethods__ == {"new_endpoint", "close"}
    assert EndPoint.__abstractmethods__ == {"address", "receive", "connect", "close"}
    assert Connection.__abstractmethods__ == {"remote_address", "send", "close"}


def test_nonblocking_defaults_defer_to_the_blocking_calls() -> None:
    """``send_nowait`` says "could not send now" (the caller awaits ``send``) and
    ``receive_nowait`` has nothing at once (events come through ``receive``)."""
    mod = _teststreams()

    async def main() -> tuple[bool, object, list[object]]:
        transport = mod.create_transport()
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await a.connect(b.address)
            sent_now = conn.send_nowait([b"x"])
            polled = b.receive_nowait()
            await conn.send([b"y"])
            events = [await asyncio.wait_for(b.receive(), 10) for _ in range(2)]
            return sent_now, polled, events
        finally:
            await transport.close()

    sent_now, polled, events = asyncio.run(main())
    assert sent_now is False
    assert polled is None
    assert [type(e).__name__ for e in events] == ["ConnectionOpened", "Received"]
    assert [bytes(f) for f in events[1].frames] == [b"y"]  # only what send sent


def test_the_test_transport_overrides_nothing_but_the_abstract_methods() -> None:
    """teststreams proves the contract only while it uses no optional part of it."""
    mod = _teststreams()
    transport_cls = type(mod.create_transport())
    assert not issubclass(transport_cls, FaultInjection)
    assert mod._Connection.send_nowait is Connection.send_nowait
    assert mod._EndPoint.receive_nowait is EndPoint.receive_nowait
    tree = ast.parse(Path(mod.__file__).read_text())
    imported = {
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    from_hpcproc = {name for name in imported if name.split(".")[0] == "hpcproc"}
    assert from_hpcproc == {"hpcproc.transports.base"}, from_hpcproc


def test_the_test_transport_is_found_through_its_entry_point() -> None:
    """make venv installs tests/plugin_transport, which registers ``teststreams`` in the
    ``hpcproc.transports`` entry-point group (not with register() at run time)."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=transports.ENTRY_POINT_GROUP)}
    assert "teststreams" in names, (
        "the teststreams entry point is missing: run `make venv` (it installs"
        " tests/plugin_transport into the test venv)"
    )
    assert "teststreams" in transports.available()


def test_fault_injection_is_not_part_of_the_public_transport() -> None:
    assert not hasattr(Transport, "break_connection")
    assert not hasattr(EndPoint, "break_connection")


# pytest-mpi skips tests whose keywords include "mpi" (parameter ids included) unless
# run under mpiexec: this one only imports the module.
@pytest.mark.parametrize("name", sorted(BUILTIN_CLASSES), ids=lambda name: f"{name}-module")
def test_every_builtin_transport_implements_fault_injection(name: str) -> None:
    module = importlib.import_module(f"hpcproc.transports.{name}")
    cls = getattr(module, BUILTIN_CLASSES[name])
    assert issubclass(cls, Transport) and issubclass(cls, FaultInjection)


def test_require_fault_injection_names_the_missing_interface() -> None:
    mod = _teststreams()
    with pytest.raises(NoFaultInjectionError, match="FaultInjection") as info:
        require_fault_injection(mod.create_transport())
    assert "StreamsTransport" in str(info.value)
