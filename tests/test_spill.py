"""Memory limits: the SpillBuffer, spilling workers, pausing, termination.

In-process workers here always have their RSS sampler replaced (``_rss``)
and, but for one test that also replaces the exit, termination turned off:
a worker past its limit exits its process, which would be pytest's.
"""

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager

import numpy as np
import pandas as pd
import pytest
from tornado.httpclient import AsyncHTTPClient

from distributed import Center, Executor, Worker
from distributed.core import rpc
from distributed.http import HTTPWorker
from distributed.nanny import describe_exit
from distributed.scheduler import KilledWorker
from distributed.spill import SpillBuffer, read_value, write_value
from distributed.utils_test import child_env, free_port, inc, popen, wait_for, wait_for_line
from distributed.worker import MEMORY_EXIT_CODE

PY = sys.executable
MB = 2**20


class Thing:
    """An arbitrary object (pickled by reference to this module)."""

    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is Thing and other.x == self.x


def files(buf):
    return sorted(os.listdir(buf.directory))


def same(a, b):
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and (a == b).all()
    if isinstance(a, (pd.DataFrame, pd.Series)):
        return type(b) is type(a) and a.equals(b) and (a.index == b.index).all()
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------
# SpillBuffer


def test_lru_order(tmp_path):
    buf = SpillBuffer(str(tmp_path), target=10**9)
    for k in "abcd":
        buf[k] = np.zeros(1000)  # 8000 bytes each
    assert buf.memory_bytes == 32000
    buf["a"]  # used: the most recent now
    buf["c"] = np.ones(1000)  # replaced: recent too
    assert list(buf.fast) == ["b", "d", "a", "c"]
    assert buf.evict() == 8000
    assert list(buf.slow) == ["b"]
    assert buf.evict_until(16000) == 8000
    assert list(buf.slow) == ["b", "d"] and list(buf.fast) == ["a", "c"]
    assert buf.memory_bytes == 16000 and buf.spilled_bytes == 16000
    # reading a spilled key back makes it the most recently used
    assert (buf["b"] == 0).all()
    assert list(buf.fast) == ["a", "c", "b"]
    buf.evict_until(0)
    assert list(buf.fast) == [] and len(buf) == 4
    assert buf.evict() == 0  # nothing left to spill


VALUES = {
    "big-array": np.arange(100_000, dtype="f8"),  # out-of-band buffer
    "small-array": np.arange(10, dtype="i4"),
    "strided-array": np.arange(200_000).reshape(1000, 200)[:, ::3],
    "object-array": np.array(["a", None, 3], dtype=object),
    "frame": pd.DataFrame({"a": np.arange(50_000), "b": np.random.random(50_000),
                           "c": ["x", "y"] * 25_000},
                          index=pd.RangeIndex(50_000) + 7),
    "series": pd.Series([1.5, 2.5], index=["p", "q"], name="s"),
    "big-bytes": os.urandom(300_000),
    "small-bytes": b"abc",
    "bytearray": bytearray(b"x" * 100_000),
    "object": Thing({"nested": [1, 2, (3, "4")]}),
    "dict-order": {"z": [1], "a": 2, "m": None},
    "none": None,
    "str": "text é \udcff",
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_round_trip(tmp_path, name):
    value = VALUES[name]
    buf = SpillBuffer(str(tmp_path))
    buf["x"] = value
    assert buf.evict_until(0) > 0
    assert "x" in buf.slow and "x" not in buf.fast
    assert len(files(buf)) == 1
    assert same(value, buf.slow["x"])  # read, still spilled
    assert "x" in buf.slow
    out = buf["x"]
    assert same(value, out)
    if name == "dict-order":
        assert list(out) == ["z", "a", "m"]
    assert "x" in buf.fast and "x" not in buf.slow
    assert files(buf) == []
    assert buf.spilled_bytes == 0 and buf.disk_bytes == 0


def test_disk_error_is_logged_once_and_retried_later(tmp_path, monkeypatch, caplog):
    import errno

    import distributed.spill as spill

    buf = SpillBuffer(str(tmp_path))
    buf.retry_interval = 0.2
    for k in "abc":
        buf[k] = np.full(1000, ord(k))
    calls = []

    def full(path, value):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill, "write_value", full)
    with caplog.at_level("DEBUG", logger="distributed.spill"):
        assert buf.evict_until(0) == 0  # stops at the first failure
        for _ in range(20):
            with pytest.raises(OSError, match="No space"):
                buf.evict()
        assert len(calls) == 1  # within retry_interval the disk is left alone
        time.sleep(0.25)
        assert buf.evict_until(0) == 0
        assert len(calls) == 2  # tried again
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert isinstance(buf.write_error, OSError) and len(buf.fast) == 3
    assert files(buf) == []  # no partial file left
    monkeypatch.undo()
    time.sleep(0.25)
    assert buf.evict_until(0) == 3 * 8000 and buf.write_error is None
    assert "works again" in caplog.records[-1].getMessage()


