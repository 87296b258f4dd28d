"""The worker: holds data, computes on it, fetches inputs from peers.

::

    w = Worker('127.0.0.1', 8787)        # the center's ip and port
    yield w._start(port=0)               # or: await w._start(0)
    w.data['x'] = 1
    ...
    yield w._close()

A worker keeps Python objects in ``data`` and runs functions on them in a
thread pool of ``ncores`` threads.  Inputs it lacks are located through the
center (or a ``who_has`` given with the request) and fetched **directly from
the peer** that holds them (:mod:`distributed.transfer`).  Every key it gains
is reported to the center.

What a task of the scheduler prints goes to the executors that want it
(:mod:`distributed.output`); every node keeps its recent log records
(``get_logs``, :mod:`distributed.logs`).

Tasks come two ways: the rpc ``compute`` (a function and the keys it needs;
the answer is the reply) and the scheduler's batched ``compute-task``
messages (the answer is a ``task-finished`` / ``task-erred`` /
``missing-data`` message).  Both fetch what is missing with
:meth:`Worker._fetch`.  A task of the scheduler is a :class:`TaskState` in
``Worker.tasks`` until it is done (see docs/internals.md for its states).

Memory limit
------------
With ``memory_limit`` (bytes) set, ``data`` is a
:class:`~distributed.spill.SpillBuffer` and a monitor thread samples the
process's RSS every ``memory_monitor_interval`` seconds
(:mod:`distributed.worker_memory`, ``Worker.memory``):

* above ``memory_target_fraction`` (0.6) of the limit, least recently used
  values are spilled to ``local_dir`` (by a thread of their own; so too
  when the values held, by ``sizeof``, exceed that fraction); a task's
  result first makes room, in its task thread, before it is stored, so
  that producers wait for the disk;
* above ``memory_pause_fraction`` (0.8) the worker is ``paused``: it starts
  no new task (they wait, in order, and start once memory is below that
  fraction again), unless the disk fails (full): then results that do not
  fit fail with ``MemoryError``;
* above ``memory_terminate_fraction`` (0.95) the process exits with status
  :data:`MEMORY_EXIT_CODE` (75), which its nanny reports as "memory limit
  exceeded" before starting a fresh worker; first it tells the center
  whether its data or its running tasks were to blame (:data:`MEMORY_BLAME`).

The fractions default to the environment variables
``DISTRIBUTED_MEMORY_TARGET``, ``DISTRIBUTED_MEMORY_PAUSE`` and
``DISTRIBUTED_MEMORY_TERMINATE`` when set; ``0`` (or ``False``) turns a stage
off.  Spilled values are read back (in a thread, not on the event loop) when
a peer asks for them or a task needs them.
"""

import asyncio
import concurrent.futures
import functools
import heapq
import importlib
import inspect
import itertools
import logging
import os
import random  # noqa: F401 (tests fix the transfers' choice of holder through it)
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections import ChainMap

import psutil
from tornado import gen
from tornado.ioloop import IOLoop, PeriodicCallback

from tornado.iostream import StreamClosedError

from . import output
from .batched import BatchedSend, handle_batches
from .core import (
    AuthenticationError,
    ConnectionPool,
    RemoteException,
    Server,
    TLSError,
    coerce_to_address,
    connect,
    error_message,
    rpc,
    safe_str,
    write,
)
from .graph import execute_task, substitute, substitute_refs
from .protocol import from_blob, to_blob
from .sizeof import sizeof
from .transfer import (  # noqa: F401 (importable from here, as they always were)
    CONNECTION_ERRORS,
    TRANSFER_TIMEOUT,
    GatherResult,
    Transfers,
    _first_bytes,
    gather_from_workers,
)
from .utils import funcname, get_ip, new_id, parse_address
from .worker_memory import (  # noqa: F401 (importable from here, as they always were)
    MEMORY_BLAME,
    MEMORY_EXIT_CODE,
    MEMORY_MONITOR_INTERVAL,
    MEMORY_PAUSE_FRACTION,
    MEMORY_TARGET_FRACTION,
    MEMORY_TERMINATE_FRACTION,
    MMAP_THRESHOLD,
    WorkerMemoryManager,
    _format_bytes,
    _this_process,
)

logger = logging.getLogger(__name__)

__all__ = ["Worker", "gather_from_workers", "MEMORY_EXIT_CODE", "MEMORY_BLAME",
           "get_worker", "secede", "rejoin"]

#: in a task's thread: ``.worker``, the Worker running it (see get_worker)
thread_state = threading.local()
#: the workers of this process
_workers = weakref.WeakSet()

#: seconds between heartbeats to the center
HEARTBEAT_INTERVAL = 1.0
#: seconds a worker keeps trying to reach the center when it starts
CONNECT_RETRY_TIMEOUT = 30
#: seconds a worker that lost its center keeps trying to reach it again,
#: unless its ``death_timeout`` says otherwise (``dworker --death-timeout``)
RECONNECT_TIMEOUT = 3600
#: exit status of a ``dworker`` process whose worker could not reach its
#: center for ``--death-timeout`` seconds: its nanny does not restart it
DEATH_TIMEOUT_EXIT_CODE = 76
#: exit status of a worker process under a nanny that retired after its
#: ``--lifetime``: the nanny does not restart it (and exits with status 0)
RETIRED_EXIT_CODE = 78
#: seconds to hand one peer one batch of a retiring worker's data
HANDOFF_TIMEOUT = 60
#: bytes of data in one message of a retiring worker's hand-off, at most
#: (a single larger value goes alone)
HANDOFF_BATCH_BYTES = 64 * 2**20
#: results up to this many bytes are sent with the task-finished message
SMALL_RESULT = 1024

#: the states of a task the scheduler gave this worker (``TaskState.state``)
PAUSED = "paused"        # held back while the worker is paused
FETCHING = "fetching"    # its missing inputs are being fetched from peers
EXECUTING = "executing"  # reading back its spilled inputs, or running
RELEASED = "released"    # the scheduler no longer wants it: it runs to its end, unreported

