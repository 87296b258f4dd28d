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

__all__ = ["Cluster"]


class Cluster:
    """Base of the clusters: a subclass gives ``center_address`` (``'host:port'``),
    ``security`` (a :class:`~distributed.security.Security`: what clients need)
    and a blocking, idempotent ``close()``; this class adds ``with``, the
    awaitable ``_close()`` and a ``close()`` when it is garbage collected.
    """

    center_address = None
    security = None

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

