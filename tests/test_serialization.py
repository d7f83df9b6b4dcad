"""hpcproc.serialization: round trips, zero copies, out-of-band frames, errors."""

from __future__ import annotations

import os
import pickle
import sys
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcproc import _compact, serialization
from hpcproc._pickle_codes import ACCEL_ENV
from hpcproc.serialization import OUT_OF_BAND_MIN, SerializationError, deserialize, serialize

from ._compiled import REQUIRE_ENV, compiled_required

try:
    from hpcproc import _pickle_accel
except ImportError:  # built without a compiler
    _pickle_accel = None  # type: ignore[assignment]
try:
    from hpcproc import _compact_accel
except ImportError:
    _compact_accel = None  # type: ignore[assignment]


def _skip_compiled(what: str) -> None:
    """Skip a test of the compiled part (turned off, or not built), but fail where CI
    requires it built."""
    if compiled_required() and (_pickle_accel is None or _compact_accel is None):
        pytest.fail(f"{REQUIRE_ENV}=1 but the compiled parts were not all built")
    pytest.skip(f"{what} not built or turned off")


@pytest.fixture(autouse=True, params=["compact", "seeded", "py"])
def small_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on the three serializers: the compiled one as built (small
    messages of plain data in the compact format, the others by seeded picklers), the
    compiled pickling one alone (seeded picklers for every small message), and the
    pure-Python one (``pickle.dumps``, the fallback)."""
    if request.param == "py":
        chosen = serialization._serialize_py
    elif request.param == "seeded":
        if serialization._compiled is None:
            _skip_compiled("the compiled small-message path is")
        chosen = serialization._compiled
    else:
        if not serialization.COMPACT:
            _skip_compiled("the compiled compact format is")
        chosen = serialization.serialize
    monkeypatch.setattr(serialization, "serialize", chosen)
    monkeypatch.setattr(sys.modules[__name__], "serialize", chosen)
    return str(request.param)


def received(frames: Sequence[Any]) -> list[memoryview]:
    """What a transport hands the receiver: fresh writable buffers with the same bytes."""
    return [memoryview(bytearray(memoryview(f).cast("B"))) for f in frames]


def round_trip(obj: object) -> Any:
    return deserialize(received(serialize(obj)))


def shares_any(array: np.ndarray[Any, Any], frames: Sequence[memoryview]) -> bool:
    return any(np.shares_memory(array, np.asarray(f)) for f in frames)


@pytest.mark.parametrize(
    "obj",
    [
        None,
        0,
        -(2**70),
        3.25,
        "text é",
        [1, [2, [3, []]]],
        {"a": (1, 2), 3: {4, 5}, (6,): frozenset({7})},
        b"",
        b"small bytes",
        b"\x00" * (4 * OUT_OF_BAND_MIN),
        bytearray(b"\x01" * (4 * OUT_OF_BAND_MIN)),
        {"nested": [b"x" * OUT_OF_BAND_MIN, (b"y" * 10, bytearray(b"z" * 5000))]},
    ],
    ids=repr,
)
def test_plain_data_and_bytes_round_trip_equal(obj: object) -> None:
    result = round_trip(obj)
    assert result == obj
    assert type(result) is type(obj)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.int8, np.int64, np.uint16, np.complex128, np.bool_]
)
def test_numpy_arrays_of_each_dtype_round_trip_equal(dtype: type) -> None:
    array: np.ndarray[Any, Any] = (np.arange(3000) % 7).astype(dtype).reshape(30, 100)
    result = round_trip({"array": array, "small": array[:1, :3].copy()})
    assert result["array"].dtype == array.dtype
    assert np.array_equal(result["array"], array)
    assert np.array_equal(result["small"], array[:1, :3])


def test_zero_dim_and_empty_arrays_round_trip() -> None:
    zero_d = np.array(2.5)
    empty = np.zeros((0, 4), dtype=np.int32)
    result = round_trip([zero_d, empty])
    assert result[0].shape == () and result[0] == 2.5
    assert result[1].shape == (0, 4) and result[1].dtype == np.int32


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::3],
        lambda a: a.reshape(100, 100).T,
        lambda a: a.reshape(100, 100)[10:50, 20:80],
        lambda a: np.asfortranarray(a.reshape(100, 100)),
        lambda a: a[::-1],
    ],
    ids=["strided", "transposed", "sliced", "fortran", "reversed"],
)
def test_non_contiguous_arrays_round_trip_equal(make: Any) -> None:
    array = make(np.arange(10000, dtype=np.float64))
    result = round_trip(array)
    assert np.array_equal(result, array)


def test_nested_arrays_in_containers_round_trip() -> None:
    grid, part, eye = np.ones((64, 64)), np.arange(5000, dtype=np.int16), np.eye(40)
    result = round_trip({"grid": grid, "parts": [part, (eye, "label")]})
    assert np.array_equal(result["grid"], grid)
    assert np.array_equal(result["parts"][0], part)
    assert np.array_equal(result["parts"][1][0], eye)
    assert result["parts"][1][1] == "label"


def test_large_array_is_an_out_of_band_frame_not_a_copy() -> None:
    array = np.arange(1 << 16, dtype=np.float64)
    frames = serialize({"array": array})
    assert len(frames) == 2
    assert memoryview(frames[0]).nbytes < OUT_OF_BAND_MIN
    assert np.shares_memory(array, np.asarray(frames[1]))


def test_small_array_stays_in_band() -> None:
    frames = serialize(np.arange(4, dtype=np.float64))
    assert len(frames) == 1


def test_rebuilt_array_shares_memory_with_received_frame() -> None:
    array = np.random.default_rng(0).random((128, 256))
    frames = received(serialize(array))
    result = deserialize(frames)
    assert np.array_equal(result, array)
    assert np.shares_memory(result, np.asarray(frames[1]))
    assert result.flags.writeable


def test_rebuilt_fortran_array_shares_memory_with_received_frame() -> None:
    array = np.asfortranarray(np.ones((200, 300)))
    frames = received(serialize(array))
    result = deserialize(frames)
    assert result.flags.f_contiguous
    assert shares_any(result, frames)


def test_large_bytes_bytearray_and_memoryview_are_out_of_band_frames() -> None:
    data = b"b" * (8 * OUT_OF_BAND_MIN)
    mutable = bytearray(b"a" * (8 * OUT_OF_BAND_MIN))
    view = np.arange(OUT_OF_BAND_MIN // 2, dtype=np.int32).data.cast("B").cast("i")
    frames = serialize(("tag", data, [mutable, view]))
    assert len(frames) == 4
    assert memoryview(frames[0]).nbytes < OUT_OF_BAND_MIN
    assert frames[1] is data and frames[2] is mutable
    assert np.shares_memory(np.asarray(view), np.asarray(frames[3]))


def test_memoryview_round_trips_over_the_received_frame() -> None:
    view = np.arange(OUT_OF_BAND_MIN // 4, dtype=np.int64).data
    frames = received(serialize({"view": view, "small": memoryview(b"abc")}))
    result = deserialize(frames)
    assert result["view"].format == view.format and result["view"].tolist() == view.tolist()
    assert bytes(result["small"]) == b"abc"
    assert np.shares_memory(np.asarray(result["view"]), np.asarray(frames[1]))


def test_lambdas_and_closures_round_trip_by_value() -> None:
    offset = 10

    def add_offset(x: int) -> int:
        return x + offset

    square = lambda x: x * x  # noqa: E731
    result = round_trip({"closure": add_offset, "lambda": square, "data": np.ones(2000)})
    assert result["closure"](5) == 15
    assert result["lambda"](7) == 49
    assert np.array_equal(result["data"], np.ones(2000))


def test_importable_function_goes_by_reference() -> None:
    frames = serialize(np.linalg.norm)
    assert memoryview(frames[0]).nbytes < 100
    assert round_trip(np.linalg.norm) is np.linalg.norm


def test_unserializable_object_raises_serialization_error() -> None:
    import threading

    with pytest.raises(SerializationError):
        serialize(threading.Lock())


def test_empty_frames_raise_serialization_error() -> None:
    with pytest.raises(SerializationError):
        deserialize([])


@pytest.mark.parametrize(
    "header", [b"", b"garbage", b"\x80\x05\x95\xff\xff", pickle.dumps([1, 2, 3])[:-3]]
)
def test_corrupt_header_raises_serialization_error(header: bytes) -> None:
    with pytest.raises(SerializationError):
        deserialize([header])


def test_missing_out_of_band_frame_raises_serialization_error() -> None:
    frames = serialize([np.ones(4096), b"x" * 4096])
    with pytest.raises(SerializationError):
        deserialize(frames[:-1])


def test_extra_frame_raises_serialization_error() -> None:
    with pytest.raises(SerializationError):
        deserialize([*serialize(np.ones(4096)), b"unexpected"])


_setstate_calls: list[int] = []


class _FailsToLoad:
    def __init__(self) -> None:
        self.state = 1

    def __setstate__(self, state: Any) -> None:
        _setstate_calls.append(1)
        raise RuntimeError("refusing to load")


def test_load_failure_in_user_code_raises_serialization_error_once() -> None:
    frames = serialize(_FailsToLoad())
    assert len(frames) == 1  # the one-frame fast path
    _setstate_calls.clear()
    with pytest.raises(SerializationError, match="refusing to load"):
        deserialize(received(frames))
    assert _setstate_calls == [1]  # not retried by the full path


def test_small_memoryview_in_one_frame_takes_the_full_path() -> None:
    frames = serialize(memoryview(b"abc"))
    assert len(frames) == 1
    assert bytes(deserialize(received(frames))) == b"abc"


def test_ids_round_trip_to_the_interned_node_id() -> None:
    from hpcproc import MonitorRef, NodeId, Pid

    nid = NodeId(b"tcp://127.0.0.1:1/1")
    # Interned: equal addresses give the same object (equality and hash are identity).
    assert NodeId(bytearray(b"tcp://127.0.0.1:1/1")) is nid
    assert {nid: 1}[NodeId(memoryview(b"tcp://127.0.0.1:1/1"))] == 1
    pid = Pid(nid, 7)
    assert Pid(NodeId(b"tcp://127.0.0.1:1/1"), 7) == pid
    back = round_trip((pid, nid, MonitorRef(pid, pid, 3)))
    assert back[0] == pid and type(back[0]) is Pid
    assert back[0].node is nid and back[1] is nid
    assert back[2] == MonitorRef(pid, pid, 3)
    # A pid of a node never seen here makes (and interns) its NodeId.
    unseen = pickle.dumps(Pid(NodeId(b"tcp://127.0.0.1:2/1"), 1), protocol=5)
    unseen = unseen.replace(b"127.0.0.1:2/1", b"127.0.0.1:3/1")
    other = deserialize([unseen])
    assert other.node is NodeId(b"tcp://127.0.0.1:3/1") and other.lid == 1


def test_ids_and_channel_envelopes_pickle_by_extension_code_not_by_name() -> None:
    # The short codes are what makes unpickling a pid cheap (no import per name).
    from hpcproc import NodeId, Pid
    from hpcproc._channels import ChanMessage, SendPort

    pid = Pid(NodeId(b"tcp://127.0.0.1:1/1"), 7)
    for obj in (pid, pid.node, SendPort(pid, 2), ChanMessage(2, "x")):
        data = pickle.dumps(obj, protocol=5)
        assert b"hpcproc" not in data, data
        back = deserialize([data])
        assert type(back) is type(obj)
    assert deserialize(serialize(SendPort(pid, 2, int))).type_ is int


def test_a_conflicting_extension_code_is_refused_at_import_naming_both() -> None:
    import copyreg

    from hpcproc._pickle_codes import CODES, register

    (module, name), code = next(iter(CODES.items()))
    copyreg.remove_extension(module, name, code)
    copyreg.add_extension("someone.else", "thing", code)
    try:
        with pytest.raises(ImportError, match=r"someone\.else|in use|already"):
            register()
    finally:
        copyreg.remove_extension("someone.else", "thing", code)
        register()
    assert copyreg._extension_registry[module, name] == code  # type: ignore[attr-defined]


def test_serialize_does_not_keep_the_message_alive() -> None:
    import gc
    import weakref

    array = np.ones(4096)
    ref = weakref.ref(array)
    serialize({"array": array})
    del array
    gc.collect()
    assert ref() is None


_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=3 * OUT_OF_BAND_MIN)
)
_data = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(_data)
def test_any_plain_data_round_trips_equal(obj: object) -> None:
    assert round_trip(obj) == obj


_MAIN_SCRIPT = """
import subprocess, sys
from hpcproc.serialization import serialize

