"""Inputs that used to hang or leak (issue 8, "Hangs"): cyclic graphs,
tasks raising BaseExceptions or hostile exception objects, erred futures
that could not be released, tuple keys, tasks over the center's message
limit.  Real processes: the ``cluster`` fixture of conftest.py (a
LocalCluster whose workers import this module).
"""

import asyncio
import gc
import os
import time

import pytest

from distributed import Executor
from distributed.graph import CycleError, get_dependencies, toposort
from distributed.utils_test import (free_port, inc, local_cluster, poll, processes,
                                    record_sends, slowinc, start_center, start_worker, uid)


# ---------------------------------------------------------------------------
# functions the workers run


class CustomBaseError(BaseException):
    pass


class HostileError(Exception):
    """Neither str() nor repr() works, and it does not pickle."""

    def __init__(self):
        super().__init__()
        self.lock = __import__("threading").Lock()

    def __str__(self):
        raise RuntimeError("no str")

    def __repr__(self):
        raise RuntimeError("no repr")


class NoUnpickle(Exception):
    """Pickles, but cannot be rebuilt: __init__ needs two arguments."""

    def __init__(self, a, b):
        super().__init__(a)


def raise_cancelled(x):
    raise asyncio.CancelledError("cancelled inside %s" % x)


def raise_custom(x):
    raise CustomBaseError("custom %s" % x)


def raise_system_exit(x):
    raise SystemExit(3)


def raise_keyboard_interrupt(x):
    raise KeyboardInterrupt("interrupt %s" % x)


def raise_pytest_fail(x):
    pytest.fail("failed %s" % x)


def raise_hostile(x):
    raise HostileError()


def raise_no_unpickle(x):
    raise NoUnpickle(1, 2)


def fails_first_time(path):
    """Raise on the first call (leaving ``path``), return 42 afterwards."""
    if not os.path.exists(path):
        open(path, "w").close()
        raise ValueError("first call")
    return 42


def wait_for_file(path, value):
    """Return ``value`` once ``path`` exists."""
    while not os.path.exists(path):
        time.sleep(0.02)
    return value


# ---------------------------------------------------------------------------
# cycles


def test_toposort_names_the_cycle():
    with pytest.raises(CycleError, match="the graph has a cycle: a -> b -> a"):
        toposort({"a": (inc, "b"), "b": (inc, "a")})
    with pytest.raises(ValueError, match="a -> a"):
        toposort({"a": (inc, "a")})
    assert toposort({"x": 1, "y": (inc, "x"), "z": (inc, "y")}) == ["x", "y", "z"]


def test_key_none_is_not_its_own_dependency():
    assert get_dependencies({None: (inc, 1)}, None) == set()
    assert toposort({None: (inc, 1)}) == [None]


def _chain(n, cyclic=False):
    dsk = {("x", 0): (inc, ("x", n - 1)) if cyclic else 1}
    dsk.update({("x", i): (inc, ("x", i - 1)) for i in range(1, n)})
    return dsk


def test_toposort_200000_keys_quickly():
    dsk = _chain(200000)
    start = time.time()
    order = toposort(dsk)  # iterative: no recursion limit
    assert time.time() - start < 10
    assert order[:2] == [("x", 0), ("x", 1)] and len(order) == 200000
    start = time.time()
    with pytest.raises(CycleError) as info:
        toposort(_chain(200000, cyclic=True))
    assert time.time() - start < 10
    assert len(info.value.cycle) == 200001
    assert len(str(info.value)) < 500  # a readable message, not 200,000 keys


def test_cyclic_graph_raises_before_sending(e):
    sent = record_sends(e)
    with pytest.raises(ValueError, match="the graph has a cycle: a -> b -> a"):
        e.get({"a": (inc, "b"), "b": (inc, "a")}, "a")
    with pytest.raises(CycleError):
        e.get({"c": (inc, "d"), "d": (inc, "e"), "e": (inc, "c"), "f": 1}, ["f"])
    assert sent == []
    # None is no key (as in dask): refused clearly, never a self-dependency
    with pytest.raises(ValueError, match="invalid key None"):
        e.get({None: (inc, 1)}, None)
    assert sent == []


def test_large_cyclic_graph_raises_quickly(e):
    sent = record_sends(e)
    start = time.time()
    with pytest.raises(CycleError):
        e.get(_chain(200000, cyclic=True), ("x", 0))
    assert time.time() - start < 30
    assert sent == []


def test_large_chain_graph_passes_the_check_quickly(e):
    """The client side of get() on a 200,000-key chain (checked, pickled,
    the update-graph made; not run: the cluster has 2 cores)."""
    sent = []
    e._send = sent.append  # keep it off the cluster
    start = time.time()
    futures = e._graph_to_futures(_chain(200000), [("x", 199999)])
    assert time.time() - start < 30
    (msg,) = sent
    assert msg["op"] == "update-graph" and len(msg["tasks"]) == 200000
    assert list(msg["tasks"])[:2] == [("x", 0), ("x", 1)]  # dependencies first
    del futures


