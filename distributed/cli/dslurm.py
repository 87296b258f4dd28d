"""``dslurm``: a center here and workers as SLURM jobs, until Ctrl-C.

::

    $ dslurm --jobs 4 --cores 8 --memory 16GB --walltime 02:00:00 --queue normal
    Start center at 10.0.0.5:8786
    Dashboard at http://10.0.0.5:8797/status
    Scheduler file: /home/me/.distributed/jobqueue/cluster-k2j3/scheduler.json
    Submitted jobs: 4101 4102 4103 4104
    ^C
    Cancelled jobs: 4101 4102 4103 4104
    Center stopped

The jobs' workers read the center's address and auth token from the
scheduler file (readable by its owner only), and so do clients:
``Executor(scheduler_file=FILE)``; its directory and the jobs' output go
away when ``dslurm`` stops.  A job whose workers cannot reach the center for
``--death-timeout`` seconds ends (so the jobs end if ``dslurm`` is killed).
``--print-script`` shows the batch script each job runs.
"""

import signal
import sys
import threading

from ..deploy.jobqueue import DEATH_TIMEOUT, SLURMCluster
from .utils import CENTER_STARTED, DASHBOARD_STARTED, build_parser, setup_logging


def make_parser():
    p = build_parser(
        "dslurm",
        "Start a distributed center on this machine and workers as SLURM batch jobs "
        "(sbatch); Ctrl-C or SIGTERM cancels the jobs (scancel) and stops the center.",
        [])
    p.add_argument("--jobs", type=int, default=1, help="jobs to submit (default: 1)")
    p.add_argument("--cores", type=int, default=1,
                   help="cores per job: --cpus-per-task, threads of its workers (default: 1)")
    p.add_argument("--memory", default=None,
                   help="memory per job ('16GB', '512MiB'): --mem, and the workers' "
                   "memory limit (default: none)")
    p.add_argument("--walltime", default="00:30:00",
                   help="time limit of each job, HH:MM:SS (default: 00:30:00)")
    p.add_argument("--queue", "--partition", dest="queue", default=None,
                   help="the partition (default: SLURM's default one)")
    p.add_argument("--processes", type=int, default=1,
                   help="worker processes per job, sharing its cores and memory (default: 1)")
    p.add_argument("--job-extra", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH line, e.g. --job-extra=--exclusive (repeatable)")
    p.add_argument("--env-extra", action="append", default=[], metavar="LINE",
                   help="a shell line run before the worker, e.g. 'module load "
                   "python' (repeatable)")
    p.add_argument("--local-directory", default=None,
                   help="the workers' --local-dir on the nodes (default: their temp dir)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python on the nodes (default: %(default)s)")
    p.add_argument("--name", default="dworker",
                   help="job name, and workers' name prefix (default: dworker)")
    p.add_argument("--death-timeout", type=float, default=DEATH_TIMEOUT, metavar="SECONDS",
                   help="a job's workers wait this long for the center (at start, and "
                   "once lost) before the job ends (default: %(default)g)")
    p.add_argument("--host", default=None,
                   help="address the center listens on (default: this machine's "
                   "outward address)")
    p.add_argument("--shared-directory", default=None,
                   help="a directory the nodes see, for the scheduler file and the jobs' "
                   "output (default: ~/.distributed/jobqueue)")
    p.add_argument("--print-script", action="store_true",
                   help="print the batch script the jobs run")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:  # Ctrl-C meanwhile: KeyboardInterrupt, and the constructor cleans up
        cluster = SLURMCluster(
            cores=args.cores, memory=args.memory, walltime=args.walltime,
            queue=args.queue, processes=args.processes, job_extra=args.job_extra,
            env_extra=args.env_extra, local_directory=args.local_directory,
            python=args.python, name=args.name, death_timeout=args.death_timeout,
            host=args.host,
            shared_directory=args.shared_directory, http_port=0)
    except (OSError, RuntimeError, ValueError, TimeoutError) as e:
        print("dslurm: error: %s" % e, file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(CENTER_STARTED, cluster.center_address, flush=True)
        if cluster.dashboard_address:  # without the token: output may be shared
            print(DASHBOARD_STARTED, cluster.dashboard_address, flush=True)
        print("Scheduler file:", cluster.scheduler_file, flush=True)
        if args.print_script:
            print(cluster.job_script(), flush=True)
        cluster.scale(args.jobs * args.processes)
        print("Submitted jobs:", " ".join(cluster.jobs), flush=True)
        stop.wait()
        jobs = list(cluster.jobs)
        cluster.close()
        print("Cancelled jobs:", " ".join(jobs), flush=True)
        print("Center stopped", flush=True)
        return 0
    except (OSError, RuntimeError, ValueError, TimeoutError) as e:
        print("dslurm: error: %s" % e, file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
