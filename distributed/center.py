"""The center: who holds which key, which workers are alive.

::

    c = Center('127.0.0.1')
    c.listen(8787)            # or: yield c._start(8787)

State, all plain public tables:

* ``who_has``   ``{key: {address}}``  the workers holding each key
* ``has_what``  ``{address: {key}}``  the keys each worker holds
* ``ncores``    ``{address: int}``    threads of each worker
* ``nbytes``    ``{key: int}``        size of each key's value
* ``worker_services`` ``{address: {name: port}}``, ``names`` ``{address: name}``

``who_has``, ``has_what`` and ``nbytes`` are the scheduler's tables, shown
read-only: the center changes them only by calling the scheduler
(``self.scheduler.add_replicas``, ``remove_keys``, ``remove_worker``, ...).
With ``$DISTRIBUTED_VALIDATE`` set, the scheduler's invariants are checked
after every batch of messages (see ``Scheduler.validate``).

Workers register over a stream they keep open and send heartbeats on it.
A worker whose stream closes, or that is silent for ``heartbeat_timeout``
seconds, is removed from every table; the scheduler (when there is one) is
told so that it can recover what depended on that worker.  When the worker
had a nanny (or a ``LocalCluster`` watching it: ``watch_workers``), the
nanny soon says why it died (``worker_died``: "killed by
signal SIGSEGV", "exit code 3", ...); what would err at once for that death
(``KilledWorker``, ``LostData``) waits for that report up to
``death_report_grace`` seconds (:data:`DEATH_REPORT_GRACE`), so that the
errors name the cause.
"""

import asyncio
import functools
import logging
import os
import time
from collections import OrderedDict, defaultdict

from tornado.ioloop import IOLoop, PeriodicCallback

from .batched import BatchedSend, close_stream, handle_batches
from .core import ConnectionPool, Server, coerce_to_address, coerce_to_name, rpc
from .output import OUTPUT_QUEUE_LIMIT, STREAMS
from .scheduler import ALLOWED_FAILURES, VALIDATE_ENV, InvariantError, Scheduler
from .utils import CENTER_PORT, log_safe

logger = logging.getLogger(__name__)

__all__ = ["Center"]

#: seconds without a heartbeat after which a worker counts as dead
HEARTBEAT_TIMEOUT = 60
#: how many removed workers the center remembers, to recognize them coming back
MAX_LOST_WORKERS = 10000
#: seconds the final decisions about a worker that had a nanny and whose
#: connection closed (KilledWorker, LostData, the plugins' remove_worker)
#: wait for its nanny to say why it died, so that they name the cause
DEATH_REPORT_GRACE = 2.0
#: a nanny's cause of death is cut to this many characters
MAX_CAUSE_LENGTH = 1000
#: how many nanny reports of deaths the center keeps for workers whose
#: connection has not closed yet (each is used only within the grace period)
MAX_EARLY_REPORTS = 100

#: why a worker was removed, as its tasks' errors and the log say it
CONNECTION_CLOSED = ("its connection closed: the process died (a segfault, os._exit, "
                     "running out of memory, a kill) or the network dropped it")
NO_HEARTBEAT = ("it stopped answering heartbeats for %.0f s (heartbeat timeout %g s): "
                "a task holding the GIL, a stopped, frozen or overloaded process, "
                "or a network cut")


