"""``SSHCluster``: a center and workers started over SSH.

::

    from distributed import Executor
    from distributed.deploy.ssh import SSHCluster

    with SSHCluster(["node1", "node2", "node3"], nthreads=4,
                    remote_python="/opt/env/bin/python") as cluster:
        e = Executor(cluster)            # or Executor(cluster.center_address,
        e.gather(e.map(inc, range(100)))  #    security=cluster.security)

The center runs on the first host (or ``center_host``), one ``dworker``
(with ``nprocs`` processes) on every host.  ``dssh`` (alias ``dcluster``) is
the same on the command line.

How it works.  Each remote process is one ``ssh`` session of the system
client (so ``~/.ssh/config``, agents, jump hosts and known_hosts work as for
any other ``ssh`` command), running a small self-contained Python program
(:data:`REMOTE_BOOT`) with ``remote_python``.  The launcher writes one JSON
line to the session's standard input: the command (``dcenter`` or
``dworker``) and its environment, which holds the auth token and
``remote_env``; nothing secret is on any command line, here or there.  The
program starts the command and waits for the end of its standard input:
when the launcher closes it (``close()``, Ctrl-C), or dies (even by
SIGKILL: the pipe closes with it, and the ``ssh`` client, alone, ends its
session), the command gets SIGTERM (workers unregister), then SIGKILL for
whatever of it still runs ``grace`` seconds later.  Its output comes back
through the session, each line prefixed with the host by ``dssh``.

The center listens on the address the launcher's ``ssh`` reached its host
at (``$SSH_CONNECTION``), so the workers must be able to reach that address
too; ``center_ip`` names another one.
"""

import json
import logging
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..cli.utils import CENTER_STARTED, DASHBOARD_STARTED, WORKER_REGISTERED
from ..process import Process
from .cluster import Cluster, cluster_token

logger = logging.getLogger(__name__)

__all__ = ["SSHCluster", "RemoteProcess", "ssh_argv", "REMOTE_BOOT"]

#: seconds a remote command has, after SIGTERM, before it is SIGKILLed
GRACE = 10
#: the port the center listens on unless ``center_port`` says otherwise
CENTER_PORT = 8787
#: ``ssh`` options every session gets: never ask for a password (fail instead),
#: and notice within ~15 s that the other end is gone
SSH_DEFAULT_OPTIONS = ("BatchMode=yes", "ServerAliveInterval=5", "ServerAliveCountMax=3")

#: The program ``remote_python -c`` runs on the remote host.  It needs only
#: the standard library: ``remote_env`` (e.g. a ``PYTHONPATH``) applies to the
#: command it starts.  Its input: one JSON line ``{"args": [...], "env":
#: {...}, "grace": s, "listen_option": "--host" or null}``, then nothing
#: until the end of the input, which stops the command.
REMOTE_BOOT = r'''
import json, os, signal, subprocess, sys, threading, time
cfg = json.loads(sys.stdin.readline())
args = list(cfg["args"])
where = os.environ.get("SSH_CONNECTION", "").split()
if cfg.get("listen_option") and len(where) == 4:
    args += [cfg["listen_option"], where[2]]   # the address ssh reached us at
env = dict(os.environ, **cfg["env"])
env["DISTRIBUTED_PARENT_PID"] = str(os.getpid())  # it stops if we die
env.setdefault("PYTHONUNBUFFERED", "1")
child = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
lock = threading.Lock()

def family():
    try:
        import psutil
        return psutil.Process(child.pid).children(recursive=True)
    except Exception:
        return []

def stop(*_):
    if not lock.acquire(blocking=False):
        return
    others = family()  # before they are orphaned: a nanny's worker, --nprocs ones
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        code = child.wait(cfg["grace"])
    except subprocess.TimeoutExpired:
        code = -9
    for p in [child] + others:
        try:
            os.killpg(child.pid, signal.SIGKILL) if p is child else p.kill()
        except Exception:
            pass
    os._exit(code if code >= 0 else 128 - code)

for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, stop)
threading.Thread(target=lambda: (child.wait(), stop()), daemon=True).start()
sys.stdin.read()   # until the launcher closes it, or its session ends
stop()
'''


