"""``SSHCluster`` and ``dssh`` against real ``sshd`` servers.

Each test host is an ``sshd -D`` of its own, with throwaway host keys and a
throwaway client key pair in a temporary directory:

- on 127.0.0.1, several sshd on free ports, named ``h1``, ``h2``, ... by
  an ssh configuration file (``ssh -F``): always available, as root or not;
- one per network namespace (the hosts of tests/test_multihost.py, each with
  its own address), the launcher and the client in one more: skipped, with
  the reason, where namespaces are not allowed.

The remote side runs this worktree's code: ``remote_python`` is
``sys.executable`` and ``remote_env`` carries ``PYTHONPATH``, plus a marker
variable that every remote process inherits: "nothing of ours remains" is
"no process has the marker in its environment".
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from distributed import Executor
from distributed.deploy.ssh import REMOTE_BOOT, SSHCluster, remote_command, ssh_argv
from distributed.process import Process
from distributed.utils_test import free_port, inc, poll, slowinc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
MARK = "DSSH_TEST_MARK"


def _no_sshd():
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        return "OpenSSH's sshd/ssh are not installed (Debian: openssh-server)"
    return None


class Hosts:
    """sshd servers and the client side's keys and configuration."""

    def __init__(self, tmp):
        self.tmp = str(tmp)
        self.key = os.path.join(self.tmp, "client_key")
        self.processes = []
        self.sshd = {}  # host name -> its sshd Process
        self.addresses = {}
        self.ports = {}
        _keygen(self.key)
        shutil.copy(self.key + ".pub", os.path.join(self.tmp, "authorized_keys"))
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory

    def start(self, name, address, port, prefix=()):
        """An sshd for ``name`` listening on ``address:port`` (run after ``prefix``,
        e.g. ``ip netns exec NS``)."""
        host_key = os.path.join(self.tmp, "host_key_" + name)
        _keygen(host_key)
        config = os.path.join(self.tmp, "sshd_config_" + name)
        with open(config, "w") as f:
            f.write(SSHD_CONFIG.format(port=port, address=address, host_key=host_key,
                                       keys=os.path.join(self.tmp, "authorized_keys")))
        p = Process(list(prefix) + [SSHD, "-D", "-e", "-f", config])
        self.processes.append(p)
        p.wait_for_line("Server listening on", timeout=10)
        self.sshd[name] = p
        self.addresses[name] = address
        self.ports[name] = port

    def ssh_config(self):
        """An ``ssh -F`` file naming every host."""
        path = os.path.join(self.tmp, "ssh_config")
        with open(path, "w") as f:
            for name in self.sshd:
                f.write(SSH_CONFIG.format(name=name, address=self.addresses[name],
                                          port=self.ports[name], key=self.key))
        return path

    def stop(self):
        for p in self.processes:
            p.stop(timeout=2)


SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {host_key}
AuthorizedKeysFile {keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
LogLevel INFO
"""

SSH_CONFIG = """\
Host {name}
    HostName {address}
    Port {port}
    IdentityFile {key}
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
"""


def _keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path],
                   check=True, stdin=subprocess.DEVNULL, timeout=30)


@pytest.fixture
def hosts(tmp_path):
    """Three sshd on 127.0.0.1: ``h1``, ``h2``, ``h3``."""
    reason = _no_sshd()
    if reason:
        pytest.skip(reason)
    h = Hosts(tmp_path)
    try:
        for name in ("h1", "h2", "h3"):
            h.start(name, "127.0.0.1", free_port())
        yield h
    finally:
        h.stop()


@pytest.fixture
def mark():
    """A marker for the remote processes' environment; at the end, none
    that has it may remain (they are killed, and the test fails)."""
    value = uuid.uuid4().hex
    yield value
    left = ours(value)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, "processes left behind: %s" % [p.cmdline() for p in left]


def ours(mark):
    """The processes whose environment has ``mark``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark:
                found.append(p)
        except psutil.Error:
            pass
    return found


def none_left(mark, timeout=30):
    poll(lambda: not ours(mark), timeout=timeout,
         msg="no process of ours left (%s)" % [p.pid for p in ours(mark)])


def remote_env(mark):
    return {"PYTHONPATH": ROOT, MARK: mark}


def under(process, sshd):
    """Whether ``process`` (psutil) descends from the ``sshd`` Process."""
    try:
        return any(parent.pid == sshd.pid for parent in process.parents())
    except psutil.Error:
        return False


def worker_processes(mark, sshd):
    """The worker processes (not their nannies) that ``sshd``'s sessions started."""
    return [p for p in ours(mark) if under(p, sshd) and "--no-nanny" in _cmdline(p)]


def _cmdline(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def process_lists():
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                          timeout=10).stdout


@pytest.mark.pure
def test_nothing_secret_on_the_ssh_command_line():
    """The token travels on the session's input: the ssh command line is the
    same for every session and has no variable of ours."""
    argv = ssh_argv("node1", remote_command("/opt/py/bin/python"), ssh_key="/k",
                    ssh_options=["ConnectTimeout=5"])
    assert argv[:2] == ["ssh", "-T"]
    assert ["-i", "/k"] == argv[argv.index("-i"):argv.index("-i") + 2]
    assert "ConnectTimeout=5" in argv and "BatchMode=yes" in argv
    assert argv[-2:-1] == ["node1"]
    assert argv[-1].startswith("exec /opt/py/bin/python -c ")
    assert "DISTRIBUTED_AUTH_TOKEN" not in " ".join(argv)
    compile(REMOTE_BOOT, "<remote>", "exec")  # the remote program is valid Python


@pytest.mark.pure
def test_bad_options_fail_before_any_session():
    with pytest.raises(TypeError, match="no_such_option"):
        SSHCluster(["nowhere.invalid"], worker_options={"no_such_option": 1})
    with pytest.raises(ValueError, match="memory limit"):
        SSHCluster(["nowhere.invalid"], memory_limit="lots")
    with pytest.raises(ValueError, match="at least one host"):
        SSHCluster([])


@pytest.mark.processes
def test_unreachable_host_fails_with_ssh_error(hosts, mark):
    """An sshd that refuses us: the error has ssh's own message, nothing lingers."""
    config = hosts.ssh_config()
    with open(config, "a") as f:
        f.write("Host nokey\n    HostName 127.0.0.1\n    Port %d\n"
                "    IdentityFile %s/missing\n    IdentitiesOnly yes\n"
                "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
                % (hosts.ports["h1"], hosts.tmp))
    with pytest.raises(EOFError, match="Permission denied"):
        SSHCluster(["nokey"], ssh_config=config, remote_python=sys.executable,
                   remote_env=remote_env(mark), timeout=20)


@pytest.mark.processes
def test_map_across_hosts_and_a_killed_worker(hosts, mark):
    """A center on h1, a worker on h1, h2, h3; a map over them; h2's worker
    killed -9 mid-map: its nanny restarts it and the map completes."""
    with SSHCluster(["h1", "h2", "h3"], center_port=0, nthreads=2,
                    center_options={"no_dashboard": True},
                    ssh_config=hosts.ssh_config(), remote_python=sys.executable,
                    remote_env=remote_env(mark), timeout=60, grace=5) as cluster:
        token = cluster.security.token
        assert token and len(token) >= 32
        assert cluster.center_address.startswith("127.0.0.1:")
        assert token not in process_lists()  # on no command line, here or "there"
        for name in ("h1", "h2", "h3"):  # one worker per host, started by its sshd
            assert len(worker_processes(mark, hosts.sshd[name])) == 1, name
        # the token reached the remote processes through their environment
        assert all(p.environ().get("DISTRIBUTED_AUTH_TOKEN") == token
                   for p in worker_processes(mark, hosts.sshd["h2"]))

        e = Executor(cluster, timeout=20)  # the documented form: its address and token
        try:
            assert e.address == cluster.center_address and e.security.token == token
            assert sum(e.ncores().values()) == 6
            assert e.gather(e.map(inc, range(100))) == list(range(1, 101))

            futures = e.map(slowinc, range(200), delay=0.02)
            poll(lambda: sum(f.done() for f in futures) >= 20, timeout=30)
            victims = worker_processes(mark, hosts.sshd["h2"])
            assert len(victims) == 1
            for p in victims:
                p.kill()
            assert e.gather(futures) == list(range(1, 201))
            # h2's nanny started a new worker, which registered again
            poll(lambda: [p.pid for p in worker_processes(mark, hosts.sshd["h2"])
                          if p.pid not in {v.pid for v in victims}], timeout=30,
                 msg="a new worker on h2")
            poll(lambda: sum(e.ncores().values()) == 6, timeout=30, msg="6 cores again")
            assert e.gather(e.map(inc, range(30), pure=False)) == list(range(1, 31))
        finally:
            e.shutdown()
    none_left(mark, timeout=20)


@pytest.mark.processes
def test_tls_files_reach_every_host(hosts, mark, tmp_path):
    """TLS settings travel like the token: the files' paths go to every remote
    process (here all "hosts" share this file system), and the cluster runs on TLS."""
    pytest.importorskip("cryptography")
    from test_security import _make_certs

    from distributed.security import Security

    certs = _make_certs(tmp_path)["ca"]
    security = Security(token=uuid.uuid4().hex, **certs)
    with SSHCluster(["h1", "h2"], center_port=0, nthreads=1,
                    center_options={"no_dashboard": True}, security=security,
                    ssh_config=hosts.ssh_config(), remote_python=sys.executable,
                    remote_env=remote_env(mark), grace=5) as cluster:
        assert cluster.security is security
        workers = worker_processes(mark, hosts.sshd["h2"])
        assert workers and all(p.environ().get("DISTRIBUTED_TLS_CERT") == certs["tls_cert"]
                               for p in workers)
        e = Executor(cluster.center_address, security=security, timeout=20)
        try:
            assert len(e.ncores()) == 2
            assert e.gather(e.map(inc, range(10))) == list(range(1, 11))
        finally:
            e.shutdown()
    none_left(mark, timeout=20)


def dssh(hosts, mark, *extra, env=None, names=("h1", "h2"), config=None):
    """``python -m distributed.cli.dssh h1 h2 ...`` with the test hosts."""
    args = [sys.executable, "-m", "distributed.cli.dssh", *names,
            "--ssh-config", config or hosts.ssh_config(), "--center-port", "0",
            "--no-dashboard",
            "--nthreads", "1", "--remote-python", sys.executable, "--grace", "5",
            "--remote-env", "PYTHONPATH=" + ROOT, "--remote-env", "%s=%s" % (MARK, mark)]
    return Process(args + list(extra), env=env, cwd=ROOT)


def started(p, token):
    """Wait for the cluster of the ``dssh`` Process ``p``; compute on it."""
    line = p.wait_for_line("Cluster running", timeout=60)
    address = line.split()[4].rstrip(",")
    e = Executor(address, security=_security(token), timeout=20)
    try:
        assert len(e.ncores()) == 2
        assert e.gather(e.map(inc, range(20))) == list(range(1, 21))
    finally:
        e.shutdown()
    return address


def _security(token):
    from distributed.security import Security
    return Security(token=token)


@pytest.mark.processes
def test_dssh_ctrl_c_stops_every_host(hosts, mark, tmp_path):
    """Output comes back prefixed with the host; SIGINT stops it all; the
    token it made is in a file only its owner reads, and on no command line."""
    token_file = tmp_path / "token"
    env = {k: v for k, v in os.environ.items() if k != "DISTRIBUTED_AUTH_TOKEN"}
    p = dssh(hosts, mark, "--token-file", str(token_file), env=env)
    try:
        p.wait_for_line("Auth token written to", timeout=20)
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        started(p, token)
        assert token not in process_lists()
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0
        output = p.read()
        assert "[h1] Start center at 127.0.0.1:" in output
        assert "[h2] Registered with center at: 127.0.0.1:" in output
        assert "[h2] Worker stopped" in output  # stopped, not just killed
        assert "Cluster stopped" in output
        assert token not in output
        none_left(mark, timeout=10)
    finally:
        p.stop()


@pytest.mark.processes
def test_dssh_killed_leaves_nothing_behind(hosts, mark):
    """kill -9 of the launcher alone: the remote processes stop by themselves."""
    token = uuid.uuid4().hex
    p = dssh(hosts, mark, env=dict(os.environ, DISTRIBUTED_AUTH_TOKEN=token))
    try:
        started(p, token)
        assert len(ours(mark)) >= 5  # center, 2 nannies, 2 workers (and the boots)
        clients = [c for c in psutil.Process(p.pid).children() if c.name() == "ssh"]
        assert len(clients) == 3  # the center's session, and a worker's on h1 and h2
        os.kill(p.pid, signal.SIGKILL)  # the launcher only, not its ssh clients
        none_left(mark, timeout=30)
        # nor do its ssh clients (each in a session of its own) outlive it
        poll(lambda: not [c for c in clients if c.is_running()
                          and c.status() != psutil.STATUS_ZOMBIE],
             timeout=10, msg="the ssh clients ended")
    finally:
        p.stop()


@pytest.mark.processes
def test_dssh_ctrl_c_while_starting(hosts, mark):
    """A host that never answers (a port that accepts and stays silent): Ctrl-C
    during the start-up stops what did start (the center and h1's worker) at
    once, without waiting for the start-up's timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = hosts.ssh_config()
        with open(config, "a") as f:
            f.write(SSH_CONFIG.format(name="silent", address="127.0.0.1",
                                      port=silent.getsockname()[1], key=hosts.key))
        token = uuid.uuid4().hex
        p = dssh(hosts, mark, names=("h1", "silent"), config=config,
                 env=dict(os.environ, DISTRIBUTED_AUTH_TOKEN=token))
        try:
            p.wait_for_line(r"\[h1\] Registered with center", timeout=60)
            assert ours(mark)
            t0 = time.time()
            p.send_signal(signal.SIGINT)
            assert p.wait(30) == 130
            assert time.time() - t0 < 20  # not the 60 s start-up timeout
            none_left(mark, timeout=10)
        finally:
            p.stop()


# -- one host per network namespace ----------------------------------------------------

CLIENT = """
import json, os, sys
from distributed import Executor
from distributed.utils_test import inc
e = Executor(sys.argv[1], timeout=20)
ncores = e.ncores()
futures = e.map(inc, range(60))
print(json.dumps({"workers": sorted(ncores), "results": e.gather(futures),
                  "where": sorted({w for ws in e.who_has(futures).values() for w in ws})}),
      flush=True)
e.shutdown()
"""


@pytest.mark.processes
def test_dssh_across_network_namespaces(tmp_path, mark):
    """sshd on the center's and workers' hosts (10.213.0.1, .11, .12), dssh and
    a client on a fourth: a map runs on all three hosts."""
    reason = _no_sshd()
    if reason:
        pytest.skip(reason)
    from test_multihost import HOSTS, Net, _capability

    reason = _capability()
    if reason:
        pytest.skip("network namespaces not available: %s" % reason)
    net = Net()
    h = Hosts(tmp_path)
    try:
        net.build()
        for name in ("c", "w1", "w2"):
            h.start(name, HOSTS[name], 22, prefix=["ip", "netns", "exec", net.ns(name)])
        token = uuid.uuid4().hex
        env = dict(os.environ, DISTRIBUTED_AUTH_TOKEN=token, PYTHONPATH=ROOT)
        ips = [HOSTS[name] for name in ("c", "w1", "w2")]
        launcher = net.start("x", [
            sys.executable, "-m", "distributed.cli.dssh", *ips,
            "--ssh-key", h.key, "--ssh-username", "root", "--ssh-port", "22",
            "--ssh-option", "StrictHostKeyChecking=no",
            "--ssh-option", "UserKnownHostsFile=/dev/null",
            "--ssh-option", "LogLevel=ERROR",
            "--no-dashboard", "--nthreads", "1", "--remote-python", sys.executable,
            "--grace", "5",
            "--remote-env", "PYTHONPATH=" + ROOT, "--remote-env", "%s=%s" % (MARK, mark)],
            env=env)
        line = launcher.wait_for_line("Cluster running", timeout=60)
        center = line.split()[4].rstrip(",")
        assert center == HOSTS["c"] + ":8787"
        client = net.start("x", [sys.executable, "-c", CLIENT, center], env=env)
        report = json.loads(client.wait_for_line(r'^\{"workers"', timeout=60))
        assert report["results"] == list(range(1, 61))
        assert sorted(w.split(":")[0] for w in report["workers"]) == sorted(ips)
        assert len(report["where"]) >= 2  # the work really spread over hosts
        assert token not in process_lists()
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 0
        output = launcher.read()
        for ip in ips:
            assert "[%s] Worker stopped" % ip in output
        none_left(mark, timeout=10)
    finally:
        h.stop()
        net.destroy()
