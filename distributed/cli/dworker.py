"""``dworker``: start one or more workers for a center.

::

    $ dworker 127.0.0.1:8787
    Start worker at: 127.0.0.1:40123
    Registered with center at: 127.0.0.1:8787
"""

import copy
import logging
import os
import signal
import subprocess
import sys

from ..core import coerce_to_address
from ..http import HTTPWorker
from ..process import ENV_PARENT_PID, exit_with_parent
from ..utils import get_ip, parse_address
from ..scheduler_file import SchedulerFileTimeout, read_scheduler_file
from ..worker import (
    CONNECT_RETRY_TIMEOUT,
    DEATH_TIMEOUT_EXIT_CODE,
    RETIRED_EXIT_CODE,
    MEMORY_EXIT_CODE,
    MEMORY_PAUSE_FRACTION,
    MEMORY_TARGET_FRACTION,
    MEMORY_TERMINATE_FRACTION,
    Worker,
)
from .utils import (
    ENV_DEATH_TIMEOUT,
    ENV_LIFETIME,
    ENV_LIFETIME_STAGGER,
    ENV_SCHEDULER_FILE,
    FREE_PORT,
    LOG_LENGTH_OPTION,
    NANNY_CHILD,
    NANNY_STARTED,
    NPROCS_CHILD,
    PID_FILE_OPTION,
    PRELOAD_OPTION,
    SECURITY_OPTIONS,
    VERBOSE,
    WORKER_REGISTERED,
    WORKER_STARTED,
    Option,
    build_parser,
    child_argv,
    constructor_kwargs,
    exit_at_once,
    format_resources,
    http_service,
    options_argv,
    parse_memory_limit,
    parse_port,
    port_number,
    parse_resources,
    raise_open_files_limit,
    run_preload,
    run_until_signal,
    security_from_args,
    setup_logging,
    warn_if_exposed,
    write_pid_file,
)

logger = logging.getLogger("distributed.dworker")


def _suffixed(name, i):
    """``--name w`` -> ``w-0``, ``w-1``, ... for the processes of ``--nprocs``."""
    return name if name is None else "%s-%d" % (name, i)


def _consecutive(port, i):
    """``--port 9000`` -> 9000, 9001, ...; a free port (0) for each stays 0."""
    return port + i if port else port