def test_scheduler_refuses_a_cyclic_graph():
    """A client that sends a cycle anyway gets an error, not a hang."""
    from distributed.scheduler import Scheduler

    s = Scheduler()
    s.add_worker("w:1", ncores=1)
    s.update_graph("c", tasks={"a": {}, "b": {}},
                   dependencies={"a": ["b"], "b": ["a"]}, keys=["a"])
    (msg,) = s.to_clients["c"]
    assert msg["op"] == "task-erred" and msg["key"] == "a"
    assert isinstance(msg["exception"], CycleError)
    assert not s.tasks and not s.to_workers


# ---------------------------------------------------------------------------
# BaseExceptions and hostile exceptions raised by tasks


@pytest.mark.parametrize("func, kind", [
    (raise_cancelled, asyncio.CancelledError),
    (raise_custom, CustomBaseError),
    (raise_system_exit, SystemExit),
    (raise_keyboard_interrupt, KeyboardInterrupt),
    # its class says it lives in builtins: it travels by value (cloudpickle),
    # a class of the same name
    (raise_pytest_fail, BaseException),
])
def test_base_exception_is_the_tasks_error(e, func, kind):
    f = e.submit(func, uid())
    with pytest.raises(kind) as info:
        f.result(timeout=10)
    assert type(info.value).__name__ == kind.__name__ or kind is BaseException
    assert f.status == "error"
    exc = f.exception(timeout=5)
    assert isinstance(exc, kind)
    if func is raise_pytest_fail:
        assert type(exc).__name__ == "Failed" and "failed" in str(exc)
    assert e.submit(inc, 1).result(timeout=10) == 2  # the worker goes on


def test_hostile_exception_becomes_a_stand_in(e):
    from distributed.core import RemoteException

    f = e.submit(raise_hostile, uid())
    with pytest.raises(RemoteException) as info:
        f.result(timeout=10)
    assert "HostileError" in str(info.value)
    assert "str() failed" in str(info.value)
    assert "raise_hostile" in info.value.text  # the traceback text came along
    assert e.submit(inc, 2).result(timeout=10) == 3


def test_exception_that_does_not_unpickle(e):
    from distributed.core import RemoteException

    f = e.submit(raise_no_unpickle, uid())
    with pytest.raises(RemoteException, match="NoUnpickle"):
        f.result(timeout=10)


def test_error_message_survives_hostile_exception():
    from distributed.core import RemoteException, error_message

    try:
        raise HostileError()
    except HostileError as exc:
        msg = error_message(exc)
    assert isinstance(msg["exception"], RemoteException)
    assert str(msg["exception"]) == "HostileError: <HostileError: str() failed>"
    assert "HostileError" in msg["text"]


# ---------------------------------------------------------------------------
# releasing and retrying erred futures


def test_retry(e, tmp_path):
    path = str(tmp_path / uid())
    f = e.submit(fails_first_time, path)
    with pytest.raises(ValueError, match="first call"):
        f.result(timeout=10)
    f.retry()
    assert f.result(timeout=10) == 42
    assert f.status == "finished"


def test_retry_reruns_erred_dependencies(e, tmp_path):
    path = str(tmp_path / uid())
    x = e.submit(fails_first_time, path)
    y = e.submit(inc, x)
    with pytest.raises(ValueError):
        y.result(timeout=10)
    e.retry([y])
    assert y.result(timeout=10) == 43
    assert x.result(timeout=10) == 42


def test_scheduler_retry():
    """Retry reruns the erred chain; a key the scheduler does not know (a new
    center) errs instead of leaving the future pending."""
    from distributed.scheduler import Scheduler

    s = Scheduler()
    s.add_worker("w:1", ncores=1)
    s.update_graph("c", tasks={"x": {}, "y": {}},
                   dependencies={"x": [], "y": ["x"]}, keys=["y"])
    s.task_erred("w:1", "x", exception=b"boom", text="boom")
    assert s.task_states() == {"x": "erred", "y": "erred"}
    s.flush()
    s.retry("c", ["y", "gone"])
    assert s.task_states() == {"x": "processing", "y": "waiting"}
    assert s.tasks["y"].exception is None
    tw, tc = s.flush()
    assert [m["key"] for m in tw["w:1"] if m["op"] == "compute-task"] == ["x"]
    assert [(m["op"], m["key"]) for m in tc["c"]] == [("task-erred", "gone")]