def test_arrays_read_back_are_writable(tmp_path):
    path = str(tmp_path / "f")
    write_value(path, np.zeros(100_000))
    x = read_value(path)
    x[0] = 1
    assert x.sum() == 1


def test_tuple_keys(tmp_path):
    buf = SpillBuffer(str(tmp_path))
    keys = [("x", 0), ("x", 1), ("x", (0, 1)), ("y", "a/b\\c", 2), "('x', 0)", b"k"]
    for i, k in enumerate(keys):
        buf[k] = np.full(10, i)
    buf.evict_until(0)
    assert len(files(buf)) == len(keys)
    assert set(buf.slow) == set(keys)
    for name in files(buf):  # file names are safe whatever the key
        assert name.endswith(".spill") and "/" not in name and "(" not in name
    for i, k in enumerate(keys):
        assert (buf[k] == i).all()


def test_delete_removes_files(tmp_path):
    buf = SpillBuffer(str(tmp_path))
    for i in range(5):
        buf["k%d" % i] = np.full(1000, i)
    buf.evict_until(0)
    assert len(files(buf)) == 5
    del buf["k0"]
    assert "k0" not in buf and len(files(buf)) == 4
    buf.discard("k1")
    buf.discard("missing")
    assert len(files(buf)) == 3
    assert (buf.pop("k2") == 2).all()
    assert buf.pop("k2", "default") == "default"
    assert len(files(buf)) == 2
    buf["k3"] = "replaced"  # a new value replaces the spilled one
    assert buf["k3"] == "replaced" and len(files(buf)) == 1
    with pytest.raises(KeyError):
        del buf["k0"]
    with pytest.raises(KeyError):
        buf["k0"]
    buf.clear()
    assert files(buf) == [] and len(buf) == 0
    assert buf.memory_bytes == buf.spilled_bytes == buf.disk_bytes == 0


def test_file_removal_in_executor(tmp_path):
    with ThreadPoolExecutor(1) as ex:
        buf = SpillBuffer(str(tmp_path), executor=ex)
        buf["x"] = np.zeros(100_000)
        buf.evict_until(0)
        assert len(files(buf)) == 1
        del buf["x"]
    assert files(buf) == []


def test_counters_and_mapping(tmp_path):
    buf = SpillBuffer(str(tmp_path), target=20_000)
    for i in range(4):
        buf[i] = np.zeros(1000)
    assert buf.evict_until() == 16_000  # down to the target
    assert buf.memory_bytes == 16_000 and buf.spilled_bytes == 16_000
    assert buf.disk_bytes > 16_000
    assert buf.n_spilled == 2 and buf.n_unspilled == 0
    assert len(buf) == 4 and sorted(buf) == [0, 1, 2, 3]
    assert all(i in buf for i in range(4)) and 4 not in buf
    assert buf.spilled([0, 1, 2, 3, 4]) == [0, 1]
    values, spilled = buf.get_in_memory([0, 2, 4])
    assert list(values) == [2] and spilled == [0]
    got = buf.get_many([0, 1, 4])
    assert sorted(got) == [0, 1] and buf.n_unspilled == 2
    assert buf.spilled_bytes == 0 and buf.memory_bytes == 32_000
    assert dict(buf.items()).keys() == {0, 1, 2, 3}
    assert SpillBuffer(str(tmp_path / "t")).evict_until() == 0  # no target: no-op


def test_unpicklable_values_stay_in_memory(tmp_path):
    buf = SpillBuffer(str(tmp_path))
    buf["lock"] = threading.Lock()
    buf["x"] = np.zeros(1000)
    assert buf.evict_until(0) == 8000
    assert list(buf.fast) == ["lock"] and list(buf.slow) == ["x"]
    assert buf.evict_until(0) == 0  # not tried again
    assert len(files(buf)) == 1


