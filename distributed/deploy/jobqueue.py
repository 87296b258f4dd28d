"""Clusters whose workers are batch jobs of an HPC scheduler (SLURM, PBS, SGE, LSF).

::

    with SLURMCluster(cores=4, memory="8GB", walltime="01:00:00", queue="normal") as cluster:
        print(cluster.job_script())          # what sbatch gets
        cluster.scale(10)                    # 10 workers: 10 jobs (processes=1)
        e = Executor(cluster)                # its address and token
        ...
        cluster.scale(2)                     # their data moves to the 2 kept, then scancel

The center runs on this machine (a ``dcenter --scheduler-file PATH`` child
process, started by a :class:`~distributed.local.LocalCluster` without
workers), listening on this machine's address that routes outwards
(``host=`` to choose).  Each job runs ``dworker --scheduler-file PATH`` with
the job's limits (``--ncores``, ``--memory-limit``, ``--nprocs``) and names
its workers after the job id (``dworker-<jobid>``, ``-0``, ``-1``, ... with
``processes > 1``): that is how :meth:`JobQueueCluster.scale` knows which
workers a job runs.  The jobs' workers give up (and the job ends) when they
cannot reach the center for ``death_timeout`` seconds (60): a job whose
center is gone does not sit until its walltime.

The scheduler file (see :mod:`distributed.scheduler_file`) holds the
center's address and auth token, readable by the user only (``0600``, in a
``0700`` directory under ``shared_directory``, by default
``~/.distributed/jobqueue``: the home directory is shared by the nodes of
most HPC sites).  So the token never appears in the batch script nor on a
command line: schedulers keep a copy of every script they run (SLURM in its
``StateSaveLocation``, readable by the admins, and ``scontrol write
batch_script`` by the user), and ``sbatch`` would by default also store this
process's environment with the job, so the submit command runs without the
``DISTRIBUTED_*`` variables of this process.

Scaling down asks each leaving worker to retire (the worker's ``retire``
rpc: it hands its data to the workers that stay, unregisters and exits for
good), then cancels its job.

A subclass per scheduler says only what differs: the directive prefix
(``#SBATCH``), the header lines made of the limits, the submit, cancel and
status commands and the variable holding the job id.
"""

import asyncio
import getpass
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from ..cli.utils import parse_memory_limit
from ..core import coerce_to_address, rpc
from ..local import LocalCluster
from ..scheduler import NO_WORKER, PROCESSING, QUEUED, WAITING
from ..utils import get_ip
from .cluster import Cluster, run_coroutine

logger = logging.getLogger(__name__)

__all__ = ["Adaptive", "JobQueueCluster", "JobSpec", "SLURMCluster", "PBSCluster", "SGECluster", "LSFCluster"]

#: seconds a submit, cancel or status command may take
COMMAND_TIMEOUT = 30
#: seconds a job's workers wait for their center (at start, and once lost)
#: before the job ends
DEATH_TIMEOUT = 60

#: job states that mean the job is over (any scheduler's spelling)
#: task states that are work to do (for :class:`Adaptive`)
WORK_STATES = {WAITING, NO_WORKER, QUEUED, PROCESSING}

FINISHED_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED",
                   "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                   "DONE", "EXIT",  # LSF
                   "F", "C"}  # PBS: finished, completed


