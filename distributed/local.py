"""``LocalCluster``: a center and workers as child processes on this machine.

::

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        e = Executor(cluster.center_address)
        ...

``Executor()`` with no address makes one for itself and closes it on
shutdown.  Everything binds to 127.0.0.1 unless ``ip`` says otherwise.

Every cluster has an auth token, a random one unless ``security`` (or the
environment) gives one: its processes get it through their environment, and
an ``Executor(cluster.center_address)`` in this process finds it by itself.
Any other client needs ``cluster.security``.
"""

import itertools
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

from .cli.utils import (
    CENTER_STARTED,
    DASHBOARD_STARTED,
    DEPLOY_ENV,
    LOCALHOST,
    WORKER_REGISTERED,
    WORKER_STARTED,
)
from .core import rpc
from .deploy.cluster import Cluster, cluster_token, run_coroutine, running_clusters
from .nanny import _OOMWatch, describe_exit
from .process import Process

logger = logging.getLogger(__name__)

__all__ = ["LocalCluster"]


class LocalCluster(Cluster):
    """Start ``dcenter`` and ``n_workers`` ``dworker`` processes.

    ``n_workers`` defaults to the number of cores; each worker runs
    ``threads_per_worker`` threads (default 1).  ``timeout`` bounds the
    start-up, in seconds.  ``security`` (default: the environment's) may add
    TLS; the cluster's auth token is its token or, without one, a random one:
    ``cluster.security`` is what clients need.  Other keywords are options of
    the center (``dcenter --help``) by their Python names, e.g.
    ``heartbeat_timeout=10, allowed_failures=1, http_port=0`` (the
    dashboard's port; ``no_dashboard=True`` turns it off);
    ``worker_options`` are those of every worker (``dworker --help``), e.g.
    ``{'memory_limit': '1GB', 'local_dir': '/tmp/w', 'name': 'w'}`` (a name
    gets ``-0``, ``-1``, ... like ``dworker --nprocs``).  An unknown option is
    a ``TypeError``, a bad value a ``ValueError``, before anything starts.
    A worker that dies is replaced unless ``restart_dead_workers=False``.
    """

    def __init__(self, n_workers=None, threads_per_worker=1, ip=LOCALHOST,
                 timeout=30, worker_args=(), echo=False, restart_dead_workers=True,
                 security=None, worker_options=None, **center_options):
        from .cli.dcenter import center_args
        from .cli.dworker import worker_args as dworker_args

        self.center_args = center_args(**center_options)
        self.worker_options = dict(worker_options or {})
        dworker_args(**self.worker_options)  # unknown or bad ones fail here
        self.n_workers = n_workers if n_workers is not None else (os.cpu_count() or 1)
        self.threads_per_worker = threads_per_worker
        self.ip = ip
        self.timeout = timeout
        self.worker_args = list(worker_args)
        self.echo = echo
        security = cluster_token(security)
        self.security = security
        self._env = security.child_env()  # the token never goes on a command line
        for name in DEPLOY_ENV:  # a $DISTRIBUTED_SCHEDULER_FILE is not for our center
            self._env.pop(name, None)
        self.center = None
        self.dashboard_address = None  # http://host:port/status
        self.workers = []
        self.deaths = []  # (time, address, exit code) of workers that died
        self.restart_dead_workers = restart_dead_workers
        self.status = "starting"
        self._lock = threading.Lock()  # status, workers and _starting change together
        self._starting = set()  # worker processes not yet registered
        self._closing = threading.Event()
        self._watcher = None
        self._worker_index = itertools.count()
        try:
            self._start_center()
            self.start_workers(self.n_workers)
        except BaseException:
            self.close()
            raise
        self.status = "running"
        self._register_running()
        if restart_dead_workers:
            # the cluster is the nanny of its workers: a task that crashes
            # one gets a fresh worker, and the scheduler retries it elsewhere
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name="distributed-local-cluster-watch")
            self._watcher.start()

    @property
    def center_address(self):
        return self._center_address

    def _start_center(self):
        self.center = Process(
            [sys.executable, "-m", "distributed.cli.dcenter", "--host", self.ip,
             "--port", "0"] + self.center_args, env=self._env, echo=self.echo)
        line = self.center.wait_for_line(CENTER_STARTED, self.timeout)
        self._center_address = line.split()[-1]
        if "--no-dashboard" not in self.center_args:
            line = self.center.wait_for_line(DASHBOARD_STARTED, self.timeout)
            self.dashboard_address = line.split()[-1]
        if self.restart_dead_workers:
            # the nanny of its workers, the cluster will say why one died: the
            # center waits for that (told before any starts: a task may kill
            # a worker as soon as it registers)
            self._tell_center("watch_workers")

    @property
    def dashboard_link(self):
        """The dashboard's URL, with ``?token=`` (which logs the browser in),
        or None without a dashboard (``no_dashboard=True``)."""
        if self.dashboard_address is None:
            return None
        return dashboard_link(self.dashboard_address, self.security.token)

    def _worker_command(self):
        """The command line of the next worker."""
        from .cli.dworker import worker_args

        return ([sys.executable, "-m", "distributed.cli.dworker", self._center_address,
                 "--host", self.ip, "--ncores", str(self.threads_per_worker),
                 "--no-nanny"]
                + worker_args(index=next(self._worker_index), **self.worker_options)
                + self.worker_args)

    def _start_worker(self):
        with self._lock:
            if self.status == "closed":
                raise RuntimeError("the cluster is closed")
            p = Process(self._worker_command(), env=self._env, echo=self.echo)
            self._starting.add(p)  # close() stops it too, and we stop waiting
        try:
            address = p.wait_for_line(WORKER_STARTED, self.timeout).split()[-1]
            p.wait_for_line(WORKER_REGISTERED, self.timeout)
        except BaseException:
            p.stop()
            raise
        finally:
            with self._lock:
                self._starting.discard(p)
        p.address = address
        p.oom_watch = _OOMWatch(p.pid)
        return p

    def _tell_center(self, op, **kwargs):
        """One rpc to the center, from a thread of ours (not a running event
        loop's); a failure is logged, and the cluster goes on."""

        async def call():
            with rpc(self._center_address, security=self.security) as r:
                return await r.call(op, timeout=5, **kwargs)

        try:
            return run_coroutine(call())
        except Exception as e:
            logger.info("could not tell the center %s: %s", op, e)

    def start_workers(self, n):
        """Start ``n`` more workers (in parallel); return their processes."""
        if n <= 0:
            return []
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(self._start_worker) for _ in range(n)]
            started, error = [], None
            for f in futures:
                try:
                    started.append(f.result())
                except BaseException as e:
                    error = e
        with self._lock:
            closed = self.status == "closed"
            if not closed:
                self.workers.extend(started)
        if closed:  # close() came while they started: they are not ours to keep
            for p in started:
                p.stop()
        if error is not None:
            raise error
        return started

    def _watch(self):
        """Replace the workers that die, until :meth:`close`."""
        while not self._closing.wait(0.1):
            for p in list(self.workers):
                code = p.poll()
                with self._lock:
                    if code is None or p not in self.workers or self.status != "running":
                        continue
                    self.workers.remove(p)
                self.deaths.append((time.time(), p.address, code))
                oom = p.oom_watch.oom_killed() if code == -9 else None
                cause = describe_exit(code, oom)
                logger.warning("worker %s died (%s); starting another. "
                               "It printed last:\n%s", p.address, cause, p.tail())
                self._tell_center("worker_died", address=p.address, cause=cause)
                # in a thread of its own: the next death is reported meanwhile,
                # within the center's grace period, not after this start
                threading.Thread(target=self._replace_worker, daemon=True,
                                 name="distributed-local-cluster-replace").start()

    def _replace_worker(self):
        try:
            self.start_workers(1)
        except Exception:
            if self.status == "running":
                logger.exception("could not start a worker")

    def restart_workers(self):
        """Stop every worker process and start as many fresh ones."""
        n = len(self.workers)
        old, self.workers = self.workers, []
        for p in old:
            p.stop()
        self.start_workers(n)

    @property
    def worker_addresses(self):
        return [p.address for p in self.workers]

    def close(self):
        """Stop the workers (SIGTERM: they unregister), then the center; a
        worker still starting is stopped too, and no dead one is replaced."""
        with self._lock:
            if self.status == "closed":
                return
            self.status = "closed"
            workers, self.workers = self.workers, []
            workers += self._starting
        self._closing.set()
        for p in workers:
            p.send_signal(15)
        for p in workers:
            p.stop()
        if self.center is not None:
            self.center.stop()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(self.timeout)

    def __repr__(self):
        return "LocalCluster(%r, workers=%d)" % (
            getattr(self, "_center_address", None), len(self.workers))


def dashboard_link(url, token=None):
    """``url`` with what logs a browser in: ``?token=...`` when there is one.

    >>> dashboard_link('http://127.0.0.1:8797/status', 's3cret')
    'http://127.0.0.1:8797/status?token=s3cret'
    """
    if not token:
        return url
    return url + "?" + urlencode({"token": token})


def cluster_security(address):
    """The :class:`Security` of this process's running cluster at ``address``, or None."""
    for cluster in running_clusters():
        if isinstance(cluster, LocalCluster) and cluster._center_address == address:
            return cluster.security
    return None
