"""Server and rpc on real sockets (free ports only)."""

import asyncio
import logging
import struct
import threading
import time
import traceback

import msgpack
import numpy as np
import pytest
from tornado import gen
from tornado.iostream import StreamClosedError

from distributed import protocol
from distributed.core import (
    CommClosedError,
    RemoteException,
    Server,
    coerce_to_address,
    coerce_to_rpc,
    connect,
    pingpong,
    read,
    rpc,
    write,
)
from distributed.protocol import Decoder, dumps, frames_to_bytes
from distributed.utils_test import free_port, named_like, run, wait_for


class MyError(Exception):
    pass


def raise_my_error_here(x):
    raise MyError("bad x: %r" % (x,))


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.f = lambda: threading.Lock()
        self.lock = threading.Lock()


def echo(stream, x=None):
    return x


def add(stream, x=None, y=None):
    return x + y


async def async_add(stream, x=None, y=None):
    await asyncio.sleep(0)
    return x + y


@gen.coroutine
def gen_add(stream, x=None, y=None):
    yield gen.sleep(0)
    return x + y


async def slow(stream, delay=0.0, x=None):
    await asyncio.sleep(delay)
    return x


def fail(stream, x=None):
    raise_my_error_here(x)


def fail_unpicklable(stream):
    raise Unpicklable("cannot travel")


def unserializable_reply(stream):
    return threading.Lock()


HANDLERS = {
    "echo": echo,
    "add": add,
    "async_add": async_add,
    "gen_add": gen_add,
    "slow": slow,
    "fail": fail,
    "fail_unpicklable": fail_unpicklable,
    "unserializable_reply": unserializable_reply,
}


def with_server(handlers=HANDLERS, **kwargs):
    """Decorator: ``async def test(server)`` on a fresh listening Server."""

    def decorator(func):
        def test():
            async def main():
                server = Server(dict(handlers), **kwargs)
                server.listen(0)
                try:
                    await func(server)
                finally:
                    server.stop()

            run(main())

        return named_like(test, func)

    return decorator


# ---------------------------------------------------------------------------
# handlers and replies


@with_server()
async def test_listen_port_zero(s):
    assert isinstance(s.port, int) and s.port > 0
    assert s.ip == "127.0.0.1"
    assert s.address == "127.0.0.1:%d" % s.port


def test_address_before_listen():
    with pytest.raises(ValueError):
        Server({}).address


@with_server()
async def test_handler_kinds(s):
    r = rpc(s.address)
    assert await r.echo(x=[1, (2, b"3")]) == [1, (2, b"3")]
    assert await r.add(x=1, y=2) == 3
    assert await r.async_add(x=1, y=2) == 3
    assert await r.gen_add(x="a", y="b") == "ab"
    assert await r.echo() is None
    assert await r.ping() == b"pong"
    assert pingpong(None) == b"pong"
    ident = await r.identity()
    assert ident == {"type": "Server", "id": s.id}
    r.close_streams()


@with_server()
async def test_unknown_op(s):
    r = rpc(s.address)
    with pytest.raises(KeyError, match="no_such_op"):
        await r.no_such_op(x=1)
    for op in [5, None, [1, 2], {"a": 1}]:  # not even a string, or unhashable
        with pytest.raises(KeyError, match="unknown operation"):
            await r.call(op, timeout=5)
    assert await r.ping() == b"pong"
    r.close_streams()


@with_server()
async def test_bad_arguments_are_errors(s):
    r = rpc(s.address)
    with pytest.raises(TypeError):
        await r.add(x=1, y=2, z=3)  # unexpected keyword
    with pytest.raises(TypeError):
        await r.add(x=1, y="a")
    assert await r.add(x=1, y=2) == 3
    r.close_streams()


@with_server()
async def test_handler_raises_remote_traceback(s):
    r = rpc(s.address)
    for _ in range(3):  # the server keeps serving after errors
        with pytest.raises(MyError, match="bad x: 42") as info:
            await r.fail(x=42)
        names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "raise_my_error_here" in names
        assert "fail" in names
        assert await r.echo(x=1) == 1
    # another connection is fine too
    r2 = rpc(s.address)
    assert await r2.add(x=2, y=3) == 5
    r.close_streams()
    r2.close_streams()


