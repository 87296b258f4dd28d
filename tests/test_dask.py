"""dask collections on the cluster, the way dask users call it (issue 11 §1):
the Executor as dask's default scheduler, ``persist``/``compute`` through
dask, collections wherever futures go, scheduling keywords (``priority=``,
``retries=``), tasks that submit tasks, and the small dask-named helpers.

Real clusters: the module's ``cluster`` (two single-threaded workers in
subprocesses) and an ``e`` per test, from conftest.py.  The functions below
are imported by the workers (tests/ is on their path).
"""

import asyncio
import io
import os
import sys
import time

import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

import dask.config  # noqa: E402

from distributed import (  # noqa: E402
    Executor,
    as_completed,
    fire_and_forget,
    futures_of,
    get_executor,
    get_worker,
    progress,
    wait,
)
from distributed.progress import TextProgressBar  # noqa: E402
from distributed.scheduler import VALIDATE_ENV  # noqa: E402
from distributed.process import popen, wait_for_line  # noqa: E402
from distributed.utils_test import inc, local_cluster, poll, slowinc, uid  # noqa: E402

pytestmark = pytest.mark.processes

#: the center validates its scheduler after every batch (the e fixture checks)
CLUSTER_ENV = {VALIDATE_ENV: "1"}


# ---------------------------------------------------------------------------
# functions the workers run


def worker_pid(_=None):
    return os.getpid()


def worker_address():
    return get_worker().address


def flaky(path, fails):
    """Raise the first ``fails`` times (counted in the file ``path``)."""
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        n = len(f.read())
    if n <= fails:
        raise ZeroDivisionError("attempt %d" % n)
    return n


def runs(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.read())


def stamp(x, delay=0.05):
    """Sleep ``delay``; return ``(x, time it finished)``."""
    time.sleep(delay)
    return x, time.time()


def submit_and_gather(n):
    """In a task: submit ``n`` subtasks to this very worker and wait for them."""
    e = get_executor()
    here = get_worker().address
    futures = e.map(inc, range(n), workers=[here], pure=False)
    return sum(e.gather(futures)), here


def span(x, delay):
    """``(start, stop)`` of a ``delay`` s sleep."""
    start = time.time()
    time.sleep(delay)
    return start, time.time()


def touch_later(path, delay):
    time.sleep(delay)
    with open(path, "w") as f:
        f.write("done")
    return path


@pytest.fixture
def tmpfile(tmp_path):
    return str(tmp_path / ("calls-%s" % uid()))


# ---------------------------------------------------------------------------
# 1. persist / compute through dask


def test_persist_with_scheduler_get(e):
    x = da.arange(100, chunks=10) * 2
    y = x.persist(scheduler=e.get)
    assert type(y) is type(x)
    futures = futures_of(y)
    assert len(futures) == 10 and all(f.executor is e for f in futures)
    assert y.sum().compute(scheduler=e.get) == 9900


def test_dask_persist_with_scheduler_get(e):
    x = da.arange(50, chunks=10)
    (y, z) = dask.persist(x + 1, x * 3, scheduler=e.get)
    assert len(futures_of(y)) == 5 and len(futures_of(z)) == 5
    assert int(y.sum().compute()) == sum(range(1, 51))
    assert int(z.sum().compute()) == 3 * sum(range(50))


def test_persist_through_dask_config(e):
    x = da.arange(40, chunks=10)
    with dask.config.set(scheduler=e.get):
        y = x.persist()
        assert len(futures_of(y)) == 4
        assert y.sum().compute() == sum(range(40))


def test_persist_keeps_optimize_graph_false(e):
    x = da.arange(20, chunks=5) + 1
    (y,) = dask.persist(x, scheduler=e.get, optimize_graph=False)
    assert len(futures_of(y)) == 4
    assert y.sum().compute() == sum(range(1, 21))


def test_scheduler_is_the_executor_itself(e):
    x = da.arange(30, chunks=10)
    assert dask.compute(x.sum(), scheduler=e) == (sum(range(30)),)
    (y,) = dask.persist(x, scheduler=e)
    assert len(futures_of(y)) == 3
    # an executor called is its get
    assert e({"a": (inc, 1), "b": (inc, "a")}, "b") == 3


