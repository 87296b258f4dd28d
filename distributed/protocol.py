"""Framing and serialization of messages: pure functions on bytes, no sockets.

A message is any Python object; requests are dicts with an ``'op'`` key.
:func:`dumps` turns a message into a list of *frames* and :func:`loads` turns
the frames back into the message::

    >>> frames = dumps({'op': 'ping'})
    >>> loads(frames)
    {'op': 'ping'}

Frames
------
``frames[0]`` is the **header**, encoded with msgpack so that it can be
decoded without unpickling anything.  For a dict message it carries every
top-level item whose value is plain (``str``, ``int``, ``float``, ``bool``,
``None`` or short ``bytes``), so the ``op`` of a request is always readable
from the header alone.  Everything else travels in ``frames[1]``, a pickle
(protocol 5, cloudpickle for functions defined interactively), followed by
**buffer frames**: the out-of-band buffers of numpy arrays and pandas columns
and large ``bytes`` values.  Buffer frames are handed to the socket as they
are and read into buffers that the loaded objects then use: neither side
copies array data.

On the wire
-----------
::

    <u64 n> <u64 len_0> ... <u64 len_{n-1}> frame_0 ... frame_{n-1}

All integers are little-endian.  There are no sentinels: any payload
round-trips.  :func:`frame_prelude` writes the lengths; :func:`parse_count`
and :func:`parse_lengths` read and check them against :class:`Limits`, so
that a peer announcing a frame of 2**62 bytes is refused before anything is
allocated.  :class:`Decoder` assembles messages from arbitrary chunks of
bytes; tests drive it with truncated, oversized and garbage input.
"""

import io
import itertools
import os
import pickle
import struct

import copyreg
import types
from collections import ChainMap

import cloudpickle
import msgpack
from tblib import pickling_support

from .security import MAGIC as AUTH_MAGIC

__all__ = [
    "dumps",
    "loads",
    "frame_prelude",
    "frames_to_bytes",
    "loads_header",
    "parse_count",
    "parse_lengths",
    "Limits",
    "Decoder",
    "ProtocolError",
    "FrameTooLarge",
    "HandshakeNotExpected",
    "DeserializationError",
    "serialize",
    "deserialize",
    "to_blob",
    "from_blob",
]

#: buffers smaller than this stay inside the pickle; larger ones get a frame
BUFFER_THRESHOLD = 64 * 1024
#: bytes values up to this size may ride in the msgpack header
PLAIN_BYTES_LIMIT = 1024
#: lone surrogates are legal in a Python str: carry them through the header
_UNICODE_ERRORS = "surrogatepass"

_U64 = struct.Struct("<Q")
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


class ProtocolError(ValueError):
    """The bytes received are not a valid message."""


class DeserializationError(ProtocolError):
    """The frames were well formed but the pickled part could not be loaded
    (say, a function from a module this process cannot import).

    The connection is still in step: ``header`` holds the plain part of the
    message (its ``op``, for a request), so the receiver can answer.
    """

    def __init__(self, message, header=None):
        super().__init__(message)
        self.header = header or {}


class FrameTooLarge(ProtocolError):
    """A peer announced more frames or bytes than :class:`Limits` allow."""


class HandshakeNotExpected(ProtocolError):
    """A peer opened with an authentication handshake (see
    :mod:`distributed.security`) where this node expected a message."""


def _env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value else default


class Limits:
    """Upper bounds on what a peer may send in one message.

    Defaults come from the environment variables
    ``DISTRIBUTED_MAX_FRAMES``, ``DISTRIBUTED_MAX_FRAME_SIZE`` and
    ``DISTRIBUTED_MAX_MESSAGE_SIZE`` when set::

        >>> Limits(max_message_size=2**20).max_message_size
        1048576
    """

    __slots__ = ("max_frames", "max_frame_size", "max_message_size")

    def __init__(self, max_frames=None, max_frame_size=None, max_message_size=None):
        self.max_frames = max_frames or _env_int("DISTRIBUTED_MAX_FRAMES", 2**20)
        self.max_message_size = max_message_size or _env_int(
            "DISTRIBUTED_MAX_MESSAGE_SIZE", 2**36
        )
        self.max_frame_size = max_frame_size or _env_int(
            "DISTRIBUTED_MAX_FRAME_SIZE", self.max_message_size
        )

    def __repr__(self):
        return "Limits(max_frames=%d, max_frame_size=%d, max_message_size=%d)" % (
            self.max_frames,
            self.max_frame_size,
            self.max_message_size,
        )


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------
# The user's source on the other side: code and tracebacks


