"""The public namespace: everything in ``hpcproc.__all__`` exists and is documented."""

from __future__ import annotations

import inspect
import types

import pytest

import hpcproc
import hpcproc.otp


def test_all_has_no_duplicates() -> None:
    assert len(hpcproc.__all__) == len(set(hpcproc.__all__))


@pytest.mark.parametrize("name", hpcproc.__all__)
def test_public_name_exists_and_has_docstring(name: str) -> None:
    obj = getattr(hpcproc, name)
    doc = inspect.getdoc(obj)
    if isinstance(obj, types.ModuleType):
        doc = obj.__doc__
    assert doc and doc.strip(), f"hpcproc.{name} has no docstring"
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        # A class's own docstring, not one inherited from a builtin base.
        assert obj.__doc__, f"hpcproc.{name} has no docstring of its own"


def test_module_level_api_of_design_section_4_is_exported() -> None:
    required = [
        "self_pid",
        "self_node",
        "Pid",
        "NodeId",
        "send",
        "expect",
        "receive",
        "match",
        "match_if",
        "match_any",
        "new_chan",
        "send_chan",
        "receive_chan",
        "match_chan",
        "spawn",
        "spawn_local",
        "spawn_link",
        "spawn_monitor",
        "call",
        "link",
        "unlink",
        "monitor",
        "unmonitor",
        "monitor_node",
        "link_node",
        "ProcessMonitorNotification",
        "NodeMonitorNotification",
        "ProcessLinkException",
        "DiedNormal",
        "DiedException",
        "DiedDisconnect",
        "DiedNodeDown",
        "DiedUnknownId",
        "kill",
        "exit",
        "terminate",
        "register",
        "unregister",
        "whereis",
        "nsend",
        "whereis_remote",
        "nsend_remote",
        "register_remote",
        "say",
        "reconnect",
        "get_process_info",
        "get_node_stats",
        "Node",
        "unsafe_send",
    ]
    missing = [n for n in required if n not in hpcproc.__all__]
    assert not missing


@pytest.mark.parametrize("name", hpcproc.otp.__all__)
def test_otp_public_name_exists_and_has_docstring(name: str) -> None:
    obj = getattr(hpcproc.otp, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__doc__ and obj.__doc__.strip(), f"hpcproc.otp.{name} has no docstring"
    else:
        assert obj is not None, f"hpcproc.otp.{name} is missing"


def test_otp_all_has_no_duplicates() -> None:
    assert len(hpcproc.otp.__all__) == len(set(hpcproc.otp.__all__))
