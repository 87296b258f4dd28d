"""Local clusters: ``Executor()`` without an address, ``LocalCluster``, and
workers dying under real load (SIGKILL)."""

import asyncio
import os
import signal
import threading
import warnings

import psutil
import pytest

from distributed import Executor, LocalCluster
from distributed.scheduler import LostData
from distributed.utils_test import gone, inc, poll, slowinc

pytestmark = pytest.mark.processes


def kill(cluster, process):
    """SIGKILL a worker of ``cluster``; it stops counting as one of its workers."""
    os.kill(process.pid, signal.SIGKILL)
    process.proc.wait(10)
    try:
        cluster.workers.remove(process)
    except ValueError:  # the cluster noticed first
        pass


def cluster_pids(cluster):
    return [cluster.center.pid] + [p.pid for p in cluster.workers]


def listening_ips(pid):
    proc = psutil.Process(pid)
    conns = proc.net_connections(kind="inet")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def cluster():
    c = LocalCluster(n_workers=2, threads_per_worker=1)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def e(cluster):
    e = Executor(cluster.center_address)
    try:
        yield e
    finally:
        e.shutdown()


def test_executor_starts_local_cluster():
    e = Executor(n_workers=2)
    pids = []
    try:
        assert e.cluster is not None
        pids = cluster_pids(e.cluster)
        assert len(pids) == 3
        assert all(psutil.pid_exists(p) for p in pids)
        assert e.address.startswith("127.0.0.1:")
        ncores = e.ncores()
        assert len(ncores) == 2
        assert all(a.startswith("127.0.0.1:") for a in ncores)
        # nothing listens beyond the loopback interface
        for pid in pids:
            ips = listening_ips(pid)
            assert ips and ips <= {"127.0.0.1"}, (pid, ips)
        assert e.submit(inc, 1).result() == 2
        assert e.gather(e.map(inc, range(10))) == list(range(1, 11))
    finally:
        e.shutdown()
    assert e.status == "closed"
    poll(lambda: all(gone(p) for p in pids), msg="the cluster's processes exiting")


def test_local_cluster_context_manager():
    with LocalCluster(n_workers=1) as c:
        pids = cluster_pids(c)
        assert c.status == "running"
        assert len(c.worker_addresses) == 1
        with Executor(c.center_address) as e:
            assert list(e.ncores()) == c.worker_addresses
            assert e.submit(inc, 10).result() == 11
    assert c.status == "closed"
    poll(lambda: all(gone(p) for p in pids), msg="the cluster's processes exiting")


def test_killed_worker_mid_map(cluster, e):
    futures = e.map(slowinc, range(300), delay=0.01)
    # let both workers compute and hold some results
    poll(lambda: sum(f.done() for f in futures) >= 60, timeout=20)
    victim = cluster.workers[0]
    held = e.has_what([victim.address])[victim.address]
    assert held, "the victim held nothing yet"
    kill(cluster, victim)
    assert e.gather(futures) == list(range(1, 301))
    # the center noticed, and nothing is believed to live on the dead worker
    poll(lambda: victim.address not in e.ncores())
    who = e.who_has(futures)
    assert set(who) == {f.key for f in futures}
    assert all(v and victim.address not in v for v in who.values())
    assert e.submit(sum, futures).result() == sum(range(1, 301))


def test_killed_worker_scattered_data_lost(cluster, e):
    a, b = cluster.worker_addresses
    # bigger than what travels with the results: it must come from the worker
    data = list(range(10000))
    [x] = e.scatter([data], workers=[a])
    [y] = e.scatter([[1, 2, 3]], workers=[b])
    dependent = e.submit(len, x, workers=[a])
    assert dependent.result() == 10000
    assert e.who_has([x]) == {x.key: [a]}
    victim = cluster.workers[0]
    assert victim.address == a
    kill(cluster, victim)
    poll(lambda: a not in e.ncores())
    with pytest.raises(LostData) as info:
        x.result(timeout=10)
    assert "lost" in str(info.value)
    assert x.key in str(info.value)
    assert x.status == "error"
    # new work on the lost data fails the same way
    with pytest.raises(LostData):
        e.submit(sum, x, pure=False).result(timeout=10)
    # data held by the survivor is fine
    assert y.result() == [1, 2, 3]
    assert e.submit(sum, y).result() == 6


def dworker_children():
    """Our child processes that are dworkers (a closed cluster leaves none)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "distributed.cli.dworker" in child.cmdline() and \
                    child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_close_while_a_dead_worker_is_being_replaced():
    """close() stops the worker the cluster is starting in place of a dead
    one, and starts no other: nothing of the cluster outlives it (before, a
    replacement started after close() kept the interpreter ~30 s at exit)."""
    cluster = LocalCluster(n_workers=1)
    try:
        os.kill(cluster.workers[0].pid, signal.SIGKILL)
        poll(lambda: cluster.deaths, timeout=10, msg="the cluster noticed the death")
    finally:
        cluster.close()
    poll(lambda: not dworker_children(), timeout=5, msg="no worker left after close()")
    poll(lambda: not any(t.name == "distributed-local-cluster-watch"
                         for t in threading.enumerate()),
         timeout=5, msg="the watch thread ended")
    assert cluster.workers == []


def test_worker_options_reach_the_workers():
    with Executor(n_workers=2, worker_options={"name": "w", "memory_limit": "1GB"}) as e:
        cmdlines = [psutil.Process(p.pid).cmdline() for p in e.cluster.workers]
        assert all("--memory-limit" in c and "1GB" in c for c in cmdlines)
        assert sorted(c[c.index("--name") + 1] for c in cmdlines) == ["w-0", "w-1"]
        assert e.run(lambda: 1) and e.submit(inc, 1).result() == 2


@pytest.mark.processes
def test_lost_data_names_the_cause_the_cluster_saw():
    """The cluster, the nanny of its workers, tells the center why one
    died: the LostData of data only it held says so."""
    with LocalCluster(n_workers=2) as cluster, Executor(cluster.center_address) as e:
        victim = cluster.workers[0]
        [x] = e.scatter([123], workers=[victim.address])
        os.kill(victim.pid, signal.SIGKILL)  # the cluster notices, and restarts it
        with pytest.raises(LostData) as info:
            x.result(timeout=20)
        assert "which died (killed by signal SIGKILL" in str(info.value), info.value
        poll(lambda: cluster.deaths, timeout=10)


def test_cluster_made_inside_a_running_loop_still_reports_deaths():
    """As in Jupyter, where the main thread runs an event loop: the
    cluster's calls to the center (watch its workers, report a death) are
    made from a thread of their own, not refused (a coroutine never
    awaited), and LostData still names the cause."""

    async def main():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            cluster = LocalCluster(n_workers=1)
        return cluster

    cluster = asyncio.run(main())
    try:
        with Executor(cluster.center_address) as e:
            victim = cluster.workers[0]
            [x] = e.scatter([123], workers=[victim.address])
            os.kill(victim.pid, signal.SIGKILL)
            with pytest.raises(LostData) as info:
                x.result(timeout=20)
            assert "which died (killed by signal SIGKILL" in str(info.value), info.value
    finally:
        cluster.close()
