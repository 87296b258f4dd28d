"""Center handlers through rpc: bare centers with fake workers, and
in-process clusters (gen_cluster)."""

import asyncio
import json
import time
from collections import defaultdict

import pytest
from tornado.httpclient import AsyncHTTPClient

from distributed.center import Center
from distributed.core import connect, rpc
from distributed.http import HTTPCenter
from distributed.utils_test import gen_cluster, named_like, run, wait_for

A = "127.0.0.1:50001"
B = "127.0.0.1:50002"
C = "127.0.0.1:50003"


def with_center(**center_kwargs):
    """Decorator: ``async def test(center)`` on a bare listening Center."""

    def decorator(func):
        def test():
            async def main():
                c = Center("127.0.0.1", **center_kwargs)
                c.listen(0)
                try:
                    await func(c)
                finally:
                    c.close()

            run(main())

        return named_like(test, func)

    return decorator


def fake_worker(c):
    """An rpc of its own (own stream) for one fake worker."""
    return rpc(c.address)


# ---------------------------------------------------------------------------
# registration


@with_center()
async def test_register_unregister(c):
    wa, wb = fake_worker(c), fake_worker(c)
    assert await wa.register(address=A, ncores=2, keys=["x", "y"],
                             nbytes={"x": 10, "y": 20}, services={"http": 1234},
                             name="alice") == b"OK"
    assert await wb.register(address=("127.0.0.1", 50002), ncores=4) == b"OK"
    assert c.ncores == {A: 2, B: 4}
    assert c.has_what[A] == {"x", "y"}
    assert c.has_what[B] == set()
    assert c.who_has["x"] == {A}
    assert c.nbytes == {"x": 10, "y": 20}
    assert c.worker_services == {A: {"http": 1234}, B: {}}
    assert c.names == {A: "alice", B: B}

    ident = await wa.identity()
    assert ident["type"] == "Center"
    assert sorted(ident["workers"]) == [A, B]

    admin = rpc(c.address)  # (a connection other than the registration's)
    assert await admin.unregister(address=A) == b"OK"
    assert A not in c.ncores
    assert A not in c.has_what
    assert "x" not in c.who_has and "y" not in c.who_has
    assert A not in c.worker_services and A not in c.names
    assert await admin.unregister(address=A) == b"unknown"
    assert c.ncores == {B: 4}
    for r in (wa, wb, admin):
        r.close_streams()


@with_center()
async def test_unregister_on_registration_connection(c):
    w = fake_worker(c)
    await w.register(address=A, ncores=1, keys=["x"])
    assert await w.unregister(address=A, timeout=5) == b"OK"
    assert A not in c.ncores


@with_center()
async def test_register_address_forms(c):
    for i, form in enumerate([("127.0.0.1", 50010), ["127.0.0.1", 50011],
                              "127.0.0.1:50012", "tcp://127.0.0.1:50013"]):
        w = fake_worker(c)
        await w.register(address=form, ncores=1, keys=["k%d" % i])
        assert c.ncores["127.0.0.1:%d" % (50010 + i)] == 1
    assert len(c.ncores) == 4
    assert all(len(v) == 1 for v in c.who_has.values())


@with_center()
async def test_reregister_replaces(c):
    w1 = fake_worker(c)
    await w1.register(address=A, ncores=1, keys=["x"])
    w2 = fake_worker(c)  # e.g. a worker that restarted, on a new connection
    await w2.register(address=A, ncores=3, keys=["y"])
    assert c.ncores == {A: 3}
    assert c.has_what[A] == {"y"}
    assert "x" not in c.who_has
    # the old connection closing does not remove the new registration
    w1.close_streams()
    await asyncio.sleep(0.05)
    assert c.ncores == {A: 3}
    w2.close_streams()
    await wait_for(lambda: A not in c.ncores)


@with_center()
async def test_reregister_on_same_connection(c):
    w = fake_worker(c)
    await w.register(address=A, ncores=1, keys=["x"])
    assert await w.register(address=A, ncores=2, keys=["y"], timeout=5) == b"OK"
    assert c.ncores == {A: 2}
    assert c.who_has == {"y": {A}}


@with_center()
async def test_duplicate_name_refused(c):
    wa, wb = fake_worker(c), fake_worker(c)
    await wa.register(address=A, ncores=1, name="alice")
    with pytest.raises(ValueError, match="alice"):
        await wb.register(address=B, ncores=1, name="alice")
    assert B not in c.ncores
    assert c.names == {A: "alice"}
    # another name is fine, and so is the same worker re-registering its name
    await wb.register(address=B, ncores=1, name="bob")
    await fake_worker(c).register(address=A, ncores=2, name="alice")
    assert c.names == {A: "alice", B: "bob"}
    assert c.ncores[A] == 2


