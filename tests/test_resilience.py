"""Faults on real processes: center restart, busy vs dead workers, nannies.

Every cluster here is made of real ``dcenter`` / ``dworker`` processes on
free ports, stopped even when a test fails.
"""

import ctypes
import os
import signal
import time
from contextlib import contextmanager

import numpy as np
import pytest

from distributed import Executor
from distributed.scheduler import VALIDATE_ENV, KilledWorker, LostData
from distributed import utils_test
from distributed.utils_test import (add, free_port, hold_gil, inc, poll, slowinc, start_center,
                                    start_worker)

pytestmark = pytest.mark.processes


def processes():
    """Processes whose centers check the scheduler's invariants after every
    batch; one that logged a broken invariant fails the test."""
    return utils_test.processes(env={VALIDATE_ENV: "1"})


def small_cluster(start, *center_args, workers=1):
    """A center (``center_args``) and ``workers`` single-threaded workers
    under nannies, started with ``start``; returns the center's process, the
    nannies' and the address an executor connects to."""
    port = free_port()
    center = start_center(start, port, *center_args)
    nannies = [start_worker(start, port, "--ncores", "1") for _ in range(workers)]
    return center, nannies, "127.0.0.1:%d" % port


def test_center_restart_keeps_data():
    port = free_port()
    with processes() as start:
        center = start_center(start, port)
        for _ in range(2):
            start_worker(start, port, "--no-nanny")
        with Executor("127.0.0.1:%d" % port) as e:
            x = e.submit(inc, 1)
            y = e.scatter(np.arange(10))
            assert x.result() == 2
            center.kill()
            start_center(start, port)
            # the workers re-register what they hold; the executor reconnects
            assert x.result(timeout=20) == 2
            assert (y.result(timeout=20) == np.arange(10)).all()
            assert e.submit(inc, 10).result(timeout=20) == 11
            # both workers come back (each on its own reconnect schedule)
            poll(lambda: len(e.ncores()) == 2, timeout=20, msg="both workers re-registered")
            assert e.status == "running"


def test_center_restart_keeps_lineage():
    """Results that survive a center restart keep their task: a worker
    dying later has them recomputed, not reported as lost scattered data."""
    port = free_port()
    with processes() as start:
        center = start_center(start, port)
        for _ in range(2):
            start_worker(start, port, "--no-nanny")
        with Executor("127.0.0.1:%d" % port) as e:
            x = e.submit(np.arange, 1000)  # too big to ride along: fetched
            y = e.submit(np.sum, x)
            assert y.result() == 499500
            (holder,) = e.who_has([x])[x.key]
            s = e.scatter(np.arange(5), workers=[holder])
            center.kill()
            start_center(start, port)
            assert (x.result(timeout=20) == np.arange(1000)).all()
            poll(lambda: e.who_has([x])[x.key] == [holder], msg="x re-registered")
            os.kill(e.run(os.getpid)[holder], signal.SIGKILL)
            poll(lambda: holder not in e.ncores(), timeout=15)
            assert e.submit(np.max, x).result(timeout=20) == 999
            assert (x.result(timeout=20) == np.arange(1000)).all()
            assert y.result(timeout=20) == 499500
            # scattered data has no lineage: still reported lost
            with pytest.raises(LostData, match="scattered"):
                s.result(timeout=20)


def test_center_restart_resubmits_pending():
    """Work pending when the center restarts is sent again, not failed."""
    port = free_port()
    with processes() as start:
        center = start_center(start, port)
        start_worker(start, port, "--no-nanny", "--ncores", "1")
        with Executor("127.0.0.1:%d" % port) as e:
            x = e.submit(slowinc, 1, delay=2)
            z = e.submit(add, x, 10)
            ys = e.map(inc, range(20))
            poll(lambda: "processing" in e.sync(e.center.task_states).values())
            center.kill()
            start_center(start, port)
            assert z.result(timeout=30) == 12
            assert x.result(timeout=10) == 2
            assert e.gather(ys) == list(range(1, 21))
            assert e.status == "running"


def test_task_the_center_refuses_is_not_resent_forever():
    """A task above the center's message limit makes it close the executor's
    stream; sending the pending tasks again on each reconnect must not go
    on forever: that task fails, the executor keeps working."""
    port = free_port()
    with processes() as start, pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTRIBUTED_MAX_MESSAGE_SIZE", str(2 ** 20))
        start_center(start, port)
        mp.delenv("DISTRIBUTED_MAX_MESSAGE_SIZE")
        start_worker(start, port, "--no-nanny")
        with Executor("127.0.0.1:%d" % port) as e:
            assert e.submit(inc, 1).result(timeout=10) == 2
            with pytest.raises(Exception):
                e.submit(len, b"x" * 2 ** 21).result(timeout=40)
            assert e.submit(inc, 2).result(timeout=20) == 3
            assert e.status == "running"


