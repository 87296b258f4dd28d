"""``dcenter``: start a center.

::

    $ dcenter --port 8787
    Start center at 127.0.0.1:8787
    Dashboard at http://127.0.0.1:8797/status
"""

import logging
import sys

from ..center import HEARTBEAT_TIMEOUT, Center
from ..http import HTTPCenter
from ..http.center import DASHBOARD_PORT
from ..process import exit_with_parent
from ..scheduler import ALLOWED_FAILURES
from ..scheduler_file import remove_scheduler_file, write_scheduler_file
from .utils import (
    CENTER_STARTED,
    DASHBOARD_STARTED,
    LOCALHOST,
    LOG_LENGTH_OPTION,
    ENV_SCHEDULER_FILE,
    PID_FILE_OPTION,
    PRELOAD_OPTION,
    SECURITY_OPTIONS,
    VERBOSE,
    Option,
    build_parser,
    constructor_kwargs,
    http_service,
    no_http_service,
    options_argv,
    parse_port,
    port_number,
    raise_open_files_limit,
    run_preload,
    run_until_signal,
    security_from_args,
    setup_logging,
    warn_if_exposed,
    write_pid_file,
)

logger = logging.getLogger("distributed.dcenter")


#: every ``dcenter`` option; its parser, the ``Center(...)`` call and the
#: command line a ``LocalCluster`` gives it are made from this table
OPTIONS = [
    Option("--host", default=LOCALHOST, kwarg="ip",
           help="address to listen on and advertise: this machine only by default; "
           "use this machine's IP or 0.0.0.0 to accept workers from other hosts"),
    Option("--port", type=port_number, default=Center.default_port, kwarg="port",
           help="TCP port for workers and executors (0 picks a free one)"),
    Option("--http-port", aliases=("--dashboard-address",), type=parse_port,
           default=DASHBOARD_PORT, kwarg=http_service(HTTPCenter), metavar="HTTP_PORT",
           help="serve the dashboard (/status), /metrics and JSON status on this port "
           "(0: a free one; a free one too if the default is taken)"),
    Option("--no-dashboard", switch=True, kwarg=no_http_service,
           help="serve no dashboard nor any other HTTP route"),
    Option("--allowed-failures", type=int, default=ALLOWED_FAILURES,
           kwarg="allowed_failures",
           help="worker deaths a task may cause before it is marked erred with "
           "KilledWorker"),
    Option("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT,
           kwarg="heartbeat_timeout",
           help="seconds without a heartbeat before a worker counts as dead"),
    Option("--scheduler-file", metavar="PATH", env=ENV_SCHEDULER_FILE,
           help="once listening, write the center's address and what a client needs "
           "to connect (auth token, TLS file paths) to PATH as JSON, readable by you "
           "only; `dworker --scheduler-file PATH` and Executor(scheduler_file=PATH) "
           "read it. Removed when the center stops cleanly"),
    PID_FILE_OPTION,
    LOG_LENGTH_OPTION,
    PRELOAD_OPTION,
    *SECURITY_OPTIONS,
    VERBOSE,
]


def make_parser():
    return build_parser(
        "dcenter",
        "Start a distributed center: the node that knows which worker holds which "
        "key and which workers are alive. Stop it with Ctrl-C or SIGTERM.",
        OPTIONS)


def center_kwargs(args):
    """The ``Center(...)`` keywords of parsed ``args`` (all but ``security``).

    >>> center_kwargs(make_parser().parse_args(['--port', '0', '--no-dashboard']))
    {'ip': '127.0.0.1', 'port': 0, 'services': {}, 'service_ports': {},
     'allowed_failures': 3, 'heartbeat_timeout': 60, 'log_length': None}
    >>> center_kwargs(make_parser().parse_args([]))['service_ports']
    {'http': 8797}
    """
    return constructor_kwargs(OPTIONS, args)


#: options a LocalCluster sets itself: address, and security through the environment
_SET_BY_CLUSTER = {"host", "port", "auth_token", "tls_cert", "tls_key", "tls_ca",
                   "pid_file"}


def center_args(**options):
    """The ``dcenter`` arguments for ``options``, by their Python names (what
    ``LocalCluster(**options)`` passes on); ``TypeError`` for an unknown one,
    ``ValueError`` for a bad value.

    >>> center_args(heartbeat_timeout=5, allowed_failures=0, http_port=None)
    ['--heartbeat-timeout', '5', '--allowed-failures', '0']
    """
    return options_argv(OPTIONS, options, exclude=_SET_BY_CLUSTER, what="center option")


def main(argv=None):
    exit_with_parent()  # a center of a local cluster stops when its client dies
    parser = make_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    raise_open_files_limit()
    security = security_from_args(args, parser)
    write_pid_file(args.pid_file)
    center = None
    scheduler_file = None  # (path, address) once written

    async def start(stopping):
        nonlocal center
        center = Center(security=security, **center_kwargs(args))
        center.on_close = stopping.set
        center.listen(args.port)
        await run_preload(args.preload, center)
        warn_if_exposed(logger, "the center", args.host, security)
        if args.scheduler_file:
            nonlocal scheduler_file
            address = center.address  # advertised: routable even for --host 0.0.0.0
            # before the line: whoever waits for it finds the file written
            scheduler_file = (write_scheduler_file(args.scheduler_file, address, security),
                              address)
        print(CENTER_STARTED, center.address, flush=True)
        if "http" in center.service_ports:
            print(DASHBOARD_STARTED, "http://%s:%d/status"
                  % (center.ip, center.service_ports["http"]), flush=True)

    async def stop():
        if scheduler_file is not None:
            remove_scheduler_file(*scheduler_file)
        if center is not None:
            await center._close()
        print("Center stopped", flush=True)

    return run_until_signal(start, stop, prog="dcenter")


if __name__ == "__main__":
    sys.exit(main())