# ---------------------------------------------------------------------------
# keys


@with_center()
async def test_add_remove_keys(c):
    wa, wb = fake_worker(c), fake_worker(c)
    await wa.register(address=A, ncores=1)
    await wb.register(address=B, ncores=1)
    assert await wa.add_keys(address=A, keys=["x", "y"], nbytes={"x": 1, "y": 2}) == b"OK"
    assert await wb.add_keys(address=B, keys=["y", ("z", 1)]) == b"OK"
    assert c.who_has == {"x": {A}, "y": {A, B}, ("z", 1): {B}}
    assert c.has_what == {A: {"x", "y"}, B: {"y", ("z", 1)}}
    assert c.nbytes == {"x": 1, "y": 2}

    assert await wa.remove_keys(address=A, keys=["y", "x", "never-there"]) == b"OK"
    assert c.who_has == {"y": {B}, ("z", 1): {B}}
    assert c.has_what[A] == set()
    assert "x" not in c.nbytes  # nobody holds it any more
    assert c.nbytes["y"] == 2  # B still holds it

    with pytest.raises(ValueError, match="not registered"):
        await wa.add_keys(address=C, keys=["w"])
    assert "w" not in c.who_has


@with_center()
async def test_queries(c):
    wa, wb = fake_worker(c), fake_worker(c)
    await wa.register(address=A, ncores=2, keys=["x", "y"], nbytes={"x": 10, "y": 20})
    await wb.register(address=B, ncores=3, keys=["y", "z"], nbytes={"z": 30})
    q = rpc(c.address)

    assert await q.who_has() == {"x": {A}, "y": {A, B}, "z": {B}}
    assert await q.who_has(keys=["x", "z"]) == {"x": {A}, "z": {B}}
    assert await q.who_has(keys=["nope"]) == {"nope": set()}

    assert await q.has_what() == {A: {"x", "y"}, B: {"y", "z"}}
    assert await q.has_what(addresses=[A]) == {A: {"x", "y"}}
    assert await q.has_what(keys=[A]) == {A: {"x", "y"}}  # the original's name
    assert await q.has_what(addresses=[("127.0.0.1", 50002)]) == {B: {"y", "z"}}
    assert await q.has_what(addresses=[C]) == {C: set()}

    assert await q.ncores() == {A: 2, B: 3}
    assert await q.ncores(addresses=[B]) == {B: 3}
    assert await q.ncores(addresses=[A, C]) == {A: 2, C: None}

    assert await q.nbytes() == {"x": 10, "y": 20, "z": 30}
    assert await q.nbytes(keys=["x", "z"]) == {"x": 10, "z": 30}

    # replies are copies: changing the tables later does not change them
    reply = await q.who_has()
    await wa.remove_keys(address=A, keys=["x"])
    assert reply["x"] == {A}
    for r in (wa, wb, q):
        r.close_streams()


@with_center()
async def test_tables_are_defaultdict_of_set(c):
    for table in (c.who_has, c.has_what):
        assert isinstance(table, defaultdict)
        assert table.default_factory is set
    assert c.who_has["unknown-key"] == set()
    c.who_has["k"].add(A)
    assert c.who_has["k"] == {A}
    assert c.has_what["unknown-address"] == set()


@with_center()
async def test_ping_identity_terminate(c):
    r = rpc(c.address)
    assert await r.ping() == b"pong"
    assert (await r.identity())["type"] == "Center"
    assert await r.terminate() == b"OK"

    async def refused():
        try:
            stream = await connect(c.address, timeout=1)
        except OSError:
            return True
        stream.close()
        return False

    deadline = time.time() + 5
    while not await refused():
        assert time.time() < deadline, "center still accepts connections"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------
# workers leaving


@with_center()
async def test_worker_stream_closes(c):
    wa, wb = fake_worker(c), fake_worker(c)
    await wa.register(address=A, ncores=1, keys=["only-a", "shared"],
                      nbytes={"only-a": 5, "shared": 6}, name="a")
    await wb.register(address=B, ncores=1, keys=["shared", "only-b"])
    wa.close_streams()
    await wait_for(lambda: A not in c.ncores)
    assert A not in c.has_what
    assert "only-a" not in c.who_has
    assert c.who_has["shared"] == {B}
    assert c.who_has["only-b"] == {B}
    assert A not in c.names and A not in c.worker_services
    assert c.ncores == {B: 1}
    wb.close_streams()
    await wait_for(lambda: not c.ncores)
    assert not c.who_has and not c.has_what