# ---------------------------------------------------------------------------
# 2. the executor is dask's default scheduler while it runs


def test_plain_compute_runs_on_the_workers(e):
    assert dask.config.get("scheduler").__self__ is e
    pids = set(e.run(worker_pid).values())
    pid = dask.delayed(worker_pid)().compute()
    assert pid in pids and pid != os.getpid()
    assert dask.delayed(worker_address)().compute() in e.ncores()
    x = da.arange(100, chunks=10)
    assert x.sum().compute() == 4950
    y = x.persist()  # through Executor.persist: futures, not numpy arrays
    assert len(futures_of(y)) == 10


def test_shutdown_restores_the_scheduler_before(cluster):
    address = cluster.center_address
    with dask.config.set(scheduler="sync"):
        e1 = Executor(address)
        e2 = Executor(address)
        try:
            assert dask.config.get("scheduler").__self__ is e2
            e2.shutdown()
            assert dask.config.get("scheduler").__self__ is e1
            assert dask.delayed(worker_pid)().compute() != os.getpid()
        finally:
            e2.shutdown()
            e1.shutdown()
        assert dask.config.get("scheduler") == "sync"
        assert dask.delayed(worker_pid)().compute() == os.getpid()
        # shut down out of order: the latest stays the default until it closes
        e1 = Executor(address)
        e2 = Executor(address)
        e1.shutdown()
        assert dask.config.get("scheduler").__self__ is e2
        e2.shutdown()
        assert dask.config.get("scheduler") == "sync"


def test_set_as_default_false_and_the_users_own_setting(cluster):
    before = dask.config.get("scheduler", None)
    with Executor(cluster.center_address, set_as_default=False):
        assert dask.config.get("scheduler", None) == before
        assert dask.delayed(worker_pid)().compute() == os.getpid()
    e = Executor(cluster.center_address)
    try:
        dask.config.set(scheduler="threads")  # the user's choice, made later
        e.shutdown()
        assert dask.config.get("scheduler") == "threads"  # left alone
    finally:
        e.shutdown()
        if before is None:
            dask.config.config.pop("scheduler", None)
        else:
            dask.config.set(scheduler=before)


# ---------------------------------------------------------------------------
# 3. collections wherever futures go; progress of a graph


def test_wait_on_a_persisted_collection(e):
    x = da.from_delayed(dask.delayed(slowinc, pure=False)(1, delay=0.5), shape=(), dtype=int)
    y = (x + da.arange(10, chunks=5)).persist()
    futures = futures_of(y)
    assert futures and not all(f.done() for f in futures)
    done, not_done = wait(y)
    assert len(done) == len(futures) and not not_done
    assert all(f.status == "finished" for f in futures)


def test_progress_of_a_persisted_collection(e):
    start = time.time()
    y = da.from_delayed(dask.delayed(slowinc, pure=False)(1, delay=1), shape=(), dtype=int)
    y = (y + da.arange(10, chunks=5)).persist()
    futures = futures_of(y)
    assert len(futures) == 2 and not any(f.done() for f in futures)
    out = io.StringIO()
    progress(y, file=out, interval=0.05)
    assert all(f.done() for f in futures)
    assert time.time() - start > 0.9  # it waited for the task
    assert "100% Completed" in out.getvalue()


def test_as_completed_takes_collections_and_gives_results(e):
    y = (da.arange(30, chunks=10) + 1).persist()
    pairs = list(as_completed(y, with_results=True))
    assert len(pairs) == 3
    assert sorted(int(r.sum()) for _, r in pairs) == [55, 155, 255]
    assert all(f.done() for f, _ in pairs)


def test_progress_counts_the_tasks_of_a_compute(e):
    parts = [dask.delayed(slowinc)(i, delay=0.3) for i in range(8)]
    total = dask.delayed(sum)(parts)
    f = e.compute(total)
    bar = TextProgressBar([f], file=io.StringIO())
    seen = set()
    deadline = time.time() + 30
    while not f.done() and time.time() < deadline:
        done, _, n = bar.counts()
        seen.add(done)
        time.sleep(0.05)
    assert f.result() == sum(range(1, 9))
    assert n >= 9  # the tasks of the graph, not one future
    assert bar.counts() == (n, 0, n)
    assert any(0 < d < n for d in seen)  # parts done while the sum was pending


