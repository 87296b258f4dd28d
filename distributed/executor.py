"""The client: ``Executor`` submits work to a cluster and returns ``Future``s.

::

    from distributed import Executor
    e = Executor('127.0.0.1:8787')       # or Executor() for a local cluster
    x = e.submit(inc, 1)
    y = e.submit(add, x, 10)             # futures as arguments: dependencies
    y.result()                           # 12
    e.gather(e.map(inc, range(3)))       # [1, 2, 3]

From a script, a thread or Jupyter the executor runs its event loop in a
thread of its own and its methods block.  Inside a coroutine on a running
loop, make it with ``asynchronous=True`` (or ``start=False``): it runs on
that loop and its methods return awaitables::

    e = await Executor('127.0.0.1:8787', asynchronous=True)
    x = e.submit(inc, 1)                 # submit and map return futures
    await x                              # 2; in Tornado: yield x
    await e.gather([x])                  # [2]; or the 2016 form e._gather
    await e.shutdown()

Futures are reference counted: when the last future of a key is garbage
collected, the center is told, and the workers drop the data unless some
other task or executor still needs it.
"""

import asyncio
import atexit
import concurrent.futures
import html
import itertools
import logging
import operator
import os
import ssl
import threading
import time
import types
import uuid
import weakref
from collections import Counter, defaultdict, namedtuple

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from .batched import BatchedSend, handle_batches
from .core import (
    AuthenticationError,
    CommClosedError,
    ConnectionPool,
    RemoteException,
    coerce_to_address,
    connect,
    is_error_message,
    parse_address,
    raise_error_message,
    read,
    rpc,
    safe_str,
    write,
)
from . import local  # noqa: F401  (its exit hook must run after ours)
from .graph import TaskRef, get_dependencies, toposort
from .output import print_output
from .protocol import DEFAULT_LIMITS, from_blob, to_blob
from .scheduler import LostData
from .scheduler_file import read_scheduler_file
from .security import TLSError, default_security, tls_error
from .tokenize import Normalized, by_reference, tokenize
from .cli.utils import CENTER_STARTED
from .utils import funcname, key_split, validate_key, wait_for, with_default_port
from .worker import _format_bytes, gather_from_workers, get_worker, rejoin, secede, thread_state

logger = logging.getLogger(__name__)

__all__ = [
    "Executor",
    "Future",
    "wait",
    "as_completed",
    "CancelledError",
    "default_executor",
    "futures_of",
    "fire_and_forget",
    "get_executor",
    "get_worker",
    "secede",
    "rejoin",
]

CancelledError = concurrent.futures.CancelledError

#: bytes of remembered task arguments (lineage, resent to a restarted center)
#: beyond which those of released futures are forgotten
SPECS_NBYTES = 64 * 2**20
#: seconds a reconnected executor waits for workers to re-register results
#: it could recompute, before sending their tasks again
RECONNECT_SETTLE = 2
#: reconnecting more than MAX_RESENDS times within RESEND_WINDOW seconds fails
#: pending futures instead of sending their tasks yet again
MAX_RESENDS = 3
RESEND_WINDOW = 30
#: ``gather`` asks one worker for about this many bytes at a time, so that a
#: worker that spilled more than its memory can send it all
GATHER_PIECE_BYTES = 64 * 2**20

try:  # with dask installed, a Future inside a dask task is a reference to its key
    from dask._task_spec import TaskRef as _DaskTaskRef
except ImportError:
    _DaskTaskRef = None

_current = [None]  # the last executor started: default_executor()
_executors = weakref.WeakSet()

#: dask's scheduling keywords this executor does not implement: submit, map,
#: compute, get and persist refuse them by name (they are never passed on to
#: the function; to give a function a keyword argument of such a name, bind
#: it: ``submit(functools.partial(f, fifo_timeout=1), x)``)
UNSUPPORTED_KEYWORDS = ("actor", "actors", "fifo_timeout")


class _DefaultScheduler:
    """dask's ``scheduler`` setting for an executor (``set_as_default``): its
    ``get``, without keeping it alive; ``__self__`` is the executor (dask
    calls ``scheduler.__self__.persist(...)``)."""

    def __init__(self, executor):
        self.executor = weakref.ref(executor)

    @property
    def __self__(self):
        executor = self.executor()
        if executor is None or executor.status == "closed":
            raise RuntimeError("dask's default scheduler is an Executor that was "
                               "shut down; make a new one or set another scheduler")
        return executor

    def __call__(self, dsk, keys, **kwargs):
        return self.__self__.get(dsk, keys, **kwargs)

    def __repr__(self):
        return "<dask scheduler: %r>" % (self.executor(),)


class _DaskDefaults:
    """The executors that are dask's default scheduler, latest last: the
    latest still running is dask's ``scheduler`` setting; when none runs,
    the setting from before the first comes back.  A setting the user made
    meanwhile (``dask.config.set(scheduler=...)``) is left alone."""

    def __init__(self):
        self.stack = []  # _DefaultScheduler, latest last
        self.saved = (False, None)  # dask's setting before the first
        self.lock = threading.Lock()

    def push(self, executor):
        try:
            import dask.config
        except ImportError:
            return
        with self.lock:
            self.stack = [g for g in self.stack if g.executor() is not None]
            if not self.stack:
                self.saved = ("scheduler" in dask.config.config,
                              dask.config.config.get("scheduler"))
            self.stack.append(_DefaultScheduler(executor))
            dask.config.set(scheduler=self.stack[-1])

    def remove(self, executor):
        with self.lock:
            mine = [g for g in self.stack if g.executor() is executor]
            if not mine:
                return
            import dask.config

            current = dask.config.config.get("scheduler")
            ours = isinstance(current, _DefaultScheduler) and current in self.stack
            self.stack = [g for g in self.stack if g.executor() is not None
                          and g.executor() is not executor
                          and g.executor().status != "closed"]
            if not ours:
                return  # the user set another scheduler meanwhile: it stays
            if self.stack:
                dask.config.set(scheduler=self.stack[-1])
            elif self.saved[0]:
                dask.config.set(scheduler=self.saved[1])
            else:
                dask.config.config.pop("scheduler", None)

    def current(self):
        """The executor that is dask's scheduler now, or None."""
        try:
            import dask.config
        except ImportError:
            return None
        current = dask.config.config.get("scheduler")
        if isinstance(current, _DefaultScheduler):
            return current.executor()
        return None


_dask_defaults = _DaskDefaults()


def default_executor(e=None):
    """The most recently started executor (or set it with ``e``)."""
    if e is not None:
        _current[0] = e
    if _current[0] is None or _current[0].status == "closed":
        raise ValueError("no running Executor: make one with Executor(...)")
    return _current[0]


# ---------------------------------------------------------------------------
# Futures


class FutureState:
    """What the executor knows of one key; shared by its Future objects."""

    __slots__ = ("key", "status", "type", "exception", "traceback", "text",
                 "workers", "event", "refcount", "callbacks", "value", "graph_keys")

    def __init__(self, key):
        self.key = key
        self.status = "pending"
        self.type = None
        self.exception = None
        self.traceback = None
        self.text = None
        self.workers = ()
        self.event = asyncio.Event()
        self.refcount = 0
        self.callbacks = []
        self.value = None  # the pickled result, when the center sent it along
        self.graph_keys = None  # of compute(collection): the keys of its graph

    def finish(self, type=None, workers=(), value=None):
        self.status = "finished"
        if type is not None:  # the center does not know the type of scattered data
            self.type = type
        self.value = value
        if workers:
            self.workers = workers
        self._done()

    def set_error(self, exception, traceback=None, text=None):
        self.status = "error"
        self.exception = exception
        self.traceback = traceback
        self.text = text
        self._done()

    def cancel(self):
        self.status = "cancelled"
        self._done()

    def retry(self):
        self.status = "pending"
        self.exception = self.traceback = self.text = None
        self.event.clear()

    def lose(self):
        self.status = "pending"
        self.workers = ()
        self.value = None
        self.event.clear()

    def _done(self):
        self.event.set()
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                logger.exception("error in a future's callback")

    def done(self):
        return self.status != "pending"

    async def wait(self, timeout=None):
        if timeout is None:
            await self.event.wait()
        else:
            await wait_for(self.event.wait(), timeout)


class Future(_DaskTaskRef or object):
    """A remote result: the key of a task that runs (or ran) on the cluster.

    ``result()`` blocks until it is known and returns it (fetched from the
    worker holding it), or re-raises the task's exception with the remote
    traceback.  In a coroutine, ``await future`` instead.
    """

    def __init__(self, key, executor, state=None):
        self.key = key
        self.executor = executor
        self._state = state if state is not None else executor._state_for(key)
        executor._inc_ref(self._state)

    @property
    def status(self):
        """``'pending'``, ``'finished'``, ``'error'``, ``'cancelled'``."""
        return self._state.status

    @property
    def type(self):
        return self._state.type

    def done(self):
        return self._state.done()

    def cancelled(self):
        return self._state.status == "cancelled"

    def result(self, timeout=None):
        """The value, waiting up to ``timeout`` seconds (``TimeoutError``);
        of an asynchronous executor's future: ``await future.result()``."""
        return self.executor.sync(self._result, timeout=timeout)

    async def _result(self, timeout=None):
        await self._state.wait(timeout)
        result = await self.executor._gather([self])
        return result[0]

    def __await__(self):
        return self.executor._from_any_loop(self._result).__await__()

    def exception(self, timeout=None):
        """The exception the task raised (``None`` if it did not), once done."""
        return self.executor.sync(self._exception, timeout)

    async def _exception(self, timeout=None):
        await self._state.wait(timeout)
        if self._state.status == "error":
            return _unpack_error(self._state)[0]
        return None

    def traceback(self, timeout=None):
        """The remote traceback of the task's exception (``None`` if none), once done."""
        return self.executor.sync(self._traceback, timeout)

    async def _traceback(self, timeout=None):
        await self._state.wait(timeout)
        if self._state.status == "error":
            return _unpack_error(self._state)[1]
        return None

    def cancel(self):
        """Cancel the task (other executors wanting the same key are unaffected)."""
        return self.executor.cancel([self])

    def retry(self):
        """Run the task again if it erred (and the erred tasks it depends on)."""
        return self.executor.retry([self])

    def add_done_callback(self, fn):
        """Call ``fn(future)`` when the future is done (in a separate thread)."""
        executor = self.executor

        def run():
            try:
                executor._callback_pool.submit(_run_callback, fn, self)
            except RuntimeError:  # the executor was shut down: call it here
                _run_callback(fn, self)

        executor._on_loop(self._add_callback, run)

    def _add_callback(self, cb):
        if self._state.done():
            cb()
        else:
            self._state.callbacks.append(cb)

    def release(self):
        if self.executor is not None and self._state is not None:
            self.executor._dec_ref(self._state)
            self._state = _ReleasedState

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass

    def __reduce__(self):
        if _DaskTaskRef is not None:
            return _DaskTaskRef, (self.key,)  # inside a dask task: a key reference
        raise TypeError("a Future cannot be pickled; pass it as an argument to "
                        "submit/map (or put it in a graph) and the task gets its value")

    def __dask_tokenize__(self):
        return self.key  # its value, as an argument of a pure call

    def __repr__(self):
        state = self._state
        if state.status == "finished" and state.type:
            return "<Future: status: finished, type: %s, key: %s>" % (state.type, self.key)
        return "<Future: status: %s, key: %s>" % (state.status, self.key)

    __str__ = __repr__

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, Future) and other.key == self.key

    def _repr_html_(self):
        return "<b>Future: %s</b> <font color='gray'>status:</font> %s" % (
            key_split(self.key), self.status)


