"""``running_loop``, the running-loop lookup of every ``send`` and ``receive``, answers
exactly as ``asyncio._get_running_loop`` does (on Python 3.11 it remembers the loop
last found instead of asking the kernel for the pid on every call)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import hpcproc as hp
from hpcproc._loops import get_running_loop, running_loop
from hpcproc._process import current


def test_inside_and_after_a_loop_and_outside_any() -> None:
    assert running_loop() is None
    with pytest.raises(RuntimeError, match="no running event loop"):
        get_running_loop()

    async def main() -> asyncio.AbstractEventLoop | None:
        assert running_loop() is asyncio.get_running_loop() is get_running_loop()
        return running_loop()

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) is loop
        # Stopped: the loop it remembers runs no more.
        assert running_loop() is None
        assert loop.run_until_complete(main()) is loop
    finally:
        loop.close()
    assert running_loop() is None
    asyncio.run(main())  # another loop in the same thread
    assert running_loop() is None
    with pytest.raises(RuntimeError, match="no running event loop"):
        get_running_loop()


def test_each_thread_gets_its_own_loop_and_a_thread_without_one_none() -> None:
    seen: dict[str, object] = {}
    in_loop = threading.Event()
    looked = threading.Event()

    def bare() -> None:
        in_loop.wait(10)
        seen["bare"] = running_loop()
        looked.set()

    async def main() -> None:
        seen["main"] = running_loop() is asyncio.get_running_loop()
        in_loop.set()  # the other thread looks while this loop runs (and is remembered)
        await asyncio.get_running_loop().run_in_executor(None, looked.wait, 10)
        seen["after"] = running_loop() is asyncio.get_running_loop()
        other = await asyncio.to_thread(asyncio.run, inner())
        seen["other thread's"] = other
        seen["back"] = running_loop() is asyncio.get_running_loop()

    async def inner() -> bool:
        return running_loop() is asyncio.get_running_loop()

    thread = threading.Thread(target=bare)
    thread.start()
    asyncio.run(main())
    thread.join(10)
    assert seen == {
        "main": True,
        "bare": None,
        "after": True,
        "other thread's": True,
        "back": True,
    }


def test_a_loop_run_inside_a_running_one_is_seen_and_the_outer_one_after() -> None:
    """Libraries run a loop inside a running one by swapping the running loop
    (``asyncio._set_running_loop``); each side sees its own."""
    inner_loop = asyncio.new_event_loop()

    async def inner() -> bool:
        return running_loop() is asyncio.get_running_loop() is inner_loop

    async def outer() -> tuple[bool, bool, bool, bool]:
        loop = asyncio.get_running_loop()
        before = running_loop() is loop
        asyncio._set_running_loop(None)
        try:
            outside = running_loop() is None
            inside = inner_loop.run_until_complete(inner())
        finally:
            asyncio._set_running_loop(loop)
        return before, outside, inside, running_loop() is loop

    try:
        assert asyncio.run(outer()) == (True, True, True, True)
    finally:
        inner_loop.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_has_no_running_loop() -> None:
    async def main() -> int:
        assert running_loop() is asyncio.get_running_loop()
        pid = os.fork()
        if pid == 0:  # the child: asyncio says no loop runs here, and so must we
            code = 1
            try:
                code = 0 if running_loop() is None and asyncio._get_running_loop() is None else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return status

    assert os.waitstatus_to_exitcode(asyncio.run(main())) == 0


def test_current_outside_a_process_still_refuses() -> None:
    async def main() -> None:
        with pytest.raises(hp.NotInProcessError):
            current()

    asyncio.run(main())
    with pytest.raises(hp.NotInProcessError):
        current()