def add_one(x):
    return x + 1

class Point:
    pass

header, *rest = serialize({"f": add_one, "cls": Point})
assert not rest
# A fresh interpreter has no such __main__ names: they must travel by value.
code = "import pickle, sys; d = pickle.loads(sys.stdin.buffer.read()); print(d['f'](41), d['cls'].__name__)"
out = subprocess.run([sys.executable, "-c", code], input=bytes(header), capture_output=True, timeout=60)
sys.stdout.write(out.stdout.decode() + out.stderr.decode())
"""


def test_functions_and_classes_of_main_travel_by_value(tmp_path: Any) -> None:
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(_MAIN_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "42 Point", out.stdout + out.stderr


def module_level_function() -> int:
    return 42


def test_dumps_sends_importable_functions_by_reference_and_closures_by_value() -> None:
    from hpcproc.serialization import dumps

    by_reference = dumps(module_level_function)
    assert by_reference == pickle.dumps(module_level_function, protocol=5)
    assert pickle.loads(by_reference) is module_level_function
    k = 5
    closure = pickle.loads(dumps(lambda: k + 1))
    assert closure() == 6


def test_dumps_honours_cloudpickles_register_pickle_by_value() -> None:
    import sys

    import cloudpickle

    from hpcproc.serialization import dumps

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        data = dumps(module_level_function)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert data != pickle.dumps(module_level_function, protocol=5)  # the code itself
    assert pickle.loads(data)() == 42


def test_the_compiled_small_message_path_is_built_and_used_unless_turned_off(
    small_path: str,
) -> None:
    if small_path == "py":
        return  # the fixture turned it off for this run
    turned_off = os.environ.get(ACCEL_ENV, "1").strip() == "0"
    if compiled_required():
        assert _pickle_accel is not None and _compact_accel is not None
    assert serialization.ACCELERATED is (not turned_off and _pickle_accel is not None)
    compact_on = os.environ.get("HPCPROC_COMPACT", "1").strip() != "0"
    assert serialization.COMPACT is (not turned_off and compact_on and _compact_accel is not None)


class _Box:
    def __init__(self, *items: Any) -> None:
        self.items = list(items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Box) and other.items == self.items


def _pids() -> tuple[Any, Any]:
    from hpcproc import NodeId, Pid

    return Pid(NodeId(b"tcp://127.0.0.1:1/1"), 7), Pid(NodeId(b"tcp://127.0.0.1:2/1"), 8)


def test_envelopes_shared_references_and_cycles_round_trip_message_after_message() -> None:
    # The seeded pickler's memo starts with the pid constructor and the channel
    # envelope; the message's own memo entries must keep their indices on both sides,
    # message after message (a reference to a wrong memo entry would show here).
    from hpcproc._channels import ChanMessage

    a, b = _pids()
    shared = [1, 2]
    cyclic: list[Any] = ["x"]
    cyclic.append(cyclic)
    for _ in range(3):
        for msg in (
            (a, b"x" * 8),
            ChanMessage(3, (b, "reply")),
            (shared, shared, a, b, a),
            [ChanMessage(1, a), ChanMessage(2, shared), shared],
            cyclic,
            (_Box(a, shared), _Box(b, shared)),
            ("no envelopes", shared, shared),
            b"x" * 8,
        ):
            header = serialize(msg)[0]
            # A compact header (plain data) is no pickle: its other reader is Python's.
            plain = _compact.decode if header[:1] == b"\xc5" else pickle.loads
            for back in (deserialize(received([header])), plain(header)):
                if isinstance(msg, ChanMessage):
                    assert (back.port_id, back.payload) == (msg.port_id, msg.payload)
                elif isinstance(msg, list) and msg and isinstance(msg[0], ChanMessage):
                    assert [m.payload for m in back[:2]] == [a, shared]
                    assert back[1].payload is back[2]
                elif msg is cyclic:
                    assert back[0] == "x" and back[1] is back
                else:
                    assert back == msg
                if isinstance(msg, tuple) and len(msg) == 5:
                    assert back[0] is back[1] and back[2] is back[4]
                    assert type(back[2]) is type(a) and back[2].node is a.node


def test_a_message_after_one_that_failed_to_pickle_midway_is_intact() -> None:
    a, _ = _pids()
    shared = [a]
    with pytest.raises(SerializationError):
        serialize((a, shared, threading.Lock()))  # fails after a and shared are memoized
    back = round_trip((shared, shared, a))
    assert back == ([a], [a], a) and back[0] is back[1]


class _SerializesWhilePickled:
    """Its reducer serializes another message: serialize is re-entered mid-pickle."""

    inner: ClassVar[list[Any]] = []

    def __reduce__(self) -> Any:
        a, _ = _pids()
        _SerializesWhilePickled.inner.append(serialize((a, [a, a], "inner")))
        return (_Box, (a, "outer"))


def test_serialize_re_entered_from_a_reducer() -> None:
    a, _ = _pids()
    _SerializesWhilePickled.inner.clear()
    back = round_trip((a, _SerializesWhilePickled(), a))
    assert back == (a, _Box(a, "outer"), a)
    (inner,) = _SerializesWhilePickled.inner
    assert deserialize(received(inner)) == (a, [a, a], "inner")


def test_serialize_from_several_threads_at_once() -> None:
    a, b = _pids()
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(2000):
                shared = [k, i]
                msg = (a if i % 2 else b, shared, _Box(shared, k), shared)
                back = round_trip(msg)
                assert back == msg and back[1] is back[3], (k, i, back)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


class _Interrupts:
    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


def test_a_keyboard_interrupt_while_pickling_propagates() -> None:
    with pytest.raises(KeyboardInterrupt):
        serialize(("x", _Interrupts()))
    assert round_trip(("x", [1])) == ("x", [1])  # and the next message is intact


def test_serialize_does_not_keep_a_small_message_alive() -> None:
    import gc
    import weakref

    a, _ = _pids()
    box = _Box(a, b"x" * 8)
    ref = weakref.ref(box)
    frames = serialize((a, box))
    assert len(frames) == 1  # the small-message path
    del box
    gc.collect()
    assert ref() is None


def test_the_compiled_pid_constructor_and_reducer_match_the_python_ones() -> None:
    import copy
    import copyreg

    from hpcproc import _ids

    if _ids._compiled is None:
        assert _ids._pid is _ids._py_pid
        _skip_compiled("the compiled pid functions are")
    a, _ = _pids()
    # Named as the Python one, so that both pickle it alike (by its extension code).
    assert (_ids._pid.__module__, _ids._pid.__qualname__) == ("hpcproc._ids", "_pid")
    from hpcproc._pickle_codes import CODES

    code = CODES["hpcproc._ids", "_pid"].to_bytes(4, "little")
    assert b"\x84" + code in pickle.dumps(_ids._pid, protocol=5)
    assert pickle.loads(pickle.dumps(_ids._pid, protocol=5)) is _ids._pid
    assert copyreg.dispatch_table[_ids.Pid](a) == (_ids._pid, a.__reduce_ex__(5)[1])
    for make in (_ids._pid, _ids._py_pid):
        known = make(a.node._key, 7)
        assert type(known) is _ids.Pid and known == a and known.node is a.node
        assert hash(known) == hash(a)
        fresh = make(b"tcp://127.0.0.1:9/%d" % id(make), 3)  # a node not seen before
        assert fresh.node is _ids.NodeId(fresh.node._key) and fresh.lid == 3
    assert copy.deepcopy([a, a]) == [a, a]
    with pytest.raises(TypeError):
        _ids._pid(b"x")


def test_a_pickle_without_memo_gets_has_no_preamble(small_path: str) -> None:
    # b"x" * 100 pickles in a frame of 104 bytes, and 104 is "h": a frame length that
    # reads like a memo get must not cost the receiver a preamble. (An argument byte
    # inside the pickle may still, harmlessly: the scan does not parse opcodes.)
    assert pickle.dumps(b"x" * 100, protocol=5)[3] == ord("h")
    # (Under "compact" these are not pickled: the seeded picklers are tested alone.)
    pickles = serialization._compiled if small_path == "compact" else serialize
    for msg in (b"x" * 100, b"x" * 8, "text", 12345):
        assert pickles is not None
        header = pickles(msg)[0]
        assert bytes(header[:2]) == b"\x80\x05", (small_path, msg, bytes(header[:16]))


def test_the_compiled_pid_reducer_refuses_to_run_unconfigured() -> None:
    import subprocess

    if _pickle_accel is None:
        pytest.skip("the compiled part is not built")
    code = "from hpcproc import _pickle_accel as a; a.pid_reduce((1, 2))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HPCPROC_PICKLE_ACCEL": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "pid_functions() was not called" in out.stderr, out
