"""Optional HTTP services that nodes run beside their TCP server.

A service is a class taking the node, with ``listen(port)``, ``port`` and
``stop()``; pass it as ``Worker(..., services={'http': HTTPWorker})``.
"""

from .worker import HTTPWorker
from .center import HTTPCenter

__all__ = ["HTTPWorker", "HTTPCenter"]
