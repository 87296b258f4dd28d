"""``Cluster``: what every cluster object gives an ``Executor`` and its user.

:class:`distributed.LocalCluster`, :class:`~distributed.deploy.ssh.SSHCluster`
and :class:`~distributed.deploy.jobqueue.JobQueueCluster` subclass it::

    with SSHCluster(["node1", "node2"]) as cluster:   # any cluster
        e = Executor(cluster)   # reads cluster.center_address, cluster.security
        ...
    # left the block: cluster.close() ran

    async def main():                       # from async code
        cluster = await asyncio.to_thread(LocalCluster, 2)  # start-up blocks
        ...
        await cluster._close()              # close() in a thread
"""

import asyncio
import atexit
import itertools
import secrets
import weakref
from concurrent.futures import ThreadPoolExecutor

from ..security import Security

__all__ = ["Cluster", "cluster_token", "run_coroutine", "running_clusters"]

#: the running clusters of this process, by start order: closed at exit
_running = weakref.WeakValueDictionary()
_order = itertools.count()


class Cluster:
    """Base of the clusters: a subclass gives ``center_address`` (``'host:port'``),
    ``security`` (a :class:`~distributed.security.Security`: what clients need)
    and a blocking, idempotent ``close()``; this class adds ``with``, the
    awaitable ``_close()`` and a ``close()`` when it is garbage collected.
    """

    center_address = None
    security = None

    @property
    def scheduler_address(self):
        """The center's address (the name dask users know)."""
        return self.center_address

    def _register_running(self):
        """Call once started: the cluster is closed at exit, newest first (a
        cluster closes before the clusters it started, e.g. a job queue's
        jobs before its center), as long as it is not garbage collected."""
        _running[next(_order)] = self

    def close(self):
        raise NotImplementedError

    async def _close(self):
        """:meth:`close` for ``async def`` code (it blocks: it runs in a thread)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def running_clusters():
    """The running clusters of this process, newest first."""
    return [c for _, c in sorted(_running.items(), key=lambda kc: -kc[0])
            if c.status == "running"]


@atexit.register
def _close_clusters():
    for cluster in running_clusters():
        cluster.close()


def run_coroutine(coroutine):
    """Run ``coroutine`` to its end from a blocking method, and return its result:
    ``asyncio.run`` it, or, when a loop already runs in this thread (Jupyter,
    async code; ``asyncio.run`` would refuse), in a thread of its own.

    >>> async def two():
    ...     return 2
    >>> run_coroutine(two())
    2
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop runs in this thread
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def cluster_token(security=None):
    """A cluster's :class:`Security`: ``security`` (default: the environment's)
    with a random auth token when it has none, so no cluster runs without one.

    >>> len(cluster_token(Security()).token), cluster_token(Security(token="t")).token
    (64, 't')
    """
    security = security if security is not None else Security.from_env()
    if security.token is None:
        security = security.with_token(secrets.token_hex(32))
    return security