def test_thread_safety_smoke(tmp_path):
    """One thread spills all the time while another sets, reads and deletes."""
    buf = SpillBuffer(str(tmp_path), executor=None)
    stop = threading.Event()
    errors = []

    def spill():
        try:
            while not stop.is_set():
                buf.evict_until(0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=spill)
    t.start()
    expected = {}
    rng = random.Random(0)
    try:
        deadline = time.time() + 1.5
        while time.time() < deadline:
            k = ("k", rng.randrange(30))
            op = rng.random()
            if op < 0.4:
                v = np.full(rng.randrange(1, 3000), rng.randrange(1000))
                buf[k] = v
                expected[k] = v
            elif op < 0.8:
                if k in expected:
                    assert (buf[k] == expected[k]).all()
                else:
                    assert k not in buf
            else:
                buf.discard(k)
                expected.pop(k, None)
    finally:
        stop.set()
        t.join(10)
    assert not errors
    assert buf.n_spilled > 0 and buf.n_unspilled > 0  # they did meet
    assert set(buf) == set(expected)
    for k, v in expected.items():
        assert (buf[k] == v).all()
    assert buf.memory_bytes == sum(v.nbytes for v in expected.values())
    assert buf.spilled_bytes == 0 and files(buf) == []


# ---------------------------------------------------------------------------
# a Worker with a memory limit, in this process


@asynccontextmanager
async def cluster(rss=0, **kwargs):
    """A center and one worker whose RSS reads ``rss[0]`` (a list) or ``rss``."""
    rss = rss if isinstance(rss, list) else [rss]
    center = Center("127.0.0.1")
    center.listen(0)
    kwargs.setdefault("memory_terminate_fraction", False)  # never exit pytest
    w = Worker(center.ip, center.port, ip="127.0.0.1", ncores=2,
               memory_monitor_interval=0.01, **kwargs)
    w._rss = lambda: rss[0]
    try:
        await w._start(0)
        yield center, w
    finally:
        await w._close(timeout=1)
        center.close()


def spill_files(w):
    d = os.path.join(w.local_dir, "spill")
    return os.listdir(d) if os.path.isdir(d) else []


