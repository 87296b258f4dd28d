"""``dworker``: start one or more workers for a center.

::

    $ dworker 127.0.0.1:8787
    Start worker at: 127.0.0.1:40123
    Registered with center at: 127.0.0.1:8787
"""

import argparse
import logging
import os
import signal
import subprocess
import sys

from ..core import coerce_to_address
from ..http import HTTPWorker
from ..process import ENV_PARENT_PID, exit_with_parent
from ..utils import get_ip, parse_address
from ..worker import Worker
from .utils import (
    add_security_arguments,
    raise_open_files_limit,
    parse_memory_limit,
    run_until_signal,
    security_from_args,
    setup_logging,
    warn_if_exposed,
)

logger = logging.getLogger("distributed.dworker")


def make_parser():
    p = argparse.ArgumentParser(
        prog="dworker",
        description="Start a distributed worker that registers with the center at "
        "CENTER_ADDRESS, holds data and runs tasks. Stop it with Ctrl-C or SIGTERM: "
        "it unregisters from the center first.",
    )
    p.add_argument("center", metavar="CENTER_ADDRESS",
                   help="the center's address, ip:port (e.g. 127.0.0.1:8787)")
    p.add_argument("--host", default=None,
                   help="address to listen on and advertise (default: the address of "
                   "the interface that reaches the center)")
    p.add_argument("--port", type=int, default=0,
                   help="TCP port (default 0: a free port; with --nprocs, the first of "
                   "consecutive ports)")
    p.add_argument("--ncores", type=int, default=None,
                   help="threads that run tasks (default: cores of this machine, "
                   "divided by --nprocs)")
    p.add_argument("--nprocs", type=int, default=1,
                   help="number of worker processes to start (default 1)")
    p.add_argument("--name", default=None,
                   help="a name for the worker, unique on the cluster (with --nprocs, "
                   "suffixed -0, -1, ...)")
    p.add_argument("--local-dir", default=None,
                   help="directory for temporary files and spilled data (default: the "
                   "system temporary directory); each worker uses its own subdirectory")
    p.add_argument("--memory-limit", default=None,
                   help="memory the worker may use: bytes ('4GB', '512MiB'), a fraction "
                   "of RAM ('0.5') or 'auto' (default: no limit). Above 60%% of it "
                   "the worker spills data to --local-dir, above 80%% it starts no "
                   "new task, above 95%% it exits (status 75) and its nanny restarts "
                   "it; DISTRIBUTED_MEMORY_TARGET/_PAUSE/_TERMINATE change these")
    p.add_argument("--connect-timeout", type=float, default=30,
                   help="seconds to keep trying to reach the center before giving up "
                   "(default 30)")
    p.add_argument("--no-nanny", action="store_true",
                   help="run the worker in this process; by default a nanny process "
                   "runs it as a child and restarts it when it dies")
    p.add_argument("--nanny-address", default=None, help=argparse.SUPPRESS)
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve JSON status (/info.json, /resources.json) on this "
                   "port (0: a free one)")
    add_security_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def main(argv=None):
    exit_with_parent()  # a worker under a nanny stops when the nanny dies
    parser = make_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    raise_open_files_limit()
    try:
        center = coerce_to_address(args.center)
        center_ip, center_port = parse_address(center)
        memory_limit = parse_memory_limit(args.memory_limit)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    if args.nprocs < 1:
        parser.error("--nprocs must be at least 1")
    security = security_from_args(args, parser)
    if args.nprocs > 1:
        return _run_many(args, security)

    host = args.host or get_ip(center_ip)
    if not args.no_nanny:
        return _run_nanny(args, center_ip, center_port, host, security)
    services = {"http": HTTPWorker} if args.http_port is not None else None
    ports = {"http": args.http_port} if args.http_port is not None else None
    worker = None

    async def start(stopping):
        nonlocal worker
        worker = Worker(center_ip, center_port, ip=host, ncores=args.ncores,
                        local_dir=args.local_dir, services=services,
                        service_ports=ports, name=args.name,
                        memory_limit=memory_limit, nanny=args.nanny_address,
                        security=security)
        worker.on_close = stopping.set
        worker.listen(args.port)
        warn_if_exposed(logger, "the worker", host, security)
        print("Start worker at: %s" % worker.address, flush=True)
        await worker._start(timeout=args.connect_timeout)
        print("Registered with center at: %s" % worker.center.address, flush=True)
        if "http" in worker.service_ports:
            print("HTTP status at http://%s:%d/info.json"
                  % (worker.ip, worker.service_ports["http"]), flush=True)

    async def stop():
        if worker is not None:
            await worker._close()
        print("Worker stopped", flush=True)

    return run_until_signal(start, stop, prog="dworker")


def _worker_args(args):
    """The options a nanny passes on to the worker it starts."""
    out = []
    for flag, value in [("--host", args.host), ("--ncores", args.ncores),
                        ("--connect-timeout", args.connect_timeout),
                        ("--name", args.name), ("--local-dir", args.local_dir),
                        ("--memory-limit", args.memory_limit),
                        ("--http-port", args.http_port)]:
        if value is not None:
            out += [flag, str(value)]
    if args.port:
        out += ["--port", str(args.port)]
    if args.verbose:
        out.append("-v")
    return out


def _run_nanny(args, center_ip, center_port, host, security):
    from ..nanny import Nanny

    nanny = None

    async def start(stopping):
        nonlocal nanny
        nanny = Nanny(center_ip, center_port, ip=host, worker_args=_worker_args(args),
                      echo=True, timeout=args.connect_timeout + 30,  # the worker's own lines: "Start worker at: ..."
                      security=security)
        nanny.on_close = stopping.set
        nanny.listen(0)
        print("Start nanny at: %s" % nanny.address, flush=True)
        await nanny._start()

    async def stop():
        if nanny is not None:
            await nanny._close()
        print("Worker stopped", flush=True)

    return run_until_signal(start, stop, prog="dworker")


def _run_many(args, security):
    """Start ``--nprocs`` single-process dworkers and forward signals to them."""
    ncores = args.ncores or max(1, (os.cpu_count() or 1) // args.nprocs)
    procs = []
    for i in range(args.nprocs):
        cmd = [sys.executable, "-m", "distributed.cli.dworker", args.center,
               "--ncores", str(ncores), "--nprocs", "1"]
        if args.host:
            cmd += ["--host", args.host]
        if args.port:
            cmd += ["--port", str(args.port + i)]
        if args.name:
            cmd += ["--name", "%s-%d" % (args.name, i)]
        if args.local_dir:
            cmd += ["--local-dir", args.local_dir]
        if args.memory_limit:
            cmd += ["--memory-limit", args.memory_limit]
        if args.http_port is not None:
            cmd += ["--http-port", str(args.http_port + i if args.http_port else 0)]
        if args.no_nanny:
            cmd += ["--no-nanny"]
        cmd += ["--connect-timeout", str(args.connect_timeout)]
        if args.verbose:
            cmd += ["-v"]
        # the token and TLS files go through the environment, never on a command line
        env = security.child_env()
        env[ENV_PARENT_PID] = str(os.getpid())  # they stop when we die
        procs.append(subprocess.Popen(cmd, env=env))

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
