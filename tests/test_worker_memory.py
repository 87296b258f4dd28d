"""The worker's parts, driven directly: the memory manager's decisions, the
task states and the sharing of peer transfers (no sockets, no processes)."""

import asyncio
import shutil
import threading
from concurrent.futures import Future

import pytest

from distributed.transfer import GatherResult, Transfers
from distributed.worker import (EXECUTING, FETCHING, PAUSED, RELEASED, TaskState,
                                Worker)
from distributed.worker_memory import (NO_SPILL, WorkerMemoryManager, blame,
                                       excess_bytes, pause_threshold, pause_wanted,
                                       spill_target, terminate_wanted)

pytestmark = pytest.mark.pure  # no sockets, no processes: in the fast loop

MB = 2**20


# -- decisions ------------------------------------------------------------------


def test_terminate_and_pause_thresholds_are_strict():
    limit = 100 * MB
    assert not terminate_wanted(95 * MB, limit, 0.95)
    assert terminate_wanted(95 * MB + 1, limit, 0.95)
    assert not terminate_wanted(10 * limit, limit, None)
    assert pause_wanted(80 * MB + 1, limit, 0.8, disk_fails=False) is True
    assert pause_wanted(80 * MB, limit, 0.8, disk_fails=False) is False
    # a full disk: pausing would wait for ever
    assert pause_wanted(99 * MB, limit, 0.8, disk_fails=True) is False
    assert pause_wanted(99 * MB, limit, None, disk_fails=False) is None


def test_spill_target():
    limit, buffer_target = 100, 60
    # above the target: free what the process holds above it
    assert spill_target(70, limit, 0.6, 30, buffer_target, in_memory=True) == 20
    assert spill_target(90, limit, 0.6, 10, buffer_target, in_memory=True) == 0
    # nothing in memory to free: only the buffer's own target counts
    assert spill_target(90, limit, 0.6, 10, buffer_target, in_memory=False) == NO_SPILL
    assert spill_target(90, limit, 0.6, 61, buffer_target, in_memory=False) is None
    # below the target: only when the values held exceed the buffer's target
    assert spill_target(50, limit, 0.6, 61, buffer_target, in_memory=True) is None
    assert spill_target(50, limit, 0.6, 60, buffer_target, in_memory=True) == NO_SPILL


def test_excess_and_pause_threshold():
    assert excess_bytes(70, 100, 0.6, 30, 60) == 10
    assert excess_bytes(50, 100, 0.6, 50, 60, nbytes=15) == 5
    assert excess_bytes(50, 100, 0.6, 10, 60, nbytes=15) <= 0
    assert pause_threshold(100, 0.8, 0.95) == 80
    assert pause_threshold(100, None, 0.95) == 95
    assert pause_threshold(100, None, None) == 100


def test_blame():
    limit = 1000
    assert blame(960, 900, limit, 0.8, 0.95) == "data"
    assert blame(960, 100, limit, 0.8, 0.95) == "tasks"
    # at the pause threshold exactly: the data is to blame
    assert blame(900, 100, limit, 0.8, 0.95) == "data"
    # pausing off: the default pause fraction still draws the line
    assert blame(900, 0, limit, None, 0.95) == "tasks"


# -- the manager, with a stand-in worker ----------------------------------------------


class FakeLoop:
    def __init__(self):
        self.callbacks = []

    def add_callback(self, f, *args):
        self.callbacks.append((f, args))


class FakeData:
    """What the manager reads of a SpillBuffer."""

    def __init__(self, memory_bytes, target, fast=True, write_error=None):
        self.memory_bytes, self.target = memory_bytes, target
        self.fast = {"x": 1} if fast else {}
        self.write_error = write_error


class FakeWorker:
    def __init__(self, data):
        self.data = data
        self.nbytes = {}
        self.loop = FakeLoop()
        self.status = "running"
        self.address = "127.0.0.1:1"
        self.sent = []

    def _send(self, msg):
        self.sent.append(msg)


def manager(rss, data, **kwargs):
    worker = FakeWorker(data)
    m = WorkerMemoryManager(worker, memory_limit=1000, **kwargs)
    m.rss = lambda: rss[0]
    m.spills, m.exits = [], []
    m.request_spill = m.spills.append
    m.terminate = m.exits.append
    return m


def test_check_spills_pauses_and_exits():
    rss = [500]
    m = manager(rss, FakeData(700, 600), target_fraction=0.6, pause_fraction=0.8,
                terminate_fraction=0.95)
    m.check()  # below the target, values above the buffer's target
    assert m.spills == [None] and not m.worker.loop.callbacks and m.rss_sample == 500
    rss[0] = 850
    m.check()  # paused, and the process is 250 above its target
    assert m.worker.loop.callbacks == [(m.set_paused, (True,))]
    assert m.spills[-1] == 450
    rss[0] = 951
    m.check()
    assert m.exits == [951]


def test_check_does_not_pause_on_a_full_disk():
    m = manager([900], FakeData(10, 600, write_error=OSError(28, "full")),
                target_fraction=0.6, pause_fraction=0.8, terminate_fraction=False)
    m.check()
    assert not m.worker.loop.callbacks and not m.exits


def test_check_does_nothing_when_closing():
    m = manager([10**6], FakeData(700, 600), terminate_fraction=0.95)
    m.worker.status = "closing"
    m.check()
    assert not m.exits and not m.spills and not m.worker.loop.callbacks


