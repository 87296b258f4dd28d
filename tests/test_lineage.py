"""Keys that must stay findable: invalid keys refused, lost keys healed.

The cluster is the ``cluster`` fixture of conftest.py (a LocalCluster, real
worker processes); the center-restart and frozen-worker cases, which need
processes of their own, are in ``test_resilience.py``.
"""

import pytest

from distributed.utils_test import add, inc, poll, uid

NAN = float("nan")


# ---------------------------------------------------------------------------
# keys that could never be found again are refused


@pytest.mark.parametrize("key", [NAN, ("x", NAN), ("x", ("y", NAN)), ["x"], None,
                                 frozenset("x"), object()])
def test_validate_key_refuses(key):
    from distributed.utils import validate_key

    with pytest.raises(ValueError, match="invalid key .*a key is a str, bytes, int"):
        validate_key(key)


@pytest.mark.parametrize("key", ["x", b"x", 1, True, 1.5, float("inf"), ("x", 1),
                                 ("x", (1, "y")), ()])
def test_validate_key_accepts(key):
    from distributed.utils import validate_key

    validate_key(key)


def test_nan_key_refused_everywhere(e):
    """A NaN key used to leave its task ``processing`` forever (nan != nan)."""
    with pytest.raises(ValueError, match="NaN is not equal to itself"):
        e.submit(inc, 1, key=NAN)
    with pytest.raises(ValueError, match="invalid key"):
        e.submit(inc, 1, key=("t", NAN))
    with pytest.raises(ValueError, match="invalid key"):
        e.map(inc, [1, 2], key=["a-" + uid(), NAN])
    with pytest.raises(ValueError, match="invalid key"):
        e.get({NAN: 1, "y": (inc, NAN)}, "y")
    with pytest.raises(ValueError, match="invalid key"):
        e.get({"x": 1}, NAN)
    with pytest.raises(ValueError, match="invalid key"):
        e.scatter({NAN: 1})
    assert not e.futures  # nothing half-sent
    # the executor is unharmed; floats that equal themselves are keys
    assert e.submit(inc, 1, key=1.5).result(timeout=10) == 2
    assert e.get({2.5: 1, "y-" + uid(): (inc, 2.5)}, 2.5) == 1


# ---------------------------------------------------------------------------
# a key a worker lost behind the center's back


def test_key_deleted_behind_center_is_recomputed(e, cluster):
    """The center lists a key the worker no longer has: a dependent must not
    fail with LostData after retries; the key is recomputed and the center's
    ``who_has`` corrected."""
    x = e.submit(inc, 1, key="x-" + uid())
    assert x.result(timeout=10) == 2
    (holder,) = e.who_has([x])[x.key]
    e.sync(e._rpc(holder).delete_data, keys=[x.key], report=False)
    assert e.who_has([x])[x.key] == [holder]  # the center does not know yet
    y = e.submit(add, x, 10, key="y-" + uid())
    assert y.result(timeout=20) == 12
    holders = e.who_has([x])[x.key]
    assert holders
    for address in holders:
        assert x.key in e.sync(e._rpc(address).keys)
    assert x.result(timeout=10) == 2


def test_key_deleted_behind_center_gather_heals(e, cluster):
    """Gathering a key its listed holder no longer has: recomputed, not a
    fetch repeated forever."""
    x = e.submit(inc, 41, key="x-" + uid())
    x.result(timeout=10)
    (holder,) = e.who_has([x])[x.key]
    e.sync(e._rpc(holder).delete_data, keys=[x.key], report=False)
    x._state.value = None  # small results ride along; make it fetch
    assert e.gather(x) == 42
    poll(lambda: all(x.key in e.sync(e._rpc(a).keys)
                     for a in e.who_has([x])[x.key]) and e.who_has([x])[x.key])


# ---------------------------------------------------------------------------
# the scheduler's side, driven directly (see test_scheduler.Sim)

from test_scheduler import Sim, const, graph  # noqa: E402


@pytest.fixture
def sim():
    sim = Sim()
    sim.deleted = []
    sim.add_worker("w1:1")
    sim.add_worker("w2:1")
    return sim


