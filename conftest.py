"""pytest configuration: markers, the child-process guard, shared fixtures.

Markers (see CONTRIBUTING.md):

- ``slow``: long tests, skipped unless ``--runslow``;
- ``pure``: no sockets, no processes (``-m pure``);
- ``processes``: the test starts child processes (``-m "not processes"`` is
  the fast loop).  Tests using a fixture of :data:`PROCESS_FIXTURES` get it
  automatically; any other test that starts a process must carry it (on the
  test or as the module's ``pytestmark``): an unmarked test that starts one
  fails, with a message saying so.

Fixtures: ``cluster``, a ``LocalCluster`` of two single-threaded workers
shared by the tests of one module (a module adds environment variables for
its processes with ``CLUSTER_ENV = {"NAME": "value"}``), and ``e`` / ``e2``,
an ``Executor`` on it per test.
"""

import os
import subprocess
import threading

import _posixsubprocess
import pytest

from distributed import Executor
from distributed.utils_test import invariant_errors, local_cluster

# the doctests of distributed/ are collected too (--doctest-modules, setup.cfg);
# nothing outside tests/ and distributed/ is
collect_ignore = ["benchmarks", "bin", "setup.py"]

#: fixtures that start child processes: their tests are marked ``processes``
PROCESS_FIXTURES = {"cluster", "e", "e2", "small_cluster", "net"}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, run with --runslow")
    config.addinivalue_line("markers", "pure: no cluster, no network")
    config.addinivalue_line(
        "markers", "processes: starts child processes; the fast loop is -m 'not processes'")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class ChildProcessRefused(RuntimeError):
    pass


#: where a test's guard notes the processes started from other threads
_ATTEMPTS = pytest.StashKey()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Make a test not marked ``processes`` fail if it starts a process, in
    its setup (module-scoped fixtures included), call or teardown.

    Every way Python starts one goes through ``_posixsubprocess.fork_exec``
    (subprocess's own reference to it, multiprocessing's spawn),
    ``os.posix_spawn`` or ``os.fork``: they raise ``ChildProcessRefused``.
    Except in the watch thread of a ``LocalCluster`` started before (by a
    marked test or a process fixture): a worker it replaces belongs to it.
    """
    if item.get_closest_marker("processes"):
        return (yield)
    attempts = item.stash[_ATTEMPTS] = []

    def refuse(name, original):
        def refused(*args, **kwargs):
            if threading.current_thread().name == "distributed-local-cluster-watch":
                return original(*args, **kwargs)
            if threading.current_thread() is not threading.main_thread():
                attempts.append(name)  # the error may be lost in that thread
            raise ChildProcessRefused(
                "%s starts a child process (%s) but is not marked processes: add "
                "@pytest.mark.processes to it, or pytestmark to its module "
                "(see CONTRIBUTING.md)" % (item.nodeid, name))
        return refused

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_posixsubprocess, "fork_exec",
                   refuse("fork_exec", _posixsubprocess.fork_exec))
        if hasattr(subprocess, "_fork_exec"):  # 3.11+: subprocess's own reference
            mp.setattr(subprocess, "_fork_exec", refuse("fork_exec", subprocess._fork_exec))
        for name in ("fork", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                mp.setattr(os, name, refuse("os." + name, getattr(os, name)))
        return (yield)


@pytest.fixture(autouse=True)
def _no_child_processes_from_other_threads(request):
    """Fail an unmarked test whose threads tried to start a process (the
    refusal was raised in that thread, not in the test)."""
    yield
    if request.node.stash.get(_ATTEMPTS, None):
        pytest.fail("%s started a child process but is not marked processes "
                    "(see CONTRIBUTING.md)" % request.node.nodeid, pytrace=False)


@pytest.fixture(scope="module")
def cluster(request):
    """A LocalCluster (two single-threaded workers) for the tests of one
    module; its processes import the test modules (tests/ on their path) and
    see the module's ``CLUSTER_ENV`` variables."""
    with local_cluster(getattr(request.module, "CLUSTER_ENV", None)) as c:
        yield c


@pytest.fixture
def e(cluster):
    """An Executor on the module's ``cluster``, shut down after the test; a
    test during which the center (validating: ``CLUSTER_ENV`` sets
    ``DISTRIBUTED_VALIDATE``) found a broken scheduler invariant fails."""
    before = len(invariant_errors(cluster))
    with Executor(cluster.center_address) as e:
        yield e
    errors = invariant_errors(cluster)[before:]
    assert not errors, "the center's scheduler broke its invariants: %s" % errors


@pytest.fixture
def e2(cluster):
    """A second Executor on the module's ``cluster``."""
    with Executor(cluster.center_address) as e:
        yield e