@with_center()
async def test_one_connection_registering_two_workers(c):
    r = rpc(c.address)
    await r.register(address=A, ncores=1, keys=["x"])
    await r.register(address=B, ncores=1, keys=["y"])
    assert set(c.ncores) == {A, B}
    r.close_streams()
    await wait_for(lambda: not c.ncores, timeout=3)
    assert not c.who_has


@with_center()
async def test_worker_removal_forgets_nbytes_of_lost_keys(c):
    wa, wb = fake_worker(c), fake_worker(c)
    await wa.register(address=A, ncores=1, keys=["only-a", "shared"],
                      nbytes={"only-a": 5, "shared": 6})
    await wb.register(address=B, ncores=1, keys=["shared"])
    wa.close_streams()
    await wait_for(lambda: A not in c.ncores)
    assert c.nbytes == {"shared": 6}
    wb.close_streams()


# -- why a worker with a nanny died: the decisions wait for the nanny's report


NANNY = "127.0.0.1:50009"


async def worker_running_a_task(c, address=A, nanny=NANNY):
    """A fake worker (registered with a nanny) running task 't', which
    has killed all the workers it may (``allowed_failures=0``), and a
    scattered key 'data' only it holds; returns its rpc."""
    w = fake_worker(c)
    await w.register(address=address, ncores=1, keys=["data"], nanny=nanny)
    s = c.scheduler
    s.add_worker(address, 1)  # what its worker-stream would do
    s.update_data("c1", who_has={"data": [address]}, nbytes={"data": 8})
    s.update_graph("c1", tasks={"t": "spec"}, dependencies={}, keys=["t"])
    assert s.tasks["t"].processing_on.address == address
    return w


class Removals:
    def __init__(self):
        self.removed = []

    def remove_worker(self, address, cause=None):
        self.removed.append((address, cause))

    def __getattr__(self, name):  # the other hooks: nothing to do
        return lambda *args, **kwargs: None


@with_center(allowed_failures=0, death_report_grace=5, validate=True)
async def test_killed_worker_waits_for_the_nannys_report(c):
    plugin = Removals()
    c.scheduler.add_plugin(plugin)
    w = await worker_running_a_task(c)
    w.close_streams()
    await wait_for(lambda: A not in c.ncores)
    tasks = c.scheduler.tasks
    assert tasks["t"].state == "lost" and tasks["data"].state == "lost"
    assert plugin.removed == []  # told with the cause, once known
    r = rpc(c.address)
    assert await r.worker_died(address=A, cause="killed by signal SIGSEGV") == b"OK"
    assert tasks["t"].state == "erred"
    assert "1 workers that died: killed by signal SIGSEGV (%s)" % A in str(tasks["t"].exception)
    assert tasks["data"].state == "erred"
    assert "which died (killed by signal SIGSEGV)" in str(tasks["data"].exception)
    assert plugin.removed == [(A, "killed by signal SIGSEGV")]
    (_, address, cause), = c.deaths
    assert (address, cause) == (A, "killed by signal SIGSEGV")
    assert not c._death_timers
    assert not c.invariant_errors
    r.close_streams()


@with_center(allowed_failures=0, death_report_grace=0.3, validate=True)
async def test_without_a_report_the_grace_period_decides(c):
    w = await worker_running_a_task(c)
    w.close_streams()
    await wait_for(lambda: A not in c.ncores)
    t0 = time.time()
    tasks = c.scheduler.tasks
    assert tasks["t"].state == "lost"
    await wait_for(lambda: tasks["t"].state == "erred", timeout=5)
    assert time.time() - t0 > 0.2  # it waited
    assert "its connection closed" in str(tasks["t"].exception)
    assert "its connection closed" in str(tasks["data"].exception)
    assert not c._death_timers
    assert not c.invariant_errors


@with_center(allowed_failures=0, death_report_grace=5, validate=True)
async def test_nanny_report_before_the_connection_closes(c):
    w = await worker_running_a_task(c)
    r = rpc(c.address)
    # the nanny was quicker than the center's read of the closed stream
    await r.worker_died(address=A, cause="exit code 3")
    assert A in c.ncores  # a report alone removes nobody
    w.close_streams()
    await wait_for(lambda: A not in c.ncores)
    tasks = c.scheduler.tasks
    assert tasks["t"].state == "erred"  # at once: the cause is known
    assert "exit code 3 (%s)" % A in str(tasks["t"].exception)
    r.close_streams()


