"""Addresses that travel (issue #12, section 1), with real dcenter/dworker
processes: the scheduler file, --pid-file, --death-timeout, --lifetime, and
Executor(cluster_object)."""

import json
import os
import re
import signal
import stat
import time
from types import SimpleNamespace
from unittest.mock import patch

import psutil
import pytest

from distributed import Executor, Worker, rpc
from distributed.scheduler_file import (
    SchedulerFileTimeout,
    read_scheduler_file,
    remove_scheduler_file,
    write_scheduler_file,
)
from distributed.security import ENV_TOKEN, Security
from distributed.utils_test import PYTHON, add, call, child_env, environ, gen_cluster, gone, \
    local_cluster, poll, popen, uid, wait_for, wait_for_line
from distributed.worker import DEATH_TIMEOUT_EXIT_CODE

DCENTER = [PYTHON, "-m", "distributed.cli.dcenter"]
DWORKER = [PYTHON, "-m", "distributed.cli.dworker"]
#: variables of ours a test's processes must not inherit from whoever runs it
_OURS = (ENV_TOKEN, "DISTRIBUTED_SCHEDULER_FILE", "DISTRIBUTED_PID_FILE",
         "DISTRIBUTED_DEATH_TIMEOUT", "DISTRIBUTED_LIFETIME")


def env(**variables):
    """The environment of a test's process: only the given variables of ours."""
    base = {k: v for k, v in os.environ.items() if k not in _OURS}
    return child_env(base, **variables)


def center_address(proc):
    line = wait_for_line(proc, "Start center at", timeout=30)
    return line.split()[-1]


def registered(proc, center, timeout=40):
    """Wait until the dworker ``proc`` registered with ``center``; its worker's address."""
    line = wait_for_line(proc, "Start worker at: ", timeout=timeout)
    assert wait_for_line(proc, "Registered with center at: ", timeout=timeout) == (
        "Registered with center at: %s" % center)
    return line.split()[-1]


def command_lines():
    """Every process's command line, as one string each."""
    lines = []
    for p in psutil.process_iter(["cmdline"]):
        lines.append(" ".join(p.info["cmdline"] or []))
    return lines


# -- the file alone ---------------------------------------------------------------


@pytest.mark.pure
def test_scheduler_file_is_owner_only_whatever_the_umask(tmp_path):
    path = tmp_path / "s.json"
    old = os.umask(0)  # a umask that would make a plain open() world-readable
    try:
        write_scheduler_file(str(path), "127.0.0.1:1234",
                             Security(token="t0ken", tls_ca=None))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["auth_token"] == "t0ken"
    assert os.listdir(tmp_path) == ["s.json"]  # no temporary file left behind
    address, security = read_scheduler_file(str(path), timeout=0)
    assert (address, security.token) == ("127.0.0.1:1234", "t0ken")
    # settings given otherwise win over the file's
    _, mine = read_scheduler_file(str(path), timeout=0, security=Security(token="other"))
    assert mine.token == "other"
    # the file describes the center: a token of the environment does not add to it
    write_scheduler_file(str(path), "127.0.0.1:1234")  # a center without a token
    with environ(**{ENV_TOKEN: "stale"}):
        assert read_scheduler_file(str(path), timeout=0)[1].token is None
    # only the center that wrote it removes it
    assert not remove_scheduler_file(str(path), "127.0.0.1:9999") and path.exists()
    assert remove_scheduler_file(str(path), "127.0.0.1:1234") and not path.exists()


@pytest.mark.pure
def test_an_unwritable_scheduler_file_is_named(tmp_path):
    path = str(tmp_path / "no-such-dir" / "s.json")
    with pytest.raises(OSError, match="cannot write the scheduler file %s: No such file"
                       % re.escape(path)):
        write_scheduler_file(path, "127.0.0.1:1")


@pytest.mark.pure
def test_reading_a_missing_scheduler_file_times_out_naming_it(tmp_path):
    path = str(tmp_path / "nowhere.json")
    start = time.time()
    with pytest.raises(SchedulerFileTimeout, match=re.escape(path)):
        read_scheduler_file(path, timeout=0.3)
    assert 0.3 <= time.time() - start < 5


# -- real processes ---------------------------------------------------------------


