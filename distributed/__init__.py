"""distributed: a Tornado center/worker network for distributed computing in Python.

::

    from distributed import Center, Worker, rpc
"""

from .center import Center
from .core import Server, rpc, connect, read, write
from .worker import Worker

__version__ = "0.1.0"

__all__ = ["Center", "Worker", "Server", "rpc", "connect", "read", "write"]
