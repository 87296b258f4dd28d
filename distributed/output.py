"""What a task prints: captured on the worker, printed by its executor.

A worker runs tasks in threads of one process, so it captures their output
per thread: :func:`install` puts an :class:`OutputProxy` on ``sys.stdout``
and ``sys.stderr`` that copies a write made by a thread running a task (see
:func:`capture`) to that task's :class:`TaskOutput`; every write also goes
to the stream it replaced (the worker's own output, whose tail a nanny
reports when the worker dies).  Log records take the same path when the
process's handlers write to ``sys.stderr`` (Python's default handler and
``dworker``'s do)::

    >>> out = TaskOutput()
    >>> install()
    >>> with capture(out):
    ...     print('hello from a task')
    hello from a task
    >>> out.take(final=True)
    [('stdout', 'hello from a task\\n')]
    >>> uninstall()

The worker takes each running task's output every
:data:`OUTPUT_FLUSH_INTERVAL` seconds, and the rest when the task ends,
before its result (``task-output`` messages, to the center, which passes
them to the executors that want the key).  Nothing grows with what a task
prints: a task's buffer holds at most :data:`OUTPUT_FLUSH_BYTES` between two
takes; past that, lines are counted, dropped, and reported once per take as
``[... N lines dropped]``.

:func:`print_output` is the executor's side: each line prefixed with the
worker's name (:func:`format_output`), under the running cell in Jupyter.

    >>> format_output('127.0.0.1:40123', 'a\\nb')
    '[127.0.0.1:40123] a\\n[127.0.0.1:40123] b\\n'
"""

import contextvars
import sys
import threading
from contextlib import contextmanager

__all__ = ["TaskOutput", "OutputProxy", "install", "uninstall", "capture",
           "format_output", "print_output", "OUTPUT_FLUSH_INTERVAL", "OUTPUT_FLUSH_BYTES",
           "OUTPUT_QUEUE_LIMIT"]

#: seconds between two takes of the running tasks' output
OUTPUT_FLUSH_INTERVAL = 0.15
#: characters of output a task may write between two takes; the rest is dropped
OUTPUT_FLUSH_BYTES = 64 * 1024
#: output messages dropped rather than queued on a stream where this many wait
OUTPUT_QUEUE_LIMIT = 100
#: the streams captured, by name (also the ``stream`` field of ``task-output``)
STREAMS = ("stdout", "stderr")


class TaskOutput:
    """The output of one task between two takes, at most ``limit`` characters.

    Written from the task's thread, taken from the event loop's.

    >>> out = TaskOutput(limit=10)
    >>> out.write('stdout', '12345\\n'); out.write('stdout', 'too long\\nx\\n')
    >>> out.take(final=True)
    [('stdout', '12345\\n'), ('stderr', '[... 2 lines dropped]\\n')]
    """

    def __init__(self, limit=OUTPUT_FLUSH_BYTES):
        self.limit = limit
        self._pieces = []  # [(stream, text)] as written: joined when taken
        self._size = 0
        self._dropped = 0  # line ends dropped
        self._dropping = False  # something was dropped since the last take
        self._lock = threading.Lock()

    def write(self, stream, text):
        if not text:
            return
        with self._lock:
            if self._size + len(text) <= self.limit:
                self._size += len(text)
                self._pieces.append((stream, text))
            else:
                self._dropped += text.count("\n")
                self._dropping = True

    def take(self, final=False):
        """The output so far as ``[(stream, text)]``, one item per run of
        writes to one stream; unless ``final``, the last line waits for its
        end (while the buffer has room)."""
        with self._lock:
            pieces, self._pieces = self._pieces, []
            dropped = max(self._dropped, 1) if self._dropping else 0
            self._dropped, self._dropping = 0, False
            chunks = _runs(pieces)
            if not final and chunks and not dropped:
                stream, text = chunks[-1]
                head, newline, tail = text.rpartition("\n")
                if tail and len(tail) < self.limit // 2:  # keep the unfinished line
                    self._pieces = [(stream, tail)]
                    if newline:
                        chunks[-1] = (stream, head + newline)
                    else:
                        chunks.pop()
            self._size = sum(len(t) for _, t in self._pieces)
        if dropped:
            chunks.append(("stderr", "[... %d lines dropped]\n" % dropped))
        return chunks


