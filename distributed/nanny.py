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
"""

import asyncio
import itertools
import logging
import signal
import sys
import time

import psutil
from tornado.ioloop import PeriodicCallback

from .cli.utils import WORKER_REGISTERED, WORKER_RESTARTED, WORKER_STARTED
from .core import ConnectionPool, Server, rpc
from .process import Process
from .utils import get_ip, unparse_address
from .worker import MEMORY_BLAME, MEMORY_EXIT_CODE

logger = logging.getLogger(__name__)

__all__ = ["Nanny"]


def describe_exit(code):
    """``-9`` -> ``'killed by signal SIGKILL'``; ``3`` -> ``'exit code 3'``;
    ``75`` -> ``'memory limit exceeded (exit code 75)'`` (see ``--memory-limit``)."""
    if code is None:
        return "still running"
    if code == MEMORY_EXIT_CODE:
        return "memory limit exceeded (exit code %d)" % code
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return "killed by signal %s" % name
    return "exit code %d" % code


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
                 restart_delay=0.5, echo=False, heartbeat_interval=1.0, **kwargs):
        self.center_address = unparse_address(center_ip, center_port)
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
        await self.kill()
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
        self._restarting = asyncio.ensure_future(self._restart_after_death())
        asyncio.ensure_future(self._death(process, self.worker_address))

    async def _death(self, process, address):
        """Log, print and report (to the center) why the worker died."""
        code = process.poll()
        cause, blame = describe_exit(code), None
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

    async def _restart_after_death(self):
        try:
            await asyncio.sleep(self.restart_delay)
            address = await self.instantiate()
            print(WORKER_RESTARTED, address, flush=True)
        except Exception:
            logger.exception("could not restart the worker")
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
