"""The Executor against real clusters: a LocalCluster shared by the module
(center and two single-threaded workers in subprocesses) and an Executor per
test: the ``cluster``, ``e`` and ``e2`` fixtures of conftest.py.

The functions below are sent to the workers by reference, so the worker
processes get this directory on their PYTHONPATH and import this module.
"""

import asyncio
import gc
import io
import os
import threading
import time
import traceback

import pytest
from tornado import gen

from distributed import (
    CancelledError,
    Executor,
    Future,
    as_completed,
    progress,
    wait,
)
from distributed.scheduler import VALIDATE_ENV
from distributed.utils_test import (add, free_port, inc, poll, record_sends, slowinc, throws,
                                    uid)

pytestmark = pytest.mark.processes

#: environment variables of the module's ``cluster`` (see conftest.py)
CLUSTER_ENV = {}


# ---------------------------------------------------------------------------
# functions the workers run (importable there: see the cluster fixture)


def square(x):
    return x ** 2


def neg(x):
    return -x


def counted(x, path):
    """Return ``x``; leave one line in ``path`` per call (on the worker)."""
    with open(path, "a") as f:
        f.write("call\n")
    return x


def calls(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.readlines())


class MyError(Exception):
    pass


def remote_failure(x):
    return _inner_failure(x)


def _inner_failure(x):
    raise MyError("failed on %s" % x)


def call_module(name):
    import importlib

    return importlib.import_module(name).answer()


def total(*args, **kwargs):
    return sum(args) + sum(kwargs.values())