def _runs(pieces):
    """``[(stream, text)]`` with the texts of consecutive pieces of one stream
    joined.

    >>> _runs([('stdout', 'a'), ('stdout', 'b'), ('stderr', 'c'), ('stdout', 'd')])
    [('stdout', 'ab'), ('stderr', 'c'), ('stdout', 'd')]
    """
    runs = []
    start = 0
    for i in range(1, len(pieces) + 1):
        if i == len(pieces) or pieces[i][0] != pieces[start][0]:
            runs.append((pieces[start][0], "".join(t for _, t in pieces[start:i])))
            start = i
    return runs


_task = threading.local()  # .output: the TaskOutput of the task this thread runs


@contextmanager
def capture(output):
    """Send this thread's writes to ``sys.stdout``/``sys.stderr`` to ``output``
    (a :class:`TaskOutput`) while the block runs (with :func:`install` done)."""
    previous = getattr(_task, "output", None)
    _task.output = output
    try:
        yield output
    finally:
        _task.output = previous


class OutputProxy:
    """Stands in for ``sys.stdout`` or ``sys.stderr`` (``name``): every write
    goes to ``original``, and a write from a thread inside :func:`capture`
    also to its task's output.  Everything else (``fileno``, ``encoding``,
    ...) is the original's."""

    def __init__(self, name, original):
        self._name = name
        self._original = original

    def write(self, text):
        n = self._original.write(text)
        output = getattr(_task, "output", None)
        if output is not None and isinstance(text, str):
            output.write(self._name, text)
        return n

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        return self._original.flush()

    def __getattr__(self, attr):
        return getattr(self._original, attr)


_installed = [0]  # how many workers of this process asked for the proxies
_install_lock = threading.Lock()


def install():
    """Put an :class:`OutputProxy` on ``sys.stdout`` and ``sys.stderr`` (once
    per process; counted: each :func:`install` needs its :func:`uninstall`)."""
    with _install_lock:
        _installed[0] += 1
        for name in STREAMS:
            stream = getattr(sys, name)
            if not isinstance(stream, OutputProxy):
                setattr(sys, name, OutputProxy(name, stream))


def uninstall():
    """Undo one :func:`install`; the last one puts the original streams back
    (unless someone replaced the proxies meanwhile)."""
    with _install_lock:
        _installed[0] = max(0, _installed[0] - 1)
        if _installed[0]:
            return
        for name in STREAMS:
            stream = getattr(sys, name)
            if isinstance(stream, OutputProxy):
                setattr(sys, name, stream._original)


def print_output(worker, stream, text):
    """The executor's side: print ``text`` that a task wrote to its ``stream``
    (``'stdout'`` / ``'stderr'``) on ``worker``, on this process's stream of
    the same name, each line after ``[worker]``."""
    out = sys.stderr if stream == "stderr" else sys.stdout
    if out is None:  # no console (pythonw)
        return
    _forget_the_starting_cell(out)
    # in an empty context: see _forget_the_starting_cell
    contextvars.Context().run(_write, out, format_output(worker, text))


def _write(out, text):
    out.write(text)
    out.flush()


def _forget_the_starting_cell(out):
    """In Jupyter, print under the cell that ran last, not the one that made
    the executor.  ipykernel tells cells apart by a context variable (7.x),
    which the executor's loop inherited from the cell that started it (the
    empty context of :func:`print_output` reads the kernel's current cell
    instead), and by the thread that writes (6.x: a table of threads and
    the cells that started them, from which this drops the loop's thread)."""
    ident = threading.get_ident()
    for attr in ("_thread_to_parent_header", "_thread_to_parent"):
        table = getattr(out, attr, None)
        if type(table) is dict:
            table.pop(ident, None)


def format_output(worker, text):
    """``text`` with ``[worker] `` before each line, ending with a newline."""
    prefix = "[%s] " % worker
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return "".join(prefix + line + "\n" for line in lines)
