"""Recent log records of a node, kept in memory for ``get_logs``.

Every node (:class:`~distributed.core.Server`: center, worker, nanny) keeps
the last ``log_length`` records of its process in a :class:`LogBuffer`, a
ring: old records fall off, memory stays bounded::

    >>> import logging
    >>> logs = LogBuffer(maxlen=2)
    >>> for i in range(3):
    ...     logging.getLogger('distributed.example').warning('record %d', i)
    >>> [r['message'] for r in logs.records()]
    ['record 1', 'record 2']
    >>> logs.records(n=1)[0]['level'], logs.records(n=1)[0]['name']
    ('WARNING', 'distributed.example')
    >>> logs.close()

One handler on the root logger (:class:`_LogTap`, installed once per
process) hands each record to every open buffer.  A buffer sees **all**
records of its process: nodes started in one process (an in-process test
cluster) share what they log.  Which records there are is decided, as
always, by the loggers' levels: ``dworker`` and ``dcenter`` set the
``distributed`` logger to INFO (their console shows WARNING and up, or
INFO with ``-v``), elsewhere the process's own logging settings apply.

The tap does not change what is printed: when no other handler would take
a record, it prints it as Python does by default (``logging.lastResort``).
"""

import logging
import os
import threading
import weakref
from collections import deque

__all__ = ["LogBuffer", "LOG_LENGTH", "LOG_LENGTH_ENV", "log_length_from_env"]

#: records a node keeps by default
LOG_LENGTH = 10000
#: the environment variable that changes :data:`LOG_LENGTH`
LOG_LENGTH_ENV = "DISTRIBUTED_LOG_LENGTH"


def log_length_from_env(default=LOG_LENGTH):
    """``$DISTRIBUTED_LOG_LENGTH`` as an int, else ``default``."""
    text = os.environ.get(LOG_LENGTH_ENV, "").strip()
    if not text:
        return default
    try:
        return max(0, int(text))
    except ValueError:
        raise ValueError("%s=%r is not a number of records" % (LOG_LENGTH_ENV, text)) from None


class LogBuffer:
    """The last ``maxlen`` log records of this process (default
    ``$DISTRIBUTED_LOG_LENGTH``, else :data:`LOG_LENGTH`), until :meth:`close`.

    A record is kept as ``(time, levelname, logger name, message)``; the
    message is formatted when it is logged (its arguments may change later).
    """

    def __init__(self, maxlen=None):
        if maxlen is None:
            maxlen = log_length_from_env()
        if maxlen < 0:
            raise ValueError("log_length must be 0 or more records, got %r" % (maxlen,))
        self.maxlen = maxlen
        self._records = deque(maxlen=maxlen)
        _tap().add(self)

    def append(self, entry):
        """Keep ``entry``, a ``(time, level, name, message)`` tuple."""
        self._records.append(entry)

    def records(self, n=None):
        """``[{'time', 'level', 'name', 'message'}]``, oldest first; the last
        ``n`` with ``n``."""
        records = list(self._records)
        if n is not None:
            records = records[-n:] if n > 0 else []
        return [{"time": t, "level": level, "name": name, "message": message}
                for t, level, name, message in records]

    def __len__(self):
        return len(self._records)

    def close(self):
        """Stop collecting (the records kept so far stay readable)."""
        _tap().discard(self)


class _LogTap(logging.Handler):
    """The one root handler that feeds every :class:`LogBuffer` of the process."""

    def __init__(self):
        super().__init__()
        self._buffers = weakref.WeakSet()
        self._buffers_lock = threading.Lock()

    def add(self, buffer):
        with self._buffers_lock:
            self._buffers.add(buffer)

    def discard(self, buffer):
        with self._buffers_lock:
            self._buffers.discard(buffer)

    def emit(self, record):
        with self._buffers_lock:
            buffers = list(self._buffers)
        if buffers:
            entry = _entry(record)
            for buffer in buffers:
                buffer.append(entry)
        if not _other_handlers(record.name, self):
            # without us Python would print it with its last-resort handler
            last = logging.lastResort
            if last is not None and record.levelno >= last.level:
                last.handle(record)


def _entry(record):
    """What a :class:`LogBuffer` keeps of ``record``: ``(time, level, name, message)``."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: keep what there is
        message = "%s %r" % (record.msg, record.args)
    if record.exc_info and record.exc_info[0] is not None:
        message += "\n" + logging.Formatter().formatException(record.exc_info)
    return (record.created, record.levelname, record.name, message)


def _other_handlers(name, tap):
    """Whether a record of logger ``name`` reaches a handler other than ``tap``."""
    logger = logging.getLogger(name) if name else logging.getLogger()
    while logger is not None:
        for h in logger.handlers:
            if h is not tap:
                return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


_tap_lock = threading.Lock()
_the_tap = []


def _tap():
    """The process's :class:`_LogTap`, installed on the root logger (again, if
    something removed it)."""
    with _tap_lock:
        if not _the_tap:
            _the_tap.append(_LogTap())
        tap = _the_tap[0]
        root = logging.getLogger()
        if tap not in root.handlers:
            root.addHandler(tap)
        return tap
