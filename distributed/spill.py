"""Spilling a worker's data to disk: :class:`SpillBuffer`.

A worker with a memory limit keeps its data in a ``SpillBuffer`` instead of
a dict.  It is a mutable mapping ``{key: value}`` whose values live either
in memory (``fast``) or in files of ``directory`` (``slow``)::

    >>> import numpy as np, tempfile
    >>> buf = SpillBuffer(tempfile.mkdtemp(), target=100 * 2**20)
    >>> buf['x'] = np.ones(10**6)          # in memory
    >>> buf.evict_until(0)                 # spill least recently used first
    8000000
    >>> 'x' in buf.slow, buf.spilled_bytes
    (True, 8000000)
    >>> buf['x'][:3]                       # read back: in memory again
    array([1., 1., 1.])

Setting, deleting and looking up keys held in memory are dict-speed
operations.  Disk I/O happens only in :meth:`evict_until` (writing),
reading a spilled key back, and removing the files of deleted spilled keys
(in ``executor`` when one is given, inline otherwise).  The worker calls
the first two from threads of its own, so that its event loop never waits
for the disk.

Thread safety: one lock guards the tables.  It is never held during disk
I/O, so a thread writing a large value to disk does not block another that
looks up a key: the value stays in ``fast`` while it is written and moves
to ``slow`` (in one step, under the lock) only when its file is complete,
and only if the key was neither deleted nor replaced meanwhile.  A key is
always in exactly one of ``fast`` and ``slow`` (as seen with the lock held).

Files
-----
One file per spilled key, named ``<hash of repr(key)>-<counter>.spill`` (the
counter makes names unique even for keys whose reprs collide).  A file is
the value pickled with protocol 5 by :func:`distributed.protocol.serialize`,
its out-of-band buffers (numpy arrays, pandas columns, large bytes) written
after the pickle as they are, with no copy, and read back with
``readinto`` into buffers that the unpickled arrays then use::

    b'DSPILL01' <u64 n> <u64 len_0> ... <u64 len_{n-1}> <u64 n_oob>
    pickle buffer_1 ... buffer_{n-1}

``n_oob`` tells which buffers are protocol-5 buffers and which are large
``bytes`` frames (see :mod:`distributed.protocol`).
"""

import hashlib
import itertools
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping

from .protocol import deserialize, serialize
from .sizeof import sizeof

logger = logging.getLogger(__name__)

__all__ = ["SpillBuffer"]

#: seconds after a failed write (disk full) before spilling tries the disk again
DISK_RETRY_INTERVAL = 5.0

_MAGIC = b"DSPILL01"
_U64 = struct.Struct("<Q")
_missing = object()


def _file_name(key, n):
    try:
        text = repr(key)
    except Exception:
        text = "%s-%d" % (type(key).__name__, id(key))
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return "%s-%d.spill" % (digest, n)


def write_value(path, value):
    """Pickle ``value`` into the file ``path``; return the file's size."""
    payload, oob, extra = serialize(value)
    buffers = [payload] + list(oob) + list(extra)
    lengths = [b.nbytes if type(b) is memoryview else len(b) for b in buffers]
    header = _MAGIC + struct.pack("<%dQ" % (len(buffers) + 2), len(buffers), *lengths,
                                  len(oob))
    with open(path, "wb") as f:
        f.write(header)
        for b in buffers:
            f.write(b)
    return len(header) + sum(lengths)


def read_value(path):
    """Inverse of :func:`write_value`."""
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise ValueError("%s is not a spill file" % path)
        (n,) = _U64.unpack(f.read(8))
        *lengths, noob = struct.unpack("<%dQ" % (n + 1), f.read(8 * (n + 1)))
        buffers = []
        for length in lengths:
            buf = bytearray(length)
            if f.readinto(buf) != length:
                raise ValueError("%s is truncated" % path)
            buffers.append(buf)
    payload, rest = buffers[0], buffers[1:]
    return deserialize(bytes(payload), rest[:noob], rest[noob:])


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove the spill file %s: %s", path, e)


class _Slow:
    """One spilled key: its file, its in-memory size, its file's size and
    the name of the value's type."""

    __slots__ = ("path", "nbytes", "disk_bytes", "type_name")

    def __init__(self, path, nbytes, disk_bytes, type_name):
        self.path = path
        self.nbytes = nbytes
        self.disk_bytes = disk_bytes
        self.type_name = type_name


class SlowView(Mapping):
    """Read-only view of the spilled keys of a :class:`SpillBuffer`.

    Looking a value up reads its file but leaves it spilled.
    """

    def __init__(self, buffer):
        self._buffer = buffer

    def __getitem__(self, key):
        with self._buffer.lock:
            entry = self._buffer._slow[key]
        return read_value(entry.path)

    def __contains__(self, key):
        return key in self._buffer._slow

    def __iter__(self):
        with self._buffer.lock:
            return iter(list(self._buffer._slow))

    def __len__(self):
        return len(self._buffer._slow)

    def path(self, key):
        """The file holding ``key``."""
        return self._buffer._slow[key].path

    def nbytes(self, key):
        """``sizeof`` of the value when it was spilled."""
        return self._buffer._slow[key].nbytes

    def type_name(self, key):
        """``type(value).__name__`` of the spilled value."""
        return self._buffer._slow[key].type_name