#: the allowed moves between them; a task enters in PAUSED, FETCHING or
#: EXECUTING and leaves ``Worker.tasks`` when done, erred, missing inputs
#: or released (then once its work is over)
TRANSITIONS = {
    (PAUSED, FETCHING), (PAUSED, EXECUTING),
    (FETCHING, PAUSED), (FETCHING, EXECUTING),
    (PAUSED, RELEASED), (FETCHING, RELEASED), (EXECUTING, RELEASED),
}


class TaskState:
    """A task the scheduler gave this worker, until it is done.

    >>> ts = TaskState('x', {'function': b'...'}, {'y': ['127.0.0.1:40001']})
    >>> ts
    <TaskState 'x' new>
    >>> ts.transition(FETCHING); ts.transition(EXECUTING); ts.state
    'executing'
    >>> ts.transition(RELEASED); ts.transition(EXECUTING); ts.state  # stays released
    'released'

    ``spec`` is the scheduler's message (``function``/``args``/``kwargs`` or
    ``task`` blobs), ``who_has`` its inputs' holders, ``deps`` its inputs.
    """

    __slots__ = ("key", "spec", "who_has", "deps", "state", "transfer", "priority")

    def __init__(self, key, spec, who_has=None, priority=None):
        self.key = key
        self.spec = spec
        self.who_has = who_has or {}
        self.deps = list(self.who_has)
        self.state = None
        self.transfer = None  # (start, stop) of fetching its inputs
        #: the scheduler's (lowest first): the order ready tasks take threads
        self.priority = (() if priority is None else tuple(priority)
                         if isinstance(priority, (list, tuple)) else (priority,))

    def transition(self, state):
        """Move to ``state``; a released task stays released (its work goes
        on to its end, and its result is dropped)."""
        if self.state == RELEASED:
            return
        assert self.state is None or (self.state, state) in TRANSITIONS, (self, state)
        self.state = state

    def __repr__(self):
        return "<TaskState %r %s>" % (self.key, self.state or "new")


class _MemoryAttribute:
    """``worker.<name>`` is ``worker.memory.<attr>``: the names these had on
    the worker before :class:`WorkerMemoryManager` (tests and tools use them)."""

    def __init__(self, attr):
        self.attr = attr

    def __get__(self, worker, owner=None):
        return self if worker is None else getattr(worker.memory, self.attr)

    def __set__(self, worker, value):
        setattr(worker.memory, self.attr, value)


