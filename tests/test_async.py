"""The Executor from coroutines: ``asynchronous=True`` (``start=False``), the
awaitable public methods, the underscore coroutine twins, and the forms
code written against the 2016 API uses (one address, one future).

The cluster is the module's ``cluster`` fixture (real center and worker
processes, see conftest.py); each test drives its coroutine with
``utils_test.run`` (``asyncio.run`` with a timeout), as the async tests of
tests/test_executor.py do.  Its worker processes import this module.
"""

import asyncio
import os
import threading
import time

import pytest
from tornado import gen

from distributed import CancelledError, Executor, futures_of, wait
from distributed.executor import _wait
from distributed.utils_test import inc, run, slowinc, throws

pytestmark = pytest.mark.processes


# functions the workers run (importable there: tests/ is on their path)


def slow_throw(delay):
    time.sleep(delay)
    raise ValueError("late error %s" % delay)


def add_one_to(path):
    with open(path) as f:
        return int(f.read()) + 1


# ---------------------------------------------------------------------------
# asynchronous=True: the public methods return awaitables


def test_asynchronous_public_methods_are_awaitable(cluster):
    async def main():
        e = await Executor(cluster.center_address, asynchronous=True)
        try:
            assert e.asynchronous and e.status == "running"
            x = e.submit(inc, 1)  # a future at once, as in the blocking mode
            assert x.key.startswith("inc-")
            assert await x == 2
            assert await x.result() == 2
            assert await e.gather([x, e.submit(inc, x)]) == [2, 3]
            assert await e.gather(e.map(inc, range(3))) == [1, 2, 3]
            s = await e.scatter([10, 20])
            assert await e.gather(s) == [10, 20]
            one = await e.scatter(5)
            assert await one == 5
            ncores = await e.ncores()
            assert len(ncores) == 2
            assert await e.nthreads() == ncores
            who = await e.who_has(x)
            assert list(who) == [x.key] and who[x.key][0] in ncores
            has = await e.has_what()
            assert x.key in has[who[x.key][0]]
            pids = await e.run(os.getpid)
            assert set(pids) == set(ncores) and len(set(pids.values())) == 2
            assert len((await e.scheduler_info())["workers"]) == 2
            await e.wait_for_workers(2, timeout=5)
            assert await e.get({"a": (inc, 1), "b": (inc, "a")}, "b") == 3
            assert await e.compute({"c": (inc, 41)}, sync=True) == {"c": 42}
            await e.replicate([x])
            assert len((await e.who_has([x]))[x.key]) == 2
            await e.rebalance()
            info = await e.cluster_info()
            assert info["workers"] == 2
            assert isinstance(await e.story(x), list)
        finally:
            await e.shutdown()
        assert e.status == "closed"
        # closed twice: still awaitable, a no-op
        await e.close()

    run(main(), timeout=40)


def test_async_with_and_the_2016_spelling(cluster):
    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            assert await e.submit(inc, 10) == 11
        assert e.status == "closed"
        with pytest.raises(TypeError, match="async with"):
            with Executor(cluster.center_address, asynchronous=True):
                pass
        # start=False is the same executor: awaitable methods too
        e = Executor(cluster.center_address, start=False)
        assert e.asynchronous
        await e._start()
        try:
            f = e.submit(inc, 20)
            assert await e.gather(f) == 21
            assert await e._gather(f) == 21
        finally:
            await e._shutdown()
        assert e.status == "closed"

    run(main())


def test_made_before_its_loop_runs(cluster):
    # made in plain code, started by the loop that asyncio.run makes later:
    # it runs on that loop
    e = Executor(cluster.center_address, asynchronous=True)
    assert e.status == "created"

    async def main():
        await e
        assert e._asyncio_loop is asyncio.get_running_loop()
        try:
            return await e.submit(inc, 1), await e.ncores()
        finally:
            await e.close()

    result, ncores = run(main())
    assert result == 2 and len(ncores) == 2 and e.status == "closed"


def test_upload_file_awaitable(cluster, tmp_path):
    module = "async_upload_%d" % os.getpid()
    path = tmp_path / (module + ".py")
    path.write_text("def triple(x):\n    return 3 * x\n")

    def use(x):
        import importlib

        return importlib.import_module(module).triple(x)

    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            nbytes = await e.upload_file(str(path))
            assert set(nbytes) == set(await e.ncores())
            assert set(nbytes.values()) == {len(path.read_bytes())}
            assert await e.submit(use, 5, pure=False) == 15
            again = await e._upload_file(str(path))
            assert again == nbytes

    run(main())


def test_cancel_and_retry_act_at_once(cluster, tmp_path):
    # cancel/retry only send messages: they act when called, and what they
    # return may be awaited (dask's habit) or dropped (the 2016 habit)
    path = tmp_path / "n"

    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            x = e.submit(slowinc, 1, delay=2)
            e.cancel(x)  # not awaited
            assert x.cancelled()
            with pytest.raises(CancelledError):
                await x
            y = e.submit(slowinc, 2, delay=2)
            assert await e.cancel([y]) is None
            assert y.cancelled()
            z = e.submit(add_one_to, str(path), pure=False)  # no file yet: erred
            with pytest.raises(FileNotFoundError):
                await z
            path.write_text("41")
            await z.retry()
            assert await z == 42

    run(main())


