"""Details code written against the 2016 API relies on (SPEC.md, "Faithful
details" and "Command line"; issue #11, section 5): placement by input
bytes, a quick restart of busy workers, the center as a metadata store of
opaque names, ``rpc.streams``, an rpc ``compute`` and its ``who_has``, and
flags that reach the nanny's worker."""

import asyncio
import os
import time
from operator import add

import pytest

from distributed import Executor
from distributed.core import connect, read, rpc, write
from distributed.scheduler import Scheduler
from distributed.utils_test import (free_port, gen_cluster, hold_gil, inc, processes,
                                    start_center, start_worker, wait_for)
from test_center import with_center  # a bare listening Center

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


#: keys whose prefix (``key_split``) is "busy" / "both": the durations learned
BUSY, BOTH = "busy-0123456789abcdef", "both-0123456789abcdef"


def submit_one(s, key, deps=(), **kwargs):
    """``update_graph`` of one task ``key`` needing ``deps``, wanted by 'c'."""
    s.update_graph("c", tasks={key: "spec"}, dependencies={key: list(deps)}, keys=[key],
                   **kwargs)


def placed(nbytes_on_a, a_busy_for):
    """Where ``both-...`` (inputs ``a``: ``nbytes_on_a`` bytes on worker A,
    ``b``: 10 bytes on B) is sent while A runs a task and ``both`` is known
    to take ``a_busy_for`` seconds."""
    s = Scheduler()
    s.add_worker("A:1", ncores=1)
    s.add_worker("B:1", ncores=1)
    s.update_data("c", who_has={"a": ["A:1"], "b": ["B:1"]},
                  nbytes={"a": nbytes_on_a, "b": 10})
    submit_one(s, BUSY, restrictions={BUSY: ["A:1"]})
    s.durations["both"] = a_busy_for
    submit_one(s, BOTH, ["a", "b"])
    s.validate()
    [where] = [a for a, msgs in s.to_workers.items() for m in msgs
               if m.get("key") == BOTH]
    assert s.tasks[BOTH].state == "processing"
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
    submit_one(s, BOTH, ["a"])
    assert s.tasks[BOTH].processing_on.address == "B:1"


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


# ---------------------------------------------------------------------------
# the center is first a metadata store: any string names a worker


@with_center()
async def test_center_metadata_takes_opaque_names(c):
    """The 2016 metadata session, with 'alice' and 'bob' for addresses."""
    alice, bob, admin = rpc(c.address), rpc(c.address), rpc(c.address)
    assert await alice.register(address="alice", ncores=4) == b"OK"
    assert "alice" in c.has_what and c.ncores["alice"] == 4
    assert await alice.add_keys(address="alice", keys=["x", "y"]) == b"OK"
    assert await bob.register(address="bob", ncores=4) == b"OK"
    assert await bob.add_keys(address="bob", keys=["y", "z"], nbytes={"z": 5}) == b"OK"
    assert await admin.who_has(keys=["x", "y"]) == {"x": {"alice"}, "y": {"alice", "bob"}}
    assert await admin.remove_keys(address="bob", keys=["y"]) == b"OK"
    assert await admin.has_what(keys=["alice", "bob"]) == {"alice": {"x", "y"},
                                                         "bob": {"z"}}
    assert await admin.has_what(addresses=["bob"]) == {"bob": {"z"}}
    assert await admin.ncores() == {"alice": 4, "bob": 4}
    assert await admin.ncores(addresses=["alice", "charlie"]) == {"alice": 4,
                                                                  "charlie": None}
    assert await admin.nbytes(keys=["z"]) == {"z": 5}
    assert await alice.heartbeat(address="alice") == b"OK"
    assert await admin.unregister(address="alice", close=True) == b"OK"
    assert await admin.has_what() == {"bob": {"z"}}
    assert await admin.who_has() == {"z": {"bob"}}
    assert await admin.unregister(address="alice") == b"unknown"
    # names are names: no scheduling on them, and the addresses still coerce
    assert "bob" not in c.scheduler.workers
    assert await admin.register(address=("127.0.0.1", 50001), ncores=1) == b"OK"
    assert await admin.ncores(addresses=["tcp://127.0.0.1:50001"]) == {
        "127.0.0.1:50001": 1}
    for r in (alice, bob, admin):
        r.close_streams()


