"""Helpers for tests: small functions, in-process clusters, real processes.

::

    from distributed.utils_test import gen_cluster, inc

    @gen_cluster(ncores=[1, 2])
    async def test_something(c, a, b):     # center, worker a, worker b
        ...

    @pytest.mark.processes
    def test_cli():
        with popen([PYTHON, '-m', 'distributed.cli.dcenter', '--port', '0']) as center:
            address = wait_for_line(center, 'Start center at').split()[-1]

The pytest fixtures built on these (``cluster``, ``e``, ``e2``) are in the
repository's ``conftest.py``; child processes are started and stopped by
:mod:`distributed.process`, the one helper the library, the demo and the
tests share.

>>> run(wait_for(lambda: True))
>>> uid() != uid()
True
"""

import asyncio
import os
import socket
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager

import psutil

from .center import Center
from .core import rpc
from .process import Process, popen, wait_for_line
from .worker import Worker

__all__ = [
    "inc",
    "dec",
    "add",
    "mul",
    "throws",
    "slowinc",
    "slowadd",
    "gen_cluster",
    "popen",
    "wait_for_line",
    "wait_for",
    "poll",
    "free_port",
    "run",
    "call",
    "record_sends",
    "uid",
    "gone",
    "hold_gil",
    "child_env",
    "environ",
    "local_cluster",
    "processes",
    "start_center",
    "start_worker",
]

PYTHON = sys.executable
#: the repository's tests/ folder: child processes import test modules from it
TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "tests")


def inc(x):
    return x + 1


def dec(x):
    return x - 1


def add(x, y):
    return x + y


def mul(x, y):
    return x * y


def throws(x):
    raise RuntimeError("hello!")


def slowinc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def slowadd(x, y, delay=0.02):
    time.sleep(delay)
    return x + y


def run(coro, timeout=20):
    """Run ``coro`` on a fresh event loop; ``TimeoutError`` after ``timeout`` s."""
    try:
        return asyncio.run(asyncio.wait_for(coro, timeout))
    except asyncio.TimeoutError as e:
        if isinstance(e, TimeoutError):  # 3.11+: one class
            raise
        raise TimeoutError("not done within %s s" % timeout) from e  # 3.10


def uid():
    """A fresh unique name: keys no other test (on a shared cluster) uses."""
    return uuid.uuid4().hex


def hold_gil(seconds):
    """Sleep in C without releasing the GIL: no thread of this process runs
    (a worker's own heartbeats stop)."""
    import ctypes

    ctypes.PyDLL(None).sleep(int(seconds))
    return seconds


def gone(pid):
    """True once process ``pid`` exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def call(address, op, security=None, **kwargs):
    """One rpc call ``op(**kwargs)`` to ``address`` from a synchronous test."""

    async def f():
        with rpc(address, security=security) as r:
            return await r.call(op, timeout=10, **kwargs)

    return run(f())


def record_sends(executor):
    """The list of messages ``executor`` sends to the center from now on."""
    sent = []
    original = executor._send

    def send(msg):
        sent.append(msg)
        return original(msg)

    executor._send = send
    return sent


async def read_handshake(reader):
    """One auth-handshake message, ``(kind, body)``, from an asyncio stream."""
    from . import security as sec

    kind, length = sec.parse_header(await reader.readexactly(sec.HEADER_SIZE))
    return kind, (await reader.readexactly(length) if length else b"")


async def authenticate(reader, writer, token):
    """The client side of the auth handshake, on raw asyncio streams (for
    tests that send hand-made bytes to a server)."""
    from . import security as sec

    nonce = sec.new_nonce()
    writer.write(sec.hello_message(nonce))
    server_nonce = sec.check_challenge(token, nonce, *await read_handshake(reader))
    writer.write(sec.proof_message(token, nonce, server_nonce))
    sec.check_accepted(*await read_handshake(reader))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate, timeout=10, interval=0.05, msg="condition"):
    """Call ``predicate()`` until it is true and return its value (blocking
    form of :func:`wait_for`); ``AssertionError`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("%s not met within %s s" % (msg, timeout))
        time.sleep(interval)


async def wait_for(predicate, timeout=5, interval=0.01):
    """Poll ``predicate()`` until true; ``TimeoutError`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not met within %s s" % timeout)
        await asyncio.sleep(interval)


