"""The nanny: runs a worker as a child process and restarts it when it dies.

::

    n = Nanny('127.0.0.1', 8787, worker_args=['--ncores', '2'])
    await n._start()          # listens, starts the worker, waits for it
    n.worker_address          # '127.0.0.1:40123'
    await n._close()          # stops the worker (it unregisters) and itself

``dworker`` runs one unless ``--no-nanny``.  The worker gets the nanny's
auth token and TLS settings through its environment, never its command line.  The center learns each worker's
nanny when the worker registers, and asks the nannies to restart their
workers on ``Executor.restart()``.

Handlers: ``restart`` (kill the worker, start a fresh one, wait until it
registered), ``kill``, ``instantiate``, ``terminate``, ``identity``, ``ping``.

When the worker dies on its own the nanny says why (:func:`describe_exit`):
its exit code, the signal that killed it, its memory limit exceeded (exit
code 75, with what was to blame), or the OOM killer, told by the OOM kill
count of the worker's memory cgroup (:func:`oom_kill_counter`) or, failing
that, the kernel log (:func:`kernel_log_oom_kill`).  It prints that, and
tells the center (``worker_died``), whose errors then name it
(``KilledWorker``, ``LostData``).
"""

import asyncio
import errno
import itertools
import logging
import os
import re
import signal
import sys
import time

import psutil
from tornado.ioloop import PeriodicCallback

from .cli.utils import WORKER_REGISTERED, WORKER_RESTARTED, WORKER_STARTED
from .core import ConnectionPool, Server, rpc
from .process import Process
from .utils import get_ip, unparse_address
from .worker import (
    DEATH_TIMEOUT_EXIT_CODE,
    MEMORY_BLAME,
    MEMORY_EXIT_CODE,
    RETIRED_EXIT_CODE,
)

logger = logging.getLogger(__name__)

__all__ = ["Nanny"]


#: the cgroup file systems' mount points (v1 memory controller; v2, in its
#: own place in hybrid setups or at the top)
CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
CGROUP_V2_MOUNTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
#: the kernel log (readable by root unless restricted)
KMSG = "/dev/kmsg"
#: at most this many kernel log records are read looking for an OOM kill
KMSG_MAX_RECORDS = 100000
_OOM_KILL = re.compile(r"^oom_kill (\d+)$", re.M)
_KMSG_KILLED = re.compile(r"Killed process (\d+) ")
#: seconds a worker being restarted has to stop after SIGTERM before SIGKILL
#: (it does not wait for its running tasks; one holding the GIL cannot even
#: take the signal): a restart is over in about this plus a worker's start
RESTART_GRACE = 1.0


def describe_exit(code, oom=None):
    """How a process ended, from its exit code (``Popen.returncode``).

    ``oom``, for SIGKILL: whether the OOM killer did it (None: not known).

    >>> describe_exit(3)
    'exit code 3'
    >>> describe_exit(-11)
    'killed by signal SIGSEGV'
    >>> describe_exit(75)  # see --memory-limit
    'memory limit exceeded (exit code 75)'
    >>> describe_exit(-9), describe_exit(-9, oom=False)
    ('killed by signal SIGKILL (perhaps the OOM killer)', 'killed by signal SIGKILL')
    >>> describe_exit(-9, oom=True)
    'killed by the OOM killer (signal SIGKILL): out of memory'
    """
    if code is None:
        return "still running"
    if code == MEMORY_EXIT_CODE:
        return "memory limit exceeded (exit code %d)" % code
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        if -code == signal.SIGKILL:
            if oom:
                return "killed by the OOM killer (signal SIGKILL): out of memory"
            if oom is None:
                return "killed by signal SIGKILL (perhaps the OOM killer)"
        return "killed by signal %s" % name
    return "exit code %d" % code


