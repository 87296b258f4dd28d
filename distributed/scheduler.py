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
``lost``      its worker died and it is about to err (it has killed too many
              workers, or it was scattered data only that worker held):
              held until the worker's nanny says why (:meth:`worker_died`,
              or :meth:`decide_death` when no report comes), so that the
              error names the cause
``forgotten`` not a state a task is in: the scheduler dropped it

Every change of state goes through :meth:`Scheduler._transition`, which
allows only the pairs in :data:`TRANSITIONS`, logs each one (see
:meth:`Scheduler.story`) and tells the plugins (:class:`SchedulerPlugin`).
:meth:`Scheduler.validate` checks the invariants the code relies on.

A worker gets at most ``saturation`` tasks beyond its cores, so that new
and freed workers can take the rest; a worker with a free slot and nothing
queued takes queued work from the busiest worker.  Placement prefers the
worker already holding most of a task's input bytes (it keeps the task while
it has a free slot, busy or not, when that saves ``LOCAL_BYTES`` or more of
transfer), else the least busy one; small inputs are weighed against how
long the queues are.  Among ready tasks the lowest ``priority`` goes first; a
task with ``retries`` left runs again when it raises; a task asking for
``resources`` runs only on a worker that has them free (see
:meth:`Scheduler.update_graph`).
"""

import heapq
import itertools
import logging
from collections import OrderedDict, defaultdict, deque
from time import time

from .graph import CycleError, find_cycle
from .utils import key_split, validate_key

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "SchedulerPlugin", "TaskState", "WorkerState", "KilledWorker",
           "WorkerDeath",
           "LostData", "InvalidTransition", "InvariantError", "TRANSITIONS"]

#: how many worker deaths while running a task before it is marked erred
ALLOWED_FAILURES = 3
#: how many worker deaths the scheduler remembers (to take in their nanny's
#: report of why); an older one still awaiting its report is decided
MAX_DEATHS = 100
#: how many times a task may fail to fetch its inputs before it is marked erred
MISSING_DATA_RETRIES = 10
#: assumed bandwidth between workers, bytes/s, to weigh locality against load
BANDWIDTH = 200e6
#: a task whose inputs on one worker outweigh those elsewhere by this many
#: bytes runs there if it has a free slot, busy or not (smaller inputs are
#: weighed against the queues: cheaper to move than to wait for)
LOCAL_BYTES = 1000000
#: assumed duration of a task never seen before, seconds
DEFAULT_TASK_DURATION = 0.001
#: seconds of work to keep in flight on a worker, beyond its cores
LATENCY = 0.005
#: at most this many tasks in flight on a worker beyond its cores
MAX_EXTRA = 100
#: how many transitions (of all keys) :meth:`Scheduler.story` can look back on
TRANSITION_LOG_LENGTH = 100000
#: set (to anything but "" or "0") to run :meth:`Scheduler.validate` in the
#: center after every batch of messages (the executor and resilience tests do)
VALIDATE_ENV = "DISTRIBUTED_VALIDATE"
#: the client that wants the keys of :meth:`Scheduler.fire_and_forget`
#: until they are computed (a name no executor has: theirs are "executor-...")
FIRE_AND_FORGET = "fire-and-forget"

# -- task states -------------------------------------------------------------------

RELEASED = "released"
WAITING = "waiting"
NO_WORKER = "no-worker"
QUEUED = "queued"
PROCESSING = "processing"
MEMORY = "memory"
ERRED = "erred"
LOST = "lost"
FORGOTTEN = "forgotten"  # the task is dropped from ``Scheduler.tasks``

#: every allowed change of state, ``(start, finish): when it happens``.  How
#: can a task go from A to B?  Look up ``(A, B)``; absent means never (an
#: attempt raises :class:`InvalidTransition`).
TRANSITIONS = {
    (RELEASED, WAITING): "a client (or a waiting dependent) wants it",
    (RELEASED, MEMORY): "a worker turns out to hold it, or a client scattered it",
    (RELEASED, ERRED): "it has no task to compute it (scattered data lost), or "
                       "a dependency erred, or missing-data retries ran out",
    (RELEASED, FORGOTTEN): "nothing wants it nor depends on it any more",
    (WAITING, PROCESSING): "its dependencies are in memory: sent to a worker",
    (WAITING, QUEUED): "its dependencies are in memory: held for a busy worker",
    (WAITING, NO_WORKER): "its dependencies are in memory, but no worker may run it",
    (WAITING, MEMORY): "a worker turns out to hold it, or a client scattered it",
    (WAITING, ERRED): "a dependency erred",
    (WAITING, RELEASED): "nobody wants it any more",
    (NO_WORKER, PROCESSING): "a worker that may run it arrived",
    (NO_WORKER, QUEUED): "a worker that may run it arrived, busy",
    (NO_WORKER, WAITING): "an input was lost",
    (NO_WORKER, MEMORY): "a worker turns out to hold it, or a client scattered it",
    (NO_WORKER, ERRED): "a dependency erred",
    (NO_WORKER, RELEASED): "nobody wants it any more",
    (QUEUED, PROCESSING): "its worker has a free slot",
    (QUEUED, WAITING): "an input was lost",
    (QUEUED, MEMORY): "a worker turns out to hold it, or a client scattered it",
    (QUEUED, ERRED): "a dependency erred",
    (QUEUED, RELEASED): "nobody wants it any more, or its worker left",
    (PROCESSING, MEMORY): "a worker finished it (or a client scattered it)",
    (PROCESSING, ERRED): "it raised, or killed too many workers",
    (PROCESSING, RELEASED): "nobody wants it any more (it may still finish), its "
                            "worker left, it could not fetch its inputs, or it "
                            "raised and has retries left (submit(..., retries=n))",
    (PROCESSING, LOST): "its worker died, one death too many: held until the "
                        "worker's nanny says why",
    (MEMORY, RELEASED): "nobody wants it any more, or every holder lost it",
    (MEMORY, LOST): "scattered data whose only holder died: held until the "
                    "worker's nanny says why",
    (LOST, ERRED): "the cause of the death is known (or waited for long "
                   "enough): KilledWorker, or LostData for scattered data",
    (LOST, RELEASED): "the death was forgiven (its data was to blame): run "
                      "again; or nobody wants it any more",
    (LOST, MEMORY): "a worker turns out to hold it, or a client scattered it",
    (ERRED, RELEASED): "a client retries it",
    (ERRED, MEMORY): "a client scattered data under its key",
    (ERRED, FORGOTTEN): "nothing wants it nor depends on it any more",
}

#: the states a task in ``Scheduler.tasks`` can be in
STATES = frozenset(s for pair in TRANSITIONS for s in pair) - {FORGOTTEN}
#: wanted, not in memory yet: the scheduler is working on it
PENDING = frozenset({WAITING, NO_WORKER, QUEUED, PROCESSING, LOST})
#: ready to run, not sent to a worker yet
READY = frozenset({NO_WORKER, QUEUED})
#: erred with a dependency: every state that has not run (yet)
NOT_STARTED = frozenset({RELEASED, WAITING, NO_WORKER, QUEUED})
#: nothing more happens to it unless wanted again: may be forgotten
FINISHED = frozenset(start for start, finish in TRANSITIONS if finish == FORGOTTEN)
#: data for it arriving is welcome (if wanted): not in memory, not erred
NOT_IN_MEMORY = frozenset({RELEASED}) | PENDING
#: state -> the states it may go to (what ``_transition`` looks up)
_NEXT = {start: frozenset(b for a, b in TRANSITIONS if a == start)
         for start, _ in TRANSITIONS}
_LOG_FIELDS = 6  # key, start, finish, cause, worker, time


class InvalidTransition(RuntimeError):
    """A change of state :data:`TRANSITIONS` does not allow: a scheduler bug."""


class InvariantError(AssertionError):
    """:meth:`Scheduler.validate` found the scheduler's tables inconsistent
    about ``key``."""

    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


class KilledWorker(Exception):
    """Workers died while running this task, too many times to try again."""


class LostData(Exception):
    """Data that could not be recomputed (scattered, no lineage) was lost."""


class TaskState:
    __slots__ = (
        "key", "state", "run_spec", "dependencies", "dependents", "waiting_on",
        "waiters", "who_wants", "priority", "processing_on", "restrictions",
        "loose_restrictions", "nbytes", "exception", "traceback", "text",
        "suspicious", "type", "prefix", "retries", "deaths", "lost_with",
        "retries_left", "resources",
    )

    def __init__(self, key, run_spec=None, priority=(0,)):
        self.key = key
        self.state = RELEASED
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
        self.deaths = ()  # a WorkerDeath per death counted in ``suspicious``
        self.lost_with = None  # state 'lost': the WorkerDeath it waits on
        self.type = None
        self.prefix = key_split(key)
        self.retries = 0  # failed fetches of its inputs (missing-data)
        self.retries_left = 0  # times it may still be run again if it raises
        self.resources = None  # {name: amount} it holds of its worker's while running

    def __lt__(self, other):  # heap ties
        return self.priority < other.priority

    def __repr__(self):
        return "<Task %r %s>" % (self.key, self.state)


class WorkerState:
    __slots__ = ("address", "ncores", "processing", "queue", "paused", "memory_exit",
                 "resources", "used_resources")

    def __init__(self, address, ncores, resources=None):
        self.address = address
        self.ncores = ncores
        #: ``{name: amount}`` it has (``dworker --resources GPU=2``), and of
        #: those, what the tasks in ``processing`` hold
        self.resources = dict(resources or {})
        self.used_resources = dict.fromkeys(self.resources, 0)
        self.paused = False  # over its memory pause threshold: send it nothing
        # exiting past its memory limit: 'data' (what it held is to blame, not
        # its tasks) or 'tasks'; None: not exiting for memory
        self.memory_exit = None
        self.processing = set()  # tasks sent to the worker
        self.queue = []  # heap of (priority, seq, TaskState) held back

    def __repr__(self):
        return "<WorkerState %s: %d processing, %d queued>" % (
            self.address, len(self.processing), len(self.queue))


class WorkerDeath:
    """One worker's removal, as the tasks it counted against remember it.

    ``cause`` starts as what the center saw ("its connection closed: ...")
    and becomes what the worker's nanny says ("killed by signal SIGSEGV")
    when its report comes (:meth:`Scheduler.worker_died`).  ``counted``:
    keys whose ``suspicious`` count it raised; ``held``: keys in state
    ``lost`` waiting for the report; ``awaiting``: a report may still come.

    >>> d = WorkerDeath('127.0.0.1:4001', 'its connection closed')
    >>> d.cause = 'killed by signal SIGSEGV'; str(d)
    'killed by signal SIGSEGV (127.0.0.1:4001)'
    """

    __slots__ = ("address", "cause", "counted", "held", "awaiting")

    def __init__(self, address, cause, awaiting=False):
        self.address = address
        self.cause = cause or "it was removed"
        self.counted = []
        self.held = []
        self.awaiting = awaiting

    def __str__(self):
        return "%s (%s)" % (self.cause, self.address)

    def __repr__(self):
        return "<WorkerDeath %s: %s%s>" % (self.address, self.cause,
                                           ", awaiting its report" if self.awaiting else "")


def killed_worker_message(key, deaths, allowed_failures):
    """The text of a task's :class:`KilledWorker`: every death it saw.

    >>> killed_worker_message('x', [WorkerDeath('a:1', 'killed by signal SIGSEGV'),
    ...                             WorkerDeath('b:1', 'exit code 1')], 1)
    "task 'x' was running on 2 workers that died: killed by signal SIGSEGV (a:1); exit code 1 (b:1). Not trying again (allowed failures: 1)"
    """
    return ("task %r was running on %d workers that died: %s. Not trying again "
            "(allowed failures: %d)" % (key, len(deaths), "; ".join(map(str, deaths)),
                                        allowed_failures))


class SchedulerPlugin:
    """Watch a scheduler: subclass, override what you need, and
    ``scheduler.add_plugin(plugin)``.  Methods are called synchronously,
    after the change; an exception is logged and otherwise ignored.

    >>> class Counter(SchedulerPlugin):
    ...     def __init__(self):
    ...         self.finished = 0
    ...     def transition(self, key, start, finish, **info):
    ...         self.finished += finish == "memory"
    >>> s = Scheduler()
    >>> s.add_plugin(Counter())
    """

    def transition(self, key, start, finish, cause=None, worker=None):
        """``key`` went from state ``start`` to ``finish`` (see
        :data:`TRANSITIONS`); ``cause`` says why, ``worker`` is the worker
        involved (running it, reporting it) or None."""

    def add_worker(self, address):
        """A worker joined (it may now be sent tasks)."""

    def remove_worker(self, address, cause=None):
        """A worker left; ``cause`` says why (None: not known).  For a worker
        whose nanny may tell why it died, called once it has (or a short
        grace period passed): with the nanny's cause."""

    def task_finished(self, key, worker, startstops=None, thread=None, transfer=None):
        """``worker`` reported ``key`` done: ``startstops`` ``(start, stop)``
        of its run, in ``thread`` (an id of the worker's thread), after
        fetching its inputs during ``transfer`` ``(start, stop)`` (or None)."""

    def restart(self):
        """Every task was forgotten (a client restarted the cluster)."""