def _fail_once_then_drop(e, path):
    f = e.submit(fails_first_time, path)
    try:
        f.result(timeout=10)
    except ValueError:
        pass
    else:
        raise AssertionError("did not fail")
    key = f.key
    return key


def test_erred_future_is_released(e, tmp_path):
    """The traceback kept no frames holding the future: ``del f`` releases
    the key, and the same pure call runs again."""
    path = str(tmp_path / uid())
    key = _fail_once_then_drop(e, path)
    gc.collect()
    poll(lambda: key not in e.futures, timeout=5, msg="erred key released")
    assert e.submit(fails_first_time, path).result(timeout=10) == 42


def test_erred_dependency_released_with_its_dependent(e, tmp_path):
    path = str(tmp_path / uid())
    x = e.submit(fails_first_time, path)
    y = e.submit(inc, x)
    with pytest.raises(ValueError):
        y.result(timeout=10)
    key = y.key
    del x, y
    gc.collect()
    poll(lambda: key not in e.futures, timeout=5, msg="erred keys released")
    x = e.submit(fails_first_time, path)
    assert e.submit(inc, x).result(timeout=10) == 43


@pytest.mark.processes
def test_center_restart_pending_completes_and_erred_can_be_retried(tmp_path):
    """Across a center restart: a pending future completes (its task is sent
    again), and a future that erred before the restart can be retried on the
    new center, which never heard of its task."""
    port = free_port()
    with processes() as start:
        center = start_center(start, port)
        start_worker(start, port, "--no-nanny")
        with Executor("127.0.0.1:%d" % port) as e:
            path = str(tmp_path / uid())
            erred = e.submit(fails_first_time, path)
            with pytest.raises(ValueError):
                erred.result(timeout=10)
            gate = tmp_path / uid()
            x = e.submit(wait_for_file, str(gate), 10)
            poll(lambda: "processing" in e.sync(e.center.task_states).values(), timeout=10)
            center.kill()
            start_center(start, port)
            gate.touch()
            assert x.result(timeout=20) == 10
            assert erred.status == "error"
            erred.retry()
            assert erred.result(timeout=20) == 42
            f = e.submit(fails_first_time, str(tmp_path / uid()))
            with pytest.raises(ValueError):
                f.result(timeout=10)
            f.retry()
            assert f.result(timeout=10) == 42


# ---------------------------------------------------------------------------
# keys


def test_tuple_keys_everywhere(e):
    name = "t-" + uid()
    f = e.submit(inc, 1, key=(name, 1))
    assert f.result(timeout=10) == 2
    assert repr(f) == "<Future: status: finished, type: int, key: %s>" % ((name, 1),)
    fs = e.map(inc, [10, 20], key=[(name, 2), (name, 3)])
    assert e.gather(fs) == [11, 21]
    assert e.gather({"a": f, "b": fs}) == {"a": 2, "b": [11, 21]}
    who = e.who_has([f] + fs)
    assert set(who) == {(name, 1), (name, 2), (name, 3)}
    assert all(who.values())
    g = e.submit(inc, f, key=(name, 4))  # a tuple-keyed dependency
    assert g.result(timeout=10) == 3


def test_map_duplicate_keys(e):
    sent = record_sends(e)
    with pytest.raises(ValueError, match=r"duplicate keys.*'a'"):
        e.map(inc, [1, 2, 3], key=["a", "b", "a"])
    assert sent == []


# ---------------------------------------------------------------------------
# a task over the center's message limit


@pytest.fixture(scope="module")
def small_cluster():
    with local_cluster({"DISTRIBUTED_MAX_MESSAGE_SIZE": str(2**20)}, n_workers=1) as c:
        yield c


def test_task_over_message_limit_fails_alone(small_cluster):
    with Executor(small_cluster.center_address) as e:
        assert e.max_message_size == 2**20  # the center told it
        pending = e.submit(slowinc, 1, delay=0.5)
        with pytest.raises(ValueError, match=r"task .* is 2\.0 MiB pickled.*512\.0 KiB"):
            e.submit(len, b"x" * 2**21)
        with pytest.raises(ValueError, match="MiB pickled"):
            e.map(len, [b"x", b"y" * 2**21])
        assert pending.result(timeout=10) == 2
        # many tasks each under the limit but together over it go in
        # several batches instead of closing the stream
        fs = [e.submit(len, bytes([i]) * 300000) for i in range(8)]
        assert e.gather(fs) == [300000] * 8
        # and so do one map and one graph over it: sent in several parts
        fs = e.map(len, [bytes([i]) * 200000 for i in range(10, 20)])
        assert e.gather(fs) == [200000] * 10
        name = "big-" + uid()
        dsk = {(name, i): (len, bytes([i]) * 200000) for i in range(10)}
        dsk[name] = (sum, list(dsk))
        assert e.get(dsk, name) == 2000000
        assert e.status == "running"
