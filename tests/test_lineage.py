"""Keys that must stay findable: invalid keys refused, lost keys healed.

The cluster is the LocalCluster of ``test_executor`` (real worker
processes); the center-restart and frozen-worker cases, which need
processes of their own, are in ``test_resilience.py``.
"""

import pytest

from distributed.utils_test import add, inc, poll

from test_executor import cluster, e, uid  # noqa: F401  (fixtures)

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