#: every ``dworker`` option; its parser, the ``Worker(...)`` call, the
#: nanny's child and the ``--nprocs`` children are made from this table
OPTIONS = [
    Option("--host", kwarg="ip", children=(NANNY_CHILD, NPROCS_CHILD),
           help="address to listen on and advertise",
           default_text="the address of the interface that reaches the center"),
    Option("--port", type=port_number, default=FREE_PORT, children=(NANNY_CHILD, NPROCS_CHILD),
           spread=_consecutive,  # the command listens on it
           help="TCP port (0: a free port); with --nprocs, the first of consecutive ports"),
    Option("--ncores", aliases=("--nthreads",), type=int, kwarg="ncores",
           children=(NANNY_CHILD, NPROCS_CHILD), help="threads that run tasks",
           default_text="cores of this machine, divided by --nprocs"),
    Option("--nprocs", aliases=("--nworkers",), type=int, default=1,
           help="number of worker processes to start"),
    Option("--name", kwarg="name", children=(NANNY_CHILD, NPROCS_CHILD), spread=_suffixed,
           help="a name for the worker, unique on the cluster (with --nprocs, "
           "suffixed -0, -1, ...)"),
    Option("--local-dir", aliases=("--local-directory",), kwarg="local_dir",
           children=(NANNY_CHILD, NPROCS_CHILD),
           help="directory for temporary files and spilled data; each worker uses its "
           "own subdirectory", default_text="the system temporary directory"),
    Option("--memory-limit", kwarg="memory_limit", convert=parse_memory_limit,
           children=(NANNY_CHILD, NPROCS_CHILD),
           help="memory the worker may use: bytes ('4GB', '512MiB'), a fraction "
           "of RAM ('0.5') or 'auto'. Above %d%%%% of it the worker spills data to "
           "--local-dir, above %d%%%% it starts no new task, above %d%%%% it exits "
           "(status %d) and its nanny restarts it; DISTRIBUTED_MEMORY_TARGET/_PAUSE/"
           "_TERMINATE change these"
           % (100 * MEMORY_TARGET_FRACTION, 100 * MEMORY_PAUSE_FRACTION,
              100 * MEMORY_TERMINATE_FRACTION, MEMORY_EXIT_CODE),
           default_text="no limit"),
    Option("--resources", kwarg="resources", convert=parse_resources, format=format_resources,
           children=(NANNY_CHILD, NPROCS_CHILD), metavar="NAME=AMOUNT,...",
           help="what this worker has of resources that tasks ask for with "
           "submit(..., resources={'GPU': 1}): 'GPU=2,MEM=10e9'; a task runs only "
           "where its resources are free (each of --nprocs workers has them all)",
           default_text="none"),
    Option("--connect-timeout", type=float, default=CONNECT_RETRY_TIMEOUT,
           children=(NANNY_CHILD, NPROCS_CHILD),  # the command: Worker._start(timeout=)
           help="seconds to keep trying to reach the center before giving up"),
    Option("--scheduler-file", metavar="PATH", env=ENV_SCHEDULER_FILE,
           help="read the center's address (and its auth token and TLS settings) from "
           "the file `dcenter --scheduler-file PATH` writes, waiting up to "
           "--connect-timeout seconds for it to appear; instead of CENTER_ADDRESS"),
    Option("--death-timeout", type=float, kwarg="death_timeout", metavar="SECONDS",
           children=(NANNY_CHILD, NPROCS_CHILD), env=ENV_DEATH_TIMEOUT,
           help="once registered, exit (status %d; the nanny too, without a restart) "
           "if the center cannot be reached again for this long after losing it"
           % DEATH_TIMEOUT_EXIT_CODE,
           default_text="$%s, else keep trying for an hour" % ENV_DEATH_TIMEOUT),
    Option("--lifetime", type=float, kwarg="lifetime", metavar="SECONDS",
           children=(NANNY_CHILD, NPROCS_CHILD), env=ENV_LIFETIME,
           help="retire after this long: hand the data to the other workers, "
           "unregister and exit (status 0; the nanny does not restart it)"),
    Option("--lifetime-stagger", type=float, kwarg="lifetime_stagger", metavar="SECONDS",
           children=(NANNY_CHILD, NPROCS_CHILD), env=ENV_LIFETIME_STAGGER,
           help="retire up to this much earlier or later than --lifetime (at random), "
           "so that workers started together do not all leave at once"),
    PID_FILE_OPTION,
    Option("--no-nanny", switch=True, children=(NPROCS_CHILD,),
           help="run the worker in this process; by default a nanny process "
           "runs it as a child and restarts it when it dies"),
    Option("--nanny-address", kwarg="nanny", hidden=True),  # set by the nanny itself
    Option("--http-port", aliases=("--dashboard-address",), type=parse_port,
           kwarg=http_service(HTTPWorker), children=(NANNY_CHILD, NPROCS_CHILD),
           spread=_consecutive, metavar="HTTP_PORT",
           help="also serve JSON status (/info.json, /resources.json) on this "
           "port (0: a free one)"),
    LOG_LENGTH_OPTION,
    PRELOAD_OPTION,
    *SECURITY_OPTIONS,
    VERBOSE,
]


def make_parser():
    return build_parser(
        "dworker",
        "Start a distributed worker that registers with the center at "
        "CENTER_ADDRESS, holds data and runs tasks. Stop it with Ctrl-C or SIGTERM: "
        "it unregisters from the center first.",
        OPTIONS,
        positionals=[("center", dict(
            metavar="CENTER_ADDRESS", nargs="?",
            help="the center's address, ip:port (e.g. 127.0.0.1:8787); "
            "or give --scheduler-file"))])