def test_blocking_from_another_thread(cluster):
    # an asynchronous executor's future used from a thread with no event
    # loop (a done-callback, a thread of the user's) blocks there, as a
    # threaded executor's would, while the loop runs the work
    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            x = e.submit(slowinc, 1, delay=0.2)
            loop = asyncio.get_running_loop()
            threads = []

            def in_thread():
                threads.append(threading.current_thread())
                return x.result(timeout=10), e.gather([x]), e.ncores()

            result, gathered, ncores = await loop.run_in_executor(None, in_thread)
            assert threads[0] is not threading.main_thread()
            assert (result, gathered, len(ncores)) == (2, [2], 2)

            seen = []
            done = asyncio.Event()

            def callback(future):  # runs in the executor's callback thread
                seen.append(future.result())
                loop.call_soon_threadsafe(done.set)

            e.submit(inc, 100).add_done_callback(callback)
            await asyncio.wait_for(done.wait(), 10)
            assert seen == [101]

    run(main())


def test_no_address_starts_a_local_cluster_and_restarts_it():
    async def main():
        async with Executor(asynchronous=True, n_workers=1) as e:
            assert e.cluster is not None
            assert e.address == e.cluster.center_address
            assert await e.submit(inc, 1) == 2
            (pid,) = (await e.run(os.getpid)).values()
            x = e.submit(inc, 2)
            await x
            await e.restart()
            assert x.cancelled()
            (new_pid,) = (await e.run(os.getpid)).values()
            assert new_pid != pid
            assert await e.submit(inc, 3) == 4
            cluster = e.cluster
        assert e.status == "closed" and cluster.status == "closed"

    run(main(), timeout=90)


# ---------------------------------------------------------------------------
# dask collections


def test_await_compute_and_persisted_collections(cluster):
    da = pytest.importorskip("dask.array")
    dask = pytest.importorskip("dask")

    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            # compute gives a future; awaiting it gives the value
            assert await e.compute(dask.delayed(inc)(1)) == 2
            x = da.arange(100, chunks=10)
            assert await e.compute(x.sum()) == sum(range(100))
            assert await e.compute(x.sum(), sync=True) == sum(range(100))
            # a persisted collection is awaitable (dask's __await__ uses our
            # futures_of and wait): it comes back once its futures are done
            y = e.persist((x + 1).map_blocks(slowinc, delay=0.1, dtype=int))
            futures = futures_of(y)
            assert len(futures) == 10
            assert not all(f.done() for f in futures)
            z = await y
            assert z is y and all(f.status == "finished" for f in futures)
            # and wait / gather take it too
            (y2,) = e.persist([x * 2])  # a list, as in dask: not awaitable
            done, not_done = await wait(y2)
            assert len(done) == 10 and not not_done
            parts = await e.gather(futures_of(y2))
            assert sum(int(p.sum()) for p in parts) == 2 * sum(range(100))
            assert await e.compute(y2.sum()) == 2 * sum(range(100))
            first = await e.get(y.__dask_graph__(), y.__dask_keys__()[0])
            assert list(first) == list(range(2, 12))  # slowinc(x + 1), x = 0..9

    run(main(), timeout=40)


# ---------------------------------------------------------------------------
# 2016 API: the underscore twins, futures' _result/_exception/_traceback


def test_underscore_twins_exist_and_are_coroutines(cluster):
    names = ["_start", "_shutdown", "_close", "_gather", "_scatter", "_upload_file",
             "_restart", "_who_has", "_has_what", "_ncores", "_nthreads", "_run",
             "_replicate", "_rebalance", "_cancel", "_retry", "_get", "_compute",
             "_persist", "_scheduler_info", "_wait_for_workers", "_story",
             "_get_worker_logs", "_get_center_logs", "_cluster_info"]
    for name in names:
        assert asyncio.iscoroutinefunction(getattr(Executor, name)), name
    # every public method that talks to the cluster has its twin
    public = [n for n in dir(Executor) if not n.startswith("_")
              and callable(getattr(Executor, n))]
    local = {"submit", "map", "sync", "shutdown", "close"}
    missing = [n for n in public if n not in local and not hasattr(Executor, "_" + n)]
    assert not missing, missing

    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            x = e.submit(inc, 1)
            assert await e._gather([x]) == [2]
            (s,) = await e._scatter([7])
            assert await e._who_has(s) == await e.who_has([s])
            address = (await e._who_has(s))[s.key][0]
            assert s.key in (await e._has_what(address))[address]
            assert await e._ncores(address) == {address: 1}
            assert await e._run(os.getpid, workers=address) == await e.run(
                os.getpid, workers=[address])
            assert await e._get({"a": (inc, 1)}, "a") == 2

    run(main())