@with_center(allowed_failures=0, death_report_grace=5, validate=True)
async def test_worker_without_a_nanny_is_decided_at_once(c):
    w = await worker_running_a_task(c, nanny=None)
    w.close_streams()
    await wait_for(lambda: A not in c.ncores)
    tasks = c.scheduler.tasks
    assert tasks["t"].state == "erred"
    assert "its connection closed" in str(tasks["t"].exception)
    assert not c._death_timers


@with_center(allowed_failures=0, death_report_grace=5, validate=True)
async def test_watched_worker_waits_for_the_report_as_under_a_nanny(c):
    """A LocalCluster is the nanny of its workers: it says it watches them."""
    w = await worker_running_a_task(c, nanny=None)
    r = rpc(c.address)
    assert await r.watch_workers(addresses=[A, C]) == b"OK"
    assert c.watched == {A}  # C is not registered
    w.close_streams()
    await wait_for(lambda: A not in c.ncores)
    tasks = c.scheduler.tasks
    assert tasks["t"].state == "lost"
    assert not c.watched
    await r.worker_died(address=A, cause="exit code 1")
    assert "exit code 1 (%s)" % A in str(tasks["t"].exception)
    # all workers, from now on (what a LocalCluster says before they start)
    assert await r.watch_workers() == b"OK"
    w2 = fake_worker(c)
    await w2.register(address=B, ncores=1, keys=["d2"])
    c.scheduler.add_worker(B, 1)
    c.scheduler.update_data("c1", who_has={"d2": [B]}, nbytes={"d2": 8})
    w2.close_streams()
    await wait_for(lambda: B not in c.ncores)
    assert tasks["d2"].state == "lost"
    await r.worker_died(address=B, cause="exit code 2")
    assert "which died (exit code 2)" in str(tasks["d2"].exception)
    r.close_streams()


@with_center()
async def test_reported_cause_is_bounded_text(c):
    r = rpc(c.address)
    await r.worker_died(address=A, cause="x" * 100000)
    await r.worker_died(address=B, cause=12345)
    (_, _, long), (_, _, number) = c.deaths
    assert isinstance(long, str) and 1000 <= len(long) < 1100
    assert number == "12345"
    r.close_streams()


@with_center(heartbeat_timeout=0.5)
async def test_heartbeat_timeout(c):
    silent, alive = fake_worker(c), fake_worker(c)
    await silent.register(address=A, ncores=1, keys=["x", "shared"])
    await alive.register(address=B, ncores=1, keys=["shared"])
    assert await alive.heartbeat(address=B) == b"OK"
    assert await alive.heartbeat(address=C) == b"unknown"

    stop = asyncio.Event()

    async def beat():
        while not stop.is_set():
            await alive.heartbeat(address=B)
            await asyncio.sleep(0.1)

    beating = asyncio.ensure_future(beat())
    try:
        # A's stream stays open, but it says nothing
        await wait_for(lambda: A not in c.ncores, timeout=5)
        assert "x" not in c.who_has
        assert c.who_has["shared"] == {B}
        assert B in c.ncores
        # heartbeats from a removed worker tell it to register again
        assert await rpc(c.address).heartbeat(address=A) == b"unknown"
    finally:
        stop.set()
        await beating


@gen_cluster(ncores=[1, 2])
async def test_cluster_tables(c, a, b):
    assert c.ncores == {a.address: 1, b.address: 2}
    assert set(c.has_what) == {a.address, b.address}
    assert c.names[a.address] in (a.address, a.name)
    r = rpc(c.address)
    assert await r.ncores() == {a.address: 1, b.address: 2}
    r.close_streams()


@gen_cluster(ncores=[1, 1])
async def test_cluster_worker_dies(c, a, b):
    await rpc(a.address).update_data(data={"x": 1, "shared": 2})
    await rpc(b.address).update_data(data={"shared": 2, "y": 3})
    assert c.who_has["shared"] == {a.address, b.address}
    await b._close(report=False)  # no unregister: only the stream closes
    await wait_for(lambda: b.address not in c.ncores)
    assert c.who_has == {"x": {a.address}, "shared": {a.address}}
    assert b.address not in c.has_what


@gen_cluster(ncores=[1, 1])
async def test_delete_data(c, a, b):
    await rpc(a.address).update_data(data={"x": 1, "y": 2})
    await rpc(b.address).update_data(data={"x": 1, "z": 3})
    r = rpc(c.address)
    assert await r.delete_data(keys=["x", "z", "unknown"]) == b"OK"
    assert "x" not in a.data and "x" not in b.data and "z" not in b.data
    assert a.data == {"y": 2}
    assert c.who_has == {"y": {a.address}}
    assert c.has_what[b.address] == set()
    assert "x" not in c.nbytes and "z" not in c.nbytes
    r.close_streams()


