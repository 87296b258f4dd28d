"""dcenter and dworker as real processes (free ports only)."""

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

import distributed
from distributed.cli.utils import DASHBOARD_STARTED
from distributed.utils_test import add, call, free_port, poll, popen, wait_for_line

pytestmark = pytest.mark.processes


def script(name):
    """The installed console script next to this Python, else ``python -m``."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return [path]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", "distributed.cli." + name]


DCENTER = script("dcenter")
DWORKER = script("dworker")




def center_address(proc):
    line = wait_for_line(proc, "Start center at")
    m = re.fullmatch(r"Start center at (127\.0\.0\.1:(\d+))", line)
    assert m, line
    assert int(m.group(2)) > 0
    return m.group(1)


def worker_address(proc, center):
    line = wait_for_line(proc, "Start worker at: ")
    m = re.fullmatch(r"Start worker at: (127\.0\.0\.1:\d+)", line)
    assert m, line
    assert wait_for_line(proc, "Registered with center at: ") == (
        "Registered with center at: %s" % center)
    return m.group(1)


def workers_of(center):
    return set(call(center, "ncores"))


def test_center_and_workers():
    with popen(DCENTER + ["--port", "0"]) as c:
        center = center_address(c)
        with popen(DWORKER + [center, "--ncores", "1", "--name", "alice"]) as pa, \
                popen(DWORKER + [center, "--ncores", "2", "--name", "bob"]) as pb:
            alice = worker_address(pa, center)
            bob = worker_address(pb, center)
            assert alice != bob
            assert call(center, "ncores") == {alice: 1, bob: 2}

            # the alice and bob story, on real processes
            assert call(alice, "update_data", data={"x": 1}) == (
                b"OK", {"nbytes": {"x": sys.getsizeof(1)}})
            resp, meta = call(bob, "update_data", data={"y": 2})
            assert resp == b"OK"
            resp, meta = call(alice, "compute", function=add, keys=["x", "y"], key="z")
            assert resp == b"OK", meta
            assert meta["key"] == "z"
            # alice keeps her result, not the input she borrowed from bob
            assert call(alice, "get_data", keys=["z", "y"]) == {"z": 3}
            who_has = call(center, "who_has", keys=["x", "y", "z"])
            assert who_has == {"x": {alice}, "y": {bob}, "z": {alice}}
            ip, port = center.split(":")
            assert call(alice, "identity")["center"] == (ip, int(port))

            # names are unique on the cluster
            with popen(DWORKER + [center, "--name", "alice"]) as dup:
                dup.wait(20)
                assert dup.returncode != 0
                out = dup.read()
                assert "alice" in out
            assert call(center, "ncores") == {alice: 1, bob: 2}

        # leaving the with block sent SIGTERM: both unregistered
        assert pa.returncode == 0 and pb.returncode == 0
        assert poll(lambda: workers_of(center) == set())


NANNY_MODES = pytest.mark.parametrize("mode", [[], ["--no-nanny"]], ids=["nanny", "no-nanny"])


@NANNY_MODES
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_stops_on_signal(sig, mode):
    with popen(DCENTER + ["--port", "0"]) as c:
        center = center_address(c)
        with popen(DWORKER + [center, "--ncores", "1"] + mode) as p:
            w = worker_address(p, center)
            assert w in workers_of(center)
            call(w, "update_data", data={"x": 1})
            start = time.time()
            p.send_signal(sig)
            assert p.wait(10) == 0
            assert time.time() - start < 5
            assert wait_for_line(p, "Worker stopped")
            # it unregistered: the center knows neither it nor its data
            assert w not in workers_of(center)
            assert call(center, "who_has", keys=["x"]) == {"x": set()}
        c.send_signal(sig)
        assert c.wait(10) == 0
        assert wait_for_line(c, "Center stopped")


@NANNY_MODES
def test_worker_killed(mode):
    with popen(DCENTER + ["--port", "0"]) as c:
        center = center_address(c)
        with popen(DWORKER + [center] + mode) as pa, popen(DWORKER + [center] + mode) as pb:
            a = worker_address(pa, center)
            b = worker_address(pb, center)
            call(a, "update_data", data={"x": 1, "shared": 0})
            call(b, "update_data", data={"y": 2, "shared": 0})
            pb.send_signal(signal.SIGKILL)
            pb.wait(10)
            assert poll(lambda: workers_of(center) == {a})
            assert call(center, "who_has", keys=["x", "y", "shared"]) == {
                "x": {a}, "y": set(), "shared": {a}}
            assert call(a, "get_data", keys=["x", "shared"]) == {"x": 1, "shared": 0}
            # and computing on the lost key says so
            assert call(a, "compute", function=add, keys=["x", "y"], key="z") == (
                b"missing-data", {"keys": ["y"]})


def test_help():
    out = subprocess.run(DCENTER + ["--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for option in ["--host", "--port", "--http-port", "8787"]:
        assert option in out.stdout, option
    out = subprocess.run(DWORKER + ["--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for option in ["CENTER_ADDRESS", "--host", "--port", "--ncores", "--nprocs", "--name",
                   "--local-dir", "--memory-limit", "--no-nanny", "--http-port",
                   "--connect-timeout"]:
        assert option in out.stdout, option
    # options come with an explanation, not just a name
    assert "free port" in out.stdout and "threads" in out.stdout
    # and their defaults
    assert "(default: 30)" in out.stdout and "(default: 1)" in out.stdout


def test_bad_arguments():
    out = subprocess.run(DWORKER + ["not-an-address"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "address" in out.stderr
    out = subprocess.run(DWORKER + ["127.0.0.1:1", "--memory-limit", "lots"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "memory" in out.stderr


def test_nprocs():
    with popen(DCENTER + ["--port", "0"]) as c:
        center = center_address(c)
        with popen(DWORKER + [center, "--nprocs", "2", "--name", "w"]) as p:
            # the two children's lines interleave
            lines = [wait_for_line(p, "Start worker at: |Registered with center at: ")
                     for _ in range(4)]
            addresses = {line.split()[-1] for line in lines
                         if line.startswith("Start worker at: ")}
            assert len(addresses) == 2
            assert lines.count("Registered with center at: %s" % center) == 2
            assert poll(lambda: workers_of(center) == addresses)
            ncores = call(center, "ncores")
            expected = max(1, (os.cpu_count() or 1) // 2)
            assert set(ncores.values()) == {expected}
            p.send_signal(signal.SIGTERM)
            assert p.wait(10) == 0
        assert poll(lambda: workers_of(center) == set())


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as f:
        return json.loads(f.read())


def test_http_ports():
    with popen(DCENTER + ["--port", "0", "--http-port", "0"]) as c:
        center = center_address(c)
        line = wait_for_line(c, DASHBOARD_STARTED)  # was "HTTP status at .../info.json"
        status = line.split()[-1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status", status)
        url = status.replace("/status", "/info.json")
        with popen(DWORKER + [center, "--http-port", "0"]) as p:
            w = worker_address(p, center)
            info = get_json(url)
            assert info["address"] == center
            assert info["workers"] == [w]

            wurl = wait_for_line(p, "HTTP status at").split()[-1]
            m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/info\.json", wurl)
            assert m, wurl
            assert int(m.group(1)) != int(w.split(":")[1])
            winfo = get_json(wurl)
            assert winfo["address"] == w
            assert winfo["center"] == center
            assert "memory" in get_json(wurl.replace("info.json", "resources.json"))


@NANNY_MODES
def test_worker_sigterm_while_waiting_for_center(mode):
    port = free_port()
    with popen(DWORKER + ["127.0.0.1:%d" % port] + mode) as p:
        wait_for_line(p, "Start (worker|nanny) at: ")
        start = time.time()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert time.time() - start < 5


@NANNY_MODES
def test_worker_without_center_fails(mode):
    port = free_port()
    start = time.time()
    with popen(DWORKER + ["127.0.0.1:%d" % port, "--connect-timeout", "1"] + mode) as p:
        assert p.wait(20) != 0
        assert time.time() - start < 15
        out = p.read()
    assert "could not register with the center at 127.0.0.1:%d" % port in out
    assert "Traceback" not in out  # one clear line, not a stack dump


def test_center_port_in_use():
    with popen(DCENTER + ["--port", "0"]) as c:
        center = center_address(c)
        port = center.split(":")[1]
        with popen(DCENTER + ["--port", port]) as c2:
            assert c2.wait(20) != 0
            assert "in use" in c2.read().lower()


# -- the options tables: one row per flag drives parser, constructor, children ---


def example_value(option):
    """A non-default value for ``option``, as text on a command line."""
    special = {"memory_limit": "2GB", "host": "127.0.0.2", "resources": "GPU=2,MEM=10e9"}
    if option.dest in special:
        return special[option.dest]
    if option.type is float:
        return str((option.default or 0) + 2.5)
    if option.type is not None:  # int, a port
        return str((option.default or 0) + 7)
    return "example-" + option.dest


def parse_every_flag(cli, positionals=()):
    """``cli``'s parsed args with every option of its table set to a
    non-default value (switches on)."""
    argv = list(positionals)
    for option in cli.OPTIONS:
        argv += [option.flag] if option.switch else [option.flag, example_value(option)]
    args = cli.make_parser().parse_args(argv)
    for option in cli.OPTIONS:
        assert getattr(args, option.dest) != option.default, option
    return args


def explicit_parameters(cls):
    """The keywords of ``cls(...)``: its own, and those of the ``Server`` it
    passes the rest on to (``log_length``, ``security``, ...)."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass.__module__.startswith("distributed"):
            names |= {name for name, p in inspect.signature(klass.__init__).parameters.items()
                      if p.kind is not p.VAR_KEYWORD}
    return names


