"""How the nanny tells how its worker ended: pure functions on files, no
processes (the real deaths are in test_resilience.py)."""

import os
import signal

import pytest

from distributed import nanny
from distributed.nanny import (describe_exit, kernel_log_oom_kill, oom_kill_counter,
                               read_oom_kills)
from distributed.worker import MEMORY_EXIT_CODE

pytestmark = pytest.mark.pure


def test_describe_exit():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-signal.SIGSEGV) == "killed by signal SIGSEGV"
    assert describe_exit(-signal.SIGTERM) == "killed by signal SIGTERM"
    assert describe_exit(MEMORY_EXIT_CODE) == "memory limit exceeded (exit code 75)"
    assert describe_exit(-signal.SIGKILL) == "killed by signal SIGKILL (perhaps the OOM killer)"
    assert describe_exit(-signal.SIGKILL, oom=False) == "killed by signal SIGKILL"
    assert "OOM killer" in describe_exit(-signal.SIGKILL, oom=True)
    assert "SIGKILL" in describe_exit(-signal.SIGKILL, oom=True)
    # oom says nothing about other signals
    assert describe_exit(-signal.SIGSEGV, oom=True) == "killed by signal SIGSEGV"
    assert describe_exit(-200) == "killed by signal 200"
    assert describe_exit(None) == "still running"


V1 = "oom_kill_disable 0\nunder_oom 0\noom_kill %d\n"
V2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill %d\noom_group_kill 0\n"


@pytest.mark.parametrize("text", [V1, V2])
def test_read_oom_kills(tmp_path, text):
    path = tmp_path / "memory.events"
    path.write_text(text % 7)
    assert read_oom_kills(str(path)) == 7
    path.write_text("low 0\n")
    assert read_oom_kills(str(path)) is None
    assert read_oom_kills(str(tmp_path / "missing")) is None
    assert read_oom_kills(None) is None


def test_oom_kill_counter_of_this_process():
    """Where a memory cgroup is mounted, the counter of our own is found
    and reads as a count; elsewhere None."""
    path = oom_kill_counter(os.getpid())
    if path is None:
        assert not os.path.exists("/sys/fs/cgroup/memory") or \
            not os.path.exists("/proc/self/cgroup")
    else:
        assert isinstance(read_oom_kills(path), int)
    assert oom_kill_counter(2 ** 22 + 1) is None  # no such process


def test_oom_watch_tells_from_the_cgroup_count(tmp_path, monkeypatch):
    counter = tmp_path / "memory.oom_control"
    counter.write_text(V1 % 2)
    monkeypatch.setattr(nanny, "oom_kill_counter", lambda pid: str(counter))
    monkeypatch.setattr(nanny, "KMSG", str(tmp_path / "no-kmsg"))
    watch = nanny._OOMWatch(os.getpid())
    assert watch.count == 2
    assert watch.oom_killed() is False  # the count did not rise
    counter.write_text(V1 % 3)
    assert watch.oom_killed() is True
    counter.unlink()
    assert watch.oom_killed() is None  # cannot be told


def test_kernel_log_oom_kill(tmp_path):
    log = tmp_path / "kmsg"
    log.write_text(
        "6,100,5000000,-;eth0: link up\n"
        "3,101,9000000,-;Memory cgroup out of memory: Killed process 4242 (python) "
        "total-vm:1000kB, anon-rss:900kB\n"
        "3,102,9500000,-;Out of memory: Killed process 777 (python) total-vm:1kB\n")
    assert kernel_log_oom_kill([4242], 0, path=str(log)) is True
    assert kernel_log_oom_kill([1, 777], 0, path=str(log)) is True
    assert kernel_log_oom_kill([4242], since=9.2, path=str(log)) is None  # before it
    assert kernel_log_oom_kill([42], 0, path=str(log)) is None
    assert kernel_log_oom_kill([4242], 0, path=str(tmp_path / "none")) is None
