"""The task-graph state machine the center runs.  No I/O happens here.

Every input is a method call (a graph from an executor, a result from a
worker, a worker leaving); every output is a message appended to
``to_workers[address]`` or ``to_clients[client]``, which the center sends
after each batch of inputs.  Tests drive it directly::

    s = Scheduler()
    s.add_worker('w1:1', ncores=1)
    s.add_client('c1')
    s.update_graph('c1', tasks={'x': {'function': ...}}, dependencies={'x': []},
                   keys=['x'])
    s.to_workers['w1:1']      # [{'op': 'compute-task', 'key': 'x', ...}]
    s.task_finished('w1:1', 'x', nbytes=28, type='int')
    s.to_clients['c1']        # [{'op': 'key-in-memory', 'key': 'x', ...}]

Task states
-----------
``released``  known, not computed (or its data was dropped)
``waiting``   some dependency is not in memory yet
``queued``    ready, held here until its worker has a free slot
``processing`` sent to a worker
``no-worker`` ready, but no worker may run it yet
``memory``    computed; ``who_has[key]`` names the holders
``erred``     it (or a dependency) raised; the exception is kept

A worker gets at most ``saturation`` tasks beyond its cores, so that new
and freed workers can take the rest; a worker with a free slot and nothing
queued takes queued work from the busiest worker.  Placement prefers the
worker already holding most of a task's input bytes, weighed against how
long its queue is.
"""

import heapq
import itertools
import logging
from collections import OrderedDict, defaultdict

from .graph import CycleError, find_cycle
from .utils import key_split, validate_key

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "TaskState", "WorkerState", "KilledWorker", "LostData"]

#: how many worker deaths while running a task before it is marked erred
ALLOWED_FAILURES = 3
#: how many times a task may fail to fetch its inputs before it is marked erred
MISSING_DATA_RETRIES = 10
#: assumed bandwidth between workers, bytes/s, to weigh locality against load
BANDWIDTH = 200e6
#: assumed duration of a task never seen before, seconds
DEFAULT_TASK_DURATION = 0.001
#: seconds of work to keep in flight on a worker, beyond its cores
LATENCY = 0.005
#: at most this many tasks in flight on a worker beyond its cores
MAX_EXTRA = 100


class KilledWorker(Exception):
    """Workers died while running this task, too many times to try again."""


class LostData(Exception):
    """Data that could not be recomputed (scattered, no lineage) was lost."""


class TaskState:
    __slots__ = (
        "key", "state", "run_spec", "dependencies", "dependents", "waiting_on",
        "waiters", "who_wants", "priority", "processing_on", "restrictions",
        "loose_restrictions", "nbytes", "exception", "traceback", "text",
        "suspicious", "type", "prefix", "retries",
    )

    def __init__(self, key, run_spec=None, priority=(0,)):
        self.key = key
        self.state = "released"
        self.run_spec = run_spec
        self.dependencies = set()
        self.dependents = set()
        self.waiting_on = set()  # dependencies not in memory yet
        self.waiters = set()  # dependents that still need this one's data
        self.who_wants = set()  # clients
        self.priority = priority
        self.processing_on = None
        self.restrictions = None
        self.loose_restrictions = False
        self.nbytes = None
        self.exception = None
        self.traceback = None
        self.text = None
        self.suspicious = 0
        self.type = None
        self.prefix = key_split(key)
        self.retries = 0

    def __lt__(self, other):  # heap ties
        return self.priority < other.priority

    def __repr__(self):
        return "<Task %r %s>" % (self.key, self.state)


class WorkerState:
    __slots__ = ("address", "ncores", "processing", "queue", "nbytes", "paused",
                 "memory_exit")

    def __init__(self, address, ncores):
        self.address = address
        self.ncores = ncores
        self.paused = False  # over its memory pause threshold: send it nothing
        # exiting past its memory limit: 'data' (what it held is to blame, not
        # its tasks) or 'tasks'; None: not exiting for memory
        self.memory_exit = None
        self.processing = set()  # tasks sent to the worker
        self.queue = []  # heap of (priority, seq, TaskState) held back
        self.nbytes = 0

    def __repr__(self):
        return "<WorkerState %s: %d processing, %d queued>" % (
            self.address, len(self.processing), len(self.queue))