def test_future_underscore_methods_wait_for_the_task(cluster):
    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            f = e.submit(slow_throw, 0.5)
            assert f.status == "pending"
            exc = await f._exception()  # waits: not None while pending
            assert isinstance(exc, ValueError) and "late error 0.5" in str(exc)
            tb = await f._traceback()
            assert tb is not None and tb.tb_frame is not None
            g = e.submit(slow_throw, 0.4)
            assert isinstance(await g.exception(), ValueError)
            assert await e.submit(slow_throw, 0.3).traceback() is not None
            ok = e.submit(slowinc, 1, delay=0.3)
            assert await ok._exception() is None
            assert await ok._traceback() is None
            assert ok.status == "finished"
            assert await ok._result() == 2
            slow = e.submit(slowinc, 2, delay=2)
            with pytest.raises(TimeoutError):
                await slow._exception(timeout=0.1)
            with pytest.raises(TimeoutError):
                await slow.result(timeout=0.1)

    run(main())


def test_wait_one_future(cluster):
    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as e:
            f = e.submit(slowinc, 1, delay=0.3)
            done, not_done = await _wait(f)  # as wait(f) takes it
            assert done == {f} and not not_done and f.done()
            g = e.submit(slowinc, 2, delay=0.3)
            done, not_done = await wait(g)
            assert done == {g}
            done, _ = await _wait({"a": [e.submit(inc, 5)]})
            assert len(done) == 1
            assert await _wait([]) == (set(), set())

    run(main())


def test_as_completed_async_for(cluster, e):
    from distributed import as_completed

    async def main():
        async with Executor(cluster.center_address, asynchronous=True) as ae:
            # listed first, done last: it needs the other one's result
            fast = ae.submit(inc, 1, pure=False)
            slow = ae.submit(slowinc, fast, delay=0.3)
            order = [f async for f in as_completed([slow, fast])]
            assert order == [fast, slow]
            pairs = [p async for p in as_completed(ae.map(inc, range(5)),
                                                   with_results=True)]
            assert sorted(r for _, r in pairs) == [1, 2, 3, 4, 5]
            assert all(f.key.startswith("inc-") for f, _ in pairs)
            assert [f async for f in as_completed([])] == []
        # a threaded executor's futures, in a coroutine on another loop
        threaded = e.map(inc, range(10, 13))
        results = [r async for _, r in as_completed(threaded, with_results=True)]
        assert sorted(results) == [11, 12, 13]

    run(main())


def test_await_a_threaded_executors_future_on_another_loop(e):
    # Jupyter's top-level `await future` with a normal executor: its loop
    # runs the wait, the caller's loop awaits the outcome
    async def main():
        x = e.submit(slowinc, 1, delay=0.3)
        assert not x.done()
        assert await x == 2
        with pytest.raises(RuntimeError, match="hello!"):
            await e.submit(throws, 1)
        y = e.submit(slowinc, 2, delay=2)
        y.cancel()
        with pytest.raises(CancelledError):
            await y

    run(main())


def test_tornado_coroutine_with_yield(cluster):
    @gen.coroutine
    def main():
        e = yield Executor(cluster.center_address, asynchronous=True)
        try:
            x = e.submit(inc, 1)
            result = yield x
            results = yield e.gather([x, e.submit(inc, x)])
            (s,) = yield e.scatter([3])
            who = yield e._who_has(s)
            exc = yield e.submit(throws, 1)._exception()
            yield e.cancel(x)
        finally:
            yield e.shutdown()
        return result, results, list(who), type(exc), x.cancelled(), e.status

    async def drive():
        return await main()

    result, results, who, exc_type, cancelled, status = run(drive())
    assert (result, results) == (2, [2, 3])
    assert len(who) == 1 and who[0].startswith("int-")
    assert exc_type is RuntimeError and cancelled and status == "closed"


# ---------------------------------------------------------------------------
# the blocking executor: one address, one future


def test_one_address_or_future_blocking(e):
    x = e.submit(inc, 1)
    x.result()
    ncores = e.ncores()
    a, b = sorted(ncores)
    # one address, not the characters of a string
    assert e.ncores(a) == {a: 1}
    assert e.nthreads(b) == {b: 1}
    from distributed.core import parse_address

    assert e.ncores(parse_address(a)) == {a: 1}  # (ip, port)
    assert e.ncores((a, b)) == ncores  # a tuple of addresses
    holder = e.who_has(x)[x.key][0]
    assert x.key in e.has_what(holder)[holder]
    assert list(e.has_what(holder)) == [holder]
    assert list(e.run(os.getpid, workers=a)) == [a]
    logs = e.get_worker_logs(n=1, workers=b)
    assert list(logs) == [b]
    assert wait(x).done == {x}

    async def blocking_on_its_own_loop():
        return e.ncores()

    with pytest.raises(RuntimeError, match="await"):
        e.sync(blocking_on_its_own_loop)