async def start_cluster(ncores, heartbeat_timeout=60, **worker_kwargs):
    # the scheduler's invariants are checked after every batch (end_cluster)
    center = Center("127.0.0.1", heartbeat_timeout=heartbeat_timeout, validate=True)
    center.listen(0)
    workers = [Worker(center.ip, center.port, ip="127.0.0.1", ncores=n, **worker_kwargs)
               for n in ncores]
    await asyncio.gather(*[w._start(0) for w in workers])
    await wait_for(lambda: len(center.ncores) == len(workers))
    return center, workers


async def end_cluster(center, workers):
    await asyncio.gather(*[w._close(timeout=1) for w in workers], return_exceptions=True)
    center.close()
    assert not center.invariant_errors, (
        "the center's scheduler broke its invariants: %s" % center.invariant_errors)


def named_like(test, func):
    """Give the plain ``test()`` wrapping ``func`` its name, for pytest.

    Not ``functools.wraps``: pytest would read the wrapped signature's
    arguments as fixtures.
    """
    test.__name__ = func.__name__
    test.__qualname__ = func.__qualname__
    test.__module__ = func.__module__
    test.__doc__ = func.__doc__
    return test


def gen_cluster(ncores=(1, 2), timeout=20, **cluster_kwargs):
    """Run an ``async def test(center, *workers)`` on an in-process cluster.

    The cluster (a center and one worker per entry of ``ncores``) lives on
    a fresh event loop and is torn down even when the test fails.
    """

    def decorator(func):
        def test():
            async def run():
                center, workers = await start_cluster(list(ncores), **cluster_kwargs)
                try:
                    return await asyncio.wait_for(func(center, *workers), timeout)
                finally:
                    await end_cluster(center, workers)

            return asyncio.run(run())

        return named_like(test, func)

    return decorator


def child_env(env=None, **variables):
    """``env`` (default ``os.environ``) plus ``variables``, with tests/ and the
    repository first on ``PYTHONPATH``: the workers import the test modules'
    functions, which the tests send by reference.

    >>> child_env({'PYTHONPATH': 'x'}, A='1')['PYTHONPATH'].split(os.pathsep)[-1]
    'x'
    """
    env = dict(os.environ if env is None else env, **variables)
    paths = [TESTS_DIR, os.path.dirname(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@contextmanager
def environ(**variables):
    """Set environment variables in this process for the ``with`` block."""
    old = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def local_cluster(env=None, n_workers=2, threads_per_worker=1, **kwargs):
    """A ``LocalCluster`` whose processes see :func:`child_env` (and ``env``,
    a dict of extra variables); closed at the end of the ``with`` block."""
    from .local import LocalCluster

    variables = child_env(os.environ, **(env or {}))
    changed = {k: v for k, v in variables.items() if os.environ.get(k) != v}
    with environ(**changed):  # LocalCluster hands os.environ to its children
        cluster = LocalCluster(n_workers=n_workers,
                               threads_per_worker=threads_per_worker, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()


@contextmanager
def processes(env=None):
    """``with processes() as start:`` ``start(args, line)`` runs
    ``python -m *args`` (with :func:`child_env` and ``env``), waits for an
    output line matching ``line`` and returns the :class:`Process`; all of
    them are stopped at the end of the block.  A center that logged a broken
    scheduler invariant (``env`` sets ``DISTRIBUTED_VALIDATE``) fails it."""
    started = []
    with ExitStack() as stack:

        def start(args, wait_for):
            p = Process([PYTHON, "-m"] + list(args), env=child_env(**(env or {})))
            stack.callback(p.stop)
            started.append(p)
            p.wait_for_line(wait_for)
            return p

        yield start
    for p in started:
        p.drained.wait(5)
        assert "SCHEDULER INVARIANT BROKEN" not in p.output.text(), p.output.text()


def invariant_errors(cluster):
    """The broken scheduler invariants the center of ``cluster`` (a
    LocalCluster) found so far: ``[]`` unless it validates."""
    from .core import rpc

    async def ask():
        r = rpc(cluster.center_address, security=cluster.security)
        try:
            return (await r.identity()).get("invariant_errors", [])
        finally:
            r.close_streams()

    return asyncio.run(ask())


def start_center(start, port, *args):
    """``dcenter --port port *args`` with ``start`` from :func:`processes`."""
    return start(["distributed.cli.dcenter", "--port", str(port)] + list(args),
                 "Start center at")


def start_worker(start, port, *args):
    """``dworker`` on the center at ``port``, once registered."""
    return start(["distributed.cli.dworker", "127.0.0.1:%d" % port] + list(args),
                 "Registered with center")
