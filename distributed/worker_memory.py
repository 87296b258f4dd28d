"""A worker's memory: spill to disk, pause, exit (the worker's memory limit).

::

    memory = WorkerMemoryManager(worker, memory_limit=4 * 2**30)
    worker.data = memory.make_data(worker.local_dir)   # a SpillBuffer
    memory.start()                  # the monitor thread
    ...
    memory.stop(); memory.close()   # when the worker closes

The worker owns one :class:`WorkerMemoryManager` (``worker.memory``).  With
``memory_limit`` (bytes) set, the worker's ``data`` is a
:class:`~distributed.spill.SpillBuffer` (the storage: values in memory and on
disk) and a monitor thread samples the process's RSS every
``monitor_interval`` seconds:

* above ``target_fraction`` (0.6) of the limit, least recently used
  values are spilled to disk (by a thread of their own; so too when the
  values held, by ``sizeof``, exceed that fraction); a task's result first
  makes room, in its task thread, before it is stored, so that producers
  wait for the disk;
* above ``pause_fraction`` (0.8) the worker is paused: it starts no new
  task (they wait, in order, and start once memory is below that fraction
  again), unless the disk fails (full): then results that do not fit fail
  with ``MemoryError``;
* above ``terminate_fraction`` (0.95) the process exits with status
  :data:`MEMORY_EXIT_CODE` (75), which its nanny reports as "memory limit
  exceeded"; first it tells the center whether its data or its running
  tasks were to blame (:data:`MEMORY_BLAME`).

What to do at a given RSS is decided by pure functions
(:func:`pause_wanted`, :func:`spill_target`, :func:`excess_bytes`,
:func:`blame`); the manager samples, calls them and acts.
"""

import concurrent.futures
import logging
import os
import shutil
import socket
import sys
import threading
from collections import OrderedDict

import psutil
from tornado import gen, locks

from .spill import SpillBuffer

# the worker's logger: the lines that tell of spilling, pausing and exiting
# keep the name users filter on ("distributed.worker")
logger = logging.getLogger("distributed.worker")

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


# -- decisions (pure) -----------------------------------------------------------


def terminate_wanted(rss, limit, terminate_fraction):
    """Whether the process must exit.

    >>> terminate_wanted(96, 100, 0.95), terminate_wanted(95, 100, 0.95)
    (True, False)
    >>> terminate_wanted(10**9, 100, None)   # the stage is off
    False
    """
    return bool(terminate_fraction) and rss > limit * terminate_fraction


def pause_wanted(rss, limit, pause_fraction, disk_fails):
    """Whether the worker should be paused; ``None`` when pausing is off.

    Pausing waits for spilling: not while the disk fails (full), or the
    worker would wait for ever; results that do not fit fail instead.

    >>> pause_wanted(81, 100, 0.8, False), pause_wanted(80, 100, 0.8, False)
    (True, False)
    >>> pause_wanted(81, 100, 0.8, True), pause_wanted(81, 100, None, False)
    (False, None)
    """
    if not pause_fraction:
        return None
    return rss > limit * pause_fraction and not disk_fails


#: :func:`spill_target` when nothing needs spilling
NO_SPILL = -1


def spill_target(rss, limit, target_fraction, memory_bytes, buffer_target, in_memory):
    """Down to how many bytes of values in memory the monitor spills:
    ``None`` for the buffer's own target, :data:`NO_SPILL` for nothing.

    Above the target fraction of the limit it frees what the process holds
    above it (or all it can); else it spills only when the values held (by
    ``sizeof``) exceed the buffer's target.

    >>> spill_target(70, 100, 0.6, 30, 60, in_memory=True)   # 10 above the target
    20.0
    >>> spill_target(70, 100, 0.6, 5, 60, in_memory=True)    # everything
    0
    >>> spill_target(50, 100, 0.6, 61, 60, in_memory=True) is None
    True
    >>> spill_target(50, 100, 0.6, 30, 60, in_memory=True) == NO_SPILL
    True
    """
    target = limit * target_fraction
    if rss > target and in_memory:
        return max(0, memory_bytes - (rss - target))
    if memory_bytes > buffer_target:
        return None
    return NO_SPILL


def pause_threshold(limit, pause_fraction, terminate_fraction):
    """Bytes of process memory above which the worker is (or would be) paused.

    >>> pause_threshold(100, 0.8, 0.95), pause_threshold(100, None, 0.95)
    (80.0, 95.0)
    >>> pause_threshold(100, None, None)
    100
    """
    return limit * (pause_fraction or terminate_fraction or 1)