def ssh_argv(host, command, ssh_key=None, ssh_port=None, ssh_username=None,
             ssh_config=None, ssh_options=()):
    """The system ``ssh`` client's command line that runs ``command`` (a
    string for the remote shell) on ``host``.

    >>> ssh_argv('node1', 'hostname', ssh_port=2222, ssh_username='me')[-7:]
    ['-p', '2222', '-l', 'me', '--', 'node1', 'hostname']
    """
    argv = ["ssh", "-T"]  # no terminal: the remote side sees the end of its input
    if ssh_config:
        argv += ["-F", str(ssh_config)]
    for option in list(SSH_DEFAULT_OPTIONS) + list(ssh_options):
        argv += ["-o", option]
    if ssh_key:
        argv += ["-i", str(ssh_key)]
    if ssh_port:
        argv += ["-p", str(ssh_port)]
    if ssh_username:
        argv += ["-l", ssh_username]
    return argv + ["--", host, command]


def remote_command(remote_python):
    """The remote shell's command line: ``remote_python -c REMOTE_BOOT``
    (POSIX shell quoting), the same for every session: all that differs
    travels on the session's input."""
    return "exec %s -c %s" % (shlex.quote(remote_python), shlex.quote(REMOTE_BOOT))


class RemoteProcess:
    """One command on one host, over one ``ssh`` session.

    ::

        p = RemoteProcess('node1', ['python3', '-m', 'distributed.cli.dcenter'],
                          env={'DISTRIBUTED_AUTH_TOKEN': token})
        p.wait_for_line('Start center at')
        p.close()                   # SIGTERM there, SIGKILL after ``grace`` s

    ``env`` (added to the remote environment) and ``args`` are written to the
    session's input, never on a command line.  ``listen_option='--host'``
    appends ``--host <the address ssh reached the host at>`` to ``args``.
    ``echo``: print the output here, each line prefixed with ``[host]``.
    ``ssh`` holds the keywords of :func:`ssh_argv`.
    """

    def __init__(self, host, args, env=None, remote_python="python3", listen_option=None,
                 grace=GRACE, echo=False, **ssh):
        self.host = host
        self.args = list(args)
        self.grace = grace
        self.process = Process(ssh_argv(host, remote_command(remote_python), **ssh),
                               stdin=subprocess.PIPE,
                               echo="[%s] " % host if echo else False)
        payload = {"args": self.args, "env": dict(env or {}), "grace": grace,
                   "listen_option": listen_option}
        try:
            self.process.proc.stdin.write(json.dumps(payload) + "\n")
            self.process.proc.stdin.flush()
        except OSError:  # ssh ended at once (bad host): wait_for_line says why
            pass

    def wait_for_line(self, pattern, timeout=30):
        """The first line of output matching ``pattern``; ``TimeoutError`` or
        ``EOFError`` (with what it printed: an ssh error, say) otherwise."""
        return self.process.wait_for_line(pattern, timeout=timeout)

    def poll(self):
        return self.process.poll()

    def tail(self, n=20):
        return self.process.tail(n)

    def close(self, timeout=None):
        """End the session's input: the command gets SIGTERM there, and SIGKILL
        ``grace`` s later; the ``ssh`` client is stopped if it is still there
        after ``timeout`` s (default: ``grace`` + 5, or 2 if nothing came back yet)."""
        try:
            self.process.proc.stdin.close()
        except OSError:
            pass
        if timeout is None:
            # a session that printed nothing may still be connecting (a silent
            # host): no need to wait for it; a remote side that did start
            # stops its command by itself when the session ends
            timeout = self.grace + 5 if len(self.process.output) else 2
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s: the ssh session did not end; stopping it", self.host)
        self.process.stop(timeout=1)

    def __repr__(self):
        return "<RemoteProcess %s: %s>" % (self.host, " ".join(self.args[1:4]))