@pytest.mark.pure
def test_every_dworker_flag_reaches_the_children_and_the_worker():
    from distributed.cli import dworker
    from distributed.cli.utils import NANNY_CHILD, NPROCS_CHILD
    from distributed.http import HTTPWorker
    from distributed.worker import Worker

    center = "127.0.0.1:8786"
    args = parse_every_flag(dworker, [center])
    secrets = [args.auth_token, args.tls_cert, args.tls_key, args.tls_ca]

    # the nanny's child: every option marked for it, parsed back to the same value
    nanny_argv = dworker.nanny_child_argv(args)
    child = dworker.make_parser().parse_args([center] + nanny_argv)
    for option in dworker.OPTIONS:
        expected = getattr(args, option.dest) if NANNY_CHILD in option.children \
            else option.default
        assert getattr(child, option.dest) == expected, option

    # the --nprocs children: the same, spread over the processes
    for i in range(2):
        cmd = dworker.nprocs_child_argv(args, i)
        assert cmd[:4] == [sys.executable, "-m", "distributed.cli.dworker", center]
        child = dworker.make_parser().parse_args(cmd[3:])
        for option in dworker.OPTIONS:
            value = getattr(args, option.dest)
            if NPROCS_CHILD not in option.children:
                value = option.default
            elif option.spread is not None:
                value = option.spread(value, i)
            assert getattr(child, option.dest) == value, option
        assert not set(secrets) & set(cmd)  # they travel in the environment
    assert not set(secrets) & set(nanny_argv)
    assert child.port == args.port + 1 and child.name == args.name + "-1"
    assert child.http_port == args.http_port + 1 and child.no_nanny

    # the Worker(...) call
    kwargs = dworker.worker_kwargs(args)
    assert kwargs == {
        "ip": "127.0.0.2", "ncores": 7, "name": "example-name",
        "local_dir": "example-local_dir", "memory_limit": 2 * 10**9,
        "resources": {"GPU": 2.0, "MEM": 10e9},
        "nanny": "example-nanny_address",
        "services": {"http": HTTPWorker}, "service_ports": {"http": 7},
        "log_length": 7, "death_timeout": 2.5, "lifetime": 2.5, "lifetime_stagger": 2.5}
    assert set(kwargs) <= explicit_parameters(Worker)