@with_server()
async def test_unpicklable_exception(s):
    r = rpc(s.address)
    with pytest.raises(RemoteException) as info:
        await r.fail_unpicklable()
    assert info.value.type_name == "Unpicklable"
    assert "cannot travel" in str(info.value)
    assert await r.ping() == b"pong"
    r.close_streams()


@with_server()
async def test_unserializable_reply_is_an_error(s):
    r = rpc(s.address)
    with pytest.raises(Exception, match="pickle|lock"):
        await r.unserializable_reply(timeout=5)
    assert await r.echo(x=2) == 2
    r.close_streams()


@with_server()
async def test_close_and_reply_false(s):
    calls = []
    s.handlers["record"] = lambda stream, x=None: calls.append(x)
    r = rpc(s.address)
    assert await r.echo(x=1, close=True) == 1
    assert r.pool.open == 0
    await wait_for(lambda: not s.streams)

    assert await r.record(x="a", reply=False) is None
    await wait_for(lambda: calls == ["a"])
    # no reply was sent, so the stream is in step for the next call
    assert await r.echo(x=2) == 2
    assert r.pool.open == 1
    assert len(s.streams) == 1
    r.close_streams()


@with_server()
async def test_concurrent_calls_on_one_rpc(s):
    r = rpc(s.address)
    coros = [r.slow(delay=0.2 if i % 3 == 0 else 0, x=i) if i % 2 else r.add(x=i, y=100)
             for i in range(20)]
    start = time.time()
    results = await asyncio.gather(*coros)
    assert results == [i if i % 2 else i + 100 for i in range(20)]
    assert time.time() - start < 2  # slow ones ran concurrently
    assert 1 <= r.pool.open <= 20
    r.close_streams()


@with_server()
async def test_streams_are_reused(s):
    r = rpc(s.address)
    for i in range(50):
        assert await r.echo(x=i) == i
    assert r.pool.open == 1
    assert len(s.streams) == 1
    for i in range(5):
        await asyncio.gather(*[r.echo(x=j) for j in range(3)])
    assert r.pool.open <= 3
    r.close_streams()
    assert r.pool.open == 0
    await wait_for(lambda: not s.streams)
    # and it reconnects after close_streams
    assert await r.echo(x="again") == "again"
    r.close_streams()


@with_server()
async def test_rpc_context_manager_closes(s):
    with rpc(s.address) as r:
        assert await r.ping() == b"pong"
        assert r.pool.open == 1
    assert r.pool.open == 0
    await wait_for(lambda: not s.streams)


@with_server()
async def test_timeout(s):
    r = rpc(s.address)
    start = time.time()
    with pytest.raises(TimeoutError):
        await r.slow(delay=5, x=1, timeout=0.1)
    assert time.time() - start < 2
    # the rpc still works, and does not read the late reply
    assert await r.echo(x=2) == 2
    assert await r.slow(delay=0.01, x=3, timeout=5) == 3

    r2 = rpc(s.address, timeout=0.1)  # a default timeout for every call
    with pytest.raises(TimeoutError):
        await r2.slow(delay=5)
    assert await r2.slow(delay=0, x=4) == 4
    assert await r2.slow(delay=0.3, x=5, timeout=None) == 5
    r.close_streams()
    r2.close_streams()


@with_server()
async def test_rpc_forms(s):
    forms = [
        rpc(s.address),
        rpc("127.0.0.1:%d" % s.port),
        rpc(ip="127.0.0.1", port=s.port),
        rpc(("127.0.0.1", s.port)),
        rpc(["127.0.0.1", s.port]),
    ]
    for r in forms:
        assert (r.ip, r.port) == ("127.0.0.1", s.port)
        assert r.address == s.address
        assert await r.ping() == b"pong"
        assert s.address in repr(r)
        r.close_streams()

    stream = await connect("127.0.0.1", s.port)
    r = rpc(stream)
    assert (r.ip, r.port) == ("127.0.0.1", s.port)
    assert await r.add(x=1, y=1) == 2
    results = await asyncio.gather(*[r.echo(x=i) for i in range(10)])  # serialised
    assert results == list(range(10))
    r.close_streams()
    assert stream.closed()

    with pytest.raises(TypeError):
        rpc()
    with pytest.raises(TypeError):
        rpc(ip="127.0.0.1")