class JobQueueCluster(Cluster):
    """A center here and workers as batch jobs; subclass per scheduler.

    ``jobs``: jobs submitted at once.  Per job: ``cores`` threads in all and
    ``memory`` (``'4GB'``, ``'512MiB'``) shared by ``processes`` worker
    processes, ``walltime`` (``'HH:MM:SS'``), ``queue`` (the partition),
    ``job_extra`` (more directive lines, e.g. ``['--exclusive']``),
    ``env_extra`` (shell lines run before the worker, e.g. ``['module load
    python']``), ``local_directory`` (the workers' ``--local-dir``),
    ``python`` (the interpreter on the nodes; default this one), ``name``
    (job and worker name prefix), ``death_timeout`` (seconds a job's
    workers wait for the scheduler file and the center, and go on without
    it once lost, before the job ends; None: the ``dworker`` defaults),
    ``job_directory`` (where the scripts and the job output go; default the
    scheduler file's directory).  ``shared_directory``: where that private
    directory is made, on a filesystem the nodes share (default
    ``~/.distributed/jobqueue``).  ``host``: the address the center listens
    on (default: this machine's outward one).  ``security``: its token
    (default: a random one) and TLS files (their paths must be valid on the
    nodes).  ``timeout`` bounds every wait.  Other keywords are ``dcenter``
    options (``http_port=0``, ...).  ``Executor(cluster)`` connects to it.
    """

    #: what starts a directive line of the script (``#SBATCH``)
    directive = None
    #: the command that submits a script (its path is appended)
    submit_command = None
    #: True: the script goes to the submit command's stdin (LSF's ``bsub <``)
    submit_stdin = False
    #: the command that cancels jobs (their ids are appended)
    cancel_command = None
    #: the variable that holds the job id inside a job
    job_id_variable = None
    #: the job id in the submit command's output
    job_id_regex = r"(\d+)"

    def __init__(self, jobs=0, cores=1, memory=None, walltime="00:30:00", queue=None,
                 job_extra=(), processes=1, python=sys.executable, local_directory=None,
                 env_extra=(), name="dworker", death_timeout=DEATH_TIMEOUT, host=None,
                 security=None, shared_directory=None, job_directory=None, timeout=60,
                 **center_options):
        self.spec = JobSpec(cores=cores, memory=memory, walltime=walltime, queue=queue,
                            job_extra=job_extra, processes=processes, python=python,
                            local_directory=local_directory, env_extra=env_extra,
                            name=name, death_timeout=death_timeout)
        self.processes = self.spec.processes
        self.name = self.spec.name
        self.timeout = timeout
        self.jobs = {}  # job id -> 'pending' | 'running' while ours
        self.status = "starting"
        self._adaptive = None
        self._lock = threading.RLock()  # one scale() at a time (Adaptive's thread)
        self._directory = _private_directory(shared_directory)
        self.spec.job_directory = job_directory or self._directory
        #: the center's address and token (``0600``): what the jobs read
        self.scheduler_file = os.path.join(self._directory, "scheduler.json")
        try:
            self._center = LocalCluster(
                n_workers=0, ip=host or get_ip(), security=security, timeout=timeout,
                restart_dead_workers=False, scheduler_file=self.scheduler_file,
                **center_options)
            self.status = "running"
            self._register_running()
            if jobs:
                self.scale(jobs * self.processes)
        except BaseException:
            self.close()
            raise

    # -- what the center is --------------------------------------------------

    @property
    def center_address(self):
        return self._center.center_address

    @property
    def security(self):
        """What a client needs (``Executor(cluster)`` takes it from here)."""
        return self._center.security

    @property
    def dashboard_address(self):
        """``http://host:port/status``, or None (``no_dashboard=True``)."""
        return self._center.dashboard_address

    @property
    def dashboard_link(self):
        """:attr:`dashboard_address` with ``?token=`` (which logs a browser in)."""
        return self._center.dashboard_link

    # -- the script ------------------------------------------------------------

    @classmethod
    def header_lines(cls, spec):
        """The directives asking for ``spec``'s limits, without their prefix
        (a subclass's job)."""
        raise NotImplementedError

    @classmethod
    def worker_command(cls, spec, scheduler_file):
        """The command line that runs a job's workers (a line of the script):
        ``dworker --scheduler-file PATH`` (the address and the token come
        from the file), the job's limits and ``--death-timeout``."""
        args = [spec.python, "-m", "distributed.cli.dworker",
                "--scheduler-file", scheduler_file,
                "--ncores", str(max(1, spec.cores // spec.processes))]
        if spec.processes > 1:
            args += ["--nprocs", str(spec.processes)]
        if spec.memory:
            args += ["--memory-limit", str(spec.memory // spec.processes)]
        if spec.local_directory:
            args += ["--local-dir", spec.local_directory]
        if spec.death_timeout is not None:  # for the scheduler file, and the center
            args += ["--connect-timeout", "%g" % spec.death_timeout,
                     "--death-timeout", "%g" % spec.death_timeout]
        # the job id in the name: scale() finds a job's workers by it
        name = "%s-${%s}" % (shlex.quote(spec.name), cls.job_id_variable)
        return " ".join(map(shlex.quote, args)) + " --name " + name

    @classmethod
    def script(cls, spec, scheduler_file):
        """The batch script of a job: directives, ``env_extra`` and ``exec
        dworker --scheduler-file ...``: no secret (the token and the TLS
        files' paths are in the scheduler file).

        >>> print(SLURMCluster.script(JobSpec(walltime=None), "/home/me/s.json"))
        ... # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
        #!/usr/bin/env bash
        #SBATCH --job-name=dworker
        #SBATCH --nodes=1
        #SBATCH --ntasks=1
        #SBATCH --cpus-per-task=1
        exec ... -m distributed.cli.dworker --scheduler-file /home/me/s.json --ncores 1
        --connect-timeout 60 --death-timeout 60 --name dworker-${SLURM_JOB_ID}
        """
        lines = ["#!/usr/bin/env bash"]
        lines += ["%s %s" % (cls.directive, h) for h in cls.header_lines(spec)]
        lines += ["%s %s" % (cls.directive, h) for h in spec.job_extra]
        lines += list(spec.env_extra)
        lines.append("exec " + cls.worker_command(spec, scheduler_file))
        return "\n".join(lines) + "\n"

    def job_script(self):
        """The batch script every job of this cluster runs (no secret in it)."""
        return self.script(self.spec, self.scheduler_file)

    # -- the scheduler's commands ---------------------------------------------

    def _run(self, args, stdin=None):
        """Run a scheduler command; its stdout, or ``RuntimeError`` with its stderr.

        The ``DISTRIBUTED_*`` variables stay out of its environment: schedulers
        store the submitter's environment with the job.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTED_")}
        try:
            done = subprocess.run(args, input=stdin, capture_output=True, text=True,
                                  env=env, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError("%s failed: %s" % (" ".join(args), e)) from None
        if done.returncode != 0:
            raise RuntimeError("%s failed (exit %d): %s" % (
                " ".join(args), done.returncode, (done.stderr or done.stdout).strip()))
        return done.stdout

    def submit_job(self):
        """Submit one job; return its id."""
        script = self.job_script()
        if self.submit_stdin:
            out = self._run(list(self.submit_command), stdin=script)
        else:
            fd, path = tempfile.mkstemp(suffix=".sh", prefix="job-",
                                        dir=self.spec.job_directory)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            try:
                out = self._run(list(self.submit_command) + [path])
            finally:
                os.remove(path)  # the scheduler keeps its own copy
        m = re.search(self.job_id_regex, out)
        if not m:
            raise RuntimeError("no job id in the output of %s: %r"
                               % (self.submit_command[0], out))
        job = m.group(1)
        self.jobs[job] = "pending"
        logger.info("submitted job %s", job)
        return job

    def cancel_jobs(self, jobs):
        """Cancel ``jobs`` (ids); they are no longer ours.  Jobs that ended
        meanwhile (a retired worker's job ends by itself) are no error."""
        jobs = list(jobs)
        if not jobs:
            return
        for job in jobs:
            self.jobs.pop(job, None)
        try:
            self._run(list(self.cancel_command) + jobs)
        except RuntimeError:
            states = self.job_states()
            if any(states.get(j, "gone") not in FINISHED_STATES | {"gone"} for j in jobs):
                raise
        logger.info("cancelled jobs %s", ", ".join(jobs))

    def job_states(self):
        """``{job id: state}`` of this user's jobs the scheduler lists: queued,
        running, and maybe finished ones (:data:`FINISHED_STATES`)."""
        raise NotImplementedError

    def wait_for_jobs_gone(self, jobs, timeout=None):
        """Wait until none of ``jobs`` is queued or running; ``TimeoutError`` else."""
        jobs = set(jobs)
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        while True:
            left = {j for j, s in self.job_states().items()
                    if j in jobs and s not in FINISHED_STATES}
            if not left:
                return
            if time.time() > deadline:
                raise TimeoutError("jobs %s still in the queue" % ", ".join(sorted(left)))
            time.sleep(0.2)

    # -- workers ---------------------------------------------------------------

    def _center_call(self, coroutine_function):
        """Run ``await coroutine_function(center_rpc)`` from this (non-async) thread."""
        async def call():
            with rpc(self.center_address, security=self.security,
                     timeout=self.timeout) as center:
                return await coroutine_function(center)

        return run_coroutine(call())

    def workers(self):
        """``{worker address: job id}`` of the workers registered with the center."""
        async def names(center):
            addresses = list(await center.ncores())
            identities = await asyncio.gather(*[
                _identity(a, self.security, self.timeout) for a in addresses])
            return dict(zip(addresses, identities))

        result = {}
        for address, identity in self._center_call(names).items():
            job = self._job_of(identity.get("name") if identity else None)
            if job is not None:
                result[address] = job
        return result

    def _job_of(self, worker_name):
        """The job id in a worker's name (``dworker-123``, ``dworker-123-0``), or None."""
        if not worker_name:
            return None
        prefix = self.name + "-"
        if not str(worker_name).startswith(prefix):
            return None
        job = str(worker_name)[len(prefix):]
        if self.processes > 1:
            job = job.rsplit("-", 1)[0]
        return job if job in self.jobs else None

    def wait_for_workers(self, n, timeout=None):
        """Wait until ``n`` workers of our jobs are registered; return their addresses."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.time() + timeout
        while True:
            workers = self._running_workers()
            if len(workers) >= n:
                return sorted(workers)
            if time.time() > deadline:
                raise TimeoutError("%d of %d workers after %s s; jobs: %s%s" % (
                    len(workers), n, timeout, self.job_states(),
                    "".join(self._output_tail(job) for job in self.jobs)))
            time.sleep(0.2)

    def output_path(self, job):
        """The file of ``job``'s output, where the script says (else None)."""
        return None

    def _output_tail(self, job, n=10):
        path = self.output_path(job)
        try:
            with open(path) as f:
                lines = f.readlines()[-n:]
        except (OSError, TypeError):
            return ""
        return "\njob %s printed (%s):\n%s" % (job, path, "".join(lines))

    def _running_workers(self):
        """:meth:`workers`, and their jobs marked running (scale-down cancels
        pending jobs first)."""
        workers = self.workers()
        for job in set(workers.values()):
            if job in self.jobs:  # not cancelled meanwhile
                self.jobs[job] = "running"
        return workers

    def retire_workers(self, addresses):
        """Ask the workers at ``addresses`` to retire (their ``retire`` rpc):
        each hands its data to the workers that stay, then unregisters and
        exits for good (its nanny does not restart it).  Return how many keys
        they handed over; ``RuntimeError`` naming those whose hand-off failed
        (they stay).  A worker that cannot be reached at all is only logged:
        its data is out of reach anyway, and its job may go.

        A task that finishes on them in between is recomputed by the
        scheduler, like after any worker loss.
        """
        leaving = sorted({coerce_to_address(a) for a in addresses})

        async def retire(address):
            try:
                with rpc(address, security=self.security, timeout=self.timeout) as w:
                    return address, await w.retire(reason="scale-down", exclude=leaving)
            except Exception as e:  # gone meanwhile, hung: nothing to hand over from it
                logger.warning("could not ask %s to retire: %s", address, e)
                return address, (b"OK", {"keys": 0})

        async def retire_all():
            return await asyncio.gather(*[retire(a) for a in leaving])

        results = run_coroutine(retire_all())
        problems = ["%s: %s" % (a, r[1].get("error")) for a, r in results
                    if not (isinstance(r, tuple) and r[0] == b"OK")]
        if problems:
            raise RuntimeError("could not retire %s" % "; ".join(problems))
        moved = sum(r[1]["keys"] for _, r in results)
        logger.info("retired %s, who handed %d keys over", ", ".join(leaving), moved)
        return moved

    def scale(self, n):
        """Have ``n`` workers: submit or cancel jobs (``processes`` workers each).

        Scaling down cancels the pending jobs first, then running ones, whose
        workers first hand their data to the others (:meth:`retire_workers`);
        it returns once the cancelled jobs have left the queue.  Jobs that
        ended by themselves (walltime, failure) are forgotten first, so they
        are replaced.  ``await cluster._scale(n)`` from async code.
        """
        with self._lock:
            self._scale_now(n)

    async def _scale(self, n):
        await asyncio.get_running_loop().run_in_executor(None, self.scale, n)

    def forget_ended_jobs(self):
        """Drop the jobs the scheduler no longer runs nor queues; return them."""
        states = self.job_states()
        ended = [j for j in self.jobs if states.get(j, "gone") in FINISHED_STATES | {"gone"}]
        for job in ended:
            logger.warning("job %s ended by itself (%s)", job, states.get(job, "gone"))
            self.jobs.pop(job, None)
        return ended

    def _scale_now(self, n):
        if self.status != "running":
            raise RuntimeError("the cluster is %s" % self.status)
        self.forget_ended_jobs()
        want = int(math.ceil(n / self.processes))
        have = len(self.jobs)
        if want > have:
            for _ in range(want - have):
                if self.status != "running":  # close() came meanwhile
                    break
                self.submit_job()
            return
        if want == have:
            return
        workers = self._running_workers()
        pending = [j for j, s in self.jobs.items() if s == "pending"]
        running = [j for j, s in self.jobs.items() if s == "running"]
        cancel = (pending + running[::-1])[:have - want]
        leaving = [a for a, job in workers.items() if job in cancel]
        if leaving:
            self.retire_workers(leaving)
        self.cancel_jobs(cancel)
        self.wait_for_jobs_gone(cancel)
        self._wait_workers_gone(leaving)

    def _wait_workers_gone(self, addresses):
        deadline = time.time() + self.timeout
        addresses = set(addresses)
        while addresses:
            ncores = self._center_call(lambda center: center.ncores())
            addresses &= set(ncores)
            if not addresses or time.time() > deadline:
                break
            time.sleep(0.2)
        if addresses:
            logger.warning("workers %s still registered after their jobs ended",
                           sorted(addresses))

    def adapt(self, minimum=0, maximum=None, interval=1.0, idle_checks=3):
        """Scale with the work from now on (see :class:`Adaptive`); return it.

        ``cluster.adapt(minimum=1, maximum=20)``; ``.stop()`` ends it, as
        :meth:`close` and another ``adapt()`` do.
        """
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = Adaptive(self, minimum, maximum, interval, idle_checks)
        return self._adaptive

    # -- life cycle ------------------------------------------------------------

    def close(self):
        """Cancel every job (and wait until they left the queue), stop the
        center (which removes the scheduler file), remove its directory."""
        if self.status == "closed":
            return
        self.status = "closed"
        if self._adaptive is not None:
            self._adaptive.stop()
        try:
            with self._lock:  # after a scale() under way: its jobs are cancelled too
                jobs = list(self.jobs)
                if jobs:
                    self.cancel_jobs(jobs)
                    self.wait_for_jobs_gone(jobs)
        finally:
            center = getattr(self, "_center", None)
            if center is not None:
                center.close()
            shutil.rmtree(self._directory, ignore_errors=True)

    def __repr__(self):
        return "%s(%r, jobs=%d)" % (type(self).__name__, getattr(
            getattr(self, "_center", None), "_center_address", None), len(self.jobs))


class Adaptive:
    """Scale a cluster with its work, in a thread, every ``interval`` s.

    Grow when tasks wait: to as many workers as there are tasks to run
    (waiting, queued, processing), each worker counting for its threads,
    at most ``maximum`` (None: no bound); jobs still in the queue count as
    workers, so a busy cluster does not submit the same jobs again.  Shrink
    to ``minimum`` after ``idle_checks`` checks in a row without work (the
    leaving workers hand their data over first, see
    :meth:`JobQueueCluster.scale`), but not below one worker while the
    cluster holds data: it would be lost.
    """

    def __init__(self, cluster, minimum=0, maximum=None, interval=1.0, idle_checks=3):
        if maximum is not None and maximum < minimum:
            raise ValueError("adapt: maximum %r < minimum %r" % (maximum, minimum))
        self.cluster = cluster
        self.minimum = minimum
        self.maximum = maximum
        self.interval = interval
        self.idle_checks = idle_checks
        self._idle = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="distributed-adaptive")
        self._thread.start()

    def target(self, work, threads_per_worker, holds_data, workers):
        """How many workers to have for ``work`` tasks to do (pure).

        >>> a = Adaptive.__new__(Adaptive)
        >>> a.minimum, a.maximum, a.idle_checks, a._idle = 0, 4, 2, 0
        >>> a.target(10, 2, False, 1), a.target(0, 2, True, 4), a.target(0, 2, True, 4)
        (4, 4, 1)
        """
        if work:
            self._idle = 0
            want = max(workers, int(math.ceil(work / max(1, threads_per_worker))))
        else:
            self._idle += 1
            want = workers if self._idle < self.idle_checks else self.minimum
            if holds_data:
                want = max(want, 1)
        want = max(want, self.minimum)
        return want if self.maximum is None else min(want, self.maximum)

    def check(self):
        """One look at the center, and the scale it asks for."""
        cluster = self.cluster
        with cluster._lock:
            cluster.forget_ended_jobs()  # walltime, failures: their workers are gone

        async def look(center):
            states = await center.task_states()
            who_has = await center.who_has()
            return states, any(who_has.values())

        states, holds_data = cluster._center_call(look)
        work = sum(1 for state in states.values() if state in WORK_STATES)
        spec = cluster.spec
        workers = len(cluster.jobs) * spec.processes
        want = self.target(work, max(1, spec.cores // spec.processes), holds_data, workers)
        if want != workers:
            logger.info("adapt: %d tasks to do, %d workers -> %d", work, workers, want)
            cluster.scale(want)

    def _run(self):
        while not self._stopped.wait(self.interval):
            try:
                self.check()
            except Exception as e:
                if self._stopped.is_set() or self.cluster.status != "running":
                    return
                logger.warning("adapt: %s", e)

    def stop(self):
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(COMMAND_TIMEOUT)


class SLURMCluster(JobQueueCluster):
    """Workers as SLURM jobs (``sbatch``, ``scancel``, ``squeue``).

    >>> SLURMCluster.header_lines(JobSpec(cores=4, memory='1GiB', walltime='01:00:00',
    ...                                   queue='gpu'))  # doctest: +NORMALIZE_WHITESPACE
    ['--job-name=dworker', '--nodes=1', '--ntasks=1', '--cpus-per-task=4',
     '--mem=1024M', '--time=01:00:00', '--partition=gpu']
    """

    directive = "#SBATCH"
    submit_command = ["sbatch", "--parsable"]
    cancel_command = ["scancel"]
    job_id_variable = "SLURM_JOB_ID"

    @classmethod
    def header_lines(cls, spec):
        lines = ["--job-name=%s" % spec.name, "--nodes=1", "--ntasks=1",
                 "--cpus-per-task=%d" % spec.cores]
        if spec.memory:
            lines.append("--mem=%dM" % spec.memory_mb)
        if spec.walltime:
            lines.append("--time=%s" % spec.walltime)
        if spec.queue:
            lines.append("--partition=%s" % spec.queue)
        if spec.job_directory:
            lines.append("--output=%s" % os.path.join(spec.job_directory,
                                                      "%s-%%j.out" % spec.name))
        return lines

    def output_path(self, job):
        return os.path.join(self.spec.job_directory, "%s-%s.out" % (self.name, job))

    def job_states(self):
        # A cancelled job may read CANCELLED in --states=all while the default
        # listing still shows it COMPLETING (its processes are being killed),
        # and the default listing may skip it for a moment right after
        # scancel: a job is over when neither lists it as active.
        states = {}
        for extra in (["--states=all"], []):
            out = self._run(["squeue", "--noheader", "--user", getpass.getuser(),
                             "--format", "%i %T"] + extra)
            states.update(line.split()[:2] for line in out.splitlines() if line.strip())
        return states


class PBSCluster(JobQueueCluster):
    """Workers as PBS / Torque jobs (``qsub``, ``qdel``, ``qstat``): the
    directives ``#PBS -l select=1:ncpus=..:mem=..``, ``-l walltime=``, ``-q``."""

    directive = "#PBS"
    submit_command = ["qsub"]
    cancel_command = ["qdel"]
    job_id_variable = "PBS_JOBID"
    job_id_regex = r"(\S+)"  # 123.server: the whole id

    @classmethod
    def header_lines(cls, spec):
        resources = "select=1:ncpus=%d" % spec.cores
        if spec.memory:
            resources += ":mem=%dMB" % spec.memory_mb
        lines = ["-N %s" % spec.name, "-l %s" % resources]
        if spec.walltime:
            lines.append("-l walltime=%s" % spec.walltime)
        if spec.queue:
            lines.append("-q %s" % spec.queue)
        lines.append("-j oe")
        return lines

    def job_states(self):  # untested here: no PBS on the test machine
        out = self._run(["qstat", "-u", getpass.getuser()])
        states = {}
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0][0].isdigit():
                states[parts[0]] = parts[-2] if len(parts) > 2 else "UNKNOWN"
        return states


class SGECluster(JobQueueCluster):
    """Workers as Grid Engine jobs (``qsub -terse``, ``qdel``, ``qstat``):
    ``#$ -pe smp N`` for the cores, ``-l h_vmem=`` (per slot), ``-l h_rt=``."""

    directive = "#$"
    submit_command = ["qsub", "-terse"]
    cancel_command = ["qdel"]
    job_id_variable = "JOB_ID"

    @classmethod
    def header_lines(cls, spec):
        lines = ["-N %s" % spec.name, "-cwd", "-j y"]
        if spec.cores > 1:
            lines.append("-pe smp %d" % spec.cores)
        if spec.memory:
            lines.append("-l h_vmem=%dM" % int(math.ceil(spec.memory_mb / spec.cores)))
        if spec.walltime:
            lines.append("-l h_rt=%s" % spec.walltime)
        if spec.queue:
            lines.append("-q %s" % spec.queue)
        return lines

    def job_states(self):  # untested here: no SGE on the test machine
        out = self._run(["qstat", "-u", getpass.getuser()])
        states = {}
        for line in out.splitlines()[2:]:
            parts = line.split()
            if len(parts) > 4:
                states[parts[0]] = parts[4]
        return states


class LSFCluster(JobQueueCluster):
    """Workers as LSF jobs (``bsub < script``, ``bkill``, ``bjobs``): ``#BSUB
    -n``, ``-R "span[hosts=1]"``, ``-M`` (MB), ``-W HH:MM``."""

    directive = "#BSUB"
    submit_command = ["bsub"]
    submit_stdin = True  # bsub reads the #BSUB lines only from its stdin
    cancel_command = ["bkill"]
    job_id_variable = "LSB_JOBID"
    job_id_regex = r"Job <(\d+)>"

    @classmethod
    def header_lines(cls, spec):
        lines = ["-J %s" % spec.name, "-n %d" % spec.cores, '-R "span[hosts=1]"']
        if spec.memory:
            lines.append("-M %d" % spec.memory_mb)
        if spec.walltime:
            lines.append("-W %s" % ":".join(spec.walltime.split(":")[:2]))  # HH:MM
        if spec.queue:
            lines.append("-q %s" % spec.queue)
        return lines

    def job_states(self):  # untested here: no LSF on the test machine
        out = self._run(["bjobs", "-noheader", "-o", "jobid stat"])
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) > 1)


class JobSpec:
    """What each job asks for and runs (see :class:`JobQueueCluster`).

    >>> JobSpec(cores=4, memory='2GiB', processes=2).memory_mb
    2048
    """

    def __init__(self, cores=1, memory=None, walltime="00:30:00", queue=None,
                 job_extra=(), processes=1, python=sys.executable, local_directory=None,
                 env_extra=(), name="dworker", death_timeout=DEATH_TIMEOUT,
                 job_directory=None):
        if not 1 <= int(processes) <= int(cores):
            raise ValueError("a job needs cores >= processes >= 1 (got cores=%r, "
                             "processes=%r)" % (cores, processes))
        if isinstance(job_extra, str) or isinstance(env_extra, str):
            raise TypeError("job_extra and env_extra are lists of lines")
        self.cores = int(cores)
        self.memory = parse_memory_limit(memory) if memory is not None else None
        self.walltime = walltime
        self.queue = queue
        self.job_extra = list(job_extra)
        self.processes = int(processes)
        self.python = python
        self.local_directory = local_directory
        self.env_extra = list(env_extra)
        self.name = name
        self.death_timeout = death_timeout
        self.job_directory = job_directory  # the job output; None: the scheduler's default

    @property
    def memory_mb(self):
        """The memory in MiB, rounded up (what the schedulers' directives take)."""
        return int(math.ceil(self.memory / 2 ** 20)) if self.memory else None


def _private_directory(parent=None):
    """A new directory only the user may enter, under ``parent`` (made ``0700``)."""
    parent = parent or os.path.join(os.path.expanduser("~"), ".distributed", "jobqueue")
    os.makedirs(parent, mode=0o700, exist_ok=True)
    return tempfile.mkdtemp(prefix="cluster-", dir=parent)  # mode 0700


async def _identity(address, security, timeout):
    try:
        with rpc(address, security=security, timeout=timeout) as w:
            return await w.identity()
    except Exception as e:  # leaving meanwhile
        logger.debug("no identity from %s: %s", address, e)
        return None
