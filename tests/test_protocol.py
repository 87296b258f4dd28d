"""distributed.protocol driven directly with bytes: no sockets."""

import math
import pickle
import struct
import tracemalloc

import msgpack
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributed import protocol
from distributed.protocol import (
    BUFFER_THRESHOLD,
    Decoder,
    FrameTooLarge,
    Limits,
    ProtocolError,
    dumps,
    frame_prelude,
    frames_to_bytes,
    loads,
    loads_header,
    parse_count,
    parse_lengths,
)

pytestmark = pytest.mark.pure  # no sockets, no processes: in the fast loop

fuzz = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# helpers


def assert_same(a, b):
    """Equality that also checks types all the way down (tuple vs list,
    int vs float vs bool, bytes vs str) and treats nan as equal to nan."""
    assert type(a) is type(b), (a, b)
    if type(a) is float:
        if math.isnan(a):
            assert math.isnan(b)
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b)
    elif type(a) in (list, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif type(a) is dict:
        assert set(a) == set(b)  # (the order of keys is not part of the contract)
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def roundtrip(msg):
    return loads(dumps(msg))


def wire_roundtrip(msg):
    """Through bytes and a Decoder, as a socket would."""
    out = Decoder().feed(frames_to_bytes(dumps(msg)))
    assert len(out) == 1
    return out[0]


def frame_len(f):
    return f.nbytes if type(f) is memoryview else len(f)


# every str, including lone surrogates; ints beyond 64 bits
chars = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
plain = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(chars)
    | st.binary(max_size=2000)
)
values = st.recursive(
    plain,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=5)
    ),
    max_leaves=25,
)
messages = st.builds(
    lambda op, rest: {"op": op, **rest},
    st.text(chars),
    st.dictionaries(st.text(chars, max_size=8), values, max_size=6),
)


# ---------------------------------------------------------------------------
# round trips of arbitrary messages


@fuzz
@given(messages)
def test_roundtrip_dict_messages(msg):
    assert_same(roundtrip(msg), msg)
    assert_same(wire_roundtrip(msg), msg)


@fuzz
@given(values)
def test_roundtrip_any_value(value):
    assert_same(roundtrip(value), value)
    assert_same(wire_roundtrip(value), value)


@pytest.mark.parametrize(
    "value",
    [
        "\ud800",
        "a\udcffb",
        {"op": "x", "s": "\udc80"},
        {"op": "\ud83d"},
        {"op": "x", "\ud800": 1},
    ],
)
def test_roundtrip_lone_surrogates(value):
    # a lone surrogate is a legal Python str; pickle carries it, so must we
    assert_same(roundtrip(value), value)
    assert_same(wire_roundtrip(value), value)


def test_tuples_and_lists_are_preserved():
    msg = {"op": "x", "t": (1, 2), "l": [1, 2], "n": [(1, [2, (3,)]), {"a": (4,)}]}
    out = wire_roundtrip(msg)
    assert_same(out, msg)
    assert type(out["t"]) is tuple and type(out["l"]) is list
    assert_same(wire_roundtrip((1, [2, 3])), (1, [2, 3]))
    assert_same(wire_roundtrip([1, (2, 3)]), [1, (2, 3)])


@pytest.mark.parametrize("n", [0, 1, 255, 1024, 1025, BUFFER_THRESHOLD - 1,
                               BUFFER_THRESHOLD, 3 * BUFFER_THRESHOLD + 7])
