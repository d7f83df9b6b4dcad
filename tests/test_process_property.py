"""Property: per-pair ordered delivery survives random connection faults.

Several senders on node A send numbered messages to several receivers on node B,
interleaved with random ``break_connection(A, B)`` faults and random ``reconnect``
calls. Per (sender, receiver) pair the sends are split into epochs by ``reconnect``.
What each receiver got from each sender must be, epoch after epoch, exactly the
messages of that epoch sent before the first fault that hit it (the in-memory
transport delivers synchronously, so nothing sent before a fault is lost): a prefix of
each epoch, never a gap, never a reordering, and nothing after a fault until the
sender reconnects.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpcproc as hp
from hpcproc.transports import create

SENDERS = 3
RECEIVERS = 2
WAIT = 10.0

Op = tuple[str, int, int]

ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, SENDERS - 1), st.integers(0, RECEIVERS - 1)),
        st.tuples(st.just("reconnect"), st.integers(0, SENDERS - 1), st.integers(0, RECEIVERS - 1)),
        st.tuples(st.just("break"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


async def receiver_main() -> None:
    got: dict[int, list[tuple[int, int]]] = {}
    while True:
        msg = await hp.expect(tuple)
        if msg[0] == "report":
            await hp.reconnect(msg[1])
            await hp.send(msg[1], ("got", hp.self_pid(), got))
        else:
            _, sender, epoch, seq = msg
            got.setdefault(sender, []).append((epoch, seq))


async def sender_main(index: int, driver: hp.Pid) -> None:
    epochs: dict[hp.Pid, int] = {}
    seqs: dict[hp.Pid, int] = {}
    while True:
        op, target = await hp.expect(tuple)
        if op == "send":
            seq = seqs.get(target, 0)
            seqs[target] = seq + 1
            await hp.send(target, ("msg", index, epochs.get(target, 0), seq))
        else:
            await hp.reconnect(target)
            epochs[target] = epochs.get(target, 0) + 1
            seqs[target] = 0
        await hp.send(driver, "ack")


def _is_report_of(pid: hp.Pid) -> Any:
    def test(m: Any) -> bool:
        return isinstance(m, tuple) and m[:2] == ("got", pid)

    return test


async def driver(ops: list[Op], transport: Any, b: hp.NodeId) -> dict[Any, Any]:
    me = hp.self_pid()
    senders = [hp.spawn_local(sender_main, i, me) for i in range(SENDERS)]
    receivers = [await hp.spawn(b, receiver_main) for _ in range(RECEIVERS)]
    # Model of each pair's connection: "none" (opened by the next send), "open",
    # "failed" (open, but a fault hit it: the next send finds out) or "broken".
    state: dict[tuple[int, int], str] = {}
    epoch: dict[tuple[int, int], int] = {}
    seq: dict[tuple[int, int], int] = {}
    expected: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for op, s, r in ops:
        key = (s, r)
        if op == "break":
            await transport.break_connection(hp.self_node().address, b.address)
            for k, v in state.items():
                if v == "open":
                    state[k] = "failed"
            continue
        if op == "send":
            now = state.get(key, "none")
            if now in ("none", "open"):
                state[key] = "open"
                expected.setdefault(key, []).append((epoch.get(key, 0), seq.get(key, 0)))
            else:
                state[key] = "broken"
            seq[key] = seq.get(key, 0) + 1
        else:
            state[key] = "none"
            epoch[key] = epoch.get(key, 0) + 1
            seq[key] = 0
        await hp.send(senders[s], (op, receivers[r]))
        assert await hp.expect(str, timeout=WAIT) == "ack"
    got: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, pid in enumerate(receivers):
        await hp.reconnect(pid)
        await hp.send(pid, ("report", me))
        reply = await hp.receive(
            hp.match_if(_is_report_of(pid)),
            timeout=WAIT,
        )
        assert reply is not None, "receiver did not report"
        for s, seqs in reply[2].items():
            got[(s, r)] = seqs
    return {"expected": expected, "got": got}


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=ops_strategy)
def test_each_pair_receives_prefix_of_each_epoch_despite_faults(ops: list[Op]) -> None:
    async def main() -> dict[Any, Any]:
        transport = create("inmemory")
        a = await hp.Node(transport).start()
        b = await hp.Node(transport).start()
        try:
            return await asyncio.wait_for(a.run(driver, ops, transport, b.node_id), 60)  # type: ignore[no-any-return]
        finally:
            await a.close()
            await b.close()
            await transport.close()

    result = asyncio.run(main())
    for key in set(result["expected"]) | set(result["got"]):
        assert result["got"].get(key, []) == result["expected"].get(key, []), key