@pytest.mark.processes
def test_scheduler_file_round_trip(tmp_path):
    """The center writes its address and token, readable by its user only; a
    worker and an Executor connect with the file alone; the token is on no
    command line and in no output; the file goes when the center stops."""
    token = "tok-" + uid()
    path = tmp_path / "scheduler.json"
    with popen(DCENTER + ["--port", "0", "--no-dashboard", "--scheduler-file", str(path)],
               env=env(**{ENV_TOKEN: token})) as c:
        address = center_address(c)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        content = json.loads(path.read_text())
        assert content["address"] == address and content["auth_token"] == token
        with popen(DWORKER + ["--scheduler-file", str(path)], env=env()) as w:
            registered(w, address)
            assert not [line for line in command_lines() if token in line]
            # an Executor with the file and nothing else (no token in our environment)
            assert ENV_TOKEN not in os.environ
            e = Executor(scheduler_file=str(path), timeout=20, set_as_default=False)
            try:
                assert e.address == address
                assert e.submit(add, 1, 2).result(timeout=30) == 3
            finally:
                e.shutdown()
            # a cluster object: its .security is used (the center requires the token)
            cluster = SimpleNamespace(center_address=address, security=Security(token=token))
            e = Executor(cluster, timeout=20, set_as_default=False)
            try:
                assert e.submit(add, 2, 3).result(timeout=30) == 5
            finally:
                e.shutdown()
            w.stop()
            assert token not in w.output.text()
        c.send_signal(signal.SIGTERM)
        assert c.wait(30) == 0
        assert token not in c.output.text()
    assert not path.exists()  # a clean stop removes it: no stale address for the next


@pytest.mark.processes
def test_worker_waits_for_the_scheduler_file(tmp_path):
    path = tmp_path / "later.json"
    with popen(DWORKER + ["--scheduler-file", str(path), "--connect-timeout", "60"],
               env=env()) as w:
        time.sleep(1.5)
        assert w.poll() is None  # still waiting, not failed
        assert "Start worker" not in w.output.text()
        with popen(DCENTER + ["--port", "0", "--no-dashboard",
                              "--scheduler-file", str(path)], env=env()) as c:
            address = center_address(c)
            worker = registered(w, address)
            assert worker in call(address, "ncores")


@pytest.mark.processes
def test_worker_gives_up_on_a_missing_scheduler_file(tmp_path):
    path = str(tmp_path / "never.json")
    with popen(DWORKER + ["--scheduler-file", path, "--connect-timeout", "1"],
               env=env()) as w:
        assert w.wait(30) == 1
        out = w.read()
    assert "dworker: error: no scheduler file at %s after 1 s" % path in out
    with popen(DWORKER + ["127.0.0.1:8787", "--scheduler-file", path], env=env()) as w:
        assert w.wait(30) == 2  # a usage error: one address, not two
        assert "not both" in w.read()


@pytest.mark.processes
def test_death_timeout_ends_worker_and_nanny(tmp_path):
    """kill -9 the center: the worker (under its nanny; the timeout given as
    the environment variable) exits after --death-timeout, nanny included,
    with status 76 and a message, rather than retrying forever."""
    with popen(DCENTER + ["--port", "0", "--no-dashboard"], env=env()) as c:
        center = center_address(c)
        with popen(DWORKER + [center], env=env(DISTRIBUTED_DEATH_TIMEOUT="2")) as w:
            registered(w, center)
            children = psutil.Process(w.pid).children()
            assert len(children) == 1  # the worker, under its nanny
            assert "--death-timeout 2.0" in " ".join(children[0].cmdline())
            c.proc.kill()
            lost = time.time()
            assert w.wait(60) == DEATH_TIMEOUT_EXIT_CODE
            assert time.time() - lost >= 2
            out = w.read()
            assert "could not reach it again within --death-timeout 2 s" in out
            assert "Restarted worker" not in out
            assert poll(lambda: gone(children[0].pid), timeout=10)


