"""The test infrastructure itself: the processes marker and its guard
(conftest.py), the shared helpers (distributed/utils_test.py) and the one
child-process helper (distributed/process.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import PROCESS_FIXTURES, ChildProcessRefused
from distributed.process import popen
from distributed.utils_test import TESTS_DIR, child_env, environ, gone, run, uid, wait_for

PYTHON = sys.executable


def test_unmarked_test_cannot_start_a_process():
    with pytest.raises(ChildProcessRefused, match="not marked processes"):
        subprocess.run([PYTHON, "-c", "pass"])
    with pytest.raises(ChildProcessRefused):
        os.fork()


@pytest.mark.processes
def test_marked_test_starts_processes():
    assert subprocess.run([PYTHON, "-c", "pass"]).returncode == 0


GUARDED = textwrap.dedent("""
    import subprocess, sys, threading
    import pytest

    def start():
        return subprocess.run([sys.executable, "-c", "pass"]).returncode

    @pytest.fixture(scope="module")
    def started():
        return start()

    def test_module_fixture(started):
        pass

    def test_thread():
        def target():
            try:
                start()
            except Exception:
                pass  # lost in the thread: the guard still fails the test
        t = threading.Thread(target=target)
        t.start()
        t.join()

    @pytest.mark.processes
    def test_marked():
        assert start() == 0
""")


@pytest.mark.processes
def test_guard_covers_module_fixtures_and_threads(tmp_path):
    (tmp_path / "test_guarded.py").write_text(GUARDED)
    root = os.path.dirname(TESTS_DIR)
    out = subprocess.run(
        [PYTHON, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA",
         "test_guarded.py"], cwd=tmp_path, env=child_env(PYTHONPATH=root),
        capture_output=True, text=True, timeout=60).stdout
    assert "ERROR test_guarded.py::test_module_fixture" in out, out
    assert "not marked processes" in out, out
    assert "ERROR test_guarded.py::test_thread" in out, out
    assert "PASSED test_guarded.py::test_marked" in out, out


def test_tests_of_process_fixtures_are_marked(request):
    items = [item for item in request.session.items
             if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))]
    assert all(item.get_closest_marker("processes") for item in items)


@pytest.mark.processes
def test_popen_wait_read_and_unread_lines():
    with popen([PYTHON, "-c", "print('a'); print('b'); print('c')"]) as p:
        assert p.wait_for_line("a") == "a"
        assert p.wait(10) == 0 and p.returncode == 0
        assert p.read() == "a\nb\nc\n"  # everything, read or not
        assert p.unread_lines(timeout=5) == ["b\n", "c\n"]
    assert gone(p.pid)


@pytest.mark.processes
def test_popen_stops_the_process_on_error():
    with pytest.raises(KeyError):
        with popen([PYTHON, "-c", "import time; print('up', flush=True); time.sleep(60)"]) as p:
            p.wait_for_line("up")
            raise KeyError
    assert gone(p.pid)


@pytest.mark.processes
def test_demo_does_not_import_the_test_helpers():
    code = "import sys, distributed.demo; print('distributed.utils_test' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_child_env_puts_tests_first():
    paths = child_env({"PYTHONPATH": "elsewhere"}, X="1")["PYTHONPATH"].split(os.pathsep)
    assert paths == [TESTS_DIR, os.path.dirname(TESTS_DIR), "elsewhere"]
    assert child_env({}, X="1")["X"] == "1"


def test_environ_restores_variables():
    name = "DISTRIBUTED_TEST_" + uid()
    with environ(**{name: "1"}):
        assert os.environ[name] == "1"
    assert name not in os.environ


def test_run_times_out():
    async def never():
        await wait_for(lambda: False, timeout=10)

    with pytest.raises(TimeoutError):
        run(never(), timeout=0.1)
