"""Worker handlers on in-process clusters (gen_cluster)."""

import asyncio
import json
import operator
import os
import sys
import threading
import time
import traceback
import types
import uuid

import numpy as np
import pandas as pd
import pytest
from tornado.httpclient import AsyncHTTPClient

from distributed.center import Center
from distributed.core import Server, rpc
from distributed.http import HTTPWorker
from distributed.sizeof import sizeof
from distributed.utils_test import (
    add,
    free_port,
    gen_cluster,
    inc,
    run,
    throws,
    wait_for,
)
from distributed.worker import Worker


# ---------------------------------------------------------------------------
# data


@gen_cluster(ncores=[1, 1])
async def test_get_data(c, a, b):
    a.data.update({"x": 1, ("y", 0): [1, 2]})
    r = rpc(a.address)
    assert await r.get_data(keys=["x", ("y", 0), "missing"]) == {"x": 1, ("y", 0): [1, 2]}
    assert await r.get_data(keys=[]) == {}
    r.close_streams()


@gen_cluster(ncores=[1, 1])
async def test_update_data(c, a, b):
    r = rpc(a.address)
    resp = await r.update_data(data={"x": 1, "y": b"abc"})
    assert resp == (b"OK", {"nbytes": {"x": sizeof(1), "y": 3}})
    assert a.data == {"x": 1, "y": b"abc"}
    assert c.who_has["x"] == {a.address}
    assert c.has_what[a.address] == {"x", "y"}
    assert c.nbytes["y"] == 3

    resp = await r.update_data(data={"z": 5}, report=False)
    assert resp[0] == b"OK"
    assert a.data["z"] == 5
    assert "z" not in c.who_has
    r.close_streams()


@gen_cluster(ncores=[1, 1])
async def test_delete_data(c, a, b):
    r = rpc(a.address)
    await r.update_data(data={"x": 1, "y": 2, "z": 3})
    assert await r.delete_data(keys=["x", "never"]) == b"OK"
    assert "x" not in a.data
    assert "x" not in c.who_has
    assert c.has_what[a.address] == {"y", "z"}
    assert await r.delete_data(keys=["y"], report=False) == b"OK"
    assert "y" not in a.data
    assert c.who_has["y"] == {a.address}  # the center was not told
    r.close_streams()


# ---------------------------------------------------------------------------
# compute


@gen_cluster(ncores=[1, 1])
async def test_compute_keys_only(c, a, b):
    await rpc(a.address).update_data(data={"x": 1})
    await rpc(b.address).update_data(data={"a": 10})
    resp, meta = await rpc(a.address).compute(function=operator.sub, keys=["x", "a"],
                                              key="z")
    assert resp == b"OK"
    assert a.data["z"] == 1 - 10  # function(x, a), in that order
    assert meta["key"] == "z"
    assert meta["nbytes"] == sizeof(-9)
    assert meta["type"] == "int"
    for t in ["compute_start", "compute_stop", "transfer_start", "transfer_stop"]:
        assert isinstance(meta[t], float)
    assert meta["compute_start"] <= meta["compute_stop"]
    # the input was fetched from b for this call only (SPEC, "Faithful
    # details"): a keeps the result, and the center lists just that
    assert "a" not in a.data
    assert c.who_has["a"] == {b.address}
    assert c.who_has["z"] == {a.address}
    assert c.nbytes["z"] == sizeof(-9)


def structure(lst, d, z=None, **kw):
    return lst, d, z, kw


@gen_cluster(ncores=[1, 1])
async def test_compute_nested_args(c, a, b):
    await rpc(a.address).update_data(data={"x": 1, ("t", 0): 5})
    await rpc(b.address).update_data(data={"y": 2})
    resp, meta = await rpc(a.address).compute(
        function=structure,
        key="out",
        args=(["x", ("x", "literal"), [("t", 0)]], {"k": "y", "n": ("y",)}),
        kwargs={"z": ["y", {"deep": ["x"]}], "other": "x"},
        needed=["x", "y", ("t", 0)],
    )
    assert resp == b"OK", meta
    lst, d, z, kw = a.data["out"]
    assert lst == [1, (1, "literal"), [5]]
    assert type(lst[1]) is tuple
    assert d == {"k": 2, "n": (2,)}
    assert z == [2, {"deep": [1]}]
    assert kw == {"other": 1}