class Scheduler:
    """See the module docstring.

    The scheduler owns every table about tasks and data: ``tasks``,
    ``workers``, ``clients``, and ``who_has`` ``{key: {address}}``,
    ``has_what`` ``{address: {key}}``, ``nbytes`` ``{key: int}``.  The center
    reads them and changes them only through the scheduler's methods
    (:meth:`add_replicas`, :meth:`remove_replicas`, ...).
    """

    def __init__(self, allowed_failures=ALLOWED_FAILURES, saturation=2,
                 transition_log_length=TRANSITION_LOG_LENGTH):
        self.who_has = defaultdict(set)
        self.has_what = defaultdict(set)
        self.nbytes = {}
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
        # address -> WorkerDeath of the last MAX_DEATHS removals: its nanny's
        # report (worker_died) gives the cause, or, blaming the data held,
        # takes back the deaths counted against its tasks (forgive_death)
        self.deaths = OrderedDict()
        # the latest transitions, flat: key, start, finish, cause, worker,
        # time, key, ... (no tuple per transition for the garbage collector
        # to count and scan: see transition_log)
        self._log = deque(maxlen=_LOG_FIELDS * transition_log_length)
        self.plugins = []

    # -- the one place a task changes state --------------------------------------

    def _transition(self, ts, finish, cause, worker=None):
        """Move ``ts`` to state ``finish``; ``cause`` (a short text) and
        ``worker`` (an address, or None) go into the log and to the plugins.

        Only the pairs in :data:`TRANSITIONS` are allowed; the callers do
        the work that goes with a change (messages, tables).
        """
        start = ts.state
        if finish not in _NEXT.get(start, ()):
            raise InvalidTransition(
                "scheduler bug: task %r cannot go from %r to %r (%s); allowed from %r: "
                "%s" % (ts.key, start, finish, cause, start, sorted(_NEXT.get(start, ()))))
        if finish != FORGOTTEN:
            ts.state = finish
        if start == LOST:
            ts.lost_with = None  # no longer waiting for a nanny's report
        self._log.extend((ts.key, start, finish, cause, worker, time()))
        if self.plugins:  # _tell_plugins inlined: this runs for every transition
            for plugin in self.plugins:
                try:
                    plugin.transition(ts.key, start, finish, cause=cause, worker=worker)
                except Exception:
                    logger.exception("scheduler plugin %r failed in transition(%r)",
                                     plugin, ts.key)

    def story(self, *keys):
        """What happened to ``keys`` and why, oldest first (as far back as
        the log reaches, :data:`TRANSITION_LOG_LENGTH` transitions of all
        keys): a list of dicts ``{'key', 'start', 'finish', 'cause',
        'worker', 'time'}``.

        >>> s = Scheduler()
        >>> s.add_worker('w1:1')
        >>> s.update_graph('c1', tasks={'x': 'spec'}, dependencies={}, keys=['x'])
        >>> [(e['start'], e['finish']) for e in s.story('x')]
        [('released', 'waiting'), ('waiting', 'processing')]
        """
        keys = set(keys)
        return [{"key": key, "start": start, "finish": finish, "cause": cause,
                 "worker": worker, "time": t}
                for key, start, finish, cause, worker, t in self.transition_log
                if key in keys]

    @property
    def transition_log(self):
        """The latest transitions (of all keys), oldest first: a list of
        ``(key, start, finish, cause, worker, time)``."""
        log = list(self._log)
        return [tuple(log[i:i + _LOG_FIELDS]) for i in range(0, len(log), _LOG_FIELDS)]

    def add_plugin(self, plugin):
        """Tell ``plugin`` (a :class:`SchedulerPlugin`) of every transition
        and every worker added or removed from now on."""
        self.plugins.append(plugin)

    def remove_plugin(self, plugin):
        self.plugins.remove(plugin)

    def _tell_plugins(self, method, *args, **kwargs):
        for plugin in self.plugins:
            try:
                getattr(plugin, method)(*args, **kwargs)
            except Exception:
                logger.exception("scheduler plugin %r failed in %s%r", plugin, method,
                                 args)

    # -- workers and clients ------------------------------------------------------

    def add_worker(self, address, ncores=1, resources=None):
        """``address`` may be sent tasks now.  The keys it registered with
        (:meth:`add_replicas`) are merged with their tasks first (see
        :meth:`add_keys`), so that a task waiting for one it holds is not
        sent to it.  ``resources``: ``{name: amount}`` it has, which tasks
        asking for them (``update_graph(resources=...)``) hold while they
        run there."""
        if address in self.workers:
            return
        self.decide_death(address)  # a worker of that address that died is gone
        held = self.has_what.get(address)
        if held:
            self.add_keys(address, list(held), self.nbytes)
        ws = self.workers[address] = WorkerState(address, ncores or 1, resources)
        if self.plugins:
            self._tell_plugins("add_worker", address)
        for ts in sorted(self.unrunnable, key=_priority):
            if ts.state == NO_WORKER:
                self.unrunnable.discard(ts)
                self._ready(ts, "worker %s arrived" % address)
        self._fill(ws)  # takes queued work from busy workers

    def remove_worker(self, address, cause=None, report_expected=False):
        """The worker left, with the keys it held; ``cause`` says why, for
        the errors of the tasks that erred for it ("its connection closed:
        ...").  Works for an address that only registered keys, too.

        ``report_expected``: its nanny will probably say why it died
        (:meth:`worker_died`).  Then what would err at once waits for that
        report in state ``lost``: a task that has killed one worker too many
        (``KilledWorker``), scattered data it alone held (``LostData``); so
        does telling the plugins.  The center calls :meth:`decide_death`
        when no report came in time.  The rest is rescheduled at once.
        """
        ws = self.workers.get(address)
        if address in self.deaths:  # the same address died before: settle that
            self.decide_death(address)
        death = WorkerDeath(address, cause, awaiting=report_expected and ws is not None)
        if ws is not None:
            self.deaths.pop(address, None)
            self.deaths[address] = death
            while len(self.deaths) > MAX_DEATHS:
                self.decide_death(next(iter(self.deaths)))
                self.deaths.popitem(last=False)
        keys = self.has_what.pop(address, set())
        self.remove_replicas(address, keys)
        self.workers.pop(address, None)
        if ws is not None and self.plugins and not death.awaiting:
            self._tell_plugins("remove_worker", address, cause=cause)
        self.to_workers.pop(address, None)
        # transfers already waiting on it (a cut link sends no FIN) are dropped
        news = {"op": "worker-removed", "address": address}
        for other in self.workers:
            self.to_workers[other].append(news)
        for client in self.clients:
            self.to_clients[client].append(news)
        why = "worker %s was removed: %s" % (address, cause or "it left")
        to_reschedule = []
        if ws is not None:
            # a worker that ran out of memory because of the data it held
            # (results stored faster than spilled) says so before it exits:
            # its tasks are rescheduled without counting against them
            innocent = ws.memory_exit == "data"
            for ts in list(ws.processing):
                if ts.state != PROCESSING or ts.processing_on is not ws:
                    continue
                ts.processing_on = None
                if innocent:
                    to_reschedule.append(ts)
                    continue
                ts.suspicious += 1
                ts.deaths += (death,)
                death.counted.append(ts.key)
                if ts.suspicious <= self.allowed_failures:
                    to_reschedule.append(ts)
                elif death.awaiting:
                    self._hold(ts, death, why + "; held until its nanny says why")
                else:
                    self._killed_worker(ts)
            for _, _, ts in ws.queue:
                if ts.state == QUEUED and ts.processing_on is ws:
                    ts.processing_on = None
                    to_reschedule.append(ts)
        recompute = self._lost(keys, "it was scattered to %s, which was removed (%s)"
                               % (address, cause or "it left"), address,
                               death=death if death.awaiting else None)
        for ts in to_reschedule:
            # (one whose input was lost meanwhile waits for it again)
            if ts.state in (PROCESSING, QUEUED):
                self._transition(ts, RELEASED, why, address)
                recompute.append(ts)
        self._request(recompute)

    def _hold(self, ts, death, cause):
        """``ts`` waits in state ``lost`` for the report on ``death``."""
        self._transition(ts, LOST, cause, death.address)
        ts.lost_with = death
        death.held.append(ts.key)

    def _killed_worker(self, ts):
        exc = KilledWorker(killed_worker_message(ts.key, ts.deaths, self.allowed_failures))
        self._erred(ts, exc, None, str(exc), cause="it has killed %d workers"
                    % ts.suspicious)

    def worker_died(self, address, cause=None, blame=None):
        """The nanny of the removed worker ``address`` says why it died
        (``cause``: "killed by signal SIGSEGV", ...): that is the cause now
        in the ``KilledWorker`` of every task it counted against, and the
        tasks and data held for this report are decided
        (:meth:`decide_death`).  ``blame='data'``: it ran out of memory
        because of the data it held (:meth:`forgive_death`)."""
        death = self.deaths.get(address)
        if death is None:
            return
        if cause:
            death.cause = cause
        if blame == "data":
            self.forgive_death(address)
        self.decide_death(address)

    def decide_death(self, address):
        """No (more) waiting for a report on the death of ``address``: its
        held tasks err (``KilledWorker``, ``LostData``), or, forgiven, run
        again; the plugins hear of the removal.  Called by the center when
        the grace period for the nanny's report is over."""
        death = self.deaths.get(address)
        if death is None or not death.awaiting:
            return
        death.awaiting = False
        if self.plugins:
            self._tell_plugins("remove_worker", address, cause=death.cause)
        held, death.held = death.held, []
        rerun = []
        for key in held:
            ts = self.tasks.get(key)
            if ts is None or ts.state != LOST or ts.lost_with is not death:
                continue  # released, or in memory again meanwhile
            ts.lost_with = None
            if ts.run_spec is None:
                exc = LostData(
                    "the data of %r was lost: it was scattered to %s, which died (%s); "
                    "scattered data has no lineage to recompute it from"
                    % (ts.key, address, death.cause))
                self._erred(ts, exc, None, str(exc), worker=address)
            elif ts.suspicious > self.allowed_failures:
                self._killed_worker(ts)
            else:
                self._transition(ts, RELEASED, "the death of %s was forgiven: %s"
                                 % (address, death.cause), address)
                rerun.append(ts)
        self._request(rerun)

    def _lost(self, keys, how, worker=None, death=None):
        """Of ``keys`` (which lost a holder), those in memory nowhere now:
        released, their clients told; returns those to recompute.  Scattered
        ones (no task) are erred with ``LostData``, saying ``how`` it was
        lost (``worker``: the worker that lost it, if one did); with
        ``death`` (awaiting its nanny's report) they are held for it in
        state ``lost`` instead."""
        lost = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state != MEMORY or self.who_has.get(key):
                continue
            lost.append(ts)
        recompute = []
        for ts in lost:
            hold = death is not None and ts.run_spec is None
            if hold:
                self._hold(ts, death, "data lost: %s; held until its nanny says why" % how)
            else:
                self._transition(ts, RELEASED, "data lost: " + how, worker)
            self.nbytes.pop(ts.key, None)
            for client in ts.who_wants:
                self.to_clients[client].append({"op": "lost-data", "key": ts.key})
            for dep in ts.waiters:
                if dep.state in READY:
                    self._transition(dep, WAITING, "input %r lost" % (ts.key,), worker)
                    self.unrunnable.discard(dep)
                    dep.processing_on = None
                if dep.state == WAITING:
                    dep.waiting_on.add(ts)
            if hold:
                continue
            if ts.run_spec is None:
                exc = LostData(
                    "the data of %r was lost: %s; scattered data has no lineage "
                    "to recompute it from" % (ts.key, how))
                self._erred(ts, exc, None, str(exc))
            elif ts.who_wants or ts.waiters:
                recompute.append(ts)
        return recompute

    def add_replicas(self, address, keys=(), nbytes=None):
        """``address`` holds ``keys`` (``nbytes``: ``{key: size}`` of some of
        them): the tables only, no task changes state.  The center's
        ``register`` and ``add_keys`` rpc, the metadata store; keys that
        tasks need are merged with them when the worker's stream opens
        (:meth:`add_worker`).  ``keys=()`` just lists the address."""
        held = self.has_what[address]
        who_has = self.who_has
        for key in keys:
            held.add(key)
            who_has[key].add(address)
        if nbytes:
            for key, n in nbytes.items():
                if key in held:
                    self.nbytes[key] = n

    def remove_replicas(self, address, keys):
        """``address`` holds ``keys`` no more: the tables only (a task in
        memory left with no holder is the caller's business: see
        :meth:`remove_keys`)."""
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

    def remove_keys(self, address, keys=()):
        """``address`` dropped ``keys`` (the center's ``remove_keys`` rpc):
        forget those replicas; a key of a task now held nowhere is
        recomputed if wanted (or, scattered, erred with ``LostData``)."""
        self.remove_replicas(address, keys)
        self._request(self._lost(keys, "%s dropped it" % address, address))

    def delete_keys(self, keys):
        """Forget every replica of ``keys`` (the center's ``delete_data``);
        returns ``{address: [key]}``, the holders to tell.  Tasks in memory
        are released (and recomputed if still wanted)."""
        by_worker = defaultdict(list)
        for key in keys:
            for address in self.who_has.get(key, ()):
                by_worker[address].append(key)
        for address, ks in by_worker.items():
            self.remove_replicas(address, ks)
        for key in keys:
            self.nbytes.pop(key, None)
        self._request(self._lost(keys, "it was deleted (delete_data)"))
        self._flush_releases()
        return by_worker

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
                                 % address, address))

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
        off their count (those it already made fail stay failed; those held
        for the report run again)."""
        death = self.deaths.get(address)
        if death is None:
            return
        counted, death.counted = death.counted, []
        for key in counted:
            ts = self.tasks.get(key)
            if ts is not None and ts.state != ERRED and death in ts.deaths:
                ts.deaths = tuple(d for d in ts.deaths if d is not death)
                ts.suspicious -= 1
        self.decide_death(address)

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

    def clients_of(self, key, limit=1000):
        """The clients that want ``key`` or a task that depends on it (looking
        at up to ``limit`` tasks): who its printed output is for."""
        ts = self.tasks.get(key)
        if ts is None:
            return set()
        clients = set(ts.who_wants)
        seen = {ts}
        todo = list(ts.dependents)
        while todo and len(seen) < limit:
            dep = todo.pop()
            if dep in seen:
                continue
            seen.add(dep)
            clients.update(dep.who_wants)
            todo.extend(dep.dependents)
        return clients

    # -- inputs from executors ---------------------------------------------------

    def update_graph(self, client, tasks=None, dependencies=None, keys=(),
                     restrictions=None, loose_restrictions=(), priority=None,
                     lineage_only=False, retries=None, resources=None):
        """Add tasks and say which keys ``client`` wants.

        ``tasks`` maps key -> run spec (opaque to the scheduler);
        ``dependencies`` maps key -> keys it needs (which must be in this
        graph or already known); ``priority`` maps key -> a sortable value
        (lowest runs first among ready tasks); ``retries`` maps key -> how
        many times the task is run again if it raises, before it errs;
        ``resources`` maps key -> ``{name: amount}``: it runs only on a
        worker that has them free (``no-worker`` while none has them).
        A task whose key a worker already holds is in memory at once.
        ``lineage_only``: the tasks are sent again (to a restarted center)
        and run only where ``keys`` need them, not every one of them.
        """
        tasks = tasks or {}
        dependencies = dependencies or {}
        restrictions = restrictions or {}
        priority = priority or {}
        retries = retries or {}
        resources = resources or {}
        loose = set(loose_restrictions or ())
        _check_graph(tasks, dependencies, keys, restrictions, priority, retries,
                     resources)
        self.add_client(client)
        cycle = find_cycle(dependencies)
        if cycle is not None:  # its tasks would wait on each other forever
            exc = CycleError(cycle)
            for key in keys:
                self.to_clients[client].append({
                    "op": "task-erred", "key": key, "exception": exc,
                    "traceback": None, "text": str(exc)})
            return
        new, merged = [], []
        for key, spec in tasks.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, spec)
                if self.who_has.get(key):
                    # registered by a worker before this graph came (a center
                    # restart): in memory, and now with its lineage
                    self._transition(ts, MEMORY, "a worker holds it (registered)")
                    ts.nbytes = self.nbytes.get(key)
                    merged.append(ts)
                else:
                    new.append(ts)
            elif ts.state == RELEASED and ts.run_spec is None:
                ts.run_spec = spec
            ts.priority = priority.get(key, ts.priority)
            if key in retries:
                ts.retries_left = retries[key]
            if key in resources and ts.state not in PENDING:  # (not while it holds them)
                ts.resources = dict(resources[key]) or None
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
            if ts.state == MEMORY:
                continue  # computed already: its lineage is incomplete, no more
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
            if ts.state == ERRED:
                stack.append(ts)
            elif ts.state == RELEASED:  # sent again to a restarted center
                rerun.append(ts)
            else:
                self._report_state(ts, client)  # in memory: says so; else it will
        roots, seen = [], set()
        while stack:
            ts = stack.pop()
            if ts in seen or ts.state != ERRED:
                continue
            seen.add(ts)
            roots.append(ts)
            stack.extend(ts.dependencies)
        for ts in roots:
            self._forget_error(ts, "retried by client %s" % (client,))
        self._request(roots + rerun)
        self._flush_releases()

    def fire_and_forget(self, client, keys):
        """Compute ``keys`` (known tasks) even once no client wants them any
        more: they are wanted by :data:`FIRE_AND_FORGET` until in memory or
        erred, then released (if nobody else wants them)."""
        self.add_client(FIRE_AND_FORGET)
        keys = [k for k in keys if k in self.tasks
                and self.tasks[k].state not in (MEMORY, ERRED)]  # done already
        wanted = self._want(FIRE_AND_FORGET, keys)
        self._request([ts for ts in wanted if ts.state == RELEASED])
        self._flush_releases()

    def _done_with_fire_and_forget(self, ts):
        """``ts`` is in memory or erred: :data:`FIRE_AND_FORGET` wants it no more."""
        if FIRE_AND_FORGET in ts.who_wants:
            ts.who_wants.discard(FIRE_AND_FORGET)
            self.clients[FIRE_AND_FORGET].discard(ts.key)

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

    def _forget_error(self, ts, cause):
        self._transition(ts, RELEASED, cause)
        ts.exception = ts.traceback = ts.text = None
        ts.retries = ts.suspicious = 0
        ts.deaths = ()

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
            if ts.state != MEMORY:
                self._set_memory(ts, "scattered by client %s" % (client,),
                                 addresses[0] if addresses else None)
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
        for key, ts in self.tasks.items():
            if ts.state not in FINISHED:
                self._transition(ts, RELEASED, "restart")
            self._transition(ts, FORGOTTEN, "restart")
            self.who_has.pop(key, None)
            self.nbytes.pop(key, None)
        for address in self.has_what:
            self.has_what[address] = set()
        self.tasks.clear()
        self.unrunnable.clear()
        for ws in self.workers.values():
            ws.processing.clear()
            ws.used_resources = dict.fromkeys(ws.resources, 0)
            ws.queue.clear()
        if self.plugins:
            self._tell_plugins("restart")

    # -- inputs from workers ------------------------------------------------------

    def task_finished(self, address, key, nbytes=None, type=None, startstops=None,
                      value=None, thread=None, transfer=None):
        """``key`` is in memory on ``address``.  ``value``: for small results,
        the pickled value itself, passed on to the clients that want it so
        they need not fetch it.  ``startstops``, ``thread``, ``transfer``:
        when and where it ran, for the plugins (a dashboard's task stream)."""
        if self.plugins:
            self._tell_plugins("task_finished", key, address, startstops=startstops,
                               thread=thread, transfer=transfer)
        ts = self.tasks.get(key)
        ws = self.workers.get(address)
        if ws is not None:
            self._ran(ws, key, ts)
        if ts is None or ts.state in FINISHED:
            # nobody wants it any more: the worker drops it
            self.to_workers[address].append({"op": "delete-data", "keys": [key]})
            if ts is not None:
                self._maybe_forget(ts)
        else:
            if startstops:
                self._record_duration(ts.prefix, startstops[1] - startstops[0])
            self._add_replica(ts, address, nbytes)
            if ts.state != MEMORY:
                other = ts.processing_on
                if other is not None and other is not ws:
                    self._unprocess(other, ts)  # it may still report: a replica
                ts.processing_on = None
                self._set_memory(ts, "task-finished", address, type, value)
        if ws is not None:
            self._fill(ws)
        self._flush_releases()

    def task_erred(self, address, key, exception=None, traceback=None, text=None):
        ts = self.tasks.get(key)
        ws = self.workers.get(address)
        if ws is not None:
            self._ran(ws, key, ts)
        if ts is not None and ts.state == PROCESSING and ts.processing_on is ws:
            ts.processing_on = None
            if ts.retries_left > 0:  # submit(..., retries=n): run it again
                ts.retries_left -= 1
                self._transition(ts, RELEASED, "task-erred (%s); run again, %d "
                                 "retries left" % (text, ts.retries_left), address)
                self._request([ts])
            else:
                self._erred(ts, exception, traceback, text, cause="task-erred",
                            worker=address)
        if ws is not None:
            self._fill(ws)
        self._flush_releases()

    def missing_data(self, address, key, missing=(), bad_workers=()):
        """A worker could not fetch ``missing`` inputs of ``key``."""
        ts = self.tasks.get(key)
        ws = self.workers.get(address)
        if ws is not None:
            self._ran(ws, key, ts)
        for bad in bad_workers:
            self.remove_replicas(bad, missing)
        recompute = self._lost(missing, "no holder could hand it over to %s" % address,
                               address)
        if ts is None or ts.state != PROCESSING or ts.processing_on is not ws:
            self._request(recompute)
            if ws is not None:
                self._fill(ws)
            return
        ts.processing_on = None
        ts.retries += 1
        self._transition(ts, RELEASED, "missing-data: could not fetch %s"
                         % (list(missing),), address)
        if ts.retries > MISSING_DATA_RETRIES:
            # holders that answer but cannot hand the data over (a value
            # that does not serialize) would otherwise be asked forever
            exc = LostData(
                "task %r could not get its inputs %s from %s after %d tries; a "
                "value that cannot be serialized does this"
                % (key, list(missing), list(bad_workers), ts.retries))
            self._erred(ts, exc, None, str(exc), cause="missing-data "
                        "retries ran out", worker=address)
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
            elif ts.state == MEMORY:
                self._add_replica(ts, address, nbytes.get(key))
            elif self._welcome(ts):
                self._add_replica(ts, address, nbytes.get(key))
                # a queue entry goes stale; a run under way reports a replica
                ts.processing_on = None
                self.unrunnable.discard(ts)
                self._set_memory(ts, "a worker got it (add-keys)", address, ts.type)
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
        return ts.state in NOT_IN_MEMORY and bool(ts.who_wants or ts.waiters)

    def _ran(self, ws, key, ts):
        """``ws`` reported on ``key``: out of its processing set.  A task
        released while running there and forgotten before the report (then
        perhaps submitted again, a new ``ts``) is found by its key: it
        would hold one of the worker's slots forever."""
        if ts is not None and ts in ws.processing:
            self._unprocess(ws, ts)
        else:
            for stale in [t for t in ws.processing if t.key == key]:
                self._unprocess(ws, stale)

    @staticmethod
    def _unprocess(ws, ts):
        """``ts`` runs on ``ws`` no more: its slot and resources are free."""
        if ts in ws.processing:
            ws.processing.discard(ts)
            for name, amount in (ts.resources or {}).items():
                if name in ws.used_resources:
                    ws.used_resources[name] -= amount

    @staticmethod
    def _can_run(ws, ts):
        """Has ``ws`` the resources ``ts`` asks for (free or not)?"""
        return not ts.resources or all(
            ws.resources.get(name, 0) >= amount for name, amount in ts.resources.items())

    @staticmethod
    def _fits(ws, ts):
        """Are the resources ``ts`` asks for free on ``ws`` now?"""
        return not ts.resources or all(
            ws.resources.get(name, 0) - ws.used_resources.get(name, 0) >= amount
            for name, amount in ts.resources.items())

    # -- transitions --------------------------------------------------------------

    def _report_state(self, ts, client):
        if ts.state == MEMORY:
            self.to_clients[client].append({
                "op": "key-in-memory", "key": ts.key, "type": ts.type,
                "workers": list(self.who_has.get(ts.key, ()))})
        elif ts.state == ERRED:
            self.to_clients[client].append(self._erred_msg(ts))

    def _unknown_key_msg(self, key):
        return {"op": "task-erred", "key": key,
                "exception": LostData("key %r is not known to the scheduler; it "
                                      "was released or never existed" % (key,)),
                "traceback": None}

    def _erred_msg(self, ts):
        return {"op": "task-erred", "key": ts.key, "exception": ts.exception,
                "traceback": ts.traceback, "text": ts.text}

    def _request(self, roots):
        """Make sure every task in ``roots`` is, or will be, in memory."""
        # collect the released tasks that must run: roots and released deps
        order = []
        seen = set()
        stack = [ts for ts in roots if ts.state == RELEASED]
        while stack:
            ts = stack.pop()
            if ts in seen or ts.state != RELEASED:
                continue
            seen.add(ts)
            order.append(ts)
            for dep in ts.dependencies:
                if dep.state == RELEASED and dep not in seen:
                    stack.append(dep)
        for ts in order:
            if ts.run_spec is None:
                exc = LostData("%r has no data and no task to compute it" % (ts.key,))
                self._erred(ts, exc, None, str(exc), cause="no task")
        # dependencies first, so that ready tasks find their inputs placed
        for ts in reversed(order):
            if ts.state != RELEASED:
                continue
            self._transition(ts, WAITING, "wanted")
            ts.waiting_on = set()
            erred_dep = None
            for dep in ts.dependencies:
                dep.waiters.add(ts)
                if dep.state == MEMORY:
                    continue
                if dep.state == ERRED:
                    erred_dep = dep
                    break
                ts.waiting_on.add(dep)
            if erred_dep is not None:
                self._erred_from(ts, erred_dep)
            elif not ts.waiting_on:
                self._ready(ts)

    def _ready(self, ts, cause="inputs in memory"):
        """``ts`` (waiting or no-worker) may run: send it, queue it, or keep
        it for a worker that may run it."""
        ws = self._choose_worker(ts)
        if ws is None:
            if ts.state != NO_WORKER:
                self._transition(ts, NO_WORKER, cause)
            self.unrunnable.add(ts)
            return
        if len(ws.processing) < self._limit(ws) and self._fits(ws, ts):
            self._send(ws, ts, cause)
        else:
            self._transition(ts, QUEUED, cause, ws.address)
            ts.processing_on = ws
            heapq.heappush(ws.queue, (ts.priority, next(self._seq), ts))

    def _send(self, ws, ts, cause):
        self._transition(ts, PROCESSING, cause, ws.address)
        ts.processing_on = ws
        ws.processing.add(ts)
        for name, amount in (ts.resources or {}).items():
            ws.used_resources[name] += amount
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
        """Send queued tasks while ``ws`` has free slots (a task whose
        resources are not free waits on, in its place)."""
        limit = self._limit(ws)
        queue = ws.queue
        waiting = []  # their resources are taken
        while len(ws.processing) < limit:
            if not queue:
                if not waiting:
                    self._steal_for(ws)
                if not queue:
                    break
            item = heapq.heappop(queue)
            ts = item[2]
            if ts.state == QUEUED and ts.processing_on is ws:
                if self._fits(ws, ts):
                    self._send(ws, ts, "a slot is free")
                else:
                    waiting.append(item)
        for item in waiting:
            heapq.heappush(queue, item)

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
            if ts.state != QUEUED or ts.processing_on is not victim:
                continue  # stale entry: drop it
            if moved < take and (ts.restrictions is None or ws.address in ts.restrictions
                                 or ts.loose_restrictions) and self._can_run(ws, ts):
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
        if ts.resources:  # only those that have them; those with them free first
            candidates = [ws for ws in (candidates or workers.values())
                          if self._can_run(ws, ts)]
            if not candidates:
                return None
            free = [ws for ws in candidates if self._fits(ws, ts)]
            candidates = free or candidates
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

        missing = {ws: sum(dep.nbytes or 0 for dep in ts.dependencies  # bytes to fetch
                           if ws.address not in self.who_has.get(dep.key, ()))
                   for ws in candidates}

        def cost(ws):
            if ws.paused:
                return float("inf")
            queued = len(ws.processing) + len(ws.queue)
            return missing[ws] / BANDWIDTH + queued * duration / ws.ncores

        chosen = min(candidates, key=cost)
        # the holder of most input bytes keeps the task while it has a free
        # slot, however long the task: moving the data costs more than the
        # wait estimate says (and copies it), once there is much of it
        holder = min((ws for ws in candidates if not ws.paused),
                     key=lambda ws: (missing[ws], _load(ws)), default=chosen)
        if (holder is not chosen and missing[chosen] - missing[holder] >= LOCAL_BYTES
                and len(holder.processing) < self._limit(holder)
                and self._fits(holder, ts)):
            return holder
        return chosen

    def _add_replica(self, ts, address, nbytes=None):
        if nbytes is not None:
            ts.nbytes = nbytes
            self.nbytes[ts.key] = nbytes
        self.who_has[ts.key].add(address)
        self.has_what[address].add(ts.key)

    def _set_memory(self, ts, cause, worker=None, type=None, value=None):
        self._transition(ts, MEMORY, cause, worker)
        ts.type = type
        workers = list(self.who_has.get(ts.key, ()))
        for client in ts.who_wants:
            msg = {"op": "key-in-memory", "key": ts.key, "type": type, "workers": workers}
            if value is not None:
                msg["value"] = value
            self.to_clients[client].append(msg)
        for dts in ts.waiters:
            if dts.state == WAITING:
                dts.waiting_on.discard(ts)
                if not dts.waiting_on:
                    self._ready(dts)
        for dep in ts.dependencies:
            dep.waiters.discard(ts)
            self._maybe_release(dep)
        self._done_with_fire_and_forget(ts)
        self._maybe_release(ts)

    def _erred(self, ts, exception, traceback, text, cause=None, worker=None):
        """``ts`` failed (``cause``: how, for its story); so does everything
        waiting on it."""
        if ts.state == ERRED:
            return
        ts.exception = exception
        ts.traceback = traceback
        ts.text = text
        self._set_erred(ts, cause or text, worker)
        stack = list(ts.waiters)
        why = "dependency %r erred" % (ts.key,)
        while stack:
            dts = stack.pop()
            if dts.state in NOT_STARTED:
                dts.exception, dts.traceback, dts.text = exception, traceback, text
                self._set_erred(dts, why)
                stack.extend(dts.waiters)

    def _erred_from(self, ts, dep):
        self._erred(ts, dep.exception, dep.traceback, dep.text,
                    cause="dependency %r erred" % (dep.key,))

    def _set_erred(self, ts, cause, worker=None):
        self._transition(ts, ERRED, cause, worker)
        ts.processing_on = None
        self.unrunnable.discard(ts)
        for client in ts.who_wants:
            self.to_clients[client].append(self._erred_msg(ts))
        for dep in ts.dependencies:
            dep.waiters.discard(ts)
            self._maybe_release(dep)
        self._done_with_fire_and_forget(ts)
        self._maybe_forget(ts)

    def _maybe_release(self, ts):
        """Drop ``ts`` (its data, or its pending run) if nothing needs it."""
        if ts.who_wants or ts.waiters:
            return
        state = ts.state
        if state == MEMORY:
            for address in self.who_has.pop(ts.key, ()):
                self.has_what.get(address, set()).discard(ts.key)
                self._release_batch[address].append(ts.key)
            self.nbytes.pop(ts.key, None)
            self._transition(ts, RELEASED, "nobody needs it")
        elif state in PENDING:
            self._transition(ts, RELEASED, "nobody needs it")
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
            if ts.state not in FINISHED or ts.who_wants or ts.dependents:
                continue
            if self.tasks.get(ts.key) is not ts:
                continue
            if ts.processing_on is not None and ts in ts.processing_on.processing:
                continue  # still running somewhere; forgotten when it reports
            self._transition(ts, FORGOTTEN, "nothing needs it")
            del self.tasks[ts.key]
            for dep in ts.dependencies:
                dep.dependents.discard(ts)
                dep.waiters.discard(ts)
                if not dep.who_wants and not dep.waiters:
                    if dep.state == MEMORY:
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

    def task_states(self):
        return {key: ts.state for key, ts in self.tasks.items()}

    # -- invariants -----------------------------------------------------------------

    def validate(self):
        """Check the invariants the scheduler relies on; raise
        :class:`InvariantError` naming the first broken one (and the key).

        The scheduler tests call it after every step; the center after every
        batch when ``$DISTRIBUTED_VALIDATE`` is set.  O(tasks + replicas).
        """
        tasks, workers = self.tasks, self.workers
        for key, ts in tasks.items():
            _check(ts.key == key, key, "is filed under another key %r", ts.key)
            _check(ts.state in STATES, key, "is in unknown state %r", ts.state)
            self._validate_task(ts)
        for address, ws in workers.items():
            _check(ws.address == address, address, "worker filed under another address")
            held = defaultdict(float)
            for ts in ws.processing:
                for name, amount in (ts.resources or {}).items():
                    held[name] += amount
            for name, used in ws.used_resources.items():
                _check(abs(used - held.get(name, 0)) < 1e-9, address,
                       "uses %s of resource %r, but its tasks hold %s", used, name,
                       held.get(name, 0))
            for ts in ws.processing:
                # a task released while running stays here until it reports
                # (forgotten meanwhile, it is found by its key: see _ran)
                _check(tasks.get(ts.key) is ts or ts.state in FINISHED, ts.key,
                       "is in the processing set of %s, %s, but not a known task",
                       address, ts.state)
            for _, _, ts in ws.queue:
                _check(tasks.get(ts.key) is ts or ts.state != QUEUED, ts.key,
                       "is queued on %s but not a known task", address)
        for address, death in self.deaths.items():
            _check(death.address == address, address, "death filed under another address")
        for ts in self.unrunnable:
            _check(ts.state == NO_WORKER, ts.key, "is unrunnable in state %r", ts.state)
            _check(tasks.get(ts.key) is ts, ts.key, "is unrunnable but not a known task")
        for key, holders in self.who_has.items():
            for address in holders:
                _check(key in self.has_what.get(address, ()), key,
                       "who_has names %s, whose has_what lacks it", address)
        for address, keys in self.has_what.items():
            for key in keys:
                _check(address in self.who_has.get(key, ()), key,
                       "is in has_what of %s, but who_has lacks it", address)
        for key in self.nbytes:
            _check(self.who_has.get(key), key, "has nbytes but no holder")
        for client, keys in self.clients.items():
            for key in keys:
                ts = tasks.get(key)
                _check(ts is not None and client in ts.who_wants, key,
                       "client %s wants it but the task does not list it", client)

    def _validate_task(self, ts):
        key, state, workers = ts.key, ts.state, self.workers
        for dep in ts.dependencies:
            _check(self.tasks.get(dep.key) is dep, key,
                   "depends on %r, not a known task", dep.key)
            _check(ts in dep.dependents, key, "not among the dependents of %r", dep.key)
        for dts in ts.dependents:
            _check(ts in dts.dependencies, key,
                   "lists dependent %r, which does not depend on it", dts.key)
        for dts in ts.waiters:
            _check(ts in dts.dependencies, key, "waiter %r does not depend on it", dts.key)
            _check(dts.state in PENDING, key,
                   "waiter %r is %s, not pending", dts.key, dts.state)
        for client in ts.who_wants:
            _check(key in self.clients.get(client, ()), key,
                   "wanted by %s, which does not list it", client)
        _check(len(ts.deaths) == ts.suspicious, key,
               "counts %d worker deaths but remembers %d", ts.suspicious, len(ts.deaths))
        _check(state == LOST or ts.lost_with is None, key,
               "is %s, yet waits for the report on a death", state)
        if state in PENDING:
            for dep in ts.dependencies:
                _check(ts in dep.waiters, key,
                       "is %s, but not among the waiters of its dependency %r",
                       state, dep.key)
        if state == WAITING:
            not_in_memory = {d for d in ts.dependencies if d.state != MEMORY}
            _check(ts.waiting_on == not_in_memory, key,
                   "waits on %s, but the dependencies not in memory are %s",
                   sorted(d.key for d in ts.waiting_on),
                   sorted(d.key for d in not_in_memory))
            _check(ts.waiting_on, key, "is waiting on nothing")
        elif state in READY:
            for dep in ts.dependencies:
                _check(dep.state == MEMORY, key, "is %s, but dependency %r is %s",
                       state, dep.key, dep.state)
        if state == PROCESSING:
            ws = ts.processing_on
            _check(ws is not None and workers.get(ws.address) is ws, key,
                   "is processing on %r, not a known worker", ws)
            _check(ts in ws.processing, key,
                   "is processing on %s but not in its processing set", ws.address)
        elif state == QUEUED:
            ws = ts.processing_on
            _check(ws is not None and workers.get(ws.address) is ws, key,
                   "is queued on %r, not a known worker", ws)
            _check(any(t is ts for _, _, t in ws.queue), key,
                   "is queued on %s but not in its queue", ws.address)
        elif state == NO_WORKER:
            _check(ts in self.unrunnable, key, "is no-worker but not unrunnable")
        elif state == LOST:
            death = ts.lost_with
            _check(death is not None and death.awaiting, key,
                   "is lost, but waits for no report (%r)", death)
            _check(self.deaths.get(death.address) is death and key in death.held, key,
                   "is lost, but not held by the death of %s", death.address)
            _check(ts.processing_on is None, key, "is lost, yet processing on %s",
                   ts.processing_on)
            _check(ts.run_spec is None or ts.suspicious > self.allowed_failures, key,
                   "is lost, but may run again (%d deaths)", ts.suspicious)
        elif state == MEMORY:
            _check(self.who_has.get(key), key, "is in memory but no worker holds it")
        elif state == RELEASED:
            # a released task still running somewhere is not wanted either
            _check(not ts.who_wants and not ts.waiters, key,
                   "is released, yet wanted (by %s) or waited for (by %s)",
                   sorted(map(str, ts.who_wants)), sorted(d.key for d in ts.waiters))


def _check_graph(tasks, dependencies, keys, restrictions, priority, retries,
                 resources):
    """Refuse a malformed graph whole, before any state changes."""
    for name, value in (("tasks", tasks), ("dependencies", dependencies),
                        ("restrictions", restrictions), ("priority", priority),
                        ("retries", retries), ("resources", resources)):
        if not isinstance(value, dict):
            raise TypeError("update-graph: %s must be a dict, got %s"
                            % (name, type(value).__name__))
    for key, deps in dependencies.items():
        if not isinstance(deps, (list, tuple, set, frozenset)):
            raise TypeError("update-graph: dependencies of %r must be a list, got %s"
                            % (key, type(deps).__name__))
    if not isinstance(keys, (list, tuple, set, frozenset)):
        raise TypeError("update-graph: keys must be a list, got %s" % type(keys).__name__)
    for key, wanted in resources.items():
        if not isinstance(wanted, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                for k, v in wanted.items()):
            raise TypeError("update-graph: resources of %r must be a dict {name: "
                            "amount >= 0}, got %r" % (key, wanted))
    for key, n in retries.items():
        if type(n) is not int or n < 0:
            raise TypeError("update-graph: retries of %r must be an int >= 0, got %r"
                            % (key, n))
    for key in itertools.chain(tasks, keys):
        validate_key(key)  # a NaN key could never be found again


def _priority(ts):
    return ts.priority


def _load(ws):
    if ws.paused:
        return float("inf")
    return (len(ws.processing) + len(ws.queue)) / ws.ncores


def _check(condition, key, message, *args):
    """``validate``'s assertion: :class:`InvariantError` naming ``key``."""
    if not condition:
        raise InvariantError("scheduler invariant broken for %r: %s"
                             % (key, message % args if args else message), key)