@pytest.mark.pure
def test_every_dcenter_flag_reaches_the_center():
    from distributed.center import Center
    from distributed.cli import dcenter
    from distributed.http import HTTPCenter

    args = parse_every_flag(dcenter)
    kwargs = dcenter.center_kwargs(args)
    # --no-dashboard (a switch, so on here) wins over --http-port
    assert kwargs == {"ip": "127.0.0.2", "port": 8787 + 7, "allowed_failures": 3 + 7,
                      "heartbeat_timeout": 60 + 2.5, "services": {}, "service_ports": {},
                      "log_length": 7}
    assert set(kwargs) <= explicit_parameters(Center)
    args.no_dashboard = False
    assert dcenter.center_kwargs(args)["services"] == {"http": HTTPCenter}
    assert dcenter.center_kwargs(args)["service_ports"] == {"http": args.http_port}

    # what a LocalCluster gives its center parses back to the same values
    options = {o.dest: getattr(args, o.dest) for o in dcenter.OPTIONS
               if o.dest not in dcenter._SET_BY_CLUSTER}
    back = dcenter.make_parser().parse_args(dcenter.center_args(**options))
    for name, value in options.items():
        assert getattr(back, name) == value, name


@pytest.mark.pure
def test_defaults_are_the_named_constants():
    from distributed import center, scheduler, worker
    from distributed.cli import dcenter, dworker

    parsed = dcenter.make_parser().parse_args([])
    assert parsed.port == center.Center.default_port
    assert parsed.heartbeat_timeout == center.HEARTBEAT_TIMEOUT
    assert parsed.allowed_failures == scheduler.ALLOWED_FAILURES
    parsed = dworker.make_parser().parse_args(["127.0.0.1:8787"])
    assert parsed.connect_timeout == worker.CONNECT_RETRY_TIMEOUT