@with_center()
async def test_a_name_cannot_take_tasks(c):
    """Only scheduling needs a reachable worker: a name may not open the
    scheduler's stream, and is never sent tasks."""
    stream = await connect(c.address)
    try:
        await write(stream, {"op": "register", "address": "alice", "ncores": 1})
        assert await read(stream) == b"OK"
        await write(stream, {"op": "worker-stream", "address": "alice"})
        reply = await asyncio.wait_for(read(stream), 5)
        assert "error" in reply["status"]
        assert "alice" in str(reply["exception"])
    finally:
        stream.close()
    assert "alice" not in c.scheduler.workers


@with_center(heartbeat_timeout=0.3)
async def test_a_silent_name_is_removed_like_a_worker(c):
    """A name registered and left silent goes after the heartbeat timeout,
    with its keys, as a silent worker does; the center carries on."""
    r = rpc(c.address)
    await r.register(address="alice", ncores=1, keys=["x"], nbytes={"x": 1})
    assert c.who_has["x"] == {"alice"}
    await wait_for(lambda: "alice" not in c.ncores, timeout=5)
    assert "x" not in c.who_has and "alice" not in c.has_what
    r.close_streams()  # (the center closed the registration's stream)
    with rpc(c.address) as admin:
        assert await admin.ncores() == {}


@gen_cluster(ncores=[1, 1])
async def test_names_beside_real_workers(c, a, b):
    """Tasks go to the real workers only; a key only 'alice' holds is
    missing-data for a worker that needs it, not a crash (the scheduler's
    invariants are checked after every batch: end_cluster fails on them)."""
    r = rpc(c.address)
    await r.register(address="alice", ncores=8, keys=["held-by-alice"])
    async with Executor(c.address, start=False) as e:
        futures = e.map(inc, range(20))
        assert await e._gather(futures) == list(range(1, 21))
        holders = set().union(*(c.who_has[f.key] for f in futures))
        assert holders and holders <= {a.address, b.address}
    resp = await rpc(a.address).compute(function=inc, keys=["held-by-alice"],
                                        key="never", timeout=10)
    assert resp == (b"missing-data", {"keys": ["held-by-alice"]})
    assert "never" not in a.data
    assert c.ncores["alice"] == 8
    # a broadcast reaches the workers; the name alone fails
    replies = await r.broadcast(msg={"op": "ping"})
    assert replies[a.address] == replies[b.address] == b"pong"
    assert isinstance(replies["alice"], ValueError)
    r.close_streams()


# ---------------------------------------------------------------------------
# rpc.streams


@with_center()
async def test_rpc_streams_listed_and_closed(c):
    r = rpc(c.address)
    assert r.streams == []
    await r.identity()
    [first] = r.streams
    await r.identity()
    assert r.streams == [first]  # reused
    # concurrent calls each get their own
    await asyncio.gather(*[r.ping() for _ in range(3)])
    assert 1 < len(r.streams) <= 3 and first in r.streams
    streams = r.streams
    r.close_streams()
    assert r.streams == []
    assert all(s.closed() for s in streams)
    # an rpc around an open stream lists that one
    stream = await connect(c.address)
    wrapped = rpc(stream)
    assert wrapped.streams == [stream]
    assert await wrapped.ping() == b"pong"
    wrapped.close_streams()
    assert stream.closed() and wrapped.streams == []


# ---------------------------------------------------------------------------
# an rpc compute keeps its result, not the inputs it fetched


@gen_cluster(ncores=[1, 1])
async def test_rpc_compute_keeps_result_not_inputs(c, a, b):
    await rpc(a.address).update_data(data={"x": 1})
    await rpc(b.address).update_data(data={"y": 2})
    resp, meta = await rpc(a.address).compute(function=add, keys=["x", "y"], key="z")
    assert resp == b"OK", meta
    assert a.data["z"] == 3
    assert "y" not in a.data and "y" not in a.nbytes
    assert c.who_has == {"x": {a.address}, "y": {b.address}, "z": {a.address}}
    assert c.has_what[a.address] == {"x", "z"}
    # asked again, the input is fetched again (nothing was kept)
    resp, meta = await rpc(a.address).compute(function=add, keys=["x", "y"], key="z2")
    assert resp == b"OK" and a.data["z2"] == 3 and "y" not in a.data