def excess_bytes(rss, limit, target_fraction, memory_bytes, buffer_target, nbytes=0):
    """How many bytes to spill before keeping ``nbytes`` more: what the
    process is above its target, or what the values held plus ``nbytes``
    are above the buffer's target, whichever is more (<= 0: none).

    >>> excess_bytes(70, 100, 0.6, 30, 60)
    10.0
    >>> excess_bytes(50, 100, 0.6, 50, 60, nbytes=15)
    5
    """
    return max(rss - limit * target_fraction, memory_bytes + nbytes - buffer_target)


def blame(rss, held, limit, pause_fraction, terminate_fraction):
    """``'data'`` when the values held in memory (``held`` bytes) make up
    what the process is above its pause threshold (spilling did not keep up:
    its running tasks are not to blame), ``'tasks'`` otherwise.

    >>> blame(96, 90, 100, 0.8, 0.95)   # 6 bytes besides the data
    'data'
    >>> blame(96, 10, 100, 0.8, 0.95)   # 86 bytes besides the data
    'tasks'
    """
    fraction = min(pause_fraction or MEMORY_PAUSE_FRACTION, terminate_fraction or 1)
    return "data" if rss - held <= limit * fraction else "tasks"


# -- the manager ------------------------------------------------------------------


class WorkerMemoryManager:
    """Spilling, pausing and the memory exit of one worker (see the module
    docstring).  ``worker`` gives ``data``, ``nbytes``, ``tasks``, ``loop``,
    ``status``, ``address``, ``local_dir``, ``batched`` and ``_send``.

    Attributes: ``limit`` (bytes or ``None``), ``target_fraction``,
    ``pause_fraction``, ``terminate_fraction`` (``None`` when off),
    ``rss_sample`` (the last sample), ``paused``, ``paused_tasks``
    (``{key: how to go on}``, in arrival order), ``thread`` (the monitor).
    ``rss`` and ``terminate`` may be replaced (tests do).
    """

    def __init__(self, worker, memory_limit=None, target_fraction=None,
                 pause_fraction=None, terminate_fraction=None,
                 monitor_interval=MEMORY_MONITOR_INTERVAL):
        self.worker = worker
        self.limit = int(memory_limit) if memory_limit else None
        self.target_fraction = _memory_fraction(
            target_fraction, "DISTRIBUTED_MEMORY_TARGET", MEMORY_TARGET_FRACTION)
        self.pause_fraction = _memory_fraction(
            pause_fraction, "DISTRIBUTED_MEMORY_PAUSE", MEMORY_PAUSE_FRACTION)
        self.terminate_fraction = _memory_fraction(
            terminate_fraction, "DISTRIBUTED_MEMORY_TERMINATE", MEMORY_TERMINATE_FRACTION)
        self.monitor_interval = monitor_interval
        self.rss_sample = None  # last sample of the process memory
        self.paused = False
        self.unpaused = locks.Event()
        self.unpaused.set()
        self.paused_tasks = OrderedDict()  # key -> how to go on, once resumed
        self._stop = threading.Event()
        self.thread = None
        self.spill_executor = self.unspill_executor = None
        self._spill_pending = False
        self._spill_request_lock = threading.Lock()

    # -- life cycle

    def make_data(self, local_dir):
        """The worker's ``data``: a :class:`SpillBuffer` in ``local_dir/spill``
        when spilling is on, else a dict."""
        if not (self.limit and self.target_fraction):
            return {}
        _return_freed_memory()
        # spilling (and file removal) in one thread, reading back in another:
        # a long eviction does not hold up a peer waiting for a spilled key
        self.spill_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="distributed-spill")
        self.unspill_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="distributed-unspill")
        return SpillBuffer(os.path.join(local_dir, "spill"),
                           target=int(self.limit * self.target_fraction),
                           executor=self.spill_executor)

    def start(self):
        """Start the monitor thread (with a limit, once)."""
        if self.limit and self.thread is None:
            self.thread = threading.Thread(
                target=self._monitor, name="distributed-memory-monitor", daemon=True)
            self.thread.start()

    def stop(self):
        """Stop watching; requests waiting for a resume go on (and fail)."""
        self._stop.set()
        self.paused = False
        self.unpaused.set()

    def close(self):
        """Stop the spill threads (pending spills are dropped)."""
        for ex in (self.spill_executor, self.unspill_executor):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)

    # -- sampling

    def rss(self):
        """Memory of this process in bytes (psutil's RSS); tests replace it."""
        return _this_process().memory_info().rss

    def _monitor(self):
        """Body of the monitor thread: sample, then spill, pause or exit."""
        while not self._stop.wait(self.monitor_interval):
            try:
                self.check()
            except Exception:
                logger.exception("memory monitor")

    def check(self):
        """One look at the process memory (in the monitor thread)."""
        rss = self.rss_sample = self.rss()
        limit, worker = self.limit, self.worker
        if not limit or worker.status in ("closing", "closed"):
            return
        if terminate_wanted(rss, limit, self.terminate_fraction):
            self.terminate(rss)
            return
        paused = pause_wanted(rss, limit, self.pause_fraction, self.disk_fails())
        if paused is not None and paused != self.paused:
            try:
                worker.loop.add_callback(self.set_paused, paused)
            except RuntimeError:  # the loop is closed
                return
        data = worker.data
        if type(data) is not dict:
            target = spill_target(rss, limit, self.target_fraction, data.memory_bytes,
                                  data.target, bool(data.fast))
            if target != NO_SPILL:
                self.request_spill(target)

    def disk_fails(self):
        data = self.worker.data
        return type(data) is not dict and data.write_error is not None

    # -- spilling

    def request_spill(self, target=None):
        """Spill down to ``target`` bytes (default: the buffer's) in the spill
        thread, unless a spill is under way already.  Any thread, dict speed."""
        with self._spill_request_lock:
            if self._spill_pending:
                return
            self._spill_pending = True
        try:
            self.spill_executor.submit(self._spill, target)
        except RuntimeError:  # shut down
            self._spill_pending = False

    def _spill(self, target):
        local_dir = self.worker.local_dir
        try:
            n = self.worker.data.evict_until(target)
            if n:
                logger.debug("spilled %d bytes to %s", n, local_dir)
        except Exception:
            logger.exception("could not spill to %s", local_dir)
        finally:
            self._spill_pending = False

    def before_task(self):
        """In a task thread, before the task runs: above the pause threshold,
        make room first (see :meth:`make_room`)."""
        try:
            self.make_room(0, before=True)
        except Exception:
            logger.exception("could not make room for a task")

    def room_for(self, nbytes):
        """In a task thread, after the task ran: make room for its result of
        ``nbytes`` now, so that a fast producer is slowed down to the speed
        of the disk instead of outrunning the spill thread.  Returns the
        ``MemoryError`` when it can be neither kept nor spilled (disk full,
        memory above the pause threshold), else ``None``.  (It takes the
        size, not the result: the error's traceback must not hold the value.)"""
        try:
            self.make_room(nbytes)
        except MemoryError as e:
            return e
        except Exception:
            logger.exception("could not make room for a result")
        return None

    def make_room(self, nbytes, before=False):
        """Spill least recently used values, in this thread and now, until
        the values held plus ``nbytes`` more fit in the target and the
        process memory is back at the target.  ``before`` a task this only
        acts above the pause threshold.  Raises ``MemoryError`` when the
        spill directory fails (full disk) and the process is above the pause
        threshold: the value cannot be kept."""
        data, limit = self.worker.data, self.limit
        rss = self.rss()
        pause = pause_threshold(limit, self.pause_fraction, self.terminate_fraction)
        if before and rss <= pause:
            return
        excess = excess_bytes(rss, limit, self.target_fraction, data.memory_bytes,
                              data.target, nbytes)
        if excess > 0 and data.fast:
            data.evict_until(max(0, data.memory_bytes - excess))
            rss = self.rss()
        error = data.write_error
        if error is not None and not before and rss > pause:
            raise MemoryError(
                "worker %s cannot keep a result of %s: its process memory %s is "
                "above %d%% of its memory limit %s and spilling to %s fails (%s: %s)"
                % (self.worker.address, _format_bytes(nbytes), _format_bytes(rss),
                   pause * 100 / limit, _format_bytes(limit), data.directory,
                   type(error).__name__, error))

    # -- reading back

    def in_memory(self, keys):
        """``(values, spilled)``: a mapping with the ``keys`` held in memory,
        and the list of those on disk.  Dict speed: nothing is read here."""
        data = self.worker.data
        if type(data) is dict:
            return data, ()
        return data.get_in_memory(keys)

    def unspill(self, keys):
        """Future of ``{key: value}``, read back from disk in a thread."""
        return self.worker.loop.run_in_executor(
            self.unspill_executor, self.worker.data.get_many, keys)

    async def read_for_peer(self, values, spilled):
        """``values`` plus the values of the ``spilled`` keys, read in the
        unspill thread (see :meth:`_read_for_peer`)."""
        values.update(await self.worker.loop.run_in_executor(
            self.unspill_executor, self._read_for_peer, spilled))
        return values

    def _read_for_peer(self, keys):
        """In the unspill thread: the values of the spilled ``keys``, after
        making room for them, read but left on disk (they are sent and
        freed, not kept in memory: gathering spilled results does not fill
        the worker again)."""
        data = self.worker.data
        need = 0
        for key in keys:
            try:
                need += data.slow.nbytes(key)
            except KeyError:
                pass
        try:
            self.make_room(need)
        except MemoryError:  # the disk fails: read them all the same
            pass
        out = {}
        for key in keys:
            try:
                out[key] = data.slow[key]
            except (KeyError, FileNotFoundError):  # read back or deleted meanwhile
                out.update(data.get_many([key]))
        return out

    # -- pausing

    def hold(self, key, go_on):
        """While paused: call ``go_on()`` once resumed (in arrival order)."""
        self.paused_tasks[key] = go_on

    def set_paused(self, paused):
        """Pause (no task starts) or resume (on the event loop)."""
        worker = self.worker
        if paused == self.paused or worker.status in ("closing", "closed"):
            return
        rss, limit = self.rss_sample or 0, self.limit
        self.paused = paused
        worker._send({"op": "worker-status", "paused": paused})  # the scheduler holds back
        if paused:
            self.unpaused.clear()
            logger.warning(
                "worker %s paused: process memory %s is above %d%% of the memory "
                "limit %s; no new task starts until it is lower", worker.address,
                _format_bytes(rss), self.pause_fraction * 100,
                _format_bytes(limit))
            return
        if self.disk_fails():
            logger.warning("worker %s resumed although its process memory %s is "
                           "above %d%% of the memory limit %s: spilling to %s fails "
                           "(%s); results that do not fit fail with MemoryError",
                           worker.address, _format_bytes(rss),
                           self.pause_fraction * 100, _format_bytes(limit),
                           worker.data.directory, worker.data.write_error)
        else:
            logger.warning("worker %s resumed: process memory %s is below %d%% of "
                           "the memory limit %s", worker.address, _format_bytes(rss),
                           self.pause_fraction * 100, _format_bytes(limit))
        self.unpaused.set()
        while self.paused_tasks and not self.paused:
            _, go_on = self.paused_tasks.popitem(last=False)
            go_on()

    # -- exit

    def terminate(self, rss):
        """Past the limit: log, tell the center who is to blame, remove the
        spilled files and exit the process with :data:`MEMORY_EXIT_CODE` (in
        the monitor thread)."""
        self._stop.set()
        cause = self.blame(rss)
        logger.critical(
            "worker %s exceeded its memory limit: process memory %s is above %d%% "
            "of %s; %s; exiting with status %d", self.worker.address,
            _format_bytes(rss), self.terminate_fraction * 100, _format_bytes(self.limit),
            MEMORY_BLAME[cause], MEMORY_EXIT_CODE)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            self._announce_exit(cause)
            shutil.rmtree(self.worker.local_dir, ignore_errors=True)
        finally:
            os._exit(MEMORY_EXIT_CODE)

    def blame(self, rss):
        """:func:`blame` for this worker now (``'tasks'`` when unsure)."""
        try:
            held = self.state()["memory_bytes"]
        except Exception:  # a table changed under this thread
            return "tasks"
        return blame(rss, held, self.limit, self.pause_fraction, self.terminate_fraction)

    def _announce_exit(self, cause, timeout=3):
        """Tell the center on the worker stream, ahead of its closing, that
        this worker exits for memory and who is to blame; then close the
        stream, so that nothing more gets out (errors of tasks whose files
        are being removed).  Waits ``timeout`` seconds at most for the loop
        (a task may hold the GIL), then shuts the socket from here."""
        # the stream's end must not look like a lost center: a worker that
        # registered again before the exit would be given the rescheduled
        # tasks and die with them counted against them
        self.worker.status = "exiting"  # not "closing": _close still runs
        batched = self.worker.batched
        if batched is None or batched.closed:
            return
        done = threading.Event()

        async def announce():
            try:
                batched.send({"op": "memory-exit", "blame": cause})
                while batched._busy and not batched.closed:
                    await gen.sleep(0.001)
            finally:
                batched.abort()
                done.set()

        try:
            self.worker.loop.add_callback(announce)
        except RuntimeError:  # the loop is closed
            return
        if not done.wait(timeout):
            try:
                batched.stream.socket.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass

    # -- reporting

    def state(self):
        """``{'memory_limit', 'memory_rss', 'memory_bytes', 'spilled_bytes',
        'spilled_keys', 'paused', ...}``: what ``health`` and /info.json show."""
        data = self.worker.data
        spilling = type(data) is not dict
        return {
            "memory_limit": self.limit,
            "memory_target_fraction": self.target_fraction,
            "memory_pause_fraction": self.pause_fraction,
            "memory_terminate_fraction": self.terminate_fraction,
            "memory_rss": self.rss_sample,
            # list() copies in one step, safe from the monitor thread while
            # the event loop adds keys (summing the live view is not)
            "memory_bytes": (data.memory_bytes if spilling
                             else sum(list(self.worker.nbytes.values()))),
            "spilled_bytes": data.spilled_bytes if spilling else 0,
            "spilled_keys": len(data.slow) if spilling else 0,
            "paused": self.paused,
            "paused_tasks": len(self.paused_tasks),
        }


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
    """
    >>> _format_bytes(3 * 2**20), _format_bytes(100)
    ('3.0 MiB', '100 B')
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return "%.1f %s" % (n / size, unit)
    return "%d B" % n