def test_resume_runs_held_tasks_in_order():
    m = manager([0], {}, pause_fraction=0.8)
    ran = []
    m.set_paused(True)
    assert m.paused and not m.unpaused.is_set()
    assert m.worker.sent == [{"op": "worker-status", "paused": True}]
    m.hold("a", lambda: ran.append("a"))
    m.hold("b", lambda: (ran.append("b"), m.set_paused(True)))  # pauses again
    m.hold("c", lambda: ran.append("c"))
    m.set_paused(False)
    assert ran == ["a", "b"] and list(m.paused_tasks) == ["c"]
    assert m.state()["paused_tasks"] == 1


# -- task states ----------------------------------------------------------------------


def test_task_state_transitions():
    ts = TaskState("x", {}, {"y": ["a"]})
    assert ts.deps == ["y"] and ts.state is None
    for state in (PAUSED, FETCHING, PAUSED, EXECUTING, RELEASED):
        ts.transition(state)
        assert ts.state == state
    ts.transition(EXECUTING)  # a released task stays released
    assert ts.state == RELEASED
    ts = TaskState("x", {})
    ts.transition(EXECUTING)
    with pytest.raises(AssertionError):
        ts.transition(FETCHING)  # not in the table


@pytest.fixture
def worker(tmp_path):
    w = Worker("127.0.0.1", 1, ip="127.0.0.1", ncores=1, local_dir=str(tmp_path))
    try:
        yield w
    finally:
        w.executor.shutdown()
        shutil.rmtree(w.local_dir, ignore_errors=True)


def test_paused_worker_holds_tasks_and_forgets_deleted_ones(worker):
    worker.memory.paused = True
    worker._compute_task(key="x", spec={}, who_has={"y": ["a"]})
    worker._compute_task(key="z", spec={})
    assert [ts.state for ts in worker.tasks.values()] == [PAUSED, PAUSED]
    assert list(worker._paused_tasks) == ["x", "z"]
    worker._delete_data(keys=["x"])
    assert list(worker.tasks) == ["z"] and list(worker._paused_tasks) == ["z"]
    worker._delete_data(all=True)
    assert not worker.tasks and not worker._paused_tasks


def test_released_task_result_is_dropped(worker):
    ts = worker.tasks["x"] = TaskState("x", {})
    ts.transition(EXECUTING)
    worker._delete_data(keys=["x"])
    assert worker.tasks["x"].state == RELEASED  # runs to its end
    done = Future()
    done.set_result((True, 42, {"compute_start": 0, "compute_stop": 1}))
    worker._task_done("x", done)
    assert "x" not in worker.tasks and "x" not in worker.data


def test_released_held_task_is_forgotten_on_resume(worker):
    ts = worker.tasks["x"] = TaskState("x", {})
    ts.transition(FETCHING)
    worker.memory.paused = True
    worker._run_task(ts)  # its inputs came while paused
    assert ts.state == PAUSED
    ts.transition(RELEASED)
    worker.port, worker.memory.limit = 1, 10**9  # for the log line only
    worker.memory.set_paused(False)
    assert not worker.tasks and not worker._paused_tasks


def test_worker_keeps_its_memory_names(worker):
    assert worker.memory_limit is None and worker._memory_thread is None
    assert worker.memory_target_fraction == worker.memory.target_fraction
    worker._rss = lambda: 123
    assert worker.memory.rss() == 123
    assert type(worker.data) is dict and worker.memory_state()["memory_bytes"] == 0


# -- sharing transfers ------------------------------------------------------------------


def test_transfers_are_shared_and_forgotten():
    calls = []

    async def gather(who_has, rpc_for):
        calls.append(sorted(who_has))
        await asyncio.sleep(0)
        return GatherResult({k: k.upper() for k in who_has}, set(), set(), {})

    async def f():
        t = Transfers(rpc_for=None, gather=gather)
        first = t.start({"x": ["a"], "y": ["b"]})
        second = t.start({"y": ["b"], "z": ["c"], "w": []})  # w: nobody holds it
        assert calls == [] or calls == [["x", "y"]]  # started, not yet run
        assert first < second and len(second) == 2
        assert set(t.fetching) == {"x", "y", "z"}
        results = [await fut for fut in second]
        t.finished(second)
        assert not t.fetching
        return results

    results = asyncio.run(f())
    assert calls == [["x", "y"], ["z"]]
    assert sorted(k for r in results for k in r.data) == ["x", "y", "z"]


_ran = []


def _record(x):
    _ran.append(x)


def test_ready_tasks_take_threads_by_priority(worker):
    """However many tasks the scheduler sent ahead, a free thread takes the
    ready one of lowest priority value (submit(..., priority=) is negated)."""
    from distributed.protocol import to_blob

    free = threading.Event()
    worker.executor.submit(free.wait, 10)  # its one thread is busy
    del _ran[:]
    for key, priority in [("a", (0, 1)), ("b", (0, 2)), ("urgent", (-5, 3)),
                          ("c", (0, 0))]:
        worker._compute_task(key=key, spec={"function": to_blob(_record),
                                            "args": to_blob((key,))},
                             priority=priority)
    free.set()
    worker.executor.shutdown(wait=True)
    assert _ran == ["urgent", "c", "a", "b"]