class Worker(Server):
    """A worker node (see the module docstring).

    Attributes: ``data`` (``{key: value}``, a SpillBuffer with a memory
    limit), ``nbytes`` (``{key: sizeof}``), ``tasks`` (``{key: TaskState}``
    of the scheduler's tasks not done), ``active`` (keys computing now),
    ``memory`` (the :class:`WorkerMemoryManager`), ``transfers`` (inputs
    under way from peers), ``ncores``, ``executor`` (thread pool),
    ``local_dir``, ``center`` (an rpc), ``name``,
    ``services``/``service_ports``, ``ip``/``port``/``address``.
    """

    # the memory state under the names it had on the worker
    memory_limit = _MemoryAttribute("limit")
    memory_target_fraction = _MemoryAttribute("target_fraction")
    memory_pause_fraction = _MemoryAttribute("pause_fraction")
    memory_terminate_fraction = _MemoryAttribute("terminate_fraction")
    memory_monitor_interval = _MemoryAttribute("monitor_interval")
    memory_rss = _MemoryAttribute("rss_sample")
    paused = _MemoryAttribute("paused")
    _paused_tasks = _MemoryAttribute("paused_tasks")
    _memory_thread = _MemoryAttribute("thread")
    _rss = _MemoryAttribute("rss")  # the RSS sampler: tests replace it
    _memory_terminate = _MemoryAttribute("terminate")  # the exit: tests replace it

    def __init__(self, center_ip, center_port=None, ip=None, ncores=None, loop=None,
                 local_dir=None, services=None, service_ports=None, name=None,
                 heartbeat_interval=HEARTBEAT_INTERVAL, memory_limit=None,
                 nanny=None, memory_target_fraction=None, memory_pause_fraction=None,
                 memory_terminate_fraction=None,
                 memory_monitor_interval=MEMORY_MONITOR_INTERVAL, resources=None,
                 death_timeout=None, lifetime=None, lifetime_stagger=0, **kwargs):
        if center_port is None:
            center_ip, center_port = parse_address(coerce_to_address(center_ip))
        self.loop = loop or IOLoop.current()
        self.ncores = ncores or os.cpu_count() or 1
        #: ``{name: amount}`` this worker has: tasks submitted with
        #: ``resources={'GPU': 1}`` run only where theirs are free
        self.resources = dict(resources or {})
        self.name = name
        self.data = {}
        self.nbytes = {}
        self.active = set()
        # spilling, pausing and the memory exit (see distributed.worker_memory)
        self.memory = WorkerMemoryManager(
            self, memory_limit, memory_target_fraction, memory_pause_fraction,
            memory_terminate_fraction, memory_monitor_interval)
        self.nanny = nanny
        self.heartbeat_interval = heartbeat_interval
        #: seconds without the center (once registered) before the worker closes
        self.death_timeout = death_timeout
        #: seconds after registering before the worker retires (see :meth:`retire`),
        #: give or take ``lifetime_stagger``
        self.lifetime = lifetime
        self.lifetime_stagger = lifetime_stagger or 0
        self._lifetime_timer = None
        #: why the worker closed on its own: ``'death-timeout'``, ``'lifetime'``
        self.close_reason = None
        self.executor = concurrent.futures.ThreadPoolExecutor(
            self.ncores, thread_name_prefix="distributed-worker"
        )
        self._secede_lock = threading.Lock()
        # tasks ready to run, best first: a thread of the pool takes the
        # first when it is free (submit(..., priority=) orders them)
        self._ready = []
        self._ready_lock = threading.Lock()
        self._ready_seq = itertools.count()
        _workers.add(self)
        #: the Executor of :func:`distributed.get_executor` in its tasks
        self.client = None
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        self.local_dir = tempfile.mkdtemp(prefix="worker-", dir=local_dir)
        self.data = self.memory.make_data(self.local_dir)
        self.pool = ConnectionPool(security=kwargs.get("security"))
        self.center = rpc(ip=center_ip, port=center_port, pool=self.pool)
        self.service_classes = services or {}
        self.service_ports = dict(service_ports or {})
        self.services = {}
        self.status = "created"
        self.batched = None  # batches to the center on the registration stream
        self.tasks = {}  # key -> TaskState of the scheduler's tasks, until done
        self.transfers = Transfers(self.rpc_for)  # inputs under way from peers
        self._unconfirmed = set()  # scattered keys the scheduler has not confirmed
        self._heartbeats = None
        # key -> TaskOutput: what the running tasks of the scheduler print,
        # sent every OUTPUT_FLUSH_INTERVAL seconds and when they end
        self._outputs = {}
        self._output_flush = PeriodicCallback(self._flush_output,
                                              output.OUTPUT_FLUSH_INTERVAL * 1000)
        self._capturing = False
        handlers = {
            "compute": self.compute,
            "gather": self.gather,
            "get_data": self.get_data,
            "update_data": self.update_data,
            "delete_data": self.delete_data,
            "run": self.run,
            "health": self.health,
            "upload_file": self.upload_file,
            "terminate": self.terminate,
            "retire": self.retire_handler,
            "keys": self.get_keys,
        }
        #: ops of the batched stream from the center (see
        #: :func:`~distributed.batched.handle_batches`)
        self.stream_handlers = {
            "compute-task": self._compute_task,
            "delete-data": self._delete_data,
            "confirm-data": self._confirm_data,
            "worker-removed": self._worker_removed,
        }
        if ip is None:
            ip = get_ip(center_ip)
        super().__init__(handlers, ip=ip, **kwargs)

    # -- life cycle ----------------------------------------------------------

    def identity(self, stream=None):
        return {
            "type": type(self).__name__,
            "id": self.id,
            "center": (self.center.ip, self.center.port),
            "ncores": self.ncores,
            "name": self.name,
            "resources": self.resources,
        }

    @gen.coroutine
    def _start(self, port=0, timeout=CONNECT_RETRY_TIMEOUT):
        """Listen, start services and register with the center.

        Retries until the center answers; raises ``TimeoutError`` naming the
        center after ``timeout`` seconds.
        """
        if self.port is None:
            self.listen(port)
        for name, cls in self.service_classes.items():
            service = cls(self)
            service.listen(self.service_ports.get(name, 0))
            self.services[name] = service
            self.service_ports[name] = service.port
        yield self._register(timeout, read=False)
        self._heartbeats = PeriodicCallback(
            self._heartbeat, self.heartbeat_interval * 1000
        )
        self._heartbeats.start()
        if not self._capturing:
            output.install()
            self._capturing = True
        self._output_flush.start()
        self.status = "running"
        self._heartbeat()  # the center knows its metrics at once
        self.memory.start()
        if self.lifetime is not None and self._lifetime_timer is None:
            delay = max(0, self.lifetime + random.uniform(-self.lifetime_stagger,
                                                          self.lifetime_stagger))
            self._lifetime_timer = self.loop.call_later(
                delay, lambda: self.loop.spawn_callback(self.retire, "lifetime"))
        logger.info("worker at %s registered with center at %s",
                    self.address, self.center.address)
        # tasks are read from the next loop turn on: whoever awaits this resumes
        # first (its wake-up is queued before the read's first step) and
        # announces the worker ("Registered with center", which a LocalCluster
        # or a nanny waits for) before a task that kills its worker can run
        self.loop.add_callback(self._read_center_stream, self.batched.stream)
        return self

    def __await__(self):
        return self._start().__await__()

    @gen.coroutine
    def _register(self, timeout=CONNECT_RETRY_TIMEOUT, read=True):
        """Open the heartbeat stream to the center and register on it; with
        ``read``, start reading the center's messages on it."""
        deadline = time.time() + timeout
        delay = 0.05
        while True:
            try:
                stream = yield connect(self.center.ip, self.center.port,
                                       timeout=max(0.1, min(5, deadline - time.time())),
                                       security=self.security)
                hb = rpc(stream)
                yield hb.register(
                    address=self.address,
                    ncores=self.ncores,
                    keys=list(self.data),
                    nbytes=dict(self.nbytes),
                    services=self.service_ports,
                    name=self.name,
                    nanny=self.nanny,
                    resources=self.resources or None,
                    timeout=max(1, deadline - time.time()),
                )
            except (AuthenticationError, TLSError):
                raise  # retrying cannot help: the tokens or certificates do not match
            except (OSError, TimeoutError, StreamClosedError) as e:
                remaining = deadline - time.time()
                if remaining <= 0:  # tried for the whole timeout, not a retry less
                    raise TimeoutError(
                        "worker %s could not register with the center at %s within "
                        "%s s: %s" % (self.address, self.center.address, timeout, e)
                    ) from None
                yield gen.sleep(min(delay, remaining))
                delay = min(delay * 2, 1)
                continue
            if self.batched is not None:
                self.batched.abort()
            # from now on the stream carries batches both ways
            yield write(stream, {"op": "worker-stream", "address": self.address,
                                 "reply": False})
            self.batched = BatchedSend(stream, self.loop)
            if read:
                self.loop.add_callback(self._read_center_stream, stream)
            return

    def _heartbeat(self):
        if self.status == "running" and self.batched is not None and not self.batched.closed:
            self.batched.send({"op": "heartbeat", **self.metrics()})

    def metrics(self):
        """What each heartbeat tells the center (its dashboard shows them):
        CPU, keys held, tasks executing, and :meth:`memory_state`."""
        process = _this_process()
        metrics = {"time": time.time(), "cpu": process.cpu_percent(interval=None),
                   "nkeys": len(self.data), "executing": len(self.active),
                   **self.memory_state()}
        if metrics["memory_rss"] is None:  # no memory monitor: measure it now
            metrics["memory_rss"] = process.memory_info().rss
        return metrics

    @gen.coroutine
    def _read_center_stream(self, stream):
        yield handle_batches(stream, self.stream_handlers, limits=self.limits,
                             sender="the center at %s" % self.center.address)
        stream.close()
        if self.status == "running" and self.batched is not None \
                and self.batched.stream is stream:
            logger.warning("lost the center at %s; reconnecting", self.center.address)
            self.status = "reconnecting"
            timeout = (RECONNECT_TIMEOUT if self.death_timeout is None
                       else self.death_timeout)
            try:
                yield self._register(timeout=timeout)
            except Exception as e:
                if self.death_timeout is None:
                    logger.exception("could not reconnect to the center")
                elif self.status == "reconnecting":
                    logger.error("could not reach the center at %s again within %g s "
                                 "(death timeout): closing. %s", self.center.address,
                                 self.death_timeout, e)
                    self.close_reason = "death-timeout"
                    yield self._close(report=False)
            finally:
                if self.status == "reconnecting":
                    self.status = "running"

    @gen.coroutine
    def _close(self, report=True, timeout=5):
        """Unregister from the center and stop."""
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        if self._lifetime_timer is not None:
            self.loop.remove_timeout(self._lifetime_timer)
        self.memory.stop()  # compute requests waiting for a resume go on (and fail)
        if self._heartbeats is not None:
            self._heartbeats.stop()
        self._output_flush.stop()
        if self._capturing:
            self._capturing = False
            output.uninstall()
        if report and self.port is not None:
            try:
                yield self.center.unregister(address=self.address, timeout=timeout)
            except Exception as e:
                logger.info("could not unregister from the center: %s", e)
        if self.batched is not None:
            self.batched.abort()
        for service in self.services.values():
            service.stop()
        self.stop()
        self.pool.close()
        if self.client is not None:  # tasks' get_executor(): its own loop thread
            threading.Thread(target=self.client.shutdown, kwargs={"timeout": 2},
                             daemon=True).start()
        self.executor.shutdown(wait=False)
        self.memory.close()
        shutil.rmtree(self.local_dir, ignore_errors=True)
        self.status = "closed"

    def terminate(self, stream=None, report=True):
        self.loop.spawn_callback(self._close, report=report)
        return b"OK"

    @gen.coroutine
    def retire(self, reason="retired", exclude=()):
        """Hand the data to the peers, unregister and close.

        The keys are spread over the other workers the center knows but
        ``exclude`` (addresses leaving too); each peer tells the center it
        holds its share, so nothing is lost when this worker leaves.  With no
        peer they are lost, and recomputed if still wanted.  A result that
        lands during the hand-off is recomputed elsewhere too.  ``dworker
        --lifetime`` calls it; the ``retire`` rpc (:meth:`retire_handler`)
        asks for it from elsewhere.

        ::

            await worker.retire()   # returns once closed
        """
        if self.status != "running":
            return
        try:
            yield self._hand_off(reason, exclude)
        except Exception as e:
            logger.warning("could not hand all data over before retiring: %s", e)
        yield self._close(report=True)

    @gen.coroutine
    def retire_handler(self, stream=None, reason="retired", exclude=()):
        """rpc ``retire``: hand the data to the peers but ``exclude``, reply
        ``(b'OK', {'keys': n})`` (the keys handed over), then unregister and
        close; under a nanny the process exits for good (not restarted).  A
        failed hand-off replies ``(b'error', {'error': text})`` and the worker
        stays.  What a cluster's scale-down uses::

            await rpc(worker_address).retire(exclude=[other_leaving_address])
        """
        if self.status != "running":
            return (b"error", {"error": "the worker is %s" % self.status})
        try:
            n = yield self._hand_off(reason, exclude)
        except Exception as e:
            self.close_reason = None
            return (b"error", {"error": "%s: %s" % (type(e).__name__, e)})
        self.loop.spawn_callback(self._close, report=True)
        return (b"OK", {"keys": n})

    @gen.coroutine
    def _hand_off(self, reason, exclude=()):
        """Copy every key to one of the other workers but ``exclude``, round
        robin; return how many keys went."""
        self.close_reason = reason
        keys = list(self.data)
        logger.info("worker %s retiring (%s): handing %d keys to its peers",
                    self.address, reason, len(keys))
        if not keys:
            return 0
        ncores = yield self.center.ncores(timeout=10)
        exclude = {coerce_to_address(a) for a in exclude} | {self.address}
        peers = sorted(a for a in ncores if a not in exclude)
        if not peers:
            logger.warning("no other worker to hand %d keys to", len(keys))
            return 0
        for i, peer in enumerate(peers):
            for batch in _batches(keys[i::len(peers)], self.nbytes, HANDOFF_BATCH_BYTES):
                values = self.get_data(keys=batch)
                if inspect.isawaitable(values):  # some were spilled: read from disk
                    values = yield values
                yield self.rpc_for(peer).update_data(data=values, report=True,
                                                     timeout=HANDOFF_TIMEOUT)
        return len(keys)

    # -- data ----------------------------------------------------------------

    def put_key(self, key, value):
        n = sizeof(value)
        data = self.data
        if type(data) is dict:
            data[key] = value
        else:
            data.put(key, value, n)
            if data.memory_bytes > data.target:
                self.memory.request_spill()
        self.nbytes[key] = n
        return n

    def _discard(self, key):
        try:
            del self.data[key]
        except KeyError:
            pass

    def get_data(self, stream=None, keys=()):
        data = self.data
        if type(data) is dict:
            values = {k: data[k] for k in keys if k in data}
            if len(values) < len(keys):
                self._report_missing([k for k in keys if k not in values])
            return values
        self._report_missing([k for k in keys if k not in data])
        values, spilled = self.memory.in_memory(keys)
        if spilled:
            return self.memory.read_for_peer(values, spilled)
        return values

    def _report_missing(self, keys):
        """Asked for ``keys`` we do not hold: the center may list us as their
        holder (deleted behind its back); it corrects itself, and recomputes
        them if nobody else holds them."""
        if keys:
            self._send({"op": "missing-keys", "keys": keys})

    def get_keys(self, stream=None):
        return list(self.data)

    @gen.coroutine
    def update_data(self, stream=None, data=None, report=True):
        data = data or {}
        nbytes = {k: self.put_key(k, v) for k, v in data.items()}
        if not report:
            # scattered by an executor, which tells the scheduler; until the
            # scheduler confirms, a delete of the same key sent earlier must
            # not drop this newer copy
            self._unconfirmed.update(nbytes)
        if report and nbytes:
            yield self.center.add_keys(address=self.address, keys=list(data),
                                       nbytes=nbytes)
        return b"OK", {"nbytes": nbytes}

    @gen.coroutine
    def delete_data(self, stream=None, keys=(), report=True):
        keys = [k for k in keys if k in self.data]
        for key in keys:
            self._discard(key)
            self.nbytes.pop(key, None)
        if report and keys:
            yield self.center.remove_keys(address=self.address, keys=keys)
        return b"OK"

    def rpc_for(self, address):
        return rpc(address, pool=self.pool)

    # -- fetching from peers -----------------------------------------------------

    @gen.coroutine
    def _fetch(self, who_has, report=None, keep=True):
        """Fetch the keys of ``who_has`` (``{key: [address, ...]}``) from those
        peers, store those not here yet and report them to the center: the
        one way this worker brings data in (``gather``, ``compute`` and the
        scheduler's tasks).  A key already under way (for another task)
        joins that transfer instead of starting a second one.

        ``report`` is ``None`` (do not), ``'rpc'`` (``add_keys``, awaited:
        the center knows before this returns) or ``'stream'`` (``add-keys``
        on the batched stream, ahead of what the worker sends next).

        Returns ``GatherResult(data, missing, bad, errors)``: ``data`` is
        ``{key: nbytes}`` of the keys of ``who_has`` that came, ``missing``
        the keys that did not (those of ``errors`` too), ``bad`` the peers
        that could not be reached and ``errors`` ``{key: exception}`` of
        holders that answered with an error.  ``keep=False``: nothing is
        stored nor reported, and ``data`` is ``{key: value}`` (the inputs of
        an rpc ``compute``, used once).
        """
        futures = self.transfers.start(who_has)
        got, bad, errors = set(), set(), {}
        values = {}
        for future in futures:
            try:
                result = yield future
            except Exception:
                logger.exception("transfer of %s failed", sorted(who_has, key=str)[:5])
                continue
            bad.update(result.bad)
            errors.update(result.errors)
            got.update(result.data)
            if not keep:
                values.update((k, v) for k, v in result.data.items() if k in who_has)
                continue
            new = {k: self.put_key(k, v) for k, v in result.data.items()
                   if k not in self.data}
            if new and report == "stream":
                self._send({"op": "add-keys", "keys": list(new), "nbytes": new})
        self.transfers.finished(futures)
        if not keep:
            return GatherResult(values, {k for k in who_has if k not in got}, bad, errors)
        nbytes = {k: self.nbytes[k] for k in who_has if k in got and k in self.nbytes}
        if report == "rpc" and nbytes:
            yield self.center.add_keys(address=self.address, keys=list(nbytes),
                                       nbytes=nbytes)
        missing = {k for k in who_has if k not in got}
        return GatherResult(nbytes, missing, bad, errors)

    @gen.coroutine
    def gather(self, stream=None, who_has=None, report=True):
        """Fetch the keys of ``who_has`` from peers into ``data``."""
        who_has = {k: v for k, v in (who_has or {}).items() if k not in self.data}
        result = yield self._fetch(who_has, "rpc" if report else None)
        if result.missing:
            return b"missing-data", {"keys": sorted(result.missing, key=str)}
        return b"OK", {"nbytes": result.data}

    @gen.coroutine
    def _fetch_inputs(self, needed, who_has=None):
        """The keys of ``needed`` that are not local, fetched from their
        holders (``who_has`` where it names some, else the center's), not
        stored: ``({key: value}, missing keys)``."""
        missing = [k for k in needed if k not in self.data]
        if not missing:
            return {}, set()
        who_has = dict(who_has or {})
        unknown = [k for k in missing if not who_has.get(k)]
        if unknown:
            found = yield self.center.who_has(keys=unknown)
            who_has.update(found)
        locs = {k: [a for a in who_has.get(k, ()) if a != self.address] for k in missing}
        result = yield self._fetch(locs, keep=False)
        return result.data, result.missing

    # -- compute ---------------------------------------------------------------

    @gen.coroutine
    def compute(self, stream=None, function=None, key=None, args=(), kwargs=None,
                keys=None, needed=None, who_has=None, report=True):
        """Run ``function(*args, **kwargs)`` on local and fetched data.

        Returns ``(b'OK', metadata)``, ``(b'error', {'exception', 'traceback'})``
        or ``(b'missing-data', {'keys': [...]})``.
        """
        if function is None or not callable(function):
            raise TypeError("compute needs function=<a callable>, got %r" % (function,))
        if key is None:
            key = "%s-%s" % (funcname(function), new_id())
        needed_keys = list(keys or ()) + list(needed or ()) + list(who_has or ())
        if keys and not args:
            args = tuple(keys)
        start = time.time()
        while self.paused:  # over the memory pause threshold: fetch nothing either
            yield self.memory.unpaused.wait()
        # inputs from peers are used for this call only: the center lists
        # what a worker was given or computed, not what it borrowed
        fetched, lost = yield self._fetch_inputs(needed_keys, who_has)
        if lost:
            return b"missing-data", {"keys": sorted(lost, key=str)}
        while self.paused:
            yield self.memory.unpaused.wait()
        local = [k for k in needed_keys if k not in fetched]
        values, spilled = self.memory.in_memory(local)
        if spilled:
            values.update((yield self.memory.unspill(spilled)))
            lost = [k for k in spilled if k not in values]
            if lost:  # deleted meanwhile
                return b"missing-data", {"keys": sorted(lost, key=str)}
        if fetched:
            values = ChainMap(fetched, values)
        transfer_stop = time.time()
        keyset = set(needed_keys)
        args2 = substitute(tuple(args), values, keyset)
        kwargs2 = substitute(dict(kwargs or {}), values, keyset)
        self.active.add(key)
        try:
            ok, result, timings = yield self.executor.submit(
                self._run_within_memory, function, args2, kwargs2
            )
        finally:
            self.active.discard(key)
        if not ok:
            msg = error_message(*result)
            return b"error", {"exception": msg["exception"],
                              "traceback": msg["traceback"], "text": msg["text"]}
        n = self.put_key(key, result)
        if report:
            yield self.center.add_keys(address=self.address, keys=[key],
                                       nbytes={key: n})
        meta = {
            "nbytes": n,
            "key": key,
            "type": type(result).__name__,
            "transfer_start": start,
            "transfer_stop": transfer_stop,
        }
        meta.update(timings)
        return b"OK", meta

    def _run_within_memory(self, function, args, kwargs):
        """In a task thread: :func:`_run_function`, with room made in memory
        before it and for its result after it (see
        :meth:`WorkerMemoryManager.room_for`): a result that can be neither
        kept nor spilled fails the task with ``MemoryError``.  The task can
        find its worker with :func:`get_worker`."""
        thread_state.worker = self
        thread_state.seceded = 0
        if type(self.data) is dict:
            return _run_function(function, args, kwargs)
        memory = self.memory
        memory.before_task()
        ok, result, timings = _run_function(function, args, kwargs)
        if ok:
            error = memory.room_for(sizeof(result))
            if error is not None:  # the result is dropped: nothing keeps it
                ok, result = False, (error, error.__traceback__)
        return ok, result, timings

    # -- task threads that wait (a task submitting tasks) ----------------------

    def secede(self):
        """A task thread is about to wait (for tasks it submitted): let one
        more thread run tasks meanwhile, so that what it waits for can run
        (a 1-thread worker would deadlock otherwise).  :meth:`rejoin` when
        done waiting.  Threads beyond ``ncores`` stay idle in the pool and
        serve the next seceding task: at most ``ncores`` + the tasks
        waiting at once."""
        with self._secede_lock:
            pool = self.executor
            pool._max_workers += 1
            # the pool counts finished tasks as idle threads (its semaphore can
            # say "idle" while its only thread runs this task): forget that
            # count, so that it starts a thread unless it has max_workers
            while pool._idle_semaphore.acquire(timeout=0):
                pass
            pool._adjust_thread_count()

    def rejoin(self):
        """The waiting task thread runs again: back to ``ncores`` slots (the
        thread started for it runs no new task while it is busy)."""
        with self._secede_lock:
            self.executor._max_workers -= 1

    # -- tasks from the scheduler ------------------------------------------------
    #
    # compute-task -> (paused) -> (fetching) -> executing -> task-finished /
    # task-erred / missing-data; delete-data releases it (see TaskState).

    def _compute_task(self, key=None, spec=None, who_has=None, nbytes=None,
                      priority=None):
        if key in self.tasks:
            return
        if key in self.data:
            self._send_finished(key, None)
            return
        ts = self.tasks[key] = TaskState(key, spec, who_has, priority)
        if self.paused:  # nothing starts (nor is fetched) until memory is lower
            self._hold(ts, self._start_task)
            return
        self._start_task(ts)

    def _hold(self, ts, step):
        """While paused: ``step(ts)`` once the worker resumes, if still wanted."""
        ts.transition(PAUSED)
        self.memory.hold(ts.key, functools.partial(self._resume, ts, step))

    def _resume(self, ts, step):
        if self.tasks.get(ts.key) is not ts:
            return  # deleted, or done, meanwhile
        if ts.state == RELEASED:
            del self.tasks[ts.key]  # its work ends here
            return
        step(ts)

    def _start_task(self, ts):
        missing = {d: ts.who_has[d] for d in ts.deps if d not in self.data}
        if not missing:
            self._run_task(ts)
            return
        ts.transition(FETCHING)
        # listed as ours but not here: say so before the missing-data below
        self._report_missing([k for k, v in missing.items() if self.address in v])
        self.loop.spawn_callback(self._fetch_and_run, ts, missing)

    @gen.coroutine
    def _fetch_and_run(self, ts, missing):
        key = ts.key
        start = time.time()
        result = yield self._fetch(
            {k: [a for a in v if a != self.address] for k, v in missing.items()},
            report="stream")
        ts.transfer = (start, time.time())
        if self.tasks.get(key) is not ts:
            return  # erred or forgotten meanwhile
        failed = [d for d in ts.deps if d in result.errors and d not in self.data]
        if failed:
            # the holder has it but cannot hand it over: retrying will not help
            dep = failed[0]
            exc = result.errors[dep]
            try:
                raise type(exc)("could not fetch the input %r of %r: %s"
                                % (dep, key, exc)) from exc
            except Exception as e:
                self._send_erred(key, e, e.__traceback__)
            return
        lost = [d for d in ts.deps if d not in self.data]
        if lost:
            del self.tasks[key]
            self._send({"op": "missing-data", "key": key, "missing": lost,
                        "bad_workers": list(result.bad)})
            return
        self._run_task(ts)

    def _run_task(self, ts):
        if self.paused:
            self._hold(ts, self._run_task)
            return
        ts.transition(EXECUTING)
        values, spilled = self.memory.in_memory(ts.deps)
        if spilled:
            self.loop.spawn_callback(self._unspill_and_run, ts, values, spilled)
            return
        self._submit_task(ts, values)

    async def _unspill_and_run(self, ts, values, spilled):
        """Read the spilled inputs back in a thread, then run the task."""
        key = ts.key
        try:
            values.update(await self.memory.unspill(spilled))
        except Exception as e:
            logger.exception("could not read back the spilled inputs of %r", key)
            if self.tasks.get(key) is ts:
                if ts.state == RELEASED:
                    del self.tasks[key]
                else:
                    self._send_erred(key, e, e.__traceback__)
            return
        if self.tasks.get(key) is not ts:
            return
        if ts.state == RELEASED:
            del self.tasks[key]
            return
        lost = [d for d in spilled if d not in values]
        if lost:  # deleted meanwhile
            del self.tasks[key]
            self._send({"op": "missing-data", "key": key, "missing": lost,
                        "bad_workers": []})
            return
        self._submit_task(ts, values)

    def _submit_task(self, ts, values):
        key = ts.key
        try:
            function, args, kwargs = self._unpack(ts.spec, ts.deps, values)
        except Exception as e:
            self._send_erred(key, e, e.__traceback__)
            return
        self.active.add(key)
        out = self._outputs[key] = output.TaskOutput()
        with self._ready_lock:
            heapq.heappush(self._ready, (ts.priority, next(self._ready_seq), key,
                                         function, args, kwargs, out))
        # one run of the pool per ready task: it takes the best one then
        future = self.executor.submit(self._run_next)
        future.add_done_callback(lambda f: self.loop.add_callback(self._next_done, f))

    def _run_next(self):
        """In a task thread: run the best ready task; ``(key, outcome)``."""
        with self._ready_lock:
            _, _, key, function, args, kwargs, out = heapq.heappop(self._ready)
        return key, self._run_captured(out, function, args, kwargs)

    def _next_done(self, future):
        key, outcome = future.result()
        self._task_outcome(key, outcome)

    def _run_captured(self, out, function, args, kwargs):
        """In a task thread: :meth:`_run_within_memory`, what it prints going to
        ``out`` (see distributed.output)."""
        with output.capture(out):
            return self._run_within_memory(function, args, kwargs)

    def _flush_output(self):
        """Send what the running tasks printed since the last time."""
        for key, out in list(self._outputs.items()):
            self._send_output(key, out.take())

    def _send_output(self, key, chunks):
        for stream, text in chunks:
            if self.batched is not None:
                # dropped rather than queued behind a center that reads slowly
                self.batched.offer({"op": "task-output", "key": key, "stream": stream,
                                    "text": text}, output.OUTPUT_QUEUE_LIMIT)

    def _unpack(self, spec, deps, data):
        if "task" in spec:
            task = from_blob(spec["task"])
            return execute_task, (task, {d: data[d] for d in deps}), {}
        function = _load_function(spec["function"])
        args = from_blob(spec["args"]) if spec.get("args") else ()
        kwargs = from_blob(spec["kwargs"]) if spec.get("kwargs") else {}
        if deps:
            args = substitute_refs(args, data)
            kwargs = substitute_refs(kwargs, data)
        return function, args, kwargs

    def _task_done(self, key, future):
        self._task_outcome(key, future.result())

    def _task_outcome(self, key, outcome):
        self.active.discard(key)
        ok, result, timings = outcome
        out = self._outputs.pop(key, None)
        ts = self.tasks.pop(key, None)
        if ts is None or ts.state == RELEASED:
            return  # released while running; the result is not wanted
        if out is not None:  # what it printed, before its result
            self._send_output(key, out.take(final=True))
        if ok:
            self.put_key(key, result)
            self._send_finished(key, (timings["compute_start"], timings["compute_stop"]),
                                thread=timings["thread"], transfer=ts.transfer)
        else:
            self._send_erred(key, *result)

    def _send_finished(self, key, startstops, thread=None, transfer=None):
        values, spilled = self.memory.in_memory([key])
        nbytes = self.nbytes[key]
        if spilled:  # not read back for this: no value rides along
            value = None
            try:
                type_name = self.data.slow.type_name(key)
            except KeyError:  # read back meanwhile
                type_name = type(self.data.fast.get(key)).__name__
        else:
            value = values[key]
            type_name = type(value).__name__
        msg = {"op": "task-finished", "key": key, "nbytes": nbytes,
               "type": type_name, "startstops": startstops}
        if thread is not None:
            msg["thread"] = thread
        if transfer is not None:
            msg["transfer"] = transfer
        if nbytes <= SMALL_RESULT and not spilled:
            # small results ride along to the executor: no fetch round trip
            try:
                blob = to_blob(value)
            except Exception:
                blob = None
            if blob is not None and len(blob) <= 2 * SMALL_RESULT:
                msg["value"] = blob
        self._send(msg)

    def _send_erred(self, key, exc, tb):
        self.tasks.pop(key, None)
        msg = error_message(exc, tb)
        try:
            blob = to_blob(msg["exception"])
        except Exception:  # checked by error_message; a stand-in if it still fails
            blob = to_blob(RemoteException(type(exc).__name__, safe_str(exc), msg["text"]))
        self._send({"op": "task-erred", "key": key,
                    "exception": blob,
                    "traceback": _traceback_blob(msg["traceback"]),
                    "text": msg["text"]})

    def _delete_data(self, keys=(), all=False):
        paused = self.memory.paused_tasks
        if all:
            self.data.clear()
            self.nbytes.clear()
            self._unconfirmed.clear()
            for key, ts in list(self.tasks.items()):
                if key in paused:  # never started: forget it
                    del self.tasks[key]
                else:
                    ts.transition(RELEASED)
            paused.clear()
            return
        for key in keys:
            if key in self._unconfirmed:
                continue  # a newer scattered copy: see update_data
            if key in paused:  # never started: forget it
                del paused[key]
                self.tasks.pop(key, None)
            self._discard(key)  # a spilled value is not read back to be dropped
            self.nbytes.pop(key, None)
            ts = self.tasks.get(key)
            if ts is not None:
                ts.transition(RELEASED)

    def _worker_removed(self, address=None):
        self.pool.close(address)  # fails transfers waiting on it: ask others

    def _confirm_data(self, keys=()):
        self._unconfirmed.difference_update(keys)

    def _send(self, msg):
        if self.batched is not None and not self.batched.closed:
            self.batched.send(msg)

    def memory_state(self):
        """``{'memory_limit', 'memory_rss', 'memory_bytes', 'spilled_bytes',
        'spilled_keys', 'paused', ...}``: what ``health`` and /info.json show."""
        return self.memory.state()

    # -- admin -------------------------------------------------------------------

    @gen.coroutine
    def run(self, stream=None, function=None, args=(), kwargs=None):
        """Run ``function(*args, **kwargs)`` in this process; return its result."""
        if not callable(function):
            raise TypeError("run needs function=<a callable>, got %r" % (function,))
        result = function(*args, **(kwargs or {}))
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = yield result
        return result

    def health(self, stream=None):
        p = psutil.Process()
        mem = p.memory_info()
        net = psutil.net_io_counters()
        disk = psutil.disk_usage(self.local_dir)
        return {
            "time": time.time(),
            "cpu": p.cpu_percent(interval=None),
            "cpu_system": psutil.cpu_percent(interval=None),
            "memory": mem.rss,
            "memory_percent": p.memory_percent(),
            "memory_total": psutil.virtual_memory().total,
            "disk_free": disk.free,
            "disk_used": disk.used,
            "network_sent": net.bytes_sent,
            "network_recv": net.bytes_recv,
            "num_fds": p.num_fds() if hasattr(p, "num_fds") else None,
            "threads": p.num_threads(),
            **self.memory_state(),
        }

    def upload_file(self, stream=None, filename=None, data=None, load=True):
        """Save ``data`` as ``local_dir/filename`` and make it importable."""
        if not filename or os.path.basename(filename) != filename:
            raise ValueError("upload_file needs a plain file name, got %r" % (filename,))
        path = os.path.join(self.local_dir, filename)
        if isinstance(data, str):
            data = data.encode()
        with open(path, "wb") as f:
            f.write(data)
        if self.local_dir not in sys.path:
            sys.path.insert(0, self.local_dir)
        name, ext = os.path.splitext(filename)
        if ext in (".egg", ".zip", ".whl"):
            if path not in sys.path:
                sys.path.insert(0, path)
            importlib.invalidate_caches()
            return {"nbytes": len(data)}
        importlib.invalidate_caches()
        if load and ext == ".py":
            if name in sys.modules:
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
        return {"nbytes": len(data)}

    def __repr__(self):
        return "<Worker %s: %d keys, %d cores, %s>" % (
            self.address if self.port else "not listening",
            len(self.data),
            self.ncores,
            self.status,
        )


