"""Child processes whose output we watch: start, wait for a line, stop.

::

    p = Process([sys.executable, '-m', 'distributed.cli.dcenter', '--port', '0'])
    line = p.wait_for_line('Start center at')      # 'Start center at 127.0.0.1:41234'
    p.stop()                                        # SIGTERM, then SIGKILL

A daemon thread drains the output, so a chatty child never blocks on a full
pipe, and the lines stay available to :meth:`Process.wait_for_line`.
"""

import os
import queue
import re
import signal
import subprocess
import threading
import time

__all__ = ["Process", "wait_for_line"]


class Process:
    def __init__(self, args, env=None, echo=False, **kwargs):
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.args = args
        self.echo = echo
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
            **kwargs,
        )
        self.pid = self.proc.pid
        self.lines = queue.Queue()
        self.output = []
        self.drained = threading.Event()  # all the output is in ``output``
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.output.append(line)
            if self.echo:
                print(line, end="", flush=True)
            self.lines.put(line)
        self.lines.put(None)
        self.drained.set()

    def wait_for_line(self, pattern, timeout=20):
        """Wait for an output line matching ``pattern``; return it stripped."""
        return wait_for_line(self, pattern, timeout)

    def poll(self):
        return self.proc.poll()

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
            proc.lines.put(None)
            raise EOFError(
                "%s ended before printing a line matching %r; output:\n%s"
                % (proc.args[:4], pattern, "".join(proc.output))
            )
        seen.append(line)
        if re.search(pattern, line):
            return line.strip()
