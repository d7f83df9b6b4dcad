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
    """Equal, with the same exact types all the way down (NaN equal to NaN; arrays of
    equal dtype and shape, with the same bytes)."""
    if type(a) is not type(b):
        return False
    if type(a) is np.ndarray:
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
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


def encode_frames(obj: Any) -> list[Any] | None:
    """The Python writer's frames, large arrays and bytes out-of-band, checked against the
    compiled writer's (its ``serialize`` where it writes the compact format) where built."""
    frames: list[Any] = []
    header = _compact.encode(obj, OUT_OF_BAND_MIN, frames=frames)
    if C is not None:
        got = C.serialize(obj)
        if header is None:
            assert bytes(memoryview(got[0])[:1]) != bytes([_compact.MAGIC]), obj
        else:
            assert got[0] == header and len(got) == 1 + len(frames), obj
            for mine, ref in zip(got[1:], frames, strict=True):
                if type(ref) is bytes:
                    assert mine is ref  # a large bytes: itself
                else:
                    assert mine.format == "B" and mine.ndim == 1 and mine.obj is ref.obj
    return None if header is None else [header, *frames]


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
    np.arange(3),
    np.array(2.5),
    np.zeros((0, 4), dtype=np.int32),
    np.array([[1 + 2j, 3], [4, 5j]], dtype=np.complex64),
    np.array([True, False]),
    np.array([-128, 127], dtype=np.int8),
    np.array([2**64 - 1], dtype=np.uint64),
    np.array([1.5, np.nan, -np.inf], dtype=np.float16),
    np.arange(6, dtype=np.longlong).reshape(1, 2, 3),  # "q": equal to "<i8"
    ("tag", np.ones(OUT_OF_BAND_MIN // 8 - 1), PIDS[0]),
    np.ones([1] * _compact.MAX_NDIM),
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


def test_arrays_keep_their_dtype_and_arrive_writable_and_owning_their_memory() -> None:
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    data = encode((array, "x"))
    assert data is not None
    for read in readers():
        back = read(data)[0]
        assert back.dtype == np.int16 and back.flags.writeable and back.flags.owndata
        back[0, 0] = 99
        assert array[0, 0] == 0


def test_an_array_is_written_as_documented() -> None:
    array = np.array([[1, 2, 3], [4, 5, 6]], dtype="<u2")
    code = _compact.ARRAY_DTYPES.index("<u2")
    head = struct.pack("<BB", code, 2) + struct.pack("<QQ", 2, 3)
    assert encode(array) == bytes([_compact.MAGIC]) + b"a" + head + array.tobytes()
    big = np.arange(OUT_OF_BAND_MIN, dtype="<u2").reshape(2, -1)
    frames = encode_frames(("big", big))
    assert frames is not None and len(frames) == 2
    code_head = struct.pack("<BB", code, 2) + struct.pack("<QQ", 2, OUT_OF_BAND_MIN // 2)
    assert frames[0] == b"\xc5t\x02\x00\x00\x00s\x03\x00\x00\x00bigA" + code_head
    assert bytes(frames[1]) == big.tobytes()


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
_array = np.arange(4)


class Grid(np.ndarray):
    """An ndarray subclass (pickled, as any subclass)."""


REFUSED = {
    "int beyond 64 bits": (1, 2**63),
    "negative int beyond 64 bits": -(2**63) - 1,
    "too many large values": [b"x" * OUT_OF_BAND_MIN] * (_compact.MAX_LARGE + 1),
    "lone surrogate": ("ok", "\ud800"),
    "named tuple": Point(1, 2),
    "int enum": [Color.RED],
    "str subclass": {"k": Text("v")},
    "set": {1, 2},
    "bytearray": bytearray(b"x"),
    "strided array": (1, np.arange(6)[::2]),
    "Fortran-ordered array": np.ones((2, 3), order="F"),
    "big-endian array": np.arange(3, dtype=">i4"),
    "array of objects": np.array([1, "x"], dtype=object),
    "array of str": np.array(["ab"]),
    "array of dates": np.array(["2026-12-06"], dtype="datetime64[D]"),
    "structured array": np.zeros(2, dtype=[("x", "<f8")]),
    "longdouble array": np.ones(2, dtype=np.longdouble),
    "array with dtype metadata": np.ones(2, dtype=np.dtype("<f8", metadata={"unit": "m"})),
    "array subclass": np.ones(3).view(Grid),
    "shared array": (_array, _array),
    "array of too many dimensions": np.ones([1] * (_compact.MAX_NDIM + 1)),
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
    elif name == "shared array":
        assert back[0] is back[1] and np.array_equal(back[0], _array)
    elif isinstance(obj, np.ndarray) or name == "strided array":
        array = obj[1] if name == "strided array" else obj
        got = back[1] if name == "strided array" else back
        assert type(got) is type(array) and got.dtype == array.dtype
        assert got.dtype.metadata == array.dtype.metadata
        assert np.array_equal(got, array)
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


def test_large_values_go_out_of_band_where_frames_may_follow_and_by_pickle_where_not() -> None:
    big = np.ones(OUT_OF_BAND_MIN // 8)  # exactly OUT_OF_BAND_MIN bytes
    data = b"d" * OUT_OF_BAND_MIN
    for obj in (("x", big), (PIDS[0], data)):
        assert encode(obj) is None  # one frame (a local copy): pickle then
    frames = encode_frames(("x", big, data, [data]))
    assert frames is not None and len(frames) == 4
    assert np.shares_memory(np.asarray(frames[1]), big)  # sent from the array itself
    assert frames[2] is data and frames[3] is data
    assert encode_frames([data] * _compact.MAX_LARGE) is not None
    back = [memoryview(bytearray(f)) for f in frames]
    for load in (lambda f: _compact.decode(f[0], f[1:]), *([C.loads_frames] if C else [])):
        got = load(back)
        assert same(got, ("x", big, data, [data]))
        assert got[2] is not got[3][0]  # (each its own copy of its frame)


def test_small_values_that_would_overflow_the_frame_go_out_of_band_instead() -> None:
    # Each just under OUT_OF_BAND_MIN: the first fits in the frame, the next would
    # take it past MAX_FRAME, and so travel as frames of their own.
    n = OUT_OF_BAND_MIN - 6
    assert 2 * (n + 5) + 6 > _compact.MAX_FRAME
    arrays = tuple(np.full(n, i, dtype=np.uint8) for i in range(3))
    frames = encode_frames(arrays)
    assert frames is not None and len(frames) == 3
    assert len(frames[0]) <= _compact.MAX_FRAME
    assert all(
        np.shares_memory(np.asarray(f), a) for f, a in zip(frames[1:], arrays[1:], strict=True)
    )
    blobs = (b"a" * n, b"b" * n, b"c" * n)
    frames = encode_frames(blobs)
    assert frames is not None and frames[1:] == [blobs[1], blobs[2]]
    assert encode(arrays) is None and encode(blobs) is None  # one frame: pickle


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


def _array_of(dtype: str, shape: list[int], raw: bytes) -> np.ndarray[Any, Any]:
    """An array of ``dtype`` and ``shape`` whose bytes are ``raw`` repeated."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    data = (raw * (size // len(raw) + 1))[:size] if raw else bytes(size)
    return np.frombuffer(data, dtype).reshape(shape)


_arrays = st.builds(
    _array_of,
    st.sampled_from((*_compact.ARRAY_DTYPES, ">i4", "<f16")),
    st.lists(st.integers(0, 5), max_size=3) | st.just([OUT_OF_BAND_MIN // 8]),
    st.binary(max_size=64),
)
_leaves = (
    _keys
    | st.floats(allow_nan=True)
    | st.binary(min_size=OUT_OF_BAND_MIN - 2, max_size=OUT_OF_BAND_MIN + 1)
    | _arrays
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
    if data is not None:
        for read in readers():
            assert same(read(data), obj)
    frames = encode_frames(obj)  # the same, with large arrays out-of-band
    if frames is not None:
        got = [memoryview(bytearray(memoryview(f).cast("B"))) for f in frames]
        assert same(_compact.decode(got[0], got[1:]), obj)
        if C is not None:
            assert same(C.loads_frames(got), obj)


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
        b"a\xff\x01" + struct.pack("<Q", 1) + b"\x00",  # an unknown dtype code
        b"a\x0b\x21" + struct.pack("<Q", 1) * 33 + b"\x00" * 8,  # 33 dimensions
        b"a\x0b\x01" + struct.pack("<Q", 2) + b"\x00" * 15,  # 2 float64 in 15 bytes
        b"a\x0b\x02" + struct.pack("<QQ", 2**62, 2**62),  # a product past 63 bits
        b"a\x0b\x02" + struct.pack("<QQ", 0, 2**63),  # a dimension past 63 bits
        b"a\x02\x01" + struct.pack("<Q", 4) + b"\x00" * 4 + b"N",  # bytes after
        b"A\x0b\x01" + struct.pack("<Q", 4),  # an array frame it did not come with
        b"Y",  # a bytes frame it did not come with
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


def _refused_with_frames(frames: list[Any], match: str) -> None:
    with pytest.raises(_compact.CompactError, match=match):
        _compact.decode(frames[0], frames[1:])
    with pytest.raises(SerializationError, match=match):
        serialization._load_frames_py(frames)
    with pytest.raises(SerializationError, match=match):
        serialization.deserialize(frames)
    if C is not None:
        with pytest.raises(SerializationError, match=match):
            C.loads_frames(frames)


def test_array_frames_that_do_not_match_the_header_are_refused() -> None:
    one = np.ones(OUT_OF_BAND_MIN // 8)
    two = np.arange(OUT_OF_BAND_MIN // 2, dtype=np.int32)  # twice as long
    frames = encode_frames((one, "and", two))
    assert frames is not None and len(frames) == 3
    good = [memoryview(bytearray(memoryview(f).cast("B"))) for f in frames]
    _refused_with_frames(good[:2], "did not come with")
    _refused_with_frames([good[0], good[2], good[1]], "does not match|do not match|frame of")
    _refused_with_frames([good[0], good[1], good[2][:-1]], "does not match|frame of")
    _refused_with_frames([good[0], good[1], bytes(good[2]) + b"x"], "does not match|frame of")
    _refused_with_frames([*good, b"extra"], "more frames")
    big = b"b" * OUT_OF_BAND_MIN
    with_bytes = encode_frames(("bytes", big))
    assert with_bytes is not None
    _refused_with_frames(with_bytes[:1], "did not come with")
    _refused_with_frames([*with_bytes, big], "more frames")
    for read in (C.loads, C.decode) if C is not None else ():
        with pytest.raises(SerializationError, match="did not come with"):
            read(good[0])  # one frame only: the arrays' frames are missing


def test_an_array_rebuilt_over_its_frame_shares_it_and_is_as_writable() -> None:
    array = np.arange(16384, dtype=np.float32).reshape(128, 128)
    frames = encode_frames({"a": array})
    assert frames is not None
    writable = [frames[0], memoryview(bytearray(frames[1]))]
    readonly = [frames[0], bytes(frames[1])]
    loaders: list[Any] = [lambda f: _compact.decode(f[0], f[1:])]
    if C is not None:
        loaders.append(C.loads_frames)
    for load in loaders:
        back = load(writable)["a"]
        assert np.shares_memory(back, np.asarray(writable[1])) and back.flags.writeable
        assert back.shape == (128, 128) and np.array_equal(back, array)
        assert not load(readonly)["a"].flags.writeable


def test_an_array_keeps_its_frame_alive_not_only_the_memory_under_it() -> None:
    """tcp hands out frames that are memoryviews of views of pooled buffers, and takes a
    buffer back once its view is gone: an array rebuilt over a frame must keep the
    frame's own objects alive, or the next message is received into its memory."""
    import gc
    import weakref

    array = np.arange(OUT_OF_BAND_MIN // 8, dtype=np.float64)
    header, _ = encode_frames(array) or []
    loaders: list[Any] = [lambda f: _compact.decode(f[0], f[1:])]
    if C is not None:
        loaders.append(C.loads_frames)
    for load in loaders:
        pool = np.empty(2 * OUT_OF_BAND_MIN, np.uint8)
        lent = pool[: array.nbytes]
        lent[:] = np.frombuffer(array.tobytes(), np.uint8)
        returned = weakref.ref(lent)
        frame = memoryview(lent)
        del lent
        back = load([header, frame])
        del frame
        gc.collect()
        assert returned() is not None, load  # still held through the array
        assert np.array_equal(back, array)
        del back
        gc.collect()
        assert returned() is None, load


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
        if isinstance(msg, str) and msg == "stop":
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
    ("small", np.arange(5, dtype=np.int16)),
    ("large", np.arange(16384, dtype=np.float32).reshape(128, 128), np.ones(3)),
    np.ones((4, 4), order="F"),  # pickled either way
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

    small, large = np.arange(4), np.ones(OUT_OF_BAND_MIN)
    assert encode({"a": small}) is not None and encode({"a": large}) is None
    for array in (small, large):
        got = copy_message({"a": array})["a"]
        assert same(got, array) and not np.shares_memory(got, array)
