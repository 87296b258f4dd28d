"""Command lines and executors that are given a wrong port, a taken port, a
server that is not a center, or a ``--preload`` module (issue 11, part 3)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from distributed import Executor
from distributed.cli.utils import CENTER_STARTED, DASHBOARD_STARTED
from distributed.executor import NotACenterError
from distributed.utils import CENTER_PORT, with_default_port
from distributed.utils_test import poll, popen, wait_for_line

DCENTER = [sys.executable, "-m", "distributed.cli.dcenter"]
DWORKER = [sys.executable, "-m", "distributed.cli.dworker"]


def run(args, timeout=30):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def last_word(line):
    return line.split()[-1]


@pytest.fixture
def taken_port():
    """A port a plain socket listens on (and answers nothing)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


# -- ports ---------------------------------------------------------------------


@pytest.mark.processes
@pytest.mark.parametrize("cmd", [DCENTER, DWORKER + ["127.0.0.1:1"]], ids=["dcenter", "dworker"])
@pytest.mark.parametrize("option", ["--port", "--http-port"])
def test_port_out_of_range_is_a_usage_error(cmd, option):
    out = run(cmd + [option, "99999"])
    assert out.returncode == 2, out
    assert "argument %s" % option in out.stderr
    assert "99999" in out.stderr and "0-65535" in out.stderr
    assert "Start " not in out.stdout  # it listened nowhere


@pytest.mark.pure
def test_server_refuses_a_port_out_of_range():
    from distributed.center import Center

    with pytest.raises(ValueError, match="0-65535"):
        Center(services={}).listen(99999)


@pytest.mark.processes
def test_center_started_twice_on_one_port():
    with popen(DCENTER + ["--port", "0", "--no-dashboard"]) as c:
        port = last_word(wait_for_line(c, CENTER_STARTED)).rsplit(":", 1)[1]
        out = run(DCENTER + ["--port", port, "--no-dashboard"])
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert ("dcenter: error: the TCP port %s of the Center (127.0.0.1:%s) is already "
            "in use; start it with another --port, or --port 0 for a free one"
            % (port, port)) in out.stderr


@pytest.mark.processes
def test_http_port_in_use(taken_port):
    out = run(DCENTER + ["--port", "0", "--http-port", str(taken_port)])
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "the HTTP (dashboard) port %d" % taken_port in out.stderr
    assert "another --http-port, or --http-port 0" in out.stderr


@pytest.mark.processes
def test_worker_port_in_use(taken_port):
    out = run(DWORKER + ["127.0.0.1:1", "--no-nanny", "--port", str(taken_port)])
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "the TCP port %d of the Worker" % taken_port in out.stderr


# -- an executor pointed at something else than a center -------------------------


def connect_error(address, timeout=2, within=None):
    """The message and type of the error of ``Executor(address)``, which must
    come within ``within`` seconds (default: the timeout and a probe)."""
    start = time.time()
    with pytest.raises(OSError) as info:
        Executor(address, timeout=timeout, set_as_default=False)
    elapsed = time.time() - start
    assert elapsed < (within or timeout + 4), elapsed
    return str(info.value), info.type


@pytest.mark.processes
def test_executor_at_a_dashboard_port():
    with popen(DCENTER + ["--port", "0", "--http-port", "0"]) as c:
        wait_for_line(c, CENTER_STARTED)
        url = last_word(wait_for_line(c, DASHBOARD_STARTED))
        address = url.split("//")[1].split("/")[0]
        # said within about a second, not after the 20 s timeout
        message, kind = connect_error(address, timeout=20, within=8)
    assert kind is NotACenterError
    assert "%s is not a center: it is an HTTP server" % address in message
    assert CENTER_STARTED in message  # where to find the right port


@pytest.mark.processes
def test_executor_at_a_worker_port():
    with popen(DCENTER + ["--port", "0", "--no-dashboard"]) as c:
        center = last_word(wait_for_line(c, CENTER_STARTED))
        with popen(DWORKER + [center, "--no-nanny"]) as w:
            worker = last_word(wait_for_line(w, "Start worker at:"))
            message, kind = connect_error(worker, timeout=20, within=8)
    assert kind is NotACenterError
    assert "%s is not a center: it is a Worker" % worker in message


@pytest.mark.processes
def test_executor_at_a_silent_server(taken_port):
    address = "127.0.0.1:%d" % taken_port
    message, kind = connect_error(address)
    assert issubclass(kind, TimeoutError)
    assert message.startswith("%s did not answer as a center within 2 s" % address)
    assert "accepts connections and says nothing" in message


@pytest.mark.processes
def test_executor_at_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        message, kind = connect_error("127.0.0.1:%d" % port)
    assert issubclass(kind, TimeoutError)
    assert "could not connect to the center at 127.0.0.1:%d" % port in message
    assert "is a center running there" in message