def nested_total(obj):
    if isinstance(obj, dict):
        return sum(nested_total(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nested_total(v) for v in obj)
    return obj


def get_pid():
    return os.getpid()


def block(x, delay):
    time.sleep(delay)
    return x


def make_lock():
    return threading.Lock()


async def async_total(*args):
    await asyncio.sleep(0)
    return sum(args)


def big(n, seed):
    import numpy as np

    return np.full(n, seed, dtype="u1")


# ---------------------------------------------------------------------------
# fixtures: cluster, e and e2 come from conftest.py; this module's center
# checks the scheduler's invariants after every batch, and conftest's ``e``
# fails a test during which it found a broken one
CLUSTER_ENV = {VALIDATE_ENV: "1"}


# ---------------------------------------------------------------------------
# basics


def test_quickstart(e):
    A = e.map(square, range(10))
    B = e.map(neg, A)
    total_ = e.submit(sum, B)
    assert total_.result() == -285
    assert e.gather(A) == [i ** 2 for i in range(10)]
    assert e.gather(B) == [-(i ** 2) for i in range(10)]
    assert e.get({"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}, "c") == 3


def test_get_nested_keys(e):
    # graph keys name values: unique names, so that other tests' graphs
    # (on the same cluster) cannot answer for them
    a, b, c, d = ("%s-%s" % (n, uid()) for n in "abcd")
    dsk = {a: 1, b: (inc, a), c: (add, a, b), d: (sum, [a, b, c])}
    assert e.get(dsk, [[a, b], d]) == [[1, 2], 6]
    assert e.get(dsk, [c]) == [3]
    # nothing of the graph stays on the cluster after get
    poll(lambda: not {a, b, c, d} & set(e.who_has()))


def test_get_tuple_keys(e):
    name = "t-" + uid()
    dsk = {(name, 0): 1, (name, 1): (inc, (name, 0)), name: (add, (name, 0), (name, 1))}
    assert e.get(dsk, [name, (name, 1)]) == [3, 2]


def test_get_error(e):
    x, y, z = ("%s-%s" % (n, uid()) for n in "xyz")
    with pytest.raises(RuntimeError, match="hello!"):
        e.get({x: 1, y: (throws, x), z: (inc, y)}, z)


def test_submit_and_result(e):
    x = e.submit(inc, 10)
    y = e.submit(add, x, 100)
    assert isinstance(x, Future)
    assert y.result() == 111
    assert x.result() == 11
    assert x.status == "finished"
    assert x.done()
    assert "finished" in repr(x) and x.key in repr(x)
    assert x.key.startswith("inc-")


def test_status_pending_then_finished(e):
    f = e.submit(block, uid(), 0.5, pure=False)
    assert f.status == "pending"
    assert not f.done()
    assert "pending" in repr(f) and f.key in repr(f)
    f.result()
    assert f.status == "finished"
    assert f.done()
    assert "finished" in repr(f)


def test_gather_nested(e):
    a, b, c, d = e.map(inc, [1, 2, 3, 4])
    out = e.gather({"x": [a, (b, c)], "y": d, "z": 7, "w": [1, "s"]})
    assert out == {"x": [2, (3, 4)], "y": 5, "z": 7, "w": [1, "s"]}
    assert type(out["x"][1]) is tuple
    assert e.gather([]) == []
    assert e.gather(a) == 2


def test_result_timeout(e):
    f = e.submit(block, 1, 1, pure=False)
    start = time.time()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.1)
    assert time.time() - start < 0.9
    assert f.result() == 1


def test_map_multiple_iterables_and_kwargs(e):
    futures = e.map(total, [1, 2, 3], [10, 20, 30], extra=100)
    assert e.gather(futures) == [111, 122, 133]
    with pytest.raises(TypeError):
        e.map(inc)
    with pytest.raises(TypeError):
        e.submit(1)


# ---------------------------------------------------------------------------
# keys


def test_pure_keys_one_computation(e, tmp_path):
    path = str(tmp_path / "calls")
    x = e.submit(counted, 1, path)
    y = e.submit(counted, 1, path)
    assert x.key == y.key
    assert e.gather([x, y]) == [1, 1]
    assert calls(path) == 1
    # submitted again later, still one computation
    z = e.submit(counted, 1, path)
    assert z.key == x.key
    assert z.result() == 1
    assert calls(path) == 1
    # different arguments, different keys
    w = e.submit(counted, 2, path)
    assert w.key != x.key
    assert w.result() == 2
    assert calls(path) == 2


def test_pure_keys_shared_between_executors(e, e2, tmp_path):
    path = str(tmp_path / "calls")
    x = e.submit(counted, 5, path)
    y = e2.submit(counted, 5, path)
    assert x.key == y.key
    assert x.result() == 5
    assert y.result() == 5
    assert calls(path) == 1


def test_pure_map_keys(e, tmp_path):
    path = str(tmp_path / "calls")
    a = e.map(counted, [1, 2, 1], [path] * 3)
    assert a[0].key == a[2].key != a[1].key
    b = e.map(counted, [1, 2], [path] * 2)
    assert [f.key for f in b] == [a[0].key, a[1].key]
    assert e.gather(a + b) == [1, 2, 1, 1, 2]
    assert calls(path) == 2


def test_impure(e, tmp_path):
    path = str(tmp_path / "calls")
    x = e.submit(counted, 1, path, pure=False)
    y = e.submit(counted, 1, path, pure=False)
    assert x.key != y.key
    assert e.gather([x, y]) == [1, 1]
    assert calls(path) == 2
    fs = e.map(counted, [1, 1], [path, path], pure=False)
    assert fs[0].key != fs[1].key
    e.gather(fs)
    assert calls(path) == 4


def test_explicit_key(e):
    name = "my-key-" + uid()
    x = e.submit(inc, 1, key=name)
    assert x.key == name
    assert x.result() == 2
    assert name in e.who_has()
    fs = e.map(inc, [1, 2], key=[name + "-a", name + "-b"])
    assert [f.key for f in fs] == [name + "-a", name + "-b"]
    assert e.gather(fs) == [2, 3]
    with pytest.raises(ValueError):
        e.map(inc, [1, 2], key=["only-one"])


def test_kwargs(e):
    x = e.submit(total, 1, 2, a=10, b=20)
    assert x.result() == 33
    y = e.submit(total, 1, 2, a=10, b=21)
    assert y.key != x.key
    assert y.result() == 34
    assert e.submit(slowinc, 1, delay=0.01).result() == 2


def test_futures_nested_in_args(e):
    a, b, c = e.map(inc, [10, 20, 30])
    assert e.submit(nested_total, [a, (b, {"k": c, "n": 1000})]).result() == 1063
    assert e.submit(total, a, 1, k=b).result() == 33
    assert e.submit(total, k=a).result() == 11
    # a string that looks like a key is not a reference
    assert e.submit(len, a.key).result() == len(a.key)


# ---------------------------------------------------------------------------
# errors


def test_exception_reraised_with_remote_traceback(e):
    f = e.submit(remote_failure, 3)
    with pytest.raises(MyError, match="failed on 3") as info:
        f.result()
    names = [fr.name for fr in traceback.extract_tb(info.value.__traceback__)]
    assert "remote_failure" in names
    assert "_inner_failure" in names
    assert f.status == "error"
    assert f.done()
    assert "error" in repr(f)
    exc = f.exception()
    assert isinstance(exc, MyError)
    tb = f.traceback()
    assert tb is not None
    assert "_inner_failure" in [fr.name for fr in traceback.extract_tb(tb)]
    with pytest.raises(MyError):
        e.gather([f])


def test_utils_throws(e):
    f = e.submit(throws, 1)
    with pytest.raises(RuntimeError, match="hello!") as info:
        f.result()
    assert "throws" in [fr.name for fr in traceback.extract_tb(info.value.__traceback__)]


def test_no_exception_for_success(e):
    f = e.submit(inc, 1)
    assert f.exception() is None
    assert f.traceback() is None


def test_dependents_of_failed_task_fail(e):
    f = e.submit(remote_failure, 4)
    g = e.submit(inc, f)
    h = e.submit(add, g, e.submit(inc, 1))
    for fut in [g, h]:
        with pytest.raises(MyError, match="failed on 4"):
            fut.result()
        assert fut.status == "error"
        assert isinstance(fut.exception(), MyError)
    with pytest.raises(MyError):
        e.gather([e.submit(inc, 1), h])
    # submitting on top of an already failed future fails too
    with pytest.raises(MyError):
        e.submit(inc, f).result()


def test_error_in_map(e):
    futures = e.map(throws, range(3))
    for f in futures:
        with pytest.raises(RuntimeError):
            f.result()
    # the cluster is fine afterwards
    assert e.gather(e.map(inc, range(3))) == [1, 2, 3]


# ---------------------------------------------------------------------------
# cancel, callbacks, wait, as_completed


def test_cancel(e):
    f = e.submit(block, uid(), 0.4)
    f.cancel()
    assert f.cancelled()
    assert f.status == "cancelled"
    assert "cancelled" in repr(f)
    with pytest.raises(CancelledError):
        f.result()
    with pytest.raises(CancelledError):
        e.gather([f])
    with pytest.raises(CancelledError):
        e.submit(inc, f)


def test_cancel_finished_releases_data(e):
    f = e.submit(inc, 10**6 + 77)
    f.result()
    key = f.key
    assert key in e.who_has()
    e.cancel([f])
    with pytest.raises(CancelledError):
        f.result()
    poll(lambda: key not in e.who_has())


def test_cancel_does_not_affect_other_executors(e, e2):
    token = uid()
    f = e.submit(block, token, 0.5)
    g = e2.submit(block, token, 0.5)
    assert f.key == g.key
    e.cancel([f])
    with pytest.raises(CancelledError):
        f.result()
    assert g.result() == token
    assert g.status == "finished"


def test_resubmit_after_cancel(e):
    token = uid()
    f = e.submit(block, token, 0.2)
    e.cancel(f)
    g = e.submit(block, token, 0.2)
    assert g.key == f.key
    assert g.result() == token
    assert f.cancelled()


def test_add_done_callback(e):
    got = []
    done = threading.Event()

    def cb(future):
        got.append((future.key, future.status))
        done.set()

    f = e.submit(block, 3, 0.2, pure=False)
    f.add_done_callback(cb)
    assert done.wait(5)
    assert got == [(f.key, "finished")]

    # added after the future finished: called at once
    later = threading.Event()
    f.add_done_callback(lambda fut: later.set())
    assert later.wait(5)

    # erred futures call back too
    failed = threading.Event()
    statuses = []
    g = e.submit(remote_failure, uid())
    g.add_done_callback(lambda fut: (statuses.append(fut.status), failed.set()))
    assert failed.wait(5)
    assert statuses == ["error"]


def test_wait_all_completed(e):
    futures = e.map(slowinc, range(6), delay=0.02)
    done, not_done = wait(futures)
    assert done == set(futures)
    assert not_done == set()
    assert all(f.status == "finished" for f in futures)


def idle(e, cluster):
    """Wait until every worker finished what earlier tests left running."""
    futures = [e.submit(inc, 0, workers=[w], pure=False) for w in cluster.worker_addresses]
    e.gather(futures)
    return cluster.worker_addresses


def test_wait_first_completed(e, cluster):
    a, b = idle(e, cluster)
    slow = e.submit(block, uid(), 0.8, workers=[a])
    fast = e.submit(inc, 10**7 + 1, workers=[b])
    fast.result()
    done, not_done = wait([slow, fast], return_when="FIRST_COMPLETED")
    assert fast in done
    assert slow in not_done
    assert not slow.done()
    slow.cancel()


def test_wait_timeout(e):
    slow = e.submit(block, uid(), 0.8)
    start = time.time()
    with pytest.raises(TimeoutError):
        wait([slow], timeout=0.1)
    assert time.time() - start < 0.7
    done, _ = wait([slow])
    assert slow in done


def test_wait_and_as_completed_edge_cases(e):
    assert wait([]) == (set(), set())
    assert list(as_completed([])) == []
    f = e.submit(inc, 1)
    with pytest.raises(ValueError):
        wait([f], return_when="SOMETIMES")
    ac = as_completed([f])
    assert len(ac) == 1
    assert list(ac) == [f]


def test_wait_counts_errors_as_done(e):
    futures = [e.submit(throws, uid()), e.submit(inc, 7)]
    done, not_done = wait(futures)
    assert done == set(futures) and not not_done


def test_as_completed(e):
    futures = e.map(slowinc, range(10), delay=0.01)
    futures.append(e.submit(throws, uid()))
    seen = []
    for f in as_completed(futures):
        assert f.done()
        seen.append(f)
    assert len(seen) == len(futures)
    assert set(seen) == set(futures)
    assert sorted(f.result() for f in seen if f.status == "finished") == list(range(1, 11))


def test_as_completed_order(e, cluster):
    a, b = idle(e, cluster)
    slow = e.submit(block, "slow", 0.6, pure=False, workers=[a])
    fast = e.submit(block, "fast", 0.0, pure=False, workers=[b])
    order = [f.result() for f in as_completed([slow, fast])]
    assert order == ["fast", "slow"]


# ---------------------------------------------------------------------------
# reference counting


def test_release_when_future_deleted(e):
    x = e.submit(inc, 10**6 + 17)
    x.result()
    key = x.key
    assert key in e.who_has()
    del x
    gc.collect()
    poll(lambda: key not in e.who_has(), msg="release of %s" % key)
    poll(lambda: all(key not in ks for ks in e.has_what().values()))


def test_release_only_last_reference(e):
    x = e.submit(inc, 10**6 + 31)
    y = e.submit(inc, 10**6 + 31)
    assert x.key == y.key
    x.result()
    key = x.key
    del x
    gc.collect()
    # a full round trip: any release would be processed by now
    assert e.submit(inc, 0).result() == 1
    assert key in e.who_has()
    assert y.result() == 10**6 + 32
    del y
    gc.collect()
    poll(lambda: key not in e.who_has())


def test_data_needed_by_pending_task_is_kept(e):
    token = uid()
    x = e.submit(counted, token, os.devnull)
    y = e.submit(block, x, 0.3)
    z = e.submit(len, y)
    key = x.key
    x.result()
    del x
    gc.collect()
    assert z.result() == len(token)
    assert y.result() == token
    # once nothing needs it, it goes
    poll(lambda: key not in e.who_has())


def test_release_of_computed_graph(e):
    futures = e.map(inc, range(1000, 1020))
    total_ = e.submit(sum, futures)
    keys = {f.key for f in futures}
    assert total_.result() == sum(range(1001, 1021))
    del futures
    gc.collect()
    poll(lambda: not keys & set(e.who_has()))
    assert total_.key in e.who_has()


# ---------------------------------------------------------------------------
# data: scatter, who_has, has_what, ncores


def test_who_has_has_what_ncores(e, cluster):
    ncores = e.ncores()
    assert ncores == {a: 1 for a in cluster.worker_addresses}
    x = e.submit(inc, 10**6 + 5)
    x.result()
    who = e.who_has([x])
    assert list(who) == [x.key]
    [holder] = who[x.key]
    assert holder in ncores
    assert x.key in e.has_what()[holder]
    assert x.key in e.has_what([holder])[holder]
    assert set(e.has_what()) == set(ncores)
    assert e.ncores([holder]) == {holder: 1}


def test_scatter_list(e):
    data = [1, 2, "three", 1.5]
    futures = e.scatter(data)
    assert isinstance(futures, list) and len(futures) == 4
    assert all(isinstance(f, Future) for f in futures)
    assert all(f.status == "finished" for f in futures)
    assert e.gather(futures) == data
    who = e.who_has(futures)
    assert all(who[f.key] for f in futures)
    # spread over both workers
    assert len({a for f in futures for a in who[f.key]}) == 2
    assert e.submit(nested_total, futures[:2] + futures[3:]).result() == 4.5
    assert e.submit(len, futures[2]).result() == 5


def test_scatter_dict(e):
    name = "scattered-" + uid()
    futures = e.scatter({name: 10, name + "-b": 20})
    assert set(futures) == {name, name + "-b"}
    assert futures[name].key == name
    assert e.gather(futures) == {name: 10, name + "-b": 20}
    assert e.submit(add, futures[name], futures[name + "-b"]).result() == 30
    assert name in e.who_has()


def test_scatter_single(e):
    value = "single-" + uid()
    f = e.scatter(value)
    assert isinstance(f, Future)
    assert f.result() == value
    assert f.type == "str"
    assert "type: str" in repr(f)
    assert e.submit(len, f).result() == len(value)


def test_scatter_returns_once_the_center_knows(e, cluster):
    """The batched update-data can reach the center after a later rpc on
    another connection: scatter waits until the center lists the data, so
    who_has right after it is never empty (the test delays the message)."""
    send = e._send

    def late_update(msg):
        if msg["op"] == "update-data":
            threading.Timer(0.5, send, [msg]).start()
            return None
        return send(msg)

    e._send = late_update
    try:
        f = e.scatter(uid())
        assert e.who_has([f])[f.key]
    finally:
        e._send = send


def test_scatter_workers(e, cluster):
    a, b = cluster.worker_addresses
    futures = e.scatter(list(range(100, 110)), workers=[b])
    who = e.who_has(futures)
    assert all(who[f.key] == [b] for f in futures)
    with pytest.raises(ValueError, match="127.0.0.1:1"):
        e.scatter([1], workers=["127.0.0.1:1"])


def test_scatter_broadcast(e, cluster):
    f = e.scatter(uid(), broadcast=True)
    assert e.who_has([f])[f.key] == sorted(cluster.worker_addresses)
    # usable from tasks on either worker, without transfers
    for w in cluster.worker_addresses:
        assert e.submit(len, f, workers=[w], key="len-" + w + f.key).result() == 32
    assert e.who_has([f])[f.key] == sorted(cluster.worker_addresses)


def test_scattered_data_released(e):
    f = e.scatter(uid())
    key = f.key
    assert key in e.who_has()
    del f
    gc.collect()
    poll(lambda: key not in e.who_has())


# ---------------------------------------------------------------------------
# restrictions


def test_workers_restriction(e, cluster):
    a, b = cluster.worker_addresses
    for i, w in enumerate((a, b)):
        futures = e.map(inc, range(2000 + 100 * i, 2010 + 100 * i), workers=[w])
        e.gather(futures)
        who = e.who_has(futures)
        assert all(who[f.key] == [w] for f in futures)
    f = e.submit(inc, 3000, workers=b)
    assert f.result() == 3001
    assert e.who_has([f])[f.key] == [b]


def test_workers_restriction_unknown_worker(e):
    with pytest.raises(ValueError, match="127.0.0.1:1"):
        e.submit(inc, 1, workers=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="127.0.0.1:1"):
        e.map(inc, [1, 2], workers=["127.0.0.1:1"])
    # nothing was left behind: the same work goes through unrestricted
    assert e.gather(e.map(inc, [1, 2])) == [2, 3]


def test_allow_other_workers(e, cluster):
    a, _ = cluster.worker_addresses
    f = e.submit(inc, 4000, workers=[a], allow_other_workers=True)
    assert f.result() == 4001


# ---------------------------------------------------------------------------
# what cannot be sent


def test_unpicklable_argument(e):
    sent = record_sends(e)
    before = set(e.futures)
    lock = threading.Lock()
    with pytest.raises(TypeError, match="serialize"):
        e.submit(inc, lock)
    with pytest.raises(TypeError):
        e.submit(total, 1, lock=lock)
    with pytest.raises(TypeError):
        e.map(inc, [1, lock])
    assert sent == []
    assert set(e.futures) == before
    # nothing half-made (a future whose task was never sent) is left for
    # the good items: submitted again, they run
    fs = e.map(inc, [1])
    wait(fs, timeout=5)
    assert e.gather(fs) == [2]


def test_unpicklable_function(e):
    sent = record_sends(e)
    lock = threading.Lock()

    def f(x):
        with lock:
            return x

    with pytest.raises(TypeError):
        e.submit(f, 1)
    with pytest.raises(TypeError):
        e.map(f, [1, 2])
    assert sent == []


def test_unserializable_result(e, cluster):
    a, b = cluster.worker_addresses
    x = e.submit(make_lock, workers=[a])
    # the result stays on the worker; fetching it fails, it does not hang
    with pytest.raises(TypeError, match="pickle"):
        x.result(timeout=10)
    assert x.status == "finished"
    # on the same worker it is usable
    assert "lock" in e.submit(str, x, workers=[a]).result(timeout=10)
    # a task on another worker cannot get it: an error, not an endless retry
    y = e.submit(repr, x, workers=[b])
    with pytest.raises(Exception) as info:
        y.result(timeout=10)
    assert not isinstance(info.value, TimeoutError)
    assert x.key in str(info.value)
    assert y.status == "error"


def test_future_of_another_executor(e, e2):
    x = e.submit(inc, 1)
    with pytest.raises(ValueError, match="another executor"):
        e2.submit(inc, x)
    with pytest.raises(ValueError):
        e2.map(inc, [x])
    with pytest.raises(ValueError):
        e2.gather([x])
    assert x.result() == 2


def test_future_pickles_as_key_reference(e):
    import pickle

    x = e.submit(inc, 1)
    x.result()
    # a future travels as a reference to its key, never as a value
    blob = pickle.dumps(x)
    assert x.key.encode() in blob


# ---------------------------------------------------------------------------
# run, upload_file, replicate, rebalance


def test_run(e, cluster):
    pids = e.run(get_pid)
    assert set(pids) == set(cluster.worker_addresses)
    assert set(pids.values()) == {p.pid for p in cluster.workers}
    assert e.run(total, 1, 2, x=3) == {a: 6 for a in cluster.worker_addresses}
    with pytest.raises(MyError):
        e.run(remote_failure, 1)
    [a, _] = cluster.worker_addresses
    assert e.run(total, 1, workers=[a]) == {a: 1}
    # a coroutine function is awaited on the worker
    assert e.run(async_total, 2, 3) == {w: 5 for w in cluster.worker_addresses}


def test_upload_file(e, cluster, tmp_path):
    name = "uploaded_%s" % uid()
    path = tmp_path / (name + ".py")
    path.write_text("def answer():\n    return 42\n")
    result = e.upload_file(str(path))
    assert set(result) == set(cluster.worker_addresses)
    assert e.submit(call_module, name).result() == 42
    assert e.run(call_module, name) == {a: 42 for a in cluster.worker_addresses}
    # a new version replaces the old one
    path.write_text("def answer():\n    return 43\n")
    e.upload_file(str(path))
    assert set(e.run(call_module, name).values()) == {43}


def test_replicate(e, cluster):
    a, b = cluster.worker_addresses
    futures = e.map(inc, range(5000, 5005), workers=[a])
    e.gather(futures)
    e.replicate(futures, n=2)
    poll(lambda: all(len(v) == 2 for v in e.who_has(futures).values()))
    who = e.who_has(futures)
    assert all(v == sorted([a, b]) for v in who.values())
    # the replicas are real: b has them
    assert set(f.key for f in futures) <= set(e.has_what([b])[b])
    # released everywhere once the futures go
    keys = [f.key for f in futures]
    del futures
    gc.collect()
    poll(lambda: not set(keys) & set(e.who_has()))
    assert not set(keys) & {k for ks in e.has_what().values() for k in ks}


def test_rebalance(e, cluster):
    a, b = cluster.worker_addresses
    # wait for what earlier tests left to be released
    poll(lambda: not e.who_has(), timeout=10, msg="an empty cluster")
    n, size = 10, 100_000
    futures = e.scatter([big(size, i) for i in range(n)], workers=[a])
    assert all(v == [a] for v in e.who_has(futures).values())
    e.rebalance()
    keys = {f.key for f in futures}

    def counts():
        hw = e.has_what()
        return {w: len(keys & set(hw[w])) for w in (a, b)}

    poll(lambda: sum(counts().values()) == n)
    c = counts()
    assert abs(c[a] - c[b]) <= 1, c
    # still readable, each key held once
    who = e.who_has(futures)
    assert all(len(v) == 1 for v in who.values())
    got = e.gather(futures)
    assert [int(x[0]) for x in got] == list(range(n))


def test_rebalance_subset(e, cluster):
    a, b = cluster.worker_addresses
    futures = e.scatter([big(50_000, i) for i in range(20, 24)], workers=[b])
    e.rebalance(futures)
    who = e.who_has(futures)
    on_a = sum(1 for v in who.values() if v == [a])
    on_b = sum(1 for v in who.values() if v == [b])
    assert on_a == on_b == 2
    assert [int(x[0]) for x in e.gather(futures)] == [20, 21, 22, 23]


# ---------------------------------------------------------------------------
# several executors, connection


def test_shutdown_releases_keys(cluster, e2):
    e1 = Executor(cluster.center_address)
    try:
        mine = e1.map(inc, range(6000, 6005))
        shared = e1.submit(inc, 6100)
        e1.gather(mine + [shared])
        keys = {f.key for f in mine}
        theirs = e2.map(inc, range(6200, 6203))
        shared2 = e2.submit(inc, 6100)
        e2.gather(theirs + [shared2])
        assert keys <= set(e2.who_has())
    finally:
        e1.shutdown()
    assert e1.status == "closed"
    poll(lambda: not keys & set(e2.who_has()), msg="release on disconnect")
    # the other executor is unaffected
    assert shared.key in e2.who_has()
    assert e2.gather(theirs) == [6201, 6202, 6203]
    assert shared2.result() == 6101
    assert e2.submit(sum, theirs).result() == 6201 + 6202 + 6203


def test_shutdown_with_pending_work(cluster, e2):
    e1 = Executor(cluster.center_address)
    token = uid()
    try:
        f = e1.submit(block, token, 0.3)
        g = e1.submit(len, f)
        key = f.key
    finally:
        start = time.time()
        e1.shutdown()
    assert time.time() - start < 3
    # futures that can never finish now are cancelled, not left pending
    assert f.status == g.status == "cancelled"
    # the running task is forgotten once it reports, its result dropped
    poll(lambda: key not in e2.sync(e2.center.task_states))
    assert key not in e2.who_has()
    assert e2.submit(inc, 1).result() == 2


def test_use_after_shutdown_raises(cluster):
    e1 = Executor(cluster.center_address)
    f = e1.submit(inc, 7000)
    f.result()
    e1.shutdown()
    e1.shutdown()  # twice is fine
    result = {}

    def use():
        for name, call in [("result", f.result), ("who_has", e1.who_has),
                           ("gather", lambda: e1.gather([f])),
                           ("submit", lambda: e1.submit(inc, 1))]:
            try:
                call()
                result[name] = "no error"
            except Exception as exc:
                result[name] = exc

    t = threading.Thread(target=use, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "a blocking call on a closed executor hangs"
    assert set(result) == {"result", "who_has", "gather", "submit"}
    assert all(isinstance(v, RuntimeError) for v in result.values()), result


def test_shutdown_wakes_waiting_threads(cluster):
    e1 = Executor(cluster.center_address)
    f = e1.submit(block, uid(), 1)
    got = {}

    def waiter():
        try:
            got["value"] = f.result()
        except BaseException as exc:
            got["error"] = exc

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    # until the thread waits on the future (an asyncio.Event on the loop)
    poll(lambda: getattr(f._state.event, "_waiters", True))
    e1.shutdown()
    t.join(5)
    assert not t.is_alive(), "a thread waiting on a future hangs after shutdown"
    assert isinstance(got.get("error"), CancelledError), got


def test_rescatter_released_key(e, cluster):
    """Scatter writes to the worker directly while the center's deletes come
    over the worker's stream: a delete of a released key must not drop a
    newer scattered copy of the same key (it used to, and result() then
    spun forever)."""
    import numpy as np

    a, _ = cluster.worker_addresses
    data = np.arange(5000) + 7
    # hold the release back a little, as a busy center would: it is then
    # processed after the new copy reached the worker
    held = []
    send = e._send

    def slow_release(msg):
        if msg["op"] == "client-releases-keys":
            held.append(msg)
            return None
        if msg["op"] == "update-data":
            for m in held:
                send(m)
            held.clear()
        return send(msg)

    e._send = slow_release
    f = e.scatter(data, workers=[a])
    key = f.key
    del f
    gc.collect()
    poll(lambda: held)
    f = e.scatter(data, workers=[a])
    assert f.key == key
    # once the center took both messages, a task through the same stream to
    # the worker makes sure the worker has seen whatever came before it
    poll(lambda: e.sync(e.center.task_states, keys=[key]) == {key: "memory"})
    assert e.submit(inc, 1, workers=[a], pure=False).result() == 2
    assert (f.result(timeout=3) == data).all()


def test_connect_timeout():
    port = free_port()
    threads = {t.name for t in threading.enumerate()}
    start = time.time()
    with pytest.raises(TimeoutError, match="127.0.0.1:%d" % port):
        Executor("127.0.0.1:%d" % port, timeout=1)
    assert time.time() - start < 5
    # the executor's loop thread did not stay behind
    poll(lambda: sum(t.name == "distributed-executor-loop"
                     for t in threading.enumerate())
         <= sum(n == "distributed-executor-loop" for n in threads))


def test_context_manager(cluster):
    with Executor(cluster.center_address) as e:
        assert e.status == "running"
        assert e.submit(inc, 41).result() == 42
    assert e.status == "closed"
    with pytest.raises(RuntimeError):
        e.submit(inc, 1)


def test_address_forms(cluster):
    ip, port = cluster.center_address.rsplit(":", 1)
    with Executor((ip, int(port))) as e:
        assert e.address == cluster.center_address
        assert e.submit(inc, 1).result() == 2


def test_from_another_thread(e):
    results = {}
    errors = []

    def work(i):
        try:
            fs = e.map(inc, range(i * 100, i * 100 + 20))
            results[i] = (e.submit(sum, fs).result(), e.gather(fs))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    for i in range(4):
        expected = list(range(i * 100 + 1, i * 100 + 21))
        assert results[i] == (sum(expected), expected)


def test_blocking_call_from_callback_loop_is_refused(e):
    # the sync API from inside the executor's own loop would deadlock
    async def inner():
        return e.gather([e.submit(inc, 1)])

    with pytest.raises(RuntimeError, match="await"):
        e.sync(inner)


# ---------------------------------------------------------------------------
# async use


def test_asyncio(cluster):
    async def main():
        e = Executor(cluster.center_address, start=False)
        await e._start()
        try:
            f = e.submit(inc, 1)
            assert await f == 2
            assert await e._gather([f]) == [2]
            futures = e.map(inc, range(5))
            assert await e._gather(futures) == [1, 2, 3, 4, 5]
            s = await e._scatter([10, 20])
            assert await e._gather(s) == [10, 20]
            g = e.submit(throws, 1)
            with pytest.raises(RuntimeError, match="hello!"):
                await g
            # start=False is asynchronous: the public forms are awaitable too
            assert await e.gather([f]) == [2]
            return f.key
        finally:
            await e._shutdown()

    key = asyncio.run(asyncio.wait_for(main(), 20))
    assert key.startswith("inc-")


def test_asyncio_context_manager(cluster):
    async def main():
        async with Executor(cluster.center_address, start=False) as e:
            assert e.status == "running"
            r = await e.submit(add, 1, 2)
        assert e.status == "closed"
        return r

    assert asyncio.run(asyncio.wait_for(main(), 20)) == 3


def test_tornado_coroutine(cluster):
    @gen.coroutine
    def main():
        e = Executor(cluster.center_address, start=False)
        yield e._start()
        try:
            f = e.submit(inc, 1)
            result = yield f
            assert result == 2
            results = yield e._gather([f, e.submit(inc, f)])
            assert results == [2, 3]
        finally:
            yield e._shutdown()
        return result

    async def run():
        return await main()

    assert asyncio.run(asyncio.wait_for(run(), 20)) == 2


# ---------------------------------------------------------------------------
# dask collections


def test_dask_array(e):
    import dask
    import dask.array as da
    import numpy as np

    x = da.arange(1000, chunks=100)
    (result,) = dask.compute(x.sum(), scheduler=e.get)
    assert result == sum(range(1000))
    y = (x + 1).reshape(10, 100).T
    assert np.array_equal(y.compute(scheduler=e.get), np.arange(1, 1001).reshape(10, 100).T)


def test_dask_dataframe(e):
    import dask
    import dask.dataframe as dd
    import pandas as pd

    pdf = pd.DataFrame({"a": range(100), "b": [i % 3 for i in range(100)]})
    df = dd.from_pandas(pdf, npartitions=4)
    (s,) = dask.compute(df.a.sum(), scheduler=e.get)
    assert s == 4950
    grouped = df.groupby("b").a.sum().compute(scheduler=e.get)
    pd.testing.assert_series_equal(grouped.sort_index(), pdf.groupby("b").a.sum())


def test_compute_returns_future(e):
    import dask.array as da

    x = da.ones(100, chunks=10)
    f = e.compute(x.sum())
    assert isinstance(f, Future)
    assert f.result() == 100
    fs = e.compute([x.sum(), x.mean()])
    assert [type(f) for f in fs] == [Future, Future]
    assert e.gather(fs) == [100, 1]
    assert e.compute(x.sum(), sync=True) == 100


def test_persist(e):
    import dask.array as da
    import numpy as np

    x = da.arange(100, chunks=10) * 2
    y = e.persist(x)
    assert type(y) is type(x)
    futures = [v for v in y.__dask_graph__().values() if isinstance(v, Future)]
    assert len(futures) == 10
    wait(futures)
    held = set(e.who_has())
    assert {f.key for f in futures} <= held
    assert y.sum().compute(scheduler=e.get) == 9900
    assert e.compute(y.sum()).result() == 9900
    assert np.array_equal(y.compute(scheduler=e.get), np.arange(100) * 2)
    # the persisted data lives as long as the collection
    keys = {f.key for f in futures}
    del y, futures
    gc.collect()
    poll(lambda: not keys & set(e.who_has()))


def test_persist_dataframe(e):
    import dask.dataframe as dd
    import pandas as pd

    df = dd.from_pandas(pd.DataFrame({"a": range(50)}), npartitions=5)
    df2 = e.persist(df)
    assert df2.a.sum().compute(scheduler=e.get) == sum(range(50))
    assert len(df2.compute(scheduler=e.get)) == 50


def test_futures_in_graph(e):
    x = e.submit(inc, 1)
    y, x2 = "y-" + uid(), "x2-" + uid()
    assert e.get({y: (inc, x), x2: x}, [y, x2]) == [3, 2]
    assert x.result() == 2


# ---------------------------------------------------------------------------
# progress


def test_progress_text(e):
    futures = e.map(slowinc, range(20), delay=0.01)
    buf = io.StringIO()
    progress(futures, file=buf, interval=0.01, notebook=False)
    out = buf.getvalue()
    last = out.rstrip("\n").split("\r")[-1]
    assert "100%" in last
    assert "Completed" in last
    assert last.count("#") == 40
    assert all(f.done() for f in futures)


def test_progress_counts_errors(e):
    futures = [e.submit(throws, uid()), e.submit(inc, 1)]
    buf = io.StringIO()
    progress(futures, file=buf, interval=0.01, notebook=False)
    last = buf.getvalue().rstrip("\n").split("\r")[-1]
    assert "100%" in last
    assert "1 erred" in last


# ---------------------------------------------------------------------------
# restart


def test_restart(tmp_path):
    e = Executor(n_workers=2)
    e2 = None
    try:
        e2 = Executor(e.cluster.center_address)
        pids = set(e.run(os.getpid).values())
        assert len(pids) == 2
        x = e.submit(inc, 1)
        y = e.map(slowinc, range(50), delay=0.05)
        z = e2.submit(inc, 10)
        x.result()
        z.result()
        e.restart()
        assert x.cancelled() and x.status == "cancelled"
        assert all(f.cancelled() for f in y)
        with pytest.raises(CancelledError):
            x.result()
        # the other executor's futures are gone too
        poll(lambda: z.cancelled())
        # fresh worker processes, no data
        new_pids = set(e.run(os.getpid).values())
        assert len(new_pids) == 2
        assert not new_pids & pids
        assert len(e.ncores()) == 2
        assert e.who_has() == {}
        # usable afterwards, by both
        assert e.submit(inc, 1).result() == 2
        assert e.gather(e.map(inc, range(5))) == [1, 2, 3, 4, 5]
        assert e2.submit(inc, 10).result() == 11
    finally:
        if e2 is not None:
            e2.shutdown()
        e.shutdown()


def test_compute_graph_dict(e):
    futures = e.compute({"a": 1, "b": (inc, "a"), "c": (add, "a", "b")})
    assert set(futures) == {"a", "b", "c"}
    assert futures["c"].result() == 3
    assert e.compute({"x": (inc, 10)}, sync=True) == {"x": 11}


def test_story_of_a_future(e):
    x = e.submit(inc, 1)
    y = e.submit(inc, x)
    assert y.result() == 3
    story = e.story(x)
    assert [(s["start"], s["finish"]) for s in story][:3] == [
        ("released", "waiting"), ("waiting", "processing"), ("processing", "memory")]
    assert story[2]["worker"] in e.ncores()
    both = e.story(x, y.key)
    assert {s["key"] for s in both} == {x.key, y.key}
    assert e.story("never-submitted-" + uid()) == []
