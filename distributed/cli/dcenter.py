"""``dcenter``: start a center.

::

    $ dcenter --port 8787
    Start center at 127.0.0.1:8787
"""

import argparse
import sys
import logging

from ..center import Center
from ..http import HTTPCenter
from ..process import exit_with_parent
from .utils import (
    add_security_arguments,
    raise_open_files_limit,
    run_until_signal,
    security_from_args,
    setup_logging,
    warn_if_exposed,
)

logger = logging.getLogger("distributed.dcenter")


def make_parser():
    p = argparse.ArgumentParser(
        prog="dcenter",
        description="Start a distributed center: the node that knows which worker "
        "holds which key and which workers are alive. Stop it with Ctrl-C or SIGTERM.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on and advertise (default 127.0.0.1, "
                   "this machine only; use this machine's IP or 0.0.0.0 to accept "
                   "workers from other hosts)")
    p.add_argument("--port", type=int, default=8787,
                   help="TCP port for workers and executors (default 8787; 0 picks a free one)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve JSON status (/info.json, /who_has.json, ...) on this port")
    p.add_argument("--allowed-failures", type=int, default=3,
                   help="worker deaths a task may cause before it is marked erred "
                   "with KilledWorker (default 3)")
    p.add_argument("--heartbeat-timeout", type=float, default=60,
                   help="seconds without a heartbeat before a worker counts as dead (default 60)")
    add_security_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


#: options a LocalCluster sets itself: address, and security through the environment
_SET_BY_CLUSTER = {"help", "host", "port", "auth_token", "tls_cert", "tls_key", "tls_ca"}


def center_args(**options):
    """The ``dcenter`` arguments for ``options``, by their Python names (what
    ``LocalCluster(**options)`` passes on); ``TypeError`` for an unknown one.

    >>> center_args(heartbeat_timeout=5, allowed_failures=0, http_port=None)
    ['--heartbeat-timeout', '5', '--allowed-failures', '0']
    """
    actions = {a.dest: a for a in make_parser()._actions
               if a.option_strings and a.dest not in _SET_BY_CLUSTER}
    args = []
    for name, value in options.items():
        action = actions.get(name)
        if action is None:
            raise TypeError("unknown center option %r; the options are: %s"
                            % (name, ", ".join(sorted(actions))))
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch such as --verbose
            args += [flag] if value else []
        elif value is not None:
            if action.type is not None:
                action.type(value)  # a bad value fails here, not in the child
            args += [flag, str(value)]
    return args


def main(argv=None):
    exit_with_parent()  # a center of a local cluster stops when its client dies
    parser = make_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    raise_open_files_limit()
    security = security_from_args(args, parser)
    services = {"http": HTTPCenter} if args.http_port is not None else None
    ports = {"http": args.http_port} if args.http_port is not None else None
    center = None

    async def start(stopping):
        nonlocal center
        center = Center(args.host, args.port, services=services, service_ports=ports,
                        heartbeat_timeout=args.heartbeat_timeout, security=security,
                        allowed_failures=args.allowed_failures)
        center.on_close = stopping.set
        center.listen(args.port)
        warn_if_exposed(logger, "the center", args.host, security)
        print("Start center at %s" % center.address, flush=True)
        if "http" in center.service_ports:
            print("HTTP status at http://%s:%d/info.json"
                  % (center.ip, center.service_ports["http"]), flush=True)

    async def stop():
        if center is not None:
            await center._close()
        print("Center stopped", flush=True)

    return run_until_signal(start, stop, prog="dcenter")


if __name__ == "__main__":
    sys.exit(main())