class _Released:
    status = "released"
    type = None

    def done(self):
        return True


_ReleasedState = _Released()


class _Done:
    """An awaitable of a value known at once: what the methods of an
    asynchronous executor that act at once (``cancel``, ``retry``) return,
    so that ``await e.cancel(f)`` works and so does ``e.cancel(f)``.

    >>> import asyncio
    >>> async def f():
    ...     return await _Done(3)
    >>> asyncio.run(f())
    3
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __await__(self):
        return self.value
        yield  # a generator: awaitable, done at its first step

    def __repr__(self):
        return "<done: %r>" % (self.value,)


class NotACenterError(ConnectionError):
    """The executor's address is a server, but not a center (a worker, a
    dashboard's HTTP port, ...): the message says what it found."""


#: seconds :func:`_what_is_at` waits for each of its two probes (run together)
PROBE_TIMEOUT = 1.0
#: seconds an executor waits for a center's first answer before it also looks
#: (:func:`_what_is_at`) at what listens there; it keeps waiting if a center
PROBE_AFTER = 1.0


class _Found(str):
    """What :func:`_what_is_at` found, in words; ``not_center``: surely not a center."""

    not_center = False


def _found(text, not_center=False):
    found = _Found(text)
    found.not_center = not_center
    return found


async def _what_is_at(address, security, timeout=PROBE_TIMEOUT):
    """What listens at ``address``, which did not answer an executor as a
    center would: a node of ours says its type (``identity``), an HTTP server
    answers a ``GET``, anything else accepts and says nothing or closes.
    Takes at most about ``timeout`` seconds (the probes run together).

    Returns a :class:`_Found` string, e.g. ``'a Worker'``, ``'an HTTP server
    (a dashboard or a status port?)'``.
    """
    ip, port = parse_address(address)

    async def identity():
        stream = await connect(address, timeout=timeout, security=security)
        try:
            await write(stream, {"op": "identity"})
            return await asyncio.wait_for(read(stream), timeout)
        finally:
            stream.close()

    async def http():
        stream = await asyncio.wait_for(TCPClient().connect(ip, port), timeout)
        try:
            await stream.write(b"GET / HTTP/1.0\r\n\r\n")
            return await asyncio.wait_for(stream.read_bytes(64, partial=True), timeout)
        finally:
            stream.close()

    node, answer = await asyncio.gather(identity(), http(), return_exceptions=True)
    if isinstance(node, dict) and node.get("type"):
        if node["type"] == "Center":
            return _found("a center that is slow to answer")
        return _found("a %s" % node["type"], not_center=True)
    if isinstance(answer, bytes) and answer.startswith(b"HTTP/"):
        return _found("an HTTP server (a dashboard or a status port?)", not_center=True)
    if isinstance(answer, bytes):
        return _found("a server that answers %r" % answer[:32], not_center=True)
    if isinstance(answer, (asyncio.TimeoutError, TimeoutError)):
        return _found("a server that accepts connections and says nothing: not a "
                      "center, or one too busy to answer")
    return _found("a server that closes connections without answering: not a center, "
                  "or one refusing connections (too many open?)")


def _run_callback(fn, future):
    try:
        fn(future)
    except Exception:
        logger.exception("error in the done callback %r", fn)


def _unpack_error(state):
    """A fresh ``(exception, traceback)`` of the task's error.

    Each call makes new objects: a raised exception's traceback holds the
    frames it passed through, and with them the futures; kept in ``state``,
    it would keep them alive forever (a key that could never be released).
    An exception that does not unpickle here comes as a ``RemoteException``
    with its type name and traceback text.
    """
    exc, tb = state.exception, state.traceback
    try:
        exc = from_blob(exc if type(exc) is bytes else to_blob(exc))
        if not isinstance(exc, BaseException):
            raise TypeError("not an exception: %s" % type(exc).__name__)
    except Exception as e:
        exc = RemoteException(
            "Exception" if type(exc) is bytes else type(exc).__name__,
            "the task raised an exception that could not be "
            "rebuilt here (%s: %s)" % (type(e).__name__, safe_str(e)), state.text or "")
    if type(tb) is bytes:
        try:
            tb = from_blob(tb)
        except Exception:
            tb = None
    if not isinstance(tb, types.TracebackType):
        tb = None
    return exc, tb


# ---------------------------------------------------------------------------
# The executor


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self):
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True,
                                       name="distributed-executor-loop")
        self.thread.start()
        started.wait()

    def _run(self, started):
        self.asyncio_loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.asyncio_loop)
        self.loop = IOLoop.current()
        self.asyncio_loop.call_soon(started.set)
        try:
            self.asyncio_loop.run_forever()
        finally:
            self._close()

    def _close(self):
        """Cancel what still runs and close the loop: its selector and self-pipe
        are 3 file descriptors, leaked by every executor otherwise."""
        loop = self.asyncio_loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        # only the executor's loop: sockets of its own are closed by then, and
        # any other registered fd belongs to someone else
        self.loop.close(all_fds=False)

    def stop(self):
        self.asyncio_loop.call_soon_threadsafe(self.asyncio_loop.stop)
        self.thread.join(5)