@pytest.mark.processes
def test_lifetime_hands_data_to_a_peer_and_is_not_restarted(tmp_path):
    with popen(DCENTER + ["--port", "0", "--no-dashboard"], env=env()) as c:
        center = center_address(c)
        with popen(DWORKER + [center, "--name", "stays"], env=env()) as wb:
            b = registered(wb, center)
            e = Executor(center, timeout=20, set_as_default=False)
            try:
                with popen(DWORKER + [center, "--name", "leaves", "--lifetime", "6"],
                           env=env()) as wa:
                    a = registered(wa, center)
                    [x] = e.scatter([list(range(1000))], workers=[a])
                    assert e.who_has([x]) == {x.key: [a]}
                    assert wa.wait(60) == 0  # retired: the nanny stopped too, status 0
                    out = wa.read()
                    assert "Worker retired after its --lifetime of 6 s" in out
                    assert "Restarted worker" not in out and "died" not in out
                assert poll(lambda: set(call(center, "ncores")) == {b}, timeout=10)
                assert e.who_has([x]) == {x.key: [b]}  # handed over, not lost
                assert e.gather(x) == list(range(1000))
            finally:
                e.shutdown()


@pytest.mark.processes
def test_pid_files(tmp_path):
    cpid, wpid = tmp_path / "center.pid", tmp_path / "worker.pid"
    with popen(DCENTER + ["--port", "0", "--no-dashboard", "--pid-file", str(cpid)],
               env=env()) as c:
        center = center_address(c)
        # the worker's as the variable: its nanny's child must not take it over
        with popen(DWORKER + [center], env=env(DISTRIBUTED_PID_FILE=str(wpid))) as w:
            registered(w, center)
            assert int(cpid.read_text()) == c.pid
            assert int(wpid.read_text()) == w.pid  # the nanny: what to signal
            w.send_signal(signal.SIGTERM)
            assert w.wait(30) == 0
        assert not wpid.exists()
        c.send_signal(signal.SIGTERM)
        assert c.wait(30) == 0
    assert not cpid.exists()


def test_executor_of_a_cluster_leaves_it_running(cluster):
    e = Executor(cluster, set_as_default=False)
    try:
        assert e.address == cluster.center_address
        assert e.submit(add, 10, 1).result(timeout=30) == 11
    finally:
        e.shutdown()
    assert cluster.status == "running"  # not ours to close
    e = Executor(cluster, set_as_default=False)
    try:
        assert e.submit(add, 10, 2).result(timeout=30) == 12
    finally:
        e.shutdown()


@gen_cluster(ncores=[1, 1, 1])
async def test_retire_spreads_the_data_over_the_peers_in_batches(c, a, b, w):
    """In process: the retiring worker's keys go round robin to the two
    others, in messages of at most HANDOFF_BATCH_BYTES, and none is lost."""
    data = {"k%d" % i: b"x" * 1000 for i in range(10)}
    r = rpc(a.address)
    await r.update_data(data=data)
    r.close_streams()
    sent = []
    real = Worker.rpc_for

    def counting(self, address):
        r = real(self, address)
        update = r.update_data

        async def update_data(**kwargs):
            sent.append((address, sorted(kwargs["data"])))
            return await update(**kwargs)

        r.update_data = update_data
        return r

    with patch.object(Worker, "rpc_for", counting), \
            patch("distributed.worker.HANDOFF_BATCH_BYTES", 3500):
        await a.retire()
    assert a.status == "closed" and a.address not in c.ncores
    held = {k for k in data if c.who_has[k]}
    assert held == set(data)  # every key is on a peer
    assert set(b.data) | set(w.data) == set(data) and not set(b.data) & set(w.data)
    assert {addr for addr, _ in sent} == {b.address, w.address}
    assert all(len(keys) <= 3 for _, keys in sent) and len(sent) == 4  # 5 keys each: 3 + 2