@gen_cluster(ncores=[1, 1, 1])
async def test_rpc_compute_fetches_where_who_has_says(c, a, b, d):
    """The caller's who_has wins over the center's: b holds 'x' without
    the center knowing, d holds another 'x' the center lists."""
    await rpc(b.address).update_data(data={"x": "from b"}, report=False)
    await rpc(d.address).update_data(data={"x": "from d"})
    assert c.who_has["x"] == {d.address}
    r = rpc(a.address)
    resp, meta = await r.compute(function=str.upper, args=("x",),
                                 who_has={"x": [b.address]}, key="u")
    assert resp == b"OK", meta
    assert a.data["u"] == "FROM B"
    resp, meta = await r.compute(function=str.upper, args=("x",), needed=["x"], key="v")
    assert resp == b"OK" and a.data["v"] == "FROM D"  # no who_has: the center's
    # a who_has naming no live holder is missing-data, not a fallback
    await rpc(b.address).delete_data(keys=["x"], report=False)
    resp = await r.compute(function=str.upper, args=("x",), who_has={"x": [b.address]},
                           key="w")
    assert resp == (b"missing-data", {"keys": ["x"]})
    assert c.who_has["x"] == {d.address} and "x" not in a.data
    r.close_streams()


# ---------------------------------------------------------------------------
# every dworker flag reaches the nanny's worker, as its environment variable


TOKEN = "faithful flags token"


def worker_settings():
    """Run in a worker process (rpc ``run``): what its settings are."""
    import logging
    import sys

    from distributed.cli import dworker
    from distributed.cli.utils import _StderrHandler
    from distributed.worker import get_worker

    w = get_worker()
    argv = dworker.make_parser().parse_args(sys.argv[1:])
    return {
        "host": w.ip, "port": w.port, "ncores": w.ncores, "name": w.name,
        "local_dir": os.path.dirname(w.local_dir), "memory_limit": w.memory_limit,
        "resources": w.resources, "http_port": w.service_ports.get("http"),
        "log_length": w.logs.maxlen, "connect_timeout": argv.connect_timeout,
        "preloaded": getattr(w, "faithful_preloaded", False),
        "verbose": any(isinstance(h, _StderrHandler) and h.level == logging.INFO
                       for h in logging.getLogger().handlers),
        "auth_token": w.security.token,
        "no_nanny": argv.no_nanny, "nanny": w.nanny,
        "death_timeout": w.death_timeout, "lifetime": w.lifetime,
        "lifetime_stagger": w.lifetime_stagger,
    }


#: (flag and value, what ``worker_settings`` says then, its value; the
#: environment variable that says the same, if there is one).  Values are
#: formatted with the run's ``ports`` and ``tmp``.
FLAG_ROWS = [
    (["--host", "127.0.0.2"], "host", "127.0.0.2", None),
    (["--port", "{port}"], "port", "{port}", None),
    (["--ncores", "3"], "ncores", 3, None),
    (["--name", "faithful-worker"], "name", "faithful-worker", None),
    (["--local-dir", "{tmp}/spill-here"], "local_dir", "{tmp}/spill-here", None),
    (["--memory-limit", "3GB"], "memory_limit", 3 * 10 ** 9, None),
    (["--resources", "GPU=2,MEM=10e9"], "resources", {"GPU": 2.0, "MEM": 10e9}, None),
    (["--connect-timeout", "12.5"], "connect_timeout", 12.5, None),
    (["--http-port", "{http_port}"], "http_port", "{http_port}", None),
    (["--log-length", "9"], "log_length", 9, ("DISTRIBUTED_LOG_LENGTH", "9")),
    (["--preload", "{tmp}/faithful_preload.py"], "preloaded", True, None),
    (["--verbose"], "verbose", True, None),
    (["--auth-token", TOKEN], "auth_token", TOKEN, ("DISTRIBUTED_AUTH_TOKEN", TOKEN)),
    (["--death-timeout", "600"], "death_timeout", 600, ("DISTRIBUTED_DEATH_TIMEOUT", "600")),
    (["--lifetime", "3600"], "lifetime", 3600, ("DISTRIBUTED_LIFETIME", "3600")),
    (["--lifetime-stagger", "5"], "lifetime_stagger", 5, ("DISTRIBUTED_LIFETIME_STAGGER", "5")),
]
#: options the nanny handles itself (its worker is always --no-nanny and
#: told the nanny's address), and the TLS files: they travel as the token
#: does (test_security.py::test_nanny_uses_its_own_flags[tls], test_cli_tls);
#: --scheduler-file stands for the address this test gives, and --pid-file
#: names the command's own process, never its children
#: (test_deploy_addr.py: test_worker_waits_for_the_scheduler_file, test_pid_files)
NOT_A_ROW = {"--nprocs", "--no-nanny", "--nanny-address", "--tls-cert", "--tls-key",
             "--tls-ca", "--scheduler-file", "--pid-file"}