# ---------------------------------------------------------------------------
# 4. scheduling keywords


def test_retries_submit(e, tmpfile):
    assert e.submit(flaky, tmpfile, 2, retries=2, pure=False).result() == 3
    assert runs(tmpfile) == 3
    os.remove(tmpfile)
    f = e.submit(flaky, tmpfile, 5, retries=1, pure=False)
    with pytest.raises(ZeroDivisionError, match="attempt 2"):
        f.result()
    assert runs(tmpfile) == 2


def test_retries_map_and_compute(e, tmp_path):
    paths = [str(tmp_path / ("m%d" % i)) for i in range(3)]
    assert e.gather(e.map(flaky, paths, [1] * 3, retries=1)) == [2, 2, 2]
    path = str(tmp_path / "c")
    x = dask.delayed(flaky)(path, 2)
    assert e.compute(x, retries=2).result() == 3
    path2 = str(tmp_path / "d")
    assert dask.delayed(flaky)(path2, 1).compute(retries=1) == 2  # via dask


def test_priority_runs_higher_first(e):
    w = sorted(e.ncores())[0]
    blocker = e.submit(stamp, "blocker", 0.5, workers=[w], pure=False)
    low = e.map(stamp, range(20), [0.05] * 20, workers=[w], pure=False)
    high = e.submit(stamp, "high", 0.05, workers=[w], priority=10, pure=False)
    results = e.gather([blocker, high] + low)
    finished_high = results[1][1]
    low_before = sum(1 for _, t in results[2:] if t < finished_high)
    # only those already sent to the worker before `high` came can precede it
    assert low_before <= 8, low_before
    assert sum(1 for _, t in results[2:] if t > finished_high) >= 12


def test_priority_of_compute_and_graphs(e):
    x = dask.delayed(inc)(1)
    assert e.compute(x, priority=5).result() == 2
    assert e.get({"a": (inc, 1)}, "a", priority=-1) == 2


def test_resources_one_gpu_at_a_time(tmp_path):
    with local_cluster(CLUSTER_ENV, n_workers=1, threads_per_worker=3,
                       worker_options={"resources": {"GPU": 1, "MEM": 10e9}}) as c, \
            Executor(c.center_address, set_as_default=False) as e:
        [w] = e.scheduler_info()["workers"].values()
        assert w["resources"] == {"GPU": 1.0, "MEM": 1e10}
        fs = e.map(span, range(3), [0.3] * 3, resources={"GPU": 1}, pure=False)
        spans = sorted(e.gather(fs))
        # 3 threads, but one GPU: one after the other
        for (_, stop), (start, _) in zip(spans, spans[1:]):
            assert start >= stop - 0.01, spans
        # free slots run tasks that ask for nothing meanwhile
        gpu = e.submit(span, 0, 0.5, resources={"GPU": 1}, pure=False)
        cpu = e.submit(span, 1, 0.1, pure=False)
        assert cpu.result()[1] < gpu.result()[1]
        # more than any worker has: it waits for a worker that has it
        big = e.submit(inc, 1, resources={"GPU": 2})
        poll(lambda: e.sync(e.center.task_states, keys=[big.key])[big.key]
             == "no-worker")
        assert e.compute(dask.delayed(inc)(2), resources={"MEM": 1e9}).result() == 3
        with pytest.raises(TypeError, match="resources must be a dict"):
            e.submit(inc, 1, resources=["GPU"])


def test_dworker_resources_flag_under_a_nanny():
    with local_cluster(CLUSTER_ENV, n_workers=0) as c, \
            popen([sys.executable, "-m", "distributed.cli.dworker", c.center_address,
                   "--resources", "GPU=2", "--ncores", "2"],
                  env=c.security.child_env()) as p, \
            Executor(c.center_address, set_as_default=False) as e:
        wait_for_line(p, "^Registered with center at: ")
        e.wait_for_workers(1, timeout=20)
        [w] = e.scheduler_info()["workers"].values()
        assert w["resources"] == {"GPU": 2.0}
        assert e.submit(inc, 1, resources={"GPU": 2}).result(timeout=20) == 2


