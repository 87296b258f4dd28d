"""Leaks and unclear errors, on real processes: bounded output capture,
file descriptors of closed executors, children that outlive a killed client,
workers removed for missed heartbeats, center options of a LocalCluster.

The functions below are sent to the workers by reference: the clusters get
this directory on their PYTHONPATH (the ``on_path`` fixture).
"""

import os
import signal
import sys
import time

import psutil
import pytest

from distributed import Executor, LocalCluster
from distributed.process import Process, Tail
from distributed.scheduler import KilledWorker
from distributed.utils_test import child_env, free_port, gone, hold_gil, poll

PY = sys.executable
MB = 2**20


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])


def print_lines(megabytes, marker):
    """Print ``megabytes`` MiB of 100-character lines, then ``marker``."""
    chunk = ("x" * 99 + "\n") * (MB // 100)
    for _ in range(megabytes):
        sys.stdout.write(chunk)
    print(marker, flush=True)
    return megabytes


def rss(pid=None):
    return psutil.Process(pid).memory_info().rss


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- output capture -------------------------------------------------------------


def test_tail_keeps_the_last_lines_within_its_bounds():
    t = Tail(max_lines=3, max_chars=10**6)
    for i in range(10):
        t.append("%d\n" % i)
    assert t.text() == "7\n8\n9\n" and t.dropped == 7
    t = Tail(max_lines=100, max_chars=10)
    for i in range(10):
        t.append("abcd\n")
    assert len(t) == 2 and t.text(1) == "abcd\n"


@pytest.mark.processes
def test_chatty_task_costs_the_client_little_memory(on_path):
    """An ``Executor()``-style cluster in this process: its workers' output
    passes through here, and only its tail stays."""
    with LocalCluster(n_workers=1) as cluster, Executor(cluster.center_address) as e:
        (worker,) = cluster.workers
        assert e.submit(print_lines, 1, "warm-up", pure=False).result(timeout=30) == 1
        worker.wait_for_line("warm-up")
        before = rss()
        assert e.submit(print_lines, 64, "the end", pure=False).result(timeout=60) == 64
        worker.wait_for_line("the end", timeout=60)
        assert rss() - before < 16 * MB, (rss() - before) / MB
        assert worker.tail(1) == "the end\n"  # for death reports
        assert len(worker.output) <= 1000


@pytest.mark.processes
@pytest.mark.timeout(120)  # the nanny echoes each line: ~10 s on an idle machine
def test_chatty_task_costs_the_nanny_little_memory(on_path):
    port = free_port()
    center = Process([PY, "-m", "distributed.cli.dcenter", "--port", str(port)])
    nanny = Process([PY, "-m", "distributed.cli.dworker", "127.0.0.1:%d" % port,
                     "--ncores", "1"])
    try:
        center.wait_for_line("Start center at")
        nanny.wait_for_line("Registered with center")
        with Executor("127.0.0.1:%d" % port) as e:
            assert e.submit(print_lines, 1, "warm-up", pure=False).result(timeout=30)
            nanny.wait_for_line("warm-up")  # the nanny echoes its worker's lines
            before, here = rss(nanny.pid), rss()
            assert e.submit(print_lines, 64, "the end", pure=False).result(timeout=60)
            nanny.wait_for_line("the end", timeout=60)
            assert rss(nanny.pid) - before < 16 * MB, (rss(nanny.pid) - before) / MB
            assert rss() - here < 16 * MB, (rss() - here) / MB
    finally:
        nanny.stop()
        center.stop()


@pytest.mark.processes
def test_death_report_carries_the_tail_of_the_output(on_path, caplog):
    with LocalCluster(n_workers=1) as cluster, Executor(cluster.center_address) as e:
        (worker,) = cluster.workers
        assert e.submit(print_lines, 2, "last words", pure=False).result(timeout=30)
        worker.wait_for_line("last words")
        os.kill(worker.pid, signal.SIGKILL)
        poll(lambda: cluster.deaths, msg="the cluster notices the death")
        poll(lambda: any("last words" in r.getMessage() and "died" in r.getMessage()
                         for r in caplog.records), msg="the warning has the tail")


# -- file descriptors -------------------------------------------------------------


@pytest.mark.processes
def test_executor_shutdown_closes_its_file_descriptors():
    me = psutil.Process()
    with LocalCluster(n_workers=1) as cluster:
        Executor(cluster.center_address).shutdown()  # warm-up: imports, pools
        before = me.num_fds()
        for _ in range(20):
            e = Executor(cluster.center_address)
            assert len(e.ncores()) == 1
            e.shutdown()
        assert me.num_fds() - before <= 2, (before, me.num_fds())


# -- children exit with their parent ----------------------------------------------


CLIENT = """
import os, time
from distributed import Executor
e = Executor(n_workers=2)
print("pids", e.cluster.center.pid, *[p.pid for p in e.cluster.workers], flush=True)
time.sleep(600)
"""


@pytest.mark.processes
def test_local_cluster_exits_with_a_killed_client():
    client = Process([PY, "-c", CLIENT])
    pids = []
    try:
        line = client.wait_for_line("^pids ", timeout=60)
        pids = [int(p) for p in line.split()[1:]]
        descendants = [p.pid for p in psutil.Process(client.pid).children(recursive=True)]
        assert set(pids) <= set(descendants) and len(pids) == 3
        pids = descendants
        os.kill(client.pid, signal.SIGKILL)
        client.proc.wait(10)
        poll(lambda: all(gone(p) for p in pids), timeout=10,
             msg="the cluster of a killed client exits")
    finally:
        client.kill()
        kill_all(pids)


@pytest.mark.processes
def test_worker_exits_with_a_killed_nanny():
    port = free_port()
    center = Process([PY, "-m", "distributed.cli.dcenter", "--port", str(port)])
    nanny = Process([PY, "-m", "distributed.cli.dworker", "127.0.0.1:%d" % port,
                     "--ncores", "1"])
    worker = None
    try:
        center.wait_for_line("Start center at")
        nanny.wait_for_line("Registered with center")
        (worker,) = psutil.Process(nanny.pid).children()
        os.kill(nanny.pid, signal.SIGKILL)
        poll(lambda: gone(worker.pid), timeout=10, msg="the worker of a killed nanny exits")
    finally:
        nanny.kill()
        center.stop()
        if worker is not None:
            kill_all([worker.pid])


@pytest.mark.processes
def test_child_behind_a_wrapper_keeps_running_while_its_parent_lives():
    """A shell between us and the center (it forks: ``; true``) is not taken
    for a dead parent; the center exits once the shell is killed."""
    port = free_port()
    wrapped = Process(["sh", "-c", "%s -m distributed.cli.dcenter --port %d; true"
                       % (PY, port)])
    try:
        wrapped.wait_for_line("Start center at")
        (center,) = psutil.Process(wrapped.pid).children()
        with Executor("127.0.0.1:%d" % port, timeout=5) as e:
            time.sleep(1.5)  # three rounds of the parent watch
            assert e.ncores() == {} and center.is_running()
        os.kill(wrapped.pid, signal.SIGKILL)
        poll(lambda: gone(center.pid), timeout=10, msg="the center of a killed shell exits")
    finally:
        wrapped.kill()


# -- missed heartbeats, center options --------------------------------------------


@pytest.mark.processes
def test_local_cluster_passes_center_options():
    with pytest.raises(TypeError, match="heartbeat_timeout"):
        LocalCluster(n_workers=0, heartbeat_timout=3)
    with pytest.raises(TypeError, match="local cluster"):
        Executor("127.0.0.1:1", heartbeat_timeout=3)
    with LocalCluster(n_workers=0, heartbeat_timeout=3.5, allowed_failures=0) as cluster:
        cmdline = psutil.Process(cluster.center.pid).cmdline()
        assert "--heartbeat-timeout" in cmdline and "3.5" in cmdline
        with Executor(cluster.center_address) as e:
            identity = e.sync(e.center.identity)
            assert identity["heartbeat_timeout"] == 3.5
            assert identity["allowed_failures"] == 0


@pytest.mark.processes
def test_gil_holding_task_is_reported_as_missed_heartbeats(on_path):
    """A worker without a nanny that holds the GIL longer than the heartbeat
    timeout is removed; its task's error and the center's log say why, not
    "segfault"."""
    with Executor(n_workers=1, heartbeat_timeout=2, allowed_failures=0) as e:
        f = e.submit(hold_gil, 8, pure=False)
        with pytest.raises(KilledWorker) as info:
            f.result(timeout=30)
        message = str(info.value)
        assert "stopped answering heartbeats" in message, message
        assert "GIL" in message and "segfault" not in message, message
        center = e.cluster.center
        poll(lambda: "stopped answering heartbeats" in center.tail(50),
             msg="the center's log names the heartbeats")