@pytest.mark.pure
def test_every_dworker_option_has_a_row():
    """A new dworker option gets a row in FLAG_ROWS (or a reason to be in
    NOT_A_ROW): the test below then checks it reaches the nanny's worker."""
    from distributed.cli import dworker

    flags = {option.flag for option in dworker.OPTIONS}
    rows = {argv[0] for argv, _, _, _ in FLAG_ROWS}
    assert flags - NOT_A_ROW - rows == set(), "dworker options without a row"
    assert rows | NOT_A_ROW <= flags


def _fill(value, values):
    if isinstance(value, str) and "{" in value:
        text = value.format(**values)
        return int(text) if text.isdigit() else text
    return value


@pytest.mark.processes
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["flags", "environment"])
def test_every_flag_reaches_the_nannys_worker(how, tmp_path):
    """``dworker`` with a nanny and every option at once: the worker process
    the nanny starts has each setting; and an option that has an environment
    variable acts as that variable does (``how='environment'``: those are
    given as variables, and the result is the same)."""
    import sys

    from distributed.process import popen
    from distributed.security import Security, _ENV_VARS
    from distributed.utils_test import call, child_env, wait_for_line

    (tmp_path / "faithful_preload.py").write_text(
        "def dask_setup(worker):\n    worker.faithful_preloaded = True\n")
    values = {"port": free_port(), "http_port": free_port(), "tmp": str(tmp_path)}
    base = {k: v for k, v in os.environ.items()
            if k not in _ENV_VARS and k != "DISTRIBUTED_LOG_LENGTH"}
    argv, env = [], dict(base)
    for flag, _, _, variable in FLAG_ROWS:
        if how == "environment" and variable is not None:
            env[variable[0]] = variable[1]
        else:
            argv += [_fill(a, values) if "{" in a else a for a in flag]
    argv = [str(a) for a in argv]
    center_env = child_env(dict(base, DISTRIBUTED_AUTH_TOKEN=TOKEN))
    python = [sys.executable, "-m"]
    with popen(python + ["distributed.cli.dcenter", "--port", "0", "--no-dashboard"],
               env=center_env) as center:
        address = wait_for_line(center, "Start center at").split()[-1]
        with popen(python + ["distributed.cli.dworker", address] + argv,
                   env=child_env(env)) as dworker:
            nanny = wait_for_line(dworker, "Start nanny at", timeout=30).split()[-1]
            wait_for_line(dworker, "Registered with center", timeout=60)
            worker = "127.0.0.2:%d" % values["port"]
            security = Security(token=TOKEN)
            settings = call(worker, "run", security=security, function=worker_settings)
            # the nanny speaks with the token too (it heartbeats for its worker)
            assert call(nanny, "identity", security=security)["worker"] == worker
    for flag, name, expected, _ in FLAG_ROWS:
        assert settings[name] == _fill(expected, values), (flag, settings[name])
    assert settings["no_nanny"] and settings["nanny"] == nanny
