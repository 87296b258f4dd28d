"""The scheduler state machine, driven directly: no sockets, no loop.

Every public call on any ``Scheduler`` made in these tests is followed by
``Scheduler.validate()`` (the ``validate_every_step`` fixture).

``Sim`` plays the center and the workers around a ``Scheduler``: it pops the
``compute-task`` messages the scheduler queued for a worker, runs the spec
(here a ``(function, [dependency keys])`` pair, opaque to the scheduler) on
the data of the holders named in the message's ``who_has`` and reports
``task_finished``, and applies ``delete-data`` messages to the worker's data.
"""

import functools

import pytest

from distributed.scheduler import (
    MAX_EXTRA,
    MISSING_DATA_RETRIES,
    TRANSITIONS,
    InvalidTransition,
    InvariantError,
    KilledWorker,
    LostData,
    Scheduler,
    SchedulerPlugin,
)

pytestmark = pytest.mark.pure  # no sockets, no processes: in the fast loop


@pytest.fixture(autouse=True)
def validate_every_step(monkeypatch):
    """Each public ``Scheduler`` method validates the tables when it returns
    (the outermost call only: a method calling another is one step)."""
    depth = [0]

    def wrap(method):
        @functools.wraps(method)
        def step(self, *args, **kwargs):
            depth[0] += 1
            try:
                result = method(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                self.validate()
            return result
        return step

    for name, method in list(vars(Scheduler).items()):
        if callable(method) and not name.startswith("_") and name != "validate":
            monkeypatch.setattr(Scheduler, name, wrap(method))


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def const(v):
    return lambda: v


def boom(*args):
    raise ZeroDivisionError("boom")


class Sim:
    """A center and fake workers around a :class:`Scheduler`."""

    def __init__(self, **kwargs):
        self.s = Scheduler(**kwargs)
        self.data = {}  # address -> {key: value}
        self.computed = []  # (address, key) in the order they ran

    # -- workers ------------------------------------------------------------------

    def add_worker(self, address, ncores=1):
        self.data[address] = {}
        self.s.add_worker(address, ncores=ncores)

    def kill(self, address, cause=None, report_expected=False):
        """What the center does when a worker dies (``report_expected``: it
        had a nanny, which will say why)."""
        self.data.pop(address, None)
        self.s.remove_worker(address, cause=cause, report_expected=report_expected)

    def scatter(self, client, address, key, value, nbytes=10):
        self.data[address][key] = value
        self.s.update_data(client, who_has={key: [address]}, nbytes={key: nbytes})

    # -- messages -------------------------------------------------------------------

    def pop(self, address, op="compute-task"):
        """Take the messages of ``op`` queued for ``address`` (others stay);
        ``delete-data`` messages seen on the way are applied."""
        self.apply_deletes()
        msgs = self.s.to_workers.get(address, [])
        taken = [m for m in msgs if m["op"] == op]
        msgs[:] = [m for m in msgs if m["op"] != op]
        return taken

    def apply_deletes(self):
        for address, msgs in self.s.to_workers.items():
            keep = []
            for m in msgs:
                if m["op"] == "delete-data":
                    d = self.data.get(address, {})
                    if m.get("all"):
                        d.clear()
                    for k in m["keys"]:
                        d.pop(k, None)
                    self.deleted.append((address, tuple(m["keys"])))
                else:
                    keep.append(m)
            msgs[:] = keep

    deleted = None

    def client_msgs(self, client, op=None):
        msgs = self.s.to_clients.get(client, [])
        taken = [m for m in msgs if op is None or m["op"] == op]
        msgs[:] = [m for m in msgs if m not in taken]
        return taken

    def run(self, address, msg, nbytes=None):
        """Run one compute-task message on ``address`` and report the result."""
        func, deps = msg["spec"]
        args = []
        for dep in deps:
            holders = msg["who_has"][dep]
            assert holders, "no holder of %r sent with %r" % (dep, msg["key"])
            if dep in self.data[address]:
                value = self.data[address][dep]
            else:
                src = holders[0]
                assert dep in self.data[src], "%s does not hold %r" % (src, dep)
                value = self.data[src][dep]
                self.data[address][dep] = value  # the worker keeps its copy
                self.s.add_keys(address, [dep])
            args.append(value)
        self.computed.append((address, msg["key"]))
        try:
            value = func(*args)
        except Exception as e:
            self.s.task_erred(address, msg["key"], exception=e, traceback=None,
                              text=repr(e))
            return
        self.data[address][msg["key"]] = value
        self.s.task_finished(address, msg["key"],
                             nbytes=nbytes if nbytes is not None else 28,
                             type=type(value).__name__)

    def run_all(self, limit=10000):
        """Run every compute-task, on every worker, until there is none."""
        for _ in range(limit):
            for address in list(self.data):
                msgs = self.pop(address)
                if msgs:
                    self.run(address, msgs[0])
                    # the rest go back in front, in order
                    self.s.to_workers[address][:0] = msgs[1:]
                    break
            else:
                self.apply_deletes()
                return
        raise AssertionError("did not settle")

    def result(self, key):
        holders = self.s.who_has[key]
        assert holders
        return self.data[sorted(holders)[0]][key]


@pytest.fixture
def sim():
    sim = Sim()
    sim.deleted = []
    return sim


def graph(**tasks):
    """``graph(x=(const(1), []), y=(inc, ['x']))`` -> (tasks, dependencies)."""
    return ({k: v for k, v in tasks.items()},
            {k: list(v[1]) for k, v in tasks.items()})


def submit(s, client, keys, **tasks):
    t, d = graph(**tasks)
    s.update_graph(client, tasks=t, dependencies=d, keys=keys)


# ---------------------------------------------------------------------------
# basics


def test_single_task(sim):
    s = sim.s
    sim.add_worker("w1:1")
    s.add_client("c1")
    submit(s, "c1", ["x"], x=(const(1), []))
    assert s.tasks["x"].state == "processing"
    [msg] = sim.pop("w1:1")
    assert msg["op"] == "compute-task" and msg["key"] == "x"
    assert msg["who_has"] == {}
    assert sim.client_msgs("c1") == []
    sim.run("w1:1", msg, nbytes=28)
    [report] = sim.client_msgs("c1")
    assert report["op"] == "key-in-memory"
    assert report["key"] == "x"
    assert report["type"] == "int"
    assert report["workers"] == ["w1:1"]
    assert s.tasks["x"].state == "memory"
    assert s.who_has["x"] == {"w1:1"}
    assert s.nbytes["x"] == 28


def test_module_docstring_example():
    s = Scheduler()
    s.add_worker("w1:1", ncores=1)
    s.add_client("c1")
    s.update_graph("c1", tasks={"x": {"function": b"..."}}, dependencies={"x": []},
                   keys=["x"])
    assert [m["op"] for m in s.to_workers["w1:1"]] == ["compute-task"]
    assert s.to_workers["w1:1"][0]["spec"] == {"function": b"..."}
    s.task_finished("w1:1", "x", nbytes=28, type="int")
    assert s.to_clients["c1"][0]["op"] == "key-in-memory"
    tw, tc = s.flush()
    assert "w1:1" in tw and "c1" in tc
    assert not s.to_workers and not s.to_clients


def test_chain_sends_who_has_of_dependencies(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["z"], x=(const(1), []), y=(inc, ["x"]), z=(add, ["x", "y"]))
    assert s.tasks["x"].state == "processing"
    assert s.tasks["y"].state == "waiting"
    assert s.tasks["z"].state == "waiting"
    [mx] = sim.pop("w1:1")
    assert mx["key"] == "x"
    sim.run("w1:1", mx)
    # the dependent became ready as soon as its input was in memory
    [my] = sim.pop("w1:1")
    assert my["key"] == "y"
    assert my["who_has"] == {"x": ["w1:1"]}
    assert my["nbytes"] == {"x": 28}
    sim.run("w1:1", my)
    [mz] = sim.pop("w1:1")
    assert mz["key"] == "z"
    assert mz["who_has"] == {"x": ["w1:1"], "y": ["w1:1"]}
    sim.run("w1:1", mz)
    # only z was wanted by the client
    msgs = sim.client_msgs("c1")
    assert [(m["op"], m["key"]) for m in msgs] == [("key-in-memory", "z")]
    assert sim.result("z") == 3


def test_dependents_spread_and_complete(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    tasks = {"x-%d" % i: (const(i), []) for i in range(20)}
    tasks["total"] = (lambda *a: sum(a), sorted(tasks))
    submit(s, "c1", ["total"], **tasks)
    # independent tasks went to both workers
    assert s.to_workers["w1:1"] and s.to_workers["w2:1"]
    sim.run_all()
    assert sim.result("total") == sum(range(20))
    assert s.tasks["total"].state == "memory"
    assert [m["key"] for m in sim.client_msgs("c1", "key-in-memory")] == ["total"]
    # every intermediate result was released once total was computed (the
    # tasks stay known as lineage of total, without data)
    assert {k for k, v in s.task_states().items() if v != "released"} == {"total"}
    assert set(s.who_has) == {"total"}
    assert set(s.nbytes) == {"total"}
    for address, data in sim.data.items():
        assert set(data) <= {"total"}, (address, data)


def test_already_in_memory_is_reported_at_once(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    sim.run_all()
    sim.client_msgs("c1")
    # a second client wants the same key: told at once, nothing recomputed
    submit(s, "c2", ["x"], x=(const(1), []))
    [m] = sim.client_msgs("c2")
    assert m["op"] == "key-in-memory" and m["key"] == "x"
    assert sim.pop("w1:1") == []
    assert s.tasks["x"].who_wants == {"c1", "c2"}


def test_same_key_submitted_twice_runs_once(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    submit(s, "c2", ["x"], x=(const(1), []))
    sim.run_all()
    assert sim.computed == [("w1:1", "x")]
    assert {m["key"] for m in sim.client_msgs("c1")} == {"x"}
    assert {m["key"] for m in sim.client_msgs("c2")} == {"x"}


# ---------------------------------------------------------------------------
# errors


def test_task_erred_reports_task_and_dependents(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x", "y", "z"], x=(boom, []), y=(inc, ["x"]), z=(inc, ["y"]))
    submit(s, "c2", ["z"])
    [msg] = sim.pop("w1:1")
    exc = ZeroDivisionError("boom")
    s.task_erred("w1:1", "x", exception=exc, traceback="TB", text="boom")
    msgs = sim.client_msgs("c1")
    assert sorted(m["key"] for m in msgs) == ["x", "y", "z"]
    for m in msgs:
        assert m["op"] == "task-erred"
        assert m["exception"] is exc
        assert m["traceback"] == "TB"
    [m2] = sim.client_msgs("c2")
    assert m2["op"] == "task-erred" and m2["key"] == "z" and m2["exception"] is exc
    assert {k: s.tasks[k].state for k in "xyz"} == {"x": "erred", "y": "erred",
                                                    "z": "erred"}
    # nothing was sent for the dependents
    assert sim.pop("w1:1") == []


def test_new_dependent_of_erred_task_errs_at_once(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(boom, []))
    sim.run_all()
    [m] = sim.client_msgs("c1")
    assert m["op"] == "task-erred"
    submit(s, "c1", ["y"], y=(inc, ["x"]))
    [m] = sim.client_msgs("c1")
    assert m["op"] == "task-erred" and m["key"] == "y"
    assert isinstance(m["exception"], ZeroDivisionError)
    assert sim.pop("w1:1") == []


def test_erred_blob_flag(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(boom, []))
    sim.pop("w1:1")
    s.task_erred("w1:1", "x", exception=b"pickled", traceback=b"tb", text="boom")
    [m] = sim.client_msgs("c1")
    assert type(m["exception"]) is bytes and m["exception"] == b"pickled"
    assert m["text"] == "boom"


def test_unknown_wanted_key_and_unknown_dependency(sim):
    s = sim.s
    sim.add_worker("w1:1")
    s.update_graph("c1", keys=["nope"])
    [m] = sim.client_msgs("c1")
    assert m["op"] == "task-erred" and m["key"] == "nope"
    assert isinstance(m["exception"], LostData)
    submit(s, "c1", ["y"], y=(inc, ["gone"]))
    [m] = sim.client_msgs("c1")
    assert m["op"] == "task-erred" and m["key"] == "y"
    assert isinstance(m["exception"], LostData)
    assert "gone" in str(m["exception"])
    assert sim.pop("w1:1") == []


def test_erred_tasks_forgotten_when_released(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["y"], x=(boom, []), y=(inc, ["x"]))
    sim.run_all()
    assert s.tasks["y"].state == "erred"
    s.client_releases_keys("c1", ["y"])
    assert s.tasks == {}


# ---------------------------------------------------------------------------
# load: saturation, queues, stealing


def test_at_most_cores_plus_extra_in_flight(sim):
    s = sim.s
    sim.add_worker("w1:1", ncores=1)
    n = 300
    submit(s, "c1", ["x-%d" % i for i in range(n)],
           **{"x-%d" % i: (const(i), []) for i in range(n)})
    sent = sim.pop("w1:1")
    ws = s.workers["w1:1"]
    assert ws.ncores + s.saturation <= len(sent) <= ws.ncores + MAX_EXTRA
    assert len(sent) < n
    assert len(ws.processing) == len(sent)
    states = s.task_states()
    assert sum(v == "processing" for v in states.values()) == len(sent)
    assert sum(v == "queued" for v in states.values()) == n - len(sent)
    # the first tasks (by priority: submission order) went first
    in_flight = len(sent)
    # each finished task lets exactly one queued task go
    for msg in sent[:3]:
        sim.run("w1:1", msg)
        more = sim.pop("w1:1")
        assert len(more) == 1
        sent.append(more[0])
        assert len(ws.processing) == in_flight
    # run everything: each key ran exactly once, all were reported
    s.to_workers["w1:1"][:0] = sent[3:]
    sim.run_all()
    assert sorted(k for _, k in sim.computed) == sorted("x-%d" % i for i in range(n))
    assert len(sim.client_msgs("c1", "key-in-memory")) == n
    assert not ws.processing and not ws.queue


def test_priority_orders_the_queue(sim):
    s = sim.s
    sim.add_worker("w1:1", ncores=1)
    n = 50
    keys = ["x-%d" % i for i in range(n)]
    t, d = graph(**{k: (const(i), []) for i, k in enumerate(keys)})
    # reversed priority: the last key first
    s.update_graph("c1", tasks=t, dependencies=d, keys=keys,
                   priority={k: (n - i,) for i, k in enumerate(keys)})
    first = sim.pop("w1:1")
    queued = sorted((k for k, v in s.task_states().items() if v == "queued"),
                    key=lambda k: s.tasks[k].priority)
    assert len(queued) == n - len(first)
    # as slots free up, queued tasks go out in priority order
    later = []
    for m in first:
        sim.run("w1:1", m)
        later.extend(x["key"] for x in sim.pop("w1:1"))
    assert later == queued[:len(first)]
    assert later[0] == "x-%d" % (n - 1)


def test_new_worker_takes_queued_work(sim):
    s = sim.s
    sim.add_worker("w1:1", ncores=1)
    n = 100
    submit(s, "c1", ["x-%d" % i for i in range(n)],
           **{"x-%d" % i: (const(i), []) for i in range(n)})
    first = sim.pop("w1:1")
    assert len(first) < n
    sim.add_worker("w2:1", ncores=1)
    stolen = sim.pop("w2:1")
    assert stolen, "the new worker got nothing from the queue"
    keys = [m["key"] for m in stolen]
    assert all(s.tasks[k].state == "processing" for k in keys)
    assert all(s.tasks[k].processing_on is s.workers["w2:1"] for k in keys)
    # the stolen tasks are not in w1's queue any more: nothing runs twice
    s.to_workers["w2:1"][:0] = stolen
    s.to_workers["w1:1"][:0] = first
    sim.run_all()
    ran = [k for _, k in sim.computed]
    assert len(ran) == len(set(ran)) == n
    assert {a for a, _ in sim.computed} == {"w1:1", "w2:1"}


def test_least_busy_worker_without_dependencies(sim):
    s = sim.s
    sim.add_worker("w1:1", ncores=1)
    sim.add_worker("w2:1", ncores=4)
    submit(s, "c1", ["x-%d" % i for i in range(10)],
           **{"x-%d" % i: (const(i), []) for i in range(10)})
    n1, n2 = len(sim.pop("w1:1")), len(sim.pop("w2:1"))
    assert n1 + n2 == 10
    assert n2 > n1  # the worker with more cores takes more


# ---------------------------------------------------------------------------
# placement: restrictions and locality


def test_restrictions_honoured(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    keys = ["x-%d" % i for i in range(10)]
    t, d = graph(**{k: (const(i), []) for i, k in enumerate(keys)})
    s.update_graph("c1", tasks=t, dependencies=d, keys=keys,
                   restrictions={k: ["w2:1"] for k in keys})
    assert sim.pop("w1:1") == []
    sim.run_all()
    assert {a for a, _ in sim.computed} == {"w2:1"}
    assert all(s.who_has[k] == {"w2:1"} for k in keys)


def test_restricted_tasks_are_not_stolen(sim):
    s = sim.s
    sim.add_worker("w1:1")
    keys = ["x-%d" % i for i in range(60)]
    t, d = graph(**{k: (const(i), []) for i, k in enumerate(keys)})
    s.update_graph("c1", tasks=t, dependencies=d, keys=keys,
                   restrictions={k: ["w1:1"] for k in keys})
    sim.add_worker("w2:1")
    assert sim.pop("w2:1") == []
    sim.run_all()
    assert {a for a, _ in sim.computed} == {"w1:1"}


def test_restriction_to_absent_worker_waits_for_it(sim):
    s = sim.s
    sim.add_worker("w1:1")
    t, d = graph(x=(const(1), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x"],
                   restrictions={"x": ["w9:1"]})
    assert s.tasks["x"].state == "no-worker"
    assert sim.pop("w1:1") == []
    sim.add_worker("w9:1")
    [m] = sim.pop("w9:1")
    assert m["key"] == "x"
    assert s.tasks["x"].state == "processing"


def test_loose_restrictions(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(x=(const(1), []), y=(const(2), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x", "y"],
                   restrictions={"x": ["w9:1"], "y": ["w2:1"]},
                   loose_restrictions=["x", "y"])
    # x: its worker does not exist, it runs anywhere; y: still prefers w2
    assert s.tasks["x"].state == "processing"
    assert s.tasks["y"].processing_on.address == "w2:1"
    sim.run_all()
    assert sim.result("x") == 1 and sim.result("y") == 2


def test_no_worker_until_a_worker_arrives(sim):
    s = sim.s
    submit(s, "c1", ["y"], x=(const(1), []), y=(inc, ["x"]))
    assert s.tasks["x"].state == "no-worker"
    assert s.tasks["y"].state == "waiting"
    assert not s.to_workers.get("w1:1")
    sim.add_worker("w1:1")
    [m] = sim.pop("w1:1")
    assert m["key"] == "x"
    sim.run("w1:1", m)
    sim.run_all()
    assert sim.result("y") == 2
    assert not s.unrunnable


def test_locality_most_input_bytes(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    sim.add_worker("w3:1")
    sim.scatter("c1", "w1:1", "big", 1, nbytes=10**9)
    sim.scatter("c1", "w2:1", "small", 2, nbytes=10)
    submit(s, "c1", ["z"], z=(add, ["big", "small"]))
    assert sim.pop("w2:1") == [] and sim.pop("w3:1") == []
    [m] = sim.pop("w1:1")
    assert m["key"] == "z"
    assert m["who_has"] == {"big": ["w1:1"], "small": ["w2:1"]}
    assert m["nbytes"] == {"big": 10**9, "small": 10}
    sim.run("w1:1", m)
    assert sim.result("z") == 3


def test_locality_follows_computed_data(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(x=(const(1), []), y=(inc, ["x"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"x": ["w2:1"]})
    [mx] = sim.pop("w2:1")
    sim.run("w2:1", mx, nbytes=10**8)
    # y needs 100 MB that w2 holds: it runs there, not on the idle w1
    assert sim.pop("w1:1") == []
    [my] = sim.pop("w2:1")
    assert my["key"] == "y"


# ---------------------------------------------------------------------------
# releasing


def test_client_releases_keys(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    submit(s, "c1", ["x", "y"], x=(const(1), []), y=(const(2), []))
    sim.run_all()
    holders = {k: set(s.who_has[k]) for k in ["x", "y"]}
    s.client_releases_keys("c1", ["x"])
    deletes = [(a, m["keys"]) for a, msgs in s.to_workers.items() for m in msgs
               if m["op"] == "delete-data"]
    assert deletes == [(a, ["x"]) for a in holders["x"]]
    assert "x" not in s.tasks and "x" not in s.who_has and "x" not in s.nbytes
    assert "y" in s.tasks
    s.client_releases_keys("c1", ["y"])
    sim.apply_deletes()
    assert s.tasks == {}
    assert not any(s.who_has.values())
    assert all(not data for data in sim.data.values())
    assert s.clients["c1"] == set()


def test_release_with_replicas_deletes_on_every_holder(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    sim.run_all()
    [holder] = s.who_has["x"]
    other = "w2:1" if holder == "w1:1" else "w1:1"
    s.add_keys(other, ["x"], nbytes={"x": 28})  # a peer fetched a copy
    assert s.who_has["x"] == {"w1:1", "w2:1"}
    s.client_releases_keys("c1", ["x"])
    tw, _ = s.flush()
    assert {a: [m["keys"] for m in msgs if m["op"] == "delete-data"]
            for a, msgs in tw.items()} == {"w1:1": [["x"]], "w2:1": [["x"]]}
    assert s.tasks == {}


def test_shared_key_kept_for_other_client(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    submit(s, "c2", ["x"], x=(const(1), []))
    sim.run_all()
    s.client_releases_keys("c1", ["x"])
    assert s.tasks["x"].state == "memory"
    assert not [m for m in s.to_workers["w1:1"] if m["op"] == "delete-data"]
    s.client_releases_keys("c2", ["x"])
    assert [m for m in s.to_workers["w1:1"] if m["op"] == "delete-data"]
    assert s.tasks == {}


def test_intermediate_results_released_when_dependents_done(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["c"], a=(const(1), []), b=(inc, ["a"]), c=(inc, ["b"]),
           d=(inc, ["a"]))
    submit(s, "c1", ["d"])
    [ma] = sim.pop("w1:1")
    sim.run("w1:1", ma)
    msgs = sim.pop("w1:1")
    assert sorted(m["key"] for m in msgs) == ["b", "d"]
    mb = [m for m in msgs if m["key"] == "b"][0]
    md = [m for m in msgs if m["key"] == "d"][0]
    sim.run("w1:1", mb)
    # 'a' is still needed by 'd'
    assert s.tasks["a"].state == "memory"
    assert "a" in s.who_has
    sim.run("w1:1", md)
    # now nothing needs 'a'
    assert "a" not in s.who_has
    assert ("w1:1", ("a",)) in [(a, tuple(k)) for a, k in _deletes(s)]
    [mc] = sim.pop("w1:1")
    sim.run("w1:1", mc)
    assert "b" not in s.who_has
    assert set(s.who_has) == {"c", "d"}
    assert s.tasks["a"].state == s.tasks["b"].state == "released"
    assert sim.result("c") == 3 and sim.result("d") == 2


def _deletes(s):
    return [(a, m["keys"]) for a, msgs in s.to_workers.items() for m in msgs
            if m["op"] == "delete-data"]


def test_release_while_processing_then_result_dropped(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    [m] = sim.pop("w1:1")
    s.client_releases_keys("c1", ["x"])
    assert sim.client_msgs("c1") == []
    # the worker finishes anyway: it is told to drop the result
    sim.run("w1:1", m)
    assert sim.client_msgs("c1") == []
    assert ("w1:1", ["x"]) in _deletes(s)
    assert s.tasks == {}
    assert not s.workers["w1:1"].processing


def test_release_queued_tasks_never_run(sim):
    s = sim.s
    sim.add_worker("w1:1")
    n = 100
    keys = ["x-%d" % i for i in range(n)]
    submit(s, "c1", keys, **{k: (const(i), []) for i, k in enumerate(keys)})
    sent = sim.pop("w1:1")
    s.client_releases_keys("c1", keys)
    for m in sent:
        sim.run("w1:1", m)
    sim.run_all()
    assert len(sim.computed) == len(sent)  # the queued ones never went out
    assert s.tasks == {}
    assert not s.workers["w1:1"].queue or all(
        ts.state != "queued" for _, _, ts in s.workers["w1:1"].queue)


def test_remove_client_releases_its_keys(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x", "y"], x=(const(1), []), y=(inc, ["x"]))
    submit(s, "c2", ["x"])
    sim.run_all()
    s.remove_client("c1")
    assert "c1" not in s.clients
    assert set(s.tasks) == {"x"}
    assert "y" not in s.who_has
    s.remove_client("c2")
    assert s.tasks == {}


def test_cancel_is_a_release(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["y"], x=(const(1), []), y=(inc, ["x"]))
    s.cancel("c1", ["y"])
    sim.run_all()
    assert s.tasks == {}
    assert sim.client_msgs("c1") == []


# ---------------------------------------------------------------------------
# workers dying


def test_processing_tasks_rescheduled_elsewhere(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    keys = ["x-%d" % i for i in range(4)]
    t, d = graph(**{k: (const(i), []) for i, k in enumerate(keys)})
    s.update_graph("c1", tasks=t, dependencies=d, keys=keys,
                   restrictions={k: ["w1:1", "w2:1"] for k in keys})
    on_w1 = [m["key"] for m in sim.pop("w1:1")]
    on_w2 = sim.pop("w2:1")
    assert on_w1
    sim.kill("w1:1")
    resent = sim.pop("w2:1")
    assert sorted(m["key"] for m in resent) == sorted(on_w1)
    s.to_workers["w2:1"][:0] = on_w2 + resent
    sim.run_all()
    assert {k: sim.result(k) for k in keys} == {k: i for i, k in enumerate(keys)}
    assert all(s.who_has[k] == {"w2:1"} for k in keys)


def test_queued_tasks_of_dead_worker_rescheduled(sim):
    s = sim.s
    sim.add_worker("w1:1")
    n = 60
    keys = ["x-%d" % i for i in range(n)]
    submit(s, "c1", keys, **{k: (const(i), []) for i, k in enumerate(keys)})
    sim.pop("w1:1")  # lost with the worker
    sim.add_worker("w2:1")
    sim.pop("w2:1")  # stolen, lost below too
    s.to_workers["w2:1"] = []
    sim.add_worker("w3:1")
    sim.kill("w1:1")
    sim.kill("w2:1")
    sim.run_all()
    assert len(sim.client_msgs("c1", "key-in-memory")) == n
    assert {k: sim.result(k) for k in keys} == {k: i for i, k in enumerate(keys)}


def test_lost_keys_recomputed_from_lineage(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(x=(const(1), []), y=(inc, ["x"]), z=(inc, ["y"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x", "z"],
                   restrictions={"x": ["w1:1"], "y": ["w1:1"]})
    sim.run_all()
    assert sim.result("z") == 3
    sim.client_msgs("c1")
    # kill w1, which holds x (and maybe z)
    holders_z = set(s.who_has["z"])
    sim.kill("w1:1")
    lost = [m["key"] for m in sim.client_msgs("c1", "lost-data")]
    assert "x" in lost
    # x is recomputed (its restriction is gone with w1: it waits for w1)
    assert s.tasks["x"].state == "no-worker"
    if holders_z == {"w1:1"}:
        assert "z" in lost
    sim.add_worker("w1:1")
    sim.run_all()
    assert sim.result("x") == 1 and sim.result("z") == 3
    assert {m["key"] for m in sim.client_msgs("c1", "key-in-memory")} >= set(lost)


def test_lost_dependency_recomputed_and_resent(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(x=(const(1), []), s=(const(5), []), y=(add, ["x", "s"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"x": ["w1:1"], "s": ["w2:1"], "y": ["w2:1"]},
                   loose_restrictions=["x"])
    [mx] = sim.pop("w1:1")
    sim.run("w1:1", mx)
    # y still waits for s; w1, the only holder of x, dies
    assert s.tasks["y"].state == "waiting"
    sim.kill("w1:1")
    assert s.tasks["x"].state == "processing"  # loose: recomputed on w2
    msgs = sim.pop("w2:1")
    assert sorted(m["key"] for m in msgs) == ["s", "x"]
    for m in msgs:
        sim.run("w2:1", m)
    [my] = sim.pop("w2:1")
    assert my["key"] == "y"
    assert my["who_has"] == {"x": ["w2:1"], "s": ["w2:1"]}
    sim.run("w2:1", my)
    assert sim.result("y") == 6


def test_dependent_processing_when_input_lost(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(x=(const(1), []), y=(inc, ["x"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"x": ["w1:1"], "y": ["w2:1"]},
                   loose_restrictions=["x"])
    [mx] = sim.pop("w1:1")
    sim.run("w1:1", mx)
    [my] = sim.pop("w2:1")  # y is running on w2 and will fetch x from w1...
    sim.kill("w1:1")
    # ...which died: w2 reports the input missing
    s.missing_data("w2:1", "y", missing=["x"], bad_workers=["w1:1"])
    sim.run_all()
    assert sim.result("y") == 2
    assert [m["key"] for m in sim.client_msgs("c1", "key-in-memory")] == ["y"]


def test_scattered_data_lost(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    sim.scatter("c1", "w1:1", "data", 10)
    sim.scatter("c1", "w2:1", "copied", 20)
    t, d = graph(y=(inc, ["copied"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"y": ["w1:1"]})
    sim.run_all()  # w1 fetched a copy of 'copied' to compute y
    assert s.who_has["copied"] == {"w1:1", "w2:1"}
    sim.client_msgs("c1")
    sim.kill("w1:1")
    [m] = sim.client_msgs("c1", "task-erred")
    assert m["key"] == "data"
    assert isinstance(m["exception"], LostData)
    assert "scattered" in str(m["exception"])
    assert "lost" in str(m["exception"])
    assert "w1:1" in str(m["exception"])
    assert s.tasks["data"].state == "erred"
    # the other copy of 'copied' is fine
    assert s.tasks["copied"].state == "memory"
    assert s.who_has["copied"] == {"w2:1"}
    # a new task on the lost data fails at once
    submit(s, "c1", ["w"], w=(inc, ["data"]))
    [m] = sim.client_msgs("c1", "task-erred")
    assert m["key"] == "w" and isinstance(m["exception"], LostData)
    assert sim.pop("w2:1") == []


def test_whole_chain_recomputed_after_loss(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(a=(const(1), []), b=(inc, ["a"]), c=(inc, ["b"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["c"],
                   restrictions={k: ["w1:1"] for k in "abc"},
                   loose_restrictions=list("abc"))
    sim.run_all()
    assert {a for a, _ in sim.computed} == {"w1:1"}
    assert s.tasks["a"].state == s.tasks["b"].state == "released"
    sim.client_msgs("c1")
    sim.computed.clear()
    sim.kill("w1:1")
    assert [m["key"] for m in sim.client_msgs("c1", "lost-data")] == ["c"]
    sim.run_all()
    # the released intermediates were recomputed from lineage, on w2
    assert sim.computed == [("w2:1", "a"), ("w2:1", "b"), ("w2:1", "c")]
    assert sim.result("c") == 3
    assert [m["key"] for m in sim.client_msgs("c1", "key-in-memory")] == ["c"]
    assert set(s.who_has) == {"c"}


def test_released_input_kept_while_dependent_runs(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x", "y"], x=(const(1), []), y=(inc, ["x"]))
    [mx] = sim.pop("w1:1")
    sim.run("w1:1", mx)
    [my] = sim.pop("w1:1")
    s.client_releases_keys("c1", ["x"])
    assert s.tasks["x"].state == "memory"  # y still needs it
    assert not _deletes(s)
    sim.run("w1:1", my)
    assert ("w1:1", ["x"]) in _deletes(s)
    assert "x" not in s.who_has
    assert sim.result("y") == 2


def test_scattered_dependency_lost_errs_dependents(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    sim.scatter("c1", "w1:1", "data", 10)
    sim.scatter("c1", "w2:1", "other", 1)
    # z waits for y, which waits for q (kept back on w2)
    t, d = graph(q=(const(0), []), y=(add, ["data", "q"]), z=(inc, ["y"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["z"],
                   restrictions={"q": ["w2:1"]})
    assert s.tasks["z"].state == "waiting"
    sim.kill("w1:1")
    erred = {m["key"]: m["exception"] for m in sim.client_msgs("c1", "task-erred")}
    assert set(erred) == {"data", "z"}
    assert all(isinstance(e, LostData) for e in erred.values())
    assert s.tasks["y"].state == "erred"


def test_killed_worker_after_allowed_failures():
    sim = Sim(allowed_failures=2)
    sim.deleted = []
    s = sim.s
    sim.add_worker("w0:1")
    submit(s, "c1", ["bad"], bad=(const(1), []))
    submit(s, "c1", ["good"], good=(const(2), []))
    for i in range(1, 4):
        sim.add_worker("w%d:1" % i)
    for i in range(3):
        # whoever runs 'bad' dies
        runner = s.tasks["bad"].processing_on.address
        sim.pop(runner)
        sim.kill(runner)
        if i < 2:
            assert s.tasks["bad"].state in ("processing", "queued")
            assert s.tasks["bad"].suspicious == i + 1
    assert s.tasks["bad"].state == "erred"
    [m] = [m for m in sim.client_msgs("c1", "task-erred") if m["key"] == "bad"]
    assert isinstance(m["exception"], KilledWorker)
    assert "bad" in str(m["exception"])
    # the cluster carries on with the others
    sim.run_all()
    assert sim.result("good") == 2


def test_killed_worker_default_allowed_failures(sim):
    s = sim.s
    submit(s, "c1", ["bad"], bad=(const(1), []))
    deaths = 0
    for i in range(10):
        sim.add_worker("w%d:1" % i)
        if s.tasks["bad"].state == "erred":
            break
        runner = s.tasks["bad"].processing_on.address
        sim.kill(runner)
        deaths += 1
    assert s.tasks["bad"].state == "erred"
    assert deaths == s.allowed_failures + 1
    [m] = sim.client_msgs("c1", "task-erred")
    assert isinstance(m["exception"], KilledWorker)


# -- deaths whose cause the nanny tells (the state 'lost') ---------------------

CLOSED = "its connection closed"


def kill_runner(sim, key, cause=CLOSED, report_expected=True):
    """Kill the worker running ``key``; return its address."""
    runner = sim.s.tasks[key].processing_on.address
    sim.pop(runner)
    sim.kill(runner, cause=cause, report_expected=report_expected)
    return runner


def test_killed_worker_names_every_death_as_the_nannies_tell():
    sim = Sim(allowed_failures=2)
    sim.deleted = []
    s = sim.s
    plugin = Recorder()
    s.add_plugin(plugin)
    for i in range(4):
        sim.add_worker("w%d:1" % i)
    submit(s, "c1", ["bad"], bad=(const(1), []))
    causes = ["killed by signal SIGSEGV", "killed by signal SIGSEGV", "exit code 1"]
    runners = []
    for i, cause in enumerate(causes):
        runners.append(kill_runner(sim, "bad"))
        if i < 2:  # rescheduled at once; the cause comes later
            assert s.tasks["bad"].state == "processing"
        else:  # one death too many: held for the nanny's report
            assert s.tasks["bad"].state == "lost"
            assert not sim.client_msgs("c1", "task-erred")
            assert ("remove", runners[-1], CLOSED) not in plugin.events
        s.worker_died(runners[-1], cause=cause)
    assert s.tasks["bad"].state == "erred"
    [m] = sim.client_msgs("c1", "task-erred")
    assert isinstance(m["exception"], KilledWorker)
    assert str(m["exception"]) == (
        "task 'bad' was running on 3 workers that died: killed by signal SIGSEGV (%s); "
        "killed by signal SIGSEGV (%s); exit code 1 (%s). Not trying again (allowed "
        "failures: 2)" % tuple(runners))
    # the plugins heard of each removal with the nanny's cause
    removals = [e for e in plugin.events if e[0] == "remove"]
    assert removals == [("remove", r, c) for r, c in zip(runners, causes)]
    assert [e["finish"] for e in s.story("bad")][-2:] == ["lost", "erred"]


def test_killed_worker_without_a_report_says_what_is_known():
    sim = Sim(allowed_failures=0)
    s = sim.s
    plugin = Recorder()
    s.add_plugin(plugin)
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    submit(s, "c1", ["bad"], bad=(const(1), []))
    runner = kill_runner(sim, "bad")
    assert s.tasks["bad"].state == "lost"
    s.decide_death(runner)  # the grace period is over
    [m] = sim.client_msgs("c1", "task-erred")
    assert isinstance(m["exception"], KilledWorker)
    assert "1 workers that died: %s (%s)" % (CLOSED, runner) in str(m["exception"])
    assert ("remove", runner, CLOSED) in plugin.events
    # a report arriving late changes nothing (the error went out)
    s.worker_died(runner, cause="exit code 3")
    assert not sim.client_msgs("c1", "task-erred")
    assert s.tasks["bad"].state == "erred"


def test_death_blamed_on_the_data_held_runs_the_held_task_again():
    sim = Sim(allowed_failures=0)
    sim.deleted = []
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    submit(s, "c1", ["t"], t=(const(5), []))
    runner = kill_runner(sim, "t")
    assert s.tasks["t"].state == "lost"
    s.worker_died(runner, cause="memory limit exceeded (exit code 75): the data it "
                  "held was to blame", blame="data")
    assert s.tasks["t"].state == "processing"
    assert s.tasks["t"].suspicious == 0 and s.tasks["t"].deaths == ()
    assert "forgiven" in s.story("t")[-3]["cause"]  # lost -> released
    sim.run_all()
    assert sim.result("t") == 5
    assert not sim.client_msgs("c1", "task-erred")


def test_forgive_death_still_takes_back_an_earlier_count():
    sim = Sim(allowed_failures=1)
    sim.deleted = []
    s = sim.s
    for i in range(3):
        sim.add_worker("w%d:1" % i)
    submit(s, "c1", ["t"], t=(const(5), []))
    first = kill_runner(sim, "t", report_expected=False)
    assert s.tasks["t"].suspicious == 1
    s.forgive_death(first)
    assert s.tasks["t"].suspicious == 0
    kill_runner(sim, "t", report_expected=False)  # not one too many now
    assert s.tasks["t"].state == "processing"


def test_scattered_data_lost_with_a_worker_names_the_nannies_cause():
    sim = Sim()
    sim.deleted = []
    s = sim.s
    sim.add_worker("w1:1")
    sim.scatter("c1", "w1:1", "data", 1)
    submit(s, "c1", ["z"], z=(inc, ["data"]))
    sim.pop("w1:1")
    sim.kill("w1:1", cause=CLOSED, report_expected=True)
    assert s.tasks["data"].state == "lost"
    assert s.tasks["z"].state == "waiting"  # for its input, until decided
    assert not sim.client_msgs("c1", "task-erred")
    s.worker_died("w1:1", cause="killed by signal SIGKILL")
    erred = {m["key"]: m["exception"] for m in sim.client_msgs("c1", "task-erred")}
    assert set(erred) == {"data", "z"}
    for e in erred.values():
        assert isinstance(e, LostData)
        assert "scattered to w1:1, which died (killed by signal SIGKILL)" in str(e)


def test_lost_data_scattered_again_meanwhile_is_in_memory():
    sim = Sim()
    sim.deleted = []
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    sim.scatter("c1", "w1:1", "data", 1)
    sim.kill("w1:1", cause=CLOSED, report_expected=True)
    assert s.tasks["data"].state == "lost"
    sim.scatter("c1", "w2:1", "data", 2)
    assert s.tasks["data"].state == "memory"
    s.decide_death("w1:1")
    assert s.tasks["data"].state == "memory"
    assert not sim.client_msgs("c1", "task-erred")


def test_held_task_released_meanwhile_is_forgotten():
    sim = Sim(allowed_failures=0)
    sim.deleted = []
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["t"], t=(const(1), []))
    runner = kill_runner(sim, "t")
    assert s.tasks["t"].state == "lost"
    s.client_releases_keys("c1", ["t"])
    assert "t" not in s.tasks
    s.worker_died(runner, cause="exit code 3")
    assert not sim.client_msgs("c1", "task-erred")
    # submitted again, it runs anew
    sim.add_worker("w2:1")
    submit(s, "c1", ["t"], t=(const(1), []))
    sim.run_all()
    assert sim.result("t") == 1


def test_a_worker_registering_at_the_address_decides_its_old_death():
    sim = Sim(allowed_failures=0)
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["t"], t=(const(1), []))
    kill_runner(sim, "t")
    assert s.tasks["t"].state == "lost"
    sim.add_worker("w1:1")  # the same address again: the old worker is gone
    [m] = sim.client_msgs("c1", "task-erred")
    assert CLOSED in str(m["exception"])


def test_deaths_awaiting_reports_are_bounded():
    from distributed.scheduler import MAX_DEATHS

    sim = Sim(allowed_failures=0)
    s = sim.s
    submit(s, "c1", ["t"], t=(const(1), []))
    sim.add_worker("first:1")
    kill_runner(sim, "t")
    assert s.tasks["t"].state == "lost"
    for i in range(MAX_DEATHS):
        sim.add_worker("w%d:1" % i)
        sim.kill("w%d:1" % i, report_expected=True)
    assert len(s.deaths) == MAX_DEATHS and "first:1" not in s.deaths
    assert s.tasks["t"].state == "erred"  # decided when its death was dropped


def test_restart_forgets_held_tasks():
    sim = Sim(allowed_failures=0)
    s = sim.s
    sim.add_worker("w1:1")
    sim.scatter("c1", "w1:1", "data", 1)
    submit(s, "c1", ["t"], t=(const(1), []))
    sim.add_worker("w2:1")
    kill_runner(sim, "t")
    assert {ts.state for ts in s.tasks.values()} == {"lost"}
    s.restart()
    s.decide_death("w1:1")
    assert not s.tasks


def test_missing_data_from_one_holder_uses_another(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    sim.add_worker("w3:1")
    t, d = graph(x=(const(1), []), y=(inc, ["x"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"x": ["w1:1"], "y": ["w3:1"]})
    [mx] = sim.pop("w1:1")
    sim.run("w1:1", mx)
    s.add_keys("w2:1", ["x"])
    sim.data["w2:1"]["x"] = 1
    [my] = sim.pop("w3:1")
    # w3 says w1 failed to give x; w2 still has it: no recompute
    s.missing_data("w3:1", "y", missing=["x"], bad_workers=["w1:1"])
    assert s.who_has["x"] == {"w2:1"}
    assert sim.pop("w1:1") == [] and sim.pop("w2:1") == []
    [my] = sim.pop("w3:1")
    assert my["key"] == "y"
    assert my["who_has"] == {"x": ["w2:1"]}
    sim.run("w3:1", my)
    assert sim.result("y") == 2


def test_missing_data_recomputes_lost_input(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(x=(const(1), []), y=(inc, ["x"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"y": ["w2:1"]})
    [mx] = sim.pop("w1:1") or sim.pop("w2:1")
    holder = "w1:1" if s.tasks["x"].processing_on.address == "w1:1" else "w2:1"
    sim.run(holder, mx)
    [my] = sim.pop("w2:1")
    del sim.data[holder]["x"]  # the holder lost it without telling
    s.missing_data("w2:1", "y", missing=["x"], bad_workers=[holder])
    assert "x" not in s.who_has
    assert s.tasks["x"].state == "processing"
    assert s.tasks["y"].state == "waiting"
    sim.run_all()
    assert sim.result("y") == 2
    assert [k for _, k in sim.computed].count("x") == 2


def test_missing_scattered_data_errs(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    sim.scatter("c1", "w1:1", "data", 10)
    t, d = graph(y=(inc, ["data"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"y": ["w2:1"]})
    [my] = sim.pop("w2:1")
    s.missing_data("w2:1", "y", missing=["data"], bad_workers=["w1:1"])
    erred = {m["key"]: m["exception"] for m in sim.client_msgs("c1", "task-erred")}
    assert set(erred) == {"data", "y"}
    assert all(isinstance(e, LostData) for e in erred.values())
    assert sim.pop("w1:1") == [] and sim.pop("w2:1") == []


def test_missing_data_retries_are_bounded(sim):
    """A holder that answers but cannot hand over its data: the dependent is
    sent again and again, then errs instead of looping forever."""
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    t, d = graph(x=(const(1), []), y=(inc, ["x"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"],
                   restrictions={"x": ["w1:1"], "y": ["w2:1"]})
    [mx] = sim.pop("w1:1")
    sim.run("w1:1", mx)
    for i in range(MISSING_DATA_RETRIES + 1):
        assert s.tasks["y"].state == "processing", i
        assert [m["key"] for m in sim.pop("w2:1")] == ["y"]
        s.missing_data("w2:1", "y", missing=["x"], bad_workers=["w1:1"])
        # x looked lost: it is "recomputed" on w1, which still holds it
        for m in sim.pop("w1:1"):
            sim.run("w1:1", m)
    assert s.tasks["y"].state == "erred"
    [m] = sim.client_msgs("c1", "task-erred")
    assert m["key"] == "y"
    assert "x" in str(m["exception"])
    assert sim.pop("w2:1") == []


def test_stale_reports_are_ignored(sim):
    s = sim.s
    sim.add_worker("w1:1")
    # finished/erred/missing reports for keys nobody knows
    s.task_finished("w1:1", "ghost", nbytes=1, type="int")
    assert ("w1:1", ["ghost"]) in _deletes(s)
    s.task_erred("w1:1", "ghost2", exception=ValueError(), traceback=None)
    s.missing_data("w1:1", "ghost3", missing=["ghost4"], bad_workers=["w9:1"])
    s.task_finished("w9:1", "ghost5", nbytes=1, type="int")  # unknown worker
    assert s.tasks == {}
    assert not s.to_clients


def test_restart(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    keys = ["x-%d" % i for i in range(30)]
    submit(s, "c1", keys, **{k: (const(i), []) for i, k in enumerate(keys)})
    for m in sim.pop("w1:1")[:2]:
        sim.run("w1:1", m)
    sim.client_msgs("c1")
    s.restart()
    assert s.tasks == {}
    assert not any(s.who_has.values())
    assert not any(s.has_what.values())
    assert all(not ws.processing and not ws.queue for ws in s.workers.values())
    assert [m["op"] for m in sim.client_msgs("c1")] == ["restart"]
    for address in ["w1:1", "w2:1"]:
        [m] = [m for m in s.to_workers[address] if m["op"] == "delete-data"]
        assert m.get("all") is True
    sim.apply_deletes()
    assert all(not d for d in sim.data.values())
    # usable afterwards
    s.to_workers.clear()
    submit(s, "c1", ["y"], y=(const(7), []))
    sim.run_all()
    assert sim.result("y") == 7
    assert [m["key"] for m in sim.client_msgs("c1", "key-in-memory")] == ["y"]


def test_everything_forgotten_at_the_end(sim):
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:2", ncores=2)
    tasks = {"a-%d" % i: (const(i), []) for i in range(10)}
    tasks.update({"b-%d" % i: (inc, ["a-%d" % i]) for i in range(10)})
    tasks.update({"c-%d" % i: (add, ["b-%d" % i, "a-%d" % ((i + 1) % 10)])
                  for i in range(10)})
    keys = ["c-%d" % i for i in range(10)]
    submit(s, "c1", keys, **tasks)
    sim.run_all()
    assert [sim.result(k) for k in keys] == [i + 1 + (i + 1) % 10 for i in range(10)]
    s.client_releases_keys("c1", keys)
    sim.apply_deletes()
    assert s.tasks == {}
    assert not any(s.who_has.values())
    assert not s.nbytes
    assert all(not d for d in sim.data.values())
    assert all(not ws.processing for ws in s.workers.values())


def test_malformed_graph_changes_nothing():
    s = Scheduler()
    s.add_worker("w1:1", ncores=1)
    with pytest.raises(TypeError, match="dependencies of 'k'"):
        s.update_graph("c1", tasks={"j": "spec", "k": "spec"},
                       dependencies={"k": 5}, keys=["k"])
    assert not s.tasks
    assert not s.to_workers.get("w1:1")


def test_paused_worker_gets_no_tasks():
    s = Scheduler()
    s.add_worker("a:1", ncores=1)
    s.add_worker("b:1", ncores=1)
    s.add_client("c")
    s.set_paused("a:1", True)
    s.update_graph("c", tasks={"k%d" % i: "spec" for i in range(20)},
                   dependencies={}, keys=["k%d" % i for i in range(20)])
    tw, _ = s.flush()
    assert not tw.get("a:1")
    assert len(tw["b:1"]) > 0
    # resumed: it takes queued work again
    s.set_paused("a:1", False)
    for msg in tw["b:1"]:
        s.task_finished("b:1", msg["key"], nbytes=1)
    tw, _ = s.flush()
    assert any(m["op"] == "compute-task" for m in tw.get("a:1", []))


def test_errors_of_a_removed_worker_say_why_it_was_removed():
    sim = Sim(allowed_failures=0)
    s = sim.s
    sim.add_worker("w1:1")
    sim.scatter("c1", "w1:1", "data", 1)
    submit(s, "c1", ["t"], t=(const(1), []))
    assert s.tasks["t"].processing_on.address == "w1:1"
    sim.kill("w1:1", cause="it stopped answering heartbeats for 9 s")
    erred = {m["key"]: m["exception"] for m in sim.client_msgs("c1", "task-erred")}
    assert isinstance(erred["t"], KilledWorker) and isinstance(erred["data"], LostData)
    for e in erred.values():
        assert "w1:1" in str(e) and "stopped answering heartbeats for 9 s" in str(e)
        assert "segfault" not in str(e)


def test_memory_exit_blaming_data_does_not_count(sim):
    """A worker that says it exits for memory its data held: the task that
    was running is rescheduled with no death counted; one blaming its tasks
    (or saying nothing) counts as before."""
    s = sim.s
    submit(s, "c1", ["t"], t=(const(1), []))
    sim.add_worker("w1:1")
    s.memory_exit("w1:1", "data")
    sim.kill("w1:1")
    assert s.tasks["t"].suspicious == 0 and s.tasks["t"].state == "no-worker"
    sim.add_worker("w2:1")
    assert s.tasks["t"].processing_on.address == "w2:1"
    s.memory_exit("w2:1", "tasks")
    sim.kill("w2:1")
    assert s.tasks["t"].suspicious == 1


def test_nanny_report_blaming_data_forgives_a_death(sim):
    """The nanny's report comes after the removal: it takes the death back."""
    s = sim.s
    submit(s, "c1", ["t"], t=(const(1), []))
    sim.add_worker("w1:1")
    sim.kill("w1:1")
    assert s.tasks["t"].suspicious == 1
    s.forgive_death("w1:1")
    assert s.tasks["t"].suspicious == 0
    s.forgive_death("w1:1")  # once only
    assert s.tasks["t"].suspicious == 0
    sim.add_worker("w2:1")
    sim.run_all()
    assert sim.result("t") == 1


# ---------------------------------------------------------------------------
# the transition table, story, validate, plugins


def test_validate_runs_after_every_step():
    s = Scheduler()
    s.add_worker("w1:1")
    s.who_has["x"].add("w1:1")  # behind the scheduler's back: has_what lacks it
    with pytest.raises(InvariantError, match="'x'.*has_what of w1:1|'x'.*has_what"):
        s.add_client("c1")


def test_validate_finds_a_processing_task_missing_from_its_worker(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    ts = s.tasks["x"]
    ts.processing_on.processing.discard(ts)
    with pytest.raises(InvariantError, match="'x'.*not in its processing set"):
        s.validate()


def test_illegal_transition_raises_naming_key_and_states():
    s = Scheduler()
    s.add_worker("w1:1")
    s.update_graph("c1", tasks={"x": "spec"}, dependencies={}, keys=["x"])
    with pytest.raises(InvalidTransition, match="'x'.*'processing'.*'waiting'"):
        s._transition(s.tasks["x"], "waiting", "test")
    assert s.tasks["x"].state == "processing"


def test_transition_table_names_only_known_states():
    from distributed import scheduler

    states = {scheduler.RELEASED, scheduler.WAITING, scheduler.NO_WORKER,
              scheduler.QUEUED, scheduler.PROCESSING, scheduler.MEMORY,
              scheduler.ERRED, scheduler.LOST, scheduler.FORGOTTEN}
    assert {s for pair in TRANSITIONS for s in pair} == states
    assert all(isinstance(why, str) and why for why in TRANSITIONS.values())
    assert scheduler.FINISHED == {scheduler.RELEASED, scheduler.ERRED}


def test_story_says_what_happened_and_why(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["y"], x=(const(1), []), y=(inc, ["x"]))
    sim.run_all()
    story = s.story("x")
    assert [(e["start"], e["finish"]) for e in story] == [
        ("released", "waiting"), ("waiting", "processing"),
        ("processing", "memory"), ("memory", "released")]  # y holds its lineage
    assert story[1]["worker"] == "w1:1" and story[2]["cause"] == "task-finished"
    assert all(e["key"] == "x" for e in story)
    assert [e["time"] for e in story] == sorted(e["time"] for e in story)
    s.client_releases_keys("c1", ["y"])
    assert [e["finish"] for e in s.story("x")][-1] == "forgotten"
    both = s.story("x", "y")
    assert {e["key"] for e in both} == {"x", "y"} and len(both) == 5 + 5


def test_story_after_a_worker_died(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["t"], t=(const(1), []))
    sim.kill("w1:1", cause="it stopped answering")
    last = s.story("t")[-3:]
    assert [(e["start"], e["finish"]) for e in last] == [
        ("processing", "released"), ("released", "waiting"), ("waiting", "no-worker")]
    assert "w1:1" in last[0]["cause"] and "stopped answering" in last[0]["cause"]
    assert s.tasks["t"].state == "no-worker"


def test_story_log_is_bounded():
    s = Scheduler(transition_log_length=10)
    s.add_worker("w1:1")
    s.update_graph("c1", tasks={"k%d" % i: "spec" for i in range(20)},
                   dependencies={}, keys=["k%d" % i for i in range(20)])
    assert len(s.transition_log) == 10
    assert s.story("k0") == []


class Recorder(SchedulerPlugin):
    def __init__(self):
        self.events = []

    def transition(self, key, start, finish, **info):
        self.events.append((key, start, finish, info["worker"]))

    def add_worker(self, address):
        self.events.append(("add", address))

    def remove_worker(self, address, cause=None):
        self.events.append(("remove", address, cause))


def test_plugin_sees_transitions_and_workers(sim):
    s = sim.s
    plugin = Recorder()
    s.add_plugin(plugin)
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    sim.run_all()
    sim.kill("w1:1", cause="gone")
    assert plugin.events == [
        ("add", "w1:1"),
        ("x", "released", "waiting", None),
        ("x", "waiting", "processing", "w1:1"),
        ("x", "processing", "memory", "w1:1"),
        ("remove", "w1:1", "gone"),
        ("x", "memory", "released", "w1:1"),
        ("x", "released", "waiting", None),
        ("x", "waiting", "no-worker", None),
    ]
    s.remove_plugin(plugin)
    sim.add_worker("w2:1")
    assert plugin.events[-1] == ("x", "waiting", "no-worker", None)


def test_a_failing_plugin_does_not_break_the_scheduler(sim, caplog):
    class Broken(SchedulerPlugin):
        def transition(self, key, start, finish, **info):
            raise ValueError("plugin bug")

        def add_worker(self, address):
            raise ValueError("plugin bug")

    s = sim.s
    s.add_plugin(Broken())
    plugin = Recorder()
    s.add_plugin(plugin)
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    sim.run_all()
    assert sim.result("x") == 1
    assert ("x", "processing", "memory", "w1:1") in plugin.events
    assert "plugin bug" in caplog.text


def test_base_plugin_methods_do_nothing(sim):
    s = sim.s
    s.add_plugin(SchedulerPlugin())
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    sim.run_all()
    sim.kill("w1:1")
    assert s.tasks["x"].state == "no-worker"


def test_registered_keys_merge_when_the_worker_joins():
    """A worker registers its keys (tables only); its stream opening
    (add_worker) merges them with the tasks that want them."""
    s = Scheduler()
    s.add_replicas("w1:1", ["x", "stray"], nbytes={"x": 5, "other": 7})
    assert s.who_has == {"x": {"w1:1"}, "stray": {"w1:1"}}
    assert s.nbytes == {"x": 5}  # sizes of keys it does not hold are not kept
    s.update_graph("c1", tasks={"y": "spec"}, dependencies={}, keys=["y"])
    s.add_worker("w1:1")
    s.remove_keys("w1:1", ["stray"])
    assert "stray" not in s.who_has and s.has_what["w1:1"] == {"x"}
    s.remove_worker("w1:1", cause="test")
    assert not s.who_has and "w1:1" not in s.has_what and not s.nbytes


def test_delete_keys_releases_and_recomputes_wanted_ones(sim):
    s = sim.s
    sim.add_worker("w1:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    sim.run_all()
    assert s.delete_keys(["x", "unknown"]) == {"w1:1": ["x"]}
    assert s.tasks["x"].state == "processing"  # still wanted: computed again
    assert [m["op"] for m in sim.client_msgs("c1")] == ["key-in-memory", "lost-data"]


def test_released_run_forgotten_before_it_reports_frees_its_slot(sim):
    """Found by validate(): a task released while running on w1, submitted
    again (run on w2) and forgotten before w1 reports held a slot of w1
    forever (w1's processing set kept the forgotten task)."""
    s = sim.s
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    submit(s, "c1", ["x"], x=(const(1), []))
    [first] = sim.pop("w1:1")
    s.client_releases_keys("c1", ["x"])
    assert s.tasks["x"].state == "released"  # still running on w1
    submit(s, "c1", ["x"], x=(const(1), []))
    [again] = sim.pop("w2:1")
    sim.run("w2:1", again)
    s.client_releases_keys("c1", ["x"])
    assert "x" not in s.tasks
    sim.run("w1:1", first)  # the old run reports at last
    assert not s.workers["w1:1"].processing


def test_internals_doc_diagram_is_the_transition_table():
    """docs/internals.md draws TRANSITIONS (a mermaid diagram): same edges."""
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "internals.md")
    with open(path) as f:
        text = f.read()
    names = {"no_worker": "no-worker", "[*]": "forgotten"}
    edges = {(names.get(a, a), names.get(b, b))
             for a, b in re.findall(r"^    (\S+) --> (\S+):", text, re.M)}
    assert edges == set(TRANSITIONS)


# ---------------------------------------------------------------------------
# retries=, fire_and_forget (issue 11)


def flaky(fails):
    """A task that raises the first ``fails`` times it runs."""
    calls = [0]

    def run():
        calls[0] += 1
        if calls[0] <= fails:
            raise ZeroDivisionError("attempt %d" % calls[0])
        return calls[0]
    return run


def test_retries_run_an_erred_task_again(sim):
    s = sim.s
    sim.add_worker("w1:1")
    t, d = graph(x=(flaky(2), []), y=(inc, ["x"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"], retries={"x": 2})
    sim.run_all()
    assert sim.result("y") == 4  # x succeeded on its third run
    assert [k for _, k in sim.computed] == ["x", "x", "x", "y"]
    assert not sim.client_msgs("c1", "task-erred")
    causes = [e["cause"] for e in s.story("x")]
    assert sum("retries left" in c for c in causes) == 2
    assert "1 retries left" in causes[2] and "0 retries left" in causes[5]


def test_retries_run_out_then_the_error(sim):
    s = sim.s
    sim.add_worker("w1:1")
    t, d = graph(x=(flaky(5), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x"], retries={"x": 1})
    sim.run_all()
    assert [k for _, k in sim.computed] == ["x", "x"]
    [msg] = sim.client_msgs("c1", "task-erred")
    assert "attempt 2" in str(msg["exception"])
    assert s.tasks["x"].state == "erred"


def test_no_retries_by_default(sim):
    s = sim.s
    sim.add_worker("w1:1")
    t, d = graph(x=(flaky(1), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x"])
    sim.run_all()
    assert len(sim.computed) == 1
    assert sim.client_msgs("c1", "task-erred")


def test_retries_must_be_counts(sim):
    sim.add_worker("w1:1")
    t, d = graph(x=(const(1), []))
    with pytest.raises(TypeError, match="retries of 'x'"):
        sim.s.update_graph("c1", tasks=t, dependencies=d, keys=["x"], retries={"x": -1})
    assert "x" not in sim.s.tasks  # refused whole


def test_fire_and_forget_computes_released_keys_then_drops_them(sim):
    s = sim.s
    sim.add_worker("w1:1")
    t, d = graph(x=(const(1), []), y=(inc, ["x"]))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"])
    s.fire_and_forget("c1", ["y"])
    s.client_releases_keys("c1", ["y"])
    assert s.tasks["y"].state in ("waiting", "processing")  # still wanted
    sim.run_all()
    assert [k for _, k in sim.computed] == ["x", "y"]
    # done: nobody wants it, the scheduler forgot it and the worker dropped it
    assert "y" not in s.tasks and "x" not in s.tasks
    assert not sim.data["w1:1"]
    assert not s.clients["fire-and-forget"]


def test_fire_and_forget_of_an_erring_task(sim):
    s = sim.s
    sim.add_worker("w1:1")
    t, d = graph(x=(boom, []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x"])
    s.fire_and_forget("c1", ["x"])
    s.client_releases_keys("c1", ["x"])
    sim.run_all()
    assert sim.computed == [("w1:1", "x")]
    assert "x" not in s.tasks


# ---------------------------------------------------------------------------
# resources= (issue 11)


def test_resources_run_only_where_free(sim):
    s = sim.s
    sim.data["gpu:1"] = {}
    s.add_worker("gpu:1", ncores=4, resources={"GPU": 1})
    sim.add_worker("cpu:1", ncores=4)
    t, d = graph(a=(const(1), []), b=(const(2), []), c=(const(3), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["a", "b", "c"],
                   resources={"a": {"GPU": 1}, "b": {"GPU": 1}})
    # both want the one GPU: one runs, the other waits though slots are free
    sent = sim.pop("gpu:1")
    assert [m["key"] for m in sent] == ["a"]
    assert s.tasks["b"].state == "queued" and s.tasks["b"].processing_on.address == "gpu:1"
    assert s.workers["gpu:1"].used_resources == {"GPU": 1}
    sim.run("gpu:1", sent[0])
    [m] = sim.pop("gpu:1")  # the GPU is free again: b goes
    assert m["key"] == "b"
    sim.run("gpu:1", m)
    sim.run_all()
    assert s.workers["gpu:1"].used_resources == {"GPU": 0}
    assert {k for a, k in sim.computed if a == "gpu:1"} >= {"a", "b"}
    assert sim.result("c") == 3


def test_resources_no_worker_has_them_until_one_comes(sim):
    s = sim.s
    sim.add_worker("cpu:1")
    t, d = graph(x=(const(1), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x"],
                   resources={"x": {"GPU": 2}})
    assert s.tasks["x"].state == "no-worker"
    sim.data["gpu:1"] = {}
    s.add_worker("gpu:1", resources={"GPU": 1})  # not enough
    assert s.tasks["x"].state == "no-worker"
    sim.data["gpu:2"] = {}
    s.add_worker("gpu:2", resources={"GPU": 2, "MEM": 10e9})
    [m] = sim.pop("gpu:2")
    sim.run("gpu:2", m)
    assert sim.result("x") == 1


def test_resources_freed_when_the_worker_dies_or_a_task_errs(sim):
    s = sim.s
    for a in ("g1:1", "g2:1"):
        sim.data[a] = {}
        s.add_worker(a, resources={"GPU": 1})
    t, d = graph(x=(boom, []), y=(const(2), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x", "y"],
                   resources={"x": {"GPU": 1}, "y": {"GPU": 1}})
    where = {m["key"]: a for a in ("g1:1", "g2:1") for m in s.to_workers[a]}
    assert set(where) == {"x", "y"}
    sim.kill(where["y"])  # y runs again on the other worker, once x frees it
    sim.run_all()
    assert sim.result("y") == 2 and s.tasks["x"].state == "erred"
    assert all(ws.used_resources == {"GPU": 0} for ws in s.workers.values())