def arrays(n, size=MB):
    return {"x%d" % i: np.full(size // 8, i, dtype="f8") for i in range(n)}


def test_worker_without_limit_keeps_a_dict():
    async def f():
        async with cluster(memory_limit=None) as (c, w):
            assert type(w.data) is dict
            assert w._memory_thread is None
            h = await rpc(w.address).health()
            assert h["memory_limit"] is None and h["spilled_bytes"] == 0
            assert h["paused"] is False

    asyncio.run(asyncio.wait_for(f(), 10))


def test_worker_spills_and_reads_back():
    async def f():
        # target: 0.6 * 10 MiB = 6 MiB of values in memory
        async with cluster(memory_limit=10 * MB, services={"http": HTTPWorker}) as (c, w):
            assert isinstance(w.data, SpillBuffer)
            assert w.data.target == int(0.6 * 10 * MB)
            data = arrays(10)
            r = rpc(w.address)
            await r.update_data(data=data)
            await wait_for(lambda: w.data.memory_bytes <= w.data.target
                           and len(spill_files(w)) >= 4)
            assert len(w.data.slow) == len(spill_files(w))
            assert set(w.data) == set(data)
            assert set(c.who_has) == set(data)
            spilled = sorted(w.data.slow)
            # least recently used first: the first keys stored
            assert spilled == sorted(data)[: len(spilled)]
            # get_data reads spilled keys back (in a thread) and is correct
            got = await r.get_data(keys=list(data) + ["nope"])
            assert sorted(got) == sorted(data)
            for k, v in data.items():
                assert (got[k] == v).all()
            # state in health() and /info.json
            await wait_for(lambda: w.data.memory_bytes <= w.data.target)
            h = await r.health()
            assert h["memory_limit"] == 10 * MB and h["spilled_bytes"] > 0
            assert h["paused"] is False and h["spilled_keys"] == len(w.data.slow)
            url = "http://%s:%d/info.json" % (w.ip, w.service_ports["http"])
            info = json.loads((await AsyncHTTPClient().fetch(url)).body)
            assert info["memory_limit"] == 10 * MB and info["spilled_bytes"] > 0
            assert info["paused"] is False and len(info["keys"]) == 10
            # the legacy compute handler on a spilled input
            w.data.evict_until(0)
            status, meta = await r.compute(function=np.sum, key="total", keys=["x3"])
            assert status == b"OK"
            assert w.data["total"] == 3 * MB // 8
            # deleting spilled keys removes their files
            w.data.evict_until(0)
            n = len(spill_files(w))
            await r.delete_data(keys=["x0", "x1"])
            await wait_for(lambda: len(spill_files(w)) == n - 2)
            r.close_streams()

    asyncio.run(asyncio.wait_for(f(), 20))


def test_get_data_leaves_spilled_keys_on_disk():
    """Keys read for a peer are sent, not kept in memory again, and room is
    made for them first."""
    async def f():
        async with cluster(memory_limit=10 * MB) as (c, w):
            data = arrays(4)  # 4 MiB, below the 6 MiB target
            r = rpc(w.address)
            await r.update_data(data=data)
            w.data.evict_until(0)
            w.data["y"] = np.ones(5 * MB // 8)  # 5 MiB in memory
            got = await r.get_data(keys=["x0", "x1"])
            for k in ("x0", "x1"):
                assert (got[k] == data[k]).all()
            assert set(w.data.slow) == set(data) | {"y"}  # still on disk, y spilled
            assert w.data.memory_bytes == 0 and w.data.n_unspilled == 0
            r.close_streams()

    asyncio.run(asyncio.wait_for(f(), 10))


def sum_after(a, _):
    return float(a.sum())


def test_tasks_with_spilled_inputs():
    async def f():
        async with cluster(memory_limit=10 * MB) as (c, w):
            async with Executor(c.address, start=False) as e:
                xs = await e._scatter(arrays(8))
                await wait_for(lambda: len(w.data.slow) >= 2)  # 8 MiB, target 6
                w.data.evict_until(0)  # all of them on disk
                assert len(w.data.fast) == 0
                sums = [e.submit(np.sum, xs["x%d" % i]) for i in range(8)]
                assert await e._gather(sums) == [i * MB // 8 for i in range(8)]
                assert w.data.n_unspilled >= 8
                w.data.evict_until(0)
                g = e.submit(lambda a, b: float((a + b).sum()), xs["x1"], xs["x2"])
                assert await e._gather([g]) == [3.0 * MB // 8]

    asyncio.run(asyncio.wait_for(f(), 20))


def test_graph_with_spilled_inputs():
    async def f():
        # a target of 0 bytes: every value is spilled as soon as it is stored
        async with cluster(memory_limit=10 * MB, memory_target_fraction=1e-12) as (c, w):
            assert w.data.target == 0
            async with Executor(c.address, start=False) as e:
                dsk = {"a": (np.full, 100_000, 3.0), "s": (time.sleep, 0.2),
                       "b": (sum_after, "a", "s")}
                assert await e._get(dsk, ["b"]) == [300_000.0]
                assert w.data.n_unspilled >= 1  # "a" was read back for "b"

    asyncio.run(asyncio.wait_for(f(), 20))


def test_spill_when_process_memory_is_high():
    """Values below the target by sizeof, but the process is above it."""
    rss = [0]

    async def f():
        async with cluster(rss, memory_limit=10**9) as (c, w):
            await rpc(w.address).update_data(data=arrays(5))
            assert len(w.data.slow) == 0
            rss[0] = int(0.7 * 10**9)  # 100 MB above the target: spill what we have
            await wait_for(lambda: len(w.data.slow) == 5)
            assert w.paused is False
            rss[0] = 0

    asyncio.run(asyncio.wait_for(f(), 10))


RAN = []


def record(x):
    RAN.append(x)  # the worker runs in this process
    return x


def test_pause_and_resume():
    rss = [0]

    async def f():
        async with cluster(rss, memory_limit=10**9) as (c, w):
            r = rpc(w.address)
            async with Executor(c.address, start=False) as e:
                assert await e._gather([e.submit(inc, 0)]) == [1]
                rss[0] = int(0.85 * 10**9)
                await wait_for(lambda: w.paused)
                assert (await r.health())["paused"] is True
                # the worker tells the scheduler, which then holds tasks back
                await wait_for(lambda: c.scheduler.workers[w.address].paused)
                futures = [e.submit(inc, i) for i in range(1, 5)]
                legacy = asyncio.ensure_future(
                    r.compute(function=inc, args=(10,), key="legacy"))
                await wait_for(lambda: all(
                    c.scheduler.tasks.get(f.key) is not None
                    and c.scheduler.tasks[f.key].state == "queued" for f in futures))
                await asyncio.sleep(0.1)  # nothing starts, however long we wait
                assert not w.tasks  # nothing was even sent
                assert not any(f.done() for f in futures)
                assert not legacy.done() and "legacy" not in w.data
                assert not w.active
                rss[0] = int(0.5 * 10**9)
                assert await e._gather(futures) == [2, 3, 4, 5]
                status, meta = await asyncio.wait_for(legacy, 5)
                assert status == b"OK" and w.data["legacy"] == 11
                assert not w.paused and not w._paused_tasks
                # tasks forgotten while paused (a restart) never run
                rss[0] = int(0.85 * 10**9)
                await wait_for(lambda: w.paused)
                await wait_for(lambda: c.scheduler.workers[w.address].paused)
                f1 = e.submit(record, 100)
                await wait_for(lambda: f1.key in c.scheduler.tasks)
                await e._restart()
                await wait_for(lambda: not w._paused_tasks and not w.tasks)
                assert f1.cancelled()
                rss[0] = 0
                await wait_for(lambda: not w.paused)
                assert await e._gather([e.submit(inc, 200)]) == [201]
                assert 100 not in RAN
            r.close_streams()

    asyncio.run(asyncio.wait_for(f(), 20))


def test_terminate_above_limit():
    rss = [0]
    exits = []

    async def f():
        async with cluster(rss, memory_limit=10**9, memory_terminate_fraction=0.95) as (c, w):
            w._memory_terminate = exits.append  # instead of os._exit
            rss[0] = int(0.9 * 10**9)
            await wait_for(lambda: w.paused)
            assert not exits
            rss[0] = int(0.96 * 10**9)
            await wait_for(lambda: exits)
            assert exits[0] == int(0.96 * 10**9)

    asyncio.run(asyncio.wait_for(f(), 10))


def test_fractions_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTRIBUTED_MEMORY_TARGET", "0.5")
    monkeypatch.setenv("DISTRIBUTED_MEMORY_PAUSE", "false")
    monkeypatch.setenv("DISTRIBUTED_MEMORY_TERMINATE", "0")
    w = Worker("127.0.0.1", 1, memory_limit=1000, local_dir=str(tmp_path))
    assert w.memory_target_fraction == 0.5 and w.data.target == 500
    assert w.memory_pause_fraction is None and w.memory_terminate_fraction is None
    w2 = Worker("127.0.0.1", 1, memory_limit=1000, memory_target_fraction=0,
                memory_pause_fraction=0.7, local_dir=str(tmp_path))
    assert type(w2.data) is dict and w2.memory_pause_fraction == 0.7
    monkeypatch.setenv("DISTRIBUTED_MEMORY_PAUSE", "lots")
    with pytest.raises(ValueError, match="DISTRIBUTED_MEMORY_PAUSE"):
        Worker("127.0.0.1", 1, memory_limit=1000, local_dir=str(tmp_path))
    for x in (w, w2):
        x.executor.shutdown()


def test_describe_exit_memory():
    assert describe_exit(MEMORY_EXIT_CODE) == "memory limit exceeded (exit code 75)"
    assert describe_exit(3) == "exit code 3"


def test_center_records_deaths():
    async def f():
        c = Center("127.0.0.1")
        c.listen(0)
        try:
            r = rpc(c.address)
            assert await r.worker_died(address="127.0.0.1:1234",
                                       cause="memory limit exceeded") == b"OK"
            (t, address, cause), = c.deaths
            assert address == "127.0.0.1:1234" and cause == "memory limit exceeded"
            r.close_streams()
        finally:
            c.close()

    asyncio.run(asyncio.wait_for(f(), 10))


# ---------------------------------------------------------------------------
# real dworker processes


def hog(nbytes=10**9):
    """Allocate (and touch) ``nbytes`` in 8 MiB steps."""
    chunks = []
    for _ in range(nbytes // (8 * MB)):
        chunks.append(np.ones(MB))
    return len(chunks)


@contextmanager
def memory_cluster(port, local_dir, memory_limit, worker_args=(), center_args=(),
                   worker_env=None):
    """A real ``dcenter`` and one ``dworker --memory-limit`` (under its nanny
    unless ``worker_args`` say ``--no-nanny``) with an Executor on them;
    yields ``(center, worker, executor)``, the first two as processes."""
    with popen([PY, "-m", "distributed.cli.dcenter", "--port", str(port),
                *center_args], env=child_env()) as center:
        wait_for_line(center, "Start center at")
        with popen([PY, "-m", "distributed.cli.dworker", "127.0.0.1:%d" % port,
                    "--memory-limit", memory_limit, *worker_args,
                    "--local-dir", str(local_dir)], env=worker_env or child_env()) as worker:
            wait_for_line(worker, "Registered with center")
            with Executor("127.0.0.1:%d" % port, timeout=10) as e:
                yield center, worker, e


@pytest.mark.processes
def test_dworker_past_memory_limit_is_restarted(tmp_path):
    """A task allocating ~1 GB on a worker limited to 300 MB: the worker exits
    with status 75 each time, its nanny reports "memory limit exceeded" (to
    the center too) and restarts it.  The scheduler tries the task on the
    restarted worker until it has killed 4 workers (``allowed_failures=3``),
    then the future fails with KilledWorker; the cluster works on."""
    port = free_port()
    with memory_cluster(port, str(tmp_path), "300MB",
                        worker_args=["--ncores", "1"]) as (center, worker, e):
        f = e.submit(hog)
        # every death's cause, as the nanny tells it (the center waits for it)
        with pytest.raises(KilledWorker, match="4 workers that died: memory limit "
                           r"exceeded \(exit code 75\): its running tasks were to blame"):
            f.result(timeout=40)
        line = wait_for_line(worker, "died", timeout=10)
        assert "memory limit exceeded (exit code 75)" in line
        assert "its running tasks were to blame" in line  # not its data
        wait_for_line(center, "died: memory limit exceeded", timeout=10)
        # restarted: it works on, and the dead ones left no files behind
        deadline = time.time() + 20
        while True:
            try:
                if len(e.ncores()) == 1 and \
                        e.submit(inc, 1, pure=False).result(timeout=5) == 2:
                    break
            except Exception:
                pass
            assert time.time() < deadline, "the worker did not come back"
            time.sleep(0.1)
        assert len([d for d in os.listdir(tmp_path)
                    if d.startswith("worker-")]) == 1


@pytest.mark.processes
def test_dworker_spills_to_local_dir(tmp_path):
    port = free_port()
    e_ = dict(child_env(), DISTRIBUTED_MEMORY_TARGET="0.01")  # 20 MB of a 2 GB limit
    with memory_cluster(port, str(tmp_path), "2GB",
                        worker_args=["--ncores", "1", "--no-nanny"],
                        worker_env=e_) as (center, worker, e):
        data = arrays(5, size=8 * MB)
        futures = e.scatter(data)
        (address,) = e.ncores()

        def spilled():
            return [f for root, _, fs in os.walk(tmp_path) for f in fs
                    if f.endswith(".spill")]

        deadline = time.time() + 10
        while len(spilled()) < 3:
            assert time.time() < deadline, "nothing spilled"
            time.sleep(0.05)
        h = asyncio.run(rpc(address).health())
        assert h["memory_limit"] == 2 * 10**9 and h["spilled_bytes"] > 0
        assert h["memory_target_fraction"] == 0.01
        got = e.gather(futures)
        for k, v in data.items():
            assert (got[k] == v).all()
        assert e.submit(np.sum, futures["x4"]).result() == 4 * MB


def fresh_array(i):
    """20-50 MiB of incompressible, freshly allocated floats, a function of ``i``."""
    n = (20 + (i * 7) % 31) * MB // 8
    return np.random.default_rng(i).random(n)


@pytest.mark.processes
def test_dworker_fast_producer_fits_on_disk(tmp_path):
    """A worker limited to 400 MB and tasks producing ~2x that in 20-50 MiB
    arrays, all held by futures: storing a result above the target spills
    in that step and the worker pauses while spilling can catch up, so it
    never dies, nothing is lost and no task ends as KilledWorker."""
    port = free_port()
    n_tasks = 24  # about 830 MiB
    with memory_cluster(port, str(tmp_path), "400MB",
                        worker_args=["--ncores", "2"]) as (center, worker, e):
        (address,) = e.ncores()
        futures = e.map(fresh_array, range(n_tasks))
        sizes = e.gather(e.map(len, futures))  # all of them computed
        assert sizes == [len(fresh_array(i)) for i in range(n_tasks)]
        h = asyncio.run(rpc(address).health())
        assert h["spilled_bytes"] > 300 * MB  # most of it is on disk
        # all at once: the worker sends it in pieces it can read back
        got = e.gather(futures)
        for j, x in enumerate(got):
            assert (x == fresh_array(j)).all()
        del got
        assert list(e.ncores()) == [address]  # never restarted
    output = "".join(worker.unread_lines(timeout=10))
    assert "died" not in output and "exceeded its memory limit" not in output, output


@pytest.fixture
def tiny_disk(tmp_path):
    """A 20 MB tmpfs (root on Linux only): a spill directory that fills up."""
    path = tmp_path / "tiny"
    path.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip("mount -t tmpfs is not permitted here: %s" % done.stderr.strip())
    try:
        yield str(path)
    finally:
        if subprocess.run(["umount", str(path)]).returncode:
            subprocess.run(["umount", "-l", str(path)])


def sized_array(i):
    """8-16 MiB of fresh floats, a function of ``i``."""
    return np.random.default_rng(i).random((8 + i % 9) * MB // 8)


@pytest.mark.processes
def test_dworker_full_spill_directory_gives_up_cleanly(tiny_disk):
    """Spilling into a 20 MB tmpfs soon fails with ENOSPC.  The worker does
    not pause for ever waiting for a disk that stays full: the results that
    no longer fit fail with MemoryError naming the spill directory, the
    others are correct, the failure is logged once (not ten times a second),
    and once the data is released the worker computes again."""
    port = free_port()
    with memory_cluster(port, tiny_disk, "300MB",
                        worker_args=["--ncores", "1"]) as (center, worker, e):
        (address,) = e.ncores()
        futures = e.map(sized_array, range(20))  # ~240 MiB
        deadline = time.time() + 30
        for f in futures:
            while not f.done():
                assert time.time() < deadline, "stalled: %s" % e.ncores()
                time.sleep(0.05)
        errors = [f.exception() for f in futures if f.exception() is not None]
        assert errors, "the full disk was not noticed"
        for exc in errors:
            assert isinstance(exc, MemoryError), repr(exc)
            assert "spilling to %s" % tiny_disk in str(exc)
            assert "No space left on device" in str(exc)
        for i, f in enumerate(futures):
            if f.exception() is None:
                assert (f.result() == sized_array(i)).all()
        time.sleep(1)  # ten log lines a second would show now
        del futures, f
        assert e.submit(inc, 1, pure=False).result(timeout=10) == 2
        assert list(e.ncores()) == [address]  # it never died
    output = "".join(worker.unread_lines(timeout=10))
    assert "exceeded its memory limit" not in output, output
    assert output.count("could not spill") == 1, output
    assert len([line for line in output.splitlines()
                if "WARNING" in line or "ERROR" in line]) <= 4, output


def allocate(nbytes, seed):
    return np.random.default_rng(seed).random(nbytes // 8)


@pytest.mark.processes
def test_memory_death_caused_by_data_held_does_not_count_against_tasks(tmp_path):
    """A worker without spilling holds scattered data; a task then takes it
    past its memory limit.  Most of the memory was the data held, so the
    worker says so before it exits ("the data it held was to blame") and the
    task is rescheduled without counting toward KilledWorker: with
    ``--allowed-failures 0`` it still completes (on the restarted worker)."""
    port = free_port()
    e_ = dict(child_env(), DISTRIBUTED_MEMORY_TARGET="off", DISTRIBUTED_MEMORY_PAUSE="off")
    with memory_cluster(port, str(tmp_path), "300MB",
                        worker_args=["--ncores", "1"], center_args=["--allowed-failures", "0"],
                        worker_env=e_) as (center, worker, e):
        held = e.scatter([allocate(30 * MB, i) for i in range(3)])
        f = e.submit(allocate, 80 * MB, 7)
        assert (f.result(timeout=30) == allocate(80 * MB, 7)).all()
        line = wait_for_line(worker, "died", timeout=10)
        assert "memory limit exceeded (exit code 75): the data it held " \
               "was to blame" in line
        wait_for_line(center, "died: memory limit exceeded .*data it held",
                      timeout=10)
        del held