def _with_filename(make_code, args, filename):
    """Rebuild a code object pickled by :func:`_reduce_code`."""
    return make_code(*args).replace(co_filename=filename)


_cloudpickle_reduce_code = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _reduce_code(code):
    """cloudpickle's reduction of a code object, which puts ``<dynamic-code>``
    for its file name, with the real file name put back on load.

    A task's function defined in a script or a notebook cell is pickled by
    value; with its file name, the frames of its traceback point at the
    script's path (or the cell's file name), and the client, which has that
    source (the file, or IPython's cache of its cells in ``linecache``),
    shows the failing line::

        >>> def f(x):
        ...     return 1 / x
        >>> from_blob(to_blob(f)).__code__.co_filename == f.__code__.co_filename
        True

    (Keys never depend on it: :mod:`distributed.tokenize` hashes functions
    with cloudpickle's own, deterministic, pickle.)
    """
    make_code, args = _cloudpickle_reduce_code(code)
    return _with_filename, (make_code, args, code.co_filename)


def _pickle_traceback(tb):
    """Pickle a traceback as tblib does (each frame's file, function and
    line), plus where in its line each frame was (the column range of the
    instruction, Python >= 3.11), so that the traceback rebuilt on the other
    side underlines the failing expression, not the columns of tblib's stub.
    """
    _, args = pickling_support.pickle_traceback(tb)
    positions = []
    while tb is not None:
        code = tb.tb_frame.f_code
        # the function's first line and qualified name: tools that find the
        # function in the source (IPython >= 9, through stack_data) need them
        positions.append((_position(tb), code.co_firstlineno,
                          getattr(code, "co_qualname", code.co_name)))
        tb = tb.tb_next
    return _unpickle_traceback, (args, tuple(positions))


