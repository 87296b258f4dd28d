"""Job-queue clusters: the scripts of every scheduler (pure), and SLURMCluster
against a real one-node SLURM started by the ``slurm`` fixture.

The fixture needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs
them) and root (slurmd runs the jobs of any user); without them the SLURM
tests are skipped with the reason.  It runs its own ``munged`` (its own key
and socket under a temporary directory: the key the package makes in
/etc/munge is not needed), ``slurmctld -D`` and ``slurmd -D`` with a
``slurm.conf`` for this one node, on free ports, and stops them all at the
end of the session, after cancelling every job left.
"""

import getpass
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest

from distributed import Executor
from distributed.deploy.jobqueue import (
    JobSpec,
    LSFCluster,
    PBSCluster,
    SGECluster,
    SLURMCluster,
)
from distributed.cli.utils import CENTER_STARTED
from distributed.process import Process, popen
from distributed.utils_test import call, free_port, poll, slowinc

SCHEDULER_FILE = "/home/u/.distributed/jobqueue/cluster-x/scheduler.json"


# -- the scripts (pure) ----------------------------------------------------------


def script_of(cls, **spec):
    return cls.script(JobSpec(**spec), SCHEDULER_FILE)


@pytest.mark.pure
def test_slurm_script_asks_for_the_limits_and_runs_dworker_on_the_scheduler_file():
    script = script_of(SLURMCluster, cores=4, memory="2GiB", walltime="01:00:00",
                       queue="short", job_extra=["--exclusive"],
                       env_extra=["module load python"], processes=2, python="/opt/py",
                       local_directory="/scratch/w")
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for line in ["#SBATCH --cpus-per-task=4", "#SBATCH --mem=2048M",
                 "#SBATCH --time=01:00:00", "#SBATCH --partition=short",
                 "#SBATCH --exclusive", "module load python"]:
        assert line in lines
    # directives before any command: sbatch stops reading them at the first one
    first_command = lines.index("module load python")
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    command = lines[-1]
    assert command.startswith("exec /opt/py -m distributed.cli.dworker --scheduler-file %s "
                              % SCHEDULER_FILE)
    assert "--ncores 2 --nprocs 2" in command
    assert "--memory-limit %d" % 2 ** 30 in command  # each of the 2 processes
    assert "--local-dir /scratch/w" in command
    # a job whose center is gone (or never came) ends instead of using its walltime
    assert "--connect-timeout 60 --death-timeout 60" in command
    assert command.endswith("--name dworker-${SLURM_JOB_ID}")


@pytest.mark.pure
@pytest.mark.parametrize("cls", [SLURMCluster, PBSCluster, SGECluster, LSFCluster])
def test_the_script_holds_no_setting_only_the_scheduler_file(cls):
    # the token and the TLS files' paths travel in the scheduler file (0600)
    script = script_of(cls, cores=1)
    assert "--scheduler-file %s " % SCHEDULER_FILE in script
    assert "DISTRIBUTED_" not in script and "--auth-token" not in script


@pytest.mark.pure
def test_the_death_timeout_of_the_jobs_is_configurable():
    assert "--connect-timeout 5 --death-timeout 5 " in script_of(SLURMCluster,
                                                                death_timeout=5)
    script = script_of(SLURMCluster, death_timeout=None)  # dworker's defaults
    assert "--death-timeout" not in script and "--connect-timeout" not in script


