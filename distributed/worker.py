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
the peer** that holds them.  Every key it gains is reported to the center.

Memory limit
------------
With ``memory_limit`` (bytes) set, ``data`` is a
:class:`~distributed.spill.SpillBuffer` and a monitor thread samples the
process's RSS every ``memory_monitor_interval`` seconds:

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
import importlib
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict, namedtuple

import psutil
from tornado import gen, locks
from tornado.ioloop import IOLoop, PeriodicCallback

from tornado.iostream import StreamClosedError

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
from .spill import SpillBuffer
from .utils import funcname, get_ip, new_id, parse_address

logger = logging.getLogger(__name__)

__all__ = ["Worker", "gather_from_workers", "MEMORY_EXIT_CODE", "MEMORY_BLAME"]

#: seconds between heartbeats to the center
HEARTBEAT_INTERVAL = 1.0
#: seconds a worker keeps trying to reach the center when it starts
CONNECT_RETRY_TIMEOUT = 30
#: seconds allowed for one transfer from a peer
TRANSFER_TIMEOUT = 300
#: results up to this many bytes are sent with the task-finished message
SMALL_RESULT = 1024

#: exit status of a worker process that went past its memory limit
#: (``EX_TEMPFAIL`` of sysexits.h; the nanny reports "memory limit exceeded")
MEMORY_EXIT_CODE = 75
#: what a worker exiting past its memory limit says about the cause (``blame``)
MEMORY_BLAME = {
    "data": "the data it held was to blame, not its running tasks",
    "tasks": "its running tasks were to blame",
}
#: fractions of ``memory_limit``: spill above, pause above, exit above
MEMORY_TARGET_FRACTION = 0.6
MEMORY_PAUSE_FRACTION = 0.8
MEMORY_TERMINATE_FRACTION = 0.95
#: seconds between two samples of the process memory
MEMORY_MONITOR_INTERVAL = 0.1