@gen_cluster(ncores=[1, 1])
async def test_compute_literal_strings_are_not_keys(c, a, b):
    await rpc(a.address).update_data(data={"x": 1})
    resp, meta = await rpc(a.address).compute(function=structure, key="out",
                                              args=(["x", "y"], "x"), needed=["x"])
    assert resp == b"OK"
    assert a.data["out"][:2] == ([1, "y"], 1)


@gen_cluster(ncores=[1, 1])
async def test_compute_with_who_has_skips_center(c, a, b):
    await rpc(b.address).update_data(data={"x": 1, "y": 2})
    calls = []
    orig = c.handlers["who_has"]

    def counting_who_has(stream, **kwargs):
        calls.append(kwargs)
        return orig(stream, **kwargs)

    c.handlers["who_has"] = counting_who_has
    r = rpc(a.address)
    resp, meta = await r.compute(function=inc, args=("x",), who_has={"x": [b.address]},
                                 key="ix")
    assert resp == b"OK"
    assert a.data["ix"] == 2
    assert calls == []
    assert c.who_has["x"] == {b.address}  # borrowed, not kept
    # without who_has the center is asked (so the counter does count)
    resp, meta = await r.compute(function=inc, args=("y",), needed=["y"], key="iy")
    assert resp == b"OK" and a.data["iy"] == 3
    assert len(calls) == 1
    r.close_streams()


@gen_cluster(ncores=[1, 1])
async def test_compute_error(c, a, b):
    await rpc(a.address).update_data(data={"x": 1})
    resp, info = await rpc(a.address).compute(function=throws, keys=["x"], key="bad")
    assert resp == b"error"
    assert type(info["exception"]) is RuntimeError
    assert str(info["exception"]) == "hello!"
    tb = info["traceback"]
    assert isinstance(tb, types.TracebackType)
    names = [f.name for f in traceback.extract_tb(tb)]
    assert "throws" in names
    assert "bad" not in a.data
    assert "bad" not in c.who_has
    # the worker is fine afterwards
    resp, meta = await rpc(a.address).compute(function=inc, keys=["x"], key="good")
    assert resp == b"OK" and a.data["good"] == 2


class WeirdError(Exception):
    pass


def raise_weird(x):
    raise WeirdError(x)


@gen_cluster(ncores=[1])
async def test_compute_error_keeps_type(c, a):
    resp, info = await rpc(a.address).compute(function=raise_weird, args=(3,))
    assert resp == b"error"
    assert isinstance(info["exception"], WeirdError)
    assert info["exception"].args == (3,)
    assert "raise_weird" in [f.name for f in traceback.extract_tb(info["traceback"])]


@gen_cluster(ncores=[1, 1])
async def test_compute_missing_data(c, a, b):
    r = rpc(a.address)
    assert await r.compute(function=inc, keys=["nowhere"], key="k") == (
        b"missing-data", {"keys": ["nowhere"]})
    await rpc(b.address).update_data(data={"x": 1})
    resp, info = await r.compute(function=add, keys=["x", "nowhere"], key="k")
    assert resp == b"missing-data"
    assert info["keys"] == ["nowhere"]
    assert "k" not in a.data
    r.close_streams()


@gen_cluster(ncores=[1])
async def test_compute_generates_key(c, a):
    r = rpc(a.address)
    resp1, meta1 = await r.compute(function=inc, args=(1,))
    resp2, meta2 = await r.compute(function=inc, args=(1,))
    assert resp1 == resp2 == b"OK"
    assert meta1["key"] != meta2["key"]
    assert meta1["key"].startswith("inc")
    assert a.data[meta1["key"]] == 2
    assert c.who_has[meta1["key"]] == {a.address}
    r.close_streams()


@gen_cluster(ncores=[1])
async def test_compute_lambda_and_closure(c, a):
    n = 7
    resp, meta = await rpc(a.address).compute(function=lambda x: x * n, args=(6,), key="l")
    assert resp == b"OK"
    assert a.data["l"] == 42


# functions that run in the worker's threads refer to these by module
# (a closure over a lock would not pickle)
RELEASE = threading.Event()
BARRIER = threading.Barrier(2, timeout=5)


def blocked(x):
    RELEASE.wait(10)
    return x


def meet(i):
    BARRIER.wait()  # returns only when two threads wait at once
    return threading.get_ident()