class Executor:
    """Submit work to a cluster (see the module docstring).

    ``address`` is the center's (``'ip:port'``, ``(ip, port)``), or a
    cluster object with a ``center_address`` (and ``security``) attribute
    (``Executor(LocalCluster())``; :meth:`shutdown` leaves that cluster
    running); ``scheduler_file=PATH`` reads them from the file ``dcenter
    --scheduler-file PATH`` writes, waiting up to ``timeout`` for it.  With none, a
    :class:`~distributed.local.LocalCluster` of one single-threaded worker per
    core starts and is closed by :meth:`shutdown`.  ``timeout`` is how long
    to wait for the center, in seconds.  ``security`` (a
    :class:`~distributed.security.Security`: auth token, TLS) defaults to
    that of a ``LocalCluster`` of this process at ``address``, else to the
    environment's (``DISTRIBUTED_AUTH_TOKEN``, ``DISTRIBUTED_TLS_*``); a local
    cluster of its own gets a random token.  Other keywords go to that local
    cluster: its center's options (``heartbeat_timeout=10``,
    ``allowed_failures=1``) and ``worker_options={'memory_limit': '1GB'}``, see
    :class:`~distributed.local.LocalCluster`.

    What the tasks of this executor print (``print``, ``sys.stdout`` and
    ``sys.stderr`` writes, log records the worker prints) is printed here, on
    this process's ``sys.stdout`` / ``sys.stderr`` (in Jupyter: under the
    cell), each line after ``[worker name]``; ``forward_output=False`` turns
    that off.  See docs/logs.md.

    ``set_as_default=True``: while it runs, the executor is dask's scheduler
    (``x.compute()``, ``dask.compute(...)``, ``x.persist()`` run on the
    cluster); :meth:`shutdown` gives dask back the scheduler it had before
    (with nested executors: the one started before this one, if still
    running).  An asynchronous executor is never the default (dask's calls
    block).

    ``asynchronous=True`` (or ``start=False``, the 2016 spelling): it runs on
    the caller's event loop, and its methods return awaitables (``submit``
    and ``map`` still return futures); ``await`` it, or ``async with`` it,
    to start it (with no address: its local cluster too)::

        async with Executor(address, asynchronous=True) as e:
            x = e.submit(inc, 1)
            await x                                    # 2
            await e.gather(e.map(inc, range(3)))       # [1, 2, 3]

    The underscore forms (``await e._gather(...)``) are the same coroutines.
    """

    def __init__(self, address=None, start=True, timeout=10, loop=None,
                 n_workers=None, threads_per_worker=1, security=None,
                 forward_output=True, set_as_default=True, asynchronous=False,
                 scheduler_file=None, **cluster_options):
        if hasattr(address, "center_address"):  # a cluster object: not ours to close
            security = security or getattr(address, "security", None)
            address = address.center_address
        if scheduler_file is not None and (address is not None or cluster_options):
            raise TypeError("scheduler_file=%r: the address comes from that file; give "
                            "no address nor local cluster options" % (scheduler_file,))
        #: (path, security given) while the address is still to read from the file
        self._scheduler_file = (scheduler_file, security) if scheduler_file else None
        if cluster_options and address is not None:
            raise TypeError("%s: options of a local cluster, but this executor "
                            "connects to %s" % (", ".join(cluster_options), address))
        self.id = "executor-" + uuid.uuid4().hex
        # a host alone: the center's default port (``Executor('127.0.0.1')``)
        self.address = (coerce_to_address(with_default_port(address))
                        if address is not None else None)
        self.timeout = timeout
        #: print what our tasks print (the center sends it only if so)
        self.forward_output = forward_output
        self.status = "created"
        self.futures = {}  # key -> FutureState
        self.cluster = None
        self._dashboard_port = None  # the center's HTTP port, if it has one
        self._cluster_kwargs = {"n_workers": n_workers,
                                "threads_per_worker": threads_per_worker,
                                "security": security, **cluster_options}
        self._priority = itertools.count()
        self._lock = threading.Lock()
        self._callback_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="distributed-callbacks")
        self._function_blobs = {}
        if security is None and self.address is not None:
            security = local.cluster_security(self.address)  # a cluster we started
        #: TLS and auth token of every connection (a local cluster's own, once started)
        self.security = security if security is not None else default_security()
        self.pool = ConnectionPool(security=self.security)
        self.batched = None
        self._held = []  # messages to the center held while reconnecting
        #: the center's limits on one message and one frame (it tells them)
        self.max_message_size = DEFAULT_LIMITS.max_message_size
        self.max_frame_size = DEFAULT_LIMITS.max_frame_size
        # key -> (update-graph message, its bytes of arguments): the tasks of
        # our futures and of their inputs, resent to a restarted center
        self._specs = {}
        self._specs_kept = (0, 0)  # how many, and bytes, the last pruning kept
        self._specs_nbytes = 0  # bytes of arguments in _specs
        self._resends = []  # times tasks were sent again to a reconnected center
        self.center = None
        #: ops of the batched stream from the center (see
        #: :func:`~distributed.batched.handle_batches`)
        self.stream_handlers = {
            "stream-start": self._stream_start,
            "key-in-memory": self._key_in_memory,
            "task-erred": self._task_erred,
            "lost-data": self._lost_data,
            "restart": self._restarted,
            "worker-removed": self._worker_removed,
            "task-output": self._task_output,
        }
        self._loop_thread = None
        self._asyncio_loop = None
        if start and not asynchronous:
            self._loop_thread = _LoopThread()
            self.loop = self._loop_thread.loop
            self._asyncio_loop = self._loop_thread.asyncio_loop
            try:
                self.sync(self._start)
            except BaseException:
                self._stop_loop()
                raise
            if set_as_default:
                _dask_defaults.push(self)
        else:  # asynchronous: the caller's loop, the one it starts on (_start)
            self.loop = loop

    # -- running coroutines -----------------------------------------------------

    @property
    def asynchronous(self):
        """True when it runs on the caller's event loop (``asynchronous=True``
        or ``start=False``): its public methods then return awaitables."""
        return self._loop_thread is None

    def _in_loop_thread(self):
        if self._asyncio_loop is None:
            return False
        try:
            return asyncio.get_running_loop() is self._asyncio_loop
        except RuntimeError:
            return False

    def _awaitable_here(self):
        """Should a public method return an awaitable here?  For an
        asynchronous executor, yes, unless called from a thread without an
        event loop while the executor's loop runs in another (a callback, a
        thread of the user's): there it blocks, like the threaded one."""
        if not self.asynchronous:
            return False
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            loop = self._asyncio_loop
            return loop is None or loop.is_closed() or not loop.is_running()

    def sync(self, func, *args, timeout=None, **kwargs):
        """``await func(*args, **kwargs)``, the one way the public methods run
        their coroutine twins (``gather`` is ``sync(self._gather, ...)``).

        A threaded executor runs it on its loop and blocks for the result
        (``TimeoutError`` after ``timeout`` seconds).  An asynchronous one
        (``asynchronous=True``, ``start=False``) returns the awaitable::

            e = Executor(address)                       # blocking
            e.gather(futures)                           # [1, 2, 3]
            e = await Executor(address, asynchronous=True)
            await e.gather(futures)                     # [1, 2, 3]
        """
        if self._awaitable_here():
            coro = func(*args, **kwargs)
            return coro if timeout is None else wait_for(coro, timeout)
        if self._asyncio_loop is None or self._asyncio_loop.is_closed() or (
                self._loop_thread is not None and not self._loop_thread.thread.is_alive()):
            # its loop is gone: nothing would ever run the call
            raise RuntimeError("the executor is %s; make a new one" % self.status)
        if self._in_loop_thread():
            raise RuntimeError("blocking call made from the executor's own event "
                               "loop; use `await` on the underscore method instead")

        async def run():
            # errors are handed over as they are: asyncio would turn a
            # CancelledError raised here into its own asyncio.CancelledError
            # (a BaseException), and a TimeoutError would look like the wait
            # below timing out
            try:
                return await func(*args, **kwargs), None
            except BaseException as e:  # a task's CancelledError, SystemExit, ...
                return None, e

        fut = asyncio.run_coroutine_threadsafe(run(), self._asyncio_loop)
        # in a task (it submitted tasks, get_executor()): the worker runs
        # other tasks while this thread waits, or it could wait forever
        worker = getattr(thread_state, "worker", None)
        if worker is not None:
            worker.secede()
        try:
            result, error = fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError("no result within %s s" % timeout) from None
        finally:
            if worker is not None:
                worker.rejoin()
        if error is not None:
            raise error
        return result

    def _from_any_loop(self, func, *args):
        """``func(*args)`` (a coroutine function), to be awaited on the running
        loop: a threaded executor's coroutine runs on its own loop, awaited
        from another (Jupyter's top-level ``await future``, ``asyncio.run``)."""
        if self._loop_thread is None or self._in_loop_thread() \
                or self._asyncio_loop.is_closed():
            return func(*args)

        async def run():  # errors handed over as values, as in sync()
            try:
                return await func(*args), None
            except BaseException as e:
                return None, e

        async def wait():
            result, error = await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(run(), self._asyncio_loop))
            if error is not None:
                raise error
            return result

        return wait()

    def _now(self, fn, *args):
        """``fn(*args)`` (a plain function) on the executor's loop, at once:
        for the methods that only send messages (``cancel``, ``retry``).  An
        asynchronous executor returns an awaitable of the result, already
        done (so awaiting it is optional)."""
        if self._awaitable_here() or self._in_loop_thread():
            result = fn(*args)
            return _Done(result) if self.asynchronous else result

        async def run():
            return fn(*args)

        return self.sync(run)

    def _on_loop(self, fn, *args):
        """Call ``fn(*args)`` on the executor's loop (now, if already there or if
        that loop is gone: closed, nothing else runs on it)."""
        if self._loop_thread is None:  # the caller's loop: from another thread too
            loop = self._asyncio_loop
            if loop is None or not loop.is_running() or self._in_loop_thread():
                fn(*args)
            else:
                loop.call_soon_threadsafe(fn, *args)
        elif self._in_loop_thread() or not self._loop_thread.thread.is_alive():
            fn(*args)
        else:
            self.loop.add_callback(fn, *args)

    # -- life cycle -------------------------------------------------------------

    async def _start(self):
        """Start a local cluster if there is no address, connect to the center."""
        if self.status == "running":
            return self
        if self.address is None and self._scheduler_file is not None:
            path, given = self._scheduler_file  # wait for it up to our timeout
            self.address, self.security = await asyncio.get_running_loop().run_in_executor(
                None, read_scheduler_file, path, self.timeout, given)
            self.pool.security = self.security
        if self.address is None:
            from .local import LocalCluster

            self.cluster = await asyncio.get_running_loop().run_in_executor(
                None, lambda: LocalCluster(**self._cluster_kwargs))
            self.address = self.cluster.center_address
            self.security = self.pool.security = self.cluster.security
        if self._asyncio_loop is None:  # asynchronous: made maybe before the loop ran
            self._asyncio_loop = asyncio.get_running_loop()
            self.loop = IOLoop.current()
        self.center = rpc(self.address, pool=self.pool)
        await self._open_stream()
        if self.cluster is None:
            try:
                identity = await self.center.identity(timeout=self.timeout)
                self._dashboard_port = (identity.get("services") or {}).get("http")
            except Exception as e:  # an older center: no link
                logger.debug("no dashboard port from the center: %s", e)
        self.status = "running"
        _current[0] = self
        _executors.add(self)
        return self

    async def _open_stream(self):
        """Connect to the center and make the connection our batched stream.

        A center that closes the connection before it answers (it may be
        shedding connections that have not authenticated yet, under a flood)
        is tried again, like one that does not answer, until ``timeout``.
        """
        deadline = time.time() + self.timeout
        delay = 0.05
        found = None  # what listens there, once it did not answer as a center
        while True:
            stream = await self._connect_center(deadline)
            try:
                await write(stream, {"op": "register-client", "client": self.id,
                                     "output": self.forward_output, "reply": False})
                reading = asyncio.ensure_future(read(stream))
                try:
                    if found is None:  # no answer soon: look at what is there meanwhile
                        await asyncio.wait([reading], timeout=min(
                            PROBE_AFTER, max(0.1, deadline - time.time())))
                        if not reading.done():
                            found = await self._check_is_center()
                    first = await asyncio.wait_for(reading, max(0.1, deadline - time.time()))
                finally:
                    reading.cancel()
                break
            except NotACenterError:
                stream.close()
                raise
            except ssl.SSLError as e:  # TLS 1.3: a refused certificate shows now
                raise tls_error(e, self.address) or e
            except (StreamClosedError, asyncio.TimeoutError) as e:
                stream.close()
                error = tls_error(e, self.address) if isinstance(e, StreamClosedError) else None
                if error is not None:
                    raise error from None
                if found is None:  # once: is it a center at all?
                    found = await self._check_is_center()
                if time.time() + delay > deadline:
                    raise TimeoutError(
                        "%s did not answer as a center within %s s: it is %s"
                        % (self.address, self.timeout, found)) from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.5)
        if is_error_message(first):  # refused: no or another auth token
            stream.close()
            raise_error_message(first)
        if not (type(first) is list and first and first[0].get("op") == "stream-start"):
            stream.close()
            raise ValueError("%s did not answer as a center: %r" % (self.address, first))
        start = dict(first[0])
        del start["op"]
        self._stream_start(**start)
        self.batched = BatchedSend(stream, self.loop,
                                   max_bytes=self.max_message_size // 2)
        self.loop.add_callback(self._handle_report, stream)

    async def _check_is_center(self):
        """What listens at our address (:func:`_what_is_at`), when it did not
        answer as a center; :class:`NotACenterError` if it surely is not one."""
        found = await _what_is_at(self.address, self.security)
        if found.not_center:
            raise NotACenterError("%s is not a center: it is %s; give the Executor the "
                                  "center's TCP port (dcenter prints it: '%s ...')"
                                  % (self.address, found, CENTER_STARTED))
        return found

    async def _connect_center(self, deadline=None):
        """A connection to the center, trying again (connection refused, closed
        during the handshake, no answer) until ``deadline`` (default: in
        ``timeout`` seconds)."""
        if deadline is None:
            deadline = time.time() + self.timeout
        delay = 0.05
        while True:
            try:
                return await connect(self.address, timeout=max(0.1, deadline - time.time()),
                                     security=self.security)
            except (AuthenticationError, TLSError):
                raise  # retrying cannot help
            except (OSError, TimeoutError, StreamClosedError) as e:
                if time.time() + delay > deadline:
                    raise TimeoutError(
                        "could not connect to the center at %s within %s s: %s; is a "
                        "center running there (dcenter prints its address: '%s ...')?"
                        % (self.address, self.timeout, e, CENTER_STARTED)) from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.5)

    def __await__(self):
        return self._start().__await__()

    def _task_output(self, key=None, worker=None, stream="stdout", text=""):
        """What a task of ours printed on ``worker``: print it here, each line
        after ``[worker]``."""
        if self.forward_output:
            print_output(worker, stream, text)

    def _stream_start(self, max_message_size=None, max_frame_size=None):
        """The center's first message: its limits, which what we send must fit."""
        self.max_message_size = max_message_size or self.max_message_size
        self.max_frame_size = max_frame_size or self.max_frame_size

    async def _handle_report(self, stream):
        await handle_batches(stream, self.stream_handlers,
                             sender="the center at %s" % self.address)
        if self.status != "running" or self.batched is None \
                or self.batched.stream is not stream:
            return
        logger.warning("lost the connection to the center at %s; reconnecting",
                       self.address)
        self.status = "reconnecting"
        try:
            await self._reconnect()
        except Exception as e:
            logger.warning("could not reconnect to the center: %s", e)
            self.status = "disconnected"
            err = CommClosedError("lost the connection to the center at %s and "
                                  "could not reconnect: %s" % (self.address, e))
            for state in list(self.futures.values()):
                if not state.done():
                    state.set_error(err)

    async def _reconnect(self):
        """A center that restarted: connect again and carry on.

        Workers re-register the keys they hold with the new center.  The
        tasks of our futures and of all their inputs are sent again, so the
        new center knows the lineage of the data that survived (and can
        recompute it if a worker dies later) and runs what was pending or
        lost.  Scattered data, which has no task, survives only where a
        worker still holds it; otherwise its futures fail with ``LostData``.
        """
        self.pool.close(self.address)
        deadline = time.time() + self.timeout
        while True:
            try:
                await self._open_stream()
                break
            except (OSError, StreamClosedError, asyncio.TimeoutError) as e:
                # e.g. reached the old center's socket in its last moments
                if time.time() > deadline:
                    raise
                logger.debug("reconnecting: %s", e)
                await asyncio.sleep(0.1)
        with self._lock:
            live = {k: s for k, s in self.futures.items()
                    if s.status in ("pending", "finished")}
        tasks, untasked = self._lineage(live)
        # data with no task to recompute it: where do the workers hold it?
        finished = [k for k, s in live.items() if s.status == "finished"]
        wanted = untasked.union(finished)
        who_has = {}
        deadline = time.time() + self.timeout
        # a result with a task is recomputed if not found: wait less for it
        settle = time.time() + min(RECONNECT_SETTLE, self.timeout)
        while wanted and time.time() < deadline:
            found = await self.center.who_has(keys=list(wanted), timeout=self.timeout)
            who_has = {k: list(v) for k, v in found.items() if v}
            if len(who_has) == len(wanted) or (
                    time.time() > settle and untasked.issubset(who_has)):
                break
            await asyncio.sleep(0.1)  # workers are still re-registering
        lost = 0
        for key, state in live.items():
            if key in who_has:
                state.workers = who_has[key]
            elif key in untasked and state.status != "error":
                lost += 1
                state.set_error(LostData(
                    "the data of %r was lost while the center at %s restarted; "
                    "scattered data has no lineage to recompute it from"
                    % (key, self.address)))
        scattered = {k: v for k, v in who_has.items() if k in untasked}
        if scattered:
            self.batched.send({"op": "update-data", "who_has": scattered})
            unwanted = [k for k in scattered if k not in live]
            if unwanted:  # inputs of our tasks only: held by the tasks
                self.batched.send({"op": "client-releases-keys", "keys": unwanted})
        now = time.time()
        self._resends = [t for t in self._resends if t > now - RESEND_WINDOW] + [now]
        if tasks and len(self._resends) > MAX_RESENDS:
            # the center drops us each time (a task too big for it, say):
            # sending the same again would never end
            for key, state in live.items():
                if key in tasks and state.status == "pending":
                    state.set_error(LostData(
                        "the connection to the center at %s closed %d times within "
                        "%d s, each time after the pending tasks were sent again; "
                        "%r is not sent again" % (self.address, len(self._resends),
                                                  RESEND_WINDOW, key)))
            tasks = self._lineage([k for k, st in live.items()
                                   if st.status == "finished"])[0]
        if tasks:
            self.batched.send(_graph_message(
                tasks, [k for k in live if k in tasks and live[k].status != "error"]))
        self.status = "running"
        held, self._held = self._held, []
        self.batched.send_many(held)
        logger.info("reconnected to the center at %s; %d tasks sent again, %d futures "
                    "of scattered data lost", self.address, len(tasks), lost)

    def _remember(self, msg):
        """Keep the tasks of an update-graph message, for :meth:`_reconnect`.

        Dict speed per task: each key points at its message (kept whole
        while any of its tasks is part of a live future's lineage).
        """
        tasks = msg["tasks"]
        entry = (msg, sum(map(len, map(_ARGS, tasks.values())))
                 + sum(map(len, map(_TASK, tasks.values()))))
        self._specs.update(dict.fromkeys(tasks, entry))
        self._specs_nbytes += entry[1]
        # forget the tasks of released futures, now and then: when their
        # count or bytes have doubled since last time
        count, nbytes = self._specs_kept
        if len(self._specs) > 2 * max(count, 1000) or self._specs_nbytes > 2 * max(
                nbytes, SPECS_NBYTES):
            with self._lock:
                keys = list(self.futures)
            self._specs = self._lineage(keys)[0]
            entries = {id(e): e for e in self._specs.values()}.values()
            self._specs_nbytes = sum(e[1] for e in entries)
            self._specs_kept = (len(self._specs), self._specs_nbytes)

    def _lineage(self, keys):
        """``(tasks, untasked)``: ``{key: (message, nbytes)}`` remembered for
        ``keys`` and all their inputs, and the keys among those with no
        task (scattered)."""
        tasks, untasked = {}, set()
        stack = list(keys)
        specs = self._specs
        while stack:
            key = stack.pop()
            if key in tasks or key in untasked:
                continue
            entry = specs.get(key)
            if entry is None:
                untasked.add(key)
                continue
            tasks[key] = entry
            stack.extend(entry[0]["dependencies"].get(key, ()))
        return tasks, untasked

    def _key_in_memory(self, key=None, type=None, workers=(), value=None):
        state = self.futures.get(key)
        if state is not None and state.status != "cancelled":
            state.finish(type or state.type, workers, value)

    def _task_erred(self, key=None, exception=None, traceback=None, text=None):
        state = self.futures.get(key)
        if state is not None and state.status != "cancelled":
            state.set_error(exception, traceback, text)

    def _worker_removed(self, address=None):
        self.pool.close(address)  # fails transfers waiting on it: ask others

    def _lost_data(self, key=None):
        state = self.futures.get(key)
        if state is not None and state.status == "finished":
            state.lose()

    def _restarted(self):
        for state in self.futures.values():
            if state.status in ("pending", "finished"):
                state.cancel()
        self.futures.clear()
        self._specs = {}
        self._specs_nbytes = 0

    def shutdown(self, timeout=10):
        """Disconnect; stop the local cluster and the loop thread if ours.
        Asynchronous: ``await e.shutdown()`` (or ``await e.close()``)."""
        if self._loop_thread is None:
            return self.sync(self._shutdown)
        if self.status == "closed":
            return
        try:
            self.sync(self._shutdown, timeout=timeout)
        except Exception:
            logger.debug("error shutting down", exc_info=True)
        self._stop_loop()

    close = shutdown

    async def _shutdown(self):
        if self.status == "closed":
            return
        self.status = "closed"
        _dask_defaults.remove(self)
        for state in list(self.futures.values()):
            if not state.done():  # nothing will finish them now
                state.cancel()
        if self.batched is not None and not self.batched.closed:
            self.batched.send({"op": "close-stream"})
            for _ in range(100):
                if not self.batched.buffer and not self.batched._busy:
                    break
                await asyncio.sleep(0.01)
            self.batched.abort()
        self.pool.close()
        if _current[0] is self:
            _current[0] = None
        if self.cluster is not None:
            await self.cluster._close()

    def _stop_loop(self):
        _dask_defaults.remove(self)
        if self._loop_thread is not None:
            self._loop_thread.stop()
        self._callback_pool.shutdown(wait=False)
        self.status = "closed"

    def __enter__(self):
        if self.asynchronous:
            raise TypeError("an asynchronous Executor: use `async with Executor(..., "
                            "asynchronous=True) as e:`")
        return self

    def __exit__(self, *exc):
        self.shutdown()

    async def __aenter__(self):
        return await self._start()

    async def __aexit__(self, *exc):
        await self._shutdown()

    async def _close(self):
        await self._shutdown()

    def __del__(self):
        if getattr(self, "status", "closed") != "closed" and self._loop_thread is not None:
            try:
                self.shutdown(timeout=2)
            except Exception:
                pass

    def __repr__(self):
        info = self._info_now()
        if info is None:
            return "<Executor: center=%s status=%s>" % (self.address, self.status)
        return "<Executor: center=%s status=%s workers=%d threads=%d memory=%s>" % (
            self.address, self.status, info["workers"], info["threads"],
            _format_bytes(info["memory"]))

    def _repr_html_(self):
        info = self._info_now()
        rows = [("center", self.address), ("status", self.status)]
        if info is not None:
            limit = info["memory_limit"]
            rows += [("workers", info["workers"]), ("threads", info["threads"]),
                     ("memory", "%s / %s" % (_format_bytes(info["memory"]),
                                             _format_bytes(limit) if limit else "no limit"))]
        link = self.dashboard_link
        cells = "".join("<tr><th style='text-align:left'>%s</th><td style='text-align:left'>"
                        "%s</td></tr>" % (name, html.escape(str(value)))
                        for name, value in rows)
        if link:
            cells += ("<tr><th style='text-align:left'>dashboard</th><td style='text-align:"
                      "left'><a href='%s' target='_blank'>%s</a></td></tr>"
                      % (html.escape(link, quote=True), html.escape(link.split("?")[0])))
        return "<table><caption><b>Executor</b></caption>%s</table>" % cells

    def _info_now(self):
        """:meth:`cluster_info` within 2 s, or None (not running, called
        from the executor's own loop, or no answer)."""
        if self.status != "running" or self._loop_thread is None or self._in_loop_thread():
            return None
        try:
            return self.sync(self._cluster_info, timeout=2)
        except Exception:
            return None

    async def _cluster_info(self):
        ncores = await self.center.ncores(timeout=self.timeout)
        metrics = await self.center.metrics(timeout=self.timeout)
        limits = [metrics.get(a, {}).get("memory_limit") for a in ncores]
        return {"workers": len(ncores), "threads": sum(n or 0 for n in ncores.values()),
                "memory": sum(metrics.get(a, {}).get("memory_rss") or 0 for a in ncores),
                "memory_limit": sum(limits) if limits and all(limits) else None,
                "dashboard": self.dashboard_link}

    def cluster_info(self):
        """``{'workers', 'threads', 'memory' (bytes used), 'memory_limit' (their
        sum, or None if a worker has none), 'dashboard'}``, what the reprs show."""
        return self.sync(self._cluster_info, timeout=self.timeout)

    @property
    def dashboard_link(self):
        """The URL of the center's dashboard, with ``?token=...`` when the
        cluster has an auth token (opening it logs the browser in), or None
        when the center serves none."""
        if self.cluster is not None:
            return self.cluster.dashboard_link
        port = self._dashboard_port
        if port is None:
            return None
        host = parse_address(self.address)[0]
        return local.dashboard_link("http://%s:%d/status" % (host, port), self.security.token)

    # -- reference counting -----------------------------------------------------------

    def _state_for(self, key):
        with self._lock:
            state = self.futures.get(key)
            if state is None:
                state = self.futures[key] = FutureState(key)
            return state

    def _inc_ref(self, state):
        with self._lock:
            state.refcount += 1

    def _dec_ref(self, state):
        with self._lock:
            state.refcount -= 1
            last = state.refcount == 0
        if last and self.status == "running":
            self._on_loop(self._release, state)

    def _release(self, state):
        with self._lock:
            if state.refcount > 0 or self.futures.get(state.key) is not state:
                return
            del self.futures[state.key]
        self._send({"op": "client-releases-keys", "keys": [state.key]})

    def _send(self, msg):
        if self.status not in ("running", "reconnecting") or self.batched is None:
            raise CommClosedError("the executor is %s" % self.status)
        self._on_loop(self._send_now, msg)

    def _send_now(self, msg):
        if msg.get("op") == "update-graph":
            self._remember(msg)
        if self.status == "reconnecting":
            self._held.append(msg)  # sent once connected again
        elif self.status == "running" and not self.batched.closed:
            self.batched.send(msg)

    # -- submitting work -----------------------------------------------------------------

    def _check_running(self):
        if self.status not in ("running", "reconnecting"):
            raise RuntimeError("the executor is %s; make a new one" % self.status)

    def _dumps_function(self, func):
        try:
            return self._function_blobs[func]
        except (KeyError, TypeError):
            pass
        blob = _to_blob_or_raise(func, "the function %s" % funcname(func))
        if not by_reference(func):
            return blob  # pickled by value: its globals may differ next time
        try:
            if len(self._function_blobs) > 1000:
                self._function_blobs.clear()
            self._function_blobs[func] = blob
        except TypeError:
            pass
        return blob

    def submit(self, func, *args, key=None, pure=True, workers=None,
               allow_other_workers=False, priority=0, retries=None, resources=None,
               **kwargs):
        """Run ``func(*args, **kwargs)`` on the cluster; return a Future.

        Futures among the arguments (nested in lists, tuples, dicts too) are
        dependencies: the task runs once they are done, with their values.
        ``pure=True`` gives identical calls the same key (one computation);
        ``workers=`` restricts where it may run (with
        ``allow_other_workers=True``, only a preference).  ``priority``:
        among tasks ready to run, higher goes first (default 0; ties: first
        submitted first).  ``retries=n``: if it raises, run it again, up to
        ``n`` times, before the future errs.  ``resources={'GPU': 1}``: it
        runs only on a worker started with at least that much
        (``dworker --resources GPU=2``), while it is free there (the task
        holds it while it runs).  dask's other scheduling keywords
        (:data:`UNSUPPORTED_KEYWORDS`) raise ``TypeError``.
        """
        if not callable(func):
            raise TypeError("submit needs a callable first argument, got %r" % (func,))
        _check_scheduling("submit", priority, retries, kwargs, resources=resources)
        self._check_running()
        if key is not None:
            validate_key(key)
        if key is None:
            if pure:
                key = "%s-%s" % (funcname(func), tokenize(func, args, kwargs))
            else:
                key = "%s-%s" % (funcname(func), uuid.uuid4().hex)
        state = self.futures.get(key)
        if state is not None and state.status != "cancelled":
            return Future(key, self, state)
        restrictions = self._restrictions([key], workers)
        spec, deps = self._task_spec(func, args, kwargs, key)
        self._check_size(key, spec)
        future = Future(key, self, self._new_state(key))
        self._send_graph({
            "op": "update-graph",
            "tasks": {key: spec},
            "dependencies": {key: deps},
            "keys": [key],
            "restrictions": restrictions,
            "loose_restrictions": [key] if restrictions and allow_other_workers else [],
            "priority": {key: (-priority, next(self._priority))},
            "retries": {key: retries} if retries else {},
            "resources": {key: resources} if resources else {},
        })
        return future

    def _check_size(self, key, spec):
        """Refuse a task the center could not read: a message over its limit
        would close this executor's stream (and fail all its futures)."""
        nbytes = sum(len(b) for b in spec.values())
        biggest = max(len(b) for b in spec.values())
        limit = self.max_message_size // 2  # the rest of the message, batching
        if nbytes > limit or biggest > self.max_frame_size:
            raise ValueError(
                "task %r is %s pickled (function and arguments), more than the "
                "center accepts in one message (%s; DISTRIBUTED_MAX_MESSAGE_SIZE, "
                "DISTRIBUTED_MAX_FRAME_SIZE): scatter large data first "
                "(e.scatter) and pass its future"
                % (key, _format_bytes(nbytes), _format_bytes(min(limit, self.max_frame_size))))

    def _send_graph(self, msg):
        """Send an update-graph; in parts if its tasks are more than the center
        reads in one message.  ``msg['tasks']`` lists dependencies first; a
        wanted key goes with its task.  The tasks of a part are wanted until
        the last part has arrived (else one finished meanwhile would be
        forgotten before its dependents arrive)."""
        limit = self.max_message_size // 2
        tasks = msg["tasks"]
        sizes = {k: sum(len(b) for b in spec.values()) for k, spec in tasks.items()}
        if sum(sizes.values()) <= limit:
            self._send(msg)
            return
        parts, part, total = [], [], 0
        for k in tasks:
            if part and total + sizes[k] > limit:
                parts.append(part)
                part, total = [], 0
            part.append(k)
            total += sizes[k]
        parts.append(part)
        restrictions = msg.get("restrictions") or {}
        loose = set(msg.get("loose_restrictions") or ())
        wanted = set(msg["keys"])
        held = [k for part in parts[:-1] for k in part
                if k not in wanted and k not in self.futures]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            here = set(part)

            def mine(k):
                return k in here or (last and k not in tasks)

            self._send({
                "op": "update-graph",
                "tasks": {k: tasks[k] for k in part},
                "dependencies": {k: v for k, v in msg["dependencies"].items() if mine(k)},
                "keys": [k for k in msg["keys"] if mine(k)]
                + ([] if last else [k for k in part if k not in wanted]),
                "restrictions": {k: v for k, v in restrictions.items() if mine(k)} or None,
                "loose_restrictions": [k for k in loose if mine(k)],
                "priority": {k: v for k, v in msg["priority"].items() if mine(k)},
                "retries": {k: v for k, v in (msg.get("retries") or {}).items()
                            if mine(k)},
                "resources": {k: v for k, v in (msg.get("resources") or {}).items()
                              if mine(k)},
            })
        if held:
            self._send({"op": "client-releases-keys", "keys": held})

    def _new_state(self, key):
        with self._lock:
            state = self.futures[key] = FutureState(key)
            return state

    def _task_spec(self, func, args, kwargs, key):
        args, deps = self._replace_futures(args)
        kwargs, kdeps = self._replace_futures(kwargs)
        deps |= kdeps
        spec = {"function": self._dumps_function(func)}
        if args:
            spec["args"] = _to_blob_or_raise(args, "the arguments of %r" % (key,))
        if kwargs:
            spec["kwargs"] = _to_blob_or_raise(kwargs, "the keyword arguments of %r" % (key,))
        return spec, list(deps)

    def _replace_futures(self, obj):
        deps = set()

        def replace(o):
            t = type(o)
            if isinstance(o, Future):
                if o.executor is not self:
                    raise ValueError("future %r belongs to another executor" % (o.key,))
                if o.cancelled():
                    raise CancelledError("future %r was cancelled" % (o.key,))
                deps.add(o.key)
                return TaskRef(o.key)
            if t is list or t is tuple or t is set or t is frozenset:
                return t(replace(x) for x in o)
            if t is dict:
                return {k: replace(v) for k, v in o.items()}
            return o

        return replace(obj), deps

    def _restrictions(self, keys, workers):
        if workers is None:
            return None
        addresses = _addresses(workers)
        if self._loop_thread is not None and not self._in_loop_thread():
            known = self.ncores()
            unknown = [a for a in addresses if a not in known]
            if unknown:
                raise ValueError("workers=%s: no such worker%s on the cluster; the "
                                 "workers are %s" % (unknown, "s" if len(unknown) > 1
                                                     else "", sorted(known)))
        return {k: addresses for k in keys}

    def map(self, func, *iterables, key=None, pure=True, workers=None,
            allow_other_workers=False, priority=0, retries=None, resources=None,
            batch_size=None, **kwargs):
        """``[submit(func, *args, **kwargs) for args in zip(*iterables)]``, in one
        message (cut in parts the center can read, whatever ``batch_size``,
        accepted for dask's sake).  ``priority``, ``retries`` and
        ``resources`` as for :meth:`submit`, for every task."""
        if not callable(func):
            raise TypeError("map needs a callable first argument, got %r" % (func,))
        if not iterables:
            raise TypeError("map needs at least one iterable")
        _check_scheduling("map", priority, retries, kwargs, resources=resources)
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise TypeError("map: batch_size must be an int >= 1, got %r" % (batch_size,))
        self._check_running()
        seqs = list(zip(*iterables))
        name = funcname(func)
        if key is not None and not isinstance(key, str):
            keys = list(key)
            for k in keys:
                validate_key(k)
            if len(keys) != len(seqs):
                raise ValueError("map got %d keys for %d tasks" % (len(keys), len(seqs)))
            counts = Counter(keys)
            if len(counts) != len(keys):
                raise ValueError("map got duplicate keys (each task needs its own): %s"
                                 % [k for k, n in counts.items() if n > 1][:10])
        elif pure:
            prefix = key or name
            ftoken = Normalized(func)  # once, not once per call
            keys = ["%s-%s" % (prefix, tokenize(ftoken, args, kwargs)) for args in seqs]
        else:
            prefix = key or name
            keys = ["%s-%s" % (prefix, uuid.uuid4().hex) for _ in seqs]
        fblob = self._dumps_function(func)
        kwblob = None
        kdeps = set()
        if kwargs:
            kw, kdeps = self._replace_futures(kwargs)
            kwblob = _to_blob_or_raise(kw, "the keyword arguments of %s" % name)
        tasks, deps, priorities, new_keys, states = {}, {}, {}, [], {}
        base = next(self._priority)
        for i, (k, args) in enumerate(zip(keys, seqs)):
            state = self.futures.get(k)
            if state is not None and state.status != "cancelled":
                states[k] = state
                continue
            if k in tasks:
                continue
            a, d = self._replace_futures(args)
            spec = {"function": fblob,
                    "args": _to_blob_or_raise(a, "the arguments of %r" % (k,))}
            if kwblob is not None:
                spec["kwargs"] = kwblob
            self._check_size(k, spec)
            tasks[k] = spec
            deps[k] = list(d | kdeps)
            priorities[k] = (-priority, base, i)
            new_keys.append(k)
        restrictions = self._restrictions(new_keys, workers) if tasks else None
        # only once every task could be serialized (an error above must not
        # leave futures behind whose task was never sent)
        for k in new_keys:
            states[k] = self._new_state(k)
        futures = [Future(k, self, states[k]) for k in keys]
        if tasks:
            self._send_graph({
                "op": "update-graph", "tasks": tasks, "dependencies": deps,
                "keys": new_keys, "restrictions": restrictions,
                "loose_restrictions": new_keys if restrictions and allow_other_workers
                else [],
                "priority": priorities,
                "retries": dict.fromkeys(new_keys, retries) if retries else {},
                "resources": dict.fromkeys(new_keys, resources) if resources else {},
            })
        return futures

    # -- getting results --------------------------------------------------------------

    def gather(self, futures):
        """The results of ``futures`` (a future, or lists/tuples/dicts of them)."""
        return self.sync(self._gather, futures)

    async def _gather(self, futures):
        flat = _collect_futures(futures)
        if not flat:
            return futures
        states = {}
        for f in flat:
            if f.executor is not self:
                raise ValueError("future %r belongs to another executor" % (f.key,))
            states[f.key] = f._state
        data = {}
        while True:
            for key, state in states.items():
                await state.wait()
                if state.status == "error":
                    exc, tb = _unpack_error(state)
                    raise exc.with_traceback(tb)
                if state.status == "cancelled":
                    raise CancelledError("future %r was cancelled" % (key,))
                if state.status == "released":
                    raise CancelledError("future %r was released" % (key,))
            for k, s in states.items():
                if k not in data and s.value is not None:
                    data[k] = from_blob(s.value)
            needed = {k: s for k, s in states.items() if k not in data}
            if not needed:
                break
            who_has = {k: list(s.workers) for k, s in needed.items()}
            unknown = [k for k, v in who_has.items() if not v]
            if unknown:
                found = await self.center.who_has(keys=unknown, timeout=self.timeout)
                for k, v in found.items():
                    who_has[k] = list(v)
            nbytes = None
            if len(who_has) > 1:  # ask each worker for a bounded piece at a time
                nbytes = await self.center.nbytes(keys=list(who_has), timeout=self.timeout)
            got, missing, bad, errors = await gather_from_workers(
                who_has, self._rpc, nbytes=nbytes, max_bytes=GATHER_PIECE_BYTES)
            for k, exc in errors.items():  # held, but it cannot be sent
                raise exc
            data.update(got)
            if missing:
                # the holders are gone: the center recomputes or reports loss
                tried = {k: states[k].workers for k in missing}
                found = await self.center.who_has(keys=list(missing), timeout=self.timeout)
                for k in missing:
                    state = states[k]
                    if state.workers is not tried[k]:
                        continue  # news from the center meanwhile (lost, recomputed)
                    if found.get(k):
                        state.workers = list(found[k])
                    elif state.status == "finished":
                        state.lose()  # its key-in-memory will come after recomputing
                await asyncio.sleep(0.05)
        return _pack_futures(futures, data)

    async def _center_knows(self, who_has):
        """Wait (up to ``timeout``) until the center lists the holders in
        ``who_has``: what went on the batched stream may be read after an rpc
        sent later on another connection (``who_has`` right after
        ``scatter`` would miss the data)."""
        deadline = time.time() + self.timeout
        keys = list(who_has)
        while keys and time.time() < deadline and self.status == "running":
            found = await self.center.who_has(keys=keys, timeout=self.timeout)
            keys = [k for k in keys if not set(who_has[k]) <= set(found.get(k, ()))]
            if keys:
                await asyncio.sleep(0.005)

    def _rpc(self, address):
        return rpc(address, pool=self.pool)

    # -- data -------------------------------------------------------------------------

    def scatter(self, data, workers=None, broadcast=False):
        """Put local data on the workers; return futures for it.

        A list (or other sequence) gives a list of futures, a dict a dict of
        futures by key, anything else a single future.  ``broadcast=True``
        puts a copy on every worker (of ``workers``).
        """
        return self.sync(self._scatter, data, workers=workers, broadcast=broadcast)

    async def _scatter(self, data, workers=None, broadcast=False):
        self._check_running()
        single = False
        if isinstance(data, dict):
            items = dict(data)
            for k in items:
                validate_key(k)
        elif isinstance(data, (list, tuple, set, frozenset)) or hasattr(data, "__next__"):
            seq = list(data)
            keys_in_order = ["%s-%s" % (type(v).__name__, tokenize(v)) for v in seq]
            items = dict(zip(keys_in_order, seq))
        else:
            single = True
            items = {"%s-%s" % (type(data).__name__, tokenize(data)): data}
        ncores = await self.center.ncores(timeout=self.timeout)
        if workers is not None:
            wanted = _addresses(workers)
            unknown = [w for w in wanted if w not in ncores]
            if unknown:
                raise ValueError("scatter: no such workers %s; the workers are %s"
                                 % (unknown, sorted(ncores)))
            ncores = {w: ncores[w] for w in wanted}
        if not ncores:
            raise ValueError("scatter: the cluster has no workers yet")
        targets = defaultdict(dict)
        if broadcast:
            for w in ncores:
                targets[w] = items
        else:
            ring = itertools.cycle(sorted(ncores))
            for k, v in items.items():
                targets[next(ring)][k] = v
        addresses = list(targets)
        replies = await asyncio.gather(*[
            self._rpc(a).update_data(data=targets[a], report=False)
            for a in addresses])
        who_has = defaultdict(list)
        nbytes = {}
        for a, (status, meta) in zip(addresses, replies):
            for k, n in meta["nbytes"].items():
                who_has[k].append(a)
                nbytes[k] = n
        futures = {}
        for k in items:
            state = self.futures.get(k)
            if state is None or state.status in ("cancelled", "error"):
                state = self._new_state(k)
            state.finish(type(items[k]).__name__, who_has[k])
            futures[k] = Future(k, self, state)
        self._send({"op": "update-data", "who_has": dict(who_has), "nbytes": nbytes})
        await self._center_knows(who_has)
        if single:
            return next(iter(futures.values()))
        if isinstance(data, dict):
            return futures
        return [futures[k] for k in keys_in_order]

    def cancel(self, futures):
        """Cancel the tasks of ``futures``; their results raise ``CancelledError``.
        Done at once, also by an asynchronous executor (awaiting what it
        returns is optional)."""
        return self._now(self._cancel_now, _collect_futures(futures))

    async def _cancel(self, futures):
        self._cancel_now(_collect_futures(futures))

    def _cancel_now(self, flat):
        for f in flat:
            state = f._state
            if self.futures.get(f.key) is state:
                del self.futures[f.key]
            if not isinstance(state, _Released) and state.status != "cancelled":
                state.cancel()
        self._send({"op": "cancel", "keys": [f.key for f in flat]})

    def retry(self, futures):
        """Run the erred tasks of ``futures`` again, with the erred tasks they
        depend on; their futures are pending until the new outcome is known.
        Done at once, like :meth:`cancel`."""
        return self._now(self._retry_now, _collect_futures(futures))

    async def _retry(self, futures):
        self._retry_now(_collect_futures(futures))

    def _retry_now(self, flat):
        keys = []
        for f in flat:
            state = f._state
            if self.futures.get(f.key) is state and state.status == "error":
                state.retry()
                keys.append(f.key)
        if keys:
            # their tasks again first: a restarted center never heard of them
            tasks = self._lineage(keys)[0]
            if tasks:
                self._send(_graph_message(tasks, []))
            self._send({"op": "retry", "keys": keys})

    # -- task graphs --------------------------------------------------------------------

    def _graph_to_futures(self, dsk, keys, restrictions=None, loose_restrictions=None,
                          priority=0, retries=None, resources=None):
        dsk = _normalize_graph(dsk)
        for k in itertools.chain(dsk, keys):
            validate_key(k)
        for k, v in dsk.items():  # dask wraps persisted futures in DataNodes
            if _is_graph_node(v) and isinstance(getattr(v, "value", None), Future):
                dsk[k] = v.value
        held = []  # futures found in the graph: keep them alive until sent
        replaced, deps = {}, {}
        for k, v in dsk.items():
            if isinstance(v, Future):
                held.append(v)
                deps[k] = [] if v.key == k else [v.key]
                continue
            replaced[k], fdeps = self._replace_futures_in_task(v, held)
            deps[k] = list(get_dependencies(dsk, task=replaced[k]) | fdeps)
        order = toposort(dsk, deps)  # a cycle raises here, before anything is sent
        rank = {k: i for i, k in enumerate(order)}
        base = next(self._priority)
        tasks = {}  # dependencies first: _send_graph may cut it in parts
        for k in order:
            v = dsk[k]
            if k in replaced:
                tasks[k] = {"task": _to_blob_or_raise(replaced[k], "task %r" % (k,))}
                self._check_size(k, tasks[k])
            elif v.key != k:
                tasks[k] = {"task": to_blob(v.key)}
            else:
                del deps[k]
        wanted = [k for k in keys]
        futures = {}
        for k in wanted:
            state = self.futures.get(k)
            if state is None or state.status == "cancelled" or k in tasks:
                if state is None or state.status == "cancelled" or state.status == "error":
                    state = self._new_state(k)
            futures[k] = Future(k, self, state)
        restrict = None
        if restrictions:
            restrict = {}
            for k, ws in restrictions.items():
                restrict.update(self._restrictions([k], ws))
        self._send_graph({
            "op": "update-graph", "tasks": tasks, "dependencies": deps,
            "keys": wanted, "restrictions": restrict,
            "loose_restrictions": list(loose_restrictions or ()),
            "priority": {k: (-priority, base, rank.get(k, 0)) for k in tasks},
            "retries": dict.fromkeys(tasks, retries) if retries else {},
            "resources": dict.fromkeys(tasks, resources) if resources else {},
        })
        del held
        return futures

    def _replace_futures_in_task(self, task, held):
        fdeps = set()

        def replace(o):
            if isinstance(o, Future):
                held.append(o)
                fdeps.add(o.key)
                return o.key
            t = type(o)
            if t is tuple:
                return tuple(replace(x) for x in o)
            if t is list:
                return [replace(x) for x in o]
            if t is dict:
                return {k: replace(v) for k, v in o.items()}
            return o

        return replace(task), fdeps

    def get(self, dsk, keys, restrictions=None, loose_restrictions=None, priority=0,
            retries=None, resources=None, **kwargs):
        """Compute ``keys`` of the task graph ``dsk`` (dask's scheduler interface).

        ``keys`` is a key or a nested list of keys; the result has the same
        shape.  Usable as ``dask.compute(x, scheduler=e.get)`` (or
        ``scheduler=e``: an executor called is its ``get``); ``priority``,
        ``retries`` and ``resources`` as for :meth:`submit`, for every task
        of the graph.
        """
        futures = self._get_futures(dsk, keys, restrictions, loose_restrictions,
                                    priority, retries, resources, kwargs)
        return self.sync(self._gather_keys, keys, futures)

    __call__ = get  # dask.compute(x, scheduler=e), dask.config.set(scheduler=e)

    async def _get(self, dsk, keys, restrictions=None, loose_restrictions=None,
                   priority=0, retries=None, resources=None, **kwargs):
        futures = self._get_futures(dsk, keys, restrictions, loose_restrictions,
                                    priority, retries, resources, kwargs)
        return await self._gather_keys(keys, futures)

    def _get_futures(self, dsk, keys, restrictions, loose_restrictions, priority,
                     retries, resources, kwargs):
        """Send the graph of :meth:`get` (in the caller's thread: a bad
        keyword or worker raises here); ``{key: Future}`` of ``keys``."""
        _check_scheduling("get", priority, retries, kwargs, unknown=True,
                          resources=resources)
        if hasattr(dsk, "__dask_graph__") and not isinstance(dsk, dict):
            dsk = dsk.__dask_graph__()
        return self._graph_to_futures(dsk, list(_flatten_keys(keys)), restrictions,
                                      loose_restrictions, priority=priority,
                                      retries=retries, resources=resources)

    async def _gather_keys(self, keys, futures):
        """The results of :meth:`get`'s ``futures``, in the shape of ``keys``;
        the futures are released (the results are the caller's now)."""
        flat = list(_flatten_keys(keys))
        try:
            results = await self._gather([futures[k] for k in flat])
        finally:
            for f in futures.values():
                f.release()
            futures.clear()
        return _pack_keys(keys, dict(zip(flat, results)))

    def compute(self, collections, sync=False, optimize_graph=True, priority=0,
                retries=None, resources=None, **kwargs):
        """Start computing dask collections; return a future per collection.

        A task-graph dict gives ``{key: Future}`` for every key of the graph.
        ``sync=True`` waits and returns the results instead.
        ``optimize_graph=False`` skips dask's low-level graph optimizations;
        ``priority``, ``retries`` and ``resources`` as for :meth:`submit`,
        for every task.  :func:`progress` of such a future counts the tasks
        of its graph.
        """
        _check_scheduling("compute", priority, retries, kwargs, unknown=True,
                          resources=resources)
        sched = {"priority": priority, "retries": retries, "resources": resources}
        if isinstance(collections, dict):
            futures = self._graph_to_futures(collections, list(collections), **sched)
            return self.gather(futures) if sync else futures
        single = not isinstance(collections, (list, tuple))
        colls = [collections] if single else list(collections)
        futures = []
        for c in colls:
            dsk, key = _collection_graph(c, optimize_graph=optimize_graph)
            future = self._graph_to_futures(dsk, [key], **sched)[key]
            future._state.graph_keys = list(dsk)  # what progress() counts
            futures.append(future)
        futures = futures[0] if single else futures
        return self.gather(futures) if sync else futures

    async def _compute(self, collections, sync=False, **kwargs):
        futures = self.compute(collections, **kwargs)
        return await self._gather(futures) if sync else futures

    def persist(self, collections, optimize_graph=True, priority=0, retries=None,
                resources=None, **kwargs):
        """Start computing dask collections, keep the results on the cluster.

        Returns collections of the same type whose graphs point at futures
        (a list for a list).  ``wait``, ``progress``, ``futures_of`` take
        them.  ``optimize_graph``, ``priority``, ``retries``, ``resources``
        as for :meth:`compute`.  dask calls it: ``x.persist()`` when the executor
        is dask's scheduler, ``dask.persist(x, scheduler=e.get)``.
        """
        _check_scheduling("persist", priority, retries, kwargs, unknown=True,
                          resources=resources)
        single = not isinstance(collections, (list, tuple))
        colls = [collections] if single else list(collections)
        out = []
        for c in colls:
            dsk, keys = _collection_graph(c, finalize=False, optimize_graph=optimize_graph)
            flat = list(_flatten_keys(keys))
            futures = self._graph_to_futures(dsk, flat, priority=priority,
                                             retries=retries, resources=resources)
            rebuild, args = c.__dask_postpersist__()
            out.append(rebuild(futures, *args))
        return out[0] if single else out

    async def _persist(self, collections, **kwargs):
        return self.persist(collections, **kwargs)

    # -- cluster information and administration -------------------------------------------

    def who_has(self, futures=None):
        """``{key: [address]}`` for the keys of ``futures`` (a future, or
        lists/dicts of them; default: every key on the cluster)."""
        return self.sync(self._who_has, futures)

    async def _who_has(self, futures=None):
        keys = None if futures is None else [f.key for f in _collect_futures(futures)]
        result = await self.center.who_has(keys=keys, timeout=self.timeout)
        return {k: sorted(v) for k, v in result.items()}

    def has_what(self, workers=None):
        """``{address: [key]}`` for the workers (an address, or a list; default: all)."""
        return self.sync(self._has_what, workers)

    async def _has_what(self, workers=None):
        result = await self.center.has_what(addresses=_addresses(workers),
                                            timeout=self.timeout)
        return {a: list(v) for a, v in result.items()}

    def ncores(self, workers=None):
        """``{address: threads}`` of the workers (an address, or a list; default: all)."""
        return self.sync(self._ncores, workers)

    async def _ncores(self, workers=None):
        return await self.center.ncores(addresses=_addresses(workers), timeout=self.timeout)

    def nthreads(self, workers=None):
        """``{address: threads}`` of the workers (dask's name of :meth:`ncores`)."""
        return self.ncores(workers)

    _nthreads = _ncores

    def scheduler_info(self):
        """What the center says of itself and its workers::

            {'type': 'Center', 'id': ..., 'address': '127.0.0.1:8787',
             'workers': {'127.0.0.1:40123': {'nthreads': 1, 'resources': {}},
                         ...}, ...}
        """
        return self.sync(self._scheduler_info)

    async def _scheduler_info(self):
        info = dict(await self.center.identity(timeout=self.timeout))
        ncores = await self.center.ncores(timeout=self.timeout)
        info["address"] = self.address
        resources = info.pop("resources", {})
        info["workers"] = {a: {"nthreads": n, "ncores": n,
                               "resources": resources.get(a, {})}
                           for a, n in ncores.items()}
        return info

    def wait_for_workers(self, n_workers=1, timeout=None):
        """Wait until at least ``n_workers`` workers are connected;
        ``TimeoutError`` after ``timeout`` seconds (None: no limit)."""
        return self.sync(self._wait_for_workers, n_workers, timeout)

    async def _wait_for_workers(self, n_workers=1, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while True:
            ncores = await self.center.ncores(timeout=self.timeout)
            if len(ncores) >= n_workers:
                return
            if deadline is not None and time.time() > deadline:
                raise TimeoutError("%d workers wanted, %d connected after %s s"
                                   % (n_workers, len(ncores), timeout))
            await asyncio.sleep(0.1)

    def story(self, *keys):
        """What happened to these keys (or futures) in the scheduler and why,
        oldest first: ``[{'key', 'start', 'finish', 'cause', 'worker',
        'time'}]``, one per change of state (as far back as the center's log
        reaches).  ``await e._story(...)`` on the executor's own loop.

        >>> e.story(future)                                   # doctest: +SKIP
        [{'key': 'inc-1', 'start': 'released', 'finish': 'waiting', ...}, ...]
        """
        return self.sync(self._story, *keys)

    async def _story(self, *keys):
        keys = [k.key if isinstance(k, Future) else k for k in keys]
        return await self.center.story(keys=keys, timeout=self.timeout)

    def get_worker_logs(self, n=None, workers=None):
        """The recent log records of the workers (or of ``workers``), the last
        ``n`` of each: ``{address: [{'time', 'level', 'name', 'message'}]}``,
        oldest first.  A worker that does not answer within ``timeout``
        seconds gets one ERROR record saying why.  ``await
        e._get_worker_logs(...)`` on the executor's own loop.

        >>> e.get_worker_logs(n=1)                            # doctest: +SKIP
        {'127.0.0.1:40123': [{'time': ..., 'level': 'INFO', 'name': 'distributed.worker',
                              'message': 'worker at 127.0.0.1:40123 registered ...'}]}
        """
        return self.sync(self._get_worker_logs, n=n, workers=workers)

    async def _get_worker_logs(self, n=None, workers=None):
        if workers is None:
            addresses = list(await self.center.ncores(timeout=self.timeout))
        else:
            addresses = _addresses(workers)
        replies = await asyncio.gather(*[
            self._rpc(a).get_logs(n=n, timeout=self.timeout) for a in addresses],
            return_exceptions=True)
        return {a: _logs_or_error(a, r) for a, r in zip(addresses, replies)}

    def get_center_logs(self, n=None):
        """The center's recent log records (the last ``n``), oldest first:
        ``[{'time', 'level', 'name', 'message'}]``.  ``await
        e._get_center_logs(...)`` on the executor's own loop."""
        return self.sync(self._get_center_logs, n=n)

    async def _get_center_logs(self, n=None):
        return await self.center.get_logs(n=n, timeout=self.timeout)

    def restart(self):
        """Drop all tasks and data; a local cluster gets fresh worker processes.

        Every future of every executor is cancelled.
        """
        return self.sync(self._restart)

    async def _restart(self):
        await self.center.restart(timeout=self.timeout)
        if self.cluster is not None:
            n = len(self.cluster.workers)
            await asyncio.get_running_loop().run_in_executor(
                None, self.cluster.restart_workers)
            deadline = time.time() + self.timeout * 3
            while len(await self.center.ncores()) < n:
                if time.time() > deadline:
                    raise TimeoutError("workers did not come back after restart")
                await asyncio.sleep(0.05)
        self._restarted()

    def run(self, function, *args, workers=None, **kwargs):
        """Run ``function(*args, **kwargs)`` in every worker process.

        Returns ``{address: result}``; re-raises the first exception.
        """
        return self.sync(self._run, function, *args, workers=workers, **kwargs)

    async def _run(self, function, *args, workers=None, **kwargs):
        if workers is None:
            addresses = list(await self.center.ncores(timeout=self.timeout))
        else:
            addresses = _addresses(workers)
        results = await asyncio.gather(*[
            self._rpc(a).run(function=function, args=args, kwargs=kwargs)
            for a in addresses], return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return dict(zip(addresses, results))

    def upload_file(self, path):
        """Send a .py/.egg/.zip file to every worker and make it importable
        there; ``{address: bytes}``."""
        return self.sync(self._upload_file, path)

    async def _upload_file(self, path):
        with open(path, "rb") as f:
            data = f.read()
        filename = os.path.basename(path)
        addresses = list(await self.center.ncores(timeout=self.timeout))
        results = await asyncio.gather(*[
            self._rpc(a).upload_file(filename=filename, data=data)
            for a in addresses], return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return {a: r["nbytes"] for a, r in zip(addresses, results)}

    def replicate(self, futures, n=None, workers=None):
        """Copy the data of ``futures`` until ``n`` workers (default: all) hold it."""
        return self.sync(self._replicate, futures, n=n, workers=workers)

    async def _replicate(self, futures, n=None, workers=None):
        flat = _collect_futures(futures)
        await self._gather_states(flat)
        ncores = await self.center.ncores(timeout=self.timeout)
        pool_ = _addresses(workers) if workers else list(ncores)
        n = len(pool_) if n is None else min(n, len(pool_))
        who_has = await self.center.who_has(keys=[f.key for f in flat])
        load = {a: 0 for a in pool_}
        for holders in who_has.values():
            for a in holders:
                if a in load:
                    load[a] += 1
        orders = defaultdict(dict)
        for key, holders in who_has.items():
            holders = set(holders)
            if not holders:
                continue
            have = len(holders & set(pool_))
            for a in sorted((a for a in pool_ if a not in holders), key=load.get):
                if have >= n:
                    break
                orders[a][key] = list(holders)
                load[a] += 1
                have += 1
        await asyncio.gather(*[self._rpc(a).gather(who_has=wh) for a, wh in orders.items()])

    def rebalance(self, futures=None, workers=None):
        """Move data so that every worker holds about the same number of bytes."""
        return self.sync(self._rebalance, futures, workers)

    async def _rebalance(self, futures=None, workers=None):
        keys = None
        if futures is not None:
            flat = _collect_futures(futures)
            await self._gather_states(flat)
            keys = {f.key for f in flat}
        ncores = await self.center.ncores(timeout=self.timeout)
        addresses = _addresses(workers) if workers else list(ncores)
        has_what = await self.center.has_what(addresses=addresses)
        nbytes = await self.center.nbytes()
        if keys is not None:
            has_what = {a: {k for k in ks if k in keys} for a, ks in has_what.items()}
        totals = {a: sum(nbytes.get(k, 0) for k in ks) for a, ks in has_what.items()}
        if not totals:
            return
        mean = sum(totals.values()) / len(totals)
        moves = defaultdict(lambda: defaultdict(list))  # recipient -> sender -> keys
        receivers = sorted(totals, key=totals.get)
        for sender in sorted(totals, key=totals.get, reverse=True):
            for key in sorted(has_what[sender], key=lambda k: -nbytes.get(k, 0)):
                size = nbytes.get(key, 0)
                if totals[sender] - size < mean:
                    continue
                target = min(receivers, key=totals.get)
                if target == sender or totals[target] + size > mean + size / 2:
                    continue
                if any(key in has_what[r] for r in [target]):
                    continue
                moves[target][sender].append(key)
                totals[sender] -= size
                totals[target] += size
        for target, senders in moves.items():
            who_has = {k: [s] for s, ks in senders.items() for k in ks}
            await self._rpc(target).gather(who_has=who_has)
            for s, ks in senders.items():
                await self._rpc(s).delete_data(keys=ks, report=True)

    async def _gather_states(self, flat):
        for f in flat:
            await f._state.wait()


# ---------------------------------------------------------------------------
# wait, as_completed


DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", "done not_done")

FIRST_COMPLETED = "FIRST_COMPLETED"
ALL_COMPLETED = "ALL_COMPLETED"


def _logs_or_error(address, reply):
    """``get_logs``' reply, or one ERROR record for a node that did not give it."""
    if not isinstance(reply, BaseException):
        return reply
    return [{"time": time.time(), "level": "ERROR", "name": __name__,
             "message": "could not get the logs of %s: %s: %s"
             % (address, type(reply).__name__, reply)}]


def wait(futures, timeout=None, return_when=ALL_COMPLETED):
    """Wait until all (or the first of) ``futures`` are done (a future, lists,
    dicts of them, persisted dask collections: see :func:`futures_of`).

    Returns ``(done, not_done)`` sets; raises ``TimeoutError`` after
    ``timeout`` seconds.  With an asynchronous executor's futures:
    ``await wait(futures)``.
    """
    flat = _collect_futures(futures)
    if not flat:
        return DoneAndNotDoneFutures(set(), set())
    executor = flat[0].executor
    return executor.sync(_wait, flat, timeout, return_when)


async def _wait(futures, timeout=None, return_when=ALL_COMPLETED):
    """:func:`wait`'s coroutine: ``await _wait(futures)`` takes the same
    arguments (one future too, collections) on the executor's loop."""
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED):
        raise ValueError("return_when must be ALL_COMPLETED or FIRST_COMPLETED")
    futures = _collect_futures(futures)
    if not futures:
        return DoneAndNotDoneFutures(set(), set())
    waits = [asyncio.ensure_future(f._state.wait()) for f in futures]
    try:
        done, pending = await asyncio.wait(
            waits, timeout=timeout,
            return_when=asyncio.ALL_COMPLETED if return_when == ALL_COMPLETED
            else asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if return_when == ALL_COMPLETED and pending:
        raise TimeoutError("%d of %d futures not done within %s s"
                           % (len(pending), len(futures), timeout))
    if return_when == FIRST_COMPLETED and not done:
        raise TimeoutError("no future done within %s s" % timeout)
    done_set = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done_set, set(futures) - done_set)


class as_completed:
    """Iterate over futures in the order they finish.

    ::

        for future in as_completed(futures):
            print(future.result())
        for future, result in as_completed(futures, with_results=True):
            print(result)                # fetched for you; an error raises here
        async for future in as_completed(futures):     # in a coroutine
            print(await future)

    ``futures`` may nest them in lists and dicts, or be persisted dask
    collections (see :func:`futures_of`).
    """

    def __init__(self, futures=(), with_results=False):
        import queue

        self.queue = queue.Queue()
        self.count = 0
        self.lock = threading.Lock()
        self.with_results = with_results
        self._waiter = None  # (loop, asyncio.Event) of an `async for` waiting
        for f in _collect_futures(futures):
            self.add(f)

    def add(self, future):
        with self.lock:
            self.count += 1
        future.executor._on_loop(future._add_callback, lambda: self._put(future))

    def _put(self, future):
        self.queue.put(future)
        with self.lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, event = waiter
            loop.call_soon_threadsafe(event.set)

    def __aiter__(self):
        return self

    async def __anext__(self):
        import queue

        with self.lock:
            if self.count == 0:
                raise StopAsyncIteration
            self.count -= 1
        while True:
            try:
                future = self.queue.get_nowait()
                break
            except queue.Empty:
                pass
            event = asyncio.Event()
            with self.lock:
                self._waiter = (asyncio.get_running_loop(), event)
            if self.queue.empty():  # else: put meanwhile, take it
                await event.wait()
        if not self.with_results:
            return future
        if future.executor.asynchronous:
            return future, await future._result()
        # a threaded executor's future: fetched on its loop, not blocking ours
        return future, await asyncio.get_running_loop().run_in_executor(None, future.result)

    def __iter__(self):
        return self

    def __next__(self):
        with self.lock:
            if self.count == 0:
                raise StopIteration
            self.count -= 1
        future = self.queue.get()
        if self.with_results:
            return future, future.result()
        return future

    def __len__(self):
        return self.count


# ---------------------------------------------------------------------------
# helpers


_ARGS = operator.methodcaller("get", "args", b"")
_TASK = operator.methodcaller("get", "task", b"")


def _graph_message(tasks, keys):
    """The update-graph message sending the remembered ``tasks`` again."""
    msg = {"op": "update-graph", "tasks": {}, "dependencies": {}, "keys": keys,
           "restrictions": {}, "loose_restrictions": [], "priority": {},
           "retries": {}, "resources": {}, "lineage_only": True}
    for key, (sent, _) in tasks.items():
        msg["tasks"][key] = sent["tasks"][key]
        msg["dependencies"][key] = list(sent["dependencies"].get(key, ()))
        priority = (sent.get("priority") or {}).get(key)
        if priority is not None:
            msg["priority"][key] = priority
        for field in ("retries", "resources"):
            value = (sent.get(field) or {}).get(key)
            if value:
                msg[field][key] = value
        restriction = (sent.get("restrictions") or {}).get(key)
        if restriction is not None:
            msg["restrictions"][key] = restriction
            if key in (sent.get("loose_restrictions") or ()):
                msg["loose_restrictions"].append(key)
    return msg


def _check_scheduling(method, priority=0, retries=None, kwargs=(), unknown=False,
                      resources=None):
    """Refuse bad values of ``priority``/``retries``, and dask's scheduling
    keywords this executor does not implement among ``kwargs`` (with
    ``unknown=True``, any keyword: ``kwargs`` are not the function's)."""
    if isinstance(priority, bool) or not isinstance(priority, (int, float)):
        raise TypeError("%s: priority must be a number (higher runs first), got %r"
                        % (method, priority))
    if retries is not None and (type(retries) is not int or retries < 0):
        raise TypeError("%s: retries must be an int >= 0, got %r" % (method, retries))
    if resources is not None and not (isinstance(resources, dict) and all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float))
            and v >= 0 for k, v in resources.items())):
        raise TypeError("%s: resources must be a dict {name: amount >= 0}, e.g. "
                        "{'GPU': 1}, got %r" % (method, resources))
    bad = [k for k in kwargs if k in UNSUPPORTED_KEYWORDS]
    if bad:
        raise TypeError(
            "%s(%s=...): dask's scheduling keyword%s %s %s not supported by this "
            "executor (it supports workers=, allow_other_workers=, priority=, "
            "retries=, resources=). If your function itself takes a keyword argument of that "
            "name, bind it: functools.partial(func, %s=...)"
            % (method, bad[0], "s" if len(bad) > 1 else "", ", ".join(bad),
               "are" if len(bad) > 1 else "is", bad[0]))
    if unknown and kwargs:
        raise TypeError("%s() got unexpected keyword arguments: %s (it takes "
                        "priority=, retries=, resources=, optimize_graph=)"
                        % (method, ", ".join(sorted(kwargs))))