class SpillBuffer(MutableMapping):
    """A mapping that spills least recently used values to files.

    ``directory``: where the files go (created if needed).  ``target``:
    bytes of in-memory values (as measured by ``sizeof``) that
    :meth:`evict_until` brings the buffer down to by default; ``None``
    means no target of its own.  ``executor``: where files of deleted keys
    are removed (a ``concurrent.futures`` executor), inline when ``None``.

    Attributes: ``fast`` (``{key: value}`` in memory, least recently used
    first), ``slow`` (a read-only view of the spilled keys),
    ``memory_bytes`` and ``spilled_bytes`` (``sizeof`` totals of each side),
    ``disk_bytes`` (size of the files), ``lock``.  Counters ``n_spilled``
    and ``n_unspilled`` count the moves.  ``write_error``: the ``OSError``
    of the last failed write (disk full), ``None`` once one succeeds; for
    ``retry_interval`` seconds after it the disk is left alone.
    """

    def __init__(self, directory, target=None, executor=None):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.target = target
        self.executor = executor
        self.fast = OrderedDict()
        self._sizes = {}  # key -> sizeof, for the keys in fast
        self._slow = {}  # key -> _Slow
        self.slow = SlowView(self)
        self.memory_bytes = 0
        self.spilled_bytes = 0
        self.disk_bytes = 0
        self.n_spilled = 0
        self.n_unspilled = 0
        self.lock = threading.RLock()
        self._evict_lock = threading.Lock()  # one eviction at a time
        self._counter = itertools.count()
        self._unspillable = set()  # keys whose value failed to pickle
        # the disk: the OSError of the last failed write (disk full, say),
        # None once a write succeeds; until ``retry_interval`` seconds after
        # it, evict() raises it again without trying (nor logging)
        self.write_error = None
        self.retry_interval = DISK_RETRY_INTERVAL
        self._write_error_time = 0.0

    # -- the mapping ---------------------------------------------------------

    def __setitem__(self, key, value):
        self.put(key, value)

    def put(self, key, value, nbytes=None):
        """``buf[key] = value`` with a known size (``sizeof(value)`` if None)."""
        if nbytes is None:
            nbytes = sizeof(value)
        with self.lock:
            old = self._sizes.get(key)
            if old is not None:
                self.memory_bytes -= old
            self.fast[key] = value
            self.fast.move_to_end(key)
            self._sizes[key] = nbytes
            self.memory_bytes += nbytes
            self._unspillable.discard(key)
            entry = self._slow.pop(key, None)
            if entry is not None:
                self._forget_slow(entry)

    def __getitem__(self, key):
        """The value; a spilled one is read back and kept in memory again."""
        with self.lock:
            try:
                value = self.fast[key]
            except KeyError:
                entry = self._slow[key]  # KeyError when it is nowhere
            else:
                self.fast.move_to_end(key)
                return value
        return self._unspill(key, entry)

    def _unspill(self, key, entry):
        while True:
            try:
                value = read_value(entry.path)  # the lock is not held during I/O
            except FileNotFoundError:
                value = _missing
            with self.lock:
                if self._slow.get(key) is entry:
                    if value is _missing:
                        raise FileNotFoundError(
                            "the spill file %s of %r disappeared" % (entry.path, key))
                    self.fast[key] = value  # in fast before it leaves slow
                    self._sizes[key] = entry.nbytes
                    self.memory_bytes += entry.nbytes
                    del self._slow[key]
                    self._forget_slow(entry)
                    self.n_unspilled += 1
                    return value
                # deleted, replaced or read back by another thread meanwhile
                value = self.fast.get(key, _missing)
                if value is not _missing:
                    self.fast.move_to_end(key)
                    return value
                entry = self._slow[key]  # KeyError: deleted; else spilled again

    def __delitem__(self, key):
        with self.lock:
            if key in self.fast:
                del self.fast[key]
                self.memory_bytes -= self._sizes.pop(key)
                self._unspillable.discard(key)
            else:
                self._forget_slow(self._slow.pop(key))

    def pop(self, key, default=_missing):
        """Remove ``key`` and return its value (read from disk if spilled)."""
        try:
            value = self[key]
        except KeyError:
            if default is _missing:
                raise
            return default
        self.discard(key)
        return value

    def discard(self, key):
        """Remove ``key`` if present, without reading a spilled value."""
        try:
            del self[key]
        except KeyError:
            pass

    def clear(self):
        """Remove everything; spilled values are not read back."""
        with self.lock:
            entries = list(self._slow.values())
            self.fast.clear()
            self._sizes.clear()
            self._slow.clear()
            self._unspillable.clear()
            self.memory_bytes = 0
            for entry in entries:
                self._forget_slow(entry)

    def __contains__(self, key):
        # no lock: a key moves between the sides by being added to the new
        # one before it leaves the old one (with the lock held, a key is in
        # exactly one of them)
        return key in self.fast or key in self._slow

    def __iter__(self):
        with self.lock:
            keys = list(self.fast)
            keys.extend(self._slow)
        return iter(keys)

    def __len__(self):
        with self.lock:
            return len(self.fast) + len(self._slow)

    def _forget_slow(self, entry, remove=True):
        """Account for a file that no longer holds a key (lock held)."""
        self.spilled_bytes -= entry.nbytes
        self.disk_bytes -= entry.disk_bytes
        if remove:
            if self.executor is None:
                _remove(entry.path)
            else:
                try:
                    self.executor.submit(_remove, entry.path)
                except RuntimeError:  # the executor was shut down
                    _remove(entry.path)

    # -- more than a mapping -------------------------------------------------

    def get_many(self, keys):
        """``{key: value}`` for the ``keys`` present, read back when spilled.

        Meant for a thread: the worker calls it off its event loop.
        """
        out = {}
        for key in keys:
            try:
                out[key] = self[key]
            except KeyError:
                pass
        return out

    def get_in_memory(self, keys):
        """``({key: value}, [key])``: the ``keys`` in memory with their values
        (now most recently used) and the spilled ones.  Reads nothing."""
        values, spilled = {}, []
        with self.lock:
            fast, slow = self.fast, self._slow
            for k in keys:
                if k in fast:
                    values[k] = fast[k]
                    fast.move_to_end(k)
                elif k in slow:
                    spilled.append(k)
        return values, spilled

    def spilled(self, keys):
        """The ``keys`` that are on disk now (dict speed)."""
        slow = self._slow
        if not slow:
            return []
        fast = self.fast
        return [k for k in keys if k in slow and k not in fast]

    def evict(self):
        """Spill the least recently used value; its ``sizeof`` (0: nothing left).

        Raises the ``OSError`` of a failed write (the disk is full, say); for
        ``retry_interval`` seconds after one, raises it again at once without
        touching the disk.
        """
        with self._evict_lock:
            error = self.write_error
            if error is not None and \
                    time.monotonic() - self._write_error_time < self.retry_interval:
                raise error.with_traceback(None)  # no traceback growing per raise
            with self.lock:
                key = next((k for k in self.fast if k not in self._unspillable), _missing)
                if key is _missing:
                    return 0
                value = self.fast[key]
                nbytes = self._sizes[key]
                n = next(self._counter)
            path = os.path.join(self.directory, _file_name(key, n))
            try:
                disk_bytes = write_value(path, value)  # no lock: I/O
            except OSError as e:  # the disk (full, say), not the value
                _remove(path)
                self._disk_failed(e, key, nbytes)
                raise
            except Exception as e:
                _remove(path)
                with self.lock:
                    if self.fast.get(key, _missing) is value:
                        self._unspillable.add(key)
                logger.warning("could not spill %r (%s bytes) to %s: %s: %s",
                               key, nbytes, self.directory, type(e).__name__, e)
                return -1
            if self.write_error is not None:
                logger.warning("spilling to %s works again", self.directory)
                self.write_error = None
            with self.lock:
                if self.fast.get(key, _missing) is value:
                    nbytes = self._sizes[key]
                    # first into slow, then out of fast
                    self._slow[key] = _Slow(path, nbytes, disk_bytes,
                                            type(value).__name__)
                    del self.fast[key]
                    del self._sizes[key]
                    self.memory_bytes -= nbytes
                    self.spilled_bytes += nbytes
                    self.disk_bytes += disk_bytes
                    self.n_spilled += 1
                    return max(nbytes, 1)
            _remove(path)  # deleted or replaced while it was written
            return -1

    def _disk_failed(self, error, key, nbytes):
        """Remember a failed write; log only the first of a streak."""
        first = self.write_error is None
        self.write_error = error
        self._write_error_time = time.monotonic()
        log = logger.warning if first else logger.debug
        log("could not spill %r (%s bytes) to %s: %s: %s; no more spilling for %g s "
            "(then retried; repeats are not logged)", key, nbytes, self.directory,
            type(error).__name__, error, self.retry_interval)

    def evict_until(self, target_bytes=None):
        """Spill least recently used values until at most ``target_bytes``
        (default: ``target``) remain in memory; return the bytes spilled.

        Values that cannot be pickled stay in memory (logged once).  An
        ``OSError`` while writing (disk full) stops the eviction: see
        ``write_error``.
        """
        if target_bytes is None:
            target_bytes = self.target
        if target_bytes is None:
            return 0
        total = 0
        while self.memory_bytes > target_bytes:
            try:
                n = self.evict()
            except OSError:
                break
            if n == 0:
                break
            if n > 0:
                total += n
        return total

    def __repr__(self):
        return "<SpillBuffer: %d in memory (%d bytes), %d spilled (%d bytes) in %s>" % (
            len(self.fast), self.memory_bytes, len(self._slow), self.spilled_bytes,
            self.directory)