@gen_cluster(ncores=[2])
async def test_active_during_compute(c, a):
    RELEASE.clear()
    fut = asyncio.ensure_future(rpc(a.address).compute(function=blocked, args=(1,),
                                                       key="slow"))
    try:
        await wait_for(lambda: "slow" in a.active)
        assert "slow" not in a.data
    finally:
        RELEASE.set()
    resp, meta = await fut
    assert resp == b"OK"
    assert a.active == set()
    assert a.data["slow"] == 1


@gen_cluster(ncores=[2])
async def test_thread_pool_has_ncores_threads(c, a):
    assert a.ncores == 2
    assert a.executor._max_workers == 2
    BARRIER.reset()
    r = rpc(a.address)
    (r1, m1), (r2, m2) = await asyncio.gather(
        r.compute(function=meet, args=(1,), key="m1"),
        r.compute(function=meet, args=(2,), key="m2"),
    )
    assert (r1, r2) == (b"OK", b"OK"), (m1, m2)
    assert a.data["m1"] != a.data["m2"]
    assert m1["thread"] != m2["thread"]
    r.close_streams()


# ---------------------------------------------------------------------------
# gather, peers that die


@gen_cluster(ncores=[1, 1])
async def test_gather(c, a, b):
    await rpc(b.address).update_data(data={"x": 1, "y": [2]})
    resp = await rpc(a.address).gather(who_has={"x": [b.address], "y": [b.address]})
    assert resp[0] == b"OK"
    assert set(resp[1]["nbytes"]) == {"x", "y"}
    assert a.data["x"] == 1 and a.data["y"] == [2]
    assert c.who_has["x"] == {a.address, b.address}

    resp = await rpc(a.address).gather(who_has={"nope": [b.address]})
    assert resp == (b"missing-data", {"keys": ["nope"]})


async def dying_peer():
    """A server whose get_data closes the connection mid-request."""
    asked = []

    async def get_data(stream, keys=()):
        asked.append(list(keys))
        stream.close()
        await asyncio.sleep(5)

    s = Server({"get_data": get_data})
    s.listen(0)
    return s, asked


@gen_cluster(ncores=[1, 1])
async def test_peer_dies_mid_transfer_falls_back(c, a, b):
    import distributed.worker

    await rpc(b.address).update_data(data={"x": 10})
    dead, asked = await dying_peer()
    orig = distributed.worker.random.choice
    # ask the dying peer first
    distributed.worker.random.choice = lambda seq: seq[0]
    try:
        resp, meta = await rpc(a.address).compute(
            function=inc, args=("x",), key="y",
            who_has={"x": [dead.address, b.address]})
    finally:
        distributed.worker.random.choice = orig
        dead.stop()
    assert asked == [["x"]]
    assert resp == b"OK", meta
    assert a.data["y"] == 11


@gen_cluster(ncores=[1, 1])
async def test_peer_dies_mid_transfer_missing(c, a, b):
    dead, asked = await dying_peer()
    try:
        resp = await rpc(a.address).compute(function=inc, args=("x",), key="y",
                                            who_has={"x": [dead.address]})
    finally:
        dead.stop()
    assert asked == [["x"]]
    assert resp == (b"missing-data", {"keys": ["x"]})
    assert "y" not in a.data and "x" not in a.data


@gen_cluster(ncores=[1, 1, 1])
async def test_closed_peer_falls_back_to_other_holder(c, a, b, d):
    await rpc(b.address).update_data(data={"x": 1})
    await rpc(d.address).update_data(data={"x": 1})
    b_address = b.address
    await b._close()
    resp, meta = await rpc(a.address).compute(
        function=inc, args=("x",), key="y", who_has={"x": [b_address, d.address]})
    assert resp == b"OK"
    assert a.data["y"] == 2
    # only the closed one: missing
    resp = await rpc(a.address).compute(function=inc, args=("z",), key="w",
                                        who_has={"z": [b_address]})
    assert resp == (b"missing-data", {"keys": ["z"]})


# ---------------------------------------------------------------------------
# numpy / pandas between workers