class Scheduler:
    """See the module docstring.

    ``who_has``, ``has_what`` and ``nbytes`` are the center's tables (shared,
    so the center's handlers and the scheduler agree on where data is).
    """

    def __init__(self, who_has=None, has_what=None, nbytes=None,
                 allowed_failures=ALLOWED_FAILURES, saturation=2):
        self.who_has = who_has if who_has is not None else defaultdict(set)
        self.has_what = has_what if has_what is not None else defaultdict(set)
        self.nbytes = nbytes if nbytes is not None else {}
        self.tasks = {}
        self.workers = {}
        self.clients = {}  # client -> set of keys it wants
        self.unrunnable = set()
        self.allowed_failures = allowed_failures
        self.saturation = saturation
        self.durations = {}  # task prefix -> average seconds
        self._avg_duration = DEFAULT_TASK_DURATION
        self.to_workers = defaultdict(list)
        self.to_clients = defaultdict(list)
        self._seq = itertools.count()
        self._release_batch = defaultdict(list)
        # address -> tasks whose suspicious count its removal raised (the last
        # few removals): a death reported afterwards as caused by the data
        # held, not the tasks, takes that back (forgive_death)
        self._counted_deaths = OrderedDict()

    # -- workers and clients ------------------------------------------------------

    def add_worker(self, address, ncores=1):
        if address in self.workers:
            return
        ws = self.workers[address] = WorkerState(address, ncores or 1)
        for ts in sorted(self.unrunnable, key=lambda t: t.priority):
            if ts.state == "no-worker":
                self.unrunnable.discard(ts)
                self._ready(ts)
        self._fill(ws)  # takes queued work from busy workers

    def remove_worker(self, address, keys=(), cause=None):
        """The worker left; ``keys`` are the keys it held (already removed
        from ``who_has`` by the center); ``cause`` says why, for the errors
        of the tasks that erred for it ("its connection closed: ...")."""
        ws = self.workers.pop(address, None)
        self.to_workers.pop(address, None)
        # transfers already waiting on it (a cut link sends no FIN) are dropped
        news = {"op": "worker-removed", "address": address}
        for other in self.workers:
            self.to_workers[other].append(news)
        for client in self.clients:
            self.to_clients[client].append(news)
        to_reschedule = []
        if ws is not None:
            # a worker that ran out of memory because of the data it held
            # (results stored faster than spilled) says so before it exits:
            # its tasks are rescheduled without counting against them
            innocent = ws.memory_exit == "data"
            counted = []
            for ts in list(ws.processing):
                if ts.state != "processing" or ts.processing_on is not ws:
                    continue
                ts.processing_on = None
                if innocent:
                    to_reschedule.append(ts)
                    continue
                ts.suspicious += 1
                counted.append(ts)
                if ts.suspicious > self.allowed_failures:
                    exc = KilledWorker(
                        "task %r was running on %d workers that were lost; not "
                        "trying again. The last, %s: %s"
                        % (ts.key, ts.suspicious, address, cause or "it was removed"))
                    self._erred(ts, exc, None, str(exc))
                else:
                    to_reschedule.append(ts)
            for _, _, ts in ws.queue:
                if ts.state == "queued" and ts.processing_on is ws:
                    ts.processing_on = None
                    to_reschedule.append(ts)
            if counted:
                self._counted_deaths[address] = counted
                while len(self._counted_deaths) > 100:
                    self._counted_deaths.popitem(last=False)
        recompute = self._lost(keys, "it was scattered to %s, which was removed (%s)"
                             % (address, cause or "it left"))
        for ts in to_reschedule:
            ts.state = "released"
            recompute.append(ts)
        self._request(recompute)

    def _lost(self, keys, how):
        """Of ``keys`` (which lost a holder), those in memory nowhere now:
        released, their clients told; returns those to recompute.  Scattered
        ones (no task) are erred with ``LostData``, saying ``how``."""
        lost = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state != "memory" or self.who_has.get(key):
                continue
            lost.append(ts)
        recompute = []
        for ts in lost:
            ts.state = "released"
            self.nbytes.pop(ts.key, None)
            for client in ts.who_wants:
                self.to_clients[client].append({"op": "lost-data", "key": ts.key})
            for dep in ts.waiters:
                if dep.state in ("queued", "no-worker"):
                    dep.state = "waiting"
                    self.unrunnable.discard(dep)
                    dep.processing_on = None
                if dep.state == "waiting":
                    dep.waiting_on.add(ts)
            if ts.run_spec is None:
                exc = LostData(
                    "the data of %r was lost: %s; scattered data has no lineage "
                    "to recompute it from" % (ts.key, how))
                self._erred(ts, exc, None, str(exc))
            elif ts.who_wants or ts.waiters:
                recompute.append(ts)
        return recompute

    def remove_replicas(self, address, keys):
        """``address`` holds ``keys`` no more (in the shared tables only)."""
        held = self.has_what.get(address)
        for key in keys:
            if held is not None:
                held.discard(key)
            holders = self.who_has.get(key)
            if holders is not None:
                holders.discard(address)
                if not holders:
                    del self.who_has[key]
                    self.nbytes.pop(key, None)

    def missing_keys(self, address, keys=()):
        """``address`` was asked for ``keys`` and has not got them (deleted
        behind the center's back, a lost spill file): forget those replicas;
        a key now held nowhere is recomputed from its task, or, scattered,
        erred with ``LostData``."""
        keys = [k for k in keys if address in self.who_has.get(k, ())]
        if not keys:
            return
        logger.warning("worker %s lost %d keys it was listed as holding, e.g. %r",
                       address, len(keys), keys[0])
        self.remove_replicas(address, keys)
        self._request(self._lost(keys, "it was scattered to %s, which lost it"
                                 % address))

    def memory_exit(self, address, blame=None):
        """The worker is exiting past its memory limit; ``blame``: ``'data'``
        (what it held: its running tasks are not counted toward
        KilledWorker when it is removed) or ``'tasks'``."""
        ws = self.workers.get(address)
        if ws is not None:
            ws.memory_exit = blame if blame in ("data", "tasks") else "tasks"

    def forgive_death(self, address):
        """A worker removed earlier died of memory its data held (its nanny
        says so): the tasks that were running on it have that death taken
        off their count (those it already made fail stay failed)."""
        for ts in self._counted_deaths.pop(address, ()):
            if ts.state != "erred" and ts.suspicious > 0:
                ts.suspicious -= 1

    def set_paused(self, address, paused=True):
        """A worker over (or back under) its memory pause threshold.

        A paused worker is sent no task; the others take its queued ones.
        """
        ws = self.workers.get(address)
        if ws is None or ws.paused == bool(paused):
            return
        ws.paused = bool(paused)
        for other in [ws] if not paused else self.workers.values():
            self._fill(other)

    def add_client(self, client):
        self.clients.setdefault(client, set())

    def remove_client(self, client):
        keys = self.clients.pop(client, set())
        self.client_releases_keys(client, keys, _known=False)

    # -- inputs from executors ---------------------------------------------------

    def update_graph(self, client, tasks=None, dependencies=None, keys=(),
                     restrictions=None, loose_restrictions=(), priority=None,
                     lineage_only=False):
        """Add tasks and say which keys ``client`` wants.

        ``tasks`` maps key -> run spec (opaque to the scheduler);
        ``dependencies`` maps key -> keys it needs (which must be in this
        graph or already known); ``priority`` maps key -> a sortable value.
        A task whose key a worker already holds is in memory at once.
        ``lineage_only``: the tasks are sent again (to a restarted center)
        and run only where ``keys`` need them, not every one of them.
        """
        tasks = tasks or {}
        dependencies = dependencies or {}
        restrictions = restrictions or {}
        priority = priority or {}
        loose = set(loose_restrictions or ())
        _check_graph(tasks, dependencies, keys, restrictions, priority)
        self.add_client(client)
        cycle = find_cycle(dependencies)
        if cycle is not None:  # its tasks would wait on each other forever
            exc = CycleError(cycle)
            for key in keys:
                self.to_clients[client].append({
                    "op": "task-erred", "key": key, "exception": exc,
                    "traceback": None, "text": str(exc), "blob": False})
            return
        new, merged = [], []
        for key, spec in tasks.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, spec)
                if self.who_has.get(key):
                    # registered by a worker before this graph came (a center
                    # restart): in memory, and now with its lineage
                    ts.state = "memory"
                    ts.nbytes = self.nbytes.get(key)
                    merged.append(ts)
                else:
                    new.append(ts)
            elif ts.state == "released" and ts.run_spec is None:
                ts.run_spec = spec
            ts.priority = priority.get(key, ts.priority)
            if key in restrictions:
                ts.restrictions = set(restrictions[key])
                ts.loose_restrictions = key in loose
        missing_deps = {}
        for key, deps in dependencies.items():
            ts = self.tasks.get(key)
            if ts is None:
                continue
            for dep in deps:
                dts = self.tasks.get(dep)
                if dts is None:
                    missing_deps.setdefault(key, []).append(dep)
                    continue
                ts.dependencies.add(dts)
                dts.dependents.add(ts)
        wanted = self._want(client, keys)
        # report what is already known (before erring tasks whose dependencies
        # are unknown, which reports them once itself), request the rest
        for ts in wanted:
            self._report_state(ts, client)
        for key, deps in missing_deps.items():
            ts = self.tasks[key]
            exc = LostData("task %r depends on %s, which the scheduler does not "
                           "know (released or lost)" % (key, deps))
            self._erred(ts, exc, None, str(exc))
        if lineage_only:
            new = []
        new.sort(key=_priority)  # ready tasks go out in priority order
        self._request(new + wanted)
        for ts in merged:  # held by a worker, but needed by nobody
            self._maybe_release(ts)
        self._flush_releases()

    def client_desires_keys(self, client, keys):
        self.update_graph(client, keys=keys)

    def client_releases_keys(self, client, keys, _known=True):
        wants = self.clients.get(client, set()) if _known else set(keys)
        for key in keys:
            ts = self.tasks.get(key)
            wants.discard(key)
            if ts is None:
                continue
            ts.who_wants.discard(client)
            self._maybe_release(ts)
        self._flush_releases()

    def cancel(self, client, keys):
        self.client_releases_keys(client, keys)

    def retry(self, client, keys):
        """Run the erred ``keys`` again, and the erred tasks they depend on.

        The client hears of every key again: a key not erred (any more)
        reports its state, an unknown one (a new center) errs.
        """
        self.add_client(client)
        stack, rerun = [], []
        for ts in self._want(client, keys):
            if ts.state == "erred":
                stack.append(ts)
            elif ts.state == "released":  # sent again to a restarted center
                rerun.append(ts)
            else:
                self._report_state(ts, client)  # in memory: says so; else it will
        roots, seen = [], set()
        while stack:
            ts = stack.pop()
            if ts in seen or ts.state != "erred":
                continue
            seen.add(ts)
            roots.append(ts)
            stack.extend(ts.dependencies)
        for ts in roots:
            self._forget_error(ts)
        self._request(roots + rerun)
        self._flush_releases()

    def _want(self, client, keys):
        """``client`` wants ``keys``: their tasks (an unknown key errs for it)."""
        wanted = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                self.to_clients[client].append(self._unknown_key_msg(key))
                continue
            ts.who_wants.add(client)
            self.clients[client].add(key)
            wanted.append(ts)
        return wanted

    def _forget_error(self, ts):
        ts.state = "released"
        ts.exception = ts.traceback = ts.text = None
        ts.retries = ts.suspicious = 0

    def update_data(self, client, who_has, nbytes=None):
        """Data the client scattered: ``who_has`` is ``{key: [address]}``.

        The holders are sent ``confirm-data``: it follows, on the same
        stream, any ``delete-data`` of an earlier copy of the same key.
        """
        self.add_client(client)
        nbytes = nbytes or {}
        confirm = defaultdict(list)
        for key, addresses in who_has.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, None)
            for addr in addresses:
                self._add_replica(ts, addr, nbytes.get(key))
                confirm[addr].append(key)
            ts.who_wants.add(client)
            self.clients[client].add(key)
            if ts.state != "memory":
                self._set_memory(ts, type=None)
        self._flush_releases()
        for addr, keys in confirm.items():
            self.to_workers[addr].append({"op": "confirm-data", "keys": keys})

    def restart(self):
        """Forget every task; workers are told to drop their data."""
        for address in self.workers:
            keys = list(self.has_what.get(address, ()))
            self.to_workers[address].append({"op": "delete-data", "keys": keys,
                                             "all": True})
        for client in self.clients:
            self.to_clients[client].append({"op": "restart"})
            self.clients[client] = set()
        for key in list(self.tasks):
            self.who_has.pop(key, None)
            self.nbytes.pop(key, None)
        for address in self.has_what:
            self.has_what[address] = set()
        self.tasks.clear()
        self.unrunnable.clear()
        for ws in self.workers.values():
            ws.processing.clear()
            ws.queue.clear()

    # -- inputs from workers ------------------------------------------------------

    def task_finished(self, address, key, nbytes=None, type=None, startstops=None,
                      value=None):
        """``key`` is in memory on ``address``.  ``value``: for small results,
        the pickled value itself, passed on to the clients that want it so
        they need not fetch it."""
        ts = self.tasks.get(key)
        ws = self.workers.get(address)
        if ws is not None and ts is not None:
            ws.processing.discard(ts)
        if ts is None or ts.state in ("released", "erred"):
            # nobody wants it any more: the worker drops it
            self.to_workers[address].append({"op": "delete-data", "keys": [key]})
            if ts is not None:
                self._maybe_forget(ts)
        else:
            if startstops:
                self._record_duration(ts.prefix, startstops[1] - startstops[0])
            self._add_replica(ts, address, nbytes)
            if ts.state != "memory":
                other = ts.processing_on
                if other is not None and other is not ws:
                    other.processing.discard(ts)  # it may still report: a replica
                ts.processing_on = None
                self._set_memory(ts, type, value)
        if ws is not None:
            self._fill(ws)
        self._flush_releases()

    def task_erred(self, address, key, exception=None, traceback=None, text=None):
        ts = self.tasks.get(key)
        ws = self.workers.get(address)
        if ws is not None and ts is not None:
            ws.processing.discard(ts)
        if ts is not None and ts.state == "processing" and ts.processing_on is ws:
            ts.processing_on = None
            self._erred(ts, exception, traceback, text)
        if ws is not None:
            self._fill(ws)
        self._flush_releases()

    def missing_data(self, address, key, missing=(), bad_workers=()):
        """A worker could not fetch ``missing`` inputs of ``key``."""
        ts = self.tasks.get(key)
        ws = self.workers.get(address)
        if ws is not None and ts is not None:
            ws.processing.discard(ts)
        for bad in bad_workers:
            self.remove_replicas(bad, missing)
        recompute = self._lost(missing, "no holder could hand it over to %s" % address)
        if ts is None or ts.state != "processing" or ts.processing_on is not ws:
            self._request(recompute)
            if ws is not None:
                self._fill(ws)
            return
        ts.processing_on = None
        ts.retries += 1
        ts.state = "released"
        if ts.retries > MISSING_DATA_RETRIES:
            # holders that answer but cannot hand the data over (a value
            # that does not serialize) would otherwise be asked forever
            exc = LostData(
                "task %r could not get its inputs %s from %s after %d tries; a "
                "value that cannot be serialized does this"
                % (key, list(missing), list(bad_workers), ts.retries))
            self._erred(ts, exc, None, str(exc))
        self._request([ts] + [d for d in recompute if d.who_wants or d.waiters])
        if ws is not None:
            self._fill(ws)

    def add_keys(self, address, keys, nbytes=None):
        """``address`` now holds ``keys``: copies fetched from peers, or the
        keys of a worker that registered with this (restarted) center.

        A key still needed and not in memory yet is in memory now (merged
        with its task, so its lineage is kept); an unknown key is recorded,
        for an executor to claim with its task (see :meth:`update_graph`).
        """
        nbytes = nbytes or {}
        unwanted = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                self.has_what[address].add(key)
                self.who_has[key].add(address)
            elif ts.state == "memory":
                self._add_replica(ts, address, nbytes.get(key))
            elif self._welcome(ts):
                self._add_replica(ts, address, nbytes.get(key))
                # a queue entry goes stale; a run under way reports a replica
                ts.processing_on = None
                self.unrunnable.discard(ts)
                self._set_memory(ts, ts.type)
            else:  # released or erred meanwhile
                unwanted.append(key)
        if unwanted:
            self.remove_replicas(address, unwanted)
            self.to_workers[address].append({"op": "delete-data", "keys": unwanted})

    def rejoin(self, address, keys, nbytes=None):
        """A worker this center removed (silent past the heartbeat timeout,
        or its stream closed) is back with ``keys``.  Those still needed and
        in memory nowhere are welcome; it is told to delete the others:
        released meanwhile, or recomputed elsewhere."""
        welcome = [k for k in keys if k in self.tasks and self._welcome(self.tasks[k])]
        self.add_keys(address, welcome, nbytes)
        welcome = set(welcome)
        unwanted = [k for k in keys if k not in welcome]
        if unwanted:
            logger.info("worker %s came back with %d keys nobody needs; deleting them",
                        address, len(unwanted))
            self.to_workers[address].append({"op": "delete-data", "keys": unwanted})

    @staticmethod
    def _welcome(ts):
        """Is data for ``ts``, not in memory now, wanted?"""
        return (ts.state in ("released", "waiting", "queued", "no-worker", "processing")
                and bool(ts.who_wants or ts.waiters))

    # -- transitions --------------------------------------------------------------

    def _report_state(self, ts, client):
        if ts.state == "memory":
            self.to_clients[client].append({
                "op": "key-in-memory", "key": ts.key, "type": ts.type,
                "workers": list(self.who_has.get(ts.key, ()))})
        elif ts.state == "erred":
            self.to_clients[client].append(self._erred_msg(ts))

    def _unknown_key_msg(self, key):
        return {"op": "task-erred", "key": key,
                "exception": LostData("key %r is not known to the scheduler; it "
                                      "was released or never existed" % (key,)),
                "traceback": None, "blob": False}

    def _erred_msg(self, ts):
        return {"op": "task-erred", "key": ts.key, "exception": ts.exception,
                "traceback": ts.traceback, "text": ts.text,
                "blob": type(ts.exception) is bytes}

    def _request(self, roots):
        """Make sure every task in ``roots`` is, or will be, in memory."""
        # collect the released tasks that must run: roots and released deps
        order = []
        seen = set()
        stack = [ts for ts in roots if ts.state == "released"]
        while stack:
            ts = stack.pop()
            if ts in seen or ts.state != "released":
                continue
            seen.add(ts)
            order.append(ts)
            for dep in ts.dependencies:
                if dep.state == "released" and dep not in seen:
                    stack.append(dep)
        for ts in order:
            if ts.run_spec is None:
                exc = LostData("%r has no data and no task to compute it" % (ts.key,))
                self._erred(ts, exc, None, str(exc))
        # dependencies first, so that ready tasks find their inputs placed
        for ts in reversed(order):
            if ts.state != "released":
                continue
            ts.state = "waiting"
            ts.waiting_on = set()
            erred_dep = None
            for dep in ts.dependencies:
                dep.waiters.add(ts)
                if dep.state == "memory":
                    continue
                if dep.state == "erred":
                    erred_dep = dep
                    break
                ts.waiting_on.add(dep)
            if erred_dep is not None:
                self._erred_from(ts, erred_dep)
            elif not ts.waiting_on:
                self._ready(ts)

    def _ready(self, ts):
        ws = self._choose_worker(ts)
        if ws is None:
            ts.state = "no-worker"
            self.unrunnable.add(ts)
            return
        if len(ws.processing) < self._limit(ws):
            self._send(ws, ts)
        else:
            ts.state = "queued"
            ts.processing_on = ws
            heapq.heappush(ws.queue, (ts.priority, next(self._seq), ts))

    def _send(self, ws, ts):
        ts.state = "processing"
        ts.processing_on = ws
        ws.processing.add(ts)
        who_has = {}
        nbytes = {}
        for dep in ts.dependencies:
            who_has[dep.key] = list(self.who_has.get(dep.key, ()))
            if dep.nbytes is not None:
                nbytes[dep.key] = dep.nbytes
        self.to_workers[ws.address].append({
            "op": "compute-task", "key": ts.key, "spec": ts.run_spec,
            "who_has": who_has, "nbytes": nbytes, "priority": ts.priority,
        })

    def _fill(self, ws):
        """Send queued tasks while ``ws`` has free slots."""
        limit = self._limit(ws)
        queue = ws.queue
        while len(ws.processing) < limit:
            if not queue:
                self._steal_for(ws)
                if not queue:
                    return
            _, _, ts = heapq.heappop(queue)
            if ts.state == "queued" and ts.processing_on is ws:
                self._send(ws, ts)

    def _limit(self, ws):
        """Tasks in flight on ``ws``: its cores plus enough to cover a round
        trip (about ``LATENCY`` seconds of work), at least ``saturation``;
        none while it is paused."""
        if ws.paused:
            return 0
        extra = int(LATENCY * ws.ncores / max(self._avg_duration, 1e-6))
        return ws.ncores + max(self.saturation, min(extra, MAX_EXTRA))

    def _steal_for(self, ws):
        """Move queued, unrestricted tasks from the busiest worker to ``ws``."""
        if len(ws.processing) >= ws.ncores or not self.workers:
            return
        victim = max(self.workers.values(), key=lambda w: len(w.queue))
        if victim is ws or not victim.queue:
            return
        take = max(1, len(victim.queue) // (len(self.workers)))
        kept, moved = [], 0
        for item in victim.queue:
            ts = item[2]
            if ts.state != "queued" or ts.processing_on is not victim:
                continue  # stale entry: drop it
            if moved < take and (ts.restrictions is None or ws.address in ts.restrictions
                                 or ts.loose_restrictions):
                ts.processing_on = ws
                heapq.heappush(ws.queue, item)
                moved += 1
            else:
                kept.append(item)
        heapq.heapify(kept)
        victim.queue = kept

    def _choose_worker(self, ts):
        workers = self.workers
        if not workers:
            return None
        candidates = None
        if ts.restrictions is not None:
            candidates = [workers[a] for a in ts.restrictions if a in workers]
            if not candidates:
                if not ts.loose_restrictions:
                    return None
                candidates = None
        if candidates is None:
            if ts.dependencies:
                holders = set()
                for dep in ts.dependencies:
                    holders.update(self.who_has.get(dep.key, ()))
                candidates = [workers[a] for a in holders if a in workers]
                # also consider the least busy worker
                idle = min(workers.values(), key=_load)
                if idle not in candidates:
                    candidates.append(idle)
            else:
                return min(workers.values(), key=_load)
        if len(candidates) == 1:
            return candidates[0]
        duration = self.durations.get(ts.prefix, DEFAULT_TASK_DURATION)

        def cost(ws):
            if ws.paused:
                return float("inf")
            missing = 0
            for dep in ts.dependencies:
                if ws.address not in self.who_has.get(dep.key, ()):
                    missing += dep.nbytes or 0
            queued = len(ws.processing) + len(ws.queue)
            return missing / BANDWIDTH + queued * duration / ws.ncores

        return min(candidates, key=cost)

    def _add_replica(self, ts, address, nbytes=None):
        if nbytes is not None:
            ts.nbytes = nbytes
            self.nbytes[ts.key] = nbytes
        self.who_has[ts.key].add(address)
        self.has_what[address].add(ts.key)

    def _set_memory(self, ts, type=None, value=None):
        ts.state = "memory"
        ts.type = type
        workers = list(self.who_has.get(ts.key, ()))
        for client in ts.who_wants:
            msg = {"op": "key-in-memory", "key": ts.key, "type": type, "workers": workers}
            if value is not None:
                msg["value"] = value
            self.to_clients[client].append(msg)
        for dts in ts.waiters:
            if dts.state == "waiting":
                dts.waiting_on.discard(ts)
                if not dts.waiting_on:
                    self._ready(dts)
        for dep in ts.dependencies:
            dep.waiters.discard(ts)
            self._maybe_release(dep)
        self._maybe_release(ts)

    def _erred(self, ts, exception, traceback, text):
        """``ts`` failed; so does everything waiting on it."""
        if ts.state == "erred":
            return
        ts.exception = exception
        ts.traceback = traceback
        ts.text = text
        self._set_erred(ts)
        stack = list(ts.waiters)
        while stack:
            dts = stack.pop()
            if dts.state in ("waiting", "queued", "no-worker", "released"):
                dts.exception, dts.traceback, dts.text = exception, traceback, text
                self._set_erred(dts)
                stack.extend(dts.waiters)

    def _erred_from(self, ts, dep):
        self._erred(ts, dep.exception, dep.traceback, dep.text)

    def _set_erred(self, ts):
        ts.state = "erred"
        ts.processing_on = None
        self.unrunnable.discard(ts)
        for client in ts.who_wants:
            self.to_clients[client].append(self._erred_msg(ts))
        for dep in ts.dependencies:
            dep.waiters.discard(ts)
            self._maybe_release(dep)
        self._maybe_forget(ts)

    def _maybe_release(self, ts):
        """Drop ``ts`` (its data, or its pending run) if nothing needs it."""
        if ts.who_wants or ts.waiters:
            return
        state = ts.state
        if state == "memory":
            for address in self.who_has.pop(ts.key, ()):
                self.has_what.get(address, set()).discard(ts.key)
                self._release_batch[address].append(ts.key)
            self.nbytes.pop(ts.key, None)
            ts.state = "released"
        elif state in ("waiting", "queued", "no-worker", "processing"):
            ts.state = "released"
            self.unrunnable.discard(ts)
            for dep in ts.dependencies:
                dep.waiters.discard(ts)
                self._maybe_release(dep)
        self._maybe_forget(ts)

    def _maybe_forget(self, ts):
        """Forget tasks nobody can need again (iteratively, up the graph)."""
        stack = [ts]
        while stack:
            ts = stack.pop()
            if ts.state not in ("released", "erred") or ts.who_wants or ts.dependents:
                continue
            if self.tasks.get(ts.key) is not ts:
                continue
            if ts.processing_on is not None and ts in ts.processing_on.processing:
                continue  # still running somewhere; forgotten when it reports
            del self.tasks[ts.key]
            for dep in ts.dependencies:
                dep.dependents.discard(ts)
                dep.waiters.discard(ts)
                if not dep.who_wants and not dep.waiters:
                    if dep.state == "memory":
                        self._maybe_release(dep)
                    else:
                        stack.append(dep)
            ts.dependencies = set()

    def _flush_releases(self):
        for address, keys in self._release_batch.items():
            if address in self.workers:
                self.to_workers[address].append({"op": "delete-data", "keys": keys})
        self._release_batch.clear()

    def _record_duration(self, prefix, duration):
        old = self.durations.get(prefix)
        self.durations[prefix] = duration if old is None else 0.8 * old + 0.2 * duration
        self._avg_duration = 0.9 * self._avg_duration + 0.1 * duration

    # -- helpers for the center ---------------------------------------------------------

    def flush(self):
        """Take the outgoing messages: ``(to_workers, to_clients)``."""
        self._flush_releases()
        tw, tc = self.to_workers, self.to_clients
        self.to_workers = defaultdict(list)
        self.to_clients = defaultdict(list)
        return tw, tc

    def processing(self):
        return {a: [ts.key for ts in ws.processing] for a, ws in self.workers.items()}

    def task_states(self):
        return {key: ts.state for key, ts in self.tasks.items()}


def _check_graph(tasks, dependencies, keys, restrictions, priority):
    """Refuse a malformed graph whole, before any state changes."""
    for name, value in (("tasks", tasks), ("dependencies", dependencies),
                        ("restrictions", restrictions), ("priority", priority)):
        if not isinstance(value, dict):
            raise TypeError("update-graph: %s must be a dict, got %s"
                            % (name, type(value).__name__))
    for key, deps in dependencies.items():
        if not isinstance(deps, (list, tuple, set, frozenset)):
            raise TypeError("update-graph: dependencies of %r must be a list, got %s"
                            % (key, type(deps).__name__))
    if not isinstance(keys, (list, tuple, set, frozenset)):
        raise TypeError("update-graph: keys must be a list, got %s" % type(keys).__name__)
    for key in itertools.chain(tasks, keys):
        validate_key(key)  # a NaN key could never be found again


def _priority(ts):
    return ts.priority


def _load(ws):
    if ws.paused:
        return float("inf")
    return (len(ws.processing) + len(ws.queue)) / ws.ncores