@with_server()
async def test_rpc_stream_after_timeout(s):
    """A timed out call on rpc(stream) must not poison the next call."""
    stream = await connect(s.address)
    r = rpc(stream)
    with pytest.raises(TimeoutError):
        await r.slow(delay=0.5, x=1, timeout=0.05)
    # either the stream still works (and answers the right call) or it is
    # closed, with a clear error: never the reply of the earlier call, never
    # a tornado "Already reading" assertion
    try:
        result = await r.slow(delay=0, x=2, timeout=5)
    except StreamClosedError:
        assert stream.closed()
    else:
        assert result == 2
    # the server is unaffected
    assert await rpc(s.address).ping() == b"pong"


def test_coerce_to_address():
    assert coerce_to_address("127.0.0.1:8787") == "127.0.0.1:8787"
    assert coerce_to_address("tcp://127.0.0.1:8787") == "127.0.0.1:8787"
    assert coerce_to_address(("127.0.0.1", 8787)) == "127.0.0.1:8787"
    assert coerce_to_address(["127.0.0.1", "8787"]) == "127.0.0.1:8787"
    assert coerce_to_address((b"127.0.0.1", 8787)) == "127.0.0.1:8787"
    assert coerce_to_address(rpc(ip="10.0.0.1", port=1)) == "10.0.0.1:1"
    assert coerce_to_address("[::1]:80") == "[::1]:80"
    for bad in [8787, None, "nohost", "127.0.0.1:notaport", ("a", 1, 2)]:
        with pytest.raises((TypeError, ValueError)):
            coerce_to_address(bad)


def test_coerce_to_address_of_a_server():
    async def main():
        s = Server({})
        s.listen(0)
        try:
            assert coerce_to_address(s) == s.address
            r = coerce_to_rpc(s)
            assert await r.ping() == b"pong"
            r.close_streams()
        finally:
            s.stop()

    run(main())


def test_coerce_to_rpc():
    r = rpc("127.0.0.1:1234")
    assert coerce_to_rpc(r) is r
    for form in ["127.0.0.1:1234", ("127.0.0.1", 1234), ["127.0.0.1", 1234]]:
        r2 = coerce_to_rpc(form)
        assert isinstance(r2, rpc)
        assert (r2.ip, r2.port) == ("127.0.0.1", 1234)
    assert coerce_to_rpc("127.0.0.1:1234", timeout=3).timeout == 3


def test_connect_to_closed_port():
    port = free_port()

    async def main():
        start = time.time()
        with pytest.raises(OSError):
            await connect("127.0.0.1", port)
        with pytest.raises(OSError):
            await rpc(ip="127.0.0.1", port=port).ping()
        assert time.time() - start < 3

    run(main())


@with_server()
async def test_yield_in_gen_coroutine(s):
    r = rpc(s.address)

    @gen.coroutine
    def f():
        a = yield r.add(x=1, y=2)
        b = yield r.gen_add(x=a, y=10)
        c = yield [r.echo(x=1), r.echo(x=2)]
        try:
            yield r.fail(x=0)
        except MyError:
            d = "raised"
        return a, b, c, d

    assert await f() == (3, 13, [1, 2], "raised")
    r.close_streams()


@with_server()
async def test_connect_read_write_building_blocks(s):
    stream = await connect(s.address)
    await write(stream, {"op": "add", "x": 1, "y": 2})
    assert await read(stream) == 3
    await write(stream, {"op": "echo", "x": b"\x00" * 100000})
    assert await read(stream) == b"\x00" * 100000
    stream.close()


# ---------------------------------------------------------------------------
# hostile peers on raw sockets


async def raw_connection(s):
    return await asyncio.open_connection("127.0.0.1", s.port)


async def closed_by_server(reader, timeout=5):
    data = await asyncio.wait_for(reader.read(), timeout)  # until EOF
    return data == b""


