"""What the dashboard remembers of the scheduler's work: a scheduler plugin.

It keeps only bounded, cheap state, updated in O(1) per transition (a few
dict look-ups and integer increments, nothing allocated per transition):

* ``groups``: ``{prefix: [waiting, processing, memory, erred, done]}``, the
  tasks of each task group (key prefix, ``inc-1a2b`` -> ``inc``) in each
  column of its progress bar; ``done`` counts the tasks ever computed;
* ``stream``: the latest finished tasks, ``(seq, key, prefix, worker,
  thread, start, stop, transfer_start, transfer_stop)``;
* ``events``: the latest workers added, removed (with why), restarts and
  errors (with their traceback text), ``(seq, time, kind, subject, text)``.

::

    >>> from distributed.scheduler import Scheduler
    >>> s = Scheduler()
    >>> plugin = DashboardPlugin(s)
    >>> s.add_plugin(plugin)
    >>> s.add_worker('w1:1')
    >>> key = 'inc-a1b2c3d4'
    >>> s.update_graph('c1', tasks={key: 'spec'}, dependencies={}, keys=[key])
    >>> plugin.groups['inc']
    [0, 1, 0, 0, 0]
    >>> s.task_finished('w1:1', key, nbytes=8, startstops=(1.0, 2.0), thread=7)
    >>> plugin.groups['inc'], plugin.stream[-1][1:7]
    ([0, 0, 1, 0, 1], ('inc-a1b2c3d4', 'inc', 'w1:1', 7, 1.0, 2.0))
    >>> [e[2] for e in plugin.events]
    ['worker-added']
"""

import itertools
import time
from collections import deque

from ..scheduler import (
    ERRED,
    LOST,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    QUEUED,
    WAITING,
    SchedulerPlugin,
)
from ..utils import key_split

__all__ = ["DashboardPlugin", "COLUMNS"]

#: the columns of a task group's progress bar, and the states each shows
COLUMNS = ("waiting", "processing", "memory", "erred")
# a task held 'lost' (its worker died; the nanny's report awaited) shows as
# processing: it is still being decided, and its erring is then an event
_COLUMN = {WAITING: 0, NO_WORKER: 0, QUEUED: 0, PROCESSING: 1, LOST: 1, MEMORY: 2, ERRED: 3}
_DONE = 4  # index of the count of tasks ever computed
_STREAM_FIELDS = 9  # seq, key, prefix, worker, thread, start, stop, t0, t1
#: how many finished tasks the task stream keeps
STREAM_LENGTH = 10000
#: how many events the event log keeps
EVENTS_LENGTH = 1000
#: how many task groups are kept; beyond, groups with no task left are dropped
MAX_GROUPS = 1000
#: the longest error text an event keeps (tracebacks can be huge)
MAX_TEXT = 4000


class DashboardPlugin(SchedulerPlugin):
    """See the module docstring.  ``scheduler``: the one it watches (to find
    a task's prefix and error text without computing them again)."""

    def __init__(self, scheduler=None, stream_length=STREAM_LENGTH,
                 events_length=EVENTS_LENGTH):
        self.scheduler = scheduler
        self._tasks = scheduler.tasks if scheduler is not None else {}
        self.groups = {}
        self._stream = deque(maxlen=_STREAM_FIELDS * stream_length)
        self.events = deque(maxlen=events_length)
        self._seq = itertools.count()

    def _prefix(self, key):
        ts = self._tasks.get(key)
        return ts.prefix if ts is not None else key_split(key)

    def transition(self, key, start, finish, cause=None, worker=None):
        old = _COLUMN.get(start)
        new = _COLUMN.get(finish)
        if old == new:  # waiting -> queued, released -> forgotten, ...: no bar moves
            return
        ts = self._tasks.get(key)  # _prefix, inlined: this runs for every transition
        prefix = ts.prefix if ts is not None else key_split(key)
        counts = self.groups.get(prefix)
        if counts is None:
            counts = self.groups[prefix] = [0, 0, 0, 0, 0]
            if len(self.groups) > MAX_GROUPS:
                self._drop_empty_groups()
        if old is not None and counts[old]:
            counts[old] -= 1
        if new is not None:
            counts[new] += 1
            if new == 2:
                if old == 1:
                    counts[_DONE] += 1
            elif new == 3 and old == 1:  # it failed, not a dependency
                self._task_erred(key, worker, cause)

    def _drop_empty_groups(self):
        for prefix in [p for p, c in self.groups.items() if not any(c[:_DONE])]:
            if len(self.groups) <= MAX_GROUPS // 2:
                break
            del self.groups[prefix]

    def _task_erred(self, key, worker, cause):
        ts = self._tasks.get(key)
        text = (ts.text or cause or "") if ts is not None else (cause or "")
        if len(text) > MAX_TEXT:
            text = "...\n" + text[-MAX_TEXT:]
        lines = [line for line in text.splitlines() if line.strip()]
        summary = lines[-1] if lines else "erred"  # "ZeroDivisionError: ..."
        self._event("task-erred", str(key), "%s (on %s)\n%s" % (summary, worker, text))

    def task_finished(self, key, worker, startstops=None, thread=None, transfer=None):
        if not startstops:
            return
        t0, t1 = transfer if transfer else (None, None)
        # flat, as Scheduler._log: no tuple per task for the garbage collector
        self._stream.extend((next(self._seq), key, self._prefix(key), worker, thread,
                             startstops[0], startstops[1], t0, t1))

    @property
    def stream(self):
        """The task stream, oldest first: a list of ``(seq, key, prefix,
        worker, thread, start, stop, transfer_start, transfer_stop)``."""
        return self.stream_since(-1)

    def stream_since(self, seq, limit=None):
        """The entries of :attr:`stream` after number ``seq``, the latest
        ``limit`` of them at most (walking back from the newest only)."""
        out = []
        newest_first = reversed(self._stream)  # no indexing: O(n) inside a deque
        while limit is None or len(out) < limit:
            fields = list(itertools.islice(newest_first, _STREAM_FIELDS))
            if len(fields) < _STREAM_FIELDS:
                break
            fields.reverse()
            if fields[0] <= seq:
                break
            out.append(tuple(fields))
        out.reverse()
        return out

    def add_worker(self, address):
        self._event("worker-added", address, "")

    def remove_worker(self, address, cause=None):
        self._event("worker-removed", address, cause or "")

    def restart(self):
        self.groups.clear()
        self._event("restart", "", "every task was forgotten")

    def _event(self, kind, subject, text):
        self.events.append((next(self._seq), time.time(), kind, subject, text))

    def counts(self):
        """``{prefix: {'waiting': n, ..., 'done': n}}`` of every group."""
        return {prefix: dict(zip(COLUMNS + ("done",), c)) for prefix, c in self.groups.items()}