def test_rejoining_worker_keeps_only_what_is_needed():
    """A worker frozen past the heartbeat timeout comes back with its keys:
    those released meanwhile are deleted (on the worker too); one still
    needed and held nowhere else is taken back."""
    with processes() as start:
        _, _, address = small_cluster(start, "--heartbeat-timeout", "2", workers=2)
        with Executor(address) as e:
            pids = e.run(os.getpid)
            victim, other = sorted(pids)
            released = e.submit(np.ones, 10 ** 6, workers=[victim])
            kept = e.submit(np.zeros, 10 ** 4, workers=[victim])
            e.gather([released.status and kept])  # computed (not the big one)
            poll(lambda: released.done())
            key = released.key
            os.kill(pids[victim], signal.SIGSTOP)
            try:
                poll(lambda: victim not in e.ncores(), timeout=15)
                del released
                poll(lambda: key not in e.who_has(), msg="release")
            finally:
                os.kill(pids[victim], signal.SIGCONT)
            poll(lambda: victim in e.ncores(), timeout=15)
            poll(lambda: key not in e.sync(e._rpc(victim).keys), timeout=10,
                 msg="the rejoined worker deleting the released key")
            assert key not in e.who_has()
            # restricted to the victim: it waited for it, and took it back
            assert (kept.result(timeout=10) == np.zeros(10 ** 4)).all()
            assert e.who_has([kept])[kept.key] == [victim]


def test_busy_worker_is_not_dead():
    """A task holding the GIL longer than the heartbeat timeout: the nanny
    vouches for the worker, which is not removed and finishes the task."""
    port = free_port()
    with processes() as start:
        start_center(start, port, "--heartbeat-timeout", "2")
        start_worker(start, port, "--ncores", "1")
        with Executor("127.0.0.1:%d" % port) as e:
            (address,) = e.ncores()
            f = e.submit(hold_gil, 5, pure=False)
            t0 = time.time()
            while not f.done():
                assert address in e.ncores(), "busy worker removed as dead"
                assert time.time() - t0 < 30
                time.sleep(0.25)
            assert f.result() == 5


@contextmanager
def a_stopped_worker():
    """A center that removes a worker after 2 s without a heartbeat, two
    workers, and an executor; yields ``(e, pids, victim, other)`` with the
    ``victim`` worker SIGSTOPped, and continues it on the way out."""
    with processes() as start:
        _, _, address = small_cluster(start, "--heartbeat-timeout", "2", workers=2)
        with Executor(address) as e:
            pids = e.run(os.getpid)
            victim, other = sorted(pids)
            os.kill(pids[victim], signal.SIGSTOP)
            try:
                yield e, pids, victim, other
            finally:
                os.kill(pids[victim], signal.SIGCONT)


def test_stopped_worker_is_removed_and_comes_back():
    with a_stopped_worker() as (e, pids, victim, other):
        poll(lambda: victim not in e.ncores(), timeout=15)
        # the rest of the cluster keeps working meanwhile
        assert e.submit(inc, 41, pure=False).result(timeout=10) == 42
        os.kill(pids[victim], signal.SIGCONT)
        # once continued it notices and registers again
        poll(lambda: victim in e.ncores(), timeout=15)


def test_nanny_restarts_killed_worker():
    port = free_port()
    with processes() as start:
        start_center(start, port)
        nanny = start_worker(start, port, "--ncores", "1")
        with Executor("127.0.0.1:%d" % port) as e:
            (pid,) = e.run(os.getpid).values()
            os.kill(pid, signal.SIGKILL)
            line = nanny.wait_for_line("died", timeout=10)
            assert "SIGKILL" in line
            nanny.wait_for_line("Restarted worker at", timeout=20)
            poll(lambda: len(e.ncores()) == 1)
            (new_pid,) = e.run(os.getpid).values()
            assert new_pid != pid
            assert e.submit(inc, 1).result(timeout=10) == 2


def test_restart_replaces_workers_under_nannies():
    with processes() as start:
        _, _, address = small_cluster(start, workers=2)
        with Executor(address) as e:
            before = set(e.run(os.getpid).values())
            x = e.submit(inc, 1)
            x.result()
            e.restart()
            assert x.cancelled()
            poll(lambda: len(e.ncores()) == 2)
            after = set(e.run(os.getpid).values())
            assert not before & after
            assert e.submit(inc, 2).result(timeout=10) == 3


def test_poison_task_ends_as_killed_worker():
    """A task that kills every worker running it is erred after a few deaths;
    the local cluster replaces the dead workers and keeps computing."""
    from distributed.scheduler import KilledWorker

    with Executor(n_workers=2) as e:
        f = e.submit(os._exit, 1)
        with pytest.raises(KilledWorker, match="died") as info:
            f.result(timeout=60)
        # the cluster, the nanny of its workers, said why each one died
        assert str(info.value).count("exit code 1 (") == 4, info.value
        # allowed_failures=3: erred at the 4th death
        poll(lambda: len(e.cluster.deaths) == 4, timeout=30)
        assert e.submit(inc, 1).result(timeout=20) == 2


