"""The internal message streams: the one read loop, and docs/internals.md's
table of every stream op."""

import asyncio
import logging
import os
import re
import socket

import pytest
from tornado.iostream import IOStream

from distributed import Center, Executor, Worker
from distributed.batched import close_stream, handle_batches
from distributed.core import write

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "internals.md")


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def documented_stream_ops():
    """The op column of the table in the "Messages" section."""
    with open(DOC) as f:
        text = f.read()
    section = text.split("\n## Messages\n", 1)[1].split("\n## ", 1)[0]
    header = "| op | sender | receiver | fields |"
    assert header in section
    ops = []
    for line in section.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        ops.append(re.match(r"\|\s*`([^`]+)`\s*\|", line).group(1))
    return ops


@pytest.mark.pure
def test_op_table_lists_every_stream_handler():
    async def f():
        center = Center()
        worker = Worker("127.0.0.1:8787")
        executor = Executor("127.0.0.1:8787", start=False)
        try:
            return (set(center.stream_handlers) | set(worker.stream_handlers)
                    | set(executor.stream_handlers))
        finally:
            await worker._close(report=False)

    handled = run(f())
    documented = documented_stream_ops()
    assert set(documented) == handled
    assert "client-desires-keys" not in handled  # nothing sends it


@pytest.mark.pure
def test_stream_ops_use_dashes_and_rpc_ops_the_contract_names():
    async def f():
        center = Center()
        worker = Worker("127.0.0.1:8787")
        try:
            return center, worker
        finally:
            await worker._close(report=False)

    center, worker = run(f())
    for node in (center, worker):
        assert all("_" not in op for op in node.stream_handlers), node.stream_handlers
    assert {"add_keys", "remove_keys", "who_has", "has_what", "ncores", "unregister",
            "register", "delete_data"} <= set(center.handlers)
    assert {"get_data", "update_data", "delete_data", "compute"} <= set(worker.handlers)


# -- the read loop, on an in-process socket pair ----------------------------


def stream_pair():
    a, b = socket.socketpair()
    return IOStream(a), IOStream(b)


async def read_until_done(reader, handlers, timeout=5, **kwargs):
    await asyncio.wait_for(handle_batches(reader, handlers, **kwargs), timeout)


def test_dispatch_with_extra():
    calls = []

    def finished(address, key, nbytes=None):
        calls.append(("finished", address, key, nbytes))

    def heartbeat(address):
        calls.append(("heartbeat", address))

    async def f():
        writer, reader = stream_pair()
        await write(writer, [{"op": "task-finished", "key": "x", "nbytes": 8},
                             {"op": "heartbeat"}])
        await write(writer, [{"op": "task-finished", "key": "y"}])
        writer.close()
        await read_until_done(reader, {"task-finished": finished, "heartbeat": heartbeat},
                              extra={"address": "w:1"})

    run(f())
    assert calls == [("finished", "w:1", "x", 8), ("heartbeat", "w:1"),
                     ("finished", "w:1", "y", None)]


def test_no_extra_and_a_peer_cannot_pass_for_another():
    calls = []

    async def f():
        writer, reader = stream_pair()
        await write(writer, [{"op": "add-keys", "address": "forged:1", "keys": ["x"]},
                             {"op": "add-keys", "keys": ["y"]}])
        writer.close()
        await read_until_done(reader, {"add-keys": lambda address, keys: calls.append(
            (address, keys))}, extra={"address": "w:1"})
        writer, reader = stream_pair()
        await write(writer, [{"op": "lost-data", "key": "z"}])
        writer.close()
        await read_until_done(reader, {"lost-data": lambda key: calls.append(key)})

    run(f())
    assert calls == [("w:1", ["y"]), "z"]


def test_unknown_op_is_logged_rate_limited_and_skipped(caplog):
    calls = []

    async def f():
        writer, reader = stream_pair()
        await write(writer, [{"op": "nope\nFAKE"}, {"op": "nope2"}, {"no": "op"}, 5,
                             {"op": ["unhashable"]}, {"op": "known"}])
        writer.close()
        await read_until_done(reader, {"known": lambda: calls.append(1)},
                              sender="worker 10.0.0.1:1")

    with caplog.at_level(logging.WARNING, logger="distributed.batched"):
        run(f())
    assert calls == [1]
    lines = [r.getMessage() for r in caplog.records if "unknown stream op" in r.getMessage()]
    assert len(lines) == 1, lines  # the others within the interval are counted, not logged
    assert "'nope\\\\nFAKE'" in lines[0] and "worker 10.0.0.1:1" in lines[0]
    assert "\n" not in lines[0]