def _addresses(workers):
    """The worker addresses of ``workers``: None (all), one address
    (``'ip:port'``, ``(ip, port)``, a Worker) or a list/set/tuple of them.

    >>> _addresses('127.0.0.1:8000')
    ['127.0.0.1:8000']
    >>> _addresses(('127.0.0.1', 8000))
    ['127.0.0.1:8000']
    >>> _addresses(['127.0.0.1:8000', ('127.0.0.1', 8001)])
    ['127.0.0.1:8000', '127.0.0.1:8001']
    """
    if workers is None:
        return None
    if isinstance(workers, str) or hasattr(workers, "port") or (
            isinstance(workers, tuple) and len(workers) == 2
            and isinstance(workers[1], int)):
        workers = [workers]
    return [coerce_to_address(w) for w in workers]


def _to_blob_or_raise(obj, what):
    try:
        return to_blob(obj)
    except Exception as e:
        raise TypeError("could not serialize %s to send it to the cluster: %s: %s"
                        % (what, type(e).__name__, e)) from e


def _collect_futures(obj):
    out = []
    seen = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, Future):
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(reversed(list(o)))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        elif hasattr(o, "__dask_graph__") and not isinstance(o, type):
            stack.extend(reversed(_graph_futures(o)))
    return out


def _graph_futures(collection):
    """The futures in a dask collection's graph (a persisted one's)."""
    graph = collection.__dask_graph__()
    if graph is None:
        return []
    out = []
    for v in graph.values():
        if isinstance(v, Future):
            out.append(v)
        elif _is_graph_node(v) and isinstance(getattr(v, "value", None), Future):
            out.append(v.value)  # dask wraps a persisted future in a DataNode
    return out