def _position(tb):
    """``(end line - line, column, end column)`` of ``tb``'s instruction, or None."""
    try:
        line, end_line, col, end_col = next(itertools.islice(
            tb.tb_frame.f_code.co_positions(), tb.tb_lasti // 2, None))
    except (AttributeError, StopIteration, TypeError, ValueError):
        return None  # Python < 3.11, or no position
    if None in (line, end_line, col, end_col):
        return None
    return end_line - line, col, end_col


def _unpickle_traceback(args, positions):
    """A real traceback: one frame per pickled one, made (as tblib does) by
    running a stub that raises, whose code carries the frame's file,
    function, line and column range."""
    frames, rest = [(args[0], args[1])], args[2]
    while rest is not None:
        frames.append((rest.tb_frame, rest.tb_lineno))
        rest = rest.tb_next
    if len(positions) != len(frames) or not hasattr(types.CodeType, "co_positions"):
        return pickling_support.unpickle_traceback(*args)
    top = last = None
    for (frame, lineno), (position, first, qualname) in zip(frames, positions):
        if not 0 < first <= lineno:
            first = lineno
        code = _STUB.replace(co_firstlineno=first, co_filename=frame.f_code.co_filename,
                             co_name=frame.f_code.co_name, co_qualname=qualname,
                             co_linetable=_location_table(len(_STUB.co_code) // 2, position,
                                                          lineno - first))
        try:
            exec(code, dict(frame.f_globals), {})
        except Exception as e:
            tb = e.__traceback__.tb_next  # the stub's frame
        if last is None:
            top = tb
        else:
            last.tb_next = tb
        last = tb
    return top


_STUB = compile("raise __traceback_maker", "<stub>", "exec")


def _location_table(units, position, line_delta=0):
    """A code object's location table (Python >= 3.11, Objects/locations.md)
    giving its ``units`` code units the line ``co_firstlineno + line_delta``
    and ``position``'s columns (none if ``position`` is None)."""
    table = bytearray()
    delta = _varint(line_delta << 1)  # a signed varint of a delta >= 0
    while units > 0:
        n = min(units, 8)
        if position is None:  # 13: no columns; the line delta
            table += bytes([0x80 | (13 << 3) | (n - 1)]) + delta
        else:  # 14: long form; line delta, end line delta, column + 1, end column + 1
            end_lines, col, end_col = position
            table += bytes([0x80 | (14 << 3) | (n - 1)]) + delta
            table += _varint(end_lines) + _varint(col + 1) + _varint(end_col + 1)
        delta = _varint(0)  # the next entries: the same line
        units -= n
    return bytes(table)


def _varint(value):
    out = bytearray()
    while value >= 64:
        out.append(0x40 | (value & 63))
        value >>= 6
    out.append(value)
    return bytes(out)


# Tracebacks pickle (as real traceback objects on the other side), so that a
# remote error re-raises with the frames where it happened.  Our picklers
# have it in their own dispatch table: importing dask.multiprocessing puts
# tblib's plain one in copyreg's.
copyreg.pickle(types.TracebackType, _pickle_traceback)

_DISPATCH_TABLE = ChainMap({types.TracebackType: _pickle_traceback}, copyreg.dispatch_table)


# ---------------------------------------------------------------------------
# Serialization of arbitrary objects


class _Pickler(pickle.Pickler):
    """Pickler that sends large ``bytes`` out of band, like protocol-5 buffers.

    ``bytes`` is pickled by the C fast path before ``reducer_override`` is
    consulted, so ``persistent_id`` is the one hook that can see it.  The
    buffer callback is a closure over plain lists, not a bound method: a
    pickler referring to itself would be a reference cycle, and its memo
    would keep every object it pickled alive until the cyclic GC runs.
    """

    dispatch_table = _DISPATCH_TABLE

    def __init__(self, file, oob, frames):
        super().__init__(file, protocol=5, buffer_callback=_buffer_callback(oob))
        self._frames = frames

    def persistent_id(self, obj):
        if type(obj) is bytes and len(obj) >= BUFFER_THRESHOLD:
            self._frames.append(obj)
            return len(self._frames) - 1
        return None


class _SourcePickler(cloudpickle.Pickler):
    """cloudpickle, whose code objects keep their file name (:func:`_reduce_code`)
    and whose tracebacks their columns (:func:`_pickle_traceback`)."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code,
                               types.TracebackType: _pickle_traceback},
                              cloudpickle.Pickler.dispatch_table)


class _CloudPickler(_SourcePickler):
    """Same as :class:`_Pickler`, for objects only cloudpickle can pickle."""

    def __init__(self, file, oob, frames):
        super().__init__(file, protocol=5, buffer_callback=_buffer_callback(oob))
        self._frames = frames

    persistent_id = _Pickler.persistent_id


def _buffer_callback(oob):
    def buffer_callback(pb):
        raw = pb.raw()
        if raw.nbytes < BUFFER_THRESHOLD:
            return True  # keep small buffers inside the pickle
        oob.append(raw)
        return False

    return buffer_callback


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, buffers, frames):
        super().__init__(file, buffers=buffers)
        self._frames = frames

    def persistent_load(self, pid):
        try:
            return bytes(self._frames[pid])
        except (TypeError, IndexError):
            raise pickle.UnpicklingError("bad out-of-band frame reference %r" % (pid,))


def _pickle(obj, pickler_class):
    oob, extra = [], []
    f = io.BytesIO()
    p = pickler_class(f, oob, extra)
    p.dump(obj)
    p.clear_memo()
    return f.getvalue(), oob, extra


def serialize(obj):
    """Pickle ``obj`` into ``(pickle_bytes, buffers, byte_frames)``.

    Uses the standard pickler and falls back to cloudpickle for lambdas and
    for functions and classes defined in ``__main__`` (which a remote process
    could not import by reference).
    """
    try:
        payload, oob, extra = _pickle(obj, _Pickler)
        if b"__main__" not in payload:
            return payload, oob, extra
    except Exception:
        pass
    return _pickle(obj, _CloudPickler)


def deserialize(payload, buffers=(), byte_frames=()):
    """Inverse of :func:`serialize`."""
    return _Unpickler(io.BytesIO(payload), buffers, byte_frames).load()


def to_blob(obj):
    """Pickle ``obj`` into one bytes object, opaque to whoever forwards it.

    Task specs and exceptions travel as blobs through the center, which
    never needs to (nor could always) import the classes inside.
    """
    try:
        payload = _dumps(obj, _BlobPickler)
        if b"__main__" not in payload:
            return payload
    except Exception:
        pass
    return _dumps(obj, _SourcePickler)


class _BlobPickler(pickle.Pickler):
    dispatch_table = _DISPATCH_TABLE


def _dumps(obj, pickler_class):
    f = io.BytesIO()
    pickler_class(f, protocol=5).dump(obj)
    return f.getvalue()


def from_blob(blob):
    """Inverse of :func:`to_blob`."""
    return pickle.loads(blob)


# ---------------------------------------------------------------------------
# Messages <-> frames


def _is_plain(value):
    t = type(value)
    if t is str or t is float or t is bool or value is None:
        return True
    if t is int:
        return _INT64_MIN <= value <= _UINT64_MAX
    if t is bytes:
        return len(value) <= PLAIN_BYTES_LIMIT
    return False


def _pack_header(header):
    return msgpack.packb(header, use_bin_type=True, unicode_errors=_UNICODE_ERRORS)


def dumps(msg):
    """Encode a message as a list of frames (bytes or memoryviews).

    Large buffers are returned as memoryviews on the original objects, so the
    caller must keep ``msg`` alive until the frames are written.
    """
    if type(msg) is dict:
        plain = {}
        rest = None
        for k, v in msg.items():
            if type(k) is str and _is_plain(v):
                plain[k] = v
            else:
                if rest is None:
                    rest = {}
                rest[k] = v
        header = {"d": plain}
        obj = rest
    elif _is_plain(msg):
        header = {"v": msg}
        obj = None
    else:
        header = {}
        obj = msg
    if obj is None:
        return [_pack_header(header)]
    payload, oob, extra = serialize(obj)
    header["p"] = len(oob)
    if extra:
        header["x"] = len(extra)
    frames = [_pack_header(header), payload]
    frames.extend(oob)
    frames.extend(extra)
    return frames


def loads_header(frame):
    """Decode the header frame, which never involves pickle."""
    try:
        header = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=True,
                                 unicode_errors=_UNICODE_ERRORS)
    except Exception as e:
        raise ProtocolError("undecodable message header: %s" % e) from None
    if type(header) is not dict or type(header.get("d", {})) is not dict:
        raise ProtocolError("message header is not a map")
    return header


def loads(frames):
    """Decode a list of frames made by :func:`dumps` into the message."""
    if not frames:
        raise ProtocolError("a message needs at least one frame")
    header = loads_header(frames[0])
    if "p" not in header:
        if len(frames) != 1:
            raise ProtocolError("unexpected frames after a plain message")
        if "d" in header:
            return dict(header["d"])
        if "v" in header:
            return header["v"]
        raise ProtocolError("message header has no content")
    noob = header["p"]
    nextra = header.get("x", 0)
    if type(noob) is not int or type(nextra) is not int or len(frames) != 2 + noob + nextra:
        raise ProtocolError("frame count does not match the message header")
    buffers = frames[2 : 2 + noob]
    extra = frames[2 + noob :]
    try:
        obj = deserialize(frames[1], buffers, extra)
    except ProtocolError:
        raise
    except Exception as e:
        raise DeserializationError(
            "could not unpickle the message: %s: %s" % (type(e).__name__, e),
            header.get("d")) from e
    if "d" in header:
        if type(obj) is not dict:
            raise ProtocolError("pickled part of a dict message is not a dict")
        msg = dict(header["d"])
        msg.update(obj)
        return msg
    return obj


# ---------------------------------------------------------------------------
# Frames <-> bytes


_structs = [struct.Struct("<%dQ" % n) for n in range(9)]


def _u64s(n):
    """A ``struct.Struct`` for ``n`` little-endian u64 (cached for small n)."""
    return _structs[n] if n < 9 else struct.Struct("<%dQ" % n)


def frame_prelude(frames):
    """The bytes that precede ``frames`` on the wire: count, then lengths."""
    lengths = [f.nbytes if type(f) is memoryview else len(f) for f in frames]
    return _u64s(len(lengths) + 1).pack(len(lengths), *lengths)


def frames_to_bytes(frames):
    """One bytes object with prelude and frames (for tests and small messages)."""
    return frame_prelude(frames) + b"".join(frames)


def parse_count(data, limits=DEFAULT_LIMITS):
    """Read the frame count from the first 8 bytes and check it."""
    (n,) = _U64.unpack_from(data)
    if n == 0:
        raise ProtocolError("a message needs at least one frame")
    if n > limits.max_frames:
        _check_foreign(data)
        raise FrameTooLarge(
            "peer announced %d frames, more than the limit of %d "
            "(DISTRIBUTED_MAX_FRAMES)" % (n, limits.max_frames)
        )
    return n


def _check_foreign(data):
    """Name the likely mistake when a peer opens with something that is not a message."""
    head = bytes(data[:8])
    if head.startswith(AUTH_MAGIC):
        raise HandshakeNotExpected(
            "the peer opened with an authentication handshake, but this node has "
            "no auth token (DISTRIBUTED_AUTH_TOKEN, --auth-token)")
    if head[:1] == b"\x16" and head[1:2] == b"\x03":
        raise ProtocolError(
            "the peer opened a TLS connection, but this node does not use TLS "
            "(--tls-cert, --tls-key)")


def parse_lengths(data, n, limits=DEFAULT_LIMITS):
    """Read ``n`` frame lengths and check each and their sum against limits."""
    lengths = _u64s(n).unpack_from(data)
    total = 0
    for length in lengths:
        if length > limits.max_frame_size:
            raise FrameTooLarge(
                "peer announced a frame of %d bytes, more than the limit of %d "
                "(DISTRIBUTED_MAX_FRAME_SIZE)" % (length, limits.max_frame_size)
            )
        total += length
    if total > limits.max_message_size:
        raise FrameTooLarge(
            "peer announced a message of %d bytes, more than the limit of %d "
            "(DISTRIBUTED_MAX_MESSAGE_SIZE)" % (total, limits.max_message_size)
        )
    return list(lengths)


class Decoder:
    """Incremental, socket-free decoder: feed bytes, get messages.

    ::

        >>> d = Decoder()
        >>> data = frames_to_bytes(dumps({'op': 'ping'}))
        >>> d.feed(data[:5])
        []
        >>> d.feed(data[5:])
        [{'op': 'ping'}]

    Raises :class:`ProtocolError` on invalid input; after that the decoder
    (like the connection it stands for) should be discarded.
    """

    def __init__(self, limits=DEFAULT_LIMITS):
        self.limits = limits
        self._buf = bytearray()

    def feed(self, data):
        self._buf += data
        out = []
        while True:
            frames = self._next_frames()
            if frames is None:
                return out
            out.append(loads(frames))

    def _next_frames(self):
        buf = self._buf
        if len(buf) < 8:
            return None
        n = parse_count(buf, self.limits)
        if len(buf) < 8 * (n + 1):
            return None
        # released even when parse_lengths raises: a view left in the
        # traceback would pin ``buf`` (BufferError on the next feed)
        with memoryview(buf)[8:] as view:
            lengths = parse_lengths(view, n, self.limits)
        end = 8 * (n + 1) + sum(lengths)
        if len(buf) < end:
            return None
        frames = []
        pos = 8 * (n + 1)
        for length in lengths:
            frames.append(bytes(buf[pos : pos + length]))
            pos += length
        del buf[:end]
        return frames

    @property
    def pending(self):
        """Number of bytes received but not yet part of a whole message."""
        return len(self._buf)