@gen_cluster(ncores=[1, 1])
async def test_numpy_pandas_between_workers(c, a, b):
    x = np.random.random((300, 400))  # ~1 MB: out-of-band frames
    small = np.arange(10, dtype="i2")
    df = pd.DataFrame({"a": np.arange(20000), "b": np.random.random(20000),
                       "c": ["s%d" % i for i in range(20000)]})
    await rpc(b.address).update_data(data={"x": x, "small": small, "df": df})
    assert c.nbytes["x"] == x.nbytes
    resp, meta = await rpc(a.address).compute(
        function=lambda x, small, df: (x.sum(), small.sum(), df.b.sum()),
        keys=["x", "small", "df"], key="sums")
    assert resp == b"OK", meta
    assert a.data["sums"] == (x.sum(), small.sum(), df.b.sum())
    # the inputs as a received them (it keeps results, not borrowed inputs)
    resp, meta = await rpc(a.address).compute(function=lambda *v: v,
                                              keys=["x", "small", "df"], key="moved")
    assert resp == b"OK", meta
    got_x, got_small, got_df = a.data["moved"]
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_small, small)
    pd.testing.assert_frame_equal(got_df, df)
    assert got_x is not x  # really moved through the network
    got = (await rpc(a.address).get_data(keys=["moved"]))["moved"]
    np.testing.assert_array_equal(got[0], x)
    pd.testing.assert_frame_equal(got[2], df)


# ---------------------------------------------------------------------------
# admin handlers


async def async_double(x):
    await asyncio.sleep(0)
    return 2 * x


@gen_cluster(ncores=[1])
async def test_run(c, a):
    r = rpc(a.address)
    assert await r.run(function=os.getpid) == os.getpid()
    assert await r.run(function=add, args=(1, 2)) == 3
    assert await r.run(function=add, args=(1,), kwargs={"y": 5}) == 6
    assert await r.run(function=async_double, args=(4,)) == 8
    with pytest.raises(ZeroDivisionError):
        await r.run(function=lambda: 1 / 0)
    with pytest.raises(TypeError):
        await r.run(function="not callable")
    r.close_streams()


@gen_cluster(ncores=[1])
async def test_health(c, a):
    h = await rpc(a.address).health()
    assert isinstance(h, dict)
    for k in ["time", "cpu", "memory"]:
        assert k in h
    assert abs(h["time"] - time.time()) < 60
    assert h["memory"] > 0
    assert any(k.startswith("disk") for k in h)
    assert any(k.startswith("network") for k in h)


@pytest.fixture
def clean_sys_path():
    path = list(sys.path)
    modules = set(sys.modules)
    yield
    sys.path[:] = path
    for m in set(sys.modules) - modules:
        if m.startswith("uploaded_"):
            del sys.modules[m]


def test_upload_file(clean_sys_path):
    name = "uploaded_%s" % uuid.uuid4().hex

    @gen_cluster(ncores=[1])
    async def t(c, a):
        r = rpc(a.address)
        resp = await r.upload_file(filename=name + ".py",
                                   data=b"def f():\n    return 123\n")
        assert resp == {"nbytes": len(b"def f():\n    return 123\n")}
        assert os.path.exists(os.path.join(a.local_dir, name + ".py"))

        def use():
            import importlib
            return importlib.import_module(name).f()

        assert await r.run(function=use) == 123
        # uploading a new version replaces the old one
        await r.upload_file(filename=name + ".py", data="def f():\n    return 456\n")
        assert await r.run(function=use) == 456
        with pytest.raises(ValueError):
            await r.upload_file(filename="../evil.py", data=b"x = 1")
        assert not os.path.exists(os.path.join(os.path.dirname(a.local_dir), "evil.py"))

    t()


def test_local_dir(tmp_path):
    async def main():
        w = Worker("127.0.0.1", free_port(), ip="127.0.0.1", ncores=1)
        assert os.path.isdir(w.local_dir)
        w2 = Worker("127.0.0.1", free_port(), ip="127.0.0.1", ncores=1,
                    local_dir=str(tmp_path / "sub"))
        assert os.path.isdir(w2.local_dir)
        assert os.path.dirname(w2.local_dir) == str(tmp_path / "sub")
        assert w.local_dir != w2.local_dir
        await w._close()
        await w2._close()
        assert not os.path.exists(w.local_dir)
        assert not os.path.exists(w2.local_dir)
        assert os.path.isdir(tmp_path / "sub")  # the user's directory stays

    run(main())


@gen_cluster(ncores=[1])
async def test_local_dir_removed_by_close(c, a):
    assert os.path.isdir(a.local_dir)
    with open(os.path.join(a.local_dir, "spill"), "wb") as f:
        f.write(b"x" * 100)
    await a._close()
    assert not os.path.exists(a.local_dir)