def test_bytes_of_every_value(n):
    every = bytes(range(256))
    data = (every * (n // 256 + 1))[:n]
    for msg in [data, {"op": "x", "data": data}, {"op": "x", "nested": [data, (data,)]}]:
        assert_same(wire_roundtrip(msg), msg)


def test_payload_that_looks_like_framing():
    # no sentinels: bytes that look like a prelude/header are just data
    fake = frames_to_bytes(dumps({"op": "evil"}))
    msg = {"op": "x", "data": fake * 3, "more": [fake, b"\x00" * 64]}
    assert_same(wire_roundtrip(msg), msg)


@pytest.mark.parametrize("value", [
    b"", "", 0, -1, 2**64, -(2**64), 2**1000, 1.5, -0.0, float("inf"), True,
    False, None, {}, [], (), {"op": ""},
])
def test_edge_values(value):
    assert_same(roundtrip(value), value)
    assert_same(wire_roundtrip(value), value)


class MyStr(str):
    pass


def test_subclasses_and_numpy_scalars_keep_their_type():
    import collections
    import enum

    class Color(enum.IntEnum):
        RED = 1

    dd = collections.defaultdict(set, {"a": {1}})
    msg = {"op": "x", "f": np.float64(1.5), "i": np.int64(3), "b": np.bool_(True),
           "s": MyStr("s"), "od": collections.OrderedDict(a=1), "e": Color.RED}
    for out in [roundtrip(msg), wire_roundtrip(msg)]:
        for k, v in msg.items():
            assert type(out[k]) is type(v), k
            assert out[k] == v
    out = wire_roundtrip(dd)
    assert type(out) is collections.defaultdict and out.default_factory is set
    assert out == dd


def test_op_is_in_the_header_without_unpickling():
    msg = {"op": "compute", "function": lambda x: x, "key": "x", "n": 3}
    frames = dumps(msg)
    header = loads_header(frames[0])
    assert header["d"]["op"] == "compute"
    assert header["d"]["key"] == "x"
    # the header alone tells the op even when the pickled part is garbage
    header2 = loads_header(dumps(msg)[0])
    assert header2["d"] == header["d"]
    with pytest.raises(ProtocolError):
        loads([frames[0], b"not a pickle"] + list(frames[2:]))


# ---------------------------------------------------------------------------
# numpy / pandas


@pytest.mark.parametrize(
    "x",
    [
        np.arange(10, dtype="f8"),
        np.arange(100000, dtype="i4"),
        np.arange(255, dtype="u1"),
        np.array([1 + 2j, 3 - 4j], dtype="c16"),
        np.array([True, False, True]),
        np.array(["2020-01-01", "NaT"], dtype="M8[ns]"),
        np.array(["a", "bcd", ""], dtype="U3"),
        np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.array([1, "a", None], dtype=object),
        np.arange(200000, dtype="f4").reshape(400, 500)[:, ::3],  # non-contiguous
        np.arange(200000, dtype="i8").reshape(400, 500).T,  # Fortran order
        np.asfortranarray(np.arange(12).reshape(3, 4)),
        np.array(5.0),  # 0-d
        np.array(7, dtype="i2"),
        np.array([], dtype="f8"),  # empty
        np.empty((0, 3), dtype="i4"),
    ],
    ids=lambda x: "%s-%s-%s" % (x.dtype, x.shape, "C" if x.flags.c_contiguous else "nc"),
)
def test_numpy_roundtrip(x):
    for out in [roundtrip(x), wire_roundtrip(x), wire_roundtrip({"op": "x", "x": x})["x"]]:
        assert type(out) is np.ndarray
        assert out.dtype == x.dtype
        assert out.shape == x.shape
        np.testing.assert_array_equal(out, x)


def test_pandas_roundtrip():
    n = 50000
    df = pd.DataFrame({
        "i": np.arange(n),
        "f": np.linspace(0, 1, n),
        "s": ["x%d" % (i % 7) for i in range(n)],
        "c": pd.Categorical(["a", "b"] * (n // 2)),
        "t": pd.date_range("2020-01-01", periods=n, freq="s"),
    }, index=pd.RangeIndex(n) * 2)
    for out in [roundtrip(df), wire_roundtrip({"op": "x", "df": df})["df"]]:
        pd.testing.assert_frame_equal(out, df)
    s = pd.Series(np.random.random(1000), index=["k%d" % i for i in range(1000)], name="s")
    pd.testing.assert_series_equal(wire_roundtrip(s), s)
    pd.testing.assert_frame_equal(wire_roundtrip(df.iloc[:0]), df.iloc[:0])


# ---------------------------------------------------------------------------
# large buffers are frames of their own, with no copy


def test_large_array_is_its_own_frame_without_copy():
    x = np.arange(BUFFER_THRESHOLD, dtype="f8")  # 512 KiB
    frames = dumps({"op": "x", "x": x})
    big = [f for f in frames if frame_len(f) >= x.nbytes]
    assert len(big) == 1
    (frame,) = big
    assert type(frame) is memoryview
    assert frame.obj is x or np.shares_memory(np.asarray(frame), x)
    # the pickle frame does not contain the array data
    assert all(frame_len(f) < 4096 for f in frames if f is not frame)

    # loading uses the frame's buffer in place
    out = loads(frames)["x"]
    np.testing.assert_array_equal(out, x)
    assert np.shares_memory(out, np.asarray(frame))


def test_loaded_array_uses_received_buffer():
    # core.read hands loads() bytearrays for big frames: arrays use them in
    # place and stay writeable
    x = np.random.random(100000)
    frames = [bytearray(f) if frame_len(f) >= BUFFER_THRESHOLD else bytes(f)
              for f in dumps(x)]
    (buf,) = [f for f in frames if type(f) is bytearray]
    out = loads(frames)
    np.testing.assert_array_equal(out, x)
    assert out.flags.writeable
    assert np.shares_memory(out, np.frombuffer(buf, dtype="u1"))
    out[0] = -1.0
    assert buf[:8] == struct.pack("<d", -1.0)


def test_large_bytes_are_their_own_frame():
    b = bytes(range(256)) * (BUFFER_THRESHOLD // 256 + 1)
    frames = dumps({"op": "x", "b": b, "small": b"abc"})
    assert any(f is b for f in frames)
    assert loads(frames)["b"] == b
    # a small bytes value rides in the header
    assert len(dumps({"op": "x", "b": b"abc"})) == 1


def test_small_buffers_stay_in_the_pickle():
    x = np.arange(100, dtype="f8")
    frames = dumps({"op": "x", "x": x})
    assert len(frames) == 2
    np.testing.assert_array_equal(loads(frames)["x"], x)


def test_pandas_columns_are_frames():
    df = pd.DataFrame({"a": np.arange(100000, dtype="f8"), "b": np.arange(100000)})
    frames = dumps(df)
    assert sum(frame_len(f) >= 800000 for f in frames) >= 1
    assert all(frame_len(f) < 800000 for f in frames[:2])


# ---------------------------------------------------------------------------
# Decoder


SAMPLE = [
    {"op": "a", "x": bytes(range(256)), "arr": np.arange(10)},
    (1, [2.5, None], {"k": "v"}),
    {"op": "b"},
    b"",
    np.arange(3000, dtype="u2"),
]


def assert_same_messages(out, expected):
    assert len(out) == len(expected)
    for a, b in zip(out, expected):
        if isinstance(b, dict) and "arr" in b:
            np.testing.assert_array_equal(a.pop("arr"), b["arr"])
            b = {k: v for k, v in b.items() if k != "arr"}
        if isinstance(b, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert_same(a, b)


def test_decoder_byte_by_byte():
    data = b"".join(frames_to_bytes(dumps(m)) for m in SAMPLE)
    d = Decoder()
    out = []
    for i in range(len(data)):
        got = d.feed(data[i : i + 1])
        out.extend(got)
        if not got:
            assert d.pending > 0
    assert d.pending == 0
    assert_same_messages(out, SAMPLE)


WIRE = b"".join(frames_to_bytes(dumps(m)) for m in SAMPLE)


@fuzz
@given(st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=40))
def test_decoder_random_chunks(cuts):
    bounds = [0] + sorted(cuts) + [len(WIRE)]
    d = Decoder()
    out = []
    for start, stop in zip(bounds, bounds[1:]):
        out.extend(d.feed(WIRE[start:stop]))  # empty chunks too
    assert d.pending == 0
    assert_same_messages(out, SAMPLE)


def test_decoder_several_messages_at_once():
    msgs = [{"op": "a", "i": i, "payload": [i] * i} for i in range(5)]
    d = Decoder()
    wire = b"".join(frames_to_bytes(dumps(m)) for m in msgs)
    out = d.feed(wire + wire[:7])  # plus the start of a sixth one
    assert out == msgs
    assert d.pending == 7
    assert d.feed(wire[7:]) == msgs
    assert d.pending == 0


def test_decoder_accepts_memoryview_and_bytearray():
    wire = frames_to_bytes(dumps({"op": "x", "y": [1, 2]}))
    assert Decoder().feed(memoryview(wire)) == [{"op": "x", "y": [1, 2]}]
    assert Decoder().feed(bytearray(wire)) == [{"op": "x", "y": [1, 2]}]


@fuzz
@given(values, st.data())
def test_truncated_input_waits(msg, data):
    wire = frames_to_bytes(dumps(msg))
    cut = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    d = Decoder()
    assert d.feed(wire[:cut]) == []
    assert d.pending == cut
    # and the rest completes it
    (out,) = d.feed(wire[cut:])
    assert_same(out, msg)
    assert d.pending == 0


@fuzz
@given(st.binary(max_size=300))
def test_garbage_is_protocol_error_or_waits(data):
    d = Decoder()
    try:
        out = d.feed(data)
    except ProtocolError:
        return
    # nothing raised: it may only be waiting, or have decoded real messages
    assert isinstance(out, list)
    assert d.pending <= len(data)


def _frames_strategy():
    header = st.one_of(
        st.binary(max_size=40),
        st.sampled_from([
            msgpack.packb({"p": 0}), msgpack.packb({"p": 1}), msgpack.packb({"p": -1}),
            msgpack.packb({"p": 0, "x": 1}), msgpack.packb({"d": {"op": "x"}, "p": 0}),
            msgpack.packb({"v": 1}), msgpack.packb({"p": "a"}), msgpack.packb({"d": 1}),
            msgpack.packb([1, 2]), msgpack.packb({}), msgpack.packb(None),
        ]),
    )
    payload = st.one_of(
        st.binary(max_size=60),
        st.binary(max_size=60).map(lambda b: b"\x80\x05" + b),
        st.sampled_from([pickle.dumps(1), pickle.dumps({"a": 1}), pickle.dumps([1]),
                         pickle.dumps(None)]),
    )
    return st.tuples(header, st.lists(payload, max_size=3)).map(
        lambda t: [t[0]] + t[1])


@fuzz
@given(_frames_strategy())
def test_garbage_frames_are_protocol_errors(frames):
    """Well framed garbage: header and pickle layers refuse it cleanly."""
    try:
        out = Decoder().feed(frames_to_bytes(frames))
    except ProtocolError:
        return
    assert len(out) == 1  # it happened to be a valid message
    try:
        loads(frames)
    except ProtocolError:  # pragma: no cover - the Decoder said it was valid
        pytest.fail("loads refused what the Decoder accepted")


def test_frame_count_zero():
    d = Decoder()
    with pytest.raises(ProtocolError):
        d.feed(struct.pack("<Q", 0))
    with pytest.raises(ProtocolError):
        parse_count(struct.pack("<Q", 0))
    with pytest.raises(ProtocolError):
        loads([])


def test_huge_length_prefix_refused_before_allocation():
    prelude = struct.pack("<QQ", 1, 2**62)
    tracemalloc.start()
    try:
        d = Decoder()
        with pytest.raises(FrameTooLarge) as info:
            d.feed(prelude)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert str(2**62) in str(info.value)
    with pytest.raises(FrameTooLarge):
        parse_lengths(struct.pack("<Q", 2**62), 1)
    # also when a small frame precedes it
    with pytest.raises(FrameTooLarge):
        Decoder().feed(struct.pack("<QQQ", 2, 10, 2**62))
    # and when the sum overflows the message limit
    with pytest.raises(FrameTooLarge):
        Decoder().feed(struct.pack("<QQQ", 2, 2**35, 2**35 + 1))
    assert issubclass(FrameTooLarge, ProtocolError)


def test_too_many_frames():
    with pytest.raises(FrameTooLarge):
        Decoder().feed(struct.pack("<Q", 2**63))
    with pytest.raises(FrameTooLarge):
        Decoder().feed(struct.pack("<Q", protocol.DEFAULT_LIMITS.max_frames + 1))
    limits = Limits(max_frames=2)
    frames = dumps({"op": "x", "a": np.arange(BUFFER_THRESHOLD)})
    assert len(frames) == 3
    with pytest.raises(FrameTooLarge):
        Decoder(limits).feed(frames_to_bytes(frames))
    with pytest.raises(FrameTooLarge):
        parse_count(struct.pack("<Q", 3), limits)
    assert parse_count(struct.pack("<Q", 2), limits) == 2


def test_limits_configurable(monkeypatch):
    limits = Limits(max_frames=4, max_frame_size=100, max_message_size=150)
    assert (limits.max_frames, limits.max_frame_size, limits.max_message_size) == (4, 100, 150)
    assert "max_frame_size=100" in repr(limits)
    assert parse_lengths(struct.pack("<QQ", 100, 50), 2, limits) == [100, 50]
    with pytest.raises(FrameTooLarge, match="DISTRIBUTED_MAX_FRAME_SIZE"):
        parse_lengths(struct.pack("<Q", 101), 1, limits)
    with pytest.raises(FrameTooLarge, match="DISTRIBUTED_MAX_MESSAGE_SIZE"):
        parse_lengths(struct.pack("<QQ", 100, 51), 2, limits)

    msg = {"op": "x", "data": b"x" * 200}
    d = Decoder(Limits(max_frame_size=100))
    with pytest.raises(FrameTooLarge):
        d.feed(frames_to_bytes(dumps(msg)))
    assert Decoder(Limits(max_frame_size=1000)).feed(frames_to_bytes(dumps(msg))) == [msg]

    # the message size limit defaults the frame size limit
    assert Limits(max_message_size=2**20).max_frame_size == 2**20

    monkeypatch.setenv("DISTRIBUTED_MAX_FRAMES", "7")
    monkeypatch.setenv("DISTRIBUTED_MAX_FRAME_SIZE", "1000")
    monkeypatch.setenv("DISTRIBUTED_MAX_MESSAGE_SIZE", "5000")
    env = Limits()
    assert (env.max_frames, env.max_frame_size, env.max_message_size) == (7, 1000, 5000)
    # explicit arguments win over the environment
    assert Limits(max_frames=3).max_frames == 3


def test_undecodable_header():
    for bad in [b"\xc1", b"\x81", b"\xdd\xff\xff\xff\xff", b"", msgpack.packb([1, 2]),
                msgpack.packb({"d": [1]}), msgpack.packb({1: 2})]:
        with pytest.raises(ProtocolError):
            loads([bad])
        with pytest.raises(ProtocolError):
            Decoder().feed(frames_to_bytes([bad]))


def test_header_claims_more_frames_than_present():
    frames = dumps({"op": "x", "a": np.arange(BUFFER_THRESHOLD)})
    assert len(frames) == 3
    with pytest.raises(ProtocolError, match="frame count"):
        loads(frames[:2])
    with pytest.raises(ProtocolError):
        Decoder().feed(frames_to_bytes(frames[:2]))
    # and fewer
    with pytest.raises(ProtocolError):
        loads(list(frames) + [b"extra"])
    with pytest.raises(ProtocolError):
        loads(dumps({"op": "x"}) + [b"extra"])
    header = msgpack.packb({"p": 5})
    with pytest.raises(ProtocolError):
        Decoder().feed(frames_to_bytes([header, pickle.dumps(1)]))


def test_decoder_error_leaves_no_partial_state_confusion():
    # valid message then garbage: the valid one is not silently dropped when
    # fed separately
    d = Decoder()
    assert d.feed(frames_to_bytes(dumps({"op": "ok"}))) == [{"op": "ok"}]
    with pytest.raises(ProtocolError):
        d.feed(struct.pack("<Q", 0))


# ---------------------------------------------------------------------------
# functions travel with cloudpickle


def make_adder(n):
    def adder(x):
        return x + n

    return adder


def test_lambdas_and_closures():
    offset = 10
    f = lambda x: x + offset  # noqa: E731
    g = make_adder(5)
    msg = {"op": "compute", "function": f, "args": (g,), "h": lambda: [1, (2,)]}
    for out in [roundtrip(msg), wire_roundtrip(msg)]:
        assert out["op"] == "compute"
        assert out["function"](1) == 11
        assert out["args"][0](1) == 6
        assert out["h"]() == [1, (2,)]


def test_serialize_falls_back_to_cloudpickle():
    f = lambda x: x * 2  # noqa: E731
    with pytest.raises(Exception):
        pickle.dumps(f)
    payload, buffers, extra = protocol.serialize(f)
    assert protocol.deserialize(payload, buffers, extra)(21) == 42


def test_frame_prelude_layout():
    frames = [b"abc", memoryview(b"defgh"), bytearray(b"")]
    prelude = frame_prelude(frames)
    assert prelude == struct.pack("<4Q", 3, 3, 5, 0)
    assert frames_to_bytes([b"abc", b"de"]) == struct.pack("<3Q", 2, 3, 2) + b"abcde"


def test_dumps_keeps_no_reference_to_the_message():
    """Sent data must be freed by reference counting alone: a pickler cycle
    kept every array a worker had sent alive until a full GC."""
    import gc
    import weakref

    gc.disable()
    try:
        for extra in ({}, {"f": lambda: 1}):  # plain pickle and cloudpickle paths
            a = np.ones(10**5)
            ref = weakref.ref(a)
            frames = dumps(dict({"x": a, "b": b"z" * 100000}, **extra))
            assert any(isinstance(f, memoryview) for f in frames)
            del a, frames
            assert ref() is None
    finally:
        gc.enable()
