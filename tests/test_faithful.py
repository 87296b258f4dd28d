"""Details code written against the 2016 API relies on (SPEC.md, "Faithful
details" and "Command line"; issue #11, section 5): placement by input
bytes, a quick restart of busy workers, the center as a metadata store of
opaque names, ``rpc.streams``, an rpc ``compute`` and its ``who_has``, and
flags that reach the nanny's worker."""

import os
import time

import pytest

from distributed import Executor
from distributed.scheduler import Scheduler
from distributed.utils_test import (free_port, hold_gil, processes, start_center,
                                    start_worker)

# ---------------------------------------------------------------------------
# restart() of busy workers under nannies


def busy_task(how, marker, seconds):
    """Say it started (a file named ``marker``), then be busy: sleep, or
    hold the GIL (no thread of the worker runs, signals are not handled)."""
    open(marker, "w").close()
    (hold_gil if how == "hold_gil" else time.sleep)(seconds)


@pytest.mark.processes
@pytest.mark.parametrize("how", ["sleep", "hold_gil"])
def test_restart_does_not_wait_for_busy_tasks(how, tmp_path):
    """The workers are killed, not waited for: a task sleeping for 30 s (or
    holding the GIL, so the worker cannot even take SIGTERM) does not delay
    the restart; fresh workers run tasks after it."""
    port = free_port()
    with processes() as start:
        start_center(start, port)
        start_worker(start, port, "--nprocs", "2", "--ncores", "1")
        with Executor("127.0.0.1:%d" % port) as e:
            e.wait_for_workers(2)
            before = set(e.ncores())
            markers = [str(tmp_path / str(i)) for i in range(4)]
            futures = e.map(busy_task, [how] * 4, markers, [30] * 4)
            deadline = time.time() + 10
            while sum(map(os.path.exists, markers)) < 2:  # one task on each worker
                assert time.time() < deadline, "the tasks did not start"
                time.sleep(0.05)
            t = time.time()
            e.restart()
            took = time.time() - t
            print("restart of busy workers took %.2f s" % took)
            assert took < 4.5, took
            assert all(f.cancelled() for f in futures)
            assert len(e.ncores()) == 2 and not set(e.ncores()) & before
            assert e.submit(sum, [1, 2]).result(timeout=10) == 3


# ---------------------------------------------------------------------------
# placement: where most of the input bytes are


def placed(nbytes_on_a, a_busy_for):
    """Where ``both-...`` (inputs ``a``: ``nbytes_on_a`` bytes on worker A,
    ``b``: 10 bytes on B) is sent while A runs a task and ``both`` is known
    to take ``a_busy_for`` seconds."""
    s = Scheduler()
    s.add_worker("A:1", ncores=1)
    s.add_worker("B:1", ncores=1)
    s.update_data("c", who_has={"a": ["A:1"], "b": ["B:1"]},
                  nbytes={"a": nbytes_on_a, "b": 10})
    s.update_graph("c", tasks={"busy-0123456789abcdef": "spec"}, dependencies={"busy-0123456789abcdef": []},
                   keys=["busy-0123456789abcdef"], restrictions={"busy-0123456789abcdef": ["A:1"]})
    s.durations["both"] = a_busy_for
    s.update_graph("c", tasks={"both-0123456789abcdef": "spec"}, dependencies={"both-0123456789abcdef": ["a", "b"]},
                   keys=["both-0123456789abcdef"])
    s.validate()
    [where] = [a for a, msgs in s.to_workers.items() for m in msgs
               if m.get("key") == "both-0123456789abcdef"]
    assert s.tasks["both-0123456789abcdef"].state == "processing"
    return where


@pytest.mark.pure
def test_placement_follows_the_larger_input_to_a_busy_worker():
    """10 MB on A, 10 bytes on B: the task waits on A (busy) rather than
    moving 10 MB, however long the wait estimate."""
    assert placed(10 ** 7, a_busy_for=0.001) == "A:1"
    assert placed(10 ** 7, a_busy_for=1.0) == "A:1"
    assert placed(10 ** 7, a_busy_for=100.0) == "A:1"


@pytest.mark.pure
def test_placement_small_inputs_go_to_the_free_worker():
    """Inputs too small to matter are weighed against the queue: a long
    wait on A sends the task to B, which fetches them."""
    assert placed(100, a_busy_for=1.0) == "B:1"
    assert placed(100, a_busy_for=0.0) == "A:1"


@pytest.mark.pure
def test_placement_a_saturated_holder_shares_its_work():
    """A holder with no free slot left does not hoard: the task is weighed
    against its queue (and an idle worker can take it)."""
    s = Scheduler(saturation=0)
    s.add_worker("A:1", ncores=1)
    s.add_worker("B:1", ncores=1)
    s.update_data("c", who_has={"a": ["A:1"]}, nbytes={"a": 10 ** 7})
    s.durations["both"] = 1.0
    s.update_graph("c", tasks={"busy-%08x" % i: "spec" for i in range(200)},
                   dependencies={"busy-%08x" % i: [] for i in range(200)},
                   keys=["busy-%08x" % i for i in range(200)],
                   restrictions={"busy-%08x" % i: ["A:1"] for i in range(200)})
    s.update_graph("c", tasks={"both-0123456789abcdef": "spec"}, dependencies={"both-0123456789abcdef": ["a"]},
                   keys=["both-0123456789abcdef"])
    assert s.tasks["both-0123456789abcdef"].processing_on.address == "B:1"


def big_input():
    return b"x" * 10 ** 7


def small_input():
    return b"y" * 10


def both(a, b):
    time.sleep(0.2)  # long enough for the center to learn (and weigh) it
    return len(a) + len(b)


@pytest.mark.processes
def test_placement_real_workers(e):
    """A 10 MB input on one worker, 10 bytes on the other: the task runs
    where the 10 MB are, also while that worker is busy; both ways round,
    several times."""
    A, B = sorted(e.ncores())
    for _ in range(3):
        for big_on, small_on in [(A, B), (B, A)]:
            x = e.submit(big_input, workers=[big_on], pure=False)
            y = e.submit(small_input, workers=[small_on], pure=False)
            e.gather([x, y])
            busy = e.submit(time.sleep, 0.5, workers=[big_on], pure=False)
            z = e.submit(both, x, y, pure=False)
            assert z.result(timeout=10) == 10 ** 7 + 10
            assert e.who_has([z])[z.key] == [big_on]
            assert e.who_has([x])[x.key] == [big_on]  # the 10 MB did not move
            del x, y, z, busy