@pytest.mark.pure
def test_a_host_alone_means_the_default_port():
    assert CENTER_PORT == 8787
    assert with_default_port("127.0.0.1") == "127.0.0.1:8787"
    assert with_default_port("tcp://example.org") == "tcp://example.org:8787"
    assert with_default_port("[::1]") == "[::1]:8787"
    assert with_default_port("127.0.0.1:9000") == "127.0.0.1:9000"
    e = Executor("127.0.0.1", start=False, set_as_default=False)
    assert e.address == "127.0.0.1:8787"


@pytest.mark.processes
def test_executor_finds_a_center_on_the_default_port():
    """``dcenter`` with no ``--port`` and ``Executor('127.0.0.1')`` meet (skipped
    when something else holds 8787 on this machine)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", CENTER_PORT))
        except OSError:
            pytest.skip("port %d is taken on this machine" % CENTER_PORT)
    with popen(DCENTER + ["--no-dashboard"]) as c:
        assert last_word(wait_for_line(c, CENTER_STARTED)) == "127.0.0.1:%d" % CENTER_PORT
        with Executor("127.0.0.1", timeout=10, set_as_default=False) as e:
            assert e.address == "127.0.0.1:%d" % CENTER_PORT
            assert e.ncores() == {}


# -- --preload ---------------------------------------------------------------------


HOOK = '''
import os

def dask_setup(node):
    with open(os.environ["PRELOAD_OUT"], "a") as f:
        f.write("%s %s\\n" % (type(node).__name__, node.address))
'''


@pytest.mark.processes
def test_preload_runs_dask_setup_on_center_and_worker(tmp_path):
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    out = tmp_path / "out.txt"
    env = dict(os.environ, PRELOAD_OUT=str(out))
    with popen(DCENTER + ["--port", "0", "--no-dashboard", "--preload", str(hook)],
               env=env) as c:
        center = last_word(wait_for_line(c, CENTER_STARTED))
        # through the nanny's child: the hook gets the worker, not the nanny
        with popen(DWORKER + [center, "--preload", str(hook)], env=env) as w:
            worker = last_word(wait_for_line(w, "Start worker at:"))
            wait_for_line(w, "Registered with center at:")
            poll(lambda: out.exists() and len(out.read_text().splitlines()) == 2)
    assert out.read_text().splitlines() == ["Center %s" % center, "Worker %s" % worker]


@pytest.mark.processes
def test_several_preloads_run_in_order_in_the_nannys_worker(tmp_path):
    for name in ("first", "second"):
        (tmp_path / ("%s.py" % name)).write_text(HOOK.replace('"%s %s', '"%s ' + name + ' %s'))
    out = tmp_path / "out.txt"
    env = dict(os.environ, PRELOAD_OUT=str(out))
    with popen(DCENTER + ["--port", "0", "--no-dashboard"], env=env) as c:
        center = last_word(wait_for_line(c, CENTER_STARTED))
        with popen(DWORKER + [center, "--preload", str(tmp_path / "first.py"),
                              "--preload", str(tmp_path / "second.py")], env=env) as w:
            worker = last_word(wait_for_line(w, "Start worker at:"))
            wait_for_line(w, "Registered with center at:")
            poll(lambda: out.exists() and len(out.read_text().splitlines()) == 2)
    assert out.read_text().splitlines() == ["Worker first %s" % worker,
                                            "Worker second %s" % worker]


@pytest.mark.processes
def test_preload_by_module_name(tmp_path):
    (tmp_path / "preload_by_name_11.py").write_text(HOOK)
    out = tmp_path / "out.txt"
    env = dict(os.environ, PRELOAD_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with popen(DCENTER + ["--port", "0", "--no-dashboard", "--preload",
                          "preload_by_name_11"], env=env) as c:
        center = last_word(wait_for_line(c, CENTER_STARTED))
    assert out.read_text() == "Center %s\n" % center


@pytest.mark.processes
@pytest.mark.parametrize("mode", [[], ["--no-nanny"]], ids=["nanny", "no-nanny"])
def test_preload_error_stops_the_command(tmp_path, mode):
    bad = tmp_path / "bad.py"
    bad.write_text("def dask_setup(node):\n    raise RuntimeError('no GPU here')\n")
    out = run(DCENTER + ["--port", "0", "--no-dashboard", "--preload", str(bad)])
    assert out.returncode == 1
    assert "dcenter: error: --preload %s: RuntimeError: no GPU here" % bad in out.stderr
    assert "Traceback" not in out.stderr
    with popen(DCENTER + ["--port", "0", "--no-dashboard"]) as c:
        center = last_word(wait_for_line(c, CENTER_STARTED))
        out = run(DWORKER + [center, "--preload", str(bad)] + mode)
        missing = run(DWORKER + [center, "--preload", "no_such_module_11"] + mode)
    assert out.returncode == 1
    assert "--preload %s: RuntimeError: no GPU here" % bad in out.stderr + out.stdout
    assert missing.returncode == 1
    assert ("--preload no_such_module_11: ModuleNotFoundError"
            in missing.stderr + missing.stdout)
