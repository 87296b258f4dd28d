"""Child processes whose output we watch: start, wait for a line, stop.

::

    p = Process([sys.executable, '-m', 'distributed.cli.dcenter', '--port', '0'])
    line = p.wait_for_line('Start center at')      # 'Start center at 127.0.0.1:41234'
    p.stop()                                        # SIGTERM, then SIGKILL

    with popen([sys.executable, '-m', 'distributed.cli.dcenter', '--port', '0']) as p:
        ...                                         # stopped at the end, even on error

A daemon thread drains the output, so a chatty child never blocks on a full
pipe.  Only a bounded tail of it is kept (``p.output``, the last
:data:`TAIL_LINES` lines or :data:`TAIL_CHARS` characters): a task that
prints gigabytes costs its watcher a megabyte or two, and the tail is still
there to say what a dead child printed last.  :meth:`Process.wait_for_line`
reads the lines in order; ones nobody reads are dropped past the same bound.

A child started here exits when its parent dies, even by SIGKILL: the
``dcenter`` / ``dworker`` command lines call :func:`exit_with_parent`, which
SIGTERMs the child once it is orphaned.  Each level watches its own parent,
so a chain (client -> ``dworker`` nanny -> worker) unwinds from the top.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager

import psutil

__all__ = ["Process", "Tail", "popen", "wait_for_line", "exit_with_parent"]

#: lines of a child's output kept in memory (``Process.output``)
TAIL_LINES = 1000
#: characters of a child's output kept in memory (``Process.output``)
TAIL_CHARS = 2**20
#: a longer line is read in pieces of this many characters
MAX_LINE = 2**16
#: the environment variable that tells a child the pid of the parent it must not outlive
ENV_PARENT_PID = "DISTRIBUTED_PARENT_PID"


class Tail:
    """The last lines of an output, at most ``max_lines`` lines and ``max_chars`` characters.

    >>> t = Tail(max_lines=2)
    >>> for line in ['a\\n', 'b\\n', 'c\\n']:
    ...     t.append(line)
    >>> t.text(), t.dropped
    ('b\\nc\\n', 1)
    """

    def __init__(self, max_lines=TAIL_LINES, max_chars=TAIL_CHARS):
        self.max_lines = max_lines
        self.max_chars = max_chars
        self.dropped = 0  # lines that fell off the front
        self._lines = deque()
        self._chars = 0

    def append(self, line):
        self._lines.append(line)
        self._chars += len(line)
        while len(self._lines) > self.max_lines or (
                self._chars > self.max_chars and len(self._lines) > 1):
            self.popleft()
            self.dropped += 1

    def popleft(self):
        line = self._lines.popleft()
        self._chars -= len(line)
        return line

    def text(self, n=None):
        """The kept lines (the last ``n`` of them) as one string."""
        lines = list(self._lines)
        return "".join(lines if n is None else lines[-n:])

    def __iter__(self):
        return iter(list(self._lines))

    def __reversed__(self):
        return reversed(list(self._lines))

    def __len__(self):
        return len(self._lines)


class _Lines:
    """Lines not yet read by :func:`wait_for_line`, oldest dropped past a :class:`Tail`'s
    bound; ``get`` returns None once the output ended."""

    def __init__(self):
        self._unread = Tail()
        self._ended = False
        self._changed = threading.Condition()

    def put(self, line):
        with self._changed:
            if line is None:
                self._ended = True
            else:
                self._unread.append(line)
            self._changed.notify_all()

    def get(self, timeout=None):
        with self._changed:
            if not self._changed.wait_for(lambda: self._unread or self._ended, timeout):
                raise queue.Empty
            return self._unread.popleft() if self._unread else None


class Process:
    def __init__(self, args, env=None, echo=False, stdin=subprocess.DEVNULL, **kwargs):
        """``echo``: print the output as our own (a string: before each line,
        e.g. ``'[node1] '``); ``stdin``: ``subprocess.PIPE`` to write to the
        child (``p.proc.stdin``, text), nothing by default."""
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[ENV_PARENT_PID] = str(os.getpid())
        self.args = args
        self.echo = echo
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=stdin,
            text=True,
            errors="replace",  # a task printing bytes must not stop the pump
            env=env,
            start_new_session=True,
            **kwargs,
        )
        self.pid = self.proc.pid
        self.lines = _Lines()
        self.output = Tail()
        self.drained = threading.Event()  # all the output is in ``output``
        threading.Thread(target=self._pump, daemon=True,
                         name="distributed-process-output").start()

    def _pump(self):
        stdout = self.proc.stdout
        try:
            for line in iter(lambda: stdout.readline(MAX_LINE), ""):
                self.output.append(line)
                if self.echo:
                    prefix = self.echo if isinstance(self.echo, str) else ""
                    print(prefix + line, end="", flush=True)
                self.lines.put(line)
        except (OSError, ValueError):  # closed under us
            pass
        finally:
            self.lines.put(None)
            stdout.close()
            self.drained.set()

    def tail(self, n=20):
        """The last ``n`` lines the process printed, as one string."""
        return self.output.text(n)

    def wait_for_line(self, pattern, timeout=20):
        """Wait for an output line matching ``pattern``; return it stripped."""
        return wait_for_line(self, pattern, timeout)

    def unread_lines(self, timeout=0.5):
        """The lines :meth:`wait_for_line` did not read yet, until the output
        ends or ``timeout`` s pass."""
        deadline = time.time() + timeout
        lines = []
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                return lines
            if line is None:  # the output ended (and stays ended for the next get)
                return lines
            lines.append(line)

    def read(self, timeout=20):
        """Everything kept of the output (:attr:`output`), once the process
        ended; ``subprocess.TimeoutExpired`` if it runs ``timeout`` s more."""
        self.proc.wait(timeout)
        self.drained.wait(timeout)
        return self.output.text()

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout=None):
        """Wait for the process to end and return its exit code."""
        return self.proc.wait(timeout)

    @property
    def returncode(self):
        return self.proc.returncode

    def send_signal(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout=5):
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        return self.proc.returncode

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


@contextmanager
def popen(args, env=None, **kwargs):
    """``with popen(args) as p:`` a :class:`Process`, stopped (the whole
    process group) when the block ends, even by an error."""
    p = Process(args, env=env, **kwargs)
    try:
        yield p
    finally:
        p.stop()


def wait_for_line(proc, pattern, timeout=20):
    """Wait for a line of ``proc`` (a :class:`Process`) matching ``pattern``."""
    deadline = time.time() + timeout
    seen = []
    while True:
        try:
            line = proc.lines.get(timeout=max(0, deadline - time.time()))
        except queue.Empty:
            raise TimeoutError(
                "no line matching %r from %s within %s s; output so far:\n%s"
                % (pattern, proc.args[:4], timeout, "".join(seen))
            ) from None
        if line is None:
            raise EOFError(
                "%s ended before printing a line matching %r; output:\n%s"
                % (proc.args[:4], pattern, proc.output.text())
            )
        seen.append(line)
        if re.search(pattern, line):
            return line.strip()


def exit_with_parent(grace=5, interval=0.5):
    """In a child started by :class:`Process`: SIGTERM ourselves once orphaned.

    A daemon thread watches ``os.getppid()``: a parent that dies, even by
    SIGKILL or the OOM killer, leaves us to another parent.  The pid the
    parent put in ``$DISTRIBUTED_PARENT_PID`` (taken out of the environment,
    so that our own children do not inherit it) tells a parent that died
    before we looked, and a wrapper between us (a shell, ``ip netns exec``)
    whose parent died, from a live parent.  The SIGTERM takes the usual way
    out (a worker unregisters, a nanny stops its worker); if we still run
    ``grace`` seconds later, we exit.  Returns the thread, or None outside
    such a child.

    Not ``prctl(PR_SET_PDEATHSIG)``: it fires when the parent *thread* that
    started us ends, and we are started from pool threads; not a pipe from
    the parent: its write end would leak into every process the parent
    forks, which would keep us alive.
    """
    parent = os.environ.pop(ENV_PARENT_PID, None)
    if not parent:
        return None
    parent, ppid = int(parent), os.getppid()

    def orphaned():
        return os.getppid() != ppid or (ppid != parent and not _alive(parent))

    def watch():
        while not orphaned():
            time.sleep(interval)
        try:  # to a pipe nobody may read any more
            print("parent process %d is gone; stopping" % parent, file=sys.stderr,
                  flush=True)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=watch, daemon=True, name="distributed-parent-watch")
    thread.start()
    return thread


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