class Center(Server):
    """Central metadata node of a cluster (see the module docstring)."""

    default_port = CENTER_PORT

    def __init__(self, ip=None, port=CENTER_PORT, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                 loop=None, services=None, service_ports=None,
                 allowed_failures=ALLOWED_FAILURES, validate=None,
                 death_report_grace=DEATH_REPORT_GRACE, **kwargs):
        self.scheduler = Scheduler(allowed_failures=allowed_failures)
        # check the scheduler's invariants after every batch (slow: for tests);
        # None: if $DISTRIBUTED_VALIDATE says so
        if validate is None:
            validate = os.environ.get(VALIDATE_ENV, "") not in ("", "0")
        self.validate = validate
        self.invariant_errors = []  # what validation found (the first few)
        self.ncores = {}
        self.worker_services = {}
        self.names = {}
        self.nannies = {}  # worker address -> address of the nanny running it
        self.watched = set()  # workers whose deaths a LocalCluster reports
        self.watch_all = False  # ... or all of them
        self.resources = {}  # worker address -> {name: amount} (dworker --resources)
        self.deaths = []  # (time, address, cause) of worker deaths told by nannies
        self.death_report_grace = death_report_grace
        self._death_timers = {}  # address -> timer deciding its death unreported
        # address -> (time, cause, blame): a nanny's report that came before
        # its worker's connection closed (the newest MAX_EARLY_REPORTS)
        self._early_reports = OrderedDict()
        self.last_seen = {}
        self.metrics = {}  # address -> what its latest heartbeat said (memory, cpu, ...)
        # workers removed as silent or disconnected, which may come back with
        # stale keys: address -> time removed (the newest MAX_LOST_WORKERS)
        self._lost_workers = OrderedDict()
        self._rejoining = {}  # address -> (keys, nbytes) until its worker-stream
        self.worker_streams = {}
        self._stream_workers = defaultdict(set)  # stream -> addresses registered on it
        self.heartbeat_timeout = heartbeat_timeout
        self.loop = loop or IOLoop.current()
        self.pool = ConnectionPool(security=kwargs.get("security"))
        self.default_listen_port = port
        self.service_classes = services or {}
        self.service_ports = dict(service_ports or {})
        self.services = {}
        self.status = "created"
        self.worker_comms = {}  # address -> BatchedSend on its stream
        self.client_comms = {}  # client id -> BatchedSend
        self.quiet_clients = set()  # clients that do not want their tasks' output
        handlers = {
            "register": self.register,
            "unregister": self.unregister,
            "heartbeat": self.heartbeat,
            "add_keys": self.add_keys,
            "remove_keys": self.remove_keys,
            "who_has": self.get_who_has,
            "has_what": self.get_has_what,
            "ncores": self.get_ncores,
            "nbytes": self.get_nbytes,
            "metrics": self.get_metrics,
            "delete_data": self.delete_data,
            "broadcast": self.broadcast,
            "terminate": self.terminate,
            # the scheduler's
            "worker-stream": self.worker_stream,
            "register-client": self.client_stream,
            "restart": self.restart,
            "task_states": self.get_task_states,
            "story": self.story,
            "worker_died": self.worker_died,
            "watch_workers": self.watch_workers,
        }
        s = self.scheduler
        #: ops of the batched streams (see :func:`~distributed.batched.handle_batches`):
        #: from workers, called with ``address=``; from executors, with ``client=``
        self.stream_handlers = {
            # from workers
            "task-finished": s.task_finished,
            "task-erred": s.task_erred,
            "missing-data": s.missing_data,
            "add-keys": s.add_keys,
            "missing-keys": s.missing_keys,
            "worker-status": s.set_paused,
            "memory-exit": s.memory_exit,
            "heartbeat": self._stream_heartbeat,
            "task-output": self.task_output,
            # from executors
            "update-graph": s.update_graph,
            "client-releases-keys": s.client_releases_keys,
            "cancel": s.cancel,
            "retry": s.retry,
            "fire-and-forget": s.fire_and_forget,
            "update-data": s.update_data,
            "close-stream": close_stream,
        }
        super().__init__(handlers, ip=ip, **kwargs)
        self._check = PeriodicCallback(self._check_heartbeats, 1000)

    # the scheduler's tables, read-only here (change them through the scheduler)
    @property
    def who_has(self):
        return self.scheduler.who_has

    @property
    def has_what(self):
        return self.scheduler.has_what

    @property
    def nbytes(self):
        return self.scheduler.nbytes

    def identity(self, stream=None):
        info = {"type": type(self).__name__, "id": self.id,
                "workers": list(self.ncores),
                "heartbeat_timeout": self.heartbeat_timeout,
                "allowed_failures": self.scheduler.allowed_failures,
                "services": dict(self.service_ports),
                "resources": dict(self.resources)}
        if self.validate:
            info["invariant_errors"] = list(self.invariant_errors)
        return info

    def listen(self, port=None, address=None):
        if port is None:
            port = self.default_listen_port
        super().listen(port, address)
        for name, cls in self.service_classes.items():
            service = cls(self)
            service.listen(self.service_ports.get(name, 0))
            self.services[name] = service
            self.service_ports[name] = service.port
        self._check.start()
        self.status = "running"

    async def _start(self, port=None, address=None):
        """Listen (awaitable form of :meth:`listen`)."""
        self.listen(port, address)
        return self

    def __await__(self):
        async def _():
            if self.port is None:
                await self._start()
            return self
        return _().__await__()

    # -- workers arriving and leaving ---------------------------------------

    def register(self, stream, address=None, ncores=None, keys=(), services=None,
                 name=None, nbytes=None, nanny=None, now=None, resources=None):
        address = coerce_to_name(address)
        if name is not None:
            for other, other_name in self.names.items():
                if other_name == name and other != address:
                    raise ValueError(
                        "a worker named %r is already registered at %s; give each "
                        "worker a unique --name" % (name, other)
                    )
        if address in self.ncores:
            self.remove_worker(address, close=self.worker_streams.get(address) is not stream,
                               cause="it registered anew (it restarted or reconnected)")
        self.ncores[address] = ncores
        self.worker_services[address] = dict(services or {})
        self.names[address] = name if name is not None else address
        if nanny is not None:
            self.nannies[address] = coerce_to_address(nanny)
        if resources:
            self.resources[address] = dict(resources)
        self.last_seen[address] = time.time()
        if stream is not None:
            self.worker_streams[address] = stream
            self._stream_workers[stream].add(address)
        if self._lost_workers.pop(address, None) is not None:
            # back after being removed: its keys go through the scheduler,
            # which keeps only what is still needed (see worker_stream)
            self._rejoining[address] = (list(keys), nbytes)
            keys, nbytes = (), None
        # an empty entry at least: the worker is known
        self.scheduler.add_replicas(address, keys, nbytes)
        logger.info("registered worker %s (%s cores)", log_safe(address), log_safe(ncores))
        return b"OK"

    def unregister(self, stream=None, address=None):
        address = coerce_to_name(address)
        if address not in self.ncores:
            return b"unknown"
        # the reply may have to travel on the very stream the worker registered on
        self.remove_worker(address, close=self.worker_streams.get(address) is not stream,
                           cause="it left the cluster")
        return b"OK"

    def heartbeat(self, stream=None, address=None, now=None, **metrics):
        address = coerce_to_name(address)
        if address not in self.ncores:
            return b"unknown"  # the worker must register (again)
        self.last_seen[address] = time.time()
        return b"OK"

    def remove_worker(self, address, close=True, cause=None, lost=False,
                      report_expected=False):
        """Forget a worker and everything it held; close its stream if ``close``.

        ``cause`` (:data:`CONNECTION_CLOSED`, :data:`NO_HEARTBEAT`, ...) goes
        into the errors of tasks that erred because of it. ``lost``: it went
        silent or its stream closed; if it comes back, the keys it brings are
        checked against what is still needed.  ``report_expected``: its
        nanny will say why it died; what would err for it waits for that
        (``worker_died``) up to ``death_report_grace`` seconds.
        """
        if address not in self.ncores:
            return
        self._rejoining.pop(address, None)
        if lost:
            self._lost_workers[address] = time.time()
            while len(self._lost_workers) > MAX_LOST_WORKERS:
                self._lost_workers.popitem(last=False)
        logger.debug("removing worker %s: %s", log_safe(address), cause)
        del self.ncores[address]
        self.worker_services.pop(address, None)
        self.names.pop(address, None)
        self.nannies.pop(address, None)
        self.watched.discard(address)
        self.resources.pop(address, None)
        self.last_seen.pop(address, None)
        self.metrics.pop(address, None)
        stream = self.worker_streams.pop(address, None)
        if stream is not None:
            others = self._stream_workers.get(stream)
            if others is not None:
                others.discard(address)
                if not others:
                    del self._stream_workers[stream]
            if close:
                stream.close()
        self.pool.close(address)
        comm = self.worker_comms.pop(address, None)
        if comm is not None and close:
            comm.abort()
        self.scheduler.remove_worker(address, cause=cause, report_expected=report_expected)
        if report_expected:
            old = self._death_timers.pop(address, None)
            if old is not None:
                self.loop.remove_timeout(old)
            self._death_timers[address] = self.loop.call_later(
                self.death_report_grace, self._death_unreported, address)
        self.send_scheduler_messages()

    def _death_unreported(self, address):
        """The nanny of ``address`` did not say in time why it died: decide
        with what is known ("its connection closed: ...")."""
        self._death_timers.pop(address, None)
        logger.info("no report from the nanny of %s within %g s of its death",
                    log_safe(address), self.death_report_grace)
        self.scheduler.decide_death(address)
        self.send_scheduler_messages()

    def stream_closed(self, stream):
        for address in self._stream_workers.pop(stream, ()):
            if self.worker_streams.get(address) is stream:
                logger.warning("removing worker %s: %s", log_safe(address), CONNECTION_CLOSED)
                report = self._early_reports.pop(address, None)
                if report is not None and report[0] > time.time() - self.death_report_grace:
                    # its nanny has said why already
                    _, cause, blame = report
                    if blame == "data":
                        self.scheduler.memory_exit(address, "data")
                    self.remove_worker(address, cause=cause, lost=True)
                else:
                    self.remove_worker(address, cause=CONNECTION_CLOSED, lost=True,
                                       report_expected=self._death_reported(address))

    def _check_heartbeats(self):
        deadline = time.time() - self.heartbeat_timeout
        for address, seen in list(self.last_seen.items()):
            if seen < deadline:
                cause = NO_HEARTBEAT % (time.time() - seen, self.heartbeat_timeout)
                logger.warning("removing worker %s: %s", log_safe(address), cause)
                self.remove_worker(address, cause=cause, lost=True)

    # -- the scheduler's streams ------------------------------------------------

    async def worker_stream(self, stream, address=None):
        """A registered worker turns its stream into a batched message stream.

        Tasks go to the worker on it; results, errors and heartbeats come back.
        """
        address = coerce_to_address(address)
        if self.worker_streams.get(address) is not stream:
            raise ValueError("worker %s must register on this stream first" % address)
        self.worker_comms[address] = BatchedSend(stream, self.loop,
                                                 max_bytes=self.limits.max_message_size // 2)
        # the keys it comes back with are checked against what is still needed;
        # those it registered are merged with their tasks (add_worker)
        rejoining = self._rejoining.pop(address, None)
        if rejoining is not None:
            self.scheduler.rejoin(address, *rejoining)
        self.scheduler.add_worker(address, self.ncores.get(address),
                                  resources=self.resources.get(address))
        self.send_scheduler_messages()
        await handle_batches(stream, self.stream_handlers, {"address": address},
                             sender=address, limits=self.limits, stall=self.stall_timeout,
                             every_batch=functools.partial(self._worker_batch_done, address))

    def _worker_batch_done(self, address):
        """After each batch from a worker: it is alive; send what the batch caused."""
        self.send_scheduler_messages()
        if address not in self.last_seen:
            return False  # removed meanwhile
        self.last_seen[address] = time.time()

    def _stream_heartbeat(self, address, **metrics):
        """Keep what the worker measured (``Worker.metrics``: memory, CPU,
        ...); every batch from a worker counts as a sign of life anyway."""
        if address in self.ncores:
            self.metrics[address] = metrics

    async def client_stream(self, stream, client=None, output=True):
        """An executor's batched stream: graphs and releases in, results out
        (and, unless ``output=False``, what its tasks print)."""
        if client is None:
            raise ValueError("register-client needs client=<a unique id>")
        comm = BatchedSend(stream, self.loop, max_bytes=self.limits.max_message_size // 2)
        self.client_comms[client] = comm
        if not output:
            self.quiet_clients.add(client)
        self.scheduler.add_client(client)
        # the executor checks what it sends against these (a message over
        # them would close the whole stream)
        comm.send({"op": "stream-start",
                   "max_message_size": self.limits.max_message_size,
                   "max_frame_size": self.limits.max_frame_size})
        try:
            await handle_batches(stream, self.stream_handlers, {"client": client},
                                 sender=client, limits=self.limits, stall=self.stall_timeout,
                                 every_batch=self.send_scheduler_messages)
        finally:
            if self.client_comms.get(client) is comm:
                del self.client_comms[client]
                self.quiet_clients.discard(client)
                self.scheduler.remove_client(client)
                self.send_scheduler_messages()

    def task_output(self, address, key=None, stream="stdout", text=""):
        """A worker's ``task-output``: pass it on to the executors that want
        ``key`` (or a task depending on it).  Dropped for an executor whose
        stream already has :data:`~distributed.output.OUTPUT_QUEUE_LIMIT`
        messages waiting: output gives way, results do not wait for it."""
        if stream not in STREAMS or type(text) is not str:
            raise TypeError("task-output needs stream in %s and text=<str>" % (STREAMS,))
        clients = self.scheduler.clients_of(key) - self.quiet_clients
        if not clients:
            return
        msg = {"op": "task-output", "key": key, "worker": self.names.get(address, address),
               "stream": stream, "text": text}
        for client in clients:
            comm = self.client_comms.get(client)
            if comm is not None:
                comm.offer(msg, OUTPUT_QUEUE_LIMIT)

    def send_scheduler_messages(self):
        if self.validate:
            self.validate_scheduler()
        to_workers, to_clients = self.scheduler.flush()
        for address, msgs in to_workers.items():
            comm = self.worker_comms.get(address)
            if comm is not None and not comm.closed:
                comm.send_many(msgs)
        for client, msgs in to_clients.items():
            comm = self.client_comms.get(client)
            if comm is not None and not comm.closed:
                comm.send_many(msgs)

    def validate_scheduler(self):
        """Check the scheduler's invariants (``$DISTRIBUTED_VALIDATE``); a
        failure is logged loudly with the story of its key, kept in
        ``invariant_errors`` (which ``identity()`` reports, for tests to
        check), and not raised: the center keeps serving."""
        try:
            self.scheduler.validate()
        except InvariantError as e:
            key = e.key
            story = self.scheduler.story(key)
            logger.critical("SCHEDULER INVARIANT BROKEN: %s\nstory of %r:\n%s",
                            log_safe(e), key, "\n".join(log_safe(repr(entry))
                                                        for entry in story[-20:]))
            if len(self.invariant_errors) < 100:
                self.invariant_errors.append(str(e))

    def story(self, stream=None, keys=()):
        """What happened to ``keys`` and why: see ``Scheduler.story``."""
        return self.scheduler.story(*keys)

    async def restart(self, stream=None, timeout=30):
        """Forget all tasks and data; executors are told their futures are gone.

        Workers that run under a nanny are replaced by fresh processes.
        """
        self.scheduler.restart()
        self.send_scheduler_messages()
        nannies = list(set(self.nannies.values()))
        results = await asyncio.gather(
            *[rpc(n, pool=self.pool).restart(timeout=timeout) for n in nannies],
            return_exceptions=True)
        for nanny, result in zip(nannies, results):
            if isinstance(result, Exception):
                logger.warning("nanny %s could not restart its worker: %s", log_safe(nanny),
                               log_safe(result))
        return b"OK"

    def worker_died(self, stream=None, address=None, cause=None, blame=None):
        """A nanny tells why its worker died ("killed by signal SIGSEGV",
        "memory limit exceeded (exit code 75): ...", ...).

        Logged and kept in ``deaths``; the scheduler's errors for that death
        name it: the ``KilledWorker`` and ``LostData`` that waited for this
        report err now (see ``remove_worker(report_expected=)``), and the
        ``KilledWorker`` of later deaths lists it.  A report coming before
        the worker's connection closes is kept for when it does.
        ``blame='data'``: it ran out of memory because of the data it held,
        not its tasks, which then do not have this death counted toward
        ``KilledWorker``.
        """
        address = coerce_to_address(address) if address else address
        if cause is not None:  # text of bounded size, whatever a peer sent
            cause = log_safe(cause, MAX_CAUSE_LENGTH)
        logger.warning("worker %s died: %s", log_safe(address), cause)
        self.deaths.append((time.time(), address, cause))
        del self.deaths[:-1000]
        if not address:
            return b"OK"
        if address in self.ncores:
            # before its connection closed: kept for when it does
            self._early_reports.pop(address, None)
            self._early_reports[address] = (time.time(), cause, blame)
            while len(self._early_reports) > MAX_EARLY_REPORTS:
                self._early_reports.popitem(last=False)
            return b"OK"
        timer = self._death_timers.pop(address, None)
        if timer is not None:
            self.loop.remove_timeout(timer)
        self.scheduler.worker_died(address, cause=cause, blame=blame)
        self.send_scheduler_messages()
        return b"OK"

    def watch_workers(self, stream=None, addresses=None):
        """The caller (a ``LocalCluster``, the nanny of its workers) will
        say why these registered workers die (``worker_died``), as a nanny
        does: the decisions about their deaths wait for it.  ``addresses=None``:
        every worker, from now on (a cluster says so before its workers
        start: a task may kill one as soon as it registers)."""
        if addresses is None:
            self.watch_all = True
            return b"OK"
        for address in addresses:
            address = coerce_to_address(address)
            if address in self.ncores:
                self.watched.add(address)
        return b"OK"

    def _death_reported(self, address):
        """Will someone say why the worker ``address`` died?"""
        return self.watch_all or address in self.nannies or address in self.watched

    def get_task_states(self, stream=None, keys=None):
        if keys is not None:  # (progress bars ask for a graph's keys often)
            tasks = self.scheduler.tasks
            return {k: tasks[k].state if k in tasks else None for k in keys}
        return self.scheduler.task_states()

    # -- keys ----------------------------------------------------------------

    def add_keys(self, stream=None, address=None, keys=(), nbytes=None):
        address = coerce_to_name(address)
        if address not in self.ncores:
            raise ValueError("worker %s is not registered with this center" % address)
        self.scheduler.add_replicas(address, keys, nbytes)
        return b"OK"

    def remove_keys(self, stream=None, address=None, keys=()):
        self.scheduler.remove_keys(coerce_to_name(address), keys)
        self.send_scheduler_messages()
        return b"OK"

    def get_who_has(self, stream=None, keys=None):
        if keys is None:
            return {k: set(v) for k, v in self.who_has.items()}
        return {k: set(self.who_has.get(k, ())) for k in keys}

    def get_has_what(self, stream=None, addresses=None, keys=None):
        if addresses is None:
            addresses = keys  # the original API named this argument ``keys``
        if addresses is None:
            return {a: set(v) for a, v in self.has_what.items()}
        addresses = [coerce_to_name(a) for a in addresses]
        return {a: set(self.has_what.get(a, ())) for a in addresses}

    def get_ncores(self, stream=None, addresses=None):
        if addresses is None:
            return dict(self.ncores)
        addresses = [coerce_to_name(a) for a in addresses]
        return {a: self.ncores.get(a) for a in addresses}

    def get_metrics(self, stream=None):
        """``{address: {'cpu', 'memory_rss', 'memory_limit', ...}}``: what each
        worker's latest heartbeat said (see ``Worker.metrics``)."""
        return {a: dict(m) for a, m in self.metrics.items()}

    def get_nbytes(self, stream=None, keys=None):
        if keys is None:
            return dict(self.nbytes)
        return {k: self.nbytes[k] for k in keys if k in self.nbytes}

    async def delete_data(self, stream=None, keys=()):
        """Tell every holder of ``keys`` to drop them, and forget them."""
        by_worker = self.scheduler.delete_keys(keys)
        self.send_scheduler_messages()
        await asyncio.gather(
            *[self.worker_rpc(a).delete_data(keys=ks, report=False, timeout=10)
              for a, ks in by_worker.items()],
            return_exceptions=True,
        )
        return b"OK"

    def worker_rpc(self, address):
        return rpc(address, pool=self.pool)

    async def broadcast(self, stream=None, msg=None, workers=None):
        """Send ``msg`` to every worker (or ``workers``): ``{address: reply}``."""
        if type(msg) is not dict or "op" not in msg:
            raise ValueError("broadcast needs msg={'op': ..., ...}")
        addresses = list(self.ncores) if workers is None else [
            coerce_to_address(w) for w in workers]
        msg = dict(msg)
        op = msg.pop("op")

        async def send(address):  # a name that is no address ('alice') fails alone
            return await self.worker_rpc(address).call(op, **msg)

        replies = await asyncio.gather(*map(send, addresses), return_exceptions=True)
        return dict(zip(addresses, replies))

    def terminate(self, stream=None):
        self.loop.add_callback(self.close)
        return b"OK"

    def close(self):
        """Stop listening and close every connection."""
        if self.status == "closed":
            return
        self.status = "closed"
        self._check.stop()
        for timer in self._death_timers.values():
            self.loop.remove_timeout(timer)
        self._death_timers.clear()
        for service in self.services.values():
            service.stop()
        self.stop()
        for stream in list(self.worker_streams.values()):
            stream.close()
        self.pool.close()

    async def _close(self):
        self.close()

    def __repr__(self):
        return "<Center %s: %d workers, %d keys>" % (
            self.address if self.port else "not listening",
            len(self.ncores),
            len(self.who_has),
        )