def test_registered_key_merged_with_graph_sent_again(sim):
    """A restarted center: a worker registers x, then the executor sends the
    tasks again; x is in memory with its lineage, nothing is recomputed."""
    s = sim.s
    sim.data["w1:1"]["x"] = 1
    s.add_keys("w1:1", ["x"], {"x": 28})
    t, d = graph(x=(const(1), []), y=(inc_, ["x"]))
    sim.data["w2:1"]["y"] = 2
    s.add_keys("w2:1", ["y"], {"y": 28})
    s.update_graph("c1", tasks=t, dependencies=d, keys=["y"], lineage_only=True)
    assert s.tasks["y"].state == "memory" and s.tasks["x"].state == "released"
    assert [m["key"] for m in sim.client_msgs("c1", "key-in-memory")] == ["y"]
    sim.run_all()
    assert sim.computed == []
    assert ("w1:1", ("x",)) in sim.deleted  # nobody needs it now
    # lineage: y's holder dies, y (and x, released) are recomputed
    sim.kill("w2:1")
    assert [m["key"] for m in sim.client_msgs("c1", "lost-data")] == ["y"]
    sim.run_all()
    assert sim.result("y") == 2
    assert not sim.client_msgs("c1", "task-erred")


def test_key_registered_after_graph_is_merged(sim):
    s = sim.s
    t, d = graph(x=(const(1), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x"])
    assert s.tasks["x"].state == "processing"
    s.add_keys("w2:1", ["x"], {"x": 28})
    assert s.tasks["x"].state == "memory"
    assert s.who_has["x"] == {"w2:1"}
    [msg] = sim.client_msgs("c1", "key-in-memory")
    assert msg["workers"] == ["w2:1"]


def test_pending_work_sent_again_runs_only_what_is_needed(sim):
    s = sim.s
    t, d = graph(x=(const(1), []), y=(inc_, ["x"]), z=(inc_, ["y"]))
    sim.data["w1:1"]["y"] = 2
    s.add_keys("w1:1", ["y"])
    s.update_graph("c1", tasks=t, dependencies=d, keys=["z"], lineage_only=True)
    sim.run_all()
    assert [k for _, k in sim.computed] == ["z"]
    assert sim.result("z") == 3


def test_rejoin_keeps_only_needed_keys(sim):
    s = sim.s
    t, d = graph(a=(const(1), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["a"],
                   restrictions={"a": ["w3:1"]})
    assert s.tasks["a"].state == "no-worker"
    t, d = graph(b=(const(2), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["b"])
    sim.run_all()
    # w3 comes back with a (needed, held nowhere), b (held elsewhere), c (unknown)
    sim.data["w3:1"] = {"a": 1, "b": 2, "c": 3}
    s.rejoin("w3:1", ["a", "b", "c"], {"a": 28})
    sim.s.add_worker("w3:1")
    sim.apply_deletes()
    assert sim.data["w3:1"] == {"a": 1}
    assert s.tasks["a"].state == "memory" and s.who_has["a"] == {"w3:1"}
    assert "c" not in s.who_has and "w3:1" not in s.who_has["b"]


def test_missing_keys_recomputed_or_lost(sim):
    s = sim.s
    t, d = graph(x=(const(1), []))
    s.update_graph("c1", tasks=t, dependencies=d, keys=["x"])
    sim.run_all()
    (holder,) = s.who_has["x"]
    sim.scatter("c1", holder, "s", 5)
    sim.data[holder].clear()  # behind the center's back
    s.missing_keys("w9:1", ["x"])  # not a listed holder: nothing happens
    assert s.tasks["x"].state == "memory"
    s.missing_keys(holder, ["x", "s"])
    assert sorted(m["key"] for m in sim.client_msgs("c1", "lost-data")) == ["s", "x"]
    sim.run_all()
    assert sim.result("x") == 1
    [err] = sim.client_msgs("c1", "task-erred")
    assert err["key"] == "s" and "no lineage" in str(err["exception"])


def inc_(x):
    return x + 1