def oom_kill_counter(pid):
    """The file counting the OOM killer's kills in the memory cgroup of
    process ``pid`` (cgroup v1 ``memory.oom_control``, v2 ``memory.events``,
    both with an ``oom_kill N`` line; see :func:`read_oom_kills`), or None
    where there is none to read (not Linux, no cgroup mounted)."""
    try:
        with open("/proc/%d/cgroup" % pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if "memory" in controllers.split(","):
            candidates.append(os.path.join(CGROUP_V1_MEMORY, path, "memory.oom_control"))
        elif controllers == "":
            candidates.extend(os.path.join(mount, path, "memory.events")
                              for mount in CGROUP_V2_MOUNTS)
    for candidate in candidates:
        if read_oom_kills(candidate) is not None:
            return candidate
    return None


def read_oom_kills(path):
    """The ``oom_kill`` count in the cgroup file ``path``; None if unreadable.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".events") as f:
    ...     _ = f.write("low 0\\nhigh 0\\nmax 3\\noom 1\\noom_kill 1\\n"); f.flush()
    ...     read_oom_kills(f.name)
    1
    """
    if path is None:
        return None
    try:
        with open(path) as f:
            match = _OOM_KILL.search(f.read())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def kernel_log_oom_kill(pids, since=0.0, path=KMSG):
    """True if the kernel log says the OOM killer killed one of ``pids``
    (at or after ``since``, seconds of ``time.monotonic()``, about the
    kernel's clock); None if it does not say so, or cannot be read (it
    needs root, and in a container the kernel's pids may not be ours)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    wanted = {str(p) for p in pids}
    try:
        for _ in range(KMSG_MAX_RECORDS):
            try:
                chunk = os.read(fd, 8192)  # one record from /dev/kmsg
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten while we read: go on
                    continue
                break  # EAGAIN: the end of the log
            if not chunk:
                break
            for record in chunk.decode("utf-8", "replace").splitlines():
                # 'priority,sequence,microseconds,flags;message'
                head, _, message = record.partition(";")
                fields = head.split(",")
                try:
                    if len(fields) > 2 and int(fields[2]) / 1e6 < since:
                        continue
                except ValueError:
                    pass
                match = _KMSG_KILLED.search(message)
                if match and match.group(1) in wanted:
                    return True
    finally:
        os.close(fd)
    return None


def _namespace_pids(pid):
    """Every pid of process ``pid`` (``NSpid``: one per pid namespace)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(p) for p in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return [pid]


class _OOMWatch:
    """What tells, once the worker ``pid`` is dead, whether the OOM killer
    killed it: its cgroup's OOM kill count now (read while it lives)."""

    def __init__(self, pid):
        self.pids = _namespace_pids(pid)
        self.started = time.monotonic()
        self.counter = oom_kill_counter(pid)
        self.count = read_oom_kills(self.counter)

    def oom_killed(self):
        """True (the count rose, or the kernel log says so), False (the count
        is known and did not rise) or None (cannot be told)."""
        now = read_oom_kills(self.counter)
        if now is not None and self.count is not None and now > self.count:
            return True
        if kernel_log_oom_kill(self.pids, self.started):
            return True
        if now is not None and self.count is not None:
            return False
        return None


def memory_blame(process, lines=50):
    """``'data'`` or ``'tasks'``: what the worker ``process`` (a
    :class:`~distributed.process.Process` that exited past its memory limit)
    said was to blame in its last ``lines`` lines of output; None if unsaid."""
    for line in itertools.islice(reversed(process.output), lines):
        if "exceeded its memory limit" in line:
            for blame, text in MEMORY_BLAME.items():
                if text in line:
                    return blame
    return None


class Nanny(Server):
    """Supervise one worker process (see the module docstring)."""

    def __init__(self, center_ip, center_port, ip=None, worker_args=(), timeout=30,
                 restart_delay=0.5, echo=False, heartbeat_interval=1.0,
                 death_timeout=None, **kwargs):
        self.center_address = unparse_address(center_ip, center_port)
        #: ``dworker --death-timeout``: a worker that cannot be restarted (its
        #: center is gone) ends the nanny too, rather than leaving it idle
        self.death_timeout = death_timeout
        #: the status ``dworker`` exits with once the nanny closed because its
        #: worker retired (0) or lost its center for good; None otherwise
        self.exit_code = None
        self.worker_args = list(worker_args)
        self.timeout = timeout
        self.restart_delay = restart_delay
        self.echo = echo  # print the worker's output as our own
        self.process = None
        self.worker_address = None
        self.status = "created"
        self.deaths = []  # (time, cause) of unexpected worker exits
        # every connection the nanny opens (heartbeats, death reports) uses its own
        # settings, also when they came from flags rather than the environment
        self.pool = ConnectionPool(security=kwargs.get("security"))
        self.center = rpc(self.center_address, pool=self.pool)
        self._restarting = None
        self._oom_watch = None  # of the running worker
        self._watch = PeriodicCallback(self._check, 100)
        self._heartbeats = PeriodicCallback(self._heartbeat, heartbeat_interval * 1000)
        handlers = {
            "restart": self.restart,
            "kill": self.kill,
            "instantiate": self.instantiate,
            "terminate": self.terminate,
        }
        super().__init__(handlers, ip=ip or get_ip(center_ip), **kwargs)

    def identity(self, stream=None):
        return {"type": "Nanny", "id": self.id, "worker": self.worker_address,
                "center": self.center_address}

    async def _start(self, port=0):
        if self.port is None:
            self.listen(port)
        await self.instantiate()
        self._watch.start()
        self._heartbeats.start()
        self.status = "running"
        return self

    async def instantiate(self, stream=None):
        """Start the worker process if none runs; return its address."""
        if self.process is not None and self.process.poll() is None:
            return self.worker_address
        args = [sys.executable, "-m", "distributed.cli.dworker", self.center_address,
                "--no-nanny", "--nanny-address", self.address] + self.worker_args
        # the auth token and TLS files travel in the environment, never in argv
        process = Process(args, env=self.security.child_env(), echo=self.echo)
        loop = asyncio.get_running_loop()
        try:
            line = await loop.run_in_executor(
                None, process.wait_for_line, WORKER_STARTED, self.timeout)
            await loop.run_in_executor(
                None, process.wait_for_line, WORKER_REGISTERED, self.timeout)
        except BaseException:
            process.kill()
            raise
        self.process = process
        self.worker_address = line.split()[-1]
        self._oom_watch = _OOMWatch(process.pid)
        return self.worker_address

    async def kill(self, stream=None, timeout=5):
        """Stop the worker process (SIGTERM, then SIGKILL)."""
        process, self.process = self.process, None
        if process is not None:
            await asyncio.get_running_loop().run_in_executor(None, process.stop, timeout)
        return b"OK"

    async def restart(self, stream=None, timeout=None):
        """Kill the worker and start a fresh one; return its address."""
        if self._restarting is not None:
            return await self._restarting
        self._restarting = asyncio.ensure_future(self._restart())
        try:
            return await self._restarting
        finally:
            self._restarting = None

    async def _restart(self):
        await self.kill(timeout=RESTART_GRACE)
        return await self.instantiate()

    async def _heartbeat(self):
        """Vouch for the worker while its process runs, from outside it.

        A task holding the GIL for minutes stops the worker's own heartbeats
        (no thread of its process can run) but not these: the center then
        sees a busy worker, not a dead one.  A stopped process (SIGSTOP) or
        a dead one gets none, and the center removes it after its timeout.
        """
        process, address = self.process, self.worker_address
        if process is None or address is None or process.poll() is not None:
            return
        try:
            if psutil.Process(process.pid).status() in (psutil.STATUS_STOPPED,
                                                        psutil.STATUS_ZOMBIE):
                return
        except psutil.Error:
            return
        try:
            await self.center.heartbeat(address=address, reply=False, timeout=5)
        except Exception as e:
            logger.debug("heartbeat for %s failed: %s", address, e)

    def _check(self):
        """Restart a worker that died on its own."""
        if self.status != "running" or self._restarting is not None:
            return
        process = self.process
        if process is None or process.poll() is None:
            return
        self.process = None
        if process.poll() in (RETIRED_EXIT_CODE, DEATH_TIMEOUT_EXIT_CODE):
            self._worker_ended(process.poll())
            return
        self._restarting = asyncio.ensure_future(self._restart_after_death())
        asyncio.ensure_future(self._death(process, self.worker_address, self._oom_watch))

    async def _death(self, process, address, oom_watch=None):
        """Log, print and report (to the center) why the worker died."""
        code = process.poll()
        loop = asyncio.get_running_loop()
        oom = None
        if code == -signal.SIGKILL and oom_watch is not None:
            oom = await loop.run_in_executor(None, oom_watch.oom_killed)
        cause, blame = describe_exit(code, oom), None
        if code == MEMORY_EXIT_CODE:
            # its last words say who was to blame: wait (a little) for them
            await asyncio.get_running_loop().run_in_executor(
                None, process.drained.wait, 1)
            blame = memory_blame(process)
            if blame is not None:
                cause = "%s: %s" % (cause, MEMORY_BLAME[blame])
        self.deaths.append((time.time(), cause))
        logger.warning("worker %s died (%s); restarting it%s", address, cause,
                       "" if self.echo else ". It printed last:\n" + process.tail())
        print("Worker %s died (%s); restarting" % (address, cause), flush=True)
        await self._report_death(address, cause, blame)

    async def _report_death(self, address, cause, blame=None):
        """Tell the center why the worker died (it logs it, in ``deaths``);
        ``blame='data'``: of memory its data held, not its tasks' fault."""
        try:
            await self.center.worker_died(address=address, cause=cause, blame=blame,
                                          timeout=5)
        except Exception as e:
            logger.info("could not tell the center that %s died: %s", address, e)

    def _worker_ended(self, code):
        """The worker retired (``--lifetime``) or gave its center up
        (``--death-timeout``): no restart; the nanny closes too."""
        if code == RETIRED_EXIT_CODE:
            self.exit_code = 0
            logger.info("worker %s retired; the nanny stops", self.worker_address)
        else:
            self.exit_code = code
            logger.warning("worker %s lost its center for good (--death-timeout); "
                           "the nanny stops", self.worker_address)
        asyncio.ensure_future(self._close())

    async def _restart_after_death(self):
        try:
            await asyncio.sleep(self.restart_delay)
            address = await self.instantiate()
            print(WORKER_RESTARTED, address, flush=True)
        except Exception:
            logger.exception("could not restart the worker")
            if self.death_timeout is not None and self.status == "running":
                self._restarting = None
                self._worker_ended(DEATH_TIMEOUT_EXIT_CODE)
        finally:
            self._restarting = None

    def terminate(self, stream=None):
        asyncio.ensure_future(self._close())
        return b"OK"

    async def _close(self):
        if self.status == "closed":
            return
        self.status = "closed"
        self._watch.stop()
        self._heartbeats.stop()
        if self._restarting is not None:
            try:
                await self._restarting
            except Exception:
                pass
        await self.kill()
        self.pool.close()
        self.stop()