def test_handler_exception_is_logged_and_the_loop_goes_on(caplog):
    calls = []

    def bad(key):
        raise ValueError("boom " + key)

    async def f():
        writer, reader = stream_pair()
        await write(writer, [{"op": "bad", "key": "x"}, {"op": "good", "key": "y"},
                             {"op": "good", "unexpected": "field"}])
        await write(writer, [{"op": "good", "key": "z"}])
        writer.close()
        await read_until_done(reader, {"bad": bad, "good": lambda key: calls.append(key)},
                              sender="client-1")

    with caplog.at_level(logging.ERROR, logger="distributed.batched"):
        run(f())
    assert calls == ["y", "z"]
    errors = [r for r in caplog.records if "error handling stream op" in r.getMessage()]
    assert len(errors) == 2
    assert "'bad'" in errors[0].getMessage() and "client-1" in errors[0].getMessage()
    assert "boom x" in str(errors[0].exc_info[1])


def test_awaitable_handlers_run_in_the_background(caplog):
    order = []
    release = None

    async def slow(key):
        await release.wait()
        order.append(("slow", key))

    async def failing():
        raise ValueError("async boom")

    async def f():
        nonlocal release
        release = asyncio.Event()
        writer, reader = stream_pair()
        await write(writer, [{"op": "slow", "key": "x"}, {"op": "fast"}, {"op": "failing"}])
        writer.close()
        await read_until_done(reader, {"slow": slow, "failing": failing,
                                       "fast": lambda: order.append("fast")})
        assert order == ["fast"]  # the loop did not wait for the slow one
        release.set()
        for _ in range(100):
            if len(order) == 2:
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="distributed.batched"):
        run(f())
    assert order == ["fast", ("slow", "x")]
    assert any("'failing'" in r.getMessage() for r in caplog.records)


def test_every_batch_runs_after_each_batch_and_can_stop_the_loop():
    seen = []
    batches = []

    def every_batch():
        batches.append(list(seen))
        if len(batches) == 2:
            return False  # e.g. the worker was removed meanwhile

    async def f():
        writer, reader = stream_pair()
        await write(writer, [{"op": "m", "i": 1}, {"op": "m", "i": 2}])
        await write(writer, [{"op": "m", "i": 3}])
        await write(writer, [{"op": "m", "i": 4}])
        await read_until_done(reader, {"m": lambda i: seen.append(i)},
                              every_batch=every_batch)
        assert not reader.closed()  # stopping the loop does not close the stream
        writer.close()
        reader.close()

    run(f())
    assert batches == [[1, 2], [1, 2, 3]]
    assert seen == [1, 2, 3]


def test_close_stream_ends_the_loop_after_its_batch():
    seen = []
    batches = []

    async def f():
        writer, reader = stream_pair()
        await write(writer, [{"op": "m", "i": 1}, {"op": "close-stream"}, {"op": "m", "i": 2}])
        await write(writer, [{"op": "m", "i": 3}])
        await read_until_done(reader, {"m": lambda client, i: seen.append(i),
                                       "close-stream": close_stream},
                              extra={"client": "c"}, every_batch=lambda: batches.append(1))
        assert not reader.closed()
        writer.close()
        reader.close()

    run(f())
    assert seen == [1]
    assert batches == [1]  # what the batch caused is still sent


def test_closed_stream_ends_the_loop():
    async def f():
        writer, reader = stream_pair()
        task = asyncio.ensure_future(handle_batches(reader, {}))
        await asyncio.sleep(0.05)
        assert not task.done()
        writer.close()
        await asyncio.wait_for(task, 5)

    run(f())


def test_a_batch_after_this_side_closed_the_stream_is_not_handled():
    seen = []

    async def f():
        writer, reader = stream_pair()

        def m(i):
            seen.append(i)
            reader.close()  # e.g. the center removed the worker

        await write(writer, [{"op": "m", "i": 1}])
        await write(writer, [{"op": "m", "i": 2}])
        await asyncio.sleep(0.05)  # both batches have arrived
        await read_until_done(reader, {"m": m})
        writer.close()

    run(f())
    assert seen == [1]


def test_protocol_error_is_logged_and_closes_the_stream(caplog):
    async def f():
        writer, reader = stream_pair()
        await writer.write(b"\xff" * 64)  # no valid frame count
        await read_until_done(reader, {}, sender="worker 10.0.0.2:1")
        assert reader.closed()
        writer.close()

    with caplog.at_level(logging.ERROR, logger="distributed.batched"):
        run(f())
    assert any("closing the stream of worker 10.0.0.2:1" in r.getMessage()
               for r in caplog.records)