@gen_cluster(ncores=[2])
async def test_identity_and_attributes(c, a):
    ident = await rpc(a.address).identity()
    assert ident["type"] == "Worker"
    assert ident["center"] == (c.ip, c.port)
    assert ident["id"] == a.id
    assert (a.center.ip, a.center.port) == (c.ip, c.port)
    assert a.address == "%s:%d" % (a.ip, a.port)
    assert a.ncores == 2
    assert await rpc(a.address).ping() == b"pong"


@gen_cluster(ncores=[1], services={"http": HTTPWorker})
async def test_http_service(c, a):
    port = a.service_ports["http"]
    assert isinstance(port, int) and port > 0
    assert a.services["http"].port == port
    assert c.worker_services[a.address] == {"http": port}
    await rpc(a.address).update_data(data={"x": 1, ("y", 1): 2})
    client = AsyncHTTPClient()
    resp = await client.fetch("http://%s:%d/info.json" % (a.ip, port))
    info = json.loads(resp.body)
    assert info["address"] == a.address
    assert info["ncores"] == 1
    assert sorted(info["keys"]) == sorted(["x", str(("y", 1))])
    assert info["center"] == c.address
    resp = await client.fetch("http://%s:%d/resources.json" % (a.ip, port))
    res = json.loads(resp.body)
    assert res["memory"] > 0 and "cpu" in res


@gen_cluster(ncores=[1, 1])
async def test_terminate(c, a, b):
    assert await rpc(b.address).terminate() == b"OK"
    await wait_for(lambda: b.address not in c.ncores)
    await wait_for(lambda: b.status == "closed")
    assert a.address in c.ncores


def test_start_without_center_times_out():
    async def main():
        w = Worker("127.0.0.1", free_port(), ip="127.0.0.1", ncores=1)
        start = time.time()
        try:
            with pytest.raises(TimeoutError, match="center"):
                await w._start(timeout=1)
            assert time.time() - start < 4
        finally:
            await w._close(report=False)

    run(main())


def test_start_waits_for_late_center():
    async def main():
        port = free_port()
        w = Worker("127.0.0.1", port, ip="127.0.0.1", ncores=1)
        task = asyncio.ensure_future(w._start(timeout=10))
        await asyncio.sleep(0.2)  # the worker is retrying now
        assert not task.done()
        c = Center("127.0.0.1")
        c.listen(port)
        try:
            await asyncio.wait_for(task, 10)
            assert w.address in c.ncores
        finally:
            await w._close()
            c.close()

    run(main())


def test_worker_await_form():
    async def main():
        c = Center("127.0.0.1")
        c.listen(0)
        w = Worker(c.address, ip="127.0.0.1", ncores=1)  # 'ip:port' form
        try:
            assert await w is w
            assert c.ncores == {w.address: 1}
        finally:
            await w._close()
            c.close()

    run(main())


@gen_cluster(ncores=[1])
async def test_worker_announcing_a_memory_exit_does_not_reconnect(center, w):
    """Between announcing its memory exit (which closes its stream) and
    exiting, the worker does not register again: the center would give the
    new registration the tasks it just rescheduled, and the exit would then
    count against them (KilledWorker with ``--allowed-failures 0``)."""
    w.memory.terminate = lambda rss: None  # no os._exit here
    await asyncio.get_running_loop().run_in_executor(None, w.memory._announce_exit, "data")
    await asyncio.sleep(0.5)
    assert w.address not in center.ncores
    assert w.status == "exiting"


def test_secede_starts_a_thread_though_the_pool_thinks_one_is_idle():
    """A 1-thread pool that ran tasks counts its busy thread as idle; a task
    seceding must still get another thread (else it waits forever)."""
    from concurrent.futures import ThreadPoolExecutor

    from distributed.worker import Worker

    class Fake:  # the two attributes secede/rejoin use
        executor = ThreadPoolExecutor(1)
        _secede_lock = threading.Lock()
        secede = Worker.secede
        rejoin = Worker.rejoin

    w = Fake()
    for f in [w.executor.submit(int) for _ in range(5)]:
        f.result()

    def waiter():
        w.secede()
        try:
            return w.executor.submit(lambda: 42).result(timeout=5)
        finally:
            w.rejoin()

    try:
        assert w.executor.submit(waiter).result(timeout=10) == 42
        assert w.executor._max_workers == 1  # back to its cores
    finally:
        w.executor.shutdown()