def futures_of(obj):
    """The futures in ``obj``: a future, lists/tuples/sets/dicts of them, or
    dask collections (persisted: their graphs hold futures), nested.

    >>> y = e.persist(x)                                  # doctest: +SKIP
    >>> futures_of(y)                                     # doctest: +SKIP
    [<Future: status: pending, key: ('sum-ab12', 0)>, ...]
    """
    return _collect_futures(obj)


def fire_and_forget(futures):
    """Compute the tasks of ``futures`` (a future, or collections of them) to
    the end even if every future of them is released, or their executor
    shuts down: the center keeps them wanted until they are in memory or
    erred (then drops them).  For tasks run for their side effects::

        fire_and_forget(e.submit(write_report, data))
    """
    flat = _collect_futures(futures)
    by_executor = defaultdict(list)
    for f in flat:
        by_executor[f.executor].append(f.key)
    for executor, keys in by_executor.items():
        executor._send({"op": "fire-and-forget", "keys": keys})


def get_executor(timeout=10):
    """Inside a task: an :class:`Executor` connected to the worker's center,
    so that the task can submit tasks and wait for them.  While its thread
    waits (``result()``, ``gather``, ``wait``...), the worker runs other
    tasks in another thread (:func:`~distributed.worker.secede`): a
    1-thread worker cannot deadlock on a task waiting for its subtasks.

    ::

        def fib(n):
            if n < 2:
                return n
            e = get_executor()
            a, b = e.submit(fib, n - 1), e.submit(fib, n - 2)
            return a.result() + b.result()

    One executor per worker, shut down with it; it is not dask's default
    scheduler (pass ``scheduler=e.get`` to dask in a task).  Outside a
    task: :func:`default_executor`.
    """
    worker = getattr(thread_state, "worker", None)
    if worker is None:
        return default_executor()
    with _worker_executor_lock:
        executor = worker.client
        if executor is None or executor.status == "closed":
            executor = worker.client = Executor(
                worker.center.address, timeout=timeout,
                security=worker.pool.security, set_as_default=False)
    return executor