def _batches(keys, nbytes, limit):
    """``keys`` in consecutive lists of at most ``limit`` bytes (by
    ``nbytes``) each; a larger key alone.

    >>> list(_batches(['a', 'b', 'c'], {'a': 6, 'b': 5, 'c': 1}, 10))
    [['a'], ['b', 'c']]
    """
    batch, size = [], 0
    for key in keys:
        n = nbytes.get(key, 0)
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(key)
        size += n
    if batch:
        yield batch


def get_worker():
    """The :class:`Worker` running the current task (call it inside a task).

    >>> def task():
    ...     return get_worker().address
    >>> e.submit(task).result()                           # doctest: +SKIP
    '127.0.0.1:40123'

    Outside a task thread: the only worker of this process, if there is
    exactly one; else ``ValueError``.
    """
    worker = getattr(thread_state, "worker", None)
    if worker is not None:
        return worker
    running = [w for w in list(_workers) if w.status not in ("closing", "closed")]
    if len(running) == 1:
        return running[0]
    raise ValueError("get_worker() is called inside a task (no task runs in this "
                     "thread, and this process has %d workers)" % len(running))


def secede():
    """In a task: this thread waits now; the worker runs other tasks meanwhile
    (see :meth:`Worker.secede`).  Pair it with :func:`rejoin`.  A task's
    executor (:func:`distributed.get_executor`) does both around its waits."""
    worker = getattr(thread_state, "worker", None)
    if worker is None:
        raise ValueError("secede() is called inside a task")
    worker.secede()
    thread_state.seceded = getattr(thread_state, "seceded", 0) + 1


def rejoin():
    """In a task that seceded: it is back to work on one of the worker's slots."""
    worker = getattr(thread_state, "worker", None)
    if worker is None or not getattr(thread_state, "seceded", 0):
        raise ValueError("rejoin() is called inside a task that seceded")
    thread_state.seceded -= 1
    worker.rejoin()


@functools.lru_cache(maxsize=512)
def _load_function(blob):
    """Unpickle a function, once per distinct pickle (many tasks share one)."""
    return from_blob(blob)


def _traceback_blob(tb):
    try:
        return to_blob(tb)
    except Exception:
        return None


def _run_function(function, args, kwargs):
    """Run in a worker thread: ``(ok, result or (exc, tb), timings)``."""
    start = time.time()
    try:
        result = function(*args, **kwargs)
        ok = True
    except BaseException as e:  # SystemExit, CancelledError, ...: the task's error too
        result = (e, e.__traceback__.tb_next or e.__traceback__)
        ok = False
    stop = time.time()
    return ok, result, {
        "compute_start": start,
        "compute_stop": stop,
        "thread": threading.get_ident(),
    }