def _memory_fraction(value, env, default):
    """A fraction argument: ``None`` -> ``$env`` or ``default``; 0/False -> None (off)."""
    if value is None:
        text = os.environ.get(env, "").strip().lower()
        if not text:
            return default
        if text in ("false", "none", "off", "no"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError("%s=%r is not a fraction of the memory limit" % (env, text))
    if value is False or not value:
        return None
    value = float(value)
    if value < 0:
        raise ValueError("a memory fraction must be positive, got %r" % value)
    return value


#: a peer failing with one of these is gone (or unreachable): ask another
CONNECTION_ERRORS = (OSError, StreamClosedError, TimeoutError)


def _first_bytes(keys, nbytes, max_bytes):
    """The first of ``keys`` that add up to at most ``max_bytes`` (one at least).

    >>> _first_bytes(['a', 'b', 'c'], {'a': 4, 'b': 4, 'c': 4}, 8)
    ['a', 'b']
    >>> _first_bytes(['a', 'b'], {'a': 100}, 8)
    ['a']
    """
    total = 0
    for i, key in enumerate(keys):
        total += nbytes.get(key) or 0
        if total > max_bytes and i > 0:
            return keys[:i]
    return keys


@gen.coroutine
def gather_from_workers(who_has, rpc_for, timeout=TRANSFER_TIMEOUT, nbytes=None,
                        max_bytes=None):
    """Fetch keys from the workers that hold them.

    ``who_has`` is ``{key: [address, ...]}``; ``rpc_for(address)`` gives an
    :class:`~distributed.core.rpc`.  Keys are grouped by holder (chosen at
    random, to spread load) so that each peer is asked once.  With
    ``nbytes`` (``{key: bytes}``) and ``max_bytes``, one request asks a peer
    for at most about ``max_bytes`` (at least one key), and its other keys
    wait for the next round: a peer that spilled more than its memory can
    send it all without reading it back all at once.  A peer that
    cannot be reached is dropped and its keys are asked of the remaining
    holders; a peer that answers with an error (a value that does not
    serialize, say) gets each key asked alone, so that one bad value does
    not spoil the others.

    Returns ``GatherResult(data, missing, bad, errors)``: the values fetched,
    the keys no reachable holder had, the addresses that could not be
    reached, and ``{key: exception}`` for keys whose holder answered with an
    error.
    """
    candidates = {k: list(v) for k, v in who_has.items()}
    data, missing, bad, errors = {}, set(), set(), {}
    alone = set()  # keys to ask for one at a time
    while candidates:
        requests = []  # (address, keys)
        by_worker = defaultdict(list)
        for key, holders in candidates.items():
            holders = [h for h in holders if h not in bad]
            if not holders:
                missing.add(key)
                continue
            holder = random.choice(holders)
            if key in alone:
                requests.append((holder, [key]))
            else:
                by_worker[holder].append(key)
        for holder, keys in by_worker.items():
            if max_bytes is not None and nbytes:
                keys = _first_bytes(keys, nbytes, max_bytes)
            requests.append((holder, keys))
        if not requests:
            break
        results = yield [_get_data(rpc_for(a), keys, timeout) for a, keys in requests]
        for (address, keys), result in zip(requests, results):
            if isinstance(result, CONNECTION_ERRORS):
                logger.warning("could not fetch %d keys from %s: %s",
                               len(keys), address, result)
                bad.add(address)
            elif isinstance(result, Exception):
                if len(keys) == 1:
                    errors[keys[0]] = result
                else:
                    alone.update(keys)
            else:
                data.update(result)
                for key in keys:
                    if key not in result:  # the peer no longer has it
                        candidates[key] = [h for h in candidates[key] if h != address]
        candidates = {
            k: [h for h in v if h not in bad]
            for k, v in candidates.items()
            if k not in data and k not in missing and k not in errors
        }
        for k in [k for k, v in candidates.items() if not v]:
            missing.add(k)
            del candidates[k]
    return GatherResult(data, missing, bad, errors)


GatherResult = namedtuple("GatherResult", "data missing bad errors")


async def _get_data(r, keys, timeout):
    try:
        return await r.get_data(keys=keys, timeout=timeout)
    except Exception as e:  # reported per peer, the others go on
        return e


class Worker(Server):
    """A worker node (see the module docstring).

    Attributes: ``data``, ``active`` (keys computing now), ``ncores``,
    ``executor`` (thread pool), ``local_dir``, ``center`` (an rpc), ``name``,
    ``services``/``service_ports``, ``ip``/``port``/``address``.
    """

    def __init__(self, center_ip, center_port=None, ip=None, ncores=None, loop=None,
                 local_dir=None, services=None, service_ports=None, name=None,
                 heartbeat_interval=HEARTBEAT_INTERVAL, memory_limit=None,
                 nanny=None, memory_target_fraction=None, memory_pause_fraction=None,
                 memory_terminate_fraction=None,
                 memory_monitor_interval=MEMORY_MONITOR_INTERVAL, **kwargs):
        if center_port is None:
            center_ip, center_port = parse_address(coerce_to_address(center_ip))
        self.loop = loop or IOLoop.current()
        self.ncores = ncores or os.cpu_count() or 1
        self.name = name
        self.data = {}
        self.nbytes = {}
        self.active = set()
        self.memory_limit = int(memory_limit) if memory_limit else None
        self.memory_target_fraction = _memory_fraction(
            memory_target_fraction, "DISTRIBUTED_MEMORY_TARGET", MEMORY_TARGET_FRACTION)
        self.memory_pause_fraction = _memory_fraction(
            memory_pause_fraction, "DISTRIBUTED_MEMORY_PAUSE", MEMORY_PAUSE_FRACTION)
        self.memory_terminate_fraction = _memory_fraction(
            memory_terminate_fraction, "DISTRIBUTED_MEMORY_TERMINATE",
            MEMORY_TERMINATE_FRACTION)
        self.memory_monitor_interval = memory_monitor_interval
        self.memory_rss = None  # last sample of the process memory
        self.paused = False
        self._unpaused = locks.Event()
        self._unpaused.set()
        self._paused_tasks = OrderedDict()  # key -> (spec, how to go on)
        self._memory_stop = threading.Event()
        self._memory_thread = None
        self._spill_executor = self._unspill_executor = None
        self._spill_pending = False
        self._spill_request_lock = threading.Lock()
        self.nanny = nanny
        self.heartbeat_interval = heartbeat_interval
        self.executor = concurrent.futures.ThreadPoolExecutor(
            self.ncores, thread_name_prefix="distributed-worker"
        )
        self._own_local_dir = local_dir
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        self.local_dir = tempfile.mkdtemp(prefix="worker-", dir=local_dir)
        if self.memory_limit and self.memory_target_fraction:
            _return_freed_memory()
            # spilling (and file removal) in one thread, reading back in another:
            # a long eviction does not hold up a peer waiting for a spilled key
            self._spill_executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="distributed-spill")
            self._unspill_executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="distributed-unspill")
            self.data = SpillBuffer(
                os.path.join(self.local_dir, "spill"),
                target=int(self.memory_limit * self.memory_target_fraction),
                executor=self._spill_executor)
        self.pool = ConnectionPool(security=kwargs.get("security"))
        self.center = rpc(ip=center_ip, port=center_port, pool=self.pool)
        self.service_classes = services or {}
        self.service_ports = dict(service_ports or {})
        self.services = {}
        self.status = "created"
        self.batched = None  # batches to the center on the registration stream
        self.tasks = {}  # key -> spec of tasks given by the scheduler, not done
        self._fetching = {}  # key -> future of the transfer bringing it
        self._unconfirmed = set()  # scattered keys the scheduler has not confirmed
        self._heartbeats = None
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
        self.status = "running"
        if self.memory_limit and self._memory_thread is None:
            self._memory_thread = threading.Thread(
                target=self._memory_monitor, name="distributed-memory-monitor",
                daemon=True)
            self._memory_thread.start()
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
                    timeout=max(1, deadline - time.time()),
                )
            except (AuthenticationError, TLSError):
                raise  # retrying cannot help: the tokens or certificates do not match
            except (OSError, TimeoutError, StreamClosedError) as e:
                if time.time() + delay > deadline:
                    raise TimeoutError(
                        "worker %s could not register with the center at %s within "
                        "%s s: %s" % (self.address, self.center.address, timeout, e)
                    ) from None
                yield gen.sleep(delay)
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
            self.batched.send({"op": "heartbeat"})

    @gen.coroutine
    def _read_center_stream(self, stream):
        yield handle_batches(stream, self.stream_handlers, limits=self.limits,
                             sender="the center at %s" % self.center.address)
        stream.close()
        if self.status == "running" and self.batched is not None \
                and self.batched.stream is stream:
            logger.warning("lost the center at %s; reconnecting", self.center.address)
            self.status = "reconnecting"
            try:
                yield self._register(timeout=3600)
            except Exception:
                logger.exception("could not reconnect to the center")
            finally:
                if self.status == "reconnecting":
                    self.status = "running"

    @gen.coroutine
    def _close(self, report=True, timeout=5):
        """Unregister from the center and stop."""
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        self._memory_stop.set()
        self.paused = False  # compute requests waiting for a resume go on (and fail)
        self._unpaused.set()
        if self._heartbeats is not None:
            self._heartbeats.stop()
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
        self.executor.shutdown(wait=False)
        for ex in (self._spill_executor, self._unspill_executor):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.local_dir, ignore_errors=True)
        self.status = "closed"

    def terminate(self, stream=None, report=True):
        self.loop.add_callback(self._close, report=report)
        return b"OK"

    # -- data ----------------------------------------------------------------

    def put_key(self, key, value):
        n = sizeof(value)
        data = self.data
        if type(data) is dict:
            data[key] = value
        else:
            data.put(key, value, n)
            if data.memory_bytes > data.target:
                self._request_spill()
        self.nbytes[key] = n
        return n

    def _discard(self, key):
        try:
            del self.data[key]
        except KeyError:
            pass

    def _in_memory(self, keys):
        """``(values, spilled)``: a mapping with the ``keys`` held in memory,
        and the list of those on disk.  Dict speed: nothing is read here."""
        data = self.data
        if type(data) is dict:
            return data, ()
        return data.get_in_memory(keys)

    def _unspill(self, keys):
        """Future of ``{key: value}``, read back from disk in a thread."""
        return self.loop.run_in_executor(self._unspill_executor, self.data.get_many, keys)

    def get_data(self, stream=None, keys=()):
        data = self.data
        if type(data) is dict:
            values = {k: data[k] for k in keys if k in data}
            if len(values) < len(keys):
                self._report_missing([k for k in keys if k not in values])
            return values
        self._report_missing([k for k in keys if k not in data])
        values, spilled = self._in_memory(keys)
        if spilled:
            return self._get_spilled_data(values, spilled)
        return values

    async def _get_spilled_data(self, values, spilled):
        values.update(await self.loop.run_in_executor(
            self._unspill_executor, self._read_for_peer, spilled))
        return values

    def _read_for_peer(self, keys):
        """In the unspill thread: the values of the spilled ``keys``, after
        making room for them, read but left on disk (they are sent and
        freed, not kept in memory: gathering spilled results does not fill
        the worker again)."""
        data = self.data
        need = 0
        for key in keys:
            try:
                need += data.slow.nbytes(key)
            except KeyError:
                pass
        try:
            self._make_room(need)
        except MemoryError:  # the disk fails: read them all the same
            pass
        out = {}
        for key in keys:
            try:
                out[key] = data.slow[key]
            except (KeyError, FileNotFoundError):  # read back or deleted meanwhile
                out.update(data.get_many([key]))
        return out

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

    @gen.coroutine
    def gather(self, stream=None, who_has=None, report=True):
        """Fetch the keys of ``who_has`` from peers into ``data``."""
        who_has = {k: v for k, v in (who_has or {}).items() if k not in self.data}
        data, missing, _, errors = yield gather_from_workers(who_has, self.rpc_for)
        missing |= set(errors)
        nbytes = {k: self.put_key(k, v) for k, v in data.items()}
        if report and nbytes:
            yield self.center.add_keys(address=self.address, keys=list(nbytes),
                                       nbytes=nbytes)
        if missing:
            return b"missing-data", {"keys": sorted(missing, key=str)}
        return b"OK", {"nbytes": nbytes}

    @gen.coroutine
    def _ensure_local(self, needed, who_has=None, report=True):
        """Fetch the keys of ``needed`` that are not local; return missing ones."""
        missing = [k for k in needed if k not in self.data]
        if not missing:
            return set()
        who_has = dict(who_has or {})
        unknown = [k for k in missing if not who_has.get(k)]
        if unknown:
            found = yield self.center.who_has(keys=unknown)
            who_has.update(found)
        locs = {k: [a for a in who_has.get(k, ()) if a != self.address] for k in missing}
        data, lost, _, errors = yield gather_from_workers(locs, self.rpc_for)
        lost |= set(errors)
        nbytes = {k: self.put_key(k, v) for k, v in data.items()}
        if report and nbytes:
            yield self.center.add_keys(address=self.address, keys=list(nbytes),
                                       nbytes=nbytes)
        return lost

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
            yield self._unpaused.wait()
        lost = yield self._ensure_local(needed_keys, who_has, report)
        if lost:
            return b"missing-data", {"keys": sorted(lost, key=str)}
        while self.paused:
            yield self._unpaused.wait()
        values, spilled = self._in_memory(needed_keys)
        if spilled:
            values.update((yield self._unspill(spilled)))
            lost = [k for k in spilled if k not in values]
            if lost:  # deleted meanwhile
                return b"missing-data", {"keys": sorted(lost, key=str)}
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

    # -- tasks from the scheduler ------------------------------------------------

    def _compute_task(self, key=None, spec=None, who_has=None, nbytes=None,
                      priority=None):
        if key in self.tasks:
            return
        if key in self.data:
            self._send_finished(key, None)
            return
        self.tasks[key] = spec
        if self.paused:  # nothing starts (nor is fetched) until memory is lower
            self._paused_tasks[key] = (
                spec, functools.partial(self._start_task, key, spec, who_has))
            return
        self._start_task(key, spec, who_has)

    def _start_task(self, key, spec, who_has):
        deps = list(who_has or ())
        missing = {d: who_has[d] for d in deps if d not in self.data}
        if missing:
            self._fetch_and_run(key, spec, missing, deps)
        else:
            self._run_task(key, spec, deps)

    @gen.coroutine
    def _fetch_and_run(self, key, spec, missing, deps):
        # listed as ours but not here: say so before the missing-data below
        self._report_missing([k for k, v in missing.items() if self.address in v])
        to_fetch = {k: [a for a in v if a != self.address]
                    for k, v in missing.items() if k not in self._fetching}
        if to_fetch:
            fut = gather_from_workers(to_fetch, self.rpc_for)
            for k in to_fetch:
                self._fetching[k] = fut
        futures = {self._fetching[k] for k in missing if k in self._fetching}
        bad, errors = set(), {}
        for fut in futures:
            try:
                data, _, bad_workers, errs = yield fut
            except Exception:
                logger.exception("transfer for %r failed", key)
                continue
            bad.update(bad_workers)
            errors.update(errs)
            new = {k: v for k, v in data.items() if k not in self.data}
            if new:
                nb = {k: self.put_key(k, v) for k, v in new.items()}
                self._send({"op": "add-keys", "keys": list(nb), "nbytes": nb})
        for k, f in list(self._fetching.items()):
            if f in futures:
                del self._fetching[k]
        if key not in self.tasks:
            return  # released meanwhile
        failed = [d for d in deps if d in errors and d not in self.data]
        if failed:
            # the holder has it but cannot hand it over: retrying will not help
            dep = failed[0]
            exc = errors[dep]
            try:
                raise type(exc)("could not fetch the input %r of %r: %s"
                                % (dep, key, exc)) from exc
            except Exception as e:
                self._send_erred(key, e, e.__traceback__)
            return
        lost = [d for d in deps if d not in self.data]
        if lost:
            del self.tasks[key]
            self._send({"op": "missing-data", "key": key, "missing": lost,
                        "bad_workers": list(bad)})
            return
        self._run_task(key, spec, deps)

    def _run_task(self, key, spec, deps):
        if self.paused:
            self._paused_tasks[key] = (
                spec, functools.partial(self._run_task, key, spec, deps))
            return
        values, spilled = self._in_memory(deps)
        if spilled:
            self.loop.add_callback(self._unspill_and_run, key, spec, deps, values,
                                   spilled)
            return
        self._submit_task(key, spec, deps, values)

    async def _unspill_and_run(self, key, spec, deps, values, spilled):
        """Read the spilled inputs back in a thread, then run the task."""
        try:
            values.update(await self._unspill(spilled))
        except Exception as e:
            logger.exception("could not read back the spilled inputs of %r", key)
            if self.tasks.get(key) is spec:
                self._send_erred(key, e, e.__traceback__)
            return
        state = self.tasks.get(key)
        if state is not spec:
            if state == "released":
                del self.tasks[key]
            return
        lost = [d for d in spilled if d not in values]
        if lost:  # deleted meanwhile
            del self.tasks[key]
            self._send({"op": "missing-data", "key": key, "missing": lost,
                        "bad_workers": []})
            return
        self._submit_task(key, spec, deps, values)

    def _submit_task(self, key, spec, deps, values):
        try:
            function, args, kwargs = self._unpack(spec, deps, values)
        except Exception as e:
            self._send_erred(key, e, e.__traceback__)
            return
        self.active.add(key)
        future = self.executor.submit(self._run_within_memory, function, args, kwargs)
        future.add_done_callback(
            lambda f: self.loop.add_callback(self._task_done, key, f))

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
        self.active.discard(key)
        ok, result, timings = future.result()
        if self.tasks.pop(key, "released") == "released":
            return  # released while running; the result is not wanted
        if ok:
            self.put_key(key, result)
            self._send_finished(key, (timings["compute_start"], timings["compute_stop"]))
        else:
            self._send_erred(key, *result)

    def _send_finished(self, key, startstops):
        values, spilled = self._in_memory([key])
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
        if all:
            self.data.clear()
            self.nbytes.clear()
            self._unconfirmed.clear()
            self.tasks = {k: "released" for k in self.tasks
                          if k not in self._paused_tasks}
            self._paused_tasks.clear()
            return
        for key in keys:
            if key in self._unconfirmed:
                continue  # a newer scattered copy: see update_data
            if key in self._paused_tasks:  # never started: forget it
                del self._paused_tasks[key]
                self.tasks.pop(key, None)
            self._discard(key)  # a spilled value is not read back to be dropped
            self.nbytes.pop(key, None)
            if key in self.tasks:
                self.tasks[key] = "released"

    def _worker_removed(self, address=None):
        self.pool.close(address)  # fails transfers waiting on it: ask others

    def _confirm_data(self, keys=()):
        self._unconfirmed.difference_update(keys)

    def _send(self, msg):
        if self.batched is not None and not self.batched.closed:
            self.batched.send(msg)

    # -- memory ------------------------------------------------------------------

    def _rss(self):
        """Memory of this process in bytes (psutil's RSS); tests replace it."""
        return _this_process().memory_info().rss

    def _run_within_memory(self, function, args, kwargs):
        """In a task thread: :func:`_run_function`, with memory made before it
        and room made for its result after it (see :meth:`_make_room`), so
        that a fast producer is slowed down to the speed of the disk instead
        of outrunning the spill thread.  A result that can be neither kept
        nor spilled (disk full, memory above the pause threshold) fails the
        task with ``MemoryError``."""
        if type(self.data) is not dict:
            try:
                self._make_room(0, before=True)
            except Exception:
                logger.exception("could not make room for a task")
        ok, result, timings = _run_function(function, args, kwargs)
        if ok and type(self.data) is not dict:
            try:
                self._make_room(sizeof(result))
            except MemoryError as e:
                ok, result = False, (e, e.__traceback__)
            except Exception:
                logger.exception("could not make room for a result")
        return ok, result, timings

    def _make_room(self, nbytes, before=False):
        """Spill least recently used values, in this thread and now, until
        the values held plus ``nbytes`` more fit in the target and the
        process memory is back at the target.  ``before`` a task this only
        acts above the pause threshold.  Raises ``MemoryError`` when the
        spill directory fails (full disk) and the process is above the pause
        threshold: the value cannot be kept."""
        data, limit = self.data, self.memory_limit
        rss = self._rss()
        pause = limit * (self.memory_pause_fraction or self.memory_terminate_fraction or 1)
        if before and rss <= pause:
            return
        excess = max(rss - limit * self.memory_target_fraction,
                     data.memory_bytes + nbytes - data.target)
        if excess > 0 and data.fast:
            data.evict_until(max(0, data.memory_bytes - excess))
            rss = self._rss()
        error = data.write_error
        if error is not None and not before and rss > pause:
            raise MemoryError(
                "worker %s cannot keep a result of %s: its process memory %s is "
                "above %d%% of its memory limit %s and spilling to %s fails (%s: %s)"
                % (self.address, _format_bytes(nbytes), _format_bytes(rss),
                   pause * 100 / limit, _format_bytes(limit), data.directory,
                   type(error).__name__, error))

    def _memory_monitor(self):
        """Body of the monitor thread: sample, then spill, pause or exit."""
        while not self._memory_stop.wait(self.memory_monitor_interval):
            try:
                self._check_memory()
            except Exception:
                logger.exception("memory monitor")

    def _check_memory(self):
        """One look at the process memory (in the monitor thread)."""
        rss = self.memory_rss = self._rss()
        limit = self.memory_limit
        if not limit or self.status in ("closing", "closed"):
            return
        if self.memory_terminate_fraction and rss > limit * self.memory_terminate_fraction:
            self._memory_terminate(rss)
            return
        if self.memory_pause_fraction:
            # pausing waits for spilling: not while the disk fails (full), or
            # the worker would wait for ever; results that do not fit fail
            # instead (see _make_room)
            paused = rss > limit * self.memory_pause_fraction and not self._disk_fails()
            if paused != self.paused:
                try:
                    self.loop.add_callback(self._set_paused, paused)
                except RuntimeError:  # the loop is closed
                    return
        data = self.data
        if type(data) is not dict:
            target = limit * self.memory_target_fraction
            if rss > target and data.fast:
                # free what the process holds above the target (or all we can)
                self._request_spill(max(0, data.memory_bytes - (rss - target)))
            elif data.memory_bytes > data.target:
                self._request_spill()

    def _request_spill(self, target=None):
        """Spill down to ``target`` bytes (default: the buffer's) in the spill
        thread, unless a spill is under way already.  Any thread, dict speed."""
        with self._spill_request_lock:
            if self._spill_pending:
                return
            self._spill_pending = True
        try:
            self._spill_executor.submit(self._spill, target)
        except RuntimeError:  # shut down
            self._spill_pending = False

    def _spill(self, target):
        try:
            n = self.data.evict_until(target)
            if n:
                logger.debug("spilled %d bytes to %s", n, self.local_dir)
        except Exception:
            logger.exception("could not spill to %s", self.local_dir)
        finally:
            self._spill_pending = False

    def _disk_fails(self):
        data = self.data
        return type(data) is not dict and data.write_error is not None

    def _set_paused(self, paused):
        """Pause (no task starts) or resume (on the event loop)."""
        if paused == self.paused or self.status in ("closing", "closed"):
            return
        rss, limit = self.memory_rss or 0, self.memory_limit
        self.paused = paused
        self._send({"op": "worker-status", "paused": paused})  # the scheduler holds back
        if paused:
            self._unpaused.clear()
            logger.warning(
                "worker %s paused: process memory %s is above %d%% of the memory "
                "limit %s; no new task starts until it is lower", self.address,
                _format_bytes(rss), self.memory_pause_fraction * 100,
                _format_bytes(limit))
            return
        if self._disk_fails():
            logger.warning("worker %s resumed although its process memory %s is "
                           "above %d%% of the memory limit %s: spilling to %s fails "
                           "(%s); results that do not fit fail with MemoryError",
                           self.address, _format_bytes(rss),
                           self.memory_pause_fraction * 100, _format_bytes(limit),
                           self.data.directory, self.data.write_error)
        else:
            logger.warning("worker %s resumed: process memory %s is below %d%% of "
                           "the memory limit %s", self.address, _format_bytes(rss),
                           self.memory_pause_fraction * 100, _format_bytes(limit))
        self._unpaused.set()
        while self._paused_tasks and not self.paused:
            key, (spec, go_on) = self._paused_tasks.popitem(last=False)
            if self.tasks.get(key) is spec:
                go_on()

    def _memory_terminate(self, rss):
        """Past the limit: log, tell the center who is to blame, remove the
        spilled files and exit the process with :data:`MEMORY_EXIT_CODE` (in
        the monitor thread)."""
        self._memory_stop.set()
        blame = self._memory_blame(rss)
        logger.critical(
            "worker %s exceeded its memory limit: process memory %s is above %d%% "
            "of %s; %s; exiting with status %d", self.address, _format_bytes(rss),
            self.memory_terminate_fraction * 100, _format_bytes(self.memory_limit),
            MEMORY_BLAME[blame], MEMORY_EXIT_CODE)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            self._announce_memory_exit(blame)
            shutil.rmtree(self.local_dir, ignore_errors=True)
        finally:
            os._exit(MEMORY_EXIT_CODE)

    def _memory_blame(self, rss):
        """``'data'`` when the values held in memory make up what the process
        is above its pause threshold (spilling did not keep up: its running
        tasks are not to blame), ``'tasks'`` otherwise."""
        try:
            held = self.memory_state()["memory_bytes"]
        except Exception:  # a table changed under this thread
            return "tasks"
        fraction = min(self.memory_pause_fraction or MEMORY_PAUSE_FRACTION,
                       self.memory_terminate_fraction or 1)
        return "data" if rss - held <= self.memory_limit * fraction else "tasks"

    def _announce_memory_exit(self, blame, timeout=1):
        """Tell the center on the worker stream, ahead of its closing, that
        this worker exits for memory and who is to blame; then close the
        stream, so that nothing more gets out (errors of tasks whose files
        are being removed).  Waits ``timeout`` seconds at most for the loop
        (a task may hold the GIL), then shuts the socket from here."""
        batched = self.batched
        if batched is None or batched.closed:
            return
        done = threading.Event()

        async def announce():
            try:
                batched.send({"op": "memory-exit", "blame": blame})
                while batched._busy and not batched.closed:
                    await gen.sleep(0.001)
            finally:
                batched.abort()
                done.set()

        try:
            self.loop.add_callback(announce)
        except RuntimeError:  # the loop is closed
            return
        if not done.wait(timeout):
            try:
                batched.stream.socket.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass

    def memory_state(self):
        """``{'memory_limit', 'memory_rss', 'memory_bytes', 'spilled_bytes',
        'spilled_keys', 'paused', ...}``: what ``health`` and /info.json show."""
        data = self.data
        spilling = type(data) is not dict
        return {
            "memory_limit": self.memory_limit,
            "memory_target_fraction": self.memory_target_fraction,
            "memory_pause_fraction": self.memory_pause_fraction,
            "memory_terminate_fraction": self.memory_terminate_fraction,
            "memory_rss": self.memory_rss,
            # list() copies in one step, safe from the monitor thread while
            # the event loop adds keys (summing the live view is not)
            "memory_bytes": data.memory_bytes if spilling else sum(list(self.nbytes.values())),
            "spilled_bytes": data.spilled_bytes if spilling else 0,
            "spilled_keys": len(data.slow) if spilling else 0,
            "paused": self.paused,
            "paused_tasks": len(self._paused_tasks),
        }

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


_process = None


def _this_process():
    """``psutil.Process()`` of this process (made once per pid)."""
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process


#: glibc's ``mallopt`` parameter and the value a worker with a memory limit sets
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2**20


def _return_freed_memory():
    """Make large blocks (``MMAP_THRESHOLD`` and up: arrays) come from
    ``mmap`` of their own, so that freeing one (spilling it) gives its memory
    back to the system (glibc, Linux).  Otherwise glibc raises that threshold
    by itself up to 32 MiB and keeps such arrays in heaps whose freed memory
    stays in the process's RSS: the worker would spill everything and
    still be above its target."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def _format_bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return "%.1f %s" % (n / size, unit)
    return "%d B" % n


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
