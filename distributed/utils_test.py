"""Helpers for tests: small functions, in-process clusters, real processes.

::

    from distributed.utils_test import gen_cluster, inc

    @gen_cluster(ncores=[1, 2])
    async def test_something(c, a, b):     # center, worker a, worker b
        ...

    def test_cli():
        with popen(['dcenter', '--port', '0']) as center:
            address = wait_for_line(center, 'Start center at').split()[-1]
"""

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from tornado.ioloop import IOLoop

from .center import Center
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
]


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


@contextmanager
def popen(args, env=None, **kwargs):
    """Start a process (stdout+stderr piped, text); kill it and its group on exit."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _line_queue(proc):
    """A queue fed with ``proc``'s output lines by a daemon thread (once per proc)."""
    q = getattr(proc, "_line_queue", None)
    if q is None:
        q = proc._line_queue = queue.Queue()

        def pump():
            for line in proc.stdout:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
    return q


def output_so_far(proc, settle=0.5):
    """The lines ``proc`` printed so far (waits ``settle`` s for stragglers)."""
    q = _line_queue(proc)
    lines = []
    deadline = time.time() + settle
    while True:
        try:
            line = q.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            return lines
        if line is None:
            q.put(None)
            return lines
        lines.append(line)


def wait_for_line(proc, pattern, timeout=20):
    """Read ``proc``'s output until a line matches ``pattern``; return that line."""
    q = _line_queue(proc)
    deadline = time.time() + timeout
    seen = []
    while True:
        try:
            line = q.get(timeout=max(0, deadline - time.time()))
        except queue.Empty:
            raise TimeoutError(
                "no line matching %r within %s s; output so far:\n%s"
                % (pattern, timeout, "".join(seen))
            ) from None
        if line is None:
            q.put(None)
            raise EOFError(
                "process ended before a line matching %r; output:\n%s"
                % (pattern, "".join(seen))
            )
        seen.append(line)
        if re.search(pattern, line):
            return line.strip()


def current_loop():
    return IOLoop.current()


PYTHON = sys.executable