@pytest.mark.pure
@pytest.mark.parametrize("cls, expected", [
    (PBSCluster, ["#PBS -l select=1:ncpus=8:mem=4096MB", "#PBS -l walltime=02:00:00",
                  "#PBS -q batch", "#PBS -N dworker"]),
    (SGECluster, ["#$ -pe smp 8", "#$ -l h_vmem=512M", "#$ -l h_rt=02:00:00",
                  "#$ -q batch"]),
    (LSFCluster, ["#BSUB -n 8", "#BSUB -M 4096", "#BSUB -W 02:00", "#BSUB -q batch",
                  '#BSUB -R "span[hosts=1]"']),
])
def test_each_scheduler_changes_only_the_header(cls, expected):
    script = script_of(cls, cores=8, memory="4GiB", walltime="02:00:00", queue="batch")
    lines = script.splitlines()
    for line in expected:
        assert line in lines
    directives = [line for line in lines[1:] if line.startswith("#")]
    assert directives and all(line.startswith(cls.directive + " ") for line in directives)
    # the same worker command, with the job id of that scheduler in the name
    assert lines[-1].endswith("--name dworker-${%s}" % cls.job_id_variable)
    assert lines[-1] == script_of(SLURMCluster, cores=8, memory="4GiB").splitlines()[-1] \
        .replace("SLURM_JOB_ID", cls.job_id_variable)


@pytest.mark.pure
def test_bad_limits_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="cores >= processes"):
        JobSpec(cores=1, processes=2)
    with pytest.raises(ValueError, match="memory limit"):
        JobSpec(memory="lots")
    with pytest.raises(TypeError, match="lists of lines"):
        JobSpec(job_extra="--exclusive")