@pytest.mark.parametrize("method", ["submit", "map"])
def test_unsupported_keywords_are_refused_by_name(e, method, tmpfile):
    call = (lambda **kw: e.submit(flaky, tmpfile, 0, **kw)) if method == "submit" \
        else (lambda **kw: e.map(flaky, [tmpfile], [0], **kw))
    for kw in ("actor", "actors", "fifo_timeout"):
        with pytest.raises(TypeError, match="%s\\(%s=" % (method, kw)):
            call(**{kw: 1})
    with pytest.raises(TypeError, match="priority must be a number"):
        call(priority="high")
    with pytest.raises(TypeError, match="retries must be an int"):
        call(retries=-1)
    assert not e.futures and runs(tmpfile) == 0  # nothing sent, nothing ran


def test_unsupported_keywords_of_graphs(e):
    x = dask.delayed(inc)(1)
    with pytest.raises(TypeError, match="fifo_timeout"):
        x.compute(fifo_timeout=1)  # through dask to Executor.get
    with pytest.raises(TypeError, match="unexpected keyword arguments: bogus"):
        e.compute(x, bogus=1)
    with pytest.raises(TypeError, match="unexpected keyword arguments: bogus"):
        e.persist(x, bogus=1)


def test_batch_size_accepted_by_map(e):
    assert e.gather(e.map(inc, range(5), batch_size=2)) == [1, 2, 3, 4, 5]
    with pytest.raises(TypeError, match="batch_size"):
        e.map(inc, range(5), batch_size=0)


def test_partial_passes_a_keyword_of_that_name(e):
    import functools

    def f(x, resources=None):
        return x, resources

    assert e.submit(functools.partial(f, resources="mine"), 1).result() == (1, "mine")


# ---------------------------------------------------------------------------
# 5. tasks that submit tasks


def test_task_submits_and_gathers_on_a_single_thread_worker(e):
    w = sorted(e.ncores())[0]
    assert e.ncores()[w] == 1
    total, where = e.submit(submit_and_gather, 10, workers=[w], pure=False).result(
        timeout=30)
    assert total == sum(range(1, 11)) and where == w
    # two at once on the same 1-thread worker: both finish
    fs = e.map(submit_and_gather, [5, 6], workers=[w], pure=False)
    assert [t for t, _ in e.gather(fs)] == [15, 21]


def test_get_worker_in_a_task(e):
    assert e.submit(worker_address, pure=False).result() in e.ncores()


# ---------------------------------------------------------------------------
# 6. small helpers


def test_nthreads_scheduler_info_wait_for_workers(e):
    assert e.nthreads() == e.ncores()
    info = e.scheduler_info()
    assert info["address"] == e.address and info["type"] == "Center"
    assert {a: w["nthreads"] for a, w in info["workers"].items()} == e.ncores()
    e.wait_for_workers(2, timeout=5)
    start = time.time()
    with pytest.raises(TimeoutError, match="3 workers wanted, 2 connected"):
        e.wait_for_workers(3, timeout=0.5)
    assert time.time() - start < 5


def test_fire_and_forget(e, tmpfile):
    f = e.submit(touch_later, tmpfile, 0.5, pure=False)
    key = f.key
    fire_and_forget(f)
    del f
    poll(lambda: os.path.exists(tmpfile), timeout=10)
    # done: the center forgets it
    poll(lambda: e.sync(e.center.task_states, keys=[key])[key] is None, timeout=10)


def test_fire_and_forget_outlives_its_executor(cluster, tmpfile):
    with Executor(cluster.center_address, set_as_default=False) as e:
        fire_and_forget(e.submit(touch_later, tmpfile, 0.5, pure=False))
    poll(lambda: os.path.exists(tmpfile), timeout=10)


def test_async_twins(cluster):
    async def main():
        e = Executor(cluster.center_address, start=False)
        await e._start()
        try:
            assert len(await e._nthreads()) == 2
            assert len((await e._scheduler_info())["workers"]) == 2
            await e._wait_for_workers(2, timeout=5)
            x = dask.delayed(inc)(1)
            f = await e._compute(x)
            assert await f == 2
            (y,) = await e._persist([da.arange(10, chunks=5)])
            assert len(futures_of(y)) == 2
            assert await e._get({"a": (inc, 1)}, "a", retries=1) == 2
        finally:
            await e._shutdown()

    asyncio.run(main())