# -- why a worker died: the nanny's cause in KilledWorker and LostData -------------


def poison_cluster(start, *center_args):
    """A center (``center_args``) and one worker under a nanny; returns the
    center's and the nanny's processes and the executor's address."""
    center, (nanny,), address = small_cluster(start, *center_args)
    return center, nanny, address


def test_segfaulting_task_ends_as_killed_worker_naming_sigsegv():
    """Each death's cause, as the nanny tells it, is in KilledWorker's
    message, the last one too: the center waits for that report."""
    with processes() as start:
        center, nanny, address = poison_cluster(start, "--allowed-failures", "1")
        with Executor(address) as e:
            f = e.submit(ctypes.string_at, 0)  # reads address 0: SIGSEGV
            with pytest.raises(KilledWorker) as info:
                f.result(timeout=60)
            message = str(info.value)
            assert "running on 2 workers that died" in message, message
            assert message.count("killed by signal SIGSEGV") == 2, message
            assert "connection closed" not in message, message
            assert repr(f.key) in message
            center.wait_for_line("died: killed by signal SIGSEGV", timeout=10)
            assert e.submit(inc, 1).result(timeout=30) == 2


def test_task_calling_exit_ends_as_killed_worker_naming_the_exit_code():
    with processes() as start:
        center, nanny, address = poison_cluster(start, "--allowed-failures", "1")
        with Executor(address) as e:
            f = e.submit(os._exit, 3)
            with pytest.raises(KilledWorker) as info:
                f.result(timeout=60)
            message = str(info.value)
            assert message.count("exit code 3") == 2, message
            assert "connection closed" not in message, message


def test_scattered_data_lost_with_a_killed_worker_names_the_cause():
    with processes() as start:
        _, _, address = small_cluster(start, workers=2)
        with Executor(address) as e:
            pids = e.run(os.getpid)
            victim = sorted(pids)[0]
            [x] = e.scatter([123], workers=[victim])
            assert e.who_has([x])[x.key] == [victim]
            os.kill(pids[victim], signal.SIGKILL)
            with pytest.raises(LostData) as info:
                x.result(timeout=30)
            message = str(info.value)
            assert "scattered to %s, which died (killed by signal SIGKILL" % victim \
                in message, message
            assert "connection closed" not in message, message


def test_without_the_nannys_report_killed_worker_says_what_is_known():
    """The nanny killed with its worker says nothing: after the grace
    period the task errs with what the center saw."""
    with processes() as start:
        center, nanny, address = poison_cluster(start, "--allowed-failures", "0")
        with Executor(address) as e:
            (pid,) = e.run(os.getpid).values()
            f = e.submit(time.sleep, 60)
            poll(lambda: e.sync(e.center.task_states, keys=[f.key])[f.key] == "processing")
            os.kill(nanny.pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            t0 = time.time()
            with pytest.raises(KilledWorker, match="its connection closed"):
                f.result(timeout=30)
            assert time.time() - t0 < 15


def test_nanny_reports_the_oom_killer(monkeypatch):
    """A worker SIGKILLed while its cgroup's OOM kill count rose (faked
    here: a real OOM kill would need a cgroup to run out of memory) is
    reported as killed by the OOM killer, to the center too."""
    import asyncio

    from distributed import nanny as nanny_module
    from distributed.center import Center
    from distributed.nanny import Nanny

    monkeypatch.setattr(nanny_module._OOMWatch, "oom_killed", lambda self: True)

    async def main():
        c = Center("127.0.0.1")
        c.listen(0)
        n = Nanny("127.0.0.1", c.port, worker_args=["--ncores", "1"])
        try:
            await n._start()
            address = n.worker_address
            os.kill(n.process.pid, signal.SIGKILL)
            deadline = time.time() + 20
            while not c.deaths:
                assert time.time() < deadline, "no death reported"
                await asyncio.sleep(0.05)
            (_, dead, cause), = c.deaths
            assert dead == address
            assert cause == "killed by the OOM killer (signal SIGKILL): out of memory"
            assert n.deaths[0][1] == cause
        finally:
            await n._close()
            c.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_run_on_a_stopped_worker_fails_when_it_is_removed():
    """``Executor.run`` waits for the function as long as it runs, but not
    for a worker that stopped answering: once the center removes it (no
    heartbeat), the call fails with an error naming the worker, and the
    other worker's answer is not what hangs."""
    with a_stopped_worker() as (e, pids, victim, other):
        t = time.time()
        with pytest.raises(Exception, match="%s closed before the reply to 'run'" % victim):
            e.run(os.getpid)
        assert time.time() - t < 15
        assert e.run(os.getpid, workers=[other]) == {other: pids[other]}