def worker_kwargs(args):
    """The ``Worker(...)`` keywords of parsed ``args`` (all but ``security``).

    >>> worker_kwargs(make_parser().parse_args(['127.0.0.1:8787', '--ncores', '2']))
    {'ip': None, 'ncores': 2, 'name': None, 'local_dir': None, 'memory_limit': None, 'resources': None, 'death_timeout': None, 'lifetime': None, 'lifetime_stagger': None, 'nanny': None, 'log_length': None}
    """
    return constructor_kwargs(OPTIONS, args)


#: options a LocalCluster sets itself: address, threads, no nanny, security
_SET_BY_CLUSTER = {"host", "port", "ncores", "nprocs", "no_nanny", "nanny_address",
                   "auth_token", "tls_cert", "tls_key", "tls_ca", "scheduler_file",
                   "pid_file"}


def worker_args(index=None, **options):
    """The ``dworker`` arguments for ``options``, by their Python names (what
    ``LocalCluster(worker_options=...)`` passes on), for its ``index``-th
    worker; ``TypeError`` for an unknown one, ``ValueError`` for a bad value.

    >>> worker_args(memory_limit='2GB', name='w', index=3)
    ['--memory-limit', '2GB', '--name', 'w-3']
    """
    return options_argv(OPTIONS, options, exclude=_SET_BY_CLUSTER, index=index,
                        what="worker option")


def main(argv=None):
    exit_with_parent()  # a worker under a nanny stops when the nanny dies
    parser = make_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    raise_open_files_limit()
    file_security = None
    if args.center is not None and _flag_given("--scheduler-file", argv):
        parser.error("give either CENTER_ADDRESS or --scheduler-file, not both")
    if args.center is None and not args.scheduler_file:
        parser.error("the center's address is needed: CENTER_ADDRESS or "
                     "--scheduler-file PATH")
    write_pid_file(args.pid_file)
    if args.center is None:  # else a $DISTRIBUTED_SCHEDULER_FILE is not ours to read
        try:
            args.center, file_security = _wait_for_scheduler_file(args)
        except (SchedulerFileTimeout, ValueError, OSError) as e:
            print("dworker: error: %s" % e, file=sys.stderr, flush=True)
            return 1
        except _Stopped:
            print("Worker stopped", flush=True)
            return 0
    try:
        center = coerce_to_address(args.center)
        center_ip, center_port = parse_address(center)
        worker_kwargs(args)  # a bad --memory-limit is a usage error, before anything starts
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    if args.nprocs < 1:
        parser.error("--nprocs must be at least 1")
    security = security_from_args(args, parser, fallback=file_security)
    if args.nprocs > 1:
        return _run_many(args, security)

    args.host = args.host or get_ip(center_ip)
    if not args.no_nanny:
        return _run_nanny(args, center_ip, center_port, security)
    worker = None

    async def start(stopping):
        nonlocal worker
        worker = Worker(center_ip, center_port, security=security, **worker_kwargs(args))
        worker.on_close = stopping.set
        worker.listen(args.port)
        warn_if_exposed(logger, "the worker", args.host, security)
        print(WORKER_STARTED, worker.address, flush=True)
        await worker._start(timeout=args.connect_timeout)
        await run_preload(args.preload, worker)
        print(WORKER_REGISTERED, worker.center.address, flush=True)
        if "http" in worker.service_ports:
            print("HTTP status at http://%s:%d/info.json"
                  % (worker.ip, worker.service_ports["http"]), flush=True)

    async def stop():
        if worker is not None:
            await worker._close()
        print("Worker stopped", flush=True)

    code = run_until_signal(start, stop, prog="dworker")
    if code == 0:
        code = _closed_on_its_own(worker, args)
    if worker is not None and worker.active:
        exit_at_once(code)  # do not wait for the tasks still running: they are gone
    return code