async def read_reply(reader, timeout=5):
    d = Decoder()
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            raise EOFError("connection closed")
        out = d.feed(chunk)
        if out:
            return out[0]


async def check_others_served(s):
    r = rpc(s.address)
    assert await r.add(x=1, y=2, timeout=5) == 3
    r.close_streams()


HOSTILE = {
    "garbage": b"\xde\xad\xbe\xef" * 64,
    "huge_length": struct.pack("<QQ", 1, 2**62) + b"x" * 100,
    "huge_count": struct.pack("<Q", 2**40),
    "zero_count": struct.pack("<Q", 0) + b"rest",
    "undecodable_header": frames_to_bytes([b"\xc1\xc1\xc1"]),
    "header_not_a_map": frames_to_bytes([msgpack.packb([1, 2, 3])]),
    "missing_frames": frames_to_bytes([msgpack.packb({"p": 3}), b"x"]),
}


@with_server()
async def test_unloadable_pickle_gets_an_error_reply(s):
    """Well-framed but unloadable (e.g. a class the server cannot import):
    the caller learns why, and the connection stays in step."""
    wire = frames_to_bytes([msgpack.packb({"d": {"op": "echo"}, "p": 0}),
                            b"\x80\x05garbage"])
    reader, writer = await raw_connection(s)
    writer.write(wire)
    await writer.drain()
    reply = await read_reply(reader)
    assert reply["status"] == "uncaught-error"
    assert "could not unpickle" in str(reply["exception"])
    writer.write(frames_to_bytes(dumps({"op": "echo", "x": 5})))
    await writer.drain()
    assert await read_reply(reader) == 5
    writer.close()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_closes_only_that_connection(name, caplog):
    async def main():
        s = Server(dict(HANDLERS))
        s.listen(0)
        try:
            good = rpc(s.address)
            assert await good.ping() == b"pong"
            reader, writer = await raw_connection(s)
            writer.write(HOSTILE[name])
            await writer.drain()
            assert await closed_by_server(reader)
            writer.close()
            # the well-behaved client, on its existing stream and a new one
            assert await good.add(x=1, y=1) == 2
            await check_others_served(s)
            await wait_for(lambda: len(s.streams) == 1)
            good.close_streams()
        finally:
            s.stop()

    with caplog.at_level(logging.ERROR, logger="distributed.core"):
        run(main())
    assert any("closing connection" in r.getMessage() for r in caplog.records)


@with_server()
async def test_truncated_frame_then_close(s):
    good = rpc(s.address)
    assert await good.ping() == b"pong"
    wire = frames_to_bytes(dumps({"op": "echo", "x": b"y" * 1000}))
    for cut in [3, 8, 20, len(wire) - 1]:
        reader, writer = await raw_connection(s)
        writer.write(wire[:cut])
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await wait_for(lambda: len(s.streams) == 1)
    assert await good.echo(x=1) == 1
    good.close_streams()


@with_server()
async def test_stalled_peer_does_not_block_others(s):
    wire = frames_to_bytes(dumps({"op": "echo", "x": b"y" * 1000}))
    reader, writer = await raw_connection(s)
    writer.write(wire[:20])  # and then nothing: the server waits for the rest
    await writer.drain()
    results = await asyncio.gather(*[rpc(s.address).add(x=i, y=i) for i in range(5)])
    assert results == [0, 2, 4, 6, 8]
    # the stalled peer may still finish its message and gets its reply
    writer.write(wire[20:])
    await writer.drain()
    assert await read_reply(reader) == b"y" * 1000
    writer.close()


@with_server()
async def test_non_dict_message_gets_error_reply(s):
    reader, writer = await raw_connection(s)
    for bad in [[1, 2], "ping", 5, {"no_op": 1}]:
        writer.write(frames_to_bytes(dumps(bad)))
        await writer.drain()
        reply = await read_reply(reader)
        assert reply["status"] == "uncaught-error"
        assert isinstance(reply["exception"], ValueError)
    # the connection is still open and usable
    writer.write(frames_to_bytes(dumps({"op": "ping"})))
    await writer.drain()
    assert await read_reply(reader) == b"pong"
    writer.close()
    await check_others_served(s)