class SSHCluster(Cluster):
    """A center on ``center_host`` (default: the first of ``hosts``) and a
    ``dworker`` on every one of ``hosts``, started over SSH.

    ::

        with SSHCluster(['node1', 'node2'], nprocs=2, nthreads=4,
                        remote_python='/opt/env/bin/python') as cluster:
            e = Executor(cluster)

    - ``nprocs``, ``nthreads``, ``memory_limit``: of every ``dworker``;
      ``worker_options``: any other ``dworker`` option by its Python name
      (``{'local_dir': '/scratch'}``); ``center_options``: ``dcenter``'s
      (``{'http_port': 0}``); ``center_port``: the center's port (0: a free one).
      Workers run under a nanny, which restarts one that dies.
    - ``center_ip``: the address the center listens on; default the one
      the launcher's ``ssh`` reached ``center_host`` at.
    - ``ssh_key``, ``ssh_port``, ``ssh_username``, ``ssh_config`` (a file,
      ``ssh -F``), ``ssh_options`` (``['StrictHostKeyChecking=no']``, as for
      ``ssh -o``): how to reach the hosts; ``~/.ssh/config`` applies as usual.
    - ``remote_python``: the Python there that has ``distributed``;
      ``remote_env``: variables for the remote commands, e.g.
      ``{'PYTHONPATH': '/home/me/src/distributed'}`` (they travel on the
      session's input, like the token: no ``AcceptEnv`` needed).
    - ``security``: its token (default: a random one) and TLS files (paths
      that must exist on every host) go to every remote process;
      ``cluster.security`` is what clients need.
    - ``timeout``: seconds for the whole start-up; ``echo``: print every
      remote line here, prefixed with ``[host]``.
    """

    def __init__(self, hosts, center_host=None, center_port=CENTER_PORT, center_ip=None,
                 nprocs=1, nthreads=None, memory_limit=None, worker_options=None,
                 center_options=None, ssh_key=None, ssh_port=None, ssh_username=None,
                 ssh_config=None, ssh_options=(), remote_python="python3", remote_env=None,
                 security=None, timeout=60, grace=GRACE, echo=False):
        from ..cli.dcenter import center_args
        from ..cli.dworker import worker_args

        hosts = [hosts] if isinstance(hosts, str) else list(hosts)
        if not hosts:
            raise ValueError("SSHCluster needs at least one host")
        if nprocs < 1:
            raise ValueError("nprocs must be at least 1")
        self.hosts = hosts
        self.center_host = center_host or hosts[0]
        self.nprocs = nprocs
        self.timeout = timeout
        worker_options = dict(worker_options or {})
        if memory_limit is not None:
            worker_options["memory_limit"] = memory_limit
        # unknown or bad options fail here, before any session opens
        self._center_argv = center_args(**dict(center_options or {}))
        self._worker_argv = worker_args(**worker_options)
        security = cluster_token(security)
        self.security = security
        env = {k: v for k, v in security.environ().items() if v is not None}
        self._env = dict(remote_env or {}, **env)
        self._remote = dict(remote_python=remote_python, grace=grace, echo=echo,
                            ssh_key=ssh_key, ssh_port=ssh_port, ssh_username=ssh_username,
                            ssh_config=ssh_config, ssh_options=tuple(ssh_options))
        self.remote_python = remote_python
        self._worker_extra = ["--nprocs", str(nprocs)]
        if nthreads:
            self._worker_extra += ["--nthreads", str(nthreads)]
        self.center = None
        self.center_address = None
        self.dashboard_address = None
        self.workers = []  # RemoteProcess, one per host
        self.status = "starting"
        self._lock = threading.Lock()
        try:
            self._start_center(center_port, center_ip)
            self._start_workers()
        except BaseException:
            self.close()
            raise
        self.status = "running"
        self._register_running()

    def _start_center(self, port, ip):
        args = [self.remote_python, "-m", "distributed.cli.dcenter", "--port", str(port)]
        args += self._center_argv + (["--host", ip] if ip else [])
        self.center = RemoteProcess(self.center_host, args, env=self._env,
                                    listen_option=None if ip else "--host", **self._remote)
        line = self.center.wait_for_line(CENTER_STARTED, timeout=self.timeout)
        self.center_address = line.split()[-1]
        if "--no-dashboard" not in self._center_argv:
            try:
                self.dashboard_address = self.center.wait_for_line(
                    DASHBOARD_STARTED, timeout=5).split()[-1]
            except (TimeoutError, EOFError):
                pass

    def _start_workers(self):
        args = [self.remote_python, "-m", "distributed.cli.dworker", self.center_address]
        args += self._worker_extra + self._worker_argv
        with self._lock:
            if self.status == "closed":
                return
            self.workers = [RemoteProcess(host, args, env=self._env, **self._remote)
                            for host in self.hosts]
        deadline = time.time() + self.timeout

        def registered(p):
            for _ in range(self.nprocs):
                p.wait_for_line(WORKER_REGISTERED, timeout=max(1, deadline - time.time()))

        # not ``with``: on an error or Ctrl-C, close() must not wait for the
        # other hosts' start-up first (closing their sessions ends the waits)
        pool = ThreadPoolExecutor(len(self.workers))
        try:
            for f in [pool.submit(registered, p) for p in self.workers]:
                f.result()
        finally:
            pool.shutdown(wait=False)

    def close(self):
        """Stop the workers (they unregister), then the center, on every host."""
        with self._lock:
            if self.status == "closed":
                return
            self.status = "closed"
            workers, self.workers = self.workers, []
        if workers:
            with ThreadPoolExecutor(len(workers)) as pool:
                list(pool.map(lambda p: p.close(), workers))
        if self.center is not None:
            self.center.close()

    def __repr__(self):
        return "SSHCluster(%r, hosts=%r)" % (self.center_address, self.hosts)