class _Stopped(Exception):
    """SIGINT or SIGTERM while waiting for the scheduler file."""


def _wait_for_scheduler_file(args):
    """``(address, security)`` of ``--scheduler-file``, waiting up to
    ``--connect-timeout`` for it; a signal meanwhile raises :class:`_Stopped`
    (so the command stops at once and cleanly, its pid file removed)."""

    def stop(signum, frame):
        raise _Stopped()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return read_scheduler_file(args.scheduler_file, timeout=args.connect_timeout)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _flag_given(flag, argv=None):
    """Whether ``flag`` is on the command line ``argv`` (default: ``sys.argv``),
    rather than from its environment variable.

    >>> _flag_given("--scheduler-file", ["--scheduler-file=/tmp/s.json"])
    True
    """
    argv = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _closed_on_its_own(worker, args):
    """The exit status of a worker that closed by itself: say why."""
    reason = worker.close_reason if worker is not None else None
    if reason == "death-timeout":
        print("dworker: error: lost the center at %s and could not reach it again "
              "within --death-timeout %g s" % (worker.center.address, args.death_timeout),
              file=sys.stderr, flush=True)
        return DEATH_TIMEOUT_EXIT_CODE
    if reason is None:
        return 0
    if reason == "lifetime":
        print("Worker retired after its --lifetime of %g s" % args.lifetime, flush=True)
    else:  # the retire rpc (a cluster scaling down)
        print("Worker retired (%s)" % reason, flush=True)
    # its nanny must not replace it: it tells by this status
    return RETIRED_EXIT_CODE if args.nanny_address else 0


def nanny_child_argv(args):
    """The options of parsed ``args`` a nanny passes on to the worker it starts
    (it puts ``CENTER_ADDRESS --no-nanny --nanny-address ...`` before them)."""
    return child_argv(OPTIONS, args, NANNY_CHILD)


def nprocs_child_argv(args, i):
    """The command line of the ``i``-th process that ``--nprocs`` starts."""
    args = copy.copy(args)
    args.ncores = args.ncores or max(1, (os.cpu_count() or 1) // args.nprocs)
    return ([sys.executable, "-m", "distributed.cli.dworker", args.center]
            + child_argv(OPTIONS, args, NPROCS_CHILD, index=i))


def _run_nanny(args, center_ip, center_port, security):
    from ..nanny import Nanny

    nanny = None

    async def start(stopping):
        nonlocal nanny
        # echo: the worker's own lines ("Start worker at: ...") are ours too
        nanny = Nanny(center_ip, center_port, ip=args.host,
                      worker_args=nanny_child_argv(args), echo=True,
                      timeout=args.connect_timeout + 30, security=security,
                      log_length=args.log_length, death_timeout=args.death_timeout)
        nanny.on_close = stopping.set
        nanny.listen(0)
        print(NANNY_STARTED, nanny.address, flush=True)
        await nanny._start()

    async def stop():
        if nanny is not None:
            await nanny._close()
        print("Worker stopped", flush=True)

    code = run_until_signal(start, stop, prog="dworker")
    if code == 0 and nanny is not None and nanny.exit_code is not None:
        return nanny.exit_code  # its worker retired (0) or lost the center for good
    return code


def _run_many(args, security):
    """Start ``--nprocs`` single-process dworkers and forward signals to them."""
    procs = []
    for i in range(args.nprocs):
        # the token and TLS files go through the environment, never on a command line
        env = security.child_env()
        env[ENV_PARENT_PID] = str(os.getpid())  # they stop when we die
        procs.append(subprocess.Popen(nprocs_child_argv(args, i), env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = 0
    for p in procs:
        code = max(code, abs(p.wait()))
    return code


if __name__ == "__main__":
    sys.exit(main())
