"""hpcproc._compact: the compact message format, its compiled writer and reader, and
both readers against malformed frames; nodes with and without the compiled part
talking to each other."""

from __future__ import annotations

import asyncio
import enum
import math
import os
import pickle
import struct
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hpcproc as hp
from hpcproc import _compact, serialization
from hpcproc._channels import ChanMessage
from hpcproc._pickle_codes import ACCEL_ENV, compiled_helper
from hpcproc.serialization import OUT_OF_BAND_MIN, SerializationError
from hpcproc.testing.node_server import NodeServerProcess
from hpcproc.transports import create

from ._compiled import REQUIRE_ENV, compiled_required

ROOT = Path(__file__).resolve().parent.parent
COOKIE = "hpcproc-compact-tests"
TIMEOUT = 30.0

C = compiled_helper("_compact_accel")
PIDS = (
    hp.Pid(hp.NodeId(b"tcp://127.0.0.1:1/1"), 7),
    hp.Pid(hp.NodeId(b"shm://host/boot/abc"), 2**40),
    hp.Pid(hp.NodeId(b"tcp://127.0.0.1:1/1"), 0),
)


def same(a: Any, b: Any) -> bool:
    """Equal, with the same exact types all the way down (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return same(list(a), list(b)) and all(same(a[k], b[k]) for k in a)
    if type(a) is ChanMessage:
        return a.port_id == b.port_id and same(a.payload, b.payload)
    if type(a) is hp.Pid:
        return a[0] is b[0] and a[1] == b[1]
    return bool(a == b)


def readers() -> list[Any]:
    out: list[Any] = [_compact.decode]
    if C is not None:
        out.append(C.decode)
    return out


def encode(obj: Any) -> bytes | None:
    """The Python writer's bytes, checked against the compiled writer's where built."""
    ref = _compact.encode(obj, OUT_OF_BAND_MIN)
    if C is not None:
        assert C.encode(obj) == ref, obj
    return ref


# ---------------------------------------------------------------------- what it takes

TAKEN = [
    None,
    True,
    False,
    0,
    255,
    256,
    -1,
    2**63 - 1,
    -(2**63),
    0.0,
    -0.0,
    1.5,
    math.inf,
    float("nan"),
    "",
    "text",
    "h\u00e9llo \u2603 \U0001f600",
    b"",
    b"x" * 8,
    b"\x00\xc5" * 511,
    (),
    (1, "a", (2.5, None)),
    [],
    [1, [2, [3]]],
    {},
    {"a": 1, 2: [b"b"], (3, "c"): {"d": None}, None: True},
    PIDS[0],
    (PIDS[0], b"x" * 8),
    (PIDS[1], PIDS[2], PIDS[0]),
    ChanMessage(3, (PIDS[0], "reply")),
    ChanMessage(-1, None),
    ("deep", (((((((((1,),),),),),),),),)),
]


@pytest.mark.parametrize("obj", TAKEN, ids=repr)
def test_plain_data_round_trips_with_exact_types(obj: Any) -> None:
    data = encode(obj)
    assert data is not None and data[0] == _compact.MAGIC
    for read in readers():
        assert same(read(data), obj), read
        assert same(read(memoryview(bytearray(data))), obj), read
    assert same(serialization._load_header_py(data), obj)
    if C is not None:
        assert same(C.loads(data), obj)


def test_the_format_is_as_documented() -> None:
    pid = PIDS[0]
    key = pid.node._key
    assert encode((None, True, 7, -2, "é", b"y", [], {}, pid, ChanMessage(1, 0.5))) == (
        b"\xc5t\x0a\x00\x00\x00NTb\x07i"
        + struct.pack("<q", -2)
        + b"s\x02\x00\x00\x00\xc3\xa9y\x01\x00\x00\x00yl\x00\x00\x00\x00d\x00\x00\x00\x00p"
        + struct.pack("<I", len(key))
        + key
        + struct.pack("<q", 7)
        + b"c"
        + struct.pack("<q", 1)
        + b"f"
        + struct.pack("<d", 0.5)
    )


def test_compact_env_zero_keeps_writing_pickles_and_still_reads_compact_frames() -> None:
    """For a cluster that mixes this version with earlier ones (which read pickles only)."""
    import subprocess
    import sys

    code = (
        "import pickle\n"
        "from hpcproc import serialization as s, _compact\n"
        "from hpcproc._ids import NodeId, Pid\n"
        "msg = (Pid(NodeId(b'tcp://127.0.0.1:1/1'), 3), b'x' * 8)\n"
        "frame = s.serialize(msg)[0]\n"
        "compact = _compact.encode(msg, s.OUT_OF_BAND_MIN)\n"
        "print(s.COMPACT, pickle.loads(frame) == msg, s.load_header(compact) == msg)\n"
    )
    env = {**os.environ, serialization.COMPACT_ENV: "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


def test_serialize_writes_small_plain_messages_compact_where_built() -> None:
    frames = serialization.serialize((PIDS[0], b"x" * 8))
    assert len(frames) == 1
    is_compact = bytes(frames[0][:1]) == bytes([_compact.MAGIC])
    assert is_compact is serialization.COMPACT
    turned_off = os.environ.get(ACCEL_ENV, "1").strip() == "0"
    if C is None and not turned_off and compiled_required():
        pytest.fail(f"{REQUIRE_ENV}=1 but hpcproc._compact_accel was not built")
    writes = os.environ.get(serialization.COMPACT_ENV, "1").strip() != "0"
    assert serialization.COMPACT is (C is not None and writes)


# ---------------------------------------------------------------------- what it refuses

Point = namedtuple("Point", "x y")


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


def _cyclic() -> list[Any]:
    cyc: list[Any] = [1]
    cyc.append(cyc)
    return cyc


def _nested(depth: int) -> list[Any]:
    """Lists nested ``depth`` deep (the outermost at depth 1)."""
    out: list[Any] = []
    for _ in range(depth - 1):
        out = [out]
    return out


_shared = [1, 2]
_envelope = ChanMessage(4, "mutable")

REFUSED = {
    "int beyond 64 bits": (1, 2**63),
    "negative int beyond 64 bits": -(2**63) - 1,
    "large bytes": (PIDS[0], b"x" * OUT_OF_BAND_MIN),
    "lone surrogate": ("ok", "\ud800"),
    "named tuple": Point(1, 2),
    "int enum": [Color.RED],
    "str subclass": {"k": Text("v")},
    "set": {1, 2},
    "bytearray": bytearray(b"x"),
    "array": (1, np.arange(3)),
    "shared list": (_shared, _shared),
    "cycle": _cyclic(),
    "too deep": _nested(_compact.MAX_DEPTH + 1),
    "too many containers": [[] for _ in range(_compact.MAX_CONTAINERS)],
    "pid with a big lid": hp.Pid(PIDS[0].node, 2**64),
    "channel with a str port": ChanMessage("3", 1),  # type: ignore[arg-type]
    "shared channel envelope": [_envelope, _envelope],
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_the_format_does_not_take_goes_by_pickle(name: str) -> None:
    obj = REFUSED[name]
    assert encode(obj) is None
    frames = serialization.serialize(obj)
    assert bytes(memoryview(frames[0])[:1]) != bytes([_compact.MAGIC])
    back = serialization.deserialize([memoryview(bytearray(f)) for f in frames])
    if name == "shared list":
        assert back[0] is back[1]
    elif name == "cycle":
        assert back[1] is back
    elif name == "array":
        assert back[0] == 1 and np.array_equal(back[1], obj[1])
    elif name == "channel with a str port":
        assert (back.port_id, back.payload) == ("3", 1)
    elif name == "shared channel envelope":
        assert back[0] is back[1] and (back[0].port_id, back[0].payload) == (4, "mutable")
    else:
        assert back == obj and type(back) is type(obj)


def _doubled(n: int) -> Any:
    """``a = (a, a)`` ``n`` times: a pickle of ``4 n`` bytes, written out ``2**n`` times."""
    a: Any = ()
    for _ in range(n):
        a = (a, a)
    return a


@pytest.mark.parametrize(
    "obj",
    [_doubled(28), ["x" * 100_000] * 1000, ["y" * 1000] * (_compact.MAX_FRAME // 1000 + 1)],
    ids=["doubled", "a big str many times", "just over the frame"],
)
def test_a_small_object_shared_many_times_goes_by_pickle(obj: Any) -> None:
    # Pickle writes a repeated value once; this format every time. Past MAX_FRAME the
    # message goes by pickle, which keeps it small (and keeps the sharing).
    assert encode(obj) is None
    (header,) = serialization.serialize(obj)
    assert len(header) < 200_000
    back = serialization.deserialize([header])
    assert back == obj and (type(obj) is tuple or back[0] is back[-1])


def test_the_limits_themselves_are_taken() -> None:
    deep: Any = None
    for _ in range(_compact.MAX_DEPTH - 1):
        deep = (deep,)
    assert encode(deep) is not None
    assert encode((deep,)) is None
    assert encode([[] for _ in range(_compact.MAX_CONTAINERS - 1)]) is not None
    assert encode(b"x" * (OUT_OF_BAND_MIN - 1)) is not None
    # A frame of exactly MAX_FRAME bytes: a str of MAX_FRAME - 6 (magic, tag, length).
    assert len(encode("z" * (_compact.MAX_FRAME - 6)) or b"") == _compact.MAX_FRAME
    assert encode("z" * (_compact.MAX_FRAME - 5)) is None
    same_tuple = (1, 2)
    assert same(_compact.decode(encode((same_tuple, same_tuple))), ((1, 2), (1, 2)))


# ---------------------------------------------------------------------- writers agree

_keys = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(PIDS)
)
_leaves = (
    _keys
    | st.floats(allow_nan=True)
    | st.binary(min_size=OUT_OF_BAND_MIN - 2, max_size=OUT_OF_BAND_MIN + 1)
)
_values = st.recursive(
    _leaves,
    lambda kids: (
        st.tuples(kids, kids)
        | st.lists(kids, max_size=4)
        | st.dictionaries(_keys, kids, max_size=4)
        | kids.map(lambda x: ChanMessage(5, x))
    ),
    max_leaves=24,
)


@settings(max_examples=400, deadline=None)
@given(_values)
def test_both_writers_write_the_same_bytes_and_both_readers_read_them(obj: Any) -> None:
    data = encode(obj)  # compares the two writers
    if data is None:
        return
    for read in readers():
        assert same(read(data), obj)


# ---------------------------------------------------------------------- malformed frames


def _refused_by_every_reader(data: bytes) -> None:
    with pytest.raises(_compact.CompactError):
        _compact.decode(data)
    with pytest.raises(SerializationError):
        serialization._load_header_py(data)
    with pytest.raises(SerializationError):
        serialization.deserialize([data])
    if C is not None:
        with pytest.raises(SerializationError):
            C.decode(data)
        with pytest.raises(SerializationError):
            C.loads(memoryview(data))


def test_every_truncation_of_a_frame_is_refused() -> None:
    data = encode((PIDS[0], "t\u00e9xt", b"by", [1.5, -7, 300], {"k": None}, ChanMessage(2, True)))
    assert data is not None
    for n in range(1, len(data)):
        _refused_by_every_reader(data[:n])


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no value
        b"Q",  # unknown tag
        b"NN",  # bytes after the value
        b"s\x02\x00\x00\x00\xff\xfe",  # not UTF-8
        b"t\xff\xff\xff\xff",  # a count the frame cannot hold
        b"d\xff\xff\xff\x7fNN",
        b"y\xff\xff\xff\xff",  # a length the frame cannot hold
        b"p\xff\xff\xff\xff",
        b"t\x01\x00\x00\x00" * (_compact.MAX_DEPTH + 1) + b"N",  # nesting bomb
        b"d\x01\x00\x00\x00l\x00\x00\x00\x00N",  # an unhashable key
    ],
    ids=repr,
)
def test_malformed_frames_are_refused_with_a_clear_error(body: bytes) -> None:
    _refused_by_every_reader(bytes([_compact.MAGIC]) + body)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=40))
def test_random_frames_never_crash_and_both_readers_agree(body: bytes) -> None:
    data = bytes([_compact.MAGIC]) + body
    try:
        expected = _compact.decode(data)
    except _compact.CompactError:
        expected = _compact.CompactError
    if C is None:
        return
    try:
        got = C.decode(data)
    except SerializationError:
        got = _compact.CompactError
    assert got is expected if expected is _compact.CompactError else same(got, expected)


def test_declared_counts_cannot_make_a_reader_allocate_more_than_the_frame() -> None:
    # 32 nested tuples, each declaring as many items as there are bytes left: a reader
    # that allocated each tuple at its declared size would hold 32 times the frame at
    # once (and then refuse it): 256 bytes per byte of the frame. Counts are checked
    # against what the enclosing containers still need, so one tuple at most is as
    # large as the frame: a pointer (8 bytes) per byte, as a valid frame of as many
    # None would take.
    import tracemalloc

    pad = 1 << 16
    frame = bytearray([_compact.MAGIC])
    for k in range(32):
        frame += b"t" + struct.pack("<I", pad + 5 * (31 - k) if k < 31 else pad)
    frame += b"N" * pad
    for read in readers():
        tracemalloc.start()
        try:
            with pytest.raises((SerializationError, _compact.CompactError)):
                read(bytes(frame))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 10 * len(frame), (read, peak)


def test_a_compact_header_with_extra_frames_is_refused() -> None:
    data = encode((1, 2))
    assert data is not None
    with pytest.raises(SerializationError, match="more frames"):
        serialization.deserialize([data, b"extra"])


def test_the_readers_still_read_pickles() -> None:
    obj = {"a": (PIDS[0], [1, 2])}
    data = pickle.dumps(obj, protocol=5)
    assert same(serialization._load_header_py(data), obj)
    assert same(serialization.load_header(memoryview(data)), obj)
    with pytest.raises(pickle.UnpicklingError):
        serialization.load_header(b"\x80\x05garbage")


# ---------------------------------------------------------------------- between nodes


async def echo() -> None:
    """Sends back every message it gets, until ``"stop"`` (spawned on the node server)."""
    while True:
        reply_to, msg = await hp.expect()
        if msg == "stop":
            return
        await hp.send(reply_to, msg)


MESSAGES = [
    b"x" * 8,
    (1, -(2**63), 2.5, "t\u00e9xt", None, True),
    {"k": [1, (2, 3)], 4: {}},
    PIDS[1],
    ("inside", ChanMessage(9, "chan")),  # (at the top, it would go to a port)
    Point(1, 2),  # pickled either way
    (_shared, _shared),
    b"y" * (OUT_OF_BAND_MIN * 4),
]


@pytest.mark.parametrize("server_accel", ["0", "1"])
def test_nodes_with_and_without_the_compiled_part_understand_each_other(
    server_accel: str,
) -> None:
    """A node in another OS process, with the compiled part on or off, echoes every kind
    of message back over tcp: each side reads what the other wrote. (This process has
    it as built and as HPCPROC_PICKLE_ACCEL says; the second test pass turns it off.)"""
    env = dict(os.environ, HPCPROC_COOKIE=COOKIE, PYTHONPATH=str(ROOT))
    env[ACCEL_ENV] = server_accel
    server = NodeServerProcess("tcp", env=env, cwd=str(ROOT))
    try:

        async def main() -> list[Any]:
            node = await hp.Node(create("tcp", cookie=COOKIE)).start()
            try:

                async def body() -> list[Any]:
                    pid = await hp.spawn(server.node_id, echo)
                    back = []
                    for msg in MESSAGES:
                        await hp.send(pid, (hp.self_pid(), msg))
                        back.append(await hp.expect())
                    await hp.send(pid, (hp.self_pid(), "stop"))
                    return back

                return await asyncio.wait_for(node.run(body), TIMEOUT)
            finally:
                await node.close()

        back = asyncio.run(main())
    finally:
        server.stop()
        server.kill()
    for msg, got in zip(MESSAGES, back, strict=True):
        if msg is MESSAGES[6]:
            assert got == msg and got[0] is got[1]
        else:
            assert same(got, msg), (msg, got)


# ---------------------------------------------------------------------- local copies


def test_a_local_copy_is_deep_and_keeps_sharing() -> None:
    """Local sends copy a mutable message as a remote send serializes it: plain data
    through the compact format where built, the rest (sharing, cycles, objects) by
    pickle, which keeps what it shares."""
    from hpcproc._copying import copy_message

    plain = {"a": 1, "b": [1, 2, (3, "x")], "p": PIDS[0]}
    assert encode(plain) is not None  # (so that where built, the compact path copies it)
    got = copy_message(plain)
    assert same(got, plain) and got is not plain and got["b"] is not plain["b"]
    assert got["p"] is not None and got["p"][0] is PIDS[0][0]

    shared = copy_message([_shared, _shared])
    assert shared == [_shared, _shared] and shared[0] is shared[1]
    assert shared[0] is not _shared

    cyclic = copy_message(_cyclic())
    assert cyclic[0] == 1 and cyclic[1] is cyclic

    boxed = copy_message([Point(1, 2)])
    assert boxed == [Point(1, 2)] and type(boxed[0]) is Point