@pytest.mark.pure
def test_aliases_of_todays_dask_names():
    from distributed.cli import dcenter, dworker

    args = dworker.make_parser().parse_args(
        ["127.0.0.1:8787", "--nthreads", "2", "--nworkers", "3",
         "--local-directory", "/tmp/x", "--dashboard-address", ":8790"])
    assert (args.ncores, args.nprocs, args.local_dir, args.http_port) == (
        2, 3, "/tmp/x", 8790)
    assert dcenter.make_parser().parse_args(["--dashboard-address", "8791"]).http_port == 8791


@pytest.mark.pure
def test_worker_options_of_a_local_cluster():
    from distributed import LocalCluster
    from distributed.cli.dworker import worker_args

    assert worker_args(index=1, memory_limit="1GB", name="w", http_port=9000,
                       verbose=True) == [
        "--memory-limit", "1GB", "--name", "w-1", "--http-port", "9001", "--verbose"]
    # Python values as they come: a dict of resources, a list of preloads
    assert worker_args(resources={"GPU": 2, "MEM": 1e10}, preload=["a.py", "b"]) == [
        "--resources", "GPU=2,MEM=10000000000.0", "--preload", "a.py", "--preload", "b"]
    # what the cluster sets itself, or no option at all: before anything starts
    for bad in [{"port": 1}, {"ncores": 2}, {"auth_token": "x"}, {"memroy_limit": "1GB"}]:
        with pytest.raises(TypeError, match="worker option"):
            LocalCluster(n_workers=0, worker_options=bad)
    with pytest.raises(ValueError, match="memory limit"):
        LocalCluster(n_workers=0, worker_options={"memory_limit": "lots"})
    with pytest.raises(ValueError, match="resources"):
        LocalCluster(n_workers=0, worker_options={"resources": {"GPU": -1}})


def test_version():
    for cmd in (DCENTER, DWORKER):
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0
        assert distributed.__version__ in out.stdout