_worker_executor_lock = threading.Lock()


def _pack_futures(obj, data):
    if isinstance(obj, Future):
        return data[obj.key]
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        return t(_pack_futures(o, data) for o in obj)
    if t is dict:
        return {k: _pack_futures(v, data) for k, v in obj.items()}
    return obj


def _flatten_keys(keys):
    if isinstance(keys, list):
        for k in keys:
            yield from _flatten_keys(k)
    else:
        yield keys


def _pack_keys(keys, mapping):
    if isinstance(keys, list):
        return [_pack_keys(k, mapping) for k in keys]
    return mapping[keys]


def _normalize_graph(dsk):
    if hasattr(dsk, "__dask_graph__") and not isinstance(dsk, dict):
        dsk = dsk.__dask_graph__()
    if not isinstance(dsk, dict):
        dsk = dict(dsk)
    if any(_is_graph_node(v) for v in dsk.values()):
        from dask._task_spec import convert_legacy_graph

        futures = {k: v for k, v in dsk.items() if isinstance(v, Future)}
        dsk = convert_legacy_graph({k: v for k, v in dsk.items() if k not in futures})
        dsk.update(futures)
    else:
        dsk = dict(dsk)
    return dsk


def _is_graph_node(v):
    return type(v).__module__ == "dask._task_spec"


