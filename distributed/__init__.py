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
    fire_and_forget,
    futures_of,
    get_executor,
    wait,
)
from .local import LocalCluster
from .progress import progress
from .security import AuthenticationError, Security
from .worker import Worker, get_worker, rejoin, secede

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
    "futures_of",
    "fire_and_forget",
    "get_executor",
    "get_worker",
    "secede",
    "rejoin",
    "CancelledError",
    "Security",
    "AuthenticationError",
]