@gen_cluster(ncores=[1, 1, 1])
async def test_retire_rpc_hands_over_to_the_peers_that_stay_then_closes(c, a, b, w):
    """What a cluster's scale-down asks of each leaving worker: its keys go
    only to the workers not excluded (b leaves too), and the reply comes
    before the worker closes; the last of the leaving ones, with nothing to
    hand over, just leaves."""
    data = {"k%d" % i: i for i in range(6)}
    r = rpc(a.address)
    try:
        await r.update_data(data=data)
        status, info = await r.retire(reason="scale-down", exclude=[b.address])
        assert (status, info) == (b"OK", {"keys": 6})
        assert a.close_reason == "scale-down"
    finally:
        r.close_streams()
    await wait_for(lambda: a.status == "closed" and a.address not in c.ncores)
    assert set(w.data) == set(data) and not b.data  # all on w, none on b
    assert all(c.who_has[k] == {w.address} for k in data)
    r = rpc(b.address)
    try:  # nothing to hand over, and b's peers are leaving: it just leaves
        assert await r.retire(exclude=[a.address]) == (b"OK", {"keys": 0})
    finally:
        r.close_streams()
    await wait_for(lambda: b.status == "closed")
    assert set(c.ncores) == {w.address}


@pytest.mark.processes
def test_scheduler_file_carries_tls_settings(tmp_path):
    """A center with TLS and a token: the worker and the Executor get both
    from the file alone (no variable, no flag)."""
    pytest.importorskip("cryptography")
    from test_security import _make_certs

    certs = _make_certs(tmp_path)["ca"]
    token = "tok-" + uid()
    path = tmp_path / "tls.json"
    center_env = env(**{ENV_TOKEN: token, "DISTRIBUTED_TLS_CERT": certs["tls_cert"],
                        "DISTRIBUTED_TLS_KEY": certs["tls_key"],
                        "DISTRIBUTED_TLS_CA": certs["tls_ca"]})
    with popen(DCENTER + ["--port", "0", "--no-dashboard", "--scheduler-file", str(path)],
               env=center_env) as c:
        address = center_address(c)
        content = json.loads(path.read_text())
        assert {k: content[k] for k in certs} == certs
        plain = {k: v for k, v in env().items() if not k.startswith("DISTRIBUTED_TLS")}
        with popen(DWORKER + ["--scheduler-file", str(path), "--no-nanny"], env=plain) as w:
            registered(w, address)
            with pytest.MonkeyPatch.context() as mp:
                for name in ("DISTRIBUTED_TLS_CERT", "DISTRIBUTED_TLS_KEY",
                             "DISTRIBUTED_TLS_CA"):
                    mp.delenv(name, raising=False)
                e = Executor(scheduler_file=str(path), timeout=20, set_as_default=False)
                try:
                    assert e.security.tls and e.security.token == token
                    assert e.submit(add, 20, 1).result(timeout=30) == 21
                finally:
                    e.shutdown()


def test_executor_names_the_missing_scheduler_file(tmp_path):
    path = str(tmp_path / "absent.json")
    with pytest.raises(SchedulerFileTimeout, match=re.escape(path)):
        Executor(scheduler_file=path, timeout=0.5, set_as_default=False)
    with pytest.raises(TypeError, match="scheduler_file"):
        Executor("127.0.0.1:8787", scheduler_file=path)


@pytest.mark.processes
def test_sigterm_while_waiting_for_the_scheduler_file(tmp_path):
    pid_file = tmp_path / "w.pid"
    with popen(DWORKER + ["--scheduler-file", str(tmp_path / "none.json"),
                          "--pid-file", str(pid_file)], env=env()) as w:
        poll(lambda: pid_file.exists(), timeout=30, msg="the pid file")
        assert int(pid_file.read_text()) == w.pid  # written before the wait
        w.send_signal(signal.SIGTERM)
        assert w.wait(10) == 0
        assert "Worker stopped" in w.read()
    assert not pid_file.exists()


@pytest.mark.processes
def test_local_cluster_ignores_the_deployment_variables(tmp_path):
    """A LocalCluster started where $DISTRIBUTED_SCHEDULER_FILE names a real
    cluster's file must not overwrite it, nor take --lifetime from the shell."""
    path = tmp_path / "real.json"
    write_scheduler_file(str(path), "192.0.2.2:8787")
    before = path.read_text()
    with environ(DISTRIBUTED_SCHEDULER_FILE=str(path), DISTRIBUTED_LIFETIME="1"):
        with local_cluster(n_workers=1) as cluster:
            e = Executor(cluster, set_as_default=False)
            try:
                time.sleep(2)  # past the lifetime the variable says
                assert e.submit(add, 1, 1).result(timeout=30) == 2
                assert len(e.ncores()) == 1
            finally:
                e.shutdown()
    assert path.read_text() == before