# -- a real SLURM ------------------------------------------------------------------

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _missing():
    """Why SLURM cannot run here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d) is None
               and not os.path.exists(os.path.join("/usr/sbin", d))]
    if missing:
        return ("SLURM is not installed (missing %s): apt-get install slurm-wlm munge, "
                "as .ci/run does" % ", ".join(missing))
    if os.geteuid() != 0:
        return "the one-node SLURM runs slurmd, which needs root"
    return None


def _which(name):
    return shutil.which(name) or os.path.join("/usr/sbin", name)


SLURM_CONF = """\
ClusterName=distributed-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class Slurm:
    """The one-node SLURM of the tests: its directory and its commands."""

    def __init__(self, directory):
        self.dir = directory
        self.daemons = []

    def run(self, *args):
        return subprocess.run(args, capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def jobs(self):
        """``{job id: state}`` of every job in the queue."""
        out = self.run("squeue", "--noheader", "--format", "%i %T")
        return dict(line.split()[:2] for line in out.splitlines() if line.strip())

    def logs(self):
        text = []
        for name in sorted(os.listdir(os.path.join(self.dir, "log"))):
            with open(os.path.join(self.dir, "log", name)) as f:
                text.append("== %s\n%s" % (name, "".join(f.readlines()[-20:])))
        return "\n".join(text)

    def start(self):
        d = self.dir
        for sub in ("state", "spool", "log", "munge-key"):
            os.makedirs(os.path.join(d, sub), mode=0o700)
        munge_dir = os.path.join(d, "munge")
        os.makedirs(munge_dir, mode=0o755)  # munged wants its socket's directory open
        key = os.path.join(d, "munge-key", "munge.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        socket_path = os.path.join(munge_dir, "munge.socket")
        self.daemons.append(Process([
            _which("munged"), "--foreground", "--force", "--socket", socket_path,
            "--key-file", key, "--log-file", os.path.join(d, "log", "munged.log"),
            "--pid-file", os.path.join(munge_dir, "munged.pid"),
            "--seed-file", os.path.join(munge_dir, "seed")]))
        poll(lambda: os.path.exists(socket_path), timeout=10, msg="munged's socket")
        conf = os.path.join(d, "slurm.conf")
        with open(conf, "w") as f:
            f.write(SLURM_CONF.format(
                host=socket.gethostname().split(".")[0], ctld_port=free_port(),
                d_port=free_port(), munge_socket=socket_path, dir=d,
                cpus=os.cpu_count(),
                memory=int(psutil.virtual_memory().total / 2 ** 20 * 0.9)))
        os.environ["SLURM_CONF"] = conf  # for every SLURM command, the cluster's too
        self.daemons.append(Process([_which("slurmctld"), "-D", "-c", "-f", conf]))
        self.daemons.append(Process([_which("slurmd"), "-D", "-f", conf]))
        deadline = time.time() + 60
        while True:
            try:
                if self.run("sinfo", "--noheader", "--format", "%t").split() == ["idle"]:
                    return
            except subprocess.SubprocessError:
                pass
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError("the SLURM node is not idle (%s):\n%s" % (
                    "%s exited" % dead if dead else "after 60 s", self.logs()))
            time.sleep(0.2)

    def stop(self):
        try:
            if self.jobs():
                self.run("scancel", "--user", getpass.getuser())
        except Exception:
            pass
        for p in reversed(self.daemons):
            p.stop(timeout=10)
        os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM (munged, slurmctld, slurmd) for the session; skipped
    with the reason where it cannot run."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    previous = os.environ.get("SLURM_CONF")
    s = Slurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        if previous is not None:
            os.environ["SLURM_CONF"] = previous


def dworkers_of(center_address, scheduler_file):
    """The live ``dworker`` processes of a cluster: the jobs' (their command
    line names the scheduler file) and their nannies' workers (the center's
    address)."""
    marks = {center_address, scheduler_file}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
        except psutil.Error:
            continue
        if "distributed.cli.dworker" in cmdline and marks & set(cmdline):
            found.append(p)
    return found


def assert_nothing_left(slurm, jobs, center_address, scheduler_file):
    """After a cluster closed: none of its ``jobs`` in the queue, its
    dworkers ended, and its scheduler file removed."""
    assert not (set(jobs) & set(slurm.jobs())), slurm.jobs()
    poll(lambda: not dworkers_of(center_address, scheduler_file), timeout=20,
         msg="the dworkers to end")
    assert not os.path.exists(scheduler_file)


@pytest.mark.processes
@pytest.mark.timeout(240)  # the session's SLURM starts in the first test's time
def test_slurm_cluster_computes_scales_down_without_losing_data_and_closes(slurm, tmp_path):
    with SLURMCluster(jobs=2, cores=1, memory="512MiB", walltime="00:10:00",
                      shared_directory=str(tmp_path), timeout=60) as cluster:
        scheduler_file = cluster.scheduler_file
        assert stat.S_IMODE(os.stat(scheduler_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(scheduler_file)).st_mode) == 0o700
        assert cluster.security.token not in cluster.job_script()
        assert "--scheduler-file %s " % scheduler_file in cluster.job_script()
        jobs = set(cluster.jobs)
        assert len(jobs) == 2 and jobs <= set(slurm.jobs())
        workers = cluster.wait_for_workers(2, timeout=60)
        assert set(cluster.workers().values()) == jobs  # each job runs one worker
        assert all(s == "RUNNING" for j, s in slurm.jobs().items() if j in jobs)

        with Executor(cluster) as e:  # its address and token
            assert e.gather(e.map(pow, range(10), [2] * 10)) == [i ** 2 for i in range(10)]
            # scattered data cannot be recomputed: it survives only if handed over
            data = e.scatter(list(range(20)))
            has_what = e.has_what()
            assert all(has_what[w] for w in workers), has_what  # on both workers

            cluster.scale(1)

            (kept_job,) = cluster.jobs
            (gone_job,) = jobs - {kept_job}
            assert gone_job not in slurm.jobs()
            assert list(e.ncores()) == [a for a, j in cluster.workers().items()
                                        if j == kept_job]
            assert e.gather(data) == list(range(20))
            assert e.submit(sum, data).result() == sum(range(20))
        address = cluster.center_address

    assert_nothing_left(slurm, jobs, address, scheduler_file)


@pytest.mark.processes
@pytest.mark.timeout(240)
def test_dslurm_starts_a_center_and_jobs_and_ctrl_c_cancels_them(slurm, tmp_path):
    with popen([sys.executable, "-m", "distributed.cli.dslurm", "--jobs", "2",
                "--cores", "1", "--memory", "256MiB", "--walltime", "00:05:00",
                "--job-extra=--comment=dslurm-test", "--print-script",
                "--shared-directory", str(tmp_path)]) as p:
        address = p.wait_for_line(CENTER_STARTED, 60).split()[-1]
        scheduler_file = p.wait_for_line("^Scheduler file:", 10).split()[-1]
        assert p.wait_for_line("^#SBATCH --comment=dslurm-test", 10)
        jobs = p.wait_for_line("^Submitted jobs:", 60).split()[2:]
        assert len(jobs) == 2 and set(jobs) <= set(slurm.jobs())
        with open(scheduler_file) as f:
            token = json.load(f)["auth_token"]
        assert token not in "".join(p.output)  # printed nowhere
        with Executor(scheduler_file=scheduler_file) as e:
            assert e.security.token == token
            e.wait_for_workers(2, timeout=60)
            assert e.submit(pow, 3, 2).result() == 9
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0
        lines = p.unread_lines(timeout=5)
        assert "Cancelled jobs: %s\n" % " ".join(jobs) in lines, lines
    assert_nothing_left(slurm, jobs, address, scheduler_file)


@pytest.mark.processes
@pytest.mark.timeout(240)
def test_adapt_submits_jobs_while_tasks_wait_and_cancels_them_when_idle(slurm, tmp_path):
    with SLURMCluster(cores=1, memory="256MiB", walltime="00:05:00",
                      shared_directory=str(tmp_path), timeout=60) as cluster:
        cluster.adapt(minimum=0, maximum=2, interval=0.2, idle_checks=5)
        with Executor(cluster.center_address) as e:  # finds the token: same process
            futures = e.map(slowinc, range(8), delay=0.5)
            poll(lambda: len(cluster.jobs) == 2, timeout=30, msg="2 jobs submitted")
            jobs = set(cluster.jobs)
            assert e.gather(futures) == list(range(1, 9))
            assert len(cluster.jobs) <= 2  # never above maximum
            # idle but holding the results: one worker keeps them
            poll(lambda: len(cluster.jobs) == 1, timeout=60, msg="down to 1 job")
            assert e.gather(futures) == list(range(1, 9))
            del futures
            poll(lambda: not cluster.jobs, timeout=60, msg="down to 0 jobs")
        # adapt's own scancel, not close()'s, takes them out of the queue
        poll(lambda: not (jobs & set(slurm.jobs())), timeout=30, msg="jobs out of squeue")
        address, scheduler_file = cluster.center_address, cluster.scheduler_file
    assert not (jobs & set(slurm.jobs())), slurm.jobs()
    poll(lambda: not dworkers_of(address, scheduler_file), timeout=20,
         msg="the dworkers to end")


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_job_that_ends_by_itself_is_forgotten_and_replaced_by_scale(slurm, tmp_path):
    with SLURMCluster(jobs=1, python="/bin/false", shared_directory=str(tmp_path),
                      timeout=30) as cluster:
        (job,) = cluster.jobs
        ended = []
        poll(lambda: ended.extend(cluster.forget_ended_jobs()) or ended, timeout=30,
             msg="the failed job to be noticed")
        assert ended == [job] and not cluster.jobs
        cluster.scale(1)  # a new job in its place
        (new,) = cluster.jobs
        assert new != job and new in cluster.job_states()  # submitted (maybe failed already)
    assert new not in slurm.jobs()


def files_containing(directory, text):
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if text.encode() in f.read():
                        found.append(path)
            except OSError:  # a socket, a file removed meanwhile
                pass
    return found


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_the_token_reaches_the_job_but_nothing_slurm_stores(slurm, tmp_path, monkeypatch):
    token = "token-from-the-environment-%d" % os.getpid()
    monkeypatch.setenv("DISTRIBUTED_AUTH_TOKEN", token)  # sbatch would store it
    with SLURMCluster(jobs=1, shared_directory=str(tmp_path), timeout=60) as cluster:
        assert cluster.security.token == token
        (worker,) = cluster.wait_for_workers(1)  # it authenticated: the token got there
        (job,) = cluster.jobs
        script = slurm.run("scontrol", "write", "batch_script", job, "-")
        assert "exec " in script and token not in script
        assert files_containing(slurm.dir, token) == []  # state, spool, logs
        assert all(token not in " ".join(p.cmdline())
                   for p in dworkers_of(cluster.center_address, cluster.scheduler_file))


@pytest.mark.pure
def test_dslurm_refuses_bad_limits_before_starting_anything(capsys):
    from distributed.cli import dslurm

    assert dslurm.main(["--cores", "1", "--processes", "2"]) == 1
    assert capsys.readouterr().err == (
        "dslurm: error: a job needs cores >= processes >= 1 (got cores=1, processes=2)\n")
    assert dslurm.main(["--memory", "lots"]) == 1
    assert "memory limit 'lots' not understood" in capsys.readouterr().err


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_job_of_several_processes_is_one_job_of_several_workers(slurm, tmp_path):
    with SLURMCluster(jobs=1, cores=2, processes=2, memory="512MiB",
                      shared_directory=str(tmp_path), timeout=60) as cluster:
        (job,) = cluster.jobs
        workers = cluster.wait_for_workers(2)
        assert cluster.workers() == {w: job for w in workers}
        with Executor(cluster.center_address) as e:
            assert e.ncores() == {w: 1 for w in workers}  # 2 cores, 2 processes
            assert e.gather(e.map(pow, range(4), [3] * 4)) == [0, 1, 8, 27]
        cluster.scale(2)  # as many workers as it has: nothing to do
        assert list(cluster.jobs) == [job]


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_workers_that_never_come_time_out_with_what_the_job_printed(slurm, tmp_path):
    with SLURMCluster(jobs=1, env_extra=["echo cannot load the python module >&2", "exit 3"],
                      shared_directory=str(tmp_path), timeout=60) as cluster:
        with pytest.raises(TimeoutError, match="(?s)0 of 1 workers.*cannot load the python"):
            cluster.wait_for_workers(1, timeout=15)


# -- the joined whole: scheduler file, nanny, death timeout ----------------------------


def sbatch(slurm, script, directory):
    """Submit ``script`` as the cluster does (no ``DISTRIBUTED_*`` of ours); its job id."""
    path = os.path.join(directory, "job.sh")
    with open(path, "w") as f:
        f.write(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTED_")}
    out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True,
                         check=True, timeout=30, env=env).stdout
    return out.strip().split(";")[0]


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_job_started_before_the_scheduler_file_waits_for_it(slurm, tmp_path):
    scheduler_file = str(tmp_path / "scheduler.json")
    spec = JobSpec(cores=1, name="early", job_directory=str(tmp_path))
    job = sbatch(slurm, SLURMCluster.script(spec, scheduler_file), str(tmp_path))
    try:
        poll(lambda: slurm.jobs().get(job) == "RUNNING", timeout=30, msg="the job to run")
        time.sleep(2)  # its dworker is waiting for the file
        assert slurm.jobs().get(job) == "RUNNING" and not os.path.exists(scheduler_file)
        token = "early-token-%d" % os.getpid()
        env = dict(os.environ, DISTRIBUTED_AUTH_TOKEN=token)
        with popen([sys.executable, "-m", "distributed.cli.dcenter", "--port", "0",
                    "--no-dashboard", "--scheduler-file", scheduler_file], env=env) as c:
            address = c.wait_for_line(CENTER_STARTED, 30).split()[-1]
            with Executor(scheduler_file=scheduler_file, timeout=20) as e:
                assert e.address == address and e.security.token == token
                e.wait_for_workers(1, timeout=60)
                (worker,) = e.ncores()
                assert call(worker, "identity", security=e.security)["name"] == \
                    "early-%s" % job
                assert e.submit(pow, 2, 5).result(timeout=30) == 32
    finally:
        slurm.run("scancel", job)
        poll(lambda: job not in slurm.jobs(), timeout=30, msg="the job to leave")


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_worker_killed_in_a_job_is_restarted_by_its_nanny(slurm, tmp_path):
    with SLURMCluster(jobs=1, shared_directory=str(tmp_path), timeout=60) as cluster:
        (job,) = cluster.jobs
        (first,) = cluster.wait_for_workers(1)
        (process,) = [p for p in dworkers_of(cluster.center_address, cluster.scheduler_file)
                      if "--nanny-address" in p.cmdline()]  # the nanny's worker
        process.kill()
        poll(lambda: set(cluster.workers()) - {first}, timeout=60,
             msg="the nanny's new worker to register")
        (second,) = cluster.workers()
        assert second != first and cluster.workers() == {second: job}
        assert slurm.jobs()[job] == "RUNNING"  # the same job goes on
        with Executor(cluster) as e:
            assert e.submit(pow, 3, 3).result(timeout=30) == 27


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_job_whose_center_was_killed_ends_after_its_death_timeout(slurm, tmp_path):
    with SLURMCluster(jobs=2, memory="256MiB", death_timeout=3,
                      shared_directory=str(tmp_path), timeout=60) as cluster:
        jobs = set(cluster.jobs)
        cluster.wait_for_workers(2)
        address, scheduler_file = cluster.center_address, cluster.scheduler_file
        cluster._center.center.kill()  # kill -9: nothing tells the workers
        killed = time.time()
        poll(lambda: not (jobs & set(slurm.jobs())), timeout=40,
             msg="the jobs to end by themselves")
        assert time.time() - killed > 3  # their workers tried for --death-timeout first
        assert not dworkers_of(address, scheduler_file)
        assert cluster.forget_ended_jobs() and not cluster.jobs
    assert not (jobs & set(slurm.jobs()))


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_dslurm_killed_leaves_no_job_behind(slurm, tmp_path):
    """kill -9 of dslurm: its center goes with it (it watches its parent),
    and the jobs end within --death-timeout instead of using their walltime."""
    with popen([sys.executable, "-m", "distributed.cli.dslurm", "--jobs", "1",
                "--death-timeout", "3", "--shared-directory", str(tmp_path)]) as p:
        address = p.wait_for_line(CENTER_STARTED, 60).split()[-1]
        scheduler_file = p.wait_for_line("^Scheduler file:", 10).split()[-1]
        jobs = p.wait_for_line("^Submitted jobs:", 60).split()[2:]
        with Executor(scheduler_file=scheduler_file, timeout=20) as e:
            e.wait_for_workers(1, timeout=60)
        p.kill()
    poll(lambda: not (set(jobs) & set(slurm.jobs())), timeout=40,
         msg="the jobs to end by themselves")
    poll(lambda: not dworkers_of(address, scheduler_file), timeout=20,
         msg="the dworkers to end")


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_scale_down_cancels_a_job_whose_worker_does_not_answer(slurm, tmp_path):
    """A hung worker (SIGSTOP) cannot retire: its data is out of reach anyway,
    so its job is cancelled all the same, after the cluster's timeout."""
    with SLURMCluster(jobs=2, memory="256MiB", shared_directory=str(tmp_path),
                      timeout=10) as cluster:
        cluster.wait_for_workers(2, timeout=60)
        kept_job, hung_job = list(cluster.jobs)  # scale-down cancels the last first
        (hung,) = [a for a, j in cluster.workers().items() if j == hung_job]
        (process,) = [p for p in dworkers_of(cluster.center_address, cluster.scheduler_file)
                      if "--nanny-address" in p.cmdline()
                      and "dworker-%s" % hung_job in p.cmdline()]
        process.suspend()
        try:
            cluster.scale(1)
        finally:
            if process.is_running():
                process.resume()
        assert list(cluster.jobs) == [kept_job] and hung_job not in slurm.jobs()
        with Executor(cluster) as e:
            assert hung not in e.ncores()
            assert e.submit(pow, 2, 2).result(timeout=30) == 4
