"""Optional HTTP services that nodes run beside their TCP server.

A service is a class taking the node, with ``listen(port)``, ``port`` and
``stop()``; pass it as ``Worker(..., services={'http': HTTPWorker})``.
"""

__all__ = ["HTTPWorker", "HTTPCenter"]


def __getattr__(name):
    # imported when first used: distributed.dashboard imports http.base, and
    # HTTPCenter imports distributed.dashboard (no cycle either way round)
    if name == "HTTPWorker":
        from .worker import HTTPWorker
        return HTTPWorker
    if name == "HTTPCenter":
        from .center import HTTPCenter
        return HTTPCenter
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