@gen_cluster(ncores=[1, 1])
async def test_broadcast(c, a, b):
    r = rpc(c.address)
    assert await r.broadcast(msg={"op": "ping"}) == {a.address: b"pong", b.address: b"pong"}
    await rpc(a.address).update_data(data={"x": 1})
    replies = await r.broadcast(msg={"op": "get_data", "keys": ["x"]})
    assert replies == {a.address: {"x": 1}, b.address: {}}
    assert await r.broadcast(msg={"op": "ping"}, workers=[b.address]) == {b.address: b"pong"}
    with pytest.raises(ValueError):
        await r.broadcast(msg={"no": "op"})
    r.close_streams()


@gen_cluster(ncores=[1])
async def test_worker_unregisters_on_close(c, a):
    await rpc(a.address).update_data(data={"x": 1})
    assert c.who_has["x"] == {a.address}
    await a._close()
    assert a.address not in c.ncores
    assert "x" not in c.who_has


@with_center(services={"http": HTTPCenter})
async def test_http_center(c):
    port = c.service_ports["http"]
    assert isinstance(port, int) and port > 0
    w = fake_worker(c)
    await w.register(address=A, ncores=2, keys=["x", ("y", 1)])
    client = AsyncHTTPClient()

    async def get(route):
        resp = await client.fetch("http://127.0.0.1:%d/%s" % (port, route))
        assert resp.headers["Content-Type"].startswith("application/json")
        return json.loads(resp.body)

    info = await get("info.json")
    assert info["address"] == c.address
    assert info["workers"] == [A]
    assert info["ncores"] == {A: 2}
    assert info["nkeys"] == 2
    assert await get("who_has.json") == {"x": [A], str(("y", 1)): [A]}
    assert sorted((await get("has_what.json"))[A]) == sorted(["x", str(("y", 1))])
    assert await get("ncores.json") == {A: 2}
    w.close_streams()


def test_center_start_forms():
    async def main():
        c = Center("127.0.0.1")
        assert await c._start(0) is c
        c2 = Center("127.0.0.1", port=0)  # the port listen() uses by default
        assert await c2 is c2
        try:
            for center in (c, c2):
                assert center.port > 0
                assert center.address == "127.0.0.1:%d" % center.port
                assert await rpc(center.address).ping() == b"pong"
            assert c.port != c2.port
        finally:
            c.close()
            c2.close()

    run(main())


def test_allowed_failures_reaches_the_scheduler():
    from distributed.center import Center
    from distributed.cli.dcenter import make_parser

    assert Center("127.0.0.1", allowed_failures=1).scheduler.allowed_failures == 1
    assert Center("127.0.0.1").scheduler.allowed_failures == 3
    assert make_parser().parse_args(["--allowed-failures", "5"]).allowed_failures == 5


# ---------------------------------------------------------------------------
# the scheduler's story and invariants, through the center


@gen_cluster()
async def test_story_over_rpc(c, a, b):
    from distributed.executor import Executor

    async with Executor(c.address, start=False) as e:
        x = e.submit(sum, [1, 2], key="story-x")
        assert await x == 3
        story = await rpc(c.address).story(keys=["story-x"])
        assert await e._story(x) == story
    assert [(s["start"], s["finish"]) for s in story][:3] == [
        ("released", "waiting"), ("waiting", "processing"), ("processing", "memory")]
    assert story[2]["worker"] in (a.address, b.address)


@with_center()
async def test_validation_failure_is_logged_and_reported(c):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("distributed.center").addHandler(handler)
    try:
        c.validate = True
        await fake_worker(c).register(address=A, ncores=1, keys=["x"])
        c.send_scheduler_messages()
        assert c.invariant_errors == []
        c.scheduler.who_has["k"].add(A)  # behind the scheduler's back
        c.send_scheduler_messages()
    finally:
        logging.getLogger("distributed.center").removeHandler(handler)
    [error] = c.invariant_errors
    assert "'k'" in error and "has_what" in error
    [record] = [r for r in records if r.levelno == logging.CRITICAL]
    assert "INVARIANT" in record.getMessage() and "'k'" in record.getMessage()
    assert (await rpc(c.address).identity())["invariant_errors"] == [error]


@with_center()
async def test_center_tables_are_the_schedulers(c):
    assert c.who_has is c.scheduler.who_has
    assert c.has_what is c.scheduler.has_what
    assert c.nbytes is c.scheduler.nbytes
    with pytest.raises(AttributeError):
        c.who_has = {}