@with_server()
async def test_client_dies_halfway_through_large_message(s):
    good = rpc(s.address)
    assert await good.ping() == b"pong"
    x = np.ones(2**20, dtype="f8")  # 8 MiB
    wire = frames_to_bytes(dumps({"op": "echo", "x": x}))
    reader, writer = await raw_connection(s)
    writer.write(wire[: len(wire) // 2])
    await writer.drain()
    # a concurrent client is served while the big message is half there
    assert await good.add(x=1, y=2) == 3
    writer.transport.abort()
    await wait_for(lambda: len(s.streams) == 1)
    assert await good.echo(x="still here") == "still here"
    # and a complete large message from someone else works afterwards
    out = await good.echo(x=x)
    np.testing.assert_array_equal(out, x)
    good.close_streams()


@with_server()
async def test_announced_frame_is_not_allocated_up_front(s):
    """A peer that announces a big frame (within limits) and sends little
    must not make the server commit that much memory before the data comes."""
    import psutil

    proc = psutil.Process()
    good = rpc(s.address)
    assert await good.ping() == b"pong"
    before = proc.memory_info().rss
    reader, writer = await raw_connection(s)
    writer.write(struct.pack("<QQQ", 2, 100, 2**30) + b"x" * 200)  # 1 GiB frame
    await writer.drain()
    await wait_for(lambda: len(s.streams) == 2)
    for _ in range(5):  # let the server read what was sent
        assert await good.ping() == b"pong"
    grown = proc.memory_info().rss - before
    writer.transport.abort()
    await wait_for(lambda: len(s.streams) == 1)
    assert grown < 2**28, "%d MiB committed for a frame not sent" % (grown // 2**20)
    assert await good.add(x=1, y=2) == 3
    good.close_streams()


@with_server()
async def test_limits_on_the_server(s):
    s.limits = protocol.Limits(max_message_size=10000)
    good = rpc(s.address)
    assert await good.echo(x=b"a" * 100) == b"a" * 100
    with pytest.raises((StreamClosedError, OSError)):
        await good.echo(x=b"a" * 20000, timeout=5)
    assert await good.echo(x=b"b" * 100) == b"b" * 100
    good.close_streams()


@with_server()
async def test_limits_on_the_client(s):
    small = rpc(s.address, limits=protocol.Limits(max_message_size=10000))
    with pytest.raises(protocol.FrameTooLarge):
        await small.echo(x=b"a" * 20000, timeout=5)  # the reply is too big
    assert small.pool.open == 0  # that stream was dropped, not reused
    assert await small.echo(x=b"b" * 100) == b"b" * 100
    small.close_streams()


@with_server()
async def test_large_array_roundtrip_writeable(s):
    x = np.arange(2**23, dtype="f8")  # 64 MiB
    r = rpc(s.address)
    out = await r.echo(x=x, timeout=30)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert np.array_equal(out, x)
    assert out.flags.writeable
    out[0] = 5  # really writeable
    assert x[0] == 0
    # nested in a structure too
    out2 = await r.echo(x={"a": [x[:100000], x[100000:200000]]})
    np.testing.assert_array_equal(out2["a"][1], x[100000:200000])
    r.close_streams()


@with_server()
async def test_stop_closes_connections(s):
    r = rpc(s.address)
    assert await r.ping() == b"pong"
    s.stop()
    await wait_for(lambda: not s.streams)
    with pytest.raises((StreamClosedError, OSError)):
        await r.ping(timeout=5)
    r.close_streams()


def test_comm_closed_error_on_server_death():
    """A server that dies mid-request gives CommClosedError, not a hang."""

    async def die(stream):
        stream.close()
        await asyncio.sleep(10)

    async def main():
        s = Server({"die": die})
        s.listen(0)
        try:
            r = rpc(s.address)
            with pytest.raises(CommClosedError):
                await r.die(timeout=5)
            assert await r.ping() == b"pong"
            r.close_streams()
        finally:
            s.stop()

    run(main())
