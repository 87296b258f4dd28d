"""distributed: a Tornado center/worker network for distributed computing in Python.

::

    from distributed import Executor
    e = Executor()                      # a local cluster; or Executor('ip:port')
    futures = e.map(pow, range(10), [2] * 10)
    e.gather(futures)
"""

from .center import Center
from .core import Server, connect, read, rpc, write
from .executor import (
    CancelledError,
    Executor,
    Future,
    as_completed,
    default_executor,
    wait,
)
from .local import LocalCluster
from .progress import progress
from .security import AuthenticationError, Security
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Center",
    "Worker",
    "Server",
    "rpc",
    "connect",
    "read",
    "write",
    "Executor",
    "Future",
    "LocalCluster",
    "wait",
    "as_completed",
    "progress",
    "default_executor",
    "CancelledError",
    "Security",
    "AuthenticationError",
]
