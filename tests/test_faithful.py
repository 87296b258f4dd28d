"""Details code written against the 2016 API relies on (SPEC.md, "Faithful
details" and "Command line"; issue #11, section 5): placement by input
bytes, a quick restart of busy workers, the center as a metadata store of
opaque names, ``rpc.streams``, an rpc ``compute`` and its ``who_has``, and
flags that reach the nanny's worker."""

import os
import time

import pytest

from distributed import Executor
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