def _collection_graph(c, finalize=True, optimize_graph=True):
    """``(graph, key)`` computing dask collection ``c`` (finalized), or
    ``(graph, keys)`` of its partitions with ``finalize=False``."""
    if not hasattr(c, "__dask_graph__"):
        raise TypeError("expected a dask collection, got %r; use get() for a graph "
                        "dict or submit() for a function" % type(c).__name__)
    try:
        from dask.base import collections_to_expr

        expr = collections_to_expr([c], optimize_graph)
        if finalize:
            from dask._expr import FinalizeCompute

            expr = FinalizeCompute(expr)
        expr = expr.optimize()
        dsk = expr.__dask_graph__()
        keys = expr.__dask_keys__()
    except ImportError:  # an older dask
        dsk = c.__dask_graph__()
        keys = c.__dask_keys__()
        if finalize:
            func, args = c.__dask_postcompute__()
            name = "finalize-" + tokenize(keys)
            dsk = dict(dsk)
            dsk[name] = (func, keys) + tuple(args)
            return dsk, name
    if finalize:
        flat = list(_flatten_keys(keys))
        return dsk, flat[0]
    return dsk, keys


@atexit.register
def _shutdown_executors():
    for e in list(_executors):
        try:
            if e.status != "closed" and e._loop_thread is not None:
                e.shutdown(timeout=2)
        except Exception:
            pass
